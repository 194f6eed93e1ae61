//! One worker per TUN queue: it moves packets from its queue to its UDP
//! socket and from its socket to its queue, in batches, until stopped.

use crate::offload::{split, Coalescer, Datagram, SplitError, MAX_HDR, VNET_HDR_LEN};
use crate::secure::{OpenError, Session, MSG_DATA, MSG_INIT, MSG_RESP, OVERHEAD};
use crate::stats::Local;
use crate::udp::{Part, RxBatch, TxBatch, UdpSocket, RX_BUF, RX_MSGS};
use crate::{Peers, Shared};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use tun_rs::SyncDevice;

/// TUN reads per batch before sending and turning to the other direction.
const READS_PER_BATCH: usize = 8;
/// One TUN read: the virtio header and an IPv4 packet of up to 64 KB.
const READ_LEN: usize = VNET_HDR_LEN + 65535;
/// Rewritten segment headers: room for one read split at the smallest
/// segment size the kernel makes (88 bytes), so any read fits once the
/// arena is emptied.
const ARENA: usize = (65535 / 88 + 1) * MAX_HDR;
/// Secure mode: encrypted datagrams held per send batch.
const ENC_SLOTS: usize = 256;
/// How long a send waits for socket buffer space before dropping.
const STALL_MS: i32 = 100;

pub(crate) struct Worker {
    pub shared: Arc<Shared>,
    pub tun: SyncDevice,
    pub sock: Arc<UdpSocket>,
    pub stop: RawFd,
    /// TUN reads of one batch, `READ_LEN` bytes each.
    reads: Vec<u8>,
    /// Headers of the segments split from them.
    arena: Vec<u8>,
    segs: Vec<Datagram>,
    /// Secure mode: one plaintext segment, and encrypted datagrams
    /// (`stride + OVERHEAD` bytes each).
    plain: Vec<u8>,
    enc_buf: Vec<u8>,
    stride: usize,
    tx: TxBatch,
    rx: RxBatch,
    /// Secure mode: decrypted packets, at the offsets of their datagrams
    /// in the receive buffers.
    opened: Vec<u8>,
    accepted: Vec<(usize, usize)>,
    coalescer: Coalescer,
    local: Local,
    gso: bool,
}

fn dst_of(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[16], p[17], p[18], p[19]))
}

fn src_of(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[12], p[13], p[14], p[15]))
}

/// An IPv4 packet's addresses and first four transport bytes (the ports
/// of TCP and UDP): what the receiver steers by.
fn flow_of(p: &[u8]) -> Option<[u8; 12]> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    if p[0] >> 4 != 4 || ihl < 20 || p.len() < ihl + 4 {
        return None;
    }
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&p[12..20]);
    k[8..].copy_from_slice(&p[ihl..ihl + 4]);
    Some(k)
}

#[cfg(test)]
#[test]
fn flow_of_short_or_odd_packets() {
    let mut p = vec![0x45u8; 24];
    assert!(flow_of(&p).is_some());
    p[0] = 0x40; // IHL 0
    assert_eq!(flow_of(&p), None);
    assert_eq!(flow_of(&[0x45; 10]), None);
    assert_eq!(flow_of(&[]), None);
    assert_eq!(flow_of(&[0x60; 40]), None);
}

