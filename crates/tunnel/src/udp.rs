//! The UDP side: a socket per worker (SO_REUSEPORT on the listen port),
//! batched sends with UDP GSO (UDP_SEGMENT) and batched receives with
//! UDP GRO, through sendmmsg/recvmmsg.

use crate::error::{Error, Result};
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// Not in the libc crate for glibc targets (linux/udp.h).
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// The kernel's limit of segments in one UDP GSO send (UDP_MAX_SEGMENTS).
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;
/// Largest UDP payload in one GSO send: an IPv4 datagram is at most 65535
/// bytes with its 20-byte IP and 8-byte UDP headers.
const MAX_GSO_BYTES: usize = 65535 - 28;
/// Size of a receive buffer: a GRO'd batch is at most 64 KB.
pub(crate) const RX_BUF: usize = 65536;
/// Room for one control message carrying an int (UDP_SEGMENT, UDP_GRO).
const CMSG_ROOM: usize = 64;

pub(crate) struct UdpSocket {
    fd: OwnedFd,
    /// The kernel accepted UDP_SEGMENT on this socket.
    pub gso: bool,
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, opt, &v)
}

/// setsockopt with a value of any plain C type.
fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: fd is a socket we own; `v` is a live value of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            v as *const T as *const libc::c_void,
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

