//! VXLAN devices, neighbour entries and FDB entries: what the vxlan backend
//! programs for each peer. Entries are permanent (never aged out or learnt)
//! and live on weft's own VXLAN device, which is how weft owns them.

use crate::error::Result;
use crate::netlink::Netlink;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::Ipv4Addr;

/// How a VXLAN device is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// This host's address on the underlay, the tunnel's source.
    pub local: Ipv4Addr,
    /// The underlay interface.
    pub dev: u32,
    pub port: u16,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Answer ARP requests sent into the device from its neighbour table
    /// (a shared-subnet network: the request never crosses the underlay).
    pub proxy: bool,
}

fn neigh(family: AddressFamily, ifindex: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.header.kind = RouteType::Unspec;
    m
}

pub(crate) fn mac_of(attrs: &[NeighbourAttribute]) -> Option<[u8; 6]> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
            Some([b[0], b[1], b[2], b[3], b[4], b[5]])
        }
        _ => None,
    })
}

pub(crate) fn dst_of(attrs: &[NeighbourAttribute]) -> Option<Ipv4Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // An FDB entry (family AF_BRIDGE) carries its remote as raw bytes:
        // netlink-packet-route decodes NDA_DST by the message's family.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
            Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        _ => None,
    })
}

impl Netlink {
    /// Creates the VXLAN device, up, with learning off (peers are
    /// programmed, never learnt from traffic).
    pub fn add_vxlan(&mut self, s: &VxlanSpec) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(s.name.clone()));
        msg.attributes.push(LinkAttribute::Address(s.mac.to_vec()));
        msg.attributes.push(LinkAttribute::Mtu(s.mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(s.vni),
                InfoVxlan::Local(s.local),
                InfoVxlan::Link(s.dev),
                InfoVxlan::Port(s.port),
                InfoVxlan::Learning(false),
                InfoVxlan::Proxy(s.proxy),
            ])),
        ]));
        self.ack(
            &format!("create vxlan {}", s.name),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Turns a bridge port's MAC learning on or off (`bridge link set dev
    /// X learning off`): a shared network's VXLAN port never learns, so a
    /// MAC that moved to another host is never sent to the old one.
    pub fn set_port_learning(&mut self, index: u32, learning: bool) -> Result<()> {
        use netlink_packet_route::link::{InfoBridgePort, InfoPortData, InfoPortKind};
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Learning(
                learning,
            )])),
        ]));
        // Port options are changed through RTM_NEWLINK on an existing link
        // (as `ip link set … type bridge_slave` does); SETLINK ignores them.
        self.ack(
            &format!("set learning of bridge port {index}"),
            RouteNetlinkMessage::NewLink(msg),
            0,
        )
    }

    /// The MTU of a link.
    pub fn link_mtu(&mut self, index: u32) -> Result<Option<u32>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        let replies = self.request("get link", RouteNetlinkMessage::GetLink(msg), 0)?;
        Ok(replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// A permanent neighbour entry: `ip` is at `mac` on `ifindex`.
    pub fn replace_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        let mut m = neigh(AddressFamily::Inet, ifindex);
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.ack(
            &format!("neighbour {ip}"),
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn delete_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<()> {
        let mut m = neigh(AddressFamily::Inet, ifindex);
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.ack(
            &format!("delete neighbour {ip}"),
            RouteNetlinkMessage::DelNeighbour(m),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Permanent IPv4 neighbour entries of `ifindex`.
    pub fn neighbours(&mut self, ifindex: u32) -> Result<Vec<(Ipv4Addr, [u8; 6])>> {
        let m = neigh(AddressFamily::Inet, 0);
        let replies = self.request(
            "list neighbours",
            RouteNetlinkMessage::GetNeighbour(m),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewNeighbour(n)
                    if n.header.ifindex == ifindex
                        && n.header.state == NeighbourState::Permanent =>
                {
                    Some((dst_of(&n.attributes)?, mac_of(&n.attributes)?))
                }
                _ => None,
            })
            .collect())
    }

    /// An FDB entry of a VXLAN device: frames to `mac` go to `dst`.
    pub fn replace_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
        let mut m = neigh(AddressFamily::Bridge, ifindex);
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        self.ack(
            &format!("fdb entry to {dst}"),
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn delete_fdb(&mut self, ifindex: u32, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
        let mut m = neigh(AddressFamily::Bridge, ifindex);
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        match self.ack(
            &format!("delete fdb entry to {dst}"),
            RouteNetlinkMessage::DelNeighbour(m),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// FDB entries of a VXLAN device that carry a destination: (MAC, remote).
    pub fn fdb(&mut self, ifindex: u32) -> Result<Vec<([u8; 6], Ipv4Addr)>> {
        let mut m = neigh(AddressFamily::Bridge, 0);
        m.header.state = NeighbourState::None;
        let replies = self.request("list fdb", RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP)?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == ifindex => {
                    Some((mac_of(&n.attributes)?, dst_of(&n.attributes)?))
                }
                _ => None,
            })
            .collect())
    }
}
