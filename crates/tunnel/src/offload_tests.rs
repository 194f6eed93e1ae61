// Tests of src/offload.rs.
//
// Packets are built and checked with helpers written independently of the
// module's own checksum code. The Coalescer writes to one end of an AF_UNIX
// SOCK_SEQPACKET pair, so every writev arrives as one message with its
// boundaries kept.

use super::*;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SRC: [u8; 4] = [10, 1, 0, 2];
const DST: [u8; 4] = [10, 2, 7, 3];
const TCP_SYN: u8 = 0x02;
const TCP_ECE: u8 = 0x40;
/// NOP, NOP, timestamp (kind 8, length 10, TSval, TSecr).
const TS_OPT: [u8; 12] = [1, 1, 8, 10, 0, 0x01, 0x23, 0x45, 0, 0x06, 0x78, 0x9a];
/// What the test packets carry in their TCP checksum field, so that a
/// rewritten (or untouched) field is recognisable.
const MARK: u16 = 0xc5c5;

/// Folded one's-complement sum of `b` (16-bit words, big-endian).
fn csum(b: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    for w in b.chunks(2) {
        acc += (u64::from(w[0]) << 8) | u64::from(w.get(1).copied().unwrap_or(0));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}

/// The pseudo-header of IPv4 packet `p` for protocol `proto`.
fn pseudo_hdr(p: &[u8], proto: u8) -> Vec<u8> {
    let l4 = usize::from(be16(p, 2)) - 20;
    let mut h = p[12..20].to_vec();
    h.extend([0, proto]);
    h.extend((l4 as u16).to_be_bytes());
    h
}

/// Recognisable, non-periodic payload bytes.
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// An IPv4 packet (20-byte header, valid checksum) around `l4`.
fn ipv4(proto: u8, id: u16, frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend(((20 + l4.len()) as u16).to_be_bytes());
    p.extend(id.to_be_bytes());
    p.extend(frag.to_be_bytes());
    p.extend([64, proto, 0, 0]);
    p.extend(SRC);
    p.extend(DST);
    let c = !csum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend(l4);
    p
}

/// A TCP segment over IPv4 (DF set), described field by field.
#[derive(Clone)]
struct Tcp {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    id: u16,
    frag: u16,
    opts: Vec<u8>,
    payload: Vec<u8>,
}

impl Tcp {
    fn new(seq: u32, payload: Vec<u8>) -> Tcp {
        Tcp {
            sport: 40000,
            dport: 5201,
            seq,
            ack: 0x0bad_cafe,
            flags: TCP_ACK,
            id: 100,
            frag: 0x4000,
            opts: TS_OPT.to_vec(),
            payload,
        }
    }

    fn hdr_len(&self) -> usize {
        40 + self.opts.len()
    }

    fn build(&self) -> Vec<u8> {
        let mut t = self.sport.to_be_bytes().to_vec();
        t.extend(self.dport.to_be_bytes());
        t.extend(self.seq.to_be_bytes());
        t.extend(self.ack.to_be_bytes());
        t.extend([(((20 + self.opts.len()) / 4) << 4) as u8, self.flags]);
        t.extend(502u16.to_be_bytes());
        t.extend(MARK.to_be_bytes());
        t.extend([0, 0]);
        t.extend(&self.opts);
        t.extend(&self.payload);
        ipv4(TCP, self.id, self.frag, &t)
    }
}

/// Consecutive full-flow segments with payloads of `sizes` bytes.
fn flow(seq0: u32, sizes: &[usize]) -> Vec<Tcp> {
    let mut seq = seq0;
    let mut segs = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut s = Tcp::new(seq, pattern(n, seq));
        s.id = 100 + i as u16;
        seq = seq.wrapping_add(n as u32);
        segs.push(s);
    }
    segs
}

fn build_all(segs: &[Tcp]) -> Vec<Vec<u8>> {
    segs.iter().map(Tcp::build).collect()
}

/// A `struct virtio_net_hdr` (little-endian fields).
fn vnet(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, start: u16, offset: u16) -> Vec<u8> {
    let mut v = vec![flags, gso_type];
    for x in [hdr_len, gso_size, start, offset] {
        v.extend(x.to_le_bytes());
    }
    v
}

