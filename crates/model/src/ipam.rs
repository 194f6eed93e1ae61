//! IP address management for one IPv4 subnet.
//!
//! Allocation is next-fit (continue after the last address handed out, wrap at
//! the end), like Docker: a just-released address is not handed out again at
//! once, which keeps stale ARP entries and half-closed connections of a
//! removed sandbox from reaching a new one.

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("address {ip} is outside subnet {subnet}; pick one inside it or leave --ip out")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {ip} is already in use on subnet {subnet}; pick another or leave --ip out")]
    InUse { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {ip} is reserved on subnet {subnet} ({why}); pick another")]
    Reserved {
        ip: Ipv4Addr,
        subnet: Ipv4Net,
        why: &'static str,
    },
    #[error("no free address left in subnet {subnet}; remove sandboxes or use a larger subnet")]
    Exhausted { subnet: Ipv4Net },
    #[error("gateway {gateway} is not a usable host address of subnet {subnet}")]
    BadGateway { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("ip range {range} is not inside subnet {subnet}")]
    RangeOutside { range: Ipv4Net, subnet: Ipv4Net },
    #[error("subnet {subnet} is too small: it needs room for a gateway and at least one sandbox")]
    TooSmall { subnet: Ipv4Net },
}

/// The addresses of one subnet: which are taken and where the next search starts.
#[derive(Debug, Clone)]
pub struct AddressPool {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    used: BTreeSet<u32>,
    /// Offset (from the network address) where the next search begins.
    next: u32,
    /// Offsets that dynamic allocation may hand out (`--ip-range`).
    low: u32,
    high: u32,
}

impl AddressPool {
    pub fn new(subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<Self, IpamError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() > 30 {
            return Err(IpamError::TooSmall { subnet });
        }
        let size = 1u32 << (32 - subnet.prefix_len());
        let pool = AddressPool {
            subnet,
            gateway,
            used: BTreeSet::new(),
            next: 1,
            low: 1,
            high: size - 2,
        };
        if gateway == subnet.network()
            || gateway == subnet.broadcast()
            || !subnet.contains(&gateway)
        {
            return Err(IpamError::BadGateway { gateway, subnet });
        }
        Ok(pool)
    }

    /// Limits dynamic allocation to `range` (static addresses may still be
    /// anywhere in the subnet, as with Docker's --ip-range).
    pub fn with_range(mut self, range: Option<Ipv4Net>) -> Result<Self, IpamError> {
        if let Some(r) = range {
            let r = r.trunc();
            if !(self.subnet.contains(&r.network()) && self.subnet.contains(&r.broadcast())) {
                return Err(IpamError::RangeOutside {
                    range: r,
                    subnet: self.subnet,
                });
            }
            self.low = self.offset(r.network()).max(1);
            self.high = self.offset(r.broadcast()).min(self.size() - 2);
            self.next = self.low;
        }
        Ok(self)
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// The addresses taken.
    pub fn in_use_addresses(&self) -> Vec<Ipv4Addr> {
        let base = u32::from(self.subnet.network());
        self.used.iter().map(|o| Ipv4Addr::from(base + o)).collect()
    }

    /// Number of addresses a sandbox could ever get (hosts minus the gateway).
    pub fn capacity(&self) -> u32 {
        self.size() - 2 - 1
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.subnet.prefix_len())
    }

    fn offset(&self, ip: Ipv4Addr) -> u32 {
        u32::from(ip) - u32::from(self.subnet.network())
    }

