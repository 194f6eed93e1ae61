//! Routes to other hosts' subnets (overlay backends) and the host's own
//! addresses. Every route weft programs for a peer carries
//! [`OVERLAY_ROUTE_PROTOCOL`], so the agent finds its own routes by that
//! mark, and removes stale ones without touching anyone else's.

use crate::error::Result;
use crate::netlink::{Netlink, RT_TABLE_MAIN};
use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::Ipv4Addr;

/// Routing protocol number of routes to peers' subnets.
pub const OVERLAY_ROUTE_PROTOCOL: u8 = 0x78;

/// A route as weft reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

fn route_msg(r: &Route, protocol: u8, onlink: bool) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.table = RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Other(protocol);
    msg.header.scope = if r.gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    msg.header.kind = RouteType::Unicast;
    msg.header.destination_prefix_length = r.dst.prefix_len();
    if onlink {
        msg.header.flags = RouteFlags::Onlink;
    }
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            r.dst.network(),
        )));
    if let Some(gw) = r.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    if let Some(oif) = r.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}

fn parse_route(m: &RouteMessage) -> Option<Route> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let (mut gateway, mut oif) = (None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some(Route {
        dst: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
        gateway,
        oif,
    })
}

impl Netlink {
    /// Every IPv4 route of every table, as the kernel reports them.
    fn dump_routes(&mut self) -> Result<Vec<RouteMessage>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.request(
            "list routes",
            RouteNetlinkMessage::GetRoute(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    /// Adds or replaces a main-table route marked with `protocol`.
    pub fn replace_route(&mut self, r: &Route, protocol: u8, onlink: bool) -> Result<()> {
        self.ack(
            &format!("replace route to {}", r.dst),
            RouteNetlinkMessage::NewRoute(route_msg(r, protocol, onlink)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes the main-table route to `dst` marked with `protocol`; absent is fine.
    pub fn delete_route(&mut self, dst: Ipv4Net, protocol: u8) -> Result<()> {
        let r = Route {
            dst,
            gateway: None,
            oif: None,
        };
        let mut msg = route_msg(&r, protocol, false);
        msg.header.scope = RouteScope::NoWhere;
        match self.ack(
            &format!("delete route to {dst}"),
            RouteNetlinkMessage::DelRoute(msg),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// The main-table IPv4 routes marked with `protocol`.
    pub fn routes_of(&mut self, protocol: u8) -> Result<Vec<Route>> {
        Ok(self
            .dump_routes()?
            .iter()
            .filter(|r| {
                r.header.table == RT_TABLE_MAIN
                    && r.header.protocol == RouteProtocol::Other(protocol)
            })
            .filter_map(parse_route)
            .collect())
    }

    /// The main table's unicast IPv4 routes that no one of weft's marks
    /// (neither [`OVERLAY_ROUTE_PROTOCOL`] nor weft's sandbox routes), the
    /// default route left out: what a new local subnet must not overlap.
    pub fn foreign_routes(&mut self) -> Result<Vec<Route>> {
        let weft = [
            RouteProtocol::Other(OVERLAY_ROUTE_PROTOCOL),
            RouteProtocol::Other(crate::netlink::WEFT_ROUTE_PROTOCOL),
        ];
        Ok(self
            .dump_routes()?
            .iter()
            .filter(|r| {
                r.header.table == RT_TABLE_MAIN
                    && r.header.kind == RouteType::Unicast
                    && r.header.destination_prefix_length > 0
                    && !weft.contains(&r.header.protocol)
            })
            .filter_map(parse_route)
            .collect())
    }

    /// The connected subnets of this namespace: main-table routes without a
    /// gateway (scope link), with their interface. A peer inside one of them
    /// is reachable without a router.
    pub fn connected_subnets(&mut self) -> Result<Vec<Route>> {
        Ok(self
            .dump_routes()?
            .iter()
            .filter(|r| {
                r.header.table == RT_TABLE_MAIN
                    && r.header.scope == RouteScope::Link
                    && r.header.kind == RouteType::Unicast
                    && r.header.protocol != RouteProtocol::Other(OVERLAY_ROUTE_PROTOCOL)
            })
            .filter_map(parse_route)
            .filter(|r| r.gateway.is_none())
            .collect())
    }

    /// The interface of the main table's default route, if there is one.
    pub fn default_route_oif(&mut self) -> Result<Option<u32>> {
        Ok(self
            .dump_routes()?
            .iter()
            .filter(|r| r.header.table == RT_TABLE_MAIN && r.header.destination_prefix_length == 0)
            .find_map(|r| parse_route(r).and_then(|r| r.oif)))
    }

    /// Every IPv4 address of this namespace with its interface index.
    pub fn ipv4_addresses(&mut self) -> Result<Vec<(u32, Ipv4Net)>> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies = self.request(
            "list addresses",
            RouteNetlinkMessage::GetAddress(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    let ip = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })?;
                    Some((a.header.index, Ipv4Net::new(ip, a.header.prefix_len).ok()?))
                }
                _ => None,
            })
            .collect())
    }
}
