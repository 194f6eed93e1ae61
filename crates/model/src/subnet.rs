//! Choosing a private subnet that does not collide with anything.

use ipnet::Ipv4Net;

/// The pool the default bridge network is picked from, as Docker does:
/// 172.17.0.0/16 … 172.31.0.0/16, then 192.168.0.0/16 in /20 pieces.
pub fn default_bridge_pool() -> impl Iterator<Item = Ipv4Net> {
    let big = (17u8..=31).map(|b| Ipv4Net::new(std::net::Ipv4Addr::new(172, b, 0, 0), 16).unwrap());
    let small =
        (0u8..16).map(|i| Ipv4Net::new(std::net::Ipv4Addr::new(192, 168, i * 16, 0), 20).unwrap());
    big.chain(small)
}

pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first candidate that overlaps none of `taken`. A default route
/// (prefix length 0) is not a claim on any subnet and is ignored.
pub fn pick_free(
    candidates: impl IntoIterator<Item = Ipv4Net>,
    taken: &[Ipv4Net],
) -> Option<Ipv4Net> {
    candidates.into_iter().find(|c| {
        taken
            .iter()
            .filter(|t| t.prefix_len() > 0)
            .all(|t| !overlaps(c, t))
    })
}

/// The conventional gateway: the first host address.
pub fn first_host(net: &Ipv4Net) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(net.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn skips_overlapping_routes_but_not_default() {
        let taken = [n("0.0.0.0/0"), n("172.17.3.0/24"), n("172.16.0.0/12")];
        // 172.16.0.0/12 covers all of 172.17-31; first free is in 192.168.
        assert_eq!(
            pick_free(default_bridge_pool(), &taken),
            Some(n("192.168.0.0/20"))
        );
        let taken = [n("0.0.0.0/0"), n("172.17.3.0/24")];
        assert_eq!(
            pick_free(default_bridge_pool(), &taken),
            Some(n("172.18.0.0/16"))
        );
        assert_eq!(
            pick_free(default_bridge_pool(), &[]),
            Some(n("172.17.0.0/16"))
        );
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(overlaps(&n("10.0.0.0/8"), &n("10.1.0.0/16")));
        assert!(overlaps(&n("10.1.0.0/16"), &n("10.0.0.0/8")));
        assert!(!overlaps(&n("10.1.0.0/16"), &n("10.2.0.0/16")));
    }

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(first_host(&n("10.88.0.0/16")).to_string(), "10.88.0.1");
    }
}