/// Reads one packet (with its virtio header) from the TUN queue.
fn read_tun(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Worker {
    pub fn new(shared: Arc<Shared>, tun: SyncDevice, sock: Arc<UdpSocket>, stop: RawFd) -> Worker {
        let stride = shared.mtu + 64;
        let secure = shared.crypto.is_some();
        let gso = sock.gso;
        Worker {
            shared,
            tun,
            sock,
            stop,
            reads: vec![0; READS_PER_BATCH * READ_LEN],
            arena: vec![0; ARENA],
            segs: Vec::with_capacity(1024),
            plain: if secure { vec![0; stride] } else { Vec::new() },
            enc_buf: if secure {
                vec![0; ENC_SLOTS * (stride + OVERHEAD)]
            } else {
                Vec::new()
            },
            stride,
            tx: TxBatch::new(),
            rx: RxBatch::new(),
            opened: if secure {
                vec![0; RX_MSGS * RX_BUF]
            } else {
                Vec::new()
            },
            accepted: Vec::with_capacity(1024),
            coalescer: Coalescer::new(),
            local: Local::default(),
            gso,
        }
    }

    pub fn run(mut self) {
        let mut fds = [
            libc::pollfd {
                fd: self.tun.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            let a = self.tun_to_udp();
            let b = self.udp_to_tun();
            self.local.flush(&self.shared.counters);
            if a || b {
                // Work was done: look again before sleeping, unless asked
                // to stop (checked without blocking).
                if crate::udp::wait_fd(self.stop, libc::POLLIN, 0).unwrap_or(0) != 0 {
                    break;
                }
                continue;
            }
            // SAFETY: three valid pollfds.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
            if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %io::Error::last_os_error(), "poll failed; worker stops");
                break;
            }
            if fds[2].revents != 0 {
                break;
            }
        }
        tracing::debug!("worker stopped");
    }

    /// Reads from the TUN queue, splits 64 KB segments into datagrams,
    /// encapsulates, sends. Returns whether anything was read.
    fn tun_to_udp(&mut self) -> bool {
        let fd = self.tun.as_raw_fd();
        let peers = self
            .shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let secure = self.shared.crypto.is_some();
        let mut arena_at = 0;
        // The inner flow of the previous read: a GSO message may hold
        // several reads of one flow (runs of ACKs), never two flows.
        let mut last_flow: Option<[u8; 12]> = None;
        let mut enc_used = 0;
        let mut any = false;
        for k in 0..READS_PER_BATCH {
            let at = k * READ_LEN;
            let n = match read_tun(fd, &mut self.reads[at..at + READ_LEN]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the TUN device failed");
                    self.local.tun_errors += 1;
                    break;
                }
            };
            any = true;
            let Some(dst) = dst_of(&self.reads[at + VNET_HDR_LEN.min(n)..at + n]) else {
                self.local.dropped_no_peer += 1;
                continue;
            };
            let Some(idx) = peers.lookup(dst) else {
                self.local.dropped_no_peer += 1;
                continue;
            };
            self.segs.clear();
            let read = at..at + n;
            let used = match split(
                &mut self.reads[read.clone()],
                &mut self.arena,
                arena_at,
                &mut self.segs,
            ) {
                Ok(u) => u,
                Err(SplitError::NoRoom) => {
                    // Earlier reads' headers fill the arena: send them,
                    // then this read's headers start at the beginning.
                    self.flush_tx(secure);
                    enc_used = 0;
                    self.segs.clear();
                    match split(&mut self.reads[read], &mut self.arena, 0, &mut self.segs) {
                        Ok(u) => {
                            arena_at = 0;
                            u
                        }
                        Err(_) => {
                            self.local.dropped_malformed += 1;
                            continue;
                        }
                    }
                }
                Err(SplitError::Malformed) => {
                    self.local.dropped_malformed += 1;
                    continue;
                }
            };
            arena_at += used;
            let endpoint = peers.list[idx].endpoint;
            let flow = flow_of(&self.reads[at + VNET_HDR_LEN..at + n]);
            if flow != last_flow || flow.is_none() {
                self.tx.close_message();
            }
            last_flow = flow;
            if secure {
                enc_used = self.encrypt_segments(&peers, idx, at, enc_used);
            } else {
                for d in &self.segs {
                    let payload: Part = (0, at + d.payload_at, d.payload);
                    if d.hdr == 0 {
                        self.tx.push(endpoint, &[payload], self.gso);
                    } else {
                        self.tx
                            .push(endpoint, &[(1, d.hdr_at, d.hdr), payload], self.gso);
                    }
                    self.local.tx_packets += 1;
                    self.local.tx_bytes += d.len() as u64;
                }
            }
        }
        self.flush_tx(secure);
        any
    }

    fn flush_tx(&mut self, secure: bool) {
        if self.tx.is_empty() {
            return;
        }
        let sent = if secure {
            self.tx.flush(&self.sock, &[&self.enc_buf], STALL_MS)
        } else {
            self.tx
                .flush(&self.sock, &[&self.reads, &self.arena], STALL_MS)
        };
        self.local.send_errors += sent.failed;
    }

    /// Encrypts the segments of the read at `at` (in `self.segs`) for peer
    /// `idx` into encrypted slots from `enc_used` on, and batches them.
    /// Returns the slots in use afterwards.
    fn encrypt_segments(
        &mut self,
        peers: &Peers,
        idx: usize,
        at: usize,
        mut enc_used: usize,
    ) -> usize {
        let crypto = self.shared.crypto.as_ref().expect("secure mode");
        let entry = &peers.list[idx];
        let peer = entry
            .secure
            .as_ref()
            .expect("every peer has keys in secure mode");
        let estride = self.stride + OVERHEAD;
        let mut session = peer.current(&crypto.policy);
        for i in 0..self.segs.len() {
            let d = self.segs[i];
            let len = d.len();
            if len > self.stride {
                self.local.dropped_malformed += 1;
                continue;
            }
            // The plaintext segment: rewritten header, then payload.
            self.plain[..d.hdr].copy_from_slice(&self.arena[d.hdr_at..d.hdr_at + d.hdr]);
            let p = at + d.payload_at;
            self.plain[d.hdr..len].copy_from_slice(&self.reads[p..p + d.payload]);
            let seg = &self.plain[..len];
            let counter = session
                .as_ref()
                .and_then(|s| s.reserve(&crypto.policy).map(|c| (s, c)));
            let Some((s, counter)) = counter else {
                // No session (yet, or any more): hold the packet until the
                // handshake completes. Never sent in the clear.
                crypto.queue(peer, seg, &self.sock, &self.shared.counters);
                session = None;
                continue;
            };
            if enc_used == ENC_SLOTS {
                let sent = self.tx.flush(&self.sock, &[&self.enc_buf], STALL_MS);
                self.local.send_errors += sent.failed;
                enc_used = 0;
            }
            let out_start = enc_used * estride;
            let n = s.seal(
                counter,
                seg,
                &mut self.enc_buf[out_start..out_start + len + OVERHEAD],
            );
            if n == 0 {
                self.local.dropped_malformed += 1;
                continue;
            }
            enc_used += 1;
            self.tx.push(entry.endpoint, &[(0, out_start, n)], self.gso);
            self.local.tx_packets += 1;
            self.local.tx_bytes += len as u64;
        }
        if let Some(s) = session {
            crypto.maybe_rekey(&s, peer, &self.sock, &self.shared.counters);
        }
        enc_used
    }

    /// Receives a batch of datagrams, decapsulates, writes to the TUN
    /// queue (coalescing TCP segments back into large ones). Returns
    /// whether the batch was full (more may be waiting).
    fn udp_to_tun(&mut self) -> bool {
        let n = match self.rx.recv(&self.sock) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "receive failed");
                return false;
            }
        };
        let peers = self
            .shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fd = self.tun.as_raw_fd();
        self.accepted.clear();
        if self.shared.crypto.is_some() {
            for m in 0..n {
                let (src, _, _) = self.rx.got[m];
                self.decrypt_message(&peers, m, src);
            }
            let opened = &self.opened;
            self.coalescer.write_all(
                fd,
                self.accepted.iter().map(|&(at, len)| &opened[at..at + len]),
            );
        } else {
            for m in 0..n {
                let (src, _, _) = self.rx.got[m];
                if !peers.by_endpoint.contains(&src) {
                    self.local.dropped_unknown_sender += self.rx.datagram_ranges(m).count() as u64;
                    continue;
                }
                for (at, len) in self.rx.datagram_ranges(m) {
                    if src_of(&self.rx.bufs[at..at + len]).is_none() {
                        self.local.dropped_malformed += 1;
                        continue;
                    }
                    self.accepted.push((at, len));
                    self.local.rx_packets += 1;
                    self.local.rx_bytes += len as u64;
                }
            }
            let bufs = &self.rx.bufs;
            self.coalescer.write_all(
                fd,
                self.accepted.iter().map(|&(at, len)| &bufs[at..at + len]),
            );
        }
        self.local.tun_errors += std::mem::take(&mut self.coalescer.errors);
        n == RX_MSGS
    }

    /// Decrypts the datagrams of message `m` into `self.opened` (at their
    /// own offsets) and lists the authentic ones in `self.accepted`.
    fn decrypt_message(&mut self, peers: &Peers, m: usize, src: SocketAddrV4) {
        let crypto = self.shared.crypto.as_ref().expect("secure mode");
        let counters = &self.shared.counters;
        let mut cached: Option<(u32, Option<Arc<Session>>)> = None;
        for (at, dlen) in self.rx.datagram_ranges(m) {
            let dg = &self.rx.bufs[at..at + dlen];
            match dg.first() {
                Some(&MSG_DATA) if dg.len() >= OVERHEAD => {}
                Some(&MSG_INIT) => {
                    crypto.on_initiation(
                        dg,
                        src,
                        |k| peers.by_key.get(k).cloned(),
                        &self.sock,
                        counters,
                    );
                    continue;
                }
                Some(&MSG_RESP) => {
                    crypto.on_response(dg, src, &self.sock, counters);
                    continue;
                }
                _ => {
                    self.local.dropped_malformed += 1;
                    continue;
                }
            }
            let index = u32::from_le_bytes(dg[4..8].try_into().expect("4 bytes"));
            let session = match &cached {
                Some((i, s)) if *i == index => s.clone(),
                _ => {
                    let s = crypto.session(index);
                    cached = Some((index, s.clone()));
                    s
                }
            };
            let Some(session) = session else {
                self.local.dropped_unknown_sender += 1;
                continue;
            };
            let out = &mut self.opened[at..at + dlen - crate::secure::DATA_HEADER];
            let len = match session.open(dg, out, &crypto.policy) {
                Ok(len) => len,
                Err(OpenError::BadAuth) => {
                    self.local.dropped_bad_auth += 1;
                    continue;
                }
                Err(OpenError::Replayed) => {
                    self.local.dropped_replayed += 1;
                    continue;
                }
            };
            crypto.on_authentic(&session, &self.sock, counters);
            if len == 0 {
                // A keepalive: it confirmed the session, nothing to deliver.
                continue;
            }
            // A peer may only send from its own subnet, or one host could
            // inject packets that appear to come from another.
            let allowed = src_of(&self.opened[at..at + len])
                .and_then(|ip| peers.lookup(ip))
                .and_then(|i| peers.list[i].secure.as_ref())
                .is_some_and(|p| std::ptr::eq(Arc::as_ptr(p), session.peer.as_ptr()));
            if !allowed {
                self.local.dropped_bad_source += 1;
                continue;
            }
            self.accepted.push((at, len));
            self.local.rx_packets += 1;
            self.local.rx_bytes += len as u64;
        }
    }
}
