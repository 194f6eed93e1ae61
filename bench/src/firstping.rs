//! The first answered ping from a sandbox to an address that has just
//! appeared, at a resolution of about a millisecond.
//!
//! `ping -c1 -W…` in a loop would measure the kernel's ARP retries rather
//! than the network: a sandbox whose first ARP request for the address
//! goes unanswered (its host's overlay does not know the address yet)
//! retries only after `retrans_time` (1 s), and no less often than every
//! 10 ms whatever the sysctl says. So the [`Pinger`] speaks for the
//! sandbox itself, on a packet socket bound to the sandbox's `eth0`: every
//! `step` it sends an ARP request for the address (answered by the proxy
//! ARP of the sandbox's host once that host has the address's neighbour
//! entry) and, once an answer gave the MAC, an ICMP echo request to it
//! (answered once the frame reaches the address's sandbox: the FDB entry
//! on the sender's host, and the way back). The clock stops at the first
//! echo reply. (An address off the sandbox's subnet is pinged through its
//! gateway, whose MAC the ARP request asks for instead.) The sandbox's own kernel sees the ARP and ICMP replies and
//! ignores them (they answer nothing it asked).

use crate::sys::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;

/// A packet socket on `eth0` of a sandbox's namespace.
pub struct Pinger {
    fd: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
    ip: Ipv4Addr,
    /// The sandbox's subnet and gateway.
    subnet: ipnet::Ipv4Net,
    gateway: Ipv4Addr,
    id: u16,
}

/// When the first answers came, counted from the `t0` given.
#[derive(Debug, Clone, Copy)]
pub struct FirstAnswer {
    /// The first ARP answer for the address (its neighbour entry is on
    /// the pinging sandbox's host).
    pub arp: Duration,
    /// The first echo reply: the address is reachable.
    pub echo: Duration,
    /// Requests sent until then (ARP and ICMP).
    pub sent: u32,
}

fn errno(what: &str) -> crate::sys::Error {
    crate::sys::Error::new(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// An `ifreq` for `ioctl(2)`: the name, then a union of which we read a
/// `sockaddr` (the MAC) or an `int` (the index).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: [u8; 24],
}

fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: [0; 24],
    };
    for (d, s) in r.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

