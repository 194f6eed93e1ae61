//! weft's userspace datapath: a TUN device whose packets travel to peer
//! hosts in UDP datagrams, in the clear (the `udp` backend, flannel's wire
//! format: one inner IP packet per datagram) or encrypted (the `secure`
//! backend: Noise IK handshakes per host pair and AES-256-GCM per packet;
//! the wire format is described in src/secure.rs).
//!
//! Throughput comes from moving fewer, larger units through the kernel and
//! touching each byte as rarely as possible:
//! - the TUN device has IFF_VNET_HDR and checksum + IPv4 TSO offloads
//!   (TUNSETOFFLOAD), so the stack hands over TCP segments of up to 64 KB;
//!   src/offload.rs splits them into MTU-sized datagrams by rewriting only
//!   the headers (payload is sent from where the read put it, one iovec
//!   per piece) and sends them with UDP GSO (UDP_SEGMENT: one sendmsg for
//!   up to 64 datagrams), several messages per sendmmsg;
//! - the socket has UDP GRO and is read with recvmmsg; consecutive TCP
//!   segments of one flow are merged back into one large packet written
//!   with writev straight from the receive buffers;
//! - no TCP/UDP checksum is computed or verified in userspace: packets are
//!   handed to the TUN device as CHECKSUM_PARTIAL, as kernel VXLAN does on
//!   a veth (see src/offload.rs for why that is safe);
//! - the TUN device is multiqueue, one worker thread per queue, each with
//!   its own UDP socket on the same port (SO_REUSEPORT).
//!
//! The caller (the agent) addresses the device and routes remote subnets
//! into it; this crate only moves packets. IPv4 only.
//!
//! Locks: a poisoned lock is recovered (`.unwrap_or_else(|p| p.into_inner())`),
//! as everywhere in weft. Every critical section here replaces or inserts
//! whole values (a peer snapshot, a session, an index entry, an endpoint) or
//! runs a replay-window update that cannot panic half-way, so the data is
//! valid whenever a panic could happen; one worker's panic must not take the
//! other workers, and the tunnel, down with it.

mod error;
mod keys;
mod offload;
mod secure;
mod stats;
mod table;
mod udp;
mod worker;

pub use error::{Error, Result};
pub use keys::{decode_key, encode_key, Keys};
pub use secure::RekeyPolicy;
pub use stats::Stats;

use ipnet::Ipv4Net;
use secure::{Crypto, SecurePeer};
use stats::Counters;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use table::PrefixTable;
use udp::UdpSocket;

/// Default UDP port, flannel's for its udp backend.
pub const DEFAULT_PORT: u16 = 8285;
/// Bytes the plain backend adds to an inner packet on the wire (IPv4 and
/// UDP headers): the TUN MTU is the underlay's minus this.
pub const PLAIN_OVERHEAD: u32 = 28;
/// Bytes the secure backend adds (IPv4, UDP, 16-byte header, 16-byte tag).
pub const SECURE_OVERHEAD: u32 = 28 + secure::OVERHEAD as u32;

/// How to start a tunnel.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Name of the TUN device, created in the network namespace of the
    /// thread that calls [`Tunnel::start`]. At most 15 bytes.
    pub ifname: String,
    /// MTU of the TUN device: the underlay's MTU less [`PLAIN_OVERHEAD`]
    /// or [`SECURE_OVERHEAD`] (see [`TunnelConfig::mtu_for`]).
    pub mtu: u32,
    /// UDP address to listen on, e.g. 0.0.0.0:8285. Port 0 picks one.
    pub listen: SocketAddrV4,
    /// Number of TUN queues, each with one worker thread (one per core).
    pub queues: usize,
    /// Our static key: set for the secure backend, None for plain UDP.
    pub crypto: Option<Keys>,
    /// When the secure backend replaces its session keys.
    pub rekey: RekeyPolicy,
}

impl TunnelConfig {
    /// A plain (unencrypted) configuration with one queue per core.
    pub fn new(ifname: impl Into<String>, mtu: u32, listen: SocketAddrV4) -> TunnelConfig {
        TunnelConfig {
            ifname: ifname.into(),
            mtu,
            listen,
            queues: std::thread::available_parallelism().map_or(1, |n| n.get()),
            crypto: None,
            rekey: RekeyPolicy::default(),
        }
    }

    /// The TUN MTU for an underlay MTU, with or without encryption.
    pub fn mtu_for(underlay_mtu: u32, secure: bool) -> u32 {
        underlay_mtu.saturating_sub(if secure {
            SECURE_OVERHEAD
        } else {
            PLAIN_OVERHEAD
        })
    }

    fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::Config(s));
        if self.ifname.is_empty()
            || self.ifname.len() > 15
            || self.ifname.contains(['/', ' ', '\0'])
        {
            return bad(format!(
                "interface name {:?} must be 1 to 15 bytes without '/', space or NUL",
                self.ifname
            ));
        }
        let max = 65535
            - if self.crypto.is_some() {
                SECURE_OVERHEAD
            } else {
                PLAIN_OVERHEAD
            };
        if !(576..=max).contains(&self.mtu) {
            return bad(format!("MTU {} is outside 576..={max}", self.mtu));
        }
        if !(1..=64).contains(&self.queues) {
            return bad(format!("queues must be 1 to 64, not {}", self.queues));
        }
        let r = &self.rekey;
        if r.after_time >= r.reject_after_time || r.after_messages >= r.reject_after_messages {
            return bad("rekey limits must be below the reject limits".into());
        }
        Ok(())
    }
}

/// A remote host: packets to `subnet` go to `endpoint`. In secure mode
/// `public_key` is required and identifies the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub endpoint: SocketAddrV4,
    pub public_key: Option<[u8; 32]>,
}

/// One configured peer as the workers see it.
pub(crate) struct PeerEntry {
    pub endpoint: SocketAddrV4,
    pub secure: Option<Arc<SecurePeer>>,
}

/// An immutable snapshot of the peers; `set_peers` swaps in a new one.
#[derive(Default)]
pub(crate) struct Peers {
    lpm: PrefixTable<usize>,
    pub list: Vec<PeerEntry>,
    pub by_endpoint: HashSet<SocketAddrV4>,
    pub by_key: HashMap<[u8; 32], Arc<SecurePeer>>,
}

impl Peers {
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<usize> {
        self.lpm.lookup(dst).copied()
    }
}

pub(crate) struct Shared {
    pub peers: RwLock<Arc<Peers>>,
    pub counters: Counters,
    pub crypto: Option<Crypto>,
    pub mtu: usize,
}

/// A running tunnel: the TUN device and its workers. Dropping it stops it
/// (as [`Tunnel::stop`] does) and the device disappears with its queues.
pub struct Tunnel {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<OwnedFd>,
    ifname: String,
    local_addr: SocketAddrV4,
    public_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("ifname", &self.ifname)
            .field("local_addr", &self.local_addr)
            .field("secure", &self.shared.crypto.is_some())
            .finish_non_exhaustive()
    }
}

pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::Random(e.to_string()))
}

