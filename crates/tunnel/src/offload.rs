//! Segmentation and coalescing between the TUN device's 64 KB TCP segments
//! and MTU-sized datagrams, without copying payload and without computing
//! TCP or UDP checksums.
//!
//! Why no checksums: both ends of the tunnel are weft. The datagrams carry
//! the inner packets under the outer UDP checksum (computed by the NIC, or
//! not needed at all on a veth), as kernel VXLAN does; the receiving end
//! hands every TCP and UDP packet to its TUN device as CHECKSUM_PARTIAL
//! (virtio NEEDS_CSUM with the pseudo-header sum in the field), so the
//! kernel completes the checksum only if the packet ever leaves on a device
//! that needs one. The sender therefore never computes a TCP checksum
//! (splitting leaves the field alone) and the receiver never verifies one.
//!
//! - [`split`] turns one read from the TUN device (virtio header + packet)
//!   into datagrams described as (header, payload range) pairs: headers are
//!   rewritten into a small arena, payloads stay where the read put them,
//!   and the UDP side sends both with one iovec each.
//! - [`Coalescer`] merges consecutive TCP segments of one flow back into one
//!   large packet and writes it to the TUN device with `writev`, whose
//!   iovecs point at the received datagrams.

use std::io;
use std::os::fd::RawFd;

/// Size of `struct virtio_net_hdr` (the TUN device's default).
pub(crate) const VNET_HDR_LEN: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_ECN: u8 = 0x80;

