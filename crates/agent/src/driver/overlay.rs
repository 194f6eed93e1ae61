//! overlay: the local half of a network that spans hosts. On this host it
//! is a bridge on the subnet this host leased (the bridge driver's work);
//! the cluster (cluster/) programs the backend that joins it to the other
//! hosts' bridges (backend/: a VXLAN device, routes, or a TUN device).

use super::{link_report, BridgeDriver, Found, NetworkDriver, Target};
use crate::error::Result;
use std::collections::HashMap;
use weft_kernel::{Link, Netlink};
use weft_model::api::ProgrammedView;
use weft_model::nft::NetworkRule;
use weft_model::overlay::vxlan_device;
use weft_model::sandbox::EndpointKind;
use weft_model::{BackendKind, Endpoint, Network};

#[derive(Default)]
pub(crate) struct OverlayDriver {
    bridge: BridgeDriver,
}

/// The VXLAN device of a vxlan overlay: the backend makes it, and it stays
/// through an agent restart so traffic keeps flowing.
fn vxlan_of(net: &Network) -> Option<String> {
    net.overlay()
        .filter(|o| o.backend == BackendKind::Vxlan)
        .map(|_| vxlan_device(&net.id))
}

impl NetworkDriver for OverlayDriver {
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

    fn owned_links(&self, net: &Network) -> Vec<String> {
        let mut v = self.bridge.owned_links(net);
        v.extend(vxlan_of(net));
        v
    }

    fn programmed(&self, nl: &mut Netlink, net: &Network) -> Vec<ProgrammedView> {
        let mut v = self.bridge.programmed(nl, net);
        if let Some(dev) = vxlan_of(net) {
            let mut r = link_report(nl, "vxlan device", &dev, &format!("ip -d link show {dev}"));
            if let Some(o) = net.overlay() {
                r.detail = format!("{}, VNI {}, UDP port {}", r.detail, o.vni, o.port);
            }
            v.push(r);
        }
        v
    }

    fn firewall(&self, net: &Network) -> Option<NetworkRule> {
        self.bridge.firewall(net)
    }
}
