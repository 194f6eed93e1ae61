//! lan: the datapath of a network whose one subnet is shared by all hosts
//! (Docker's overlay, weave): every host's bridge is one segment of a
//! single LAN, joined by kernel VXLAN.
//!
//! One VXLAN device per network (`wvx-<id>`, the network's VNI and port,
//! MTU underlay - 50) is a port of the network's bridge, with learning off
//! on both sides: the device learns no remote (`nolearning`) and the
//! bridge learns no MAC on that port. For every sandbox on another host
//! two permanent entries on the device, programmed from the cluster's
//! endpoint records and nothing else:
//! - a neighbour entry IP -> MAC, from which the device answers ARP
//!   requests itself (`proxy`), so no ARP broadcast crosses the underlay;
//! - an FDB entry MAC -> that host's public address, where its frames go.
//!
//! Frames with no FDB entry (broadcasts, multicast, unknown unicast) are
//! dropped by the device: the underlay carries only unicast to a known
//! sandbox. Because nothing is learnt, an address that moves to another
//! host (a sandbox removed on h1, one with the same --ip started on h2)
//! is sent to the new host as soon as its record is: nothing stale
//! survives the records, and `verify` re-reads the kernel.

use super::{BackendError, Kernel, Local, PeerState};
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use tracing::{info, warn};
use weft_model::blocks::EndpointRecord;
use weft_model::overlay::{parse_mac, vxlan_device};
use weft_model::Network;

/// Where one remote sandbox's frames go: its MAC and its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    mac: [u8; 6],
    remote: Ipv4Addr,
}

/// The device's permanent neighbours and unicast FDB entries, as read.
type KernelEntries = (HashSet<(Ipv4Addr, [u8; 6])>, HashSet<([u8; 6], Ipv4Addr)>);

#[derive(Default)]
pub(crate) struct SharedLan {
    dev: Option<u32>,
    /// Remote sandbox address -> entry, as programmed.
    entries: BTreeMap<Ipv4Addr, Entry>,
}

impl SharedLan {
    /// The device exists, is up, is a port of the network's bridge and
    /// learns nothing; a recreated device starts empty.
    fn ensure_device(
        &mut self,
        nl: &mut dyn Kernel,
        net: &Network,
        me: &Local,
        verify: bool,
    ) -> Result<u32, BackendError> {
        let bridge_name = net.bridge().unwrap_or_default().to_string();
        let no_device = |source| BackendError::VxlanDevice {
            device: vxlan_device(&net.id),
            source,
        };
        let bridge = nl
            .link_by_name(&bridge_name)
            .map_err(no_device)?
            .ok_or_else(|| BackendError::NoBridge {
                bridge: bridge_name.clone(),
            })?;
        let (link, _, mtu) = super::vxlan_link(nl, net, me, true, self.dev.is_some())?;
        if self.dev != Some(link.index) {
            // New, or deleted and made again: it holds none of our entries.
            self.entries.clear();
        }
        if link.master != Some(bridge.index) || !link.up {
            nl.enslave(link.index, bridge.index, Some(mtu))
                .map_err(no_device)?;
            nl.set_port_learning(link.index, false).map_err(no_device)?;
        } else if verify || self.dev != Some(link.index) {
            nl.set_port_learning(link.index, false).map_err(no_device)?;
        }
        self.dev = Some(link.index);
        Ok(link.index)
    }

    /// Forgets entries the kernel no longer has (or has otherwise), so the
    /// next pass puts them back; returns what the kernel has, for
    /// [`Self::sweep`].
    fn verify(&mut self, nl: &mut dyn Kernel, dev: u32) -> Option<KernelEntries> {
        let (Ok(neigh), Ok(fdb)) = (nl.neighbours(dev), nl.fdb(dev)) else {
            warn!("cannot read the kernel's VXLAN entries");
            return None;
        };
        let neigh: HashSet<(Ipv4Addr, [u8; 6])> = neigh.into_iter().collect();
        let fdb: HashSet<([u8; 6], Ipv4Addr)> = fdb.into_iter().collect();
        self.entries.retain(|ip, e| {
            let ok = neigh.contains(&(*ip, e.mac)) && fdb.contains(&(e.mac, e.remote));
            if !ok {
                warn!(address = %ip, "an entry of a remote sandbox was changed behind weft's back; restoring it");
            }
            ok
        });
        Some((neigh, fdb))
    }

