//! Reads of what the kernel would do with one packet: the route it takes
//! (`ip route get`), the neighbour entry of its next hop (`ip neigh`), and
//! the bridge port a frame to a MAC leaves by (`bridge fdb`). `weft
//! explain` walks a packet's path with these; nothing here changes state.

use crate::error::Result;
use crate::netlink::Netlink;
use crate::vxlan::{dst_of, mac_of};
use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::Ipv4Addr;

/// The kernel's answer to `ip route get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteHit {
    /// Out of `oif`, to `gateway` when there is one (else to the address itself).
    Unicast {
        oif: u32,
        gateway: Option<Ipv4Addr>,
        prefsrc: Option<Ipv4Addr>,
    },
    /// An address of this namespace: delivered here.
    Local,
    /// No route, or a route that refuses (unreachable, prohibit, blackhole).
    Unreachable(String),
}

/// A neighbour entry as `ip neigh` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: [u8; 6],
    /// e.g. "PERMANENT", "REACHABLE", "STALE".
    pub state: String,
}

impl Netlink {
    /// The route a packet to `dst` takes; with `from` (source address and
    /// input interface), the route of a packet being forwarded.
    pub fn route_get(&mut self, dst: Ipv4Addr, from: Option<(Ipv4Addr, u32)>) -> Result<RouteHit> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 32;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        if let Some((src, iif)) = from {
            msg.header.source_prefix_length = 32;
            msg.attributes
                .push(RouteAttribute::Source(RouteAddress::Inet(src)));
            msg.attributes.push(RouteAttribute::Iif(iif));
        }
        let replies = match self.request(
            &format!("route get {dst}"),
            RouteNetlinkMessage::GetRoute(msg),
            0,
        ) {
            Ok(r) => r,
            Err(e) => {
                return match e.errno() {
                    Some(libc::ENETUNREACH) => Ok(RouteHit::Unreachable("no route".into())),
                    Some(libc::EHOSTUNREACH) => {
                        Ok(RouteHit::Unreachable("host unreachable".into()))
                    }
                    Some(libc::EACCES) => Ok(RouteHit::Unreachable("prohibited".into())),
                    Some(libc::EINVAL) if from.is_some() => Ok(RouteHit::Unreachable(
                        "refused for forwarding (reverse path or martian source)".into(),
                    )),
                    _ => Err(e),
                }
            }
        };
        let Some(m) = replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewRoute(m) => Some(m),
            _ => None,
        }) else {
            return Ok(RouteHit::Unreachable("no answer".into()));
        };
        let attr_ip = |want: fn(&RouteAttribute) -> Option<&RouteAddress>| {
            m.attributes.iter().find_map(|a| match want(a) {
                Some(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })
        };
        Ok(match m.header.kind {
            RouteType::Local => RouteHit::Local,
            RouteType::Unicast => RouteHit::Unicast {
                oif: m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    })
                    .unwrap_or(0),
                gateway: attr_ip(|a| match a {
                    RouteAttribute::Gateway(g) => Some(g),
                    _ => None,
                }),
                prefsrc: attr_ip(|a| match a {
                    RouteAttribute::PrefSource(s) => Some(s),
                    _ => None,
                }),
            },
            other => RouteHit::Unreachable(format!("{other:?}").to_lowercase()),
        })
    }

    /// The neighbour entry (any state) of `ip` on `ifindex`.
    pub fn neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<Neighbour>> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        let replies = self.request(
            "list neighbours",
            RouteNetlinkMessage::GetNeighbour(m),
            NLM_F_DUMP,
        )?;
        Ok(replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewNeighbour(n)
                if n.header.ifindex == ifindex && dst_of(&n.attributes) == Some(ip) =>
            {
                let state = match n.header.state {
                    NeighbourState::Other(v) => format!("state {v}"),
                    s => format!("{s:?}").to_uppercase(),
                };
                Some(Neighbour {
                    mac: mac_of(&n.attributes).unwrap_or_default(),
                    state,
                })
            }
            _ => None,
        }))
    }

    /// The port of bridge `bridge` that frames to `mac` leave by, from its
    /// forwarding database; None when the bridge has not learnt the MAC
    /// (it floods such frames to every port).
    pub fn bridge_port_for(&mut self, bridge: u32, mac: [u8; 6]) -> Result<Option<u32>> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        let replies = self.request("list fdb", RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP)?;
        Ok(replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewNeighbour(n)
                if mac_of(&n.attributes) == Some(mac)
                    && n.attributes.iter().any(
                        |a| matches!(a, NeighbourAttribute::Controller(b) if *b == bridge),
                    ) =>
            {
                Some(n.header.ifindex)
            }
            _ => None,
        }))
    }
}
