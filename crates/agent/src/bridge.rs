//! The bridge driver: a Linux bridge per network on this host, a veth pair
//! per endpoint with the host end on the bridge.

use crate::error::{AgentError, Result};
use crate::netns_pool::Prepared;
use ipnet::Ipv4Net;
use weft_kernel::{sysctl, Netlink, Netns};
use weft_model::sandbox::mac_for;
use weft_model::{Endpoint, Network};

/// Makes the network's bridge exist, be up, carry the gateway address and
/// the MTU. Returns the bridge's index and whether it was created now.
pub(crate) fn ensure_network(nl: &mut Netlink, net: &Network) -> Result<(u32, bool)> {
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
    p: &mut Prepared,
    bridge_index: u32,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<()> {
    let t = std::time::Instant::now();
    nl.enslave_up(p.host_index, Some(&ep.host_ifname), bridge_index, mtu)?;
    let host_us = t.elapsed().as_micros();
    configure_inside(&mut p.ns_nl, p.peer_index, ep, mtu, default_route)?;
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
    ns_nl.set_mac_up(index, mac_for(ep.ip), mtu)?;
    ns_nl.add_address(
        index,
        Ipv4Net::new(ep.ip, ep.prefix_len).expect("valid prefix"),
    )?;
    if default_route {
        ns_nl.add_default_route(ep.gateway, index)?;
    }
    Ok(())
}

/// Removes the endpoint's veth pair; absent is fine.
pub(crate) fn detach(nl: &mut Netlink, ep: &Endpoint) -> Result<()> {
    nl.delete_link(&ep.host_ifname)?;
    Ok(())
}