    /// Deletes what the device holds that no remote sandbox wants: the
    /// device is weft's alone, so a permanent neighbour or a unicast FDB
    /// entry of no programmed entry is left over (half of a pair whose
    /// other half failed, or one forgotten by `verify`) and would send a
    /// removed sandbox's address on to its old host for ever.
    fn sweep(&self, nl: &mut dyn Kernel, dev: u32, (neigh, fdb): &KernelEntries) {
        let macs: HashSet<[u8; 6]> = self.entries.values().map(|e| e.mac).collect();
        for (ip, _) in neigh {
            if !self.entries.contains_key(ip) {
                info!(address = %ip, "a neighbour entry of no remote sandbox; removed");
                let _ = nl.delete_neighbour(dev, *ip);
            }
        }
        for (mac, remote) in fdb {
            if !macs.contains(mac) {
                info!(remote = %remote, "an FDB entry of no remote sandbox; removed");
                let _ = nl.delete_fdb(dev, *mac, *remote);
            }
        }
    }

    fn remove(nl: &mut dyn Kernel, dev: u32, ip: Ipv4Addr, e: &Entry) {
        let _ = nl.delete_neighbour(dev, ip);
        let _ = nl.delete_fdb(dev, e.mac, e.remote);
    }

    /// Makes the device hold exactly the entries of `endpoints` (the
    /// records of sandboxes on other hosts) and reports each host.
    pub fn program(
        &mut self,
        nl: &mut dyn Kernel,
        net: &Network,
        me: &Local,
        endpoints: &[EndpointRecord],
        verify: bool,
    ) -> Vec<PeerState> {
        // One report per remote host, with how many of its sandboxes are programmed.
        let mut hosts: BTreeMap<&str, (PeerState, usize, Vec<String>)> = BTreeMap::new();
        for r in endpoints {
            hosts.entry(&r.host_id).or_insert_with(|| {
                (
                    PeerState {
                        node: r.node.clone(),
                        subnet: net.range(),
                        public_ip: r.public_ip,
                        programmed: None,
                        problem: None,
                        key_change: None,
                    },
                    0,
                    Vec::new(),
                )
            });
        }
        let dev = match self.ensure_device(nl, net, me, verify) {
            Ok(d) => d,
            Err(e) => {
                let problem = e.to_string();
                return hosts
                    .into_values()
                    .map(|(mut p, _, _)| {
                        p.problem = Some(problem.clone());
                        p
                    })
                    .collect();
            }
        };
        let read = if verify { self.verify(nl, dev) } else { None };
        let mut wanted = HashSet::with_capacity(endpoints.len());
        for r in endpoints {
            let slot = hosts.get_mut(r.host_id.as_str()).expect("made above");
            let Some(mac) = parse_mac(&r.mac) else {
                slot.2
                    .push(format!("{}: MAC {:?} is not valid", r.ip, r.mac));
                continue;
            };
            let entry = Entry {
                mac,
                remote: r.public_ip,
            };
            wanted.insert(r.ip);
            if self.entries.get(&r.ip) != Some(&entry) {
                if let Some(old) = self.entries.remove(&r.ip) {
                    Self::remove(nl, dev, r.ip, &old);
                }
                let done = nl
                    .replace_neighbour(dev, r.ip, mac)
                    .map_err(|source| BackendError::Neighbour {
                        ip: r.ip,
                        mac,
                        source,
                    })
                    .and_then(|()| {
                        nl.replace_fdb(dev, mac, r.public_ip)
                            .map_err(|source| BackendError::Fdb {
                                mac,
                                remote: r.public_ip,
                                source,
                            })
                    });
                if let Err(e) = done {
                    slot.2.push(e.to_string());
                    continue;
                }
                self.entries.insert(r.ip, entry);
            }
            slot.1 += 1;
        }
        let gone: Vec<Ipv4Addr> = self
            .entries
            .keys()
            .filter(|ip| !wanted.contains(*ip))
            .copied()
            .collect();
        for ip in gone {
            if let Some(e) = self.entries.remove(&ip) {
                info!(network = %net.name, address = %ip, "a remote sandbox left; its entries removed");
                Self::remove(nl, dev, ip, &e);
            }
        }
        if let Some(read) = &read {
            self.sweep(nl, dev, read);
        }
        hosts
            .into_values()
            .map(|(mut p, n, problems)| {
                p.programmed = Some(format!(
                    "{n} sandbox{}: neigh IP lladdr MAC + fdb MAC dst {} on {}",
                    if n == 1 { "" } else { "es" },
                    p.public_ip,
                    vxlan_device(&net.id)
                ));
                if !problems.is_empty() {
                    p.problem = Some(problems.join("; "));
                }
                p
            })
            .collect()
    }