impl Pinger {
    /// Opens the socket inside the namespace at `netns` (on a thread that
    /// enters it: the socket stays in that namespace wherever it is used),
    /// for the sandbox whose `eth0` has address `ip`/`prefix_len`, routed
    /// through `gateway`.
    pub fn open(netns: &Path, ip: Ipv4Addr, prefix_len: u8, gateway: Ipv4Addr) -> Result<Pinger> {
        let subnet = ipnet::Ipv4Net::new(ip, prefix_len)
            .map_err(|e| crate::sys::Error::new(format!("{ip}/{prefix_len}: {e}")))?
            .trunc();
        let ns = std::fs::File::open(netns).context(format_args!("open {}", netns.display()))?;
        let opened = std::thread::spawn(move || -> Result<(OwnedFd, i32, [u8; 6])> {
            // SAFETY: `ns` is an open namespace file; setns changes only
            // this thread's network namespace, and the thread ends here.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(errno("setns"));
            }
            // SAFETY: plain socket(2); the fd is owned at once.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                )
            };
            if raw < 0 {
                return Err(errno("socket(AF_PACKET)"));
            }
            // SAFETY: `raw` is a new descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut r = ifreq("eth0");
            // SAFETY: SIOCGIFINDEX and SIOCGIFHWADDR read the name and
            // write into the ifreq, which outlives the calls.
            if unsafe { libc::ioctl(raw, libc::SIOCGIFINDEX, &mut r) } != 0 {
                return Err(errno("SIOCGIFINDEX eth0"));
            }
            let ifindex = i32::from_ne_bytes(r.data[..4].try_into().expect("4 bytes"));
            let mut r = ifreq("eth0");
            // SAFETY: as above.
            if unsafe { libc::ioctl(raw, libc::SIOCGIFHWADDR, &mut r) } != 0 {
                return Err(errno("SIOCGIFHWADDR eth0"));
            }
            // struct sockaddr: sa_family (2 bytes), then the address.
            let mac: [u8; 6] = r.data[2..8].try_into().expect("6 bytes");
            // SAFETY: a zeroed sockaddr_ll is valid; bind reads it only.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = ifindex;
            // SAFETY: `sll` is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    raw,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(errno("bind(AF_PACKET, eth0)"));
            }
            Ok((fd, ifindex, mac))
        })
        .join()
        .map_err(|_| crate::sys::Error::new("the pinger's thread panicked"))??;
        Ok(Pinger {
            fd: opened.0,
            ifindex: opened.1,
            mac: opened.2,
            ip,
            subnet,
            gateway,
            id: (std::process::id() & 0xffff) as u16,
        })
    }

    fn send(&self, dst: [u8; 6], frame: &[u8]) -> Result<()> {
        // SAFETY: a zeroed sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&dst);
        // SAFETY: `frame` and `sll` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(errno("sendto(AF_PACKET)"));
        }
        Ok(())
    }

    /// Drops whatever the socket queued so far (answers to an earlier
    /// round must not count in this one).
    fn drain(&self) {
        let mut buf = [0u8; 2048];
        // SAFETY: `buf` is valid for its length; MSG_DONTWAIT never blocks.
        while unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }

    /// Pings `target` every `step` until it answers or `timeout` passes;
    /// times are counted from `t0` (which may be before this call).
    pub fn first_answer(
        &mut self,
        target: Ipv4Addr,
        t0: Instant,
        step: Duration,
        timeout: Duration,
    ) -> Result<FirstAnswer> {
        self.drain();
        self.id = self.id.wrapping_add(1);
        let hop = if self.subnet.contains(&target) {
            target
        } else {
            self.gateway
        };
        let mut target_mac: Option<[u8; 6]> = None;
        let mut arp_at = None;
        let mut seq: u16 = 0;
        let mut sent = 0u32;
        let mut next = Instant::now();
        let mut buf = [0u8; 2048];
        loop {
            let now = Instant::now();
            if now >= next {
                self.send([0xff; 6], &arp_request(self.mac, self.ip, hop))?;
                sent += 1;
                if let Some(mac) = target_mac {
                    seq = seq.wrapping_add(1);
                    self.send(
                        mac,
                        &echo_request(self.mac, mac, self.ip, target, self.id, seq),
                    )?;
                    sent += 1;
                }
                next = now + step;
            }
            if now.duration_since(t0) > timeout {
                return bail(format!(
                    "{target} did not answer within {} ms ({})",
                    timeout.as_millis(),
                    if target_mac.is_some() {
                        "ARP answered, no echo reply"
                    } else {
                        "no ARP answer"
                    }
                ));
            }
            let wait = next.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // poll's resolution is a millisecond; a zero wait still looks once.
            let ms = wait.as_micros().div_ceil(1000).min(1000) as i32;
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return bail(format!("poll: {e}"));
                }
            }
            loop {
                // SAFETY: `buf` is valid for its length; never blocks.
                let n = unsafe {
                    libc::recv(
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    break;
                }
                match parse(&buf[..n as usize], self.ip, hop, target, self.id) {
                    Some(Answer::Arp(mac)) if target_mac.is_none() => {
                        arp_at = Some(t0.elapsed());
                        target_mac = Some(mac);
                        next = Instant::now();
                    }
                    Some(Answer::Echo) => {
                        let echo = t0.elapsed();
                        return Ok(FirstAnswer {
                            arp: arp_at.unwrap_or(echo),
                            echo,
                            sent,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Arp([u8; 6]),
    Echo,
}

fn eth(dst: [u8; 6], src: [u8; 6], ty: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ty.to_be_bytes());
    f
}

fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = eth([0xff; 6], mac, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(
    mac: [u8; 6],
    dst_mac: [u8; 6],
    ip: Ipv4Addr,
    target: Ipv4Addr,
    id: u16,
    seq: u16,
) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"weftbnch");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&seq.to_be_bytes()); // identification
    iph.extend_from_slice(&[0x40, 0, 64, 1, 0, 0]); // DF, TTL 64, ICMP
    iph.extend_from_slice(&ip.octets());
    iph.extend_from_slice(&target.octets());
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(dst_mac, mac, ETH_P_IP);
    f.extend_from_slice(&iph);
    f.extend_from_slice(&icmp);
    f
}

/// An ARP reply from `hop` to `me`, or an echo reply of ours from `target`.
fn parse(f: &[u8], me: Ipv4Addr, hop: Ipv4Addr, target: Ipv4Addr, id: u16) -> Option<Answer> {
    let ty = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let p = f.get(14..)?;
    match ty {
        ETH_P_ARP => {
            let (op, sha, spa, tpa) = (
                u16::from_be_bytes([*p.get(6)?, *p.get(7)?]),
                p.get(8..14)?,
                p.get(14..18)?,
                p.get(24..28)?,
            );
            (op == 2 && spa == hop.octets() && tpa == me.octets())
                .then(|| Answer::Arp(sha.try_into().expect("6 bytes")))
        }
        ETH_P_IP => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            let (proto, src, dst) = (*p.get(9)?, p.get(12..16)?, p.get(16..20)?);
            let icmp = p.get(ihl..)?;
            (proto == 1
                && src == target.octets()
                && dst == me.octets()
                && *icmp.first()? == 0
                && icmp.get(4..6)? == id.to_be_bytes())
            .then_some(Answer::Echo)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0x77, 10, 0, 2, 2];
    const B: [u8; 6] = [2, 0x77, 10, 0, 2, 3];

    #[test]
    fn checksums_as_rfc1071() {
        // The example of RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        assert_eq!(checksum(&[0, 1, 0xf2, 3, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        // A header with its checksum in place sums to zero.
        let f = echo_request(
            A,
            B,
            "10.0.2.2".parse().unwrap(),
            "10.0.2.3".parse().unwrap(),
            7,
            1,
        );
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(checksum(&f[34..]), 0);
    }

    #[test]
    fn reads_answers_and_nothing_else() {
        let (me, them) = ("10.0.2.2".parse().unwrap(), "10.0.2.3".parse().unwrap());
        // Our own request is not an answer.
        assert_eq!(parse(&arp_request(A, me, them), me, them, them, 7), None);
        // Their reply: op 2, sender them at B, target us.
        let mut reply = arp_request(B, them, me);
        reply[21] = 2;
        assert_eq!(parse(&reply, me, them, them, 7), Some(Answer::Arp(B)));
        // An echo reply with our id; not with another id, not a request.
        let mut echo = echo_request(B, A, them, me, 7, 1);
        assert_eq!(parse(&echo, me, them, them, 7), None); // type 8: a request
        echo[34] = 0;
        assert_eq!(parse(&echo, me, them, them, 7), Some(Answer::Echo));
        assert_eq!(parse(&echo, me, them, them, 8), None);
        assert_eq!(parse(&echo[..20], me, them, them, 7), None);
    }
}
