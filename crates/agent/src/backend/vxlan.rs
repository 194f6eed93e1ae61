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

use super::{all_failed, on_link, peer_state, Backend, Local, PeerState};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use tracing::{info, warn};
use weft_kernel::{Netlink, Route, VxlanSpec, OVERLAY_ROUTE_PROTOCOL};
use weft_model::overlay::{format_mac, parse_mac, vtep_mac, vxlan_device};
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
    /// host id -> entry, as programmed.
    peers: BTreeMap<String, Entry>,
}

/// A VTEP's address: the network address of its host's subnet.
fn vtep_ip(subnet: &Ipv4Net) -> Ipv4Addr {
    subnet.network()
}

impl Vxlan {
    /// Makes sure the device exists; a recreated device starts empty, so
    /// every peer is programmed again.
    fn ensure_device(
        &mut self,
        nl: &mut Netlink,
        net: &Network,
        me: &Local,
    ) -> Result<u32, String> {
        let Some(o) = net.overlay() else {
            return Err(format!("network {} is not an overlay network", net.name));
        };
        let name = vxlan_device(&net.id);
        let mtu = me.underlay_mtu.saturating_sub(o.backend.overhead());
        let existing = nl.link_by_name(&name).map_err(|e| e.to_string())?;
        let index = match existing {
            Some(l) => {
                if !l.up {
                    nl.set_up(l.index).map_err(|e| e.to_string())?;
                }
                l.index
            }
            None => {
                if self.dev.is_some() {
                    warn!(device = %name, "the VXLAN device vanished; recreating it");
                }
                self.peers.clear();
                nl.add_vxlan(&VxlanSpec {
                    name: name.clone(),
                    vni: o.vni,
                    local: me.public_ip,
                    dev: me.underlay,
                    port: o.port,
                    mac: vtep_mac(&me.host_id, o.vni),
                    mtu,
                })
                .map_err(|e| format!("cannot create {name}: {e}"))?;
                let l = nl
                    .link_by_name(&name)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{name} vanished"))?;
                info!(device = %name, vni = o.vni, port = o.port, mtu, "VXLAN device created");
                l.index
            }
        };
        nl.add_address(index, Ipv4Net::new(vtep_ip(&me.subnet), 32).expect("valid"))
            .map_err(|e| e.to_string())?;
        self.dev = Some(index);
        Ok(index)
    }

    /// Forgets entries the kernel no longer has, so they are put back.
    fn verify(&mut self, nl: &mut Netlink, dev: u32) {
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

    fn apply(&self, nl: &mut Netlink, dev: u32, e: &Entry) -> Result<(), String> {
        match *e {
            Entry::Encap {
                subnet,
                vtep,
                mac,
                remote,
            } => {
                nl.replace_neighbour(dev, vtep, mac)
                    .map_err(|e| e.to_string())?;
                nl.replace_fdb(dev, mac, remote)
                    .map_err(|e| e.to_string())?;
                let r = Route {
                    dst: subnet,
                    gateway: Some(vtep),
                    oif: Some(dev),
                };
                nl.replace_route(&r, OVERLAY_ROUTE_PROTOCOL, true)
                    .map_err(|e| e.to_string())
            }
            Entry::Direct { subnet, via } => {
                let r = Route {
                    dst: subnet,
                    gateway: Some(via),
                    oif: None,
                };
                nl.replace_route(&r, OVERLAY_ROUTE_PROTOCOL, false)
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn remove(&self, nl: &mut Netlink, dev: Option<u32>, e: &Entry) {
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
        nl: &mut Netlink,
        net: &Network,
        me: &Local,
        peers: &[Lease],
        verify: bool,
    ) -> Vec<PeerState> {
        let dev = match self.ensure_device(nl, net, me) {
            Ok(d) => d,
            Err(e) => return all_failed(peers, &format!("no VXLAN device: {e}")),
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
                    st.problem = Some(
                        "its lease has no VTEP MAC (is that host running the vxlan backend?)"
                            .into(),
                    );
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
                    st.problem = Some(e);
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

    fn teardown(&mut self, nl: &mut Netlink) {
        let peers = std::mem::take(&mut self.peers);
        for e in peers.values() {
            self.remove(nl, self.dev, e);
        }
        if let Some(dev) = self.dev.take() {
            // The device's name is derived from the network; find it by index.
            if let Ok(links) = nl.links() {
                if let Some(l) = links.into_iter().find(|l| l.index == dev) {
                    let _ = nl.delete_link(&l.name);
                }
            }
        }
    }

    fn owned_routes(&self) -> Vec<Ipv4Net> {
        self.peers.values().map(Entry::subnet).collect()
    }
}
