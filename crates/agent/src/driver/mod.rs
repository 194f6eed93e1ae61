//! Network drivers: how a network exists on this host and how one endpoint
//! is plugged into it. One trait, one file per driver, chosen once per
//! network by `for_network` (the only `match` on the driver). Everything
//! else in the agent (the attach path, reconcile, the firewall, the views)
//! talks to a network through this trait.
//!
//! Adding a driver: a variant of `weft_model::network::DriverSettings`, a
//! file here implementing `NetworkDriver`, and one arm in `for_network`.

mod bridge;
mod macvlan;
mod overlay;
mod shared;

pub(crate) use bridge::BridgeDriver;
pub(crate) use macvlan::MacvlanDriver;
pub(crate) use overlay::OverlayDriver;
pub(crate) use shared::SharedDriver;

use crate::error::{AgentError, Result};
use ipnet::Ipv4Net;
use std::collections::HashMap;
use weft_kernel::{Link, Netlink, Netns};
use weft_model::api::ProgrammedView;
use weft_model::network::DriverSettings;
use weft_model::nft::NetworkRule;
use weft_model::sandbox::{mac_for, EndpointKind};
use weft_model::{Endpoint, Network};

/// Where an endpoint is plugged in.
pub(crate) enum Target<'a> {
    /// A namespace weft configures (its own sandboxes, CNI's): the
    /// interface is made inside with its MAC, address and, if asked, the
    /// default route.
    Namespace {
        ns: &'a Netns,
        nl: &'a mut Netlink,
        /// A veth pair made ahead by the namespace pool (host end, peer).
        prepared: Option<(u32, u32)>,
        default_route: bool,
    },
    /// Docker's Join: the container's end stays in the host namespace,
    /// named `ep.ifname`, for Docker to move and configure.
    HostForRuntime,
}

/// How an adopted endpoint was found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// As it should be, or put right in place.
    Fine,
    /// Gone (deleted behind weft's back): attach it again.
    Missing,
}

/// A network's driver. Methods that change the kernel tolerate parts that
/// already exist or are already gone, so that reconcile can call them again.
pub(crate) trait NetworkDriver: Send + Sync {
    /// Makes the network's host side exist, be up and configured. Records in
    /// `net` what must be remembered (a VLAN parent weft created). Returns
    /// whether anything was created now (a rollback removes only that).
    fn setup(&mut self, nl: &mut Netlink, net: &mut Network) -> Result<bool>;

    /// Removes the network's host side.
    fn teardown(&mut self, nl: &mut Netlink, net: &Network) -> Result<()>;

    /// How a new endpoint of this network is plugged in; `host_ifname` is
    /// the name its host end gets, if it has one.
    fn endpoint_kind(&self, host_ifname: String) -> EndpointKind;

    /// Plugs `ep` in. On error the caller's rollback calls `detach`.
    fn attach(
        &self,
        nl: &mut Netlink,
        net: &Network,
        ep: &Endpoint,
        target: Target<'_>,
    ) -> Result<()>;

    /// Unplugs `ep` on the host side; absent is fine. `inside` is the
    /// sandbox's namespace when its interface must go now (it does not go
    /// with the namespace: a runtime's namespace, or a disconnect).
    fn detach(&self, nl: &mut Netlink, ep: &Endpoint, inside: Option<&mut Netlink>) -> Result<()>;

    /// Whether the host side must be deleted one by one on removal even
    /// when the namespace goes (a host route survives its namespace).
    fn detach_outlives_namespace(&self) -> bool {
        false
    }

    /// Checks an adopted endpoint against the host's `links` and puts right
    /// what it can in place.
    fn repair(
        &self,
        nl: &mut Netlink,
        net: &Network,
        ep: &Endpoint,
        links: &HashMap<String, Link>,
    ) -> Result<Found>;

    /// Links on the host this network owns (garbage collection keeps them).
    fn owned_links(&self, net: &Network) -> Vec<String>;

    /// What the driver programmed, read back from the kernel now.
    fn programmed(&self, nl: &mut Netlink, net: &Network) -> Vec<ProgrammedView>;

    /// The network's part of weft's nft table, if it has one.
    fn firewall(&self, net: &Network) -> Option<NetworkRule>;

    /// Why `-p` cannot publish ports of this network, if it cannot.
    fn refuses_ports(&self, net: &Network) -> Option<String> {
        net.internal.then(|| {
            format!(
                "network {} is internal, so nothing outside may reach it",
                net.name
            )
        })
    }
}

/// The factory: the driver of `net`, chosen once when the network is loaded.
pub(crate) fn for_network(net: &Network) -> Box<dyn NetworkDriver> {
    match &net.settings {
        DriverSettings::Bridge(_) => Box::new(BridgeDriver::default()),
        DriverSettings::Macvlan(_) => Box::new(MacvlanDriver::default()),
        DriverSettings::Overlay(o) if o.overlay.is_shared() => Box::new(SharedDriver::default()),
        DriverSettings::Overlay(_) => Box::new(OverlayDriver::default()),
    }
}

/// The MAC a runtime asked for, or the one derived from the address.
pub(crate) fn endpoint_mac(ep: &Endpoint) -> Result<[u8; 6]> {
    ep.mac.as_deref().map_or(Ok(mac_for(ep.ip)), parse_mac)
}

/// A unicast MAC written as six hex bytes (02:42:0a:00:00:02).
pub(crate) fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || {
        AgentError::BadRequest(format!(
            "MAC {s:?} is not six hex bytes like 02:42:0a:00:00:02"
        ))
    };
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad())?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 == 1 {
        return Err(AgentError::BadRequest(format!(
            "MAC {s} is a multicast address"
        )));
    }
    Ok(mac)
}

/// Configures an interface just made inside the namespace.
fn configure_new(
    ns: &Netns,
    ns_nl: &mut Netlink,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<()> {
    let link = ns_nl
        .link_by_name(&ep.ifname)?
        .ok_or_else(|| AgentError::Vanished {
            what: ep.ifname.clone(),
            place: ns.path().display().to_string(),
        })?;
    configure_inside(ns_nl, link.index, ep, mtu, default_route)
}

/// MAC and up, the address, and maybe the default route: 3 requests.
fn configure_inside(
    ns_nl: &mut Netlink,
    index: u32,
    ep: &Endpoint,
    mtu: Option<u32>,
    default_route: bool,
) -> Result<()> {
    ns_nl.set_mac_up(index, endpoint_mac(ep)?, mtu)?;
    let addr = Ipv4Net::new(ep.ip, ep.prefix_len).map_err(|_| {
        AgentError::BadRequest(format!("/{} is not a prefix length", ep.prefix_len))
    })?;
    ns_nl.add_address(index, addr)?;
    if default_route {
        ns_nl.add_default_route(ep.gateway, index, !addr.contains(&ep.gateway))?;
    }
    Ok(())
}

/// One link as the kernel has it now.
fn link_report(nl: &mut Netlink, what: &str, name: &str, check: &str) -> ProgrammedView {
    let found = nl.link_by_name(name);
    ProgrammedView {
        what: what.into(),
        name: name.into(),
        present: matches!(found, Ok(Some(_))),
        detail: match found {
            Ok(Some(l)) if l.up => "up".into(),
            Ok(Some(_)) => "down".into(),
            Ok(None) => "missing".into(),
            Err(e) => format!("cannot read: {e}"),
        },
        check: check.into(),
    }
}
