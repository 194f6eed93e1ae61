//! shared: the local segment of a network whose one subnet is shared by
//! all hosts (Docker's overlay, weave). On every host it is a bridge with
//! the whole subnet and the same gateway address and MAC (so a sandbox's
//! egress leaves by its own host, masqueraded there, whichever host it is
//! on); the cluster's lan backend (backend/lan.rs) puts the network's
//! VXLAN device on the bridge and programs every other host's sandboxes
//! on it. Endpoints are plugged in as on a bridge network.

use super::{link_report, BridgeDriver, Found, NetworkDriver, Target};
use crate::error::Result;
use std::collections::HashMap;
use weft_kernel::{Link, Netlink};
use weft_model::api::ProgrammedView;
use weft_model::nft::NetworkRule;
use weft_model::overlay::vxlan_device;
use weft_model::sandbox::EndpointKind;
use weft_model::{Endpoint, Network};

#[derive(Default)]
pub(crate) struct SharedDriver {
    bridge: BridgeDriver,
}

impl NetworkDriver for SharedDriver {
    fn setup(&mut self, nl: &mut Netlink, net: &mut Network) -> Result<bool> {
        self.bridge.setup(nl, net)
    }

    fn teardown(&mut self, nl: &mut Netlink, net: &Network) -> Result<()> {
        self.bridge.teardown(nl, net)
    }

    fn endpoint_kind(&self, host_ifname: String) -> EndpointKind {
        self.bridge.endpoint_kind(host_ifname)
    }

    fn attach(
        &self,
        nl: &mut Netlink,
        net: &Network,
        ep: &Endpoint,
        target: Target<'_>,
    ) -> Result<()> {
        self.bridge.attach(nl, net, ep, target)
    }

    fn detach(&self, nl: &mut Netlink, ep: &Endpoint, inside: Option<&mut Netlink>) -> Result<()> {
        self.bridge.detach(nl, ep, inside)
    }

    fn repair(
        &self,
        nl: &mut Netlink,
        net: &Network,
        ep: &Endpoint,
        links: &HashMap<String, Link>,
    ) -> Result<Found> {
        self.bridge.repair(nl, net, ep, links)
    }

    /// The VXLAN device stays through an agent restart, so traffic between
    /// hosts keeps flowing while the agent is down.
    fn owned_links(&self, net: &Network) -> Vec<String> {
        let mut v = self.bridge.owned_links(net);
        v.push(vxlan_device(&net.id));
        v
    }

    fn programmed(&self, nl: &mut Netlink, net: &Network) -> Vec<ProgrammedView> {
        let mut v = self.bridge.programmed(nl, net);
        let dev = vxlan_device(&net.id);
        let mut r = link_report(
            nl,
            "vxlan device",
            &dev,
            &format!("ip -d link show {dev}; bridge fdb show dev {dev}; ip neigh show dev {dev}"),
        );
        if let Ok(Some(l)) = nl.link_by_name(&dev) {
            let bridge = net.bridge().unwrap_or_default();
            let on_bridge = nl
                .link_by_name(bridge)
                .ok()
                .flatten()
                .is_some_and(|b| l.master == Some(b.index));
            let remote = nl.neighbours(l.index).map(|n| n.len()).unwrap_or(0);
            let o = net.overlay();
            r.detail = format!(
                "{}, VNI {}, UDP port {}, {}, {remote} remote sandbox{} (neigh + fdb)",
                r.detail,
                o.map_or(0, |o| o.vni),
                o.map_or(0, |o| o.port),
                if on_bridge {
                    format!("a port of {bridge}")
                } else {
                    format!("NOT on {bridge}")
                },
                if remote == 1 { "" } else { "es" },
            );
        }
        v.push(r);
        v
    }

    fn firewall(&self, net: &Network) -> Option<NetworkRule> {
        self.bridge.firewall(net)
    }
}