/// What the TUN device would hand us for super-packet `seg` at `mss`.
fn gso_read(gso_type: u8, seg: &Tcp, mss: u16) -> Vec<u8> {
    let mut r = vnet(F_NEEDS_CSUM, gso_type, seg.hdr_len() as u16, mss, 20, 16);
    r.extend(seg.build());
    r
}

/// Splits `read` into an arena of `arena_len` bytes from `at` on.
fn run_split(
    read: &mut [u8],
    arena_len: usize,
    at: usize,
) -> (Result<usize, SplitError>, Vec<u8>, Vec<Datagram>) {
    let mut arena = vec![0xee; arena_len];
    let mut out = Vec::new();
    let r = split(read, &mut arena, at, &mut out);
    (r, arena, out)
}

/// A datagram as the peer receives it: rewritten header, then payload.
fn datagram(read: &[u8], arena: &[u8], d: &Datagram) -> Vec<u8> {
    let mut p = arena[d.hdr_at..d.hdr_at + d.hdr].to_vec();
    p.extend(&read[d.payload_at..d.payload_at + d.payload]);
    p
}

/// Panics at the first difference, without printing 64 KB buffers.
fn assert_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: byte {i} is {:#04x}, expected {:#04x}",
            actual[i], expected[i]
        );
    }
    assert_eq!(actual.len(), expected.len(), "{what}: length");
}

fn assert_msgs(actual: &[Vec<u8>], expected: &[Vec<u8>]) {
    let lens = |m: &[Vec<u8>]| m.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(lens(actual), lens(expected), "message lengths");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_bytes(a, e, &format!("message {i}"));
    }
}

