//! host-gw: a plain route to each peer's subnet via the peer's public
//! address. No encapsulation, so it needs every host on one L2 segment: a
//! peer that is not on a connected subnet is reported, not routed (a route
//! via an unreachable gateway would blackhole, or be refused by the kernel).

use super::{on_link, peer_state, Backend, Local, PeerState};
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use tracing::{info, warn};
use weft_kernel::{Netlink, Route, OVERLAY_ROUTE_PROTOCOL};
use weft_model::{Lease, Network};

#[derive(Default)]
pub(crate) struct HostGw {
    /// subnet -> gateway, as programmed.
    routes: BTreeMap<Ipv4Net, Ipv4Addr>,
}

impl Backend for HostGw {
    fn program(
        &mut self,
        nl: &mut Netlink,
        net: &Network,
        _me: &Local,
        peers: &[Lease],
        verify: bool,
    ) -> Vec<PeerState> {
        let connected = nl.connected_subnets().unwrap_or_default();
        if verify {
            // What the kernel really has: a route deleted by hand is re-added.
            match nl.routes_of(OVERLAY_ROUTE_PROTOCOL) {
                Ok(kernel) => {
                    let have: BTreeMap<Ipv4Net, Option<Ipv4Addr>> =
                        kernel.iter().map(|r| (r.dst, r.gateway)).collect();
                    self.routes
                        .retain(|dst, gw| have.get(dst).copied().flatten() == Some(*gw));
                }
                Err(e) => warn!(error = %e, "cannot read routes"),
            }
        }
        let mut states = Vec::with_capacity(peers.len());
        let mut wanted = BTreeMap::new();
        for p in peers {
            let mut st = peer_state(p);
            if !on_link(&connected, p.public_ip) {
                st.problem = Some(format!(
                    "{} is not on a subnet directly connected to this host; host-gw needs all hosts on one L2 segment (use the vxlan backend otherwise)",
                    p.public_ip
                ));
                states.push(st);
                continue;
            }
            wanted.insert(p.subnet, p.public_ip);
            if self.routes.get(&p.subnet) != Some(&p.public_ip) {
                let r = Route {
                    dst: p.subnet,
                    gateway: Some(p.public_ip),
                    oif: None,
                };
                match nl.replace_route(&r, OVERLAY_ROUTE_PROTOCOL, false) {
                    Ok(()) => {
                        info!(network = %net.name, peer = %p.node, subnet = %p.subnet, via = %p.public_ip, "route programmed");
                        self.routes.insert(p.subnet, p.public_ip);
                    }
                    Err(e) => {
                        st.problem =
                            Some(format!("route to {} via {}: {e}", p.subnet, p.public_ip));
                        states.push(st);
                        continue;
                    }
                }
            }
            st.programmed = Some(format!("route {} via {}", p.subnet, p.public_ip));
            states.push(st);
        }
        let gone: Vec<Ipv4Net> = self
            .routes
            .keys()
            .filter(|d| !wanted.contains_key(d))
            .copied()
            .collect();
        for dst in gone {
            match nl.delete_route(dst, OVERLAY_ROUTE_PROTOCOL) {
                Ok(()) => {
                    info!(network = %net.name, subnet = %dst, "route of a departed peer removed");
                    self.routes.remove(&dst);
                }
                Err(e) => warn!(subnet = %dst, error = %e, "cannot remove route"),
            }
        }
        states
    }

    fn teardown(&mut self, nl: &mut Netlink) {
        for dst in std::mem::take(&mut self.routes).into_keys() {
            if let Err(e) = nl.delete_route(dst, OVERLAY_ROUTE_PROTOCOL) {
                warn!(subnet = %dst, error = %e, "cannot remove route");
            }
        }
    }

    fn owned_routes(&self) -> Vec<Ipv4Net> {
        self.routes.keys().copied().collect()
    }
}