impl UdpSocket {
    /// A non-blocking socket bound to `addr`, in the calling thread's
    /// network namespace, with SO_REUSEPORT so that every worker has its
    /// own socket on the same port (the kernel spreads incoming flows over
    /// them), large buffers, and UDP GRO.
    pub fn bind(addr: SocketAddrV4) -> Result<UdpSocket> {
        let err = |what: &'static str| {
            let source = io::Error::last_os_error();
            Error::Socket { addr, what, source }
        };
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(err("socket"));
        }
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let with = |what: &'static str, r: io::Result<()>| {
            r.map_err(|source| Error::Socket { addr, what, source })
        };
        with(
            "SO_REUSEPORT",
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1),
        )?;
        // Bursts of 64 KB GSO batches overflow the default ~200 KB buffers
        // at once; the *FORCE variants pass the sysctl caps (we are root),
        // the plain ones are the fallback within them.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(raw, libc::SOL_SOCKET, force, 8 << 20).is_err() {
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, 8 << 20);
            }
        }
        // GRO: the kernel hands over runs of same-sized datagrams of one
        // sender as one buffer (with their size in a control message).
        if let Err(e) = setsockopt_int(raw, SOL_UDP, UDP_GRO, 1) {
            tracing::warn!(error = %e, "UDP_GRO unavailable; receiving one datagram per message");
        }
        // Probing UDP_SEGMENT with 0 (off) tells whether the kernel knows it.
        let gso = setsockopt_int(raw, SOL_UDP, UDP_SEGMENT, 0).is_ok();
        if !gso {
            tracing::warn!("UDP_SEGMENT unavailable; sending one datagram per message");
        }
        let sa = sockaddr(addr);
        // SAFETY: sa is a valid sockaddr_in of the given length.
        let rc = unsafe {
            libc::bind(
                raw,
                &sa as *const _ as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err("bind"));
        }
        Ok(UdpSocket { fd, gso })
    }

    /// One datagram (handshakes, keepalives, flushed queues): rare, so no
    /// batching; a full buffer drops it like any lossy link would.
    pub fn send_to(&self, buf: &[u8], dst: SocketAddrV4) -> io::Result<()> {
        let sa = sockaddr(dst);
        // SAFETY: buf and sa are valid for the call.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// setsockopt level SOL_SOCKET, not in the libc crate.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

impl UdpSocket {
    /// Steers each received datagram to the socket of worker
    /// `hash(inner ports) % workers` of this port's SO_REUSEPORT group,
    /// instead of hashing the outer 4-tuple (which is the same for every
    /// flow between two hosts, so all of a peer's traffic would land on one
    /// worker). A classic BPF program on the UDP payload, i.e. the inner
    /// IPv4 packet: plain mode only (secure payloads are opaque). A flow
    /// stays on one worker, so its packets are never reordered.
    pub fn steer_by_inner_flow(&self, workers: usize) -> io::Result<()> {
        let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        // A multiplicative hash of the inner addresses and ports: the
        // ports alone are no good, as connect() hands out ports of one
        // parity, so `ports % 2` would put every flow on one worker.
        let prog = [
            ins(0x30, 0, 0, 0),              // 0: ldb [0]: version and IHL
            ins(0x54, 0, 0, 0xf0),           // 1: and #0xf0
            ins(0x15, 0, 17, 0x40),          // 2: jeq #0x40 (IPv4), else 20
            ins(0x20, 0, 0, 12),             // 3: ld [12]: source address
            ins(0x07, 0, 0, 0),              // 4: tax
            ins(0x20, 0, 0, 16),             // 5: ld [16]: destination address
            ins(0xac, 0, 0, 0),              // 6: xor x
            ins(0x02, 0, 0, 0),              // 7: st M[0]
            ins(0xb1, 0, 0, 0),              // 8: ldx 4*([0]&0xf): header length
            ins(0x40, 0, 0, 0),              // 9: ld [x+0]: both ports
            ins(0x07, 0, 0, 0),              // 10: tax
            ins(0x74, 0, 0, 16),             // 11: rsh #16
            ins(0xac, 0, 0, 0),              // 12: xor x: ports folded into the low half
            ins(0x07, 0, 0, 0),              // 13: tax
            ins(0x60, 0, 0, 0),              // 14: ld M[0]
            ins(0xac, 0, 0, 0),              // 15: xor x
            ins(0x24, 0, 0, 0x9e37_79b1),    // 16: mul #golden ratio
            ins(0x74, 0, 0, 16),             // 17: rsh #16: the well-mixed bits
            ins(0x94, 0, 0, workers as u32), // 18: mod #workers
            ins(0x16, 0, 0, 0),              // 19: ret a
            ins(0x06, 0, 0, 0),              // 20: ret #0 (not IPv4, or too short)
        ];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // fprog points at `prog`, alive for the call.
        setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog,
        )
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until `fd` has one of `events`, or `timeout_ms` passes; EINTR is
/// retried. Returns the revents (0 on timeout).
pub(crate) fn wait_fd(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: i32,
) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(p.revents);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One message of a send batch: datagrams for one destination, all the
/// same length but the last, sent with UDP_SEGMENT when there are several.
struct TxMsg {
    dst: SocketAddrV4,
    /// Range in `TxBatch::parts` (a datagram is one or two parts).
    first: usize,
    parts: usize,
    /// Datagrams in the message.
    count: usize,
    seg: usize,
    bytes: usize,
    /// A shorter datagram ended the run: nothing more may be appended.
    closed: bool,
}

/// Outcome of a flush, for the counters.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Sent {
    pub datagrams: u64,
    pub failed: u64,
}

/// A piece of a datagram: `len` bytes at `start` of buffer number `buf`
/// of those given to [`TxBatch::flush`].
pub(crate) type Part = (usize, usize, usize);

/// A batch of datagrams to send with one sendmmsg. Datagrams are ranges of
/// the caller's buffers (no copy): one range, or a rewritten header and a
/// payload range; consecutive ones to the same destination with the same
/// length are grouped into one GSO message.
pub(crate) struct TxBatch {
    parts: Vec<Part>,
    msgs: Vec<TxMsg>,
    // Scratch for the system call, kept to avoid allocating per batch.
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<[u64; CMSG_ROOM / 8]>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in the scratch vectors are only set and used
// within one flush call; between calls they are dangling and never read.
unsafe impl Send for TxBatch {}

impl TxBatch {
    pub fn new() -> TxBatch {
        TxBatch {
            parts: Vec::with_capacity(512),
            msgs: Vec::with_capacity(512),
            iovs: Vec::with_capacity(512),
            addrs: Vec::with_capacity(512),
            cmsgs: Vec::with_capacity(512),
            hdrs: Vec::with_capacity(512),
        }
    }

    /// Adds the datagram made of `pieces` (of the buffers later given to
    /// [`TxBatch::flush`]) for `dst`.
    pub fn push(&mut self, dst: SocketAddrV4, pieces: &[Part], gso: bool) {
        let len: usize = pieces.iter().map(|p| p.2).sum();
        if gso {
            if let Some(m) = self.msgs.last_mut() {
                if m.dst == dst
                    && !m.closed
                    && len <= m.seg
                    && m.count < MAX_GSO_SEGMENTS
                    && m.bytes + len <= MAX_GSO_BYTES
                {
                    m.count += 1;
                    m.parts += pieces.len();
                    m.bytes += len;
                    m.closed = len < m.seg;
                    self.parts.extend_from_slice(pieces);
                    return;
                }
            }
        }
        self.msgs.push(TxMsg {
            dst,
            first: self.parts.len(),
            parts: pieces.len(),
            count: 1,
            seg: len,
            bytes: len,
            closed: false,
        });
        self.parts.extend_from_slice(pieces);
    }

    /// Ends the current GSO message: what is pushed next starts another.
    /// Used between reads, so one message never mixes inner flows (the
    /// receiver steers a whole message by its first datagram).
    pub fn close_message(&mut self) {
        if let Some(m) = self.msgs.last_mut() {
            m.closed = true;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Sends everything with as few sendmmsg calls as the kernel allows,
    /// then empties the batch. A full socket buffer is waited for (up to
    /// `stall_ms`) rather than dropped: that is how backpressure reaches
    /// the TCP flows inside, as it would on a real link.
    pub fn flush(&mut self, sock: &UdpSocket, bufs: &[&[u8]], stall_ms: i32) -> Sent {
        let mut sent = Sent::default();
        if self.msgs.is_empty() {
            return sent;
        }
        self.iovs.clear();
        self.addrs.clear();
        self.cmsgs.clear();
        self.hdrs.clear();
        for &(b, start, len) in &self.parts {
            let part = &bufs[b][start..start + len];
            self.iovs.push(libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: len,
            });
        }
        for m in &self.msgs {
            self.addrs.push(sockaddr(m.dst));
            self.cmsgs.push([0; CMSG_ROOM / 8]);
        }
        for (i, m) in self.msgs.iter().enumerate() {
            // SAFETY: zeroed msghdr is a valid empty header.
            let mut h: libc::msghdr = unsafe { mem::zeroed() };
            h.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[m.first] as *mut libc::iovec;
            h.msg_iovlen = m.parts;
            if m.count > 1 {
                // SAFETY: CMSG_SPACE is arithmetic on its argument; it reads
                // and writes no memory.
                let space = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize;
                h.msg_control = self.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
                h.msg_controllen = space;
                // SAFETY: the control buffer is CMSG_ROOM bytes, aligned,
                // and larger than one cmsg carrying a u16.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, m.seg as u16);
                }
            }
            self.hdrs.push(libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            });
        }
        let mut at = 0;
        let mut stalled = false;
        while at < self.hdrs.len() {
            let n = (self.hdrs.len() - at).min(1024);
            // SAFETY: every header points into vectors that live, unmoved,
            // until the end of this function, and into `bufs`.
            let rc = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), self.hdrs[at..].as_mut_ptr(), n as u32, 0)
            };
            if rc > 0 {
                for m in &self.msgs[at..at + rc as usize] {
                    sent.datagrams += m.count as u64;
                }
                at += rc as usize;
                stalled = false;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) if !stalled => {
                    // Wait once for room; a second refusal in a row drops.
                    stalled = true;
                    let _ = wait_fd(sock.as_raw_fd(), libc::POLLOUT, stall_ms);
                }
                _ => {
                    let m = &self.msgs[at];
                    tracing::debug!(error = %e, dst = %m.dst, datagrams = m.count, "send failed");
                    sent.failed += m.count as u64;
                    at += 1;
                    stalled = false;
                }
            }
        }
        self.parts.clear();
        self.msgs.clear();
        sent
    }
}

