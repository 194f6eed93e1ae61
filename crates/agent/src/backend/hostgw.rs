//! host-gw: a plain route to each peer's subnet via the peer's public
//! address. No encapsulation, so it needs every host on one L2 segment: a
//! peer that is not on a connected subnet is reported, not routed (a route
//! via an unreachable gateway would blackhole, or be refused by the kernel).

use super::{on_link, peer_state, Backend, BackendError, Kernel, Local, PeerState};
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use tracing::{info, warn};
use weft_kernel::{Route, OVERLAY_ROUTE_PROTOCOL};
use weft_model::{Lease, Network};

#[derive(Default)]
pub(crate) struct HostGw {
    /// subnet -> gateway, as programmed.
    routes: BTreeMap<Ipv4Net, Ipv4Addr>,
}

impl Backend for HostGw {
    fn program(
        &mut self,
        nl: &mut dyn Kernel,
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
                st.problem = Some(BackendError::NotOnLink(p.public_ip).to_string());
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
                    Err(source) => {
                        let e = BackendError::Route {
                            subnet: p.subnet,
                            via: Some(p.public_ip),
                            source,
                        };
                        st.problem = Some(e.to_string());
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

    fn teardown(&mut self, nl: &mut dyn Kernel) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{local, overlay_network, peer, FakeKernel};
    use weft_model::BackendKind;

    fn setup() -> (FakeKernel, HostGw, Network, Local) {
        (
            FakeKernel::with_underlay("198.51.100.0/24"),
            HostGw::default(),
            overlay_network("ov", BackendKind::HostGw),
            local("10.40.1.0/24"),
        )
    }

    fn via(k: &FakeKernel, dst: &str) -> Option<Ipv4Addr> {
        let r = k.route(dst)?;
        assert_eq!(r.protocol, OVERLAY_ROUTE_PROTOCOL, "marked as weft's");
        assert!(!r.onlink && r.route.oif.is_none());
        r.route.gateway
    }

    #[test]
    fn adds_a_route_per_peer_and_reports_peers_off_the_segment() {
        let (mut k, mut b, net, me) = setup();
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("c", "10.40.3.0/24", "198.51.100.13"),
            peer("far", "10.40.4.0/24", "203.0.113.7"),
        ];
        let st = b.program(&mut k, &net, &me, &peers, false);
        assert_eq!(
            via(&k, "10.40.2.0/24"),
            Some("198.51.100.12".parse().unwrap())
        );
        assert_eq!(
            via(&k, "10.40.3.0/24"),
            Some("198.51.100.13".parse().unwrap())
        );
        assert!(k.route("10.40.4.0/24").is_none(), "never into a blackhole");
        assert_eq!(k.routes.len(), 2);
        assert_eq!(
            st[0].programmed.as_deref(),
            Some("route 10.40.2.0/24 via 198.51.100.12")
        );
        assert!(st[2].programmed.is_none());
        assert!(st[2]
            .problem
            .as_deref()
            .unwrap()
            .contains("not on a subnet directly connected"));
        let mut owned = b.owned_routes();
        owned.sort();
        assert_eq!(owned.len(), 2);
    }

    #[test]
    fn a_second_identical_call_changes_nothing() {
        let (mut k, mut b, net, me) = setup();
        let peers = [peer("b", "10.40.2.0/24", "198.51.100.12")];
        let first = b.program(&mut k, &net, &me, &peers, false);
        let writes = k.writes;
        let again = b.program(&mut k, &net, &me, &peers, false);
        assert_eq!(k.writes, writes, "no netlink change");
        assert_eq!(again, first);
        // Nor with verify, when the kernel matches.
        b.program(&mut k, &net, &me, &peers, true);
        assert_eq!(k.writes, writes);
    }

    #[test]
    fn replaces_what_changed_and_removes_peers_that_left() {
        let (mut k, mut b, net, me) = setup();
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("c", "10.40.3.0/24", "198.51.100.13"),
        ];
        b.program(&mut k, &net, &me, &peers, false);
        // b moved to another address; c left; d joined.
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.22"),
            peer("d", "10.40.5.0/24", "198.51.100.14"),
        ];
        b.program(&mut k, &net, &me, &peers, false);
        assert_eq!(
            via(&k, "10.40.2.0/24"),
            Some("198.51.100.22".parse().unwrap())
        );
        assert!(k.route("10.40.3.0/24").is_none(), "c's route went");
        assert_eq!(
            via(&k, "10.40.5.0/24"),
            Some("198.51.100.14".parse().unwrap())
        );
        assert_eq!(k.routes.len(), 2);
        // Everyone left.
        b.program(&mut k, &net, &me, &[], false);
        assert!(k.routes.is_empty());
        assert!(b.owned_routes().is_empty());
    }

    #[test]
    fn verify_heals_a_route_deleted_by_hand() {
        let (mut k, mut b, net, me) = setup();
        let peers = [peer("b", "10.40.2.0/24", "198.51.100.12")];
        b.program(&mut k, &net, &me, &peers, false);
        k.routes.clear();
        b.program(&mut k, &net, &me, &peers, false);
        assert!(k.routes.is_empty(), "without verify: memory is trusted");
        b.program(&mut k, &net, &me, &peers, true);
        assert_eq!(
            via(&k, "10.40.2.0/24"),
            Some("198.51.100.12".parse().unwrap())
        );
        // A route changed by hand is put back too.
        k.routes
            .get_mut(&"10.40.2.0/24".parse().unwrap())
            .unwrap()
            .route
            .gateway = Some("198.51.100.99".parse().unwrap());
        b.program(&mut k, &net, &me, &peers, true);
        assert_eq!(
            via(&k, "10.40.2.0/24"),
            Some("198.51.100.12".parse().unwrap())
        );
    }

    #[test]
    fn a_refused_route_is_reported_and_retried() {
        let (mut k, mut b, net, me) = setup();
        let peers = [peer("b", "10.40.2.0/24", "198.51.100.12")];
        k.failing.insert("replace_route");
        let st = b.program(&mut k, &net, &me, &peers, false);
        let problem = st[0].problem.as_deref().unwrap();
        assert!(
            problem.starts_with("route to 10.40.2.0/24 via 198.51.100.12: "),
            "{problem}"
        );
        assert!(st[0].programmed.is_none());
        k.failing.clear();
        let st = b.program(&mut k, &net, &me, &peers, false);
        assert!(st[0].problem.is_none());
        assert!(k.route("10.40.2.0/24").is_some());
    }

    #[test]
    fn teardown_removes_every_route() {
        let (mut k, mut b, net, me) = setup();
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("c", "10.40.3.0/24", "198.51.100.13"),
        ];
        b.program(&mut k, &net, &me, &peers, false);
        b.teardown(&mut k);
        assert!(k.routes.is_empty());
        assert!(b.owned_routes().is_empty());
    }
}
