//! IPAM blocks of a network whose one subnet spans every host (Docker's
//! overlay, weave): the range is cut into aligned blocks, each host owns
//! some and hands out addresses of its own blocks without asking anyone,
//! so an attach needs no round trip to the cluster store in the common
//! case. Pure logic only; the cluster stores who owns which block.
//!
//! Keys in the cluster store: `blocks/NET/A-LEN` names a block's holder
//! ([`BlockHolder`]) and `endpoints/NET/IP` every address in use on a
//! network that spans hosts ([`EndpointRecord`]); both are bound to the
//! holder's etcd lease, so a host that leaves or dies gives them back.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Who holds a block of a shared network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHolder {
    pub host_id: String,
    pub node: String,
}

/// One address in use on a network that spans hosts, as every host sees
/// it: where its sandbox is (the host, its public address and the MAC), and
/// the names it answers to there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub ip: Ipv4Addr,
    pub mac: String,
    pub host_id: String,
    pub node: String,
    pub public_ip: Ipv4Addr,
    /// The sandbox's name; None for an address a host claimed for an
    /// attach (borrowed from another host's block, or a static `--ip`)
    /// that is not plugged in yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The sandbox's name and aliases on this network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// The host's own address on the network (`weft expose`), not a
    /// sandbox's: other hosts program it as a sandbox's, so replies to it
    /// come back to the exposing host. Left out when false, so records
    /// (and their signatures) read as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exposed: bool,
    /// The host's signature over the rest, as a lease's (None without a
    /// client certificate): with TLS, a record its node did not sign is
    /// never programmed, so no etcd member can pull a sandbox's traffic
    /// to itself by posting a record in another host's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<crate::overlay::LeaseSignature>,
}

impl EndpointRecord {
    /// The record without its signature: what is signed and compared.
    pub fn body(&self) -> EndpointRecord {
        EndpointRecord {
            signed: None,
            ..self.clone()
        }
    }

    /// The bytes a signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).expect("serializable")
    }

    /// "sandbox web on host h2", for errors that name a holder.
    pub fn holder(&self) -> String {
        match &self.sandbox {
            Some(s) => format!("sandbox {s} on host {}", self.node),
            None if self.exposed => format!("host {} (its `weft expose` address)", self.node),
            None => format!("host {} (being attached)", self.node),
        }
    }
}

/// The key part that names an address: `10.0.2.7`.
pub fn endpoint_key(network: &str, ip: Ipv4Addr) -> String {
    format!("endpoints/{network}/{ip}")
}

/// The key of a block: `blocks/NET/10.0.2.16-28`, as leases are spelled.
pub fn block_key(network: &str, block: &Ipv4Net) -> String {
    format!("blocks/{network}/{}", crate::overlay::subnet_key(block))
}

/// What this host may hand out on a shared network without asking anyone:
/// the addresses of the blocks it holds, and addresses it claimed one by
/// one (borrowed from a full cluster's other blocks, or a static `--ip`);
/// never an address another host holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostShare {
    pub held: BTreeSet<Ipv4Net>,
    pub borrowed: BTreeSet<Ipv4Addr>,
    /// Addresses other hosts hold, with who holds them.
    pub foreign: BTreeMap<Ipv4Addr, String>,
    /// The last address handed out (next-fit).
    pub last: Option<Ipv4Addr>,
    /// Every block of the network is held, so other hosts may borrow
    /// addresses of this host's blocks: an address is then handed out only
    /// once claimed in the cluster (in `borrowed`), never straight from a
    /// held block, or a borrower and the holder could take the same one.
    pub contended: bool,
}

impl HostShare {
    /// Whether this host may give `ip` to a sandbox now.
    pub fn may_take(&self, ip: Ipv4Addr) -> bool {
        !self.foreign.contains_key(&ip)
            && (self.borrowed.contains(&ip)
                || (!self.contended && self.held.iter().any(|b| b.contains(&ip))))
    }

