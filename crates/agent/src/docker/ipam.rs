//! The `IpamDriver` side (`--ipam-driver weft`): a pool is a weft network's
//! subnet (the pool id is the subnet), and its addresses come from that
//! network's address pool, the one weft's own sandboxes draw from.

use super::driver::NETWORK_OPTION;
use super::proto;
use super::{address_key, Empty, PendingPool, Plugin, Reservation};
use crate::error::{AgentError, Result};
use crate::host::Inner;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use tracing::info;
use weft_model::subnet;
use weft_store::{Store, StoreJson};

/// Address spaces are Docker's way to let pools overlap; weft's networks on
/// one host never do, so both names mean the same.
pub(super) const LOCAL_SPACE: &str = "weft-local";
pub(super) const GLOBAL_SPACE: &str = "weft-global";

fn bad(m: String) -> AgentError {
    AgentError::BadRequest(m)
}

fn parse_subnet(what: &str, s: &str) -> Result<Ipv4Net> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| bad(format!("{what} {s:?} is not an IPv4 subnet")))?;
    if net.addr() != net.network() {
        return Err(bad(format!(
            "{what} {net} has host bits set; did you mean {}?",
            net.trunc()
        )));
    }
    Ok(net)
}

/// An address as Docker passes it: plain, or (to be lenient) with a prefix.
fn parse_addr(s: &str) -> Result<Ipv4Addr> {
    s.split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|_| bad(format!("address {s:?} is not an IPv4 address")))
}

fn pool_reply(net: Ipv4Net) -> proto::PoolReply {
    proto::PoolReply {
        pool_id: net.to_string(),
        pool: net.to_string(),
        data: Default::default(),
    }
}

/// The weft network (bridge or overlay) whose subnet on this host is `net`.
fn network_with(inner: &mut Inner, net: Ipv4Net) -> Option<&mut crate::host::NetworkState> {
    inner
        .networks
        .values_mut()
        .find(|n| n.net.uses_bridge() && n.net.subnet == net)
}

impl Plugin {
    pub(super) fn request_pool(&self, req: proto::RequestPool) -> Result<proto::PoolReply> {
        if req.v6 {
            return Err(bad(
                "weft networks are IPv4 only: create the Docker network without --ipv6".into(),
            ));
        }
        let mut st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let sub_pool = match req.sub_pool.as_str() {
            "" => None,
            s => Some(parse_subnet("--ip-range", s)?),
        };
        // The pool of a weft network: its range must be the network's own.
        let existing = |n: &crate::host::NetworkState| -> Result<proto::PoolReply> {
            if let Some(r) = sub_pool.filter(|r| Some(*r) != n.net.ip_range) {
                return Err(bad(format!(
                    "--ip-range {r}: weft network {} hands out {}; its range is set by `weft network create --ip-range`",
                    n.net.name,
                    n.net.ip_range.map_or("its whole subnet".into(), |r| r.to_string())
                )));
            }
            Ok(pool_reply(n.net.subnet))
        };
        if let Some(name) = req.options.get(NETWORK_OPTION) {
            let n = inner.networks.get(name).ok_or_else(|| {
                AgentError::NotFound(format!(
                    "--ipam-opt {NETWORK_OPTION}={name}: no weft network named {name:?}; `weft network ls` lists them"
                ))
            })?;
            if !n.net.uses_bridge() {
                return Err(bad(format!(
                    "weft network {name} is a {} network; Docker's containers join weft's bridge networks",
                    n.net.driver()
                )));
            }
            // Docker checks a pool it did not ask for against the host's
            // routes and asks again while it overlaps one, and the network's
            // bridge route always does: it would ask forever.
            if req.pool.is_empty() {
                return Err(bad(format!(
                    "--ipam-opt {NETWORK_OPTION}={name}: give the network's subnet too, \
                     --subnet {} (Docker refuses a subnet it did not ask for that is on the host's routes)",
                    n.net.subnet
                )));
            }
            if parse_subnet("--subnet", &req.pool)? != n.net.subnet {
                return Err(bad(format!(
                    "--subnet {}: weft network {name} has subnet {}",
                    req.pool, n.net.subnet
                )));
            }
            return existing(n);
        }
        if req.pool.is_empty() {
            if sub_pool.is_some() {
                return Err(bad("--ip-range needs --subnet".into()));
            }
            let mut taken: Vec<Ipv4Net> = inner.networks.values().map(|n| n.net.range()).collect();
            taken.extend(st.pending.keys().copied());
            taken.extend(inner.nl.route_destinations()?);
            let net =
                subnet::pick_free(subnet::default_bridge_pool(), &taken).ok_or_else(|| {
                    bad("no free subnet left in weft's default pool; give one with --subnet".into())
                })?;
            st.pending.insert(net, PendingPool::default());
            info!(pool = %net, "IPAM pool chosen for a new Docker network");
            return Ok(pool_reply(net));
        }
        let pool = parse_subnet("--subnet", &req.pool)?;
        if let Some(n) = network_with(inner, pool) {
            return existing(n);
        }
        if let Some(o) = inner
            .networks
            .values()
            .find(|n| subnet::overlaps(&n.net.range(), &pool))
        {
            return Err(bad(format!(
                "--subnet {pool} overlaps {} of weft network {}; pick a subnet that does not",
                o.net.range(),
                o.net.name
            )));
        }
        if st.pending.contains_key(&pool) {
            return Err(AgentError::Conflict(format!(
                "--subnet {pool} is being given to another Docker network right now"
            )));
        }
        if let Some(r) = sub_pool {
            if !(pool.contains(&r.network()) && pool.contains(&r.broadcast())) {
                return Err(bad(format!("--ip-range {r} is not inside --subnet {pool}")));
            }
        }
        st.pending.insert(pool, PendingPool { sub_pool });
        Ok(pool_reply(pool))
    }

