//! IPAM blocks of a network whose one subnet spans every host (Docker's
//! overlay, weave): the range is cut into aligned blocks, each host owns
//! some and hands out addresses of its own blocks without asking anyone,
//! so an attach needs no round trip to the cluster store in the common
//! case. Pure logic only; the cluster stores who owns which block.
//!
//! Groundwork of issue 16: not yet used by the agent.

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

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
/// broadcast address, not the gateway (the same on every host).
pub fn usable(block: Ipv4Net, range: Ipv4Net, gateway: Ipv4Addr) -> impl Iterator<Item = Ipv4Addr> {
    let (lo, hi) = (u32::from(block.network()), u32::from(block.broadcast()));
    (lo..=hi)
        .map(Ipv4Addr::from)
        .filter(move |ip| *ip != range.network() && *ip != range.broadcast() && *ip != gateway)
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
    used: &BTreeSet<Ipv4Addr>,
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
        .find(|ip| !used.contains(ip))
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
            next_free(&owned, range, gw, &used, None),
            Some(ip("10.0.2.2"))
        );
        used.insert(ip("10.0.2.2"));
        // Next-fit: after .2, even once .2 is free again.
        used.remove(&ip("10.0.2.2"));
        assert_eq!(
            next_free(&owned, range, gw, &used, Some(ip("10.0.2.2"))),
            Some(ip("10.0.2.3"))
        );
        // From the end of the first block into the second.
        assert_eq!(
            next_free(&owned, range, gw, &used, Some(ip("10.0.2.15"))),
            Some(ip("10.0.2.32"))
        );
        // Wraps around; full blocks mean claim another.
        assert_eq!(
            next_free(&owned, range, gw, &used, Some(ip("10.0.2.47"))),
            Some(ip("10.0.2.2"))
        );
        let all: BTreeSet<Ipv4Addr> = owned.iter().flat_map(|b| usable(*b, range, gw)).collect();
        assert_eq!(next_free(&owned, range, gw, &all, None), None);
    }
}