const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// Largest header (IPv4 and TCP, both with options) we rewrite.
pub(crate) const MAX_HDR: usize = 120;
/// Largest IPv4 packet.
const MAX_IP: usize = 65535;

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Tells the TUN device which offloads we handle: checksum offload and
/// IPv4 TSO (with ECN) only, so it never hands us IPv6 or UDP segments we
/// would have to split.
pub(crate) fn set_offloads(fd: RawFd) -> io::Result<()> {
    let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, flags as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The fields of `struct virtio_net_hdr` we use (little-endian on the wire:
/// the TUN device uses the host's order, and weft runs on little-endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> VnetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    fn write(&self, hdr_len: u16, out: &mut [u8; VNET_HDR_LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// One's-complement sum of `b` (not folded, not inverted).
fn sum(b: &[u8], mut acc: u64) -> u64 {
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes(c.try_into().expect("8 bytes"));
        let (s, carry) = acc.overflowing_add(v);
        acc = s + carry as u64;
    }
    let mut rest = chunks.remainder();
    while rest.len() >= 2 {
        acc += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let [last] = rest {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Recomputes the IPv4 header checksum in place.
fn ip_checksum(ip: &mut [u8], ihl: usize) {
    ip[10] = 0;
    ip[11] = 0;
    let c = !fold(sum(&ip[..ihl], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The folded (not inverted) pseudo-header sum, which is what a
/// CHECKSUM_PARTIAL packet carries in its checksum field.
fn pseudo(ip: &[u8], proto: u8, l4_len: usize) -> u16 {
    let acc = sum(&ip[12..20], u64::from(proto) + l4_len as u64);
    fold(acc)
}

/// An IPv4 packet's header lengths, if it is one we understand.
struct Ip4 {
    ihl: usize,
    proto: u8,
    fragment: bool,
}

fn ip4(p: &[u8]) -> Option<Ip4> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl < 20 || p.len() < ihl {
        return None;
    }
    let frag = u16::from_be_bytes([p[6], p[7]]);
    Some(Ip4 {
        ihl,
        proto: p[9],
        fragment: frag & 0x3fff != 0,
    })
}

fn tcp_hdr_len(p: &[u8], ihl: usize) -> Option<usize> {
    let thl = usize::from(*p.get(ihl + 12)? >> 4) * 4;
    (thl >= 20 && p.len() >= ihl + thl).then_some(thl)
}

/// Why a read from the TUN device could not be sent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SplitError {
    Malformed,
    /// The header arena has no room for this read's headers from
    /// `arena_at` on (send what is batched, then split at 0).
    NoRoom,
}

/// One datagram of a split: `hdr` bytes at `hdr_at` in the header arena
/// (0 if the datagram is a single unchanged range), then the payload range
/// of the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Datagram {
    pub hdr_at: usize,
    pub hdr: usize,
    pub payload_at: usize,
    pub payload: usize,
}

impl Datagram {
    pub fn len(&self) -> usize {
        self.hdr + self.payload
    }
}

/// Splits one TUN read (`read` = virtio header + packet) into datagrams,
/// writing rewritten headers into `arena` from `arena_at` on. Returns the
/// number of arena bytes used; `out` receives the datagrams in order.
///
/// A packet without GSO goes out as is (its payload range is the whole
/// packet); one marked for checksum offload other than TCP/UDP over IPv4
/// gets its checksum computed here, the one case a receiver could not
/// complete.
pub(crate) fn split(
    read: &mut [u8],
    arena: &mut [u8],
    arena_at: usize,
    out: &mut Vec<Datagram>,
) -> Result<usize, SplitError> {
    if read.len() <= VNET_HDR_LEN {
        return Err(SplitError::Malformed);
    }
    let vh = VnetHdr::parse(&read[..VNET_HDR_LEN]);
    let base = VNET_HDR_LEN;
    let pkt = &mut read[base..];
    if vh.gso_type & !GSO_ECN == GSO_NONE {
        if vh.flags & F_NEEDS_CSUM != 0 {
            let start = usize::from(vh.csum_start);
            let field = start + usize::from(vh.csum_offset);
            let standard = ip4(pkt).is_some_and(|ip| {
                !ip.fragment
                    && start == ip.ihl
                    && ((ip.proto == TCP && vh.csum_offset == 16)
                        || (ip.proto == UDP && vh.csum_offset == 6))
            });
            if !standard {
                if field + 2 > pkt.len() {
                    return Err(SplitError::Malformed);
                }
                let c = !fold(sum(&pkt[start..], 0));
                pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
            }
        }
        out.push(Datagram {
            hdr_at: 0,
            hdr: 0,
            payload_at: base,
            payload: pkt.len(),
        });
        return Ok(0);
    }
    if vh.gso_type & !GSO_ECN != GSO_TCPV4 {
        return Err(SplitError::Malformed);
    }
    let ip = ip4(pkt).ok_or(SplitError::Malformed)?;
    if ip.proto != TCP {
        return Err(SplitError::Malformed);
    }
    let thl = tcp_hdr_len(pkt, ip.ihl).ok_or(SplitError::Malformed)?;
    let hdr = ip.ihl + thl;
    let mss = usize::from(vh.gso_size);
    if mss == 0 || hdr > MAX_HDR {
        return Err(SplitError::Malformed);
    }
    let payload = pkt.len() - hdr;
    let segs = payload.div_ceil(mss).max(1);
    if arena.len() < arena_at + segs * hdr {
        return Err(if arena.len() >= segs * hdr {
            SplitError::NoRoom
        } else {
            SplitError::Malformed
        });
    }
    let id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq = u32::from_be_bytes(pkt[ip.ihl + 4..ip.ihl + 8].try_into().expect("4 bytes"));
    let flags = pkt[ip.ihl + 13];
    for i in 0..segs {
        let at = arena_at + i * hdr;
        let len = mss.min(payload - i * mss);
        let h = &mut arena[at..at + hdr];
        h.copy_from_slice(&pkt[..hdr]);
        h[2..4].copy_from_slice(&((hdr + len) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        ip_checksum(h, ip.ihl);
        let t = ip.ihl;
        h[t + 4..t + 8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut f = flags;
        if i + 1 < segs {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        h[t + 13] = f;
        out.push(Datagram {
            hdr_at: at,
            hdr,
            payload_at: base + hdr + i * mss,
            payload: len,
        });
    }
    Ok(segs * hdr)
}

/// The flow a coalesced packet is being built for.
struct Pending {
    /// Rewritten header of the first segment.
    hdr: [u8; MAX_HDR],
    hdr_len: usize,
    ihl: usize,
    /// Payload size of the first segment (the GSO size if more follow).
    mss: usize,
    payload: usize,
    segments: usize,
    next_seq: u32,
    /// A shorter segment or PSH ended the run.
    closed: bool,
    psh: bool,
}

/// Writes received packets to the TUN device, merging consecutive TCP
/// segments of one flow into one large packet (as GRO would), with
/// CHECKSUM_PARTIAL set on every TCP and UDP packet (see the module
/// documentation).
pub(crate) struct Coalescer {
    pending: Option<Pending>,
    /// Payload slices of the pending packet, as iovecs (raw pointers into
    /// the caller's buffers; valid only within one [`Coalescer::write_all`]).
    iovs: Vec<libc::iovec>,
    vnet: [u8; VNET_HDR_LEN],
    single_hdr: [u8; MAX_HDR],
    pub written: u64,
    pub errors: u64,
}

// SAFETY: the raw pointers in `iovs` are only set and used within one
// write_all call; between calls they are dangling and never read.
unsafe impl Send for Coalescer {}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer {
            pending: None,
            iovs: Vec::with_capacity(80),
            vnet: [0; VNET_HDR_LEN],
            single_hdr: [0; MAX_HDR],
            written: 0,
            errors: 0,
        }
    }

    /// Writes every packet of `packets` (in order) to `fd`, merging what can
    /// be merged. The slices must stay untouched until this returns, which
    /// their borrow guarantees.
    pub fn write_all<'a>(&mut self, fd: RawFd, packets: impl Iterator<Item = &'a [u8]>) {
        self.pending = None;
        self.iovs.clear();
        for p in packets {
            if !self.try_append(p) {
                self.flush(fd);
                self.start(fd, p);
            }
        }
        self.flush(fd);
    }

    /// Appends `p` to the pending packet if it continues its flow.
    fn try_append(&mut self, p: &[u8]) -> bool {
        let Some(pd) = self.pending.as_mut() else {
            return false;
        };
        if pd.closed || p.len() < pd.hdr_len || pd.segments >= 64 {
            return false;
        }
        let (h, ihl) = (&pd.hdr, pd.ihl);
        let t = ihl;
        // Same IPv4 header (version, length, TOS, flags, TTL, protocol,
        // addresses), same ports, ack, header length and options; only
        // ACK or ACK+PSH; the next sequence number.
        if p[0] != h[0]
            || p[1] != h[1]
            || p[6..10] != h[6..10]
            || p[12..20] != h[12..20]
            || p[t..t + 4] != h[t..t + 4]
            || p[t + 8..t + 13] != h[t + 8..t + 13]
            || p[t + 20..pd.hdr_len] != h[t + 20..pd.hdr_len]
        {
            return false;
        }
        let flags = p[t + 13];
        if flags & !TCP_PSH != TCP_ACK {
            return false;
        }
        let seq = u32::from_be_bytes(p[t + 4..t + 8].try_into().expect("4 bytes"));
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if seq != pd.next_seq || total != p.len() {
            return false;
        }
        let len = p.len() - pd.hdr_len;
        if len == 0 || len > pd.mss || pd.hdr_len + pd.payload + len > MAX_IP {
            return false;
        }
        self.iovs.push(libc::iovec {
            iov_base: p[pd.hdr_len..].as_ptr() as *mut libc::c_void,
            iov_len: len,
        });
        pd.payload += len;
        pd.segments += 1;
        pd.next_seq = seq.wrapping_add(len as u32);
        if len < pd.mss || flags & TCP_PSH != 0 {
            pd.closed = true;
            pd.psh |= flags & TCP_PSH != 0;
        }
        true
    }

    /// Starts a new pending packet with `p`, or writes `p` at once if it
    /// cannot be the start of a merge.
    fn start(&mut self, fd: RawFd, p: &[u8]) {
        let Some(ip) = ip4(p) else {
            self.write_plain(fd, p);
            return;
        };
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if ip.fragment || total != p.len() {
            self.write_plain(fd, p);
            return;
        }
        match ip.proto {
            TCP => {
                let Some(thl) = tcp_hdr_len(p, ip.ihl) else {
                    self.write_plain(fd, p);
                    return;
                };
                let hdr_len = ip.ihl + thl;
                let len = p.len() - hdr_len;
                let flags = p[ip.ihl + 13];
                if hdr_len > MAX_HDR {
                    self.write_plain(fd, p);
                    return;
                }
                let mut hdr = [0u8; MAX_HDR];
                hdr[..hdr_len].copy_from_slice(&p[..hdr_len]);
                let seq = u32::from_be_bytes(p[ip.ihl + 4..ip.ihl + 8].try_into().expect("4"));
                // Like the kernel's GRO, never merge packets with IP options
                // (each may carry different ones).
                let mergeable = len > 0 && flags == TCP_ACK && ip.ihl == 20;
                self.iovs.clear();
                // Two slots for the virtio and packet headers, set at flush.
                self.iovs.push(iov(&[]));
                self.iovs.push(iov(&[]));
                self.iovs.push(iov(&p[hdr_len..]));
                self.pending = Some(Pending {
                    hdr,
                    hdr_len,
                    ihl: ip.ihl,
                    mss: len,
                    payload: len,
                    segments: 1,
                    next_seq: seq.wrapping_add(len as u32),
                    closed: !mergeable,
                    psh: false,
                });
            }
            UDP if p.len() >= ip.ihl + 8 && p[ip.ihl + 6..ip.ihl + 8] != [0, 0] => {
                // A UDP checksum is set: hand it over as partial too.
                let n = ip.ihl + 8;
                self.single_hdr[..n].copy_from_slice(&p[..n]);
                let c = pseudo(p, UDP, p.len() - ip.ihl);
                self.single_hdr[ip.ihl + 6..ip.ihl + 8].copy_from_slice(&c.to_be_bytes());
                let vh = VnetHdr {
                    flags: F_NEEDS_CSUM,
                    gso_type: GSO_NONE,
                    gso_size: 0,
                    csum_start: ip.ihl as u16,
                    csum_offset: 6,
                };
                vh.write(n as u16, &mut self.vnet);
                let iov = [iov(&self.vnet), iov(&self.single_hdr[..n]), iov(&p[n..])];
                let ok = writev(fd, &iov);
                self.count(ok);
            }
            _ => self.write_plain(fd, p),
        }
    }

    /// Writes the pending packet, if any.
    fn flush(&mut self, fd: RawFd) {
        let Some(mut pd) = self.pending.take() else {
            return;
        };
        let (ihl, hl) = (pd.ihl, pd.hdr_len);
        let h = &mut pd.hdr;
        h[2..4].copy_from_slice(&((hl + pd.payload) as u16).to_be_bytes());
        ip_checksum(h, ihl);
        if pd.psh {
            h[ihl + 13] |= TCP_PSH;
        }
        let c = pseudo(h, TCP, hl - ihl + pd.payload);
        h[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
        let vh = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if pd.segments > 1 { GSO_TCPV4 } else { GSO_NONE },
            gso_size: if pd.segments > 1 { pd.mss as u16 } else { 0 },
            csum_start: ihl as u16,
            csum_offset: 16,
        };
        vh.write(hl as u16, &mut self.vnet);
        // The first two iovecs were reserved for the headers.
        self.iovs[0] = iov(&self.vnet);
        self.iovs[1] = iov(&pd.hdr[..hl]);
        let ok = writev(fd, &self.iovs);
        self.count(ok);
        self.iovs.clear();
    }

    /// A packet we do not touch: no offload information.
    fn write_plain(&mut self, fd: RawFd, p: &[u8]) {
        self.vnet = [0; VNET_HDR_LEN];
        let iov = [iov(&self.vnet), iov(p)];
        let ok = writev(fd, &iov);
        self.count(ok);
    }

    fn count(&mut self, ok: bool) {
        if ok {
            self.written += 1;
        } else {
            self.errors += 1;
        }
    }
}

/// One packet to the TUN device. A refused packet is dropped (and counted
/// by the caller), as a full device queue would drop it.
fn writev(fd: RawFd, iov: &[libc::iovec]) -> bool {
    // SAFETY: every iovec points into a live borrowed slice.
    let rc = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        tracing::debug!(error = %e, "writing to the TUN device failed");
        return false;
    }
    true
}

fn iov(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    }
}

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
