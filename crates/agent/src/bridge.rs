//! The network drivers' kernel side. bridge: a Linux bridge per network on
//! this host, a veth pair per endpoint with the host end on the bridge.
//! macvlan: a macvlan interface of the parent per endpoint, straight on the
//! LAN, and optionally one for the host itself (host access).

use crate::error::{AgentError, Result};
use ipnet::Ipv4Net;
use weft_kernel::{sysctl, Netlink, Netns};
use weft_model::network::{self, Driver};
use weft_model::sandbox::{mac_for, EndpointKind};
use weft_model::{Endpoint, Network};

/// Makes the network ready on this host. Returns the index endpoints attach
/// to (bridge, or macvlan parent), the host-access interface's index, and
/// whether anything was created now. `net.parent_created` records a VLAN
/// sub-interface weft made.
pub(crate) fn ensure(nl: &mut Netlink, net: &mut Network) -> Result<(u32, Option<u32>, bool)> {
    match net.driver {
        Driver::Bridge | Driver::Overlay => ensure_network(nl, net).map(|(i, c)| (i, None, c)),
        Driver::Macvlan => ensure_macvlan(nl, net),
    }
}

fn ensure_macvlan(nl: &mut Netlink, net: &mut Network) -> Result<(u32, Option<u32>, bool)> {
    let parent = net.parent.clone().expect("macvlan networks have a parent");
    let mut created = false;
    let index = match nl.link_by_name(&parent)? {
        Some(l) => {
            if !l.up {
                nl.set_up(l.index)?;
            }
            l.index
        }
        None => {
            let Some((base, vid)) = network::vlan_of(&parent) else {
                return Err(AgentError::BadRequest(format!(
                    "-o parent={parent}: no such interface on this host"
                )));
            };
            let base_link = nl.link_by_name(base)?.ok_or_else(|| {
                AgentError::BadRequest(format!(
                    "-o parent={parent}: no interface {base} on this host"
                ))
            })?;
            nl.add_vlan(base_link.index, &parent, vid).map_err(|e| match e.errno() {
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => AgentError::BadRequest(format!(
                    "-o parent={parent}: this kernel cannot make 802.1q sub-interfaces (CONFIG_VLAN_8021Q): {e}"
                )),
                _ => e.into(),
            })?;
            net.parent_created = true;
            created = true;
            nl.link_by_name(&parent)?
                .ok_or_else(|| AgentError::Internal(format!("{parent} vanished")))?
                .index
        }
    };
    let shim = match net.host_access {
        None => None,
        Some(ip) => {
            let name = net.shim();
            let shim = match nl.link_by_name(&name)? {
                Some(l) => l.index,
                None => {
                    let made = nl
                        .add_macvlan(index, &name, None, mac_for(ip), net.mtu)
                        .map_err(AgentError::from)
                        .and_then(|_| {
                            nl.link_by_name(&name)?
                                .ok_or_else(|| AgentError::Internal(format!("{name} vanished")))
                        });
                    match made {
                        Ok(l) => l.index,
                        Err(e) => {
                            if net.parent_created {
                                let _ = nl.delete_link(&parent);
                            }
                            return Err(e);
                        }
                    }
                }
            };
            nl.set_up(shim)?;
            nl.add_address(shim, Ipv4Net::new(ip, 32).expect("valid"))?;
            Some(shim)
        }
    };
    Ok((index, shim, created))
}

/// Undoes `ensure`: the bridge, or the host-access interface and a parent weft made.
pub(crate) fn remove(nl: &mut Netlink, net: &Network) -> Result<()> {
    match net.driver {
        Driver::Bridge | Driver::Overlay => {
            nl.delete_link(&net.bridge)?;
        }
        Driver::Macvlan => {
            nl.delete_link(&net.shim())?;
            if net.parent_created {
                if let Some(p) = &net.parent {
                    nl.delete_link(p)?;
                }
            }
        }
    }
    Ok(())
}

/// Plugs a macvlan interface of `parent` into the sandbox as the endpoint,
/// and gives the host a route to it through its own macvlan, if it has one
/// (the kernel does not pass traffic between a parent and its macvlans).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attach_macvlan(
    nl: &mut Netlink,
    ns: &Netns,
    ns_nl: &mut Netlink,
    parent: u32,
    shim: Option<u32>,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<()> {
    nl.add_macvlan(parent, &ep.ifname, Some(ns.fd()), endpoint_mac(ep)?, mtu)?;
    configure_new(ns, ns_nl, ep, mtu, default_route)?;
    if let Some(shim) = shim {
        nl.add_host_route(ep.ip, shim)?;
    }
    Ok(())
}

