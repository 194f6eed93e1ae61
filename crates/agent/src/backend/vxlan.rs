//! vxlan: kernel VXLAN between hosts, as flannel's vxlan backend does it,
//! with learning off and everything programmed from the leases.
//!
//! One device per overlay network (`wvx-<id>`, VNI and port from the
//! network, the host's public address as source), carrying this host's
//! VTEP address (its subnet's network address, /32). Per peer, three
//! entries: a permanent neighbour (peer VTEP address -> peer VTEP MAC), an
//! FDB entry (peer VTEP MAC -> peer public address) and an onlink route
//! (peer subnet via peer VTEP address). With direct routing, a peer on the
//! same L2 segment gets a plain route via its public address instead.
//! The VTEP MAC is derived from the host id, so it survives restarts.

use super::{all_failed, on_link, peer_state, Backend, BackendError, Kernel, Local, PeerState};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use tracing::{info, warn};
use weft_kernel::{Route, OVERLAY_ROUTE_PROTOCOL};
use weft_model::overlay::{format_mac, parse_mac};
use weft_model::{Lease, Network};

/// What is programmed for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Encap {
        subnet: Ipv4Net,
        vtep: Ipv4Addr,
        mac: [u8; 6],
        remote: Ipv4Addr,
    },
    Direct {
        subnet: Ipv4Net,
        via: Ipv4Addr,
    },
}

impl Entry {
    fn subnet(&self) -> Ipv4Net {
        match self {
            Entry::Encap { subnet, .. } | Entry::Direct { subnet, .. } => *subnet,
        }
    }

    fn describe(&self) -> String {
        match self {
            Entry::Encap {
                subnet,
                vtep,
                mac,
                remote,
            } => format!(
                "route {subnet} via {vtep} onlink, neigh {vtep} lladdr {}, fdb {} dst {remote}",
                format_mac(mac),
                format_mac(mac)
            ),
            Entry::Direct { subnet, via } => format!("route {subnet} via {via} (direct)"),
        }
    }
}

#[derive(Default)]
pub(crate) struct Vxlan {
    dev: Option<u32>,
    /// The VTEP address put on `dev`.
    addr: Option<Ipv4Net>,
    /// host id -> entry, as programmed.
    peers: BTreeMap<String, Entry>,
}

/// A VTEP's address: the network address of its host's subnet.
fn vtep_ip(subnet: &Ipv4Net) -> Ipv4Addr {
    subnet.network()
}

impl Vxlan {
    /// Makes sure the device exists, is up and carries the VTEP address
    /// (added when not added yet, or re-added when `verify`); a recreated
    /// device starts empty, so every peer is programmed again.
    fn ensure_device(
        &mut self,
        nl: &mut dyn Kernel,
        net: &Network,
        me: &Local,
        verify: bool,
    ) -> Result<u32, BackendError> {
        let (link, created, _) = super::vxlan_link(nl, net, me, false, self.dev.is_some())?;
        let no_device = |source| BackendError::VxlanDevice {
            device: link.name.clone(),
            source,
        };
        if created {
            self.peers.clear();
            self.addr = None;
        } else if !link.up {
            nl.set_up(link.index).map_err(no_device)?;
        }
        let index = link.index;
        if self.dev != Some(index) {
            if self.dev.is_some() {
                // Deleted and made again since: it holds none of our entries.
                self.peers.clear();
            }
            self.addr = None;
        }
        self.dev = Some(index);
        let addr = Ipv4Net::new(vtep_ip(&me.subnet), 32).expect("valid");
        if verify || self.addr != Some(addr) {
            nl.add_address(index, addr).map_err(no_device)?;
            self.addr = Some(addr);
        }
        Ok(index)
    }