    /// The address a new sandbox gets: a claimed one not in use first, then
    /// the next free one of the held blocks; None when all are in use and
    /// the host must claim more. `in_use` says what this host uses.
    pub fn pick(
        &mut self,
        range: Ipv4Net,
        gateway: Ipv4Addr,
        in_use: impl Fn(&Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        let taken = |ip: &Ipv4Addr| in_use(ip) || self.foreign.contains_key(ip);
        let ip = match self.borrowed.iter().find(|ip| !taken(ip)) {
            Some(ip) => *ip,
            None if self.contended => return None,
            None => {
                let held: Vec<Ipv4Net> = self.held.iter().copied().collect();
                let ip = next_free(&held, range, gateway, taken, self.last)?;
                self.last = Some(ip);
                ip
            }
        };
        Some(ip)
    }

    /// How many addresses of the held blocks are free to hand out without
    /// asking the cluster (none while contended).
    pub fn free(
        &self,
        range: Ipv4Net,
        gateway: Ipv4Addr,
        in_use: impl Fn(&Ipv4Addr) -> bool,
    ) -> usize {
        if self.contended {
            return 0;
        }
        self.held
            .iter()
            .flat_map(|b| usable(*b, range, gateway))
            .filter(|ip| !in_use(ip) && !self.foreign.contains_key(ip))
            .count()
    }
}

/// The smallest range that holds two blocks.
pub const MIN_RANGE_PREFIX: u8 = 28;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error(
        "--subnet {0} is too small for a network shared by hosts: it must hold two blocks of \
         8 addresses, so use /{MIN_RANGE_PREFIX} or larger"
    )]
    RangeTooSmall(Ipv4Net),
}

/// The prefix length of the blocks of `range`: 16 blocks for a small range
/// (a /24 gives /28 blocks of 16 addresses, so many hosts each get one),
/// Calico's /26 (64 addresses) for large ones, never smaller than /29.
pub fn block_len(range: Ipv4Net) -> Result<u8, BlockError> {
    if range.prefix_len() > MIN_RANGE_PREFIX {
        return Err(BlockError::RangeTooSmall(range));
    }
    Ok((range.prefix_len() + 4).clamp(26, 29))
}

/// Every block of `range`, in address order.
pub fn blocks_of(range: Ipv4Net, len: u8) -> impl Iterator<Item = Ipv4Net> {
    let base = u32::from(range.network()) as u64;
    let count = 1u64 << (len - range.prefix_len());
    let size = 1u64 << (32 - len);
    (0..count)
        .map(move |i| Ipv4Net::new(Ipv4Addr::from((base + i * size) as u32), len).expect("valid"))
}

/// A block nobody holds, searched from a place derived from `seed` (the
/// host id's hash), so hosts claiming at once rarely race for one block;
/// the store's create-if-absent settles the races that remain.
pub fn pick_free_block(
    range: Ipv4Net,
    len: u8,
    taken: &BTreeSet<Ipv4Net>,
    seed: u64,
) -> Option<Ipv4Net> {
    let all: Vec<Ipv4Net> = blocks_of(range, len).collect();
    let n = all.len() as u64;
    (0..n)
        .map(|i| all[(seed.wrapping_add(i) % n) as usize])
        .find(|b| !taken.contains(b))
}

/// Addresses of `block` a sandbox may get: not the range's network or
/// broadcast address, not the gateway (the same on every host), and none
/// ending in .0 or .255 (valid inside a larger subnet, but read as a
/// network or broadcast address by people and by some software).
pub fn usable(block: Ipv4Net, range: Ipv4Net, gateway: Ipv4Addr) -> impl Iterator<Item = Ipv4Addr> {
    let (lo, hi) = (u32::from(block.network()), u32::from(block.broadcast()));
    (lo..=hi).map(Ipv4Addr::from).filter(move |ip| {
        let last = ip.octets()[3];
        *ip != range.network()
            && *ip != range.broadcast()
            && *ip != gateway
            && last != 0
            && last != 255
    })
}

/// How full one host's block is, for `network inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUse {
    pub block: Ipv4Net,
    pub used: usize,
    pub capacity: usize,
}