/// Feeds `packets` to one `Coalescer::write_all` and returns the messages
/// read from the other end of the socket pair.
fn coalesce(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    let (tx, rx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Read concurrently: a few 64 KB messages fill the socket buffer.
    let reader = std::thread::spawn(move || {
        let mut msgs = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes. MSG_TRUNC makes
            // recv return a message's full length, to detect truncation.
            let n = unsafe {
                libc::recv(
                    rx.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            assert!(n >= 0, "recv: {}", io::Error::last_os_error());
            let n = n as usize;
            if n == 0 {
                return msgs;
            }
            assert!(n <= buf.len(), "message of {n} bytes truncated");
            msgs.push(buf[..n].to_vec());
        }
    });
    let mut c = Coalescer::new();
    c.write_all(tx.as_raw_fd(), packets.iter().map(Vec::as_slice));
    drop(tx);
    let msgs = reader.join().expect("reader thread");
    assert_eq!((c.written, c.errors), (msgs.len() as u64, 0), "counters");
    msgs
}

/// The message the Coalescer should write for `segs` merged into one packet:
/// the first's header with the total length, PSH if any had it, and the
/// pseudo-header sum in the TCP checksum field; CHECKSUM_PARTIAL, and GSO
/// at the first's payload size if there are several.
fn merged(segs: &[Tcp]) -> Vec<u8> {
    let mut m = segs[0].clone();
    m.payload = segs.iter().flat_map(|s| s.payload.clone()).collect();
    m.flags |= segs.iter().fold(0, |f, s| f | s.flags) & TCP_PSH;
    let mut p = m.build();
    let c = csum(&pseudo_hdr(&p, TCP));
    p[36..38].copy_from_slice(&c.to_be_bytes());
    let hl = m.hdr_len() as u16;
    let mut msg = if segs.len() > 1 {
        vnet(
            F_NEEDS_CSUM,
            GSO_TCPV4,
            hl,
            segs[0].payload.len() as u16,
            20,
            16,
        )
    } else {
        vnet(F_NEEDS_CSUM, 0, hl, 0, 20, 16)
    };
    msg.extend(p);
    msg
}

/// A packet written as is, with an all-zero virtio header.
fn plain(p: &[u8]) -> Vec<u8> {
    let mut m = vec![0; VNET_HDR_LEN];
    m.extend(p);
    m
}

/// Checks a split of a super-packet with `payload` bytes at `mss`: one
/// datagram per `mss` bytes, each header equal to the one the sender's
/// kernel would have built (length, incrementing IP id, valid IP checksum,
/// advancing seq, CWR first only, PSH/FIN last only) and its payload range
/// the right bytes of the read.
fn check_split(gso_type: u8, payload: usize, mss: usize, flags: u8, seq0: u32, id0: u16) {
    let mut seg = Tcp::new(seq0, pattern(payload, 7));
    seg.flags = flags;
    seg.id = id0;
    let hl = seg.hdr_len();
    let mut read = gso_read(gso_type, &seg, mss as u16);
    let orig = read.clone();
    let n = payload.div_ceil(mss);
    let at = 7;
    let (r, arena, out) = run_split(&mut read, at + n * hl, at);
    assert_eq!(r, Ok(n * hl));
    assert_eq!(out.len(), n);
    assert_bytes(&read, &orig, "the read is left alone");
    for (i, d) in out.iter().enumerate() {
        let len = mss.min(payload - i * mss);
        let want = Datagram {
            hdr_at: at + i * hl,
            hdr: hl,
            payload_at: VNET_HDR_LEN + hl + i * mss,
            payload: len,
        };
        assert_eq!(*d, want, "datagram {i}");
        assert_eq!(d.len(), hl + len);
        let h = &arena[d.hdr_at..d.hdr_at + hl];
        assert_eq!(usize::from(be16(h, 2)), hl + len, "total length {i}");
        assert_eq!(be16(h, 4), id0.wrapping_add(i as u16), "IP id {i}");
        assert_eq!(csum(&h[..20]), 0xffff, "IP checksum {i}");
        assert_eq!(be32(h, 24), seq0.wrapping_add((i * mss) as u32), "seq {i}");
        let mut f = flags;
        if i > 0 {
            f &= !TCP_CWR;
        }
        if i + 1 < n {
            f &= !(TCP_PSH | TCP_FIN);
        }
        assert_eq!(h[33], f, "flags {i}");
        // Everything else is the original header, checksum field included.
        let mut expect = seg.clone();
        expect.seq = seq0.wrapping_add((i * mss) as u32);
        expect.id = id0.wrapping_add(i as u16);
        expect.flags = f;
        expect.payload = seg.payload[i * mss..i * mss + len].to_vec();
        assert_bytes(
            &datagram(&read, &arena, d),
            &expect.build(),
            &format!("datagram {i}"),
        );
    }
    assert!(
        arena[..at].iter().all(|&b| b == 0xee),
        "arena before arena_at untouched"
    );
}

// A TSO super-packet whose payload is a multiple of the MSS: three full
// segments; seq and IP id wrap around; CWR on the first only, PSH and FIN
// on the last only.
#[test]
fn split_gso_even() {
    let flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR;
    check_split(GSO_TCPV4, 3000, 1000, flags, 0xffff_fc00, 0xfffe);
}

// A payload that is not a multiple of the MSS: the last segment is short.
// Also the ECN variant of the GSO type, and a one-segment "super-packet".
#[test]
fn split_gso_short_last() {
    check_split(GSO_TCPV4, 2500, 1000, TCP_ACK | TCP_PSH, 1, 9);
    check_split(
        GSO_TCPV4 | GSO_ECN,
        4001,
        1448,
        TCP_ACK | TCP_CWR | TCP_ECE,
        1 << 31,
        0,
    );
    check_split(GSO_TCPV4, 700, 1448, TCP_ACK | TCP_PSH | TCP_CWR, 5, 5);
}

// A read without GSO is one datagram covering the whole packet (no arena
// header); a standard TCP or UDP CHECKSUM_PARTIAL is left for the receiver.
#[test]
fn split_without_gso() {
    let seg = Tcp::new(1, pattern(300, 1));
    let mut udp = vec![0x30, 0x39, 0x12, 0xb5, 0, 108, 0x12, 0x34];
    udp.extend(pattern(100, 2));
    for (vh, pkt) in [
        (vnet(0, 0, 0, 0, 0, 0), seg.build()),
        (vnet(F_NEEDS_CSUM, 0, 52, 0, 20, 16), seg.build()),
        (vnet(F_NEEDS_CSUM, 0, 28, 0, 20, 6), ipv4(UDP, 1, 0, &udp)),
    ] {
        let mut read = [vh, pkt.clone()].concat();
        let orig = read.clone();
        let (r, arena, out) = run_split(&mut read, 200, 50);
        assert_eq!(r, Ok(0));
        let all = Datagram {
            hdr_at: 0,
            hdr: 0,
            payload_at: VNET_HDR_LEN,
            payload: pkt.len(),
        };
        assert_eq!(out, [all]);
        assert_bytes(&read, &orig, "read");
        assert!(arena.iter().all(|&b| b == 0xee), "arena untouched");
    }
}

// CHECKSUM_PARTIAL for anything but TCP or UDP over IPv4 (here a made-up
// protocol with its checksum at offset 2, TCP with csum_start past the TCP
// header, and a UDP first fragment) is completed in place: the
// one's-complement sum from csum_start to the end, seeded by what the field
// held, becomes 0xffff.
#[test]
fn split_completes_other_checksums() {
    let mut l4 = vec![0x99, 0x01, 0, 0];
    l4.extend(pattern(301, 3)); // odd, to cover the trailing byte
    let fake = ipv4(253, 1, 0, &l4);
    let tcp = Tcp::new(1, pattern(99, 4)).build();
    let mut udp = vec![0x30, 0x39, 0x12, 0xb5, 0, 208, 0, 0];
    udp.extend(pattern(100, 5));
    let udp_frag = ipv4(UDP, 1, 0x2000, &udp);
    for (pkt, start, offset, seed) in [
        (fake, 20u16, 2u16, 0u16),
        (tcp, 24, 16, 0x1234),
        (udp_frag, 20, 6, 0x4321),
    ] {
        let field = usize::from(start + offset);
        let mut read = [vnet(F_NEEDS_CSUM, 0, 0, 0, start, offset), pkt].concat();
        let at = VNET_HDR_LEN + field;
        read[at..at + 2].copy_from_slice(&seed.to_be_bytes());
        let orig = read.clone();
        let (r, _, out) = run_split(&mut read, 0, 0);
        assert_eq!(r, Ok(0));
        assert_eq!(out.len(), 1);
        let p = &read[VNET_HDR_LEN..];
        assert_eq!(
            csum(&[&seed.to_be_bytes()[..], &p[usize::from(start)..]].concat()),
            0xffff
        );
        assert_ne!(read[at..at + 2], orig[at..at + 2], "field written");
        read[at..at + 2].copy_from_slice(&orig[at..at + 2]);
        assert_bytes(&read, &orig, "nothing else changes");
    }
}

// Reads split cannot handle are Malformed, and add no datagram.
#[test]
fn split_rejects_malformed() {
    let seg = Tcp::new(1, pattern(3000, 5));
    let good = gso_read(GSO_TCPV4, &seg, 1000);
    let mut cases = vec![
        ("header only", good[..VNET_HDR_LEN].to_vec()),
        ("shorter than a header", good[..4].to_vec()),
        ("GSO UDP", gso_read(3, &seg, 1000)),
        ("GSO TCPv6", gso_read(4, &seg, 1000)),
        ("GSO UDP L4", gso_read(5, &seg, 1000)),
        ("mss 0", gso_read(GSO_TCPV4, &seg, 0)),
        ("truncated TCP header", good[..VNET_HDR_LEN + 40].to_vec()),
    ];
    let mut not_tcp = good.clone();
    not_tcp[VNET_HDR_LEN + 9] = UDP;
    cases.push(("GSO TCPv4 on UDP", not_tcp));
    let mut v6 = good.clone();
    v6[VNET_HDR_LEN] = 0x65;
    cases.push(("GSO TCPv4 on IPv6", v6));
    let mut far = vnet(F_NEEDS_CSUM, 0, 0, 0, 20, 2);
    far.extend(ipv4(253, 1, 0, &[1, 2, 3]));
    cases.push(("checksum field past the end", far));
    for (what, mut read) in cases {
        let (r, _, out) = run_split(&mut read, 4096, 0);
        assert_eq!(r, Err(SplitError::Malformed), "{what}");
        assert!(out.is_empty(), "{what}");
    }
    // The same good read splits.
    assert_eq!(run_split(&mut good.clone(), 4096, 0).0, Ok(3 * 52));
}

// An arena without room for this read's headers from arena_at on is NoRoom
// (and adds no datagram) if it would fit from 0, Malformed if it never could.
#[test]
fn split_no_room() {
    let seg = Tcp::new(1, pattern(3000, 6));
    let read = gso_read(GSO_TCPV4, &seg, 1000);
    let need = 3 * seg.hdr_len();
    let (r, _, out) = run_split(&mut read.clone(), need, 1);
    assert_eq!(r, Err(SplitError::NoRoom));
    assert!(out.is_empty());
    assert_eq!(run_split(&mut read.clone(), need, 0).0, Ok(need));
    assert_eq!(run_split(&mut read.clone(), need + 5, 5).0, Ok(need));
    assert_eq!(
        run_split(&mut read.clone(), need - 1, 0).0,
        Err(SplitError::Malformed)
    );
}

// Split a 64000-byte super-packet at 1448 and coalesce the datagrams: one
// GSO message, identical payload, PSH restored, and a CHECKSUM_PARTIAL
// field that, once completed as the kernel would, verifies.
#[test]
fn round_trip() {
    let mut seg = Tcp::new(0x7000_0000, pattern(64000, 8));
    seg.flags = TCP_ACK | TCP_PSH;
    let hl = seg.hdr_len();
    let mut read = gso_read(GSO_TCPV4, &seg, 1448);
    let (r, arena, out) = run_split(&mut read, 64 * MAX_HDR, 0);
    assert_eq!(r, Ok(45 * hl));
    let dgrams: Vec<_> = out.iter().map(|d| datagram(&read, &arena, d)).collect();
    let msgs = coalesce(&dgrams);
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(
        m[..VNET_HDR_LEN],
        vnet(F_NEEDS_CSUM, GSO_TCPV4, hl as u16, 1448, 20, 16)
    );
    let p = &m[VNET_HDR_LEN..];
    assert_eq!(usize::from(be16(p, 2)), hl + 64000);
    assert_eq!(p.len(), hl + 64000);
    assert_eq!(csum(&p[..20]), 0xffff, "IP checksum");
    assert_eq!(be16(p, 4), seg.id, "IP id of the first segment");
    assert_eq!(be32(p, 24), seg.seq);
    assert_eq!(p[33], TCP_ACK | TCP_PSH);
    assert_eq!(p[40..hl], TS_OPT);
    assert_bytes(&p[hl..], &seg.payload, "payload");
    // The field holds the folded, not inverted, pseudo-header sum...
    let mut ph = SRC.to_vec();
    ph.extend(DST);
    ph.extend([0, TCP]);
    ph.extend(((hl - 20 + 64000) as u16).to_be_bytes());
    assert_eq!(be16(p, 36), csum(&ph));
    let pseudo_sum = csum(&ph);
    // ...so summing from csum_start on and inverting completes it.
    let mut done = p.to_vec();
    let c = !csum(&p[20..]);
    done[36..38].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        csum(&[ph, done[20..].to_vec()].concat()),
        0xffff,
        "TCP checksum"
    );
    // The rest of the header is the super-packet's.
    let mut hdr = seg.build()[..hl].to_vec();
    hdr[36..38].copy_from_slice(&pseudo_sum.to_be_bytes());
    assert_bytes(&p[..hl], &hdr, "header");
}

// Consecutive segments of one flow merge; a lone segment still goes out
// CHECKSUM_PARTIAL (without GSO).
#[test]
fn coalesce_merges() {
    let segs = flow(0xffff_f000, &[1000, 1000, 1000]); // seq wraps
    assert_msgs(&coalesce(&build_all(&segs)), &[merged(&segs)]);
    let one = flow(1, &[1000]);
    assert_msgs(&coalesce(&build_all(&one)), &[merged(&one)]);
}

// Segments that do not continue the first one's flow are written apart.
#[test]
fn coalesce_keeps_apart() {
    let base = flow(1000, &[1000, 1000]);
    let (a, b) = (&base[0], &base[1]);
    type Change = fn(&mut Tcp);
    let change: &[(&str, Change)] = &[
        ("sequence gap", |s| s.seq += 1),
        ("sequence overlap", |s| s.seq -= 1),
        ("other source port", |s| s.sport += 1),
        ("other destination port", |s| s.dport += 1),
        ("other ack", |s| s.ack += 1),
        ("other options", |s| s.opts[7] ^= 1),
        ("no options", |s| s.opts.clear()),
        ("not DF", |s| s.frag = 0),
        ("SYN", |s| s.flags = TCP_SYN | TCP_ACK),
        ("FIN", |s| s.flags |= TCP_FIN),
        ("ECE", |s| s.flags |= TCP_ECE),
        ("CWR", |s| s.flags |= TCP_CWR),
        ("no ACK", |s| s.flags = TCP_PSH),
        ("pure ACK", |s| s.payload.clear()),
        ("longer than the first", |s| s.payload.push(1)),
    ];
    for (what, f) in change {
        let mut b2 = b.clone();
        f(&mut b2);
        let msgs = coalesce(&build_all(&[a.clone(), b2.clone()]));
        assert_eq!(msgs.len(), 2, "{what}");
        assert_msgs(&msgs, &[merged(std::slice::from_ref(a)), merged(&[b2])]);
    }
    // Other IPv4 header fields: TOS, TTL, protocol, addresses.
    for (what, i) in [
        ("TOS", 1),
        ("TTL", 8),
        ("protocol", 9),
        ("source", 12),
        ("destination", 19),
    ] {
        let mut p = b.build();
        p[i] ^= 0x10;
        p[10..12].fill(0);
        let c = !csum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let msgs = coalesce(&[a.build(), p]);
        assert_eq!(msgs.len(), 2, "{what}");
        assert_bytes(&msgs[0], &merged(std::slice::from_ref(a)), what);
    }
    // A packet longer than its IP header says (by one byte, so its length
    // past the TCP header is still the first's) is written as is.
    let mut short = b.clone();
    short.payload.pop();
    let mut long = short.build();
    long.push(0);
    let msgs = coalesce(&[a.build(), long.clone()]);
    assert_msgs(&msgs, &[merged(std::slice::from_ref(a)), plain(&long)]);
}

// A first segment that cannot start a merge (SYN, pure ACK, PSH, CWR) is
// written alone; the next full segment starts a new packet.
#[test]
fn coalesce_unmergeable_first() {
    let base = flow(1000, &[1000, 1000, 1000]);
    for (what, flags, len) in [
        ("SYN", TCP_SYN | TCP_ACK, 1000),
        ("pure ACK", TCP_ACK, 0),
        ("PSH", TCP_ACK | TCP_PSH, 1000),
        ("CWR", TCP_ACK | TCP_CWR, 1000),
    ] {
        let mut first = base[0].clone();
        first.flags = flags;
        first.payload.truncate(len);
        let mut rest = base[1..].to_vec();
        for s in &mut rest {
            s.seq = first.seq.wrapping_add(len as u32) + (s.seq - base[1].seq);
        }
        let mut segs = vec![first.clone()];
        segs.extend(rest.clone());
        let msgs = coalesce(&build_all(&segs));
        assert_eq!(msgs.len(), 2, "{what}");
        assert_msgs(&msgs, &[merged(&[first]), merged(&rest)]);
    }
}

// A shorter segment, or one with PSH, ends a run (PSH is kept); the
// following segment starts a new message.
#[test]
fn coalesce_run_ends() {
    let segs = flow(1, &[1000, 1000, 600, 1000, 1000]);
    let msgs = coalesce(&build_all(&segs));
    assert_msgs(&msgs, &[merged(&segs[..3]), merged(&segs[3..])]);

    let mut segs = flow(1, &[1000, 1000, 1000, 1000]);
    segs[1].flags |= TCP_PSH;
    let msgs = coalesce(&build_all(&segs));
    assert_eq!(msgs[0][VNET_HDR_LEN + 33], TCP_ACK | TCP_PSH);
    assert_msgs(&msgs, &[merged(&segs[..2]), merged(&segs[2..])]);

    // Two flows interleaved: nothing merges.
    let a = flow(1, &[1000, 1000]);
    let mut b = flow(5000, &[1000, 1000]);
    b.iter_mut().for_each(|s| s.sport = 7);
    let order = [a[0].clone(), b[0].clone(), a[1].clone(), b[1].clone()];
    let want: Vec<_> = order
        .iter()
        .map(|s| merged(std::slice::from_ref(s)))
        .collect();
    assert_msgs(&coalesce(&build_all(&order)), &want);
}

// ICMP, and anything that is not an IPv4 packet we understand (a runt cut
// inside the TCP header, arriving while a merge is open; an IPv6-looking
// scrap), is written untouched with an all-zero virtio header.
#[test]
fn coalesce_icmp_plain() {
    let mut echo = vec![8, 0, 0, 0, 0, 1, 0, 1];
    echo.extend(pattern(56, 9));
    let c = !csum(&echo);
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    let icmp = ipv4(1, 3, 0x4000, &echo);
    let segs = flow(1, &[1000, 1000]);
    let runt = flow(2001, &[1000])[0].build()[..30].to_vec();
    let junk = vec![0x60, 0, 0, 0, 1, 2, 3];
    let mut packets = vec![icmp.clone()];
    packets.extend(build_all(&segs));
    packets.extend([runt.clone(), icmp.clone(), junk.clone(), segs[0].build()]);
    let want = [
        plain(&icmp),
        merged(&segs),
        plain(&runt),
        plain(&icmp),
        plain(&junk),
        merged(&segs[..1]),
    ];
    assert_msgs(&coalesce(&packets), &want);
}

// UDP with a checksum goes out CHECKSUM_PARTIAL (csum_offset 6, the pseudo
// sum in the field, which completes to a valid checksum); UDP without one
// (checksum 0) is written untouched.
#[test]
fn coalesce_udp() {
    let mut udp = vec![0x30, 0x39, 0x12, 0xb5, 0, 0, 0, 0];
    udp.extend(pattern(333, 10));
    let len = udp.len() as u16;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    let no_csum = ipv4(UDP, 4, 0x4000, &udp);
    let mut with = no_csum.clone();
    let c = !csum(&[pseudo_hdr(&with, UDP), with[20..].to_vec()].concat());
    with[26..28].copy_from_slice(&c.to_be_bytes());

    let msgs = coalesce(&[with.clone(), no_csum.clone()]);
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1], plain(&no_csum));
    let m = &msgs[0];
    assert_eq!(m[..VNET_HDR_LEN], vnet(F_NEEDS_CSUM, 0, 28, 0, 20, 6));
    let p = &m[VNET_HDR_LEN..];
    let ph = pseudo_hdr(&with, UDP);
    assert_eq!(be16(p, 26), csum(&ph), "pseudo-header sum");
    let mut done = p.to_vec();
    let c2 = !csum(&p[20..]);
    done[26..28].copy_from_slice(&c2.to_be_bytes());
    assert_eq!(done, with, "completed checksum is the original");
    assert_eq!(csum(&[ph, done[20..].to_vec()].concat()), 0xffff);
}

