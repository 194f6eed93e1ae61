//! A small synchronous rtnetlink client. A `Netlink` talks to the namespace
//! it was opened in, for as long as it lives, whatever thread uses it later:
//! that is how weft configures a sandbox without moving any thread into it.

use crate::error::{KernelError, Result};
use ipnet::Ipv4Net;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoMacVlan, InfoVeth, InfoVlan, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage, MacVlanMode,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

/// Routing protocol number that marks routes weft installed, so that weft
/// can find and remove its own routes and never anyone else's.
pub const WEFT_ROUTE_PROTOCOL: u8 = 0x77;

pub(crate) const RT_TABLE_MAIN: u8 = 254;

/// A link as seen in a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub master: Option<u32>,
    pub up: bool,
}

/// A link's traffic counters (the kernel's 64-bit ones), as `ip -s link` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn nl_err(op: impl Into<String>, source: io::Error) -> KernelError {
    KernelError::Netlink {
        op: op.into(),
        source,
    }
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| nl_err("open socket", e))?;
        sock.bind_auto().map_err(|e| nl_err("bind socket", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| nl_err("connect socket", e))?;
        // Ask for extended acks off: plain errno is all we report.
        Ok(Netlink {
            sock,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Sends one request and collects the replies until the ack or the end of a dump.
    pub(crate) fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0).map_err(|e| nl_err(op, e))?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let n = {
                let mut slice = &mut self.buf[..];
                self.sock.recv(&mut slice, 0).map_err(|e| nl_err(op, e))?
            };
            let mut offset = 0;
            while offset < n {
                let bytes = &self.buf[offset..n];
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                        nl_err(
                            op,
                            io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                        )
                    })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(_) => Err(nl_err(op, e.to_io())),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    pub(crate) fn ack(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        self.request(op, msg, NLM_F_ACK | flags).map(|_| ())
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self.request(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(to_link(&l)),
                _ => None,
            })
            .collect())
    }

    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(&format!("get link {index}"), msg)
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(&format!("get link {name}"), msg)
    }

    /// One link asked for by `msg`; None when there is no such link.
    fn get_link(&mut self, op: &str, msg: LinkMessage) -> Result<Option<Link>> {
        match self.request(op, RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(r) => Ok(r.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(to_link(l)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A link's counters, or None when there is no link of that name.
    pub fn link_stats(&mut self, name: &str) -> Result<Option<LinkStats>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let replies = match self.request(
            &format!("get link {name}"),
            RouteNetlinkMessage::GetLink(msg),
            0,
        ) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(
                l.attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::Stats64(s) => Some(LinkStats {
                            rx_packets: s.rx_packets,
                            tx_packets: s.tx_packets,
                            rx_bytes: s.rx_bytes,
                            tx_bytes: s.tx_bytes,
                            rx_errors: s.rx_errors,
                            tx_errors: s.tx_errors,
                            rx_dropped: s.rx_dropped,
                            tx_dropped: s.tx_dropped,
                        }),
                        _ => None,
                    })
                    .unwrap_or_default(),
            ),
            _ => None,
        }))
    }

    /// Creates a bridge (up) unless a link of that name exists, and sets its
    /// MAC and MTU if given; returns its index and whether it was created.
    /// A bridge without a MAC of its own takes the lowest of its ports', and
    /// changes it when that port goes: every neighbour's entry for the
    /// gateway would then point at a removed sandbox.
    pub fn ensure_bridge(
        &mut self,
        name: &str,
        mac: [u8; 6],
        mtu: Option<u32>,
    ) -> Result<(u32, bool)> {
        if let Some(l) = self.link_by_name(name)? {
            self.set_mac_up(l.index, mac, mtu)?;
            return Ok((l.index, false));
        }
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        self.ack(
            &format!("create bridge {name}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        self.link_by_name(name)?
            .map(|l| (l.index, true))
            .ok_or_else(|| {
                nl_err(
                    format!("create bridge {name}"),
                    io::Error::from_raw_os_error(libc::ENODEV),
                )
            })
    }

    /// Creates a veth pair in one request: `host_name` here, enslaved to
    /// `master` and up if given; `peer_name` (down) inside the namespace
    /// `peer_netns`; both with `mtu` if given.
    pub fn add_veth(
        &mut self,
        host_name: &str,
        master: Option<u32>,
        peer_name: &str,
        peer_netns: RawFd,
        mtu: Option<u32>,
    ) -> Result<()> {
        // The peer is created down: the kernel refuses (ENOTCONN) a peer created
        // up in another namespace. It is brought up from inside.
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(peer_name.to_string()));
        peer.attributes.push(LinkAttribute::NetNsFd(peer_netns));
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::IfName(host_name.to_string()));
        if let Some(mtu) = mtu {
            peer.attributes.push(LinkAttribute::Mtu(mtu));
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(master) = master {
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
            msg.attributes.push(LinkAttribute::Controller(master));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.ack(
            &format!("create veth {host_name}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Creates a macvlan (bridge mode) on `parent`, named `name` inside the
    /// namespace `netns`, with `mac` and `mtu`; down.
    pub fn add_macvlan(
        &mut self,
        parent: u32,
        name: &str,
        netns: Option<RawFd>,
        mac: [u8; 6],
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Link(parent));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(fd) = netns {
            msg.attributes.push(LinkAttribute::NetNsFd(fd));
        }
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::MacVlan),
            LinkInfo::Data(InfoData::MacVlan(vec![InfoMacVlan::Mode(
                MacVlanMode::Bridge,
            )])),
        ]));
        self.ack(
            &format!("create macvlan {name}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Creates an 802.1q sub-interface `name` of `parent` for VLAN `id`, up.
    pub fn add_vlan(&mut self, parent: u32, name: &str, id: u16) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Link(parent));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(id)])),
        ]));
        self.ack(
            &format!("create VLAN {id} sub-interface {name}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Adds a host route (`dst`/32) out of `oif`, marked as weft's; one already there is fine.
    pub fn add_host_route(&mut self, dst: Ipv4Addr, oif: u32) -> Result<()> {
        match self.ack(
            &format!("add route to {dst}"),
            RouteNetlinkMessage::NewRoute(host_route(dst, oif)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    /// Deletes a host route added by `add_host_route`; absent is fine.
    pub fn delete_host_route(&mut self, dst: Ipv4Addr, oif: u32) -> Result<()> {
        match self.ack(
            &format!("delete route to {dst}"),
            RouteNetlinkMessage::DelRoute(host_route(dst, oif)),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// In one request: renames a link if asked (it must be down for that),
    /// enslaves it to `master` and brings it up.
    pub fn enslave_up(
        &mut self,
        index: u32,
        rename: Option<&str>,
        master: u32,
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(name) = rename {
            msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        }
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::Controller(master));
        self.ack(
            &format!("attach link {index} to bridge {master}"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// Sets a link's MAC address (and MTU, if given) and brings it up, in one request.
    pub fn set_mac_up(&mut self, index: u32, mac: [u8; 6], mtu: Option<u32>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.ack(
            &format!("set link {index} up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.ack(
            &format!("set link {index} up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// Deletes a link by name; returns false if there was none.
    pub fn delete_link(&mut self, name: &str) -> Result<bool> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.ack(
            &format!("delete link {name}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds an IPv4 address; an address already there is fine.
    pub fn add_address(&mut self, index: u32, net: Ipv4Net) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = net.prefix_len();
        msg.header.index = index;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(net.addr())));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(net.addr())));
        if net.prefix_len() < 31 {
            msg.attributes
                .push(AddressAttribute::Broadcast(net.broadcast()));
        }
        match self.ack(
            &format!("add address {net}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    /// Replaces (or adds) the default route: via `gateway` out of `oif`
    /// (`onlink`: the gateway is outside the interface's prefix).
    pub fn replace_default_route(
        &mut self,
        gateway: Ipv4Addr,
        oif: u32,
        onlink: bool,
    ) -> Result<()> {
        let mut msg = default_route(Some((gateway, oif)));
        if onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        self.ack(
            &format!("replace default route via {gateway}"),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes the default route; absent is fine.
    pub fn delete_default_route(&mut self) -> Result<()> {
        match self.ack(
            "delete default route",
            RouteNetlinkMessage::DelRoute(default_route(None)),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// Adds the default route via `gateway` out of `oif`, marked as weft's
    /// (`onlink`: the gateway is outside the interface's prefix).
    pub fn add_default_route(&mut self, gateway: Ipv4Addr, oif: u32, onlink: bool) -> Result<()> {
        let mut msg = default_route(Some((gateway, oif)));
        if onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        self.ack(
            &format!("add default route via {gateway}"),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Destinations of the IPv4 routes in every table, to keep new subnets clear of them.
    pub fn route_destinations(&mut self) -> Result<Vec<Ipv4Net>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.request(
            "list routes",
            RouteNetlinkMessage::GetRoute(msg),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in replies {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                // Every route claims its destination, unreachable and local ones too.
                if matches!(
                    r.header.kind,
                    RouteType::Broadcast | RouteType::Multicast | RouteType::Anycast
                ) {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                });
                let dst = dst.unwrap_or(Ipv4Addr::UNSPECIFIED);
                if let Ok(net) = Ipv4Net::new(dst, r.header.destination_prefix_length) {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }
}

/// A link-scope /32 route in the main table, marked as weft's.
fn host_route(dst: Ipv4Addr, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.table = RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Other(WEFT_ROUTE_PROTOCOL);
    msg.header.scope = RouteScope::Link;
    msg.header.kind = RouteType::Unicast;
    msg.header.destination_prefix_length = 32;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    msg.attributes.push(RouteAttribute::Oif(oif));
    msg
}

/// A main-table default route marked as weft's, via `gw` out of an interface if given.
/// The default route via `gateway` out of `oif`; `onlink` when the
/// gateway is outside the interface's prefix (a sandbox in a sub-range of
/// its network reaches the network's gateway on the link all the same).
fn default_route(via: Option<(Ipv4Addr, u32)>) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.table = RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Other(WEFT_ROUTE_PROTOCOL);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    if let Some((gw, oif)) = via {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}

fn to_link(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        master: None,
        up: l.header.flags.contains(LinkFlags::Up),
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Controller(m) => link.master = Some(*m),
            _ => {}
        }
    }
    link
}
