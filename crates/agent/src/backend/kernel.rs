//! The netlink calls the backends make, behind a narrow trait: implemented
//! by [`weft_kernel::Netlink`] for real, and in unit tests by a fake that
//! keeps the kernel's state in memory (`fake.rs`), so each backend's diff
//! against the wanted peers can be tested without root.

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use weft_kernel::{KernelError, Link, Netlink, Route, VxlanSpec};

pub(crate) type KResult<T> = std::result::Result<T, KernelError>;

/// What a backend asks of the kernel. The semantics are those of
/// [`Netlink`]: `replace_*` create or replace, `delete_*` of something
/// absent succeed, `add_address` of an address already there succeeds.
pub(crate) trait Kernel: Send {
    fn links(&mut self) -> KResult<Vec<Link>>;
    fn link_by_name(&mut self, name: &str) -> KResult<Option<Link>>;
    fn set_up(&mut self, index: u32) -> KResult<()>;
    /// Returns false if there was no such link.
    fn delete_link(&mut self, name: &str) -> KResult<bool>;
    fn add_address(&mut self, index: u32, net: Ipv4Net) -> KResult<()>;
    fn add_vxlan(&mut self, spec: &VxlanSpec) -> KResult<()>;
    /// Puts a link on the bridge `master`, up, with `mtu` if given.
    fn enslave(&mut self, index: u32, master: u32, mtu: Option<u32>) -> KResult<()>;
    /// A bridge port's MAC learning on or off.
    fn set_port_learning(&mut self, index: u32, learning: bool) -> KResult<()>;

    /// Main-table routes marked with `protocol`.
    fn routes_of(&mut self, protocol: u8) -> KResult<Vec<Route>>;
    /// Connected subnets (scope link, no gateway) of this namespace.
    fn connected_subnets(&mut self) -> KResult<Vec<Route>>;
    fn replace_route(&mut self, r: &Route, protocol: u8, onlink: bool) -> KResult<()>;
    fn delete_route(&mut self, dst: Ipv4Net, protocol: u8) -> KResult<()>;

    /// Permanent IPv4 neighbours of `ifindex`.
    fn neighbours(&mut self, ifindex: u32) -> KResult<Vec<(Ipv4Addr, [u8; 6])>>;
    fn replace_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> KResult<()>;
    fn delete_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> KResult<()>;

    /// FDB entries of a VXLAN device: (MAC, remote).
    fn fdb(&mut self, ifindex: u32) -> KResult<Vec<([u8; 6], Ipv4Addr)>>;
    fn replace_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> KResult<()>;
    fn delete_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> KResult<()>;
}

impl Kernel for Netlink {
    fn links(&mut self) -> KResult<Vec<Link>> {
        Netlink::links(self)
    }
    fn link_by_name(&mut self, name: &str) -> KResult<Option<Link>> {
        Netlink::link_by_name(self, name)
    }
    fn set_up(&mut self, index: u32) -> KResult<()> {
        Netlink::set_up(self, index)
    }
    fn delete_link(&mut self, name: &str) -> KResult<bool> {
        Netlink::delete_link(self, name)
    }
    fn add_address(&mut self, index: u32, net: Ipv4Net) -> KResult<()> {
        Netlink::add_address(self, index, net)
    }
    fn add_vxlan(&mut self, spec: &VxlanSpec) -> KResult<()> {
        Netlink::add_vxlan(self, spec)
    }
    fn enslave(&mut self, index: u32, master: u32, mtu: Option<u32>) -> KResult<()> {
        Netlink::enslave_up(self, index, None, master, mtu)
    }
    fn set_port_learning(&mut self, index: u32, learning: bool) -> KResult<()> {
        Netlink::set_port_learning(self, index, learning)
    }
    fn routes_of(&mut self, protocol: u8) -> KResult<Vec<Route>> {
        Netlink::routes_of(self, protocol)
    }
    fn connected_subnets(&mut self) -> KResult<Vec<Route>> {
        Netlink::connected_subnets(self)
    }
    fn replace_route(&mut self, r: &Route, protocol: u8, onlink: bool) -> KResult<()> {
        Netlink::replace_route(self, r, protocol, onlink)
    }
    fn delete_route(&mut self, dst: Ipv4Net, protocol: u8) -> KResult<()> {
        Netlink::delete_route(self, dst, protocol)
    }
    fn neighbours(&mut self, ifindex: u32) -> KResult<Vec<(Ipv4Addr, [u8; 6])>> {
        Netlink::neighbours(self, ifindex)
    }
    fn replace_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> KResult<()> {
        Netlink::replace_neighbour(self, ifindex, ip, mac)
    }
    fn delete_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> KResult<()> {
        Netlink::delete_neighbour(self, ifindex, ip)
    }
    fn fdb(&mut self, ifindex: u32) -> KResult<Vec<([u8; 6], Ipv4Addr)>> {
        Netlink::fdb(self, ifindex)
    }
    fn replace_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> KResult<()> {
        Netlink::replace_fdb(self, ifindex, mac, dst)
    }
    fn delete_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> KResult<()> {
        Netlink::delete_fdb(self, ifindex, mac, dst)
    }
}