    /// Removes the device and everything programmed on it.
    pub fn teardown(&mut self, nl: &mut dyn Kernel) {
        let entries = std::mem::take(&mut self.entries);
        if let Some(dev) = self.dev.take() {
            for (ip, e) in &entries {
                Self::remove(nl, dev, *ip, e);
            }
            super::delete_link_at(nl, dev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{local, FakeKernel};
    use weft_model::network::DriverSettings;
    use weft_model::overlay::{format_mac, OverlayKind};
    use weft_model::BackendKind;

    fn setup() -> (FakeKernel, SharedLan, Network, Local, u32) {
        let mut net = crate::backend::fake::overlay_network("ov", BackendKind::Vxlan);
        if let DriverSettings::Overlay(o) = &mut net.settings {
            o.overlay.kind = OverlayKind::Shared;
        }
        let mut k = FakeKernel::with_underlay("198.51.100.0/24");
        let br = k.add_link(net.bridge().unwrap());
        (k, SharedLan::default(), net, local("10.40.0.0/16"), br)
    }

    fn rec(ip: &str, host: &str, public: &str) -> EndpointRecord {
        let ip: Ipv4Addr = ip.parse().unwrap();
        EndpointRecord {
            ip,
            mac: format_mac(&weft_model::sandbox::mac_for(ip)),
            host_id: host.into(),
            node: format!("node-{host}"),
            public_ip: public.parse().unwrap(),
            sandbox: Some(format!("s-{ip}")),
            names: vec![],
            exposed: false,
            signed: None,
        }
    }

    fn mac(ip: &str) -> [u8; 6] {
        weft_model::sandbox::mac_for(ip.parse().unwrap())
    }

    #[test]
    fn a_port_of_the_bridge_with_a_neighbour_and_an_fdb_entry_per_remote_sandbox() {
        let (mut k, mut b, net, me, br) = setup();
        let eps = [
            rec("10.40.0.20", "b", "198.51.100.12"),
            rec("10.40.0.21", "b", "198.51.100.12"),
            rec("10.40.0.40", "c", "198.51.100.13"),
        ];
        let st = b.program(&mut k, &net, &me, &eps, false);
        let name = vxlan_device(&net.id);
        let dev = k.index_of(&name).unwrap();
        let spec = &k.vxlans[&name];
        assert!(spec.proxy, "ARP is answered from the neighbour table");
        assert_eq!((spec.vni, spec.mtu), (1, 1450));
        assert_eq!(k.links[&name].master, Some(br));
        assert!(k.learning_off.contains(&dev));
        assert!(
            k.addresses.is_empty() && k.routes.is_empty(),
            "no VTEP address, no route"
        );
        assert_eq!(
            k.neighbours[&(dev, "10.40.0.40".parse().unwrap())],
            mac("10.40.0.40")
        );
        assert_eq!(
            k.fdb[&(dev, mac("10.40.0.21"))],
            "198.51.100.12".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!((k.neighbours.len(), k.fdb.len()), (3, 3));
        assert_eq!(st.len(), 2, "one report per host");
        assert!(st[0]
            .programmed
            .as_deref()
            .unwrap()
            .starts_with("2 sandboxes"));
        let writes = k.writes;
        b.program(&mut k, &net, &me, &eps, false);
        assert_eq!(k.writes, writes, "a second pass changes nothing");
    }

    #[test]
    fn an_address_that_moves_to_another_host_follows_its_record() {
        let (mut k, mut b, net, me, _) = setup();
        b.program(
            &mut k,
            &net,
            &me,
            &[rec("10.40.0.20", "b", "198.51.100.12")],
            false,
        );
        let dev = k.index_of(&vxlan_device(&net.id)).unwrap();
        // Removed on b, started with the same --ip (so the same MAC) on c.
        b.program(
            &mut k,
            &net,
            &me,
            &[rec("10.40.0.20", "c", "198.51.100.13")],
            false,
        );
        assert_eq!(k.fdb.len(), 1);
        assert_eq!(
            k.fdb[&(dev, mac("10.40.0.20"))],
            "198.51.100.13".parse::<Ipv4Addr>().unwrap()
        );
        b.program(&mut k, &net, &me, &[], false);
        assert!(k.fdb.is_empty() && k.neighbours.is_empty());
    }

    #[test]
    fn verify_heals_entries_and_the_port_changed_by_hand() {
        let (mut k, mut b, net, me, br) = setup();
        let eps = [rec("10.40.0.20", "b", "198.51.100.12")];
        b.program(&mut k, &net, &me, &eps, false);
        let name = vxlan_device(&net.id);
        let dev = k.index_of(&name).unwrap();
        k.fdb.clear();
        k.links.get_mut(&name).unwrap().master = None;
        k.learning_off.clear();
        b.program(&mut k, &net, &me, &eps, true);
        assert_eq!(k.fdb.len(), 1);
        assert_eq!(k.links[&name].master, Some(br));
        assert!(k.learning_off.contains(&dev));
        // A deleted device is made again with every entry.
        k.delete_link(&name).unwrap();
        b.program(&mut k, &net, &me, &eps, false);
        let dev = k.index_of(&name).unwrap();
        assert_eq!(k.neighbours.len(), 1);
        assert!(k
            .neighbours
            .contains_key(&(dev, "10.40.0.20".parse().unwrap())));
        b.teardown(&mut k);
        assert!(k.index_of(&name).is_none() && k.fdb.is_empty());
    }

    #[test]
    fn verify_removes_entries_of_no_remote_sandbox() {
        let (mut k, mut b, net, me, _) = setup();
        let eps = [rec("10.40.0.20", "b", "198.51.100.12")];
        b.program(&mut k, &net, &me, &eps, false);
        let dev = k.index_of(&vxlan_device(&net.id)).unwrap();
        // Left over: a neighbour whose FDB half is gone (forgotten by a
        // verify pass, or its FDB write failed) and a lone FDB entry.
        k.neighbours
            .insert((dev, "10.40.0.59".parse().unwrap()), mac("10.40.0.59"));
        k.fdb
            .insert((dev, mac("10.40.0.77")), "198.51.100.13".parse().unwrap());
        b.program(&mut k, &net, &me, &eps, false);
        assert_eq!(
            (k.neighbours.len(), k.fdb.len()),
            (2, 2),
            "not without verify"
        );
        b.program(&mut k, &net, &me, &eps, true);
        assert_eq!((k.neighbours.len(), k.fdb.len()), (1, 1));
        assert!(k
            .neighbours
            .contains_key(&(dev, "10.40.0.20".parse().unwrap())));
        assert!(k.fdb.contains_key(&(dev, mac("10.40.0.20"))));
    }

    #[test]
    fn no_bridge_is_a_problem_of_every_host() {
        let (mut k, mut b, net, me, _) = setup();
        k.delete_link(net.bridge().unwrap()).unwrap();
        let st = b.program(
            &mut k,
            &net,
            &me,
            &[rec("10.40.0.20", "b", "198.51.100.12")],
            false,
        );
        assert!(
            st[0].problem.as_deref().unwrap().contains("no bridge"),
            "{st:?}"
        );
        assert!(k.vxlans.is_empty());
    }
}