impl Tunnel {
    /// Creates the TUN device and the UDP sockets in the calling thread's
    /// network namespace, then starts the workers (which need no
    /// namespace of their own: descriptors keep theirs). No peers yet.
    pub fn start(cfg: TunnelConfig) -> Result<Tunnel> {
        cfg.validate()?;
        let secure = cfg.crypto.is_some();
        let public_key = cfg.crypto.as_ref().map(Keys::public_key);
        let crypto = cfg
            .crypto
            .clone()
            .map(|k| Crypto::new(k, cfg.rekey))
            .transpose()?;
        let tun_err = |source| Error::Tun {
            ifname: cfg.ifname.clone(),
            source,
        };
        // Offload makes tun-rs open the device with IFF_VNET_HDR and set
        // TSO4/TSO6/CSUM (and USO when the kernel has it) with TUNSETOFFLOAD.
        let first = tun_rs::DeviceBuilder::new()
            .name(&cfg.ifname)
            .mtu(cfg.mtu as u16)
            .offload(true)
            .multi_queue(true)
            .enable(true)
            .build_sync()
            .map_err(tun_err)?;
        // Only checksum offload and IPv4 TSO: the segments src/offload.rs
        // splits (tun-rs would also ask for IPv6 TSO and UDP segmentation).
        offload::set_offloads(first.as_raw_fd()).map_err(tun_err)?;
        let mut queues = vec![first];
        for _ in 1..cfg.queues {
            queues.push(queues[0].try_clone().map_err(tun_err)?);
        }
        for q in &queues {
            q.set_nonblocking(true).map_err(tun_err)?;
        }
        // The first socket fixes the port (when 0 was asked for); the
        // others share it through SO_REUSEPORT.
        let first = UdpSocket::bind(cfg.listen)?;
        let local_addr = local_addr(&first, cfg.listen)?;
        let mut sockets = vec![Arc::new(first)];
        for _ in 1..cfg.queues {
            sockets.push(Arc::new(UdpSocket::bind(local_addr)?));
        }
        // Plain mode: spread received flows over the workers. Without it
        // the kernel would still deliver everything, to one worker.
        if !secure && cfg.queues > 1 {
            if let Err(e) = sockets[0].steer_by_inner_flow(cfg.queues) {
                tracing::warn!(error = %e, "cannot steer flows to workers; one worker receives everything from a peer");
            }
        }
        // SAFETY: plain eventfd(2); the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: efd is a fresh descriptor we own.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let shared = Arc::new(Shared {
            peers: RwLock::new(Arc::new(Peers::default())),
            counters: Counters::default(),
            crypto,
            mtu: cfg.mtu as usize,
        });
        let mut tunnel = Tunnel {
            shared: shared.clone(),
            threads: Vec::new(),
            stop: stop.clone(),
            ifname: cfg.ifname.clone(),
            local_addr,
            public_key,
        };
        for (i, (tun, sock)) in queues.into_iter().zip(sockets.iter().cloned()).enumerate() {
            let w = worker::Worker::new(shared.clone(), tun, sock, stop.as_raw_fd());
            let span = tracing::info_span!("tunnel", ifname = %cfg.ifname, queue = i);
            let h = std::thread::Builder::new()
                .name(format!("wft-{}-{i}", cfg.ifname))
                .spawn(move || span.in_scope(|| w.run()))
                .map_err(|e| Error::io("starting a worker thread", e))?;
            tunnel.threads.push(h);
        }
        if secure {
            let sock = sockets[0].clone();
            let (shared, stop) = (shared.clone(), stop.clone());
            let h = std::thread::Builder::new()
                .name(format!("wft-{}-hk", cfg.ifname))
                .spawn(move || housekeeper(shared, sock, stop))
                .map_err(|e| Error::io("starting the housekeeping thread", e))?;
            tunnel.threads.push(h);
        }
        tracing::info!(ifname = %cfg.ifname, mtu = cfg.mtu, listen = %local_addr, queues = cfg.queues, secure, "tunnel started");
        Ok(tunnel)
    }

    /// Like [`Tunnel::start`], but creates everything in the network
    /// namespace `netns` (an open /proc/PID/ns/net or /run/netns file),
    /// from a short-lived thread that enters it, so no long-lived thread
    /// ever changes namespace.
    pub fn start_in(cfg: TunnelConfig, netns: BorrowedFd<'_>) -> Result<Tunnel> {
        let fd = netns
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating the namespace descriptor", e))?;
        std::thread::Builder::new()
            .name("wft-setns".into())
            .spawn(move || {
                // SAFETY: setns on a descriptor we own, for this thread only.
                if unsafe { libc::setns(fd.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::io(
                        "entering the network namespace",
                        std::io::Error::last_os_error(),
                    ));
                }
                Tunnel::start(cfg)
            })
            .map_err(|e| Error::io("starting a thread", e))?
            .join()
            .map_err(|_| Error::Config("the thread starting the tunnel panicked".into()))?
    }

    /// Replaces the peers at once. Workers pick up the new table at their
    /// next batch; sessions of peers whose public key stays are kept.
    pub fn set_peers(&self, peers: Vec<Peer>) -> Result<()> {
        let secure = self.shared.crypto.is_some();
        let old = self
            .shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut new = Peers::default();
        let mut seen = HashSet::new();
        for p in peers {
            if !seen.insert(p.subnet.trunc()) {
                return Err(Error::Config(format!(
                    "subnet {} is given for two peers",
                    p.subnet
                )));
            }
            let sp = match (secure, p.public_key) {
                (false, _) => None,
                (true, None) => {
                    return Err(Error::Config(format!(
                        "peer {} ({}) has no public key, which the secure backend needs",
                        p.endpoint, p.subnet
                    )))
                }
                (true, Some(key)) => Some(
                    new.by_key
                        .entry(key)
                        .or_insert_with(|| match old.by_key.get(&key) {
                            Some(sp) => {
                                *sp.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = p.endpoint;
                                sp.clone()
                            }
                            None => Arc::new(SecurePeer::new(key, p.endpoint)),
                        })
                        .clone(),
                ),
            };
            new.lpm.insert(p.subnet, new.list.len());
            new.by_endpoint.insert(p.endpoint);
            new.list.push(PeerEntry {
                endpoint: p.endpoint,
                secure: sp,
            });
        }
        tracing::debug!(ifname = %self.ifname, peers = new.list.len(), "peers replaced");
        *self.shared.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The UDP address the tunnel listens on (with the chosen port).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local_addr
    }

    /// Our public key in secure mode.
    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.public_key
    }

    /// Stops the workers and removes the TUN device.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd; every poller then sees it
        // readable (nobody reads it), so all threads wake and stop.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        tracing::info!(ifname = %self.ifname, "tunnel stopped");
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn local_addr(sock: &UdpSocket, asked: SocketAddrV4) -> Result<SocketAddrV4> {
    let mut sa = udp::sockaddr(asked);
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sa has room for a sockaddr_in.
    let rc = unsafe {
        libc::getsockname(
            sock.as_raw_fd(),
            &mut sa as *mut _ as *mut libc::sockaddr,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::io("getsockname", std::io::Error::last_os_error()));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Timers of the secure backend, every 250 ms until stopped.
fn housekeeper(shared: Arc<Shared>, sock: Arc<UdpSocket>, stop: Arc<OwnedFd>) {
    let Some(crypto) = shared.crypto.as_ref() else {
        return;
    };
    // Runs while the stop descriptor stays unreadable (Ok(0): timeout).
    let tick = Duration::from_millis(250).as_millis() as i32;
    while let Ok(0) = udp::wait_fd(stop.as_raw_fd(), libc::POLLIN, tick) {
        let peers: Vec<Arc<SecurePeer>> = shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .values()
            .cloned()
            .collect();
        crypto.housekeeping(&peers, &sock, &shared.counters);
    }
}
