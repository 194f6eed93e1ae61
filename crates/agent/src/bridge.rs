//! The bridge driver: a Linux bridge per network on this host, a veth pair
//! per endpoint with the host end on the bridge.

use crate::error::{AgentError, Result};
use crate::netns_pool::Prepared;
use ipnet::Ipv4Net;
use weft_kernel::{Netlink, Netns};
use weft_model::sandbox::mac_for;
use weft_model::{Endpoint, Network};

/// Makes the network's bridge exist, be up and carry the gateway address.
/// Returns the bridge's interface index.
pub(crate) fn ensure_network(nl: &mut Netlink, net: &Network) -> Result<u32> {
    let index = nl.ensure_bridge(&net.bridge)?;
    let gw = Ipv4Net::new(net.gateway, net.subnet.prefix_len()).expect("valid prefix");
    nl.add_address(index, gw)?;
    Ok(index)
}

/// Attaches a prepared namespace's veth pair as the endpoint: 1 request on
/// the host side, 3 inside. On error the caller deletes both possible names
/// of the host end and the namespace.
pub(crate) fn attach_prepared(
    nl: &mut Netlink,
    p: &mut Prepared,
    bridge_index: u32,
    ep: &Endpoint,
    default_route: bool,
) -> Result<()> {
    let t = std::time::Instant::now();
    nl.enslave_up(p.host_index, Some(&ep.host_ifname), bridge_index)?;
    let host_us = t.elapsed().as_micros();
    configure_inside(&mut p.ns_nl, p.peer_index, ep, default_route)?;
    tracing::debug!(host_us, inside_us = t.elapsed().as_micros() - host_us, "attached");
    Ok(())
}

/// Creates the endpoint's veth pair and configures the sandbox end. On error
/// the caller deletes `ep.host_ifname`, which takes the sandbox end with it.
pub(crate) fn attach(
    nl: &mut Netlink,
    ns: &Netns,
    ns_nl: &mut Netlink,
    bridge_index: u32,
    ep: &Endpoint,
    default_route: bool,
) -> Result<()> {
    nl.add_veth(&ep.host_ifname, Some(bridge_index), &ep.ifname, ns.fd())?;
    crate::netns_pool::quiet_host_end(&ep.host_ifname)?;
    let link = ns_nl.link_by_name(&ep.ifname)?.ok_or_else(|| {
        AgentError::Internal(format!(
            "{} did not appear in {}",
            ep.ifname,
            ns.path().display()
        ))
    })?;
    configure_inside(ns_nl, link.index, ep, default_route)
}

fn configure_inside(
    ns_nl: &mut Netlink,
    index: u32,
    ep: &Endpoint,
    default_route: bool,
) -> Result<()> {
    ns_nl.set_mac_up(index, mac_for(ep.ip))?;
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