/// Makes the network's bridge exist, be up, carry the gateway address and
/// the MTU. Returns the bridge's index and whether it was created now.
fn ensure_network(nl: &mut Netlink, net: &Network) -> Result<(u32, bool)> {
    let (index, created) = nl.ensure_bridge(&net.bridge, mac_for(net.gateway), net.mtu)?;
    let gw = Ipv4Net::new(net.gateway, net.subnet.prefix_len()).expect("valid prefix");
    let configured = (|| {
        nl.add_address(index, gw)?;
        // Published ports answer on 127.0.0.1 too: the kernel must route
        // those (DNAT'd) packets out of the bridge.
        sysctl::set(&format!("net.ipv4.conf.{}.route_localnet", net.bridge), "1")?;
        Ok(())
    })();
    if let Err(e) = configured {
        if created {
            let _ = nl.delete_link(&net.bridge);
        }
        return Err(e);
    }
    Ok((index, created))
}

/// Attaches a prepared namespace's veth pair as the endpoint: 1 request on
/// the host side, 3 inside. On error the caller deletes both possible names
/// of the host end and the namespace.
pub(crate) fn attach_prepared(
    nl: &mut Netlink,
    (host_index, peer_index, ns_nl): (u32, u32, &mut Netlink),
    bridge_index: u32,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<()> {
    let t = std::time::Instant::now();
    nl.enslave_up(host_index, Some(&ep.host_ifname), bridge_index, mtu)?;
    let host_us = t.elapsed().as_micros();
    configure_inside(ns_nl, peer_index, ep, mtu, default_route)?;
    tracing::debug!(
        host_us,
        inside_us = t.elapsed().as_micros() - host_us,
        "attached"
    );
    Ok(())
}

/// Creates the endpoint's veth pair and configures the sandbox end. On error
/// the caller deletes `ep.host_ifname`, which takes the sandbox end with it.
/// Returns the interface index inside the namespace.
pub(crate) fn attach(
    nl: &mut Netlink,
    ns: &Netns,
    ns_nl: &mut Netlink,
    bridge_index: u32,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<u32> {
    nl.add_veth(
        &ep.host_ifname,
        Some(bridge_index),
        &ep.ifname,
        ns.fd(),
        mtu,
    )?;
    crate::netns_pool::quiet_host_end(&ep.host_ifname)?;
    let index = configure_new(ns, ns_nl, ep, mtu, default_route)?;
    Ok(index)
}

/// The MAC a runtime asked for, or the one derived from the address.
pub(crate) fn endpoint_mac(ep: &Endpoint) -> Result<[u8; 6]> {
    match &ep.mac {
        None => Ok(mac_for(ep.ip)),
        Some(s) => {
            let bytes: Vec<u8> = s
                .split(':')
                .map(|b| u8::from_str_radix(b, 16))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| {
                    AgentError::BadRequest(format!(
                        "MAC {s:?} is not six hex bytes like 02:42:0a:00:00:02"
                    ))
                })?;
            let mac: [u8; 6] = bytes.try_into().map_err(|_| {
                AgentError::BadRequest(format!(
                    "MAC {s:?} is not six hex bytes like 02:42:0a:00:00:02"
                ))
            })?;
            if mac[0] & 1 == 1 {
                return Err(AgentError::BadRequest(format!(
                    "MAC {s} is a multicast address"
                )));
            }
            Ok(mac)
        }
    }
}

/// Configures an interface just made inside the namespace; returns its index.
fn configure_new(
    ns: &Netns,
    ns_nl: &mut Netlink,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<u32> {
    let link = ns_nl.link_by_name(&ep.ifname)?.ok_or_else(|| {
        AgentError::Internal(format!(
            "{} did not appear in {}",
            ep.ifname,
            ns.path().display()
        ))
    })?;
    configure_inside(ns_nl, link.index, ep, mtu, default_route)?;
    Ok(link.index)
}

fn configure_inside(
    ns_nl: &mut Netlink,
    index: u32,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<()> {
    ns_nl.set_mac_up(index, endpoint_mac(ep)?, mtu)?;
    ns_nl.add_address(
        index,
        Ipv4Net::new(ep.ip, ep.prefix_len).expect("valid prefix"),
    )?;
    if default_route {
        ns_nl.add_default_route(ep.gateway, index)?;
    }
    Ok(())
}

/// Removes the endpoint's veth pair; absent is fine. A macvlan endpoint has
/// nothing on the host but its host-access route; its interface goes with
/// the namespace (or `detach_inside`).
pub(crate) fn detach(nl: &mut Netlink, ep: &Endpoint, shim: Option<u32>) -> Result<()> {
    match ep.kind {
        EndpointKind::Veth => {
            nl.delete_link(&ep.host_ifname)?;
        }
        EndpointKind::Macvlan => {
            if let Some(shim) = shim {
                nl.delete_host_route(ep.ip, shim)?;
            }
        }
    }
    Ok(())
}