/// The use of each of `blocks` given the addresses taken on the network.
pub fn use_of(
    blocks: &[Ipv4Net],
    range: Ipv4Net,
    gateway: Ipv4Addr,
    used: &BTreeSet<Ipv4Addr>,
) -> Vec<BlockUse> {
    blocks
        .iter()
        .map(|&block| {
            let all: Vec<Ipv4Addr> = usable(block, range, gateway).collect();
            BlockUse {
                block,
                used: all.iter().filter(|ip| used.contains(ip)).count(),
                capacity: all.len(),
            }
        })
        .collect()
}

/// The next free address of `owned` (in order, next-fit from `after` so a
/// just-released address is not handed out again at once), or None when
/// every owned block is full and the host must claim another.
pub fn next_free(
    owned: &[Ipv4Net],
    range: Ipv4Net,
    gateway: Ipv4Addr,
    used: impl Fn(&Ipv4Addr) -> bool,
    after: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let mut blocks = owned.to_vec();
    blocks.sort();
    let all: Vec<Ipv4Addr> = blocks
        .iter()
        .flat_map(|b| usable(*b, range, gateway))
        .collect();
    let start = after
        .and_then(|a| all.iter().position(|ip| *ip > a))
        .unwrap_or(0);
    all[start..]
        .iter()
        .chain(all[..start].iter())
        .find(|ip| !used(ip))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn block_sizes_follow_the_range() {
        assert_eq!(block_len(net("10.0.2.0/24")), Ok(28));
        assert_eq!(block_len(net("10.32.0.0/12")), Ok(26));
        assert_eq!(block_len(net("10.0.2.0/26")), Ok(29));
        assert_eq!(block_len(net("10.0.2.0/28")), Ok(29));
        let e = block_len(net("10.0.2.0/29")).unwrap_err();
        assert!(e.to_string().contains("use /28 or larger"), "{e}");
        assert_eq!(blocks_of(net("10.0.2.0/24"), 28).count(), 16);
        assert_eq!(
            blocks_of(net("10.0.2.0/24"), 28).nth(1),
            Some(net("10.0.2.16/28"))
        );
    }

    #[test]
    fn free_blocks_are_found_from_the_seed_and_skip_taken_ones() {
        let range = net("10.0.2.0/24");
        let none = BTreeSet::new();
        assert_eq!(
            pick_free_block(range, 28, &none, 3),
            Some(net("10.0.2.48/28"))
        );
        let taken: BTreeSet<Ipv4Net> = blocks_of(range, 28).take(15).collect();
        assert_eq!(
            pick_free_block(range, 28, &taken, 0),
            Some(net("10.0.2.240/28"))
        );
        let all: BTreeSet<Ipv4Net> = blocks_of(range, 28).collect();
        assert_eq!(pick_free_block(range, 28, &all, 7), None);
    }

    #[test]
    fn the_first_and_last_blocks_lose_the_reserved_addresses() {
        let (range, gw) = (net("10.0.2.0/24"), ip("10.0.2.1"));
        assert_eq!(usable(net("10.0.2.0/28"), range, gw).count(), 14);
        assert_eq!(usable(net("10.0.2.16/28"), range, gw).count(), 16);
        assert_eq!(usable(net("10.0.2.240/28"), range, gw).count(), 15);
        // Inside a /16: no .0 nor .255 either.
        let big = net("10.40.0.0/16");
        assert_eq!(usable(net("10.40.50.0/26"), big, gw).count(), 63);
        assert_eq!(usable(net("10.40.50.192/26"), big, gw).count(), 63);
        assert_eq!(usable(net("10.40.50.64/26"), big, gw).count(), 64);
        let used: BTreeSet<Ipv4Addr> = [ip("10.0.2.2"), ip("10.0.2.17")].into();
        let u = use_of(&[net("10.0.2.0/28")], range, gw, &used);
        assert_eq!((u[0].used, u[0].capacity), (1, 14));
    }

    #[test]
    fn next_free_stays_in_owned_blocks_and_goes_on_after_the_last() {
        let (range, gw) = (net("10.0.2.0/24"), ip("10.0.2.1"));
        let owned = [net("10.0.2.32/28"), net("10.0.2.0/28")];
        let mut used = BTreeSet::new();
        assert_eq!(
            next_free(&owned, range, gw, |i| used.contains(i), None),
            Some(ip("10.0.2.2"))
        );
        used.insert(ip("10.0.2.2"));
        // Next-fit: after .2, even once .2 is free again.
        used.remove(&ip("10.0.2.2"));
        assert_eq!(
            next_free(
                &owned,
                range,
                gw,
                |i| used.contains(i),
                Some(ip("10.0.2.2"))
            ),
            Some(ip("10.0.2.3"))
        );
        // From the end of the first block into the second.
        assert_eq!(
            next_free(
                &owned,
                range,
                gw,
                |i| used.contains(i),
                Some(ip("10.0.2.15"))
            ),
            Some(ip("10.0.2.32"))
        );
        // Wraps around; full blocks mean claim another.
        assert_eq!(
            next_free(
                &owned,
                range,
                gw,
                |i| used.contains(i),
                Some(ip("10.0.2.47"))
            ),
            Some(ip("10.0.2.2"))
        );
        let all: BTreeSet<Ipv4Addr> = owned.iter().flat_map(|b| usable(*b, range, gw)).collect();
        assert_eq!(
            next_free(&owned, range, gw, |i| all.contains(i), None),
            None
        );
    }

    #[test]
    fn a_host_share_hands_out_claimed_then_held_addresses_never_foreign_ones() {
        let (range, gw) = (net("10.0.2.0/24"), ip("10.0.2.1"));
        let mut s = HostShare {
            held: [net("10.0.2.0/28")].into(),
            borrowed: [ip("10.0.2.200")].into(),
            foreign: [(ip("10.0.2.2"), "sandbox a on host h2".to_string())].into(),
            last: None,
            contended: false,
        };
        let none = |_: &Ipv4Addr| false;
        assert!(s.may_take(ip("10.0.2.200")) && s.may_take(ip("10.0.2.3")));
        assert!(!s.may_take(ip("10.0.2.2")), "held by another host");
        assert!(!s.may_take(ip("10.0.2.77")), "nobody's block is ours");
        assert_eq!(s.pick(range, gw, none), Some(ip("10.0.2.200")));
        let used: BTreeSet<Ipv4Addr> = [ip("10.0.2.200")].into();
        assert_eq!(
            s.pick(range, gw, |i| used.contains(i)),
            Some(ip("10.0.2.3"))
        );
        assert_eq!(s.free(range, gw, none), 13);
        let all: BTreeSet<Ipv4Addr> = (2..16)
            .map(|i| Ipv4Addr::new(10, 0, 2, i))
            .chain([ip("10.0.2.200")])
            .collect();
        assert_eq!(s.pick(range, gw, |i| all.contains(i)), None);
        assert_eq!(
            block_key("ov", &net("10.0.2.16/28")),
            "blocks/ov/10.0.2.16-28"
        );
        assert_eq!(endpoint_key("ov", ip("10.0.2.7")), "endpoints/ov/10.0.2.7");
    }

    #[test]
    fn a_contended_share_hands_out_claimed_addresses_only() {
        let (range, gw) = (net("10.0.2.0/24"), ip("10.0.2.1"));
        let mut s = HostShare {
            held: [net("10.0.2.0/28")].into(),
            contended: true,
            ..Default::default()
        };
        let none = |_: &Ipv4Addr| false;
        // Every block is held: another host may be borrowing .3 right now.
        assert!(!s.may_take(ip("10.0.2.3")), "a held address needs a claim");
        assert_eq!(s.free(range, gw, none), 0);
        assert_eq!(s.pick(range, gw, none), None, "claim first");
        s.borrowed.insert(ip("10.0.2.2"));
        assert!(s.may_take(ip("10.0.2.2")));
        assert_eq!(s.pick(range, gw, none), Some(ip("10.0.2.2")));
        // A block freed again: the held blocks are this host's alone.
        s.contended = false;
        assert!(s.may_take(ip("10.0.2.3")));
        assert_eq!(s.free(range, gw, none), 14);
    }
}