    /// Forgets entries the kernel no longer has, so they are put back.
    fn verify(&mut self, nl: &mut dyn Kernel, dev: u32) {
        let (Ok(neigh), Ok(fdb), Ok(routes)) = (
            nl.neighbours(dev),
            nl.fdb(dev),
            nl.routes_of(OVERLAY_ROUTE_PROTOCOL),
        ) else {
            warn!("cannot read the kernel's VXLAN entries");
            return;
        };
        let neigh: HashSet<(Ipv4Addr, [u8; 6])> = neigh.into_iter().collect();
        let fdb: HashSet<([u8; 6], Ipv4Addr)> = fdb.into_iter().collect();
        let routes: HashSet<(Ipv4Net, Option<Ipv4Addr>)> =
            routes.iter().map(|r| (r.dst, r.gateway)).collect();
        self.peers.retain(|host, e| {
            let ok = match e {
                Entry::Encap {
                    subnet,
                    vtep,
                    mac,
                    remote,
                } => {
                    neigh.contains(&(*vtep, *mac))
                        && fdb.contains(&(*mac, *remote))
                        && routes.contains(&(*subnet, Some(*vtep)))
                }
                Entry::Direct { subnet, via } => routes.contains(&(*subnet, Some(*via))),
            };
            if !ok {
                warn!(peer = %host, subnet = %e.subnet(), "an entry was removed behind weft's back; restoring it");
            }
            ok
        });
    }

    fn apply(&self, nl: &mut dyn Kernel, dev: u32, e: &Entry) -> Result<(), BackendError> {
        match *e {
            Entry::Encap {
                subnet,
                vtep,
                mac,
                remote,
            } => {
                nl.replace_neighbour(dev, vtep, mac)
                    .map_err(|source| BackendError::Neighbour {
                        ip: vtep,
                        mac,
                        source,
                    })?;
                nl.replace_fdb(dev, mac, remote)
                    .map_err(|source| BackendError::Fdb {
                        mac,
                        remote,
                        source,
                    })?;
                let r = Route {
                    dst: subnet,
                    gateway: Some(vtep),
                    oif: Some(dev),
                };
                nl.replace_route(&r, OVERLAY_ROUTE_PROTOCOL, true)
                    .map_err(|source| BackendError::Route {
                        subnet,
                        via: Some(vtep),
                        source,
                    })
            }
            Entry::Direct { subnet, via } => {
                let r = Route {
                    dst: subnet,
                    gateway: Some(via),
                    oif: None,
                };
                nl.replace_route(&r, OVERLAY_ROUTE_PROTOCOL, false)
                    .map_err(|source| BackendError::Route {
                        subnet,
                        via: Some(via),
                        source,
                    })
            }
        }
    }

    fn remove(&self, nl: &mut dyn Kernel, dev: Option<u32>, e: &Entry) {
        let _ = nl.delete_route(e.subnet(), OVERLAY_ROUTE_PROTOCOL);
        if let (
            Some(dev),
            Entry::Encap {
                vtep, mac, remote, ..
            },
        ) = (dev, e)
        {
            let _ = nl.delete_neighbour(dev, *vtep);
            let _ = nl.delete_fdb(dev, *mac, *remote);
        }
    }
}

