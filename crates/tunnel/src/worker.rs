//! One worker per TUN queue: it moves packets from its queue to its UDP
//! socket and from its socket to its queue, in batches, until stopped.

use crate::secure::{OpenError, SecurePeer, Session, MSG_DATA, MSG_INIT, MSG_RESP, OVERHEAD};
use crate::stats::Local;
use crate::udp::{RxBatch, TxBatch, UdpSocket, RX_MSGS};
use crate::{Peers, Shared};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Segments held per send batch: room for two 64 KB TCP segments split at
/// a 1500-byte MTU (45 each) or for as many small packets.
const SEGMENTS: usize = 256;
/// Free segment buffers needed before another TUN read: one 64 KB packet
/// split at the smallest MSS we expect (536) needs 123.
const SEGMENTS_PER_READ: usize = 128;
/// TUN reads per batch before turning to the other direction.
const READS_PER_BATCH: usize = 32;
/// How long a send waits for socket buffer space before dropping.
const STALL_MS: i32 = 100;

pub(crate) struct Worker {
    pub shared: Arc<Shared>,
    pub tun: SyncDevice,
    pub sock: Arc<UdpSocket>,
    pub stop: RawFd,
    /// Segment buffers, `stride` bytes each, in one allocation.
    seg_buf: Vec<u8>,
    stride: usize,
    sizes: Vec<usize>,
    /// A raw read from the TUN device: virtio header and up to 64 KB.
    gso_buf: Vec<u8>,
    /// Secure mode: encrypted datagrams, `stride + OVERHEAD` bytes each.
    enc_buf: Vec<u8>,
    tx: TxBatch,
    rx: RxBatch,
    /// Packets to write to the TUN device, each after VIRTIO_NET_HDR_LEN
    /// bytes of headroom for the header the GRO code writes.
    tun_bufs: Vec<Vec<u8>>,
    n_tun: usize,
    gro: GROTable,
    local: Local,
    gso: bool,
}

fn dst_of(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[16], p[17], p[18], p[19]))
}

