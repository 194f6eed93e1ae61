//! The peer table: longest-prefix match from an inner destination address
//! to a peer, without scanning the peers.

use ipnet::Ipv4Net;
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Longest-prefix match over IPv4 prefixes: one hash map per prefix length
/// that is in use, probed from the longest length down. A lookup costs one
/// hash probe per distinct length (a cluster's subnets usually share one
/// or two), whatever the number of peers.
#[derive(Debug, Clone)]
pub(crate) struct PrefixTable<T> {
    /// (prefix length, network address as u32 -> value), longest first.
    levels: Vec<(u8, HashMap<u32, T>)>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        PrefixTable { levels: Vec::new() }
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl<T> PrefixTable<T> {
    /// Inserts `net` (its host bits ignored); returns the previous value.
    pub fn insert(&mut self, net: Ipv4Net, value: T) -> Option<T> {
        let len = net.prefix_len();
        let key = u32::from(net.network()) & mask(len);
        let pos = match self.levels.iter().position(|(l, _)| *l <= len) {
            Some(p) if self.levels[p].0 == len => p,
            Some(p) => {
                self.levels.insert(p, (len, HashMap::new()));
                p
            }
            None => {
                self.levels.push((len, HashMap::new()));
                self.levels.len() - 1
            }
        };
        self.levels[pos].1.insert(key, value)
    }

    pub fn lookup(&self, addr: Ipv4Addr) -> Option<&T> {
        let a = u32::from(addr);
        self.levels
            .iter()
            .find_map(|(len, map)| map.get(&(a & mask(*len))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let mut t = PrefixTable::default();
        t.insert("10.0.0.0/8".parse().unwrap(), 1);
        t.insert("10.50.2.0/24".parse().unwrap(), 2);
        t.insert("10.50.2.128/25".parse().unwrap(), 3);
        t.insert("0.0.0.0/0".parse().unwrap(), 4);
        let l = |s: &str| t.lookup(s.parse().unwrap()).copied();
        assert_eq!(l("10.50.2.200"), Some(3));
        assert_eq!(l("10.50.2.1"), Some(2));
        assert_eq!(l("10.1.1.1"), Some(1));
        assert_eq!(l("198.51.100.1"), Some(4));
        let mut u: PrefixTable<u8> = PrefixTable::default();
        u.insert("10.50.1.0/24".parse().unwrap(), 1);
        assert_eq!(u.lookup("10.50.2.1".parse().unwrap()), None);
        // Host bits of the inserted prefix do not matter.
        u.insert("10.60.1.7/24".parse().unwrap(), 2);
        assert_eq!(u.lookup("10.60.1.1".parse().unwrap()), Some(&2));
    }

    #[test]
    fn many_peers() {
        let mut t = PrefixTable::default();
        for i in 0..10_000u32 {
            let net = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).unwrap();
            t.insert(net, i);
        }
        assert_eq!(t.levels.len(), 1);
        assert_eq!(t.lookup(Ipv4Addr::new(10, 0, 42, 9)), Some(&42));
    }
}