impl Backend for Vxlan {
    fn program(
        &mut self,
        nl: &mut dyn Kernel,
        net: &Network,
        me: &Local,
        peers: &[Lease],
        verify: bool,
    ) -> Vec<PeerState> {
        let dev = match self.ensure_device(nl, net, me, verify) {
            Ok(d) => d,
            Err(e) => return all_failed(peers, &e),
        };
        if verify {
            self.verify(nl, dev);
        }
        let direct = net.overlay().is_some_and(|o| o.direct_routing);
        let connected = if direct {
            nl.connected_subnets().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut out = Vec::with_capacity(peers.len());
        let mut wanted = HashSet::new();
        for p in peers {
            let mut st = peer_state(p);
            let entry = if direct && on_link(&connected, p.public_ip) {
                Entry::Direct {
                    subnet: p.subnet,
                    via: p.public_ip,
                }
            } else {
                let Some(mac) = p.vtep_mac.as_deref().and_then(parse_mac) else {
                    st.problem = Some(BackendError::NoVtepMac.to_string());
                    out.push(st);
                    continue;
                };
                Entry::Encap {
                    subnet: p.subnet,
                    vtep: vtep_ip(&p.subnet),
                    mac,
                    remote: p.public_ip,
                }
            };
            wanted.insert(p.host_id.clone());
            if self.peers.get(&p.host_id) != Some(&entry) {
                if let Some(old) = self.peers.remove(&p.host_id) {
                    self.remove(nl, Some(dev), &old);
                }
                if let Err(e) = self.apply(nl, dev, &entry) {
                    st.problem = Some(e.to_string());
                    out.push(st);
                    continue;
                }
                info!(network = %net.name, peer = %p.node, subnet = %p.subnet, "peer programmed");
                self.peers.insert(p.host_id.clone(), entry.clone());
            }
            st.programmed = Some(entry.describe());
            out.push(st);
        }
        let gone: Vec<String> = self
            .peers
            .keys()
            .filter(|h| !wanted.contains(*h))
            .cloned()
            .collect();
        for h in gone {
            if let Some(e) = self.peers.remove(&h) {
                info!(network = %net.name, subnet = %e.subnet(), "entries of a departed peer removed");
                self.remove(nl, Some(dev), &e);
            }
        }
        out
    }

    fn teardown(&mut self, nl: &mut dyn Kernel) {
        let peers = std::mem::take(&mut self.peers);
        for e in peers.values() {
            self.remove(nl, self.dev, e);
        }
        self.addr = None;
        if let Some(dev) = self.dev.take() {
            super::delete_link_at(nl, dev);
        }
    }

    fn owned_routes(&self) -> Vec<Ipv4Net> {
        self.peers.values().map(Entry::subnet).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{local, overlay_network, peer, FakeKernel};
    use weft_model::network::DriverSettings;
    use weft_model::overlay::{vtep_mac, vxlan_device};
    use weft_model::BackendKind;

    fn setup() -> (FakeKernel, Vxlan, Network, Local) {
        (
            FakeKernel::with_underlay("198.51.100.0/24"),
            Vxlan::default(),
            overlay_network("ov", BackendKind::Vxlan),
            local("10.40.1.0/24"),
        )
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mac_of(host: &str) -> [u8; 6] {
        vtep_mac(host, 1)
    }

    /// Asserts the three entries of an encapsulated peer.
    fn assert_encap(k: &FakeKernel, dev: u32, host: &str, subnet: &str, remote: &str) {
        let net: Ipv4Net = subnet.parse().unwrap();
        let vtep = net.network();
        assert_eq!(
            k.neighbours.get(&(dev, vtep)),
            Some(&mac_of(host)),
            "neigh of {host}"
        );
        assert_eq!(
            k.fdb.get(&(dev, mac_of(host))),
            Some(&ip(remote)),
            "fdb of {host}"
        );
        let r = k.route(subnet).expect("route");
        assert_eq!(r.route.gateway, Some(vtep));
        assert_eq!(r.route.oif, Some(dev));
        assert!(r.onlink);
        assert_eq!(r.protocol, OVERLAY_ROUTE_PROTOCOL);
    }

    #[test]
    fn makes_the_device_and_the_three_entries_of_each_peer() {
        let (mut k, mut b, net, me) = setup();
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("c", "10.40.3.0/24", "198.51.100.13"),
        ];
        let st = b.program(&mut k, &net, &me, &peers, false);
        let name = vxlan_device(&net.id);
        let dev = k.index_of(&name).expect("the device");
        let spec = &k.vxlans[&name];
        assert_eq!(
            (spec.vni, spec.port, spec.dev, spec.mtu),
            (1, 8472, 2, 1450)
        );
        assert_eq!(spec.local, me.public_ip);
        assert_eq!(spec.mac, vtep_mac("a", 1), "derived from the host id");
        assert!(k
            .addresses
            .contains(&(dev, "10.40.1.0/32".parse().unwrap())));
        assert_encap(&k, dev, "b", "10.40.2.0/24", "198.51.100.12");
        assert_encap(&k, dev, "c", "10.40.3.0/24", "198.51.100.13");
        assert_eq!((k.neighbours.len(), k.fdb.len(), k.routes.len()), (2, 2, 2));
        assert!(st.iter().all(|s| s.problem.is_none()));
        assert!(st[0]
            .programmed
            .as_deref()
            .unwrap()
            .starts_with("route 10.40.2.0/24 via 10.40.2.0 onlink"));
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
    }

    #[test]
    fn replaces_what_changed_and_removes_peers_that_left() {
        let (mut k, mut b, net, me) = setup();
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("c", "10.40.3.0/24", "198.51.100.13"),
            peer("d", "10.40.4.0/24", "198.51.100.14"),
        ];
        b.program(&mut k, &net, &me, &peers, false);
        let dev = k.index_of(&vxlan_device(&net.id)).unwrap();
        // b has a new public address, c a new subnet, d left.
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.22"),
            peer("c", "10.40.7.0/24", "198.51.100.13"),
        ];
        b.program(&mut k, &net, &me, &peers, false);
        assert_encap(&k, dev, "b", "10.40.2.0/24", "198.51.100.22");
        assert_encap(&k, dev, "c", "10.40.7.0/24", "198.51.100.13");
        assert!(k.route("10.40.3.0/24").is_none(), "c's old route went");
        assert!(k.route("10.40.4.0/24").is_none(), "d's route went");
        assert!(!k.neighbours.contains_key(&(dev, ip("10.40.3.0"))));
        assert!(!k.neighbours.contains_key(&(dev, ip("10.40.4.0"))));
        assert!(!k.fdb.contains_key(&(dev, mac_of("d"))));
        assert_eq!((k.neighbours.len(), k.fdb.len(), k.routes.len()), (2, 2, 2));
        let mut owned = b.owned_routes();
        owned.sort();
        assert_eq!(
            owned,
            vec![
                "10.40.2.0/24".parse::<Ipv4Net>().unwrap(),
                "10.40.7.0/24".parse().unwrap()
            ]
        );
    }