fn src_of(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[12], p[13], p[14], p[15]))
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
            seg_buf: vec![0; SEGMENTS * stride],
            stride,
            sizes: vec![0; SEGMENTS],
            gso_buf: vec![0; VIRTIO_NET_HDR_LEN + 65536],
            enc_buf: if secure {
                vec![0; SEGMENTS * (stride + OVERHEAD)]
            } else {
                Vec::new()
            },
            tx: TxBatch::new(),
            rx: RxBatch::new(),
            // tun-rs coalesces into the first packet's buffer only if its
            // capacity already holds a 64 KB result (it will not grow it).
            tun_bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(65536 + 2 * VIRTIO_NET_HDR_LEN + 64))
                .collect(),
            n_tun: 0,
            gro: GROTable::new(),
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

    /// Reads from the TUN queue (splitting 64 KB segments), encapsulates,
    /// sends. Returns whether anything was read.
    fn tun_to_udp(&mut self) -> bool {
        let mut used = 0;
        let mut reads = 0;
        while reads < READS_PER_BATCH && used + SEGMENTS_PER_READ <= SEGMENTS {
            let stride = self.stride;
            let mut chunks: Vec<&mut [u8]> =
                self.seg_buf[used * stride..].chunks_mut(stride).collect();
            let n = chunks.len();
            match self.tun.recv_multiple(
                &mut self.gso_buf,
                &mut chunks,
                &mut self.sizes[used..used + n],
                0,
            ) {
                Ok(k) => {
                    used += k;
                    reads += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A packet the offload code could not split: dropped,
                    // the next read is independent of it.
                    tracing::debug!(error = %e, "unusable packet from the TUN device");
                    self.local.dropped_malformed += 1;
                    reads += 1;
                }
            }
        }
        if used == 0 {
            return reads > 0;
        }
        let peers = self.shared.peers.read().expect("peers lock").clone();
        if self.shared.crypto.is_some() {
            self.encrypt_segments(&peers, used);
            let sent = self.tx.flush(&self.sock, &self.enc_buf, STALL_MS);
            self.local.send_errors += sent.failed;
        } else {
            let mut last: Option<(Ipv4Addr, Option<usize>)> = None;
            for i in 0..used {
                let start = i * self.stride;
                let len = self.sizes[i];
                let Some(dst) = dst_of(&self.seg_buf[start..start + len]) else {
                    self.local.dropped_no_peer += 1;
                    continue;
                };
                let idx = match last {
                    Some((d, idx)) if d == dst => idx,
                    _ => {
                        let idx = peers.lookup(dst);
                        last = Some((dst, idx));
                        idx
                    }
                };
                let Some(idx) = idx else {
                    self.local.dropped_no_peer += 1;
                    continue;
                };
                self.tx.push(peers.list[idx].endpoint, start, len, self.gso);
                self.local.tx_packets += 1;
                self.local.tx_bytes += len as u64;
            }
            let sent = self.tx.flush(&self.sock, &self.seg_buf, STALL_MS);
            self.local.send_errors += sent.failed;
        }
        true
    }

    fn encrypt_segments(&mut self, peers: &Peers, used: usize) {
        let crypto = self.shared.crypto.as_ref().expect("secure mode");
        let estride = self.stride + OVERHEAD;
        // The session of the previous segment's peer, so a run of segments
        // to one peer looks it up once.
        let mut last: Option<(Ipv4Addr, Option<usize>, Option<Arc<Session>>)> = None;
        let mut used_sessions: Vec<(Arc<Session>, Arc<SecurePeer>)> = Vec::new();
        for i in 0..used {
            let start = i * self.stride;
            let len = self.sizes[i];
            let seg = &self.seg_buf[start..start + len];
            let Some(dst) = dst_of(seg) else {
                self.local.dropped_no_peer += 1;
                continue;
            };
            let (idx, session) = match &last {
                Some((d, idx, s)) if *d == dst => (*idx, s.clone()),
                _ => {
                    let idx = peers.lookup(dst);
                    let s =
                        idx.and_then(|i| peers.list[i].secure.as_ref()?.current(&crypto.policy));
                    if let (Some(s), Some(i)) = (&s, idx) {
                        if !used_sessions.iter().any(|(u, _)| Arc::ptr_eq(u, s)) {
                            let p = peers.list[i].secure.clone().expect("secure peer");
                            used_sessions.push((s.clone(), p));
                        }
                    }
                    last = Some((dst, idx, s.clone()));
                    (idx, s)
                }
            };
            let Some(idx) = idx else {
                self.local.dropped_no_peer += 1;
                continue;
            };
            let entry = &peers.list[idx];
            let peer = entry
                .secure
                .as_ref()
                .expect("every peer has keys in secure mode");
            let counter = session
                .as_ref()
                .and_then(|s| s.reserve(&crypto.policy).map(|c| (s, c)));
            let Some((s, counter)) = counter else {
                // No session (yet, or any more): hold the packet until the
                // handshake completes. Never sent in the clear.
                crypto.queue(peer, seg, &self.sock, &self.shared.counters);
                last = None;
                continue;
            };
            let out_start = i * estride;
            let n = s.seal(
                counter,
                seg,
                &mut self.enc_buf[out_start..out_start + len + OVERHEAD],
            );
            if n == 0 {
                self.local.dropped_malformed += 1;
                continue;
            }
            self.tx.push(entry.endpoint, out_start, n, self.gso);
            self.local.tx_packets += 1;
            self.local.tx_bytes += len as u64;
        }
        for (s, p) in used_sessions {
            crypto.maybe_rekey(&s, &p, &self.sock, &self.shared.counters);
        }
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
        let peers = self.shared.peers.read().expect("peers lock").clone();
        for m in 0..n {
            let (src, _, _) = self.rx.got[m];
            if self.shared.crypto.is_some() {
                self.decrypt_message(&peers, m, src);
            } else {
                if !peers.by_endpoint.contains(&src) {
                    self.local.dropped_unknown_sender += self.rx.datagrams(m).count() as u64;
                    continue;
                }
                let rx = &self.rx;
                for dg in rx.datagrams(m) {
                    if src_of(dg).is_none() {
                        self.local.dropped_malformed += 1;
                        continue;
                    }
                    if self.n_tun == self.tun_bufs.len() {
                        flush_tun(
                            &self.tun,
                            &mut self.gro,
                            &mut self.tun_bufs,
                            &mut self.n_tun,
                            &mut self.local,
                        );
                    }
                    let b = &mut self.tun_bufs[self.n_tun];
                    b.clear();
                    b.resize(VIRTIO_NET_HDR_LEN, 0);
                    b.extend_from_slice(dg);
                    self.n_tun += 1;
                    self.local.rx_packets += 1;
                    self.local.rx_bytes += dg.len() as u64;
                }
            }
        }
        flush_tun(
            &self.tun,
            &mut self.gro,
            &mut self.tun_bufs,
            &mut self.n_tun,
            &mut self.local,
        );
        n == RX_MSGS
    }

    fn decrypt_message(&mut self, peers: &Peers, m: usize, src: std::net::SocketAddrV4) {
        let crypto = self.shared.crypto.as_ref().expect("secure mode");
        let counters = &self.shared.counters;
        let mut cached: Option<(u32, Option<Arc<Session>>)> = None;
        let rx = &self.rx;
        for dg in rx.datagrams(m) {
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
            if self.n_tun == self.tun_bufs.len() {
                flush_tun(
                    &self.tun,
                    &mut self.gro,
                    &mut self.tun_bufs,
                    &mut self.n_tun,
                    &mut self.local,
                );
            }
            let b = &mut self.tun_bufs[self.n_tun];
            b.clear();
            b.resize(
                VIRTIO_NET_HDR_LEN + dg.len() - crate::secure::DATA_HEADER,
                0,
            );
            let len = match session.open(dg, &mut b[VIRTIO_NET_HDR_LEN..], &crypto.policy) {
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
            b.truncate(VIRTIO_NET_HDR_LEN + len);
            crypto.on_authentic(&session, &self.sock, counters);
            if len == 0 {
                // A keepalive: it confirmed the session, nothing to deliver.
                continue;
            }
            // A peer may only send from its own subnet, or one host could
            // inject packets that appear to come from another.
            let allowed = src_of(&b[VIRTIO_NET_HDR_LEN..])
                .and_then(|ip| peers.lookup(ip))
                .and_then(|i| peers.list[i].secure.as_ref())
                .is_some_and(|p| std::ptr::eq(Arc::as_ptr(p), session.peer.as_ptr()));
            if !allowed {
                self.local.dropped_bad_source += 1;
                continue;
            }
            self.n_tun += 1;
            self.local.rx_packets += 1;
            self.local.rx_bytes += len as u64;
        }
    }
}

/// Writes the collected packets to the TUN queue; the GRO table merges
/// consecutive segments of a TCP (or UDP) flow into one large packet with
/// a virtio header, so the stack above sees what a NIC with GRO delivers.
fn flush_tun(
    tun: &SyncDevice,
    gro: &mut GROTable,
    bufs: &mut [Vec<u8>],
    n: &mut usize,
    local: &mut Local,
) {
    if *n == 0 {
        return;
    }
    if let Err(e) = tun.send_multiple(gro, &mut bufs[..*n], VIRTIO_NET_HDR_LEN) {
        tracing::debug!(error = %e, "writing to the TUN device failed");
        local.tun_errors += 1;
    }
    *n = 0;
}