// IP fragments (first with MF, or later with an offset) are written as is.
#[test]
fn coalesce_fragments_plain() {
    let mut first = Tcp::new(1, pattern(1000, 11));
    first.frag = 0x2000; // MF
    let first = first.build();
    let mut l4 = pattern(400, 12);
    l4[0] = 0x55;
    let later_tcp = ipv4(TCP, 5, 0x00b9, &l4);
    let later_udp = ipv4(UDP, 6, 0x00b9, &l4);
    let packets = [first.clone(), later_tcp.clone(), later_udp.clone()];
    assert_msgs(
        &coalesce(&packets),
        &[plain(&first), plain(&later_tcp), plain(&later_udp)],
    );
}

// A merge never makes an IP packet over 65535 bytes: 100 full segments go
// out as maximal packets whose payloads concatenate to the input. A merge
// reaching exactly 65535 bytes is allowed, one of 65536 is not.
#[test]
fn coalesce_max_ip() {
    let segs = flow(3, &[1448; 100]);
    let hl = segs[0].hdr_len();
    let msgs = coalesce(&build_all(&segs));
    let mut payload = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        assert!(
            m.len() <= MAX_IP + VNET_HDR_LEN,
            "message {i}: {} bytes",
            m.len()
        );
        let n = m.len() - VNET_HDR_LEN - hl;
        if i + 1 < msgs.len() {
            assert!(
                hl + n + 1448 > MAX_IP,
                "message {i} could have taken one more"
            );
        }
        payload.extend(&m[VNET_HDR_LEN + hl..]);
    }
    let input: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
    assert_bytes(&payload, &input, "payload");
    let per = (MAX_IP - hl) / 1448;
    let want: Vec<_> = segs.chunks(per).map(merged).collect();
    assert_msgs(&msgs, &want);

    // No options: 40 + 5 * 13099 = 65535 exactly; a sixth starts anew.
    let mut segs = flow(3, &[13099; 6]);
    segs.iter_mut().for_each(|s| s.opts.clear());
    let msgs = coalesce(&build_all(&segs));
    assert_eq!(msgs[0].len(), MAX_IP + VNET_HDR_LEN);
    assert_msgs(&msgs, &[merged(&segs[..5]), merged(&segs[5..])]);
    // One byte more would be 65536: the last segment goes alone.
    let mut segs = flow(3, &[13100, 13100, 13100, 13100, 13096]);
    segs.iter_mut().for_each(|s| s.opts.clear());
    let msgs = coalesce(&build_all(&segs));
    assert_msgs(&msgs, &[merged(&segs[..4]), merged(&segs[4..])]);
}

