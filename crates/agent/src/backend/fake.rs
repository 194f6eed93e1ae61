//! A fake kernel for the backends' unit tests: links, addresses, routes,
//! neighbours and FDB entries kept in memory with the semantics of
//! [`weft_kernel::Netlink`], and a count of the changes made, so a test
//! sees both the resulting state and whether a call changed anything.

use super::kernel::{KResult, Kernel};
use super::Local;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use weft_kernel::{KernelError, Link, Route, VxlanSpec};
use weft_model::network::{DriverSettings, OverlaySettings};
use weft_model::overlay::{format_mac, vtep_mac};
use weft_model::{BackendKind, Lease, Network, Overlay};

/// An overlay network on 10.40.0.0/16 with /24 host subnets; its id (and
/// so its device names) derives from its name.
pub(crate) fn overlay_network(name: &str, backend: BackendKind) -> Network {
    let range: Ipv4Net = "10.40.0.0/16".parse().unwrap();
    let id = format!("{name:0>16}");
    Network {
        name: name.into(),
        settings: DriverSettings::Overlay(OverlaySettings {
            bridge: format!("wbr-{}", &id[..10]),
            overlay: Overlay {
                range,
                kind: Default::default(),
                host_subnet_len: 24,
                backend,
                vni: 1,
                port: 8472,
                direct_routing: false,
            },
        }),
        id,
        subnet: range,
        gateway: "10.40.0.1".parse().unwrap(),
        ip_range: None,
        mtu: None,
        internal: false,
        labels: Default::default(),
        options: Default::default(),
        subranges: Vec::new(),
    }
}

/// This host (host id "a", 198.51.100.11 on eth0) with `subnet` leased.
pub(crate) fn local(subnet: &str) -> Local {
    Local {
        host_id: "a".into(),
        public_ip: "198.51.100.11".parse().unwrap(),
        underlay: 2,
        underlay_mtu: 1500,
        subnet: subnet.parse().unwrap(),
        data_dir: std::env::temp_dir(),
    }
}

/// Another host's lease, with the VTEP MAC the vxlan backend publishes.
pub(crate) fn peer(host: &str, subnet: &str, public_ip: &str) -> Lease {
    Lease {
        signed: None,
        network: "ov".into(),
        subnet: subnet.parse().unwrap(),
        host_id: host.into(),
        node: format!("node-{host}"),
        public_ip: public_ip.parse().unwrap(),
        vtep_mac: Some(format_mac(&vtep_mac(host, 1))),
        public_key: None,
    }
}

/// A route as the fake keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FakeRoute {
    pub route: Route,
    pub protocol: u8,
    pub onlink: bool,
}

#[derive(Default)]
pub(crate) struct FakeKernel {
    pub links: BTreeMap<String, Link>,
    pub vxlans: BTreeMap<String, VxlanSpec>,
    pub addresses: BTreeSet<(u32, Ipv4Net)>,
    /// Main table, keyed by destination as the kernel's replace is.
    pub routes: BTreeMap<Ipv4Net, FakeRoute>,
    /// What `connected_subnets` answers.
    pub connected: Vec<Route>,
    pub neighbours: BTreeMap<(u32, Ipv4Addr), [u8; 6]>,
    pub fdb: BTreeMap<(u32, [u8; 6]), Ipv4Addr>,
    /// Bridge ports whose learning is off.
    pub learning_off: BTreeSet<u32>,
    /// Calls that changed (or tried to change) the kernel.
    pub writes: usize,
    /// Operations that fail (with EPERM) while named here.
    pub failing: BTreeSet<&'static str>,
    next_index: u32,
}

impl FakeKernel {
    /// Adds a link (a bridge the driver made), returning its index.
    pub fn add_link(&mut self, name: &str) -> u32 {
        self.next_index += 1;
        self.links.insert(
            name.into(),
            Link {
                index: self.next_index,
                name: name.into(),
                master: None,
                up: true,
            },
        );
        self.next_index
    }