    #[test]
    fn verify_heals_entries_deleted_by_hand() {
        let (mut k, mut b, net, me) = setup();
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("c", "10.40.3.0/24", "198.51.100.13"),
        ];
        b.program(&mut k, &net, &me, &peers, false);
        let dev = k.index_of(&vxlan_device(&net.id)).unwrap();
        k.fdb.remove(&(dev, mac_of("b")));
        k.neighbours.remove(&(dev, ip("10.40.3.0")));
        k.addresses.clear();
        b.program(&mut k, &net, &me, &peers, false);
        assert!(
            !k.fdb.contains_key(&(dev, mac_of("b"))),
            "without verify: memory is trusted"
        );
        b.program(&mut k, &net, &me, &peers, true);
        assert_encap(&k, dev, "b", "10.40.2.0/24", "198.51.100.12");
        assert_encap(&k, dev, "c", "10.40.3.0/24", "198.51.100.13");
        assert!(k
            .addresses
            .contains(&(dev, "10.40.1.0/32".parse().unwrap())));
        // A route deleted by hand.
        k.routes.clear();
        b.program(&mut k, &net, &me, &peers, true);
        assert_eq!(k.routes.len(), 2);
    }

    #[test]
    fn a_deleted_device_is_made_again_with_every_peer() {
        let (mut k, mut b, net, me) = setup();
        let peers = [peer("b", "10.40.2.0/24", "198.51.100.12")];
        b.program(&mut k, &net, &me, &peers, false);
        let name = vxlan_device(&net.id);
        let old = k.index_of(&name).unwrap();
        k.delete_link(&name).unwrap();
        assert!(k.routes.is_empty() && k.fdb.is_empty());
        // Noticed on the next call, verify or not.
        b.program(&mut k, &net, &me, &peers, false);
        let dev = k.index_of(&name).unwrap();
        assert_ne!(dev, old);
        assert_encap(&k, dev, "b", "10.40.2.0/24", "198.51.100.12");
        assert!(k
            .addresses
            .contains(&(dev, "10.40.1.0/32".parse().unwrap())));
        // A device that is down is brought up.
        k.links.get_mut(&name).unwrap().up = false;
        b.program(&mut k, &net, &me, &peers, false);
        assert!(k.links[&name].up);
    }

    #[test]
    fn problems_are_reported_per_peer() {
        let (mut k, mut b, net, me) = setup();
        let mut no_mac = peer("b", "10.40.2.0/24", "198.51.100.12");
        no_mac.vtep_mac = None;
        let st = b.program(&mut k, &net, &me, &[no_mac], false);
        assert!(st[0].problem.as_deref().unwrap().contains("no VTEP MAC"));
        assert!(k.routes.is_empty());

        let (mut k, mut b, net, me) = setup();
        k.failing.insert("add_vxlan");
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("c", "10.40.3.0/24", "198.51.100.13"),
        ];
        let st = b.program(&mut k, &net, &me, &peers, false);
        let name = vxlan_device(&net.id);
        for s in &st {
            let p = s.problem.as_deref().unwrap();
            assert!(p.starts_with(&format!("no VXLAN device {name}: ")), "{p}");
        }
        k.failing.clear();
        k.failing.insert("replace_fdb");
        let st = b.program(&mut k, &net, &me, &peers, false);
        assert!(st[0].problem.as_deref().unwrap().starts_with("fdb "));
        k.failing.clear();
        let st = b.program(&mut k, &net, &me, &peers, false);
        assert!(st.iter().all(|s| s.problem.is_none()), "retried: {st:?}");
        let dev = k.index_of(&name).unwrap();
        assert_encap(&k, dev, "b", "10.40.2.0/24", "198.51.100.12");
    }

    #[test]
    fn the_device_error_keeps_the_kernel_error_as_its_source() {
        let (mut k, mut b, net, me) = setup();
        k.failing.insert("add_vxlan");
        b.program(&mut k, &net, &me, &[], false);
        let e = b.ensure_device(&mut k, &net, &me, false).unwrap_err();
        let source = std::error::Error::source(&e).expect("a source");
        let kernel = source
            .downcast_ref::<weft_kernel::KernelError>()
            .expect("the kernel's error");
        assert_eq!(kernel.errno(), Some(libc::EPERM));
    }

    #[test]
    fn direct_routing_uses_plain_routes_to_peers_on_the_segment() {
        let (mut k, mut b, mut net, me) = setup();
        if let DriverSettings::Overlay(o) = &mut net.settings {
            o.overlay.direct_routing = true;
        }
        let peers = [
            peer("b", "10.40.2.0/24", "198.51.100.12"),
            peer("far", "10.40.3.0/24", "203.0.113.7"),
        ];
        b.program(&mut k, &net, &me, &peers, false);
        let dev = k.index_of(&vxlan_device(&net.id)).unwrap();
        let r = k.route("10.40.2.0/24").unwrap();
        assert_eq!(r.route.gateway, Some(ip("198.51.100.12")));
        assert_eq!(r.route.oif, None);
        assert!(!k.fdb.contains_key(&(dev, mac_of("b"))));
        assert_encap(&k, dev, "far", "10.40.3.0/24", "203.0.113.7");
    }

    #[test]
    fn teardown_removes_the_entries_and_the_device() {
        let (mut k, mut b, net, me) = setup();
        let peers = [peer("b", "10.40.2.0/24", "198.51.100.12")];
        b.program(&mut k, &net, &me, &peers, false);
        b.teardown(&mut k);
        assert!(k.index_of(&vxlan_device(&net.id)).is_none());
        assert!(k.routes.is_empty() && k.fdb.is_empty() && k.neighbours.is_empty());
        assert!(b.owned_routes().is_empty());
    }
}