// Small segments: at most 64 go into one packet, and nothing is lost.
#[test]
fn coalesce_segment_limit() {
    let segs = flow(3, &[100; 150]);
    let msgs = coalesce(&build_all(&segs));
    let want: Vec<_> = segs.chunks(64).map(merged).collect();
    assert_msgs(&msgs, &want);
}

// A refused write is counted as an error, not as written, and the rest of
// the batch is still attempted.
#[test]
fn coalesce_counts_errors() {
    let segs = flow(1, &[1000, 10, 1000]);
    let mut c = Coalescer::new();
    c.write_all(-1, build_all(&segs).iter().map(Vec::as_slice));
    assert_eq!((c.written, c.errors), (0, 2));
}

/// Packets with IP options are never merged (as with the kernel's GRO):
/// each may carry different options, and a merge would keep only the
/// first's.
#[test]
fn coalesce_leaves_ip_options_alone() {
    let with_options = |s: &Tcp, opt: [u8; 4]| {
        let p = s.build();
        let mut q = vec![0x46];
        q.extend(&p[1..20]);
        q.extend(opt);
        q.extend(&p[20..]);
        let total = q.len() as u16;
        q[2..4].copy_from_slice(&total.to_be_bytes());
        q[10..12].copy_from_slice(&[0, 0]);
        let c = !csum(&q[..24]);
        q[10..12].copy_from_slice(&c.to_be_bytes());
        q
    };
    let segs = flow(5000, &[1000, 1000]);
    let a = with_options(&segs[0], [0x94, 4, 0, 0]);
    let b = with_options(&segs[1], [1, 1, 1, 0]);
    let msgs = coalesce(&[a, b]);
    assert_eq!(msgs.len(), 2, "two packets with IP options stay two");
    for m in &msgs {
        assert_eq!(m[VNET_HDR_LEN] & 0x0f, 6, "IP options kept");
        assert_eq!(m.len(), VNET_HDR_LEN + 24 + 32 + 1000);
    }
}