    pub(super) fn release_pool(&self, req: proto::PoolRef) -> Result<Empty> {
        // A weft network's pool goes with the network (DeleteNetwork), not here.
        if let Ok(net) = parse_subnet("pool", &req.pool_id) {
            self.state().pending.remove(&net);
        }
        Ok(Empty {})
    }

    pub(super) fn request_address(
        &self,
        req: proto::RequestAddress,
    ) -> Result<proto::AddressReply> {
        let pool = parse_subnet("pool", &req.pool_id)?;
        let asked = match req.address.as_str() {
            "" => None,
            a => Some(parse_addr(a)?),
        };
        let gateway = req
            .options
            .get(proto::REQUEST_ADDRESS_TYPE)
            .map(String::as_str)
            == Some(proto::GATEWAY_REQUEST);
        let mut st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let reply = |ip: Ipv4Addr| proto::AddressReply {
            address: format!("{ip}/{}", pool.prefix_len()),
            data: Default::default(),
        };
        let Some(n) = network_with(inner, pool) else {
            if !gateway {
                return Err(bad(format!(
                    "no weft network has subnet {pool} yet, so there is no address to give \
                     (--aux-address is not supported)"
                )));
            }
            // The gateway of a network Docker is about to create.
            let gw = asked.unwrap_or_else(|| subnet::first_host(&pool));
            if !pool.contains(&gw) || gw == pool.network() || gw == pool.broadcast() {
                return Err(bad(format!(
                    "--gateway {gw} is not a host address of --subnet {pool}"
                )));
            }
            return Ok(reply(gw));
        };
        if gateway {
            if let Some(a) = asked.filter(|a| *a != n.net.gateway) {
                return Err(bad(format!(
                    "--gateway {a}: weft network {} has gateway {}; leave --gateway out",
                    n.net.name, n.net.gateway
                )));
            }
            return Ok(reply(n.net.gateway));
        }
        let network = n.net.name.clone();
        let ip = n.allocate(asked, None).map_err(|e| match e {
            AgentError::BadRequest(m) => bad(format!("{m} (weft network {network})")),
            e => e,
        })?;
        let r = Reservation {
            network: network.clone(),
            ip,
        };
        if let Err(e) = inner.runtime.put_json(&address_key(&network, ip), &r) {
            if let Some(n) = inner.networks.get_mut(&network) {
                n.release(ip);
            }
            return Err(e.into());
        }
        st.reserved.insert((network, ip));
        Ok(reply(ip))
    }

    /// Idempotent: an address weft does not hold for Docker is released already.
    pub(super) fn release_address(&self, req: proto::ReleaseAddress) -> Result<Empty> {
        let pool = parse_subnet("pool", &req.pool_id)?;
        let ip = parse_addr(&req.address)?;
        let mut st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let Some(n) = network_with(inner, pool) else {
            return Ok(Empty {});
        };
        let key = (n.net.name.clone(), ip);
        if ip != n.net.gateway && st.reserved.remove(&key) {
            n.release(ip);
            inner.runtime.delete(&address_key(&key.0, ip))?;
        }
        Ok(Empty {})
    }
}

#[cfg(test)]
mod tests {
    use super::super::driver::parse_cidr;
    use super::*;

    #[test]
    fn pools_are_subnets() {
        assert!(parse_subnet("pool", "10.1.0.0/24").is_ok());
        assert!(parse_subnet("pool", "10.1.0.1/24").is_err());
        assert!(parse_subnet("pool", "fd00::/64").is_err());
        assert_eq!(parse_addr("10.1.0.5").unwrap(), Ipv4Addr::new(10, 1, 0, 5));
        assert_eq!(
            parse_addr("10.1.0.5/24").unwrap(),
            Ipv4Addr::new(10, 1, 0, 5)
        );
        assert_eq!(
            pool_reply(parse_subnet("p", "10.1.0.0/24").unwrap()).pool_id,
            "10.1.0.0/24"
        );
    }

    #[test]
    fn gateway_cidrs_parse() {
        assert_eq!(
            parse_cidr("gateway", "10.1.0.1/24").unwrap().addr(),
            Ipv4Addr::new(10, 1, 0, 1)
        );
        assert!(parse_cidr("gateway", "10.1.0.1").is_err());
    }
}