    /// A kernel with one connected subnet on `underlay` (index 2).
    pub fn with_underlay(subnet: &str) -> FakeKernel {
        let mut k = FakeKernel {
            next_index: 10,
            ..Default::default()
        };
        k.links.insert(
            "eth0".into(),
            Link {
                index: 2,
                name: "eth0".into(),
                master: None,
                up: true,
            },
        );
        k.connected.push(Route {
            dst: subnet.parse().unwrap(),
            gateway: None,
            oif: Some(2),
        });
        k
    }

    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.links.get(name).map(|l| l.index)
    }

    pub fn route(&self, dst: &str) -> Option<FakeRoute> {
        self.routes.get(&dst.parse().unwrap()).copied()
    }

    fn check(&mut self, op: &'static str, write: bool) -> KResult<()> {
        if write {
            self.writes += 1;
        }
        if self.failing.contains(op) {
            return Err(KernelError::Netlink {
                op: op.to_string(),
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        Ok(())
    }
}

impl Kernel for FakeKernel {
    fn links(&mut self) -> KResult<Vec<Link>> {
        self.check("links", false)?;
        Ok(self.links.values().cloned().collect())
    }

    fn link_by_name(&mut self, name: &str) -> KResult<Option<Link>> {
        self.check("link_by_name", false)?;
        Ok(self.links.get(name).cloned())
    }

    fn set_up(&mut self, index: u32) -> KResult<()> {
        self.check("set_up", true)?;
        for l in self.links.values_mut().filter(|l| l.index == index) {
            l.up = true;
        }
        Ok(())
    }

    fn delete_link(&mut self, name: &str) -> KResult<bool> {
        self.check("delete_link", true)?;
        let Some(l) = self.links.remove(name) else {
            return Ok(false);
        };
        // As the kernel does: whatever hung off the device goes with it.
        self.vxlans.remove(name);
        self.addresses.retain(|(i, _)| *i != l.index);
        self.routes.retain(|_, r| r.route.oif != Some(l.index));
        self.neighbours.retain(|(i, _), _| *i != l.index);
        self.fdb.retain(|(i, _), _| *i != l.index);
        Ok(true)
    }

    fn add_address(&mut self, index: u32, net: Ipv4Net) -> KResult<()> {
        self.check("add_address", true)?;
        self.addresses.insert((index, net));
        Ok(())
    }

    fn add_vxlan(&mut self, spec: &VxlanSpec) -> KResult<()> {
        self.check("add_vxlan", true)?;
        if self.links.contains_key(&spec.name) {
            return Err(KernelError::Netlink {
                op: format!("add vxlan {}", spec.name),
                source: std::io::Error::from_raw_os_error(libc::EEXIST),
            });
        }
        self.next_index += 1;
        self.links.insert(
            spec.name.clone(),
            Link {
                index: self.next_index,
                name: spec.name.clone(),
                master: None,
                up: true,
            },
        );
        self.vxlans.insert(spec.name.clone(), spec.clone());
        Ok(())
    }

    fn enslave(&mut self, index: u32, master: u32, _mtu: Option<u32>) -> KResult<()> {
        self.check("enslave", true)?;
        for l in self.links.values_mut().filter(|l| l.index == index) {
            l.master = Some(master);
            l.up = true;
        }
        Ok(())
    }

    fn set_port_learning(&mut self, index: u32, learning: bool) -> KResult<()> {
        self.check("set_port_learning", true)?;
        if learning {
            self.learning_off.remove(&index);
        } else {
            self.learning_off.insert(index);
        }
        Ok(())
    }

    fn routes_of(&mut self, protocol: u8) -> KResult<Vec<Route>> {
        self.check("routes_of", false)?;
        Ok(self
            .routes
            .values()
            .filter(|r| r.protocol == protocol)
            .map(|r| r.route)
            .collect())
    }

    fn connected_subnets(&mut self) -> KResult<Vec<Route>> {
        self.check("connected_subnets", false)?;
        Ok(self.connected.clone())
    }

    fn replace_route(&mut self, r: &Route, protocol: u8, onlink: bool) -> KResult<()> {
        self.check("replace_route", true)?;
        self.routes.insert(
            r.dst,
            FakeRoute {
                route: *r,
                protocol,
                onlink,
            },
        );
        Ok(())
    }

    fn delete_route(&mut self, dst: Ipv4Net, protocol: u8) -> KResult<()> {
        self.check("delete_route", true)?;
        if self
            .routes
            .get(&dst)
            .is_some_and(|r| r.protocol == protocol)
        {
            self.routes.remove(&dst);
        }
        Ok(())
    }

    fn neighbours(&mut self, ifindex: u32) -> KResult<Vec<(Ipv4Addr, [u8; 6])>> {
        self.check("neighbours", false)?;
        Ok(self
            .neighbours
            .iter()
            .filter(|((i, _), _)| *i == ifindex)
            .map(|((_, ip), mac)| (*ip, *mac))
            .collect())
    }

    fn replace_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> KResult<()> {
        self.check("replace_neighbour", true)?;
        self.neighbours.insert((ifindex, ip), mac);
        Ok(())
    }

    fn delete_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> KResult<()> {
        self.check("delete_neighbour", true)?;
        self.neighbours.remove(&(ifindex, ip));
        Ok(())
    }

    fn fdb(&mut self, ifindex: u32) -> KResult<Vec<([u8; 6], Ipv4Addr)>> {
        self.check("fdb", false)?;
        Ok(self
            .fdb
            .iter()
            .filter(|((i, _), _)| *i == ifindex)
            .map(|((_, mac), dst)| (*mac, *dst))
            .collect())
    }

    fn replace_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> KResult<()> {
        self.check("replace_fdb", true)?;
        self.fdb.insert((ifindex, mac), dst);
        Ok(())
    }

    fn delete_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> KResult<()> {
        self.check("delete_fdb", true)?;
        if self.fdb.get(&(ifindex, mac)) == Some(&dst) {
            self.fdb.remove(&(ifindex, mac));
        }
        Ok(())
    }
}