/// Receive side: up to `RX_MSGS` messages of up to 64 KB each per
/// recvmmsg; each may hold several datagrams coalesced by UDP GRO.
pub(crate) struct RxBatch {
    pub bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<[u64; CMSG_ROOM / 8]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per received message: (source, length, GRO segment size or 0).
    pub got: Vec<(SocketAddrV4, usize, usize)>,
}

// SAFETY: as for TxBatch, pointers are only live within one recv call.
unsafe impl Send for RxBatch {}

pub(crate) const RX_MSGS: usize = 16;

impl RxBatch {
    pub fn new() -> RxBatch {
        RxBatch {
            bufs: vec![0; RX_MSGS * RX_BUF],
            iovs: Vec::with_capacity(RX_MSGS),
            addrs: vec![sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); RX_MSGS],
            cmsgs: vec![[0; CMSG_ROOM / 8]; RX_MSGS],
            hdrs: Vec::with_capacity(RX_MSGS),
            got: Vec::with_capacity(RX_MSGS),
        }
    }

    /// One recvmmsg without waiting. Ok(0) when nothing is queued.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        self.iovs.clear();
        self.hdrs.clear();
        for chunk in self.bufs.chunks_mut(RX_BUF) {
            self.iovs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr() as *mut libc::c_void,
                iov_len: RX_BUF,
            });
        }
        for i in 0..RX_MSGS {
            // SAFETY: zeroed msghdr is a valid empty header.
            let mut h: libc::msghdr = unsafe { mem::zeroed() };
            h.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i] as *mut libc::iovec;
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = CMSG_ROOM;
            self.hdrs.push(libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            });
        }
        let rc = loop {
            // SAFETY: headers point into our own vectors, unmoved during the call.
            let rc = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    RX_MSGS as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for i in 0..rc {
            let h = &self.hdrs[i].msg_hdr;
            let mut seg = 0usize;
            // SAFETY: the kernel filled msg_control within msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(h);
                while !c.is_null() {
                    if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        seg = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int)
                            as usize;
                    }
                    c = libc::CMSG_NXTHDR(h, c);
                }
            }
            self.got.push((
                from_sockaddr(&self.addrs[i]),
                self.hdrs[i].msg_len as usize,
                seg,
            ));
        }
        Ok(rc)
    }

    /// The datagrams of received message `i`, as (offset in `bufs`, length).
    pub fn datagram_ranges(&self, i: usize) -> impl Iterator<Item = (usize, usize)> {
        let (_, len, seg) = self.got[i];
        let step = if seg == 0 { len.max(1) } else { seg };
        let base = i * RX_BUF;
        (0..len)
            .step_by(step)
            .map(move |o| (base + o, step.min(len - o)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brings up `lo` in the calling thread's (fresh) namespace.
    fn lo_up() {
        // SAFETY: a datagram socket for the ioctl and a zeroed ifreq.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0);
            let mut req: libc::ifreq = mem::zeroed();
            req.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
            req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req), 0, "lo up");
            libc::close(fd);
        }
    }

    /// Flows are spread over the workers by their inner addresses and
    /// ports (even for ports of one parity, as connect() picks them), one
    /// flow always to the same worker; what is not IPv4 goes to the first.
    #[test]
    fn steering_spreads_inner_flows() {
        std::thread::spawn(|| {
            // SAFETY: a new network namespace for this thread only; it
            // ends with the thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: unshare(CLONE_NEWNET) needs root");
                return;
            }
            lo_up();
            let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18285);
            let socks: Vec<UdpSocket> = (0..2).map(|_| UdpSocket::bind(addr).unwrap()).collect();
            socks[0].steer_by_inner_flow(2).unwrap();
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let packet = |sport: u16| {
                let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
                p.extend([10, 50, 1, 1, 10, 50, 2, 1]);
                p.extend(sport.to_be_bytes());
                p.extend(5201u16.to_be_bytes());
                p.extend([0; 16]);
                p
            };
            for _ in 0..2 {
                for sport in (40000..40032).step_by(2) {
                    tx.send_to(&packet(sport), addr).unwrap();
                }
            }
            tx.send_to(&[0x60; 40], addr).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(), Vec::new()];
            for (i, s) in socks.iter().enumerate() {
                let mut buf = [0u8; 128];
                loop {
                    // SAFETY: reading into our buffer.
                    let n = unsafe {
                        libc::recv(
                            s.as_raw_fd(),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            buf.len(),
                            libc::MSG_DONTWAIT,
                        )
                    };
                    if n <= 0 {
                        break;
                    }
                    got[i].push(buf[..n as usize].to_vec());
                }
            }
            assert_eq!(got[0].len() + got[1].len(), 33, "every datagram arrives");
            assert!(
                got[0].iter().any(|p| p[0] == 0x60),
                "not IPv4: first worker"
            );
            let ports = |v: &Vec<Vec<u8>>| -> Vec<u16> {
                v.iter()
                    .filter(|p| p[0] == 0x45)
                    .map(|p| u16::from_be_bytes([p[20], p[21]]))
                    .collect()
            };
            let (a, b) = (ports(&got[0]), ports(&got[1]));
            assert!(
                a.len() >= 8 && b.len() >= 8,
                "both workers get flows: {a:?} / {b:?}"
            );
            assert!(
                a.iter().all(|p| !b.contains(p)),
                "a flow stays on one worker"
            );
        })
        .join()
        .unwrap();
    }
}