    fn reserved_reason(&self, ip: Ipv4Addr) -> Option<&'static str> {
        if ip == self.subnet.network() {
            Some("network address")
        } else if ip == self.subnet.broadcast() {
            Some("broadcast address")
        } else if ip == self.gateway {
            Some("gateway")
        } else {
            None
        }
    }

    /// Checks that `ip` could be taken, without taking it.
    pub fn check_free(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let subnet = self.subnet;
        if !subnet.contains(&ip) {
            return Err(IpamError::OutsideSubnet { ip, subnet });
        }
        if let Some(why) = self.reserved_reason(ip) {
            return Err(IpamError::Reserved { ip, subnet, why });
        }
        if self.used.contains(&self.offset(ip)) {
            return Err(IpamError::InUse { ip, subnet });
        }
        Ok(())
    }

    /// Takes `requested`, or the next free address when none is requested.
    pub fn allocate(&mut self, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = requested {
            self.check_free(ip)?;
            self.used.insert(self.offset(ip));
            return Ok(ip);
        }
        let gw = self.offset(self.gateway);
        let (low, high) = (self.low, self.high);
        let step = |o: u32| if o >= high { low } else { o + 1 };
        // Scan the allowed offsets at most once around, from the cursor.
        let mut off = self.next.clamp(low, high);
        for _ in 0..=(high - low) {
            if off != gw && !self.used.contains(&off) {
                self.used.insert(off);
                self.next = step(off);
                return Ok(Ipv4Addr::from(u32::from(self.subnet.network()) + off));
            }
            off = step(off);
        }
        Err(IpamError::Exhausted {
            subnet: self.subnet,
        })
    }

    /// Marks an address taken that was allocated before (loading saved state).
    pub fn restore(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        self.check_free(ip)?;
        self.used.insert(self.offset(ip));
        Ok(())
    }

    /// Gives an address back; returns whether it was taken.
    pub fn release(&mut self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip) && self.used.remove(&self.offset(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str, gw: &str) -> AddressPool {
        AddressPool::new(s.parse().unwrap(), gw.parse().unwrap()).unwrap()
    }

    #[test]
    fn allocates_in_order_skipping_gateway() {
        let mut p = pool("10.1.0.0/29", "10.1.0.1");
        let got: Vec<_> = (0..5).map(|_| p.allocate(None).unwrap()).collect();
        let want: Vec<Ipv4Addr> = ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            p.allocate(None),
            Err(IpamError::Exhausted {
                subnet: "10.1.0.0/29".parse().unwrap()
            })
        );
        assert_eq!(p.capacity(), 5);
    }

    #[test]
    fn next_fit_does_not_reuse_released_address_at_once() {
        let mut p = pool("10.1.0.0/24", "10.1.0.1");
        let a = p.allocate(None).unwrap();
        assert!(p.release(a));
        let b = p.allocate(None).unwrap();
        assert_ne!(a, b);
        assert!(!p.release(a), "releasing twice reports false");
    }

    #[test]
    fn wraps_around_to_released_addresses() {
        let mut p = pool("10.1.0.0/29", "10.1.0.6");
        let all: Vec<_> = (0..5).map(|_| p.allocate(None).unwrap()).collect();
        assert!(!all.contains(&"10.1.0.6".parse().unwrap()));
        p.release("10.1.0.3".parse().unwrap());
        assert_eq!(
            p.allocate(None).unwrap(),
            "10.1.0.3".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn requested_addresses_are_checked() {
        let mut p = pool("10.1.0.0/24", "10.1.0.1");
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(p.allocate(Some(ip("10.1.0.9"))).unwrap(), ip("10.1.0.9"));
        assert!(matches!(
            p.allocate(Some(ip("10.1.0.9"))),
            Err(IpamError::InUse { .. })
        ));
        assert!(matches!(
            p.allocate(Some(ip("10.2.0.9"))),
            Err(IpamError::OutsideSubnet { .. })
        ));
        assert!(matches!(
            p.allocate(Some(ip("10.1.0.1"))),
            Err(IpamError::Reserved { why: "gateway", .. })
        ));
        assert!(matches!(
            p.allocate(Some(ip("10.1.0.0"))),
            Err(IpamError::Reserved { .. })
        ));
        assert!(matches!(
            p.allocate(Some(ip("10.1.0.255"))),
            Err(IpamError::Reserved { .. })
        ));
        let msg = p.allocate(Some(ip("10.2.0.9"))).unwrap_err().to_string();
        assert!(msg.contains("outside subnet 10.1.0.0/24"), "{msg}");
    }

    #[test]
    fn restore_marks_taken() {
        let mut p = pool("10.1.0.0/24", "10.1.0.1");
        p.restore("10.1.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            p.allocate(None).unwrap(),
            "10.1.0.3".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(p.in_use(), 2);
    }

    #[test]
    fn rejects_bad_gateway_and_tiny_subnets() {
        assert!(
            AddressPool::new("10.1.0.0/24".parse().unwrap(), "10.2.0.1".parse().unwrap()).is_err()
        );
        assert!(
            AddressPool::new("10.1.0.0/24".parse().unwrap(), "10.1.0.0".parse().unwrap()).is_err()
        );
        assert!(
            AddressPool::new("10.1.0.0/31".parse().unwrap(), "10.1.0.1".parse().unwrap()).is_err()
        );
    }

    #[test]
    fn dynamic_addresses_stay_in_the_range() {
        let mut p = pool("10.1.0.0/16", "10.1.0.1")
            .with_range(Some("10.1.5.0/30".parse().unwrap()))
            .unwrap();
        let got: Vec<String> = (0..4)
            .map(|_| p.allocate(None).unwrap().to_string())
            .collect();
        assert_eq!(got, ["10.1.5.0", "10.1.5.1", "10.1.5.2", "10.1.5.3"]);
        assert!(matches!(p.allocate(None), Err(IpamError::Exhausted { .. })));
        // A static address may lie outside the range.
        assert!(p.allocate(Some("10.1.9.9".parse().unwrap())).is_ok());
        assert!(pool("10.1.0.0/16", "10.1.0.1")
            .with_range(Some("10.2.0.0/24".parse().unwrap()))
            .is_err());
    }

    #[test]
    fn a_thousand_distinct() {
        let mut p = pool("10.9.0.0/16", "10.9.0.1");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(p.allocate(None).unwrap()));
        }
    }
}
