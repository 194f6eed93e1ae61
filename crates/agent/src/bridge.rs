//! The bridge driver: a Linux bridge per network on this host, a veth pair
//! per endpoint with the host end on the bridge.

use crate::error::Result;
use ipnet::Ipv4Net;
use weft_kernel::{Netlink, Netns};
use weft_model::{Endpoint, Network};

/// Makes the network's bridge exist, be up and carry the gateway address.
/// Returns the bridge's interface index.
pub(crate) fn ensure_network(nl: &mut Netlink, net: &Network) -> Result<u32> {
    let index = nl.ensure_bridge(&net.bridge)?;
    let gw = Ipv4Net::new(net.gateway, net.subnet.prefix_len()).expect("valid prefix");
    nl.add_address(index, gw)?;
    Ok(index)
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
    nl.add_veth(&ep.host_ifname, bridge_index, &ep.ifname, ns.fd())?;
    let link = ns_nl.link_by_name(&ep.ifname)?.ok_or_else(|| {
        crate::error::AgentError::Internal(format!(
            "{} did not appear in {}",
            ep.ifname,
            ns.path().display()
        ))
    })?;
    // Brought up here, not at creation: the kernel refuses a peer created up in another namespace.
    ns_nl.set_up(link.index)?;
    ns_nl.add_address(
        link.index,
        Ipv4Net::new(ep.ip, ep.prefix_len).expect("valid prefix"),
    )?;
    if default_route {
        ns_nl.add_default_route(ep.gateway, link.index)?;
    }
    Ok(())
}

/// Removes the endpoint's veth pair; absent is fine.
pub(crate) fn detach(nl: &mut Netlink, ep: &Endpoint) -> Result<()> {
    nl.delete_link(&ep.host_ifname)?;
    Ok(())
}
