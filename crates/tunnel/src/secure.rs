//! The secure backend's protocol: Noise IK handshakes (snow) between host
//! pairs, and per-packet AES-256-GCM under the keys they agree (ring's
//! AES-NI/VAES code: on x86 servers several times faster than
//! ChaCha20-Poly1305, which WireGuard prefers for CPUs without AES
//! instructions).
//!
//! Wire format (all integers little-endian), modelled on WireGuard's:
//!
//! ```text
//! initiation  [1,0,0,0][sender index u32][Noise IK message 1: e, es, s, ss, timestamp]   116 bytes
//! response    [2,0,0,0][sender index u32][receiver index u32][Noise IK message 2: e, ee, se]  60 bytes
//! data        [4,0,0,0][receiver index u32][counter u64][ciphertext of the inner packet + 16-byte tag]
//! ```
//!
//! The counter is the AEAD nonce, so the header is authenticated without
//! associated data: a changed counter or index decrypts under the wrong
//! nonce or key and fails. The initiator's 12-byte timestamp (seconds and
//! nanoseconds, big-endian) lets the responder refuse a replayed
//! initiation. A responder sends on a new session only once the initiator
//! has used it (key confirmation; the initiator sends an empty keepalive
//! at once), so a replayed or forged initiation can never make it switch.

use crate::error::Result;
use crate::stats::Counters;
use crate::udp::UdpSocket;
use snow::{HandshakeState, StatelessTransportState};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) const MSG_INIT: u8 = 1;
pub(crate) const MSG_RESP: u8 = 2;
pub(crate) const MSG_DATA: u8 = 4;
pub(crate) const DATA_HEADER: usize = 16;
const TAG: usize = 16;
/// Bytes a data message adds to an inner packet.
pub const OVERHEAD: usize = DATA_HEADER + TAG;
const INIT_LEN: usize = 8 + 32 + 48 + 12 + TAG;
const RESP_LEN: usize = 12 + 32 + TAG;
const PROTOCOL: &str = "Noise_IK_25519_AESGCM_BLAKE2s";
/// Binds every handshake to this protocol and version: a handshake of
/// another program using the same keys cannot be confused with ours.
const PROLOGUE: &[u8] = b"weft-tunnel v1";
/// A handshake without answer is sent again after this long…
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// …until this long has passed; then queued packets are dropped.
const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// Packets kept per peer while its session is being set up.
const QUEUE_MAX: usize = 1024;

/// When sessions are replaced. Defaults are WireGuard's: a new handshake
/// after 2 minutes or 2^60 messages, and a session is never used after
/// 3 minutes or 2^64 - 2^13 - 1 messages, so a nonce can never wrap.
#[derive(Debug, Clone, Copy)]
pub struct RekeyPolicy {
    pub after_time: Duration,
    pub after_messages: u64,
    pub reject_after_time: Duration,
    pub reject_after_messages: u64,
}

impl Default for RekeyPolicy {
    fn default() -> Self {
        RekeyPolicy {
            after_time: Duration::from_secs(120),
            after_messages: 1 << 60,
            reject_after_time: Duration::from_secs(180),
            reject_after_messages: u64::MAX - (1 << 13),
        }
    }
}

/// Sliding window of seen counters (2048 wide, as a ring of 64-bit words
/// in the manner of RFC 6479): a counter is accepted once, and not at all
/// when it is more than the window behind the highest seen.
#[derive(Debug)]
pub(crate) struct ReplayWindow {
    /// Highest counter accepted + 1 (0: none yet).
    top: u64,
    bits: [u64; WORDS],
}

const WORDS: usize = 32;
const WINDOW: u64 = (WORDS as u64 - 1) * 64;

impl ReplayWindow {
    pub fn new() -> Self {
        ReplayWindow {
            top: 0,
            bits: [0; WORDS],
        }
    }

    /// Whether `c` would be accepted.
    fn fresh(&self, c: u64) -> bool {
        if c >= self.top {
            return true;
        }
        if self.top - c > WINDOW {
            return false;
        }
        self.bits[(c / 64) as usize % WORDS] & (1 << (c % 64)) == 0
    }

    /// Records `c` if fresh; false for a replay. Only authenticated
    /// counters may be recorded, or a forger could advance the window.
    pub fn accept(&mut self, c: u64) -> bool {
        if !self.fresh(c) {
            return false;
        }
        if c >= self.top {
            // Clear the words the window slides over.
            let from = if self.top == 0 {
                0
            } else {
                (self.top - 1) / 64 + 1
            };
            let to = c / 64;
            if self.top == 0 || to.saturating_sub(from) >= WORDS as u64 {
                self.bits = [0; WORDS];
            } else if to >= from {
                for w in from..=to {
                    self.bits[w as usize % WORDS] = 0;
                }
            }
            self.top = c + 1;
        }
        self.bits[(c / 64) as usize % WORDS] |= 1 << (c % 64);
        true
    }
}

pub(crate) struct Session {
    pub local_index: u32,
    pub remote_index: u32,
    transport: StatelessTransportState,
    pub created: Instant,
    pub initiator: bool,
    next_counter: AtomicU64,
    replay: Mutex<ReplayWindow>,
    pub peer: Weak<SecurePeer>,
    /// Responder sessions send only once the initiator has used them.
    confirmed: AtomicBool,
    rekey_started: AtomicBool,
}

/// Why a data message was refused.
pub(crate) enum OpenError {
    BadAuth,
    Replayed,
}

impl Session {
    /// Reserves the next counter, or None when the session is spent or
    /// too old to send on. Never lets a counter pass the reject limit, so
    /// the nonce cannot wrap whatever the traffic.
    pub fn reserve(&self, policy: &RekeyPolicy) -> Option<u64> {
        if self.created.elapsed() >= policy.reject_after_time {
            return None;
        }
        self.next_counter
            .fetch_update(Relaxed, Relaxed, |c| {
                (c < policy.reject_after_messages).then_some(c + 1)
            })
            .ok()
    }

    pub fn wants_rekey(&self, policy: &RekeyPolicy) -> bool {
        // The responder waits a little longer than the initiator, so the
        // two do not both start a handshake at the same moment.
        let after = if self.initiator {
            policy.after_time
        } else {
            policy.after_time + REKEY_TIMEOUT * 2
        };
        self.created.elapsed() >= after || self.next_counter.load(Relaxed) >= policy.after_messages
    }

    pub fn usable(&self, policy: &RekeyPolicy) -> bool {
        self.created.elapsed() < policy.reject_after_time
    }

    /// Writes a data message for `plain` under `counter` into `out` (which
    /// must hold `plain.len() + OVERHEAD`); returns its length.
    pub fn seal(&self, counter: u64, plain: &[u8], out: &mut [u8]) -> usize {
        out[..4].copy_from_slice(&[MSG_DATA, 0, 0, 0]);
        out[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        out[8..16].copy_from_slice(&counter.to_le_bytes());
        match self
            .transport
            .write_message(counter, plain, &mut out[DATA_HEADER..])
        {
            Ok(n) => DATA_HEADER + n,
            // Only for a payload over 64 KB or a short buffer, which the
            // callers rule out; an empty result makes the caller drop it.
            Err(e) => {
                tracing::error!(error = %e, "encrypting a packet failed");
                0
            }
        }
    }

    /// Decrypts data message `msg` (header included) into `out`; returns
    /// the inner packet's length.
    pub fn open(
        &self,
        msg: &[u8],
        out: &mut [u8],
        policy: &RekeyPolicy,
    ) -> Result<usize, OpenError> {
        let counter = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
        if counter >= policy.reject_after_messages || !self.usable(policy) {
            return Err(OpenError::BadAuth);
        }
        // Authenticate first, then look at the counter: a modified copy of
        // a seen datagram counts as forged, only an authentic one as a
        // replay, and only authentic counters ever move the window.
        let n = self
            .transport
            .read_message(counter, &msg[DATA_HEADER..], out)
            .map_err(|_| OpenError::BadAuth)?;
        if !self
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept(counter)
        {
            return Err(OpenError::Replayed);
        }
        Ok(n)
    }
}

/// Per-host crypto state, kept across `set_peers` for as long as a peer
/// with the same public key is configured.
pub(crate) struct SecurePeer {
    pub public_key: [u8; 32],
    pub endpoint: Mutex<SocketAddrV4>,
    current: RwLock<Option<Arc<Session>>>,
    hs: Mutex<HsState>,
}

#[derive(Default)]
struct HsState {
    pending: Option<Pending>,
    /// When the current round of attempts started (for giving up).
    started: Option<Instant>,
    /// Newest initiation timestamp accepted from this peer.
    last_ts: [u8; 12],
    queue: VecDeque<Vec<u8>>,
}

struct Pending {
    hs: HandshakeState,
    local_index: u32,
    sent_at: Instant,
}

impl SecurePeer {
    pub fn new(public_key: [u8; 32], endpoint: SocketAddrV4) -> SecurePeer {
        SecurePeer {
            public_key,
            endpoint: Mutex::new(endpoint),
            current: RwLock::new(None),
            hs: Mutex::new(HsState::default()),
        }
    }

    /// The session to send on, if one is established and not expired.
    pub fn current(&self, policy: &RekeyPolicy) -> Option<Arc<Session>> {
        let s = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        s.usable(policy).then_some(s)
    }

    fn endpoint(&self) -> SocketAddrV4 {
        *self.endpoint.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Entry {
    Pending(Weak<SecurePeer>),
    Session(Arc<Session>),
}

pub(crate) struct Crypto {
    keys: crate::Keys,
    pub policy: RekeyPolicy,
    params: snow::params::NoiseParams,
    index: RwLock<HashMap<u32, Entry>>,
}

fn timestamp() -> [u8; 12] {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut ts = [0u8; 12];
    ts[..8].copy_from_slice(&now.as_secs().to_be_bytes());
    ts[8..].copy_from_slice(&now.subsec_nanos().to_be_bytes());
    ts
}

impl Crypto {
    pub fn new(keys: crate::Keys, policy: RekeyPolicy) -> Result<Crypto> {
        Ok(Crypto {
            keys,
            policy,
            params: PROTOCOL.parse()?,
            index: RwLock::new(HashMap::new()),
        })
    }

    /// A random local index not in use (0 is never used, for readability
    /// of captures).
    fn new_index(&self, map: &HashMap<u32, Entry>) -> Result<u32> {
        loop {
            let mut b = [0u8; 4];
            crate::random_bytes(&mut b)?;
            let i = u32::from_le_bytes(b);
            if i != 0 && !map.contains_key(&i) {
                return Ok(i);
            }
        }
    }

    pub fn session(&self, index: u32) -> Option<Arc<Session>> {
        match self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index)
        {
            Some(Entry::Session(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Queues an inner packet for `peer`, which has no session to send on,
    /// and makes sure a handshake is under way. A full queue drops its
    /// oldest packet (counted as `dropped_no_session`).
    pub fn queue(&self, peer: &Arc<SecurePeer>, packet: &[u8], sock: &UdpSocket, c: &Counters) {
        let mut hs = peer.hs.lock().unwrap_or_else(|p| p.into_inner());
        if hs.queue.len() >= QUEUE_MAX {
            hs.queue.pop_front();
            c.dropped_no_session.fetch_add(1, Relaxed);
        }
        hs.queue.push_back(packet.to_vec());
        self.initiate_locked(peer, &mut hs, sock, c, false);
    }

    /// Starts a handshake with `peer` unless one is already waiting for
    /// its answer.
    pub fn initiate(&self, peer: &Arc<SecurePeer>, sock: &UdpSocket, c: &Counters) {
        let mut hs = peer.hs.lock().unwrap_or_else(|p| p.into_inner());
        self.initiate_locked(peer, &mut hs, sock, c, false);
    }

    fn initiate_locked(
        &self,
        peer: &Arc<SecurePeer>,
        hs: &mut HsState,
        sock: &UdpSocket,
        c: &Counters,
        retry: bool,
    ) {
        if let Some(p) = &hs.pending {
            if !retry && p.sent_at.elapsed() < REKEY_TIMEOUT {
                return;
            }
        }
        match self.write_initiation(peer, hs) {
            Ok(msg) => {
                let dst = peer.endpoint();
                c.handshakes_sent.fetch_add(1, Relaxed);
                tracing::debug!(peer = %dst, "sending handshake initiation");
                if let Err(e) = sock.send_to(&msg, dst) {
                    tracing::debug!(peer = %dst, error = %e, "sending handshake initiation failed");
                    c.send_errors.fetch_add(1, Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "building a handshake initiation failed"),
        }
    }

    fn write_initiation(&self, peer: &Arc<SecurePeer>, hs: &mut HsState) -> Result<Vec<u8>> {
        let mut state = snow::Builder::new(self.params.clone())
            .local_private_key(self.keys.private_key())?
            .remote_public_key(&peer.public_key)?
            .prologue(PROLOGUE)?
            .build_initiator()?;
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = hs.pending.take() {
            index.remove(&old.local_index);
        }
        let local_index = self.new_index(&index)?;
        let mut msg = vec![0u8; INIT_LEN];
        msg[0] = MSG_INIT;
        msg[4..8].copy_from_slice(&local_index.to_le_bytes());
        let n = state.write_message(&timestamp(), &mut msg[8..])?;
        msg.truncate(8 + n);
        index.insert(local_index, Entry::Pending(Arc::downgrade(peer)));
        hs.started.get_or_insert_with(Instant::now);
        hs.pending = Some(Pending {
            hs: state,
            local_index,
            sent_at: Instant::now(),
        });
        Ok(msg)
    }

    /// A handshake initiation from `src`. `find` gives the configured peer
    /// for a public key.
    pub fn on_initiation(
        &self,
        msg: &[u8],
        src: SocketAddrV4,
        find: impl Fn(&[u8; 32]) -> Option<Arc<SecurePeer>>,
        sock: &UdpSocket,
        c: &Counters,
    ) {
        let reject = |why: &str| {
            c.handshakes_rejected.fetch_add(1, Relaxed);
            tracing::debug!(%src, why, "handshake initiation rejected");
        };
        if msg.len() != INIT_LEN {
            return reject("wrong length");
        }
        let mut state = match snow::Builder::new(self.params.clone())
            .local_private_key(self.keys.private_key())
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_responder())
        {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, "building a handshake responder failed"),
        };
        let mut ts = [0u8; 32];
        // Fails when the sender did not use our public key (or forged it).
        let Ok(12) = state.read_message(&msg[8..], &mut ts) else {
            return reject("does not decrypt under our key");
        };
        let Some(rs) = state
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
        else {
            return reject("no static key");
        };
        let Some(peer) = find(&rs) else {
            return reject("unknown public key");
        };
        let sender = u32::from_le_bytes(msg[4..8].try_into().expect("4 bytes"));
        let mut hs = peer.hs.lock().unwrap_or_else(|p| p.into_inner());
        let ts: [u8; 12] = ts[..12].try_into().expect("12 bytes");
        if ts <= hs.last_ts {
            return reject("replayed initiation (timestamp not newer)");
        }
        let mut resp = vec![0u8; RESP_LEN];
        resp[0] = MSG_RESP;
        let n = match state.write_message(&[], &mut resp[12..]) {
            Ok(n) => n,
            Err(e) => return tracing::warn!(error = %e, "writing a handshake response failed"),
        };
        resp.truncate(12 + n);
        let transport = match state.into_stateless_transport_mode() {
            Ok(t) => t,
            Err(e) => return tracing::warn!(error = %e, "finishing a handshake failed"),
        };
        hs.last_ts = ts;
        let session = {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            let local_index = match self.new_index(&index) {
                Ok(i) => i,
                Err(e) => return tracing::warn!(error = %e, "no session index"),
            };
            let s = Arc::new(self.make_session(local_index, sender, transport, false, &peer));
            index.insert(local_index, Entry::Session(s.clone()));
            s
        };
        resp[4..8].copy_from_slice(&session.local_index.to_le_bytes());
        resp[8..12].copy_from_slice(&sender.to_le_bytes());
        drop(hs);
        c.handshakes_completed.fetch_add(1, Relaxed);
        tracing::debug!(%src, "handshake completed as responder");
        if let Err(e) = sock.send_to(&resp, src) {
            tracing::debug!(%src, error = %e, "sending handshake response failed");
            c.send_errors.fetch_add(1, Relaxed);
        }
    }

    fn make_session(
        &self,
        local_index: u32,
        remote_index: u32,
        transport: StatelessTransportState,
        initiator: bool,
        peer: &Arc<SecurePeer>,
    ) -> Session {
        Session {
            local_index,
            remote_index,
            transport,
            created: Instant::now(),
            initiator,
            next_counter: AtomicU64::new(0),
            replay: Mutex::new(ReplayWindow::new()),
            peer: Arc::downgrade(peer),
            confirmed: AtomicBool::new(initiator),
            rekey_started: AtomicBool::new(false),
        }
    }

    /// A handshake response: completes our pending initiation.
    pub fn on_response(&self, msg: &[u8], src: SocketAddrV4, sock: &UdpSocket, c: &Counters) {
        let reject = |why: &str| {
            c.handshakes_rejected.fetch_add(1, Relaxed);
            tracing::debug!(%src, why, "handshake response rejected");
        };
        if msg.len() != RESP_LEN {
            return reject("wrong length");
        }
        let sender = u32::from_le_bytes(msg[4..8].try_into().expect("4 bytes"));
        let receiver = u32::from_le_bytes(msg[8..12].try_into().expect("4 bytes"));
        let peer = match self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&receiver)
        {
            Some(Entry::Pending(p)) => p.upgrade(),
            _ => None,
        };
        let Some(peer) = peer else {
            return reject("no handshake pending under that index");
        };
        let mut hs = peer.hs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut pending) = hs.pending.take_if(|p| p.local_index == receiver) else {
            return reject("stale response");
        };
        let mut empty = [0u8; 16];
        let transport = match pending.hs.read_message(&msg[12..], &mut empty) {
            Ok(0) => pending.hs.into_stateless_transport_mode(),
            _ => {
                // A forged response must not cancel the real handshake.
                hs.pending = Some(pending);
                return reject("does not decrypt (wrong key or modified)");
            }
        };
        let transport = match transport {
            Ok(t) => t,
            Err(e) => return tracing::warn!(error = %e, "finishing a handshake failed"),
        };
        let session = Arc::new(self.make_session(receiver, sender, transport, true, &peer));
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(receiver, Entry::Session(session.clone()));
        hs.started = None;
        c.handshakes_completed.fetch_add(1, Relaxed);
        tracing::debug!(%src, "handshake completed as initiator");
        // The keepalive confirms the session to the responder, which
        // sends nothing on it before that.
        self.send_one(&session, &[], &peer, sock, c);
        self.install(&peer, session, &mut hs, sock, c);
    }

    /// Makes `session` the one `peer` sends on (if newer) and sends what
    /// was queued waiting for it.
    fn install(
        &self,
        peer: &Arc<SecurePeer>,
        session: Arc<Session>,
        hs: &mut HsState,
        sock: &UdpSocket,
        c: &Counters,
    ) {
        {
            let mut cur = peer.current.write().unwrap_or_else(|p| p.into_inner());
            if cur
                .as_ref()
                .is_none_or(|old| old.created <= session.created)
            {
                *cur = Some(session.clone());
            }
        }
        let queued: Vec<Vec<u8>> = hs.queue.drain(..).collect();
        for p in queued {
            self.send_one(&session, &p, peer, sock, c);
        }
    }

    fn send_one(
        &self,
        s: &Session,
        plain: &[u8],
        peer: &SecurePeer,
        sock: &UdpSocket,
        c: &Counters,
    ) {
        let Some(counter) = s.reserve(&self.policy) else {
            c.dropped_no_session.fetch_add(1, Relaxed);
            return;
        };
        let mut out = vec![0u8; plain.len() + OVERHEAD];
        let n = s.seal(counter, plain, &mut out);
        if n == 0 {
            return;
        }
        if let Err(e) = sock.send_to(&out[..n], peer.endpoint()) {
            tracing::debug!(error = %e, "sending a queued packet failed");
            c.send_errors.fetch_add(1, Relaxed);
        } else if !plain.is_empty() {
            c.tx_packets.fetch_add(1, Relaxed);
            c.tx_bytes.fetch_add(plain.len() as u64, Relaxed);
        }
    }

    /// Called for every authentic data message: a responder's session
    /// becomes usable for sending on the first one.
    pub fn on_authentic(&self, s: &Arc<Session>, sock: &UdpSocket, c: &Counters) {
        if s.confirmed.load(Relaxed) || s.confirmed.swap(true, Relaxed) {
            return;
        }
        if let Some(peer) = s.peer.upgrade() {
            let mut hs = peer.hs.lock().unwrap_or_else(|p| p.into_inner());
            self.install(&peer, s.clone(), &mut hs, sock, c);
        }
    }

    /// Starts a rekey once per session when it is due (from the send path).
    pub fn maybe_rekey(&self, s: &Session, peer: &Arc<SecurePeer>, sock: &UdpSocket, c: &Counters) {
        if s.wants_rekey(&self.policy) && !s.rekey_started.swap(true, Relaxed) {
            tracing::debug!(local_index = s.local_index, "session due for rekey");
            self.initiate(peer, sock, c);
        }
    }

    /// Every few hundred milliseconds: resend unanswered initiations, give
    /// up on hopeless ones, forget expired sessions and removed peers.
    pub fn housekeeping(&self, peers: &[Arc<SecurePeer>], sock: &UdpSocket, c: &Counters) {
        for peer in peers {
            let mut hs = peer.hs.lock().unwrap_or_else(|p| p.into_inner());
            let waiting = hs
                .pending
                .as_ref()
                .is_some_and(|p| p.sent_at.elapsed() >= REKEY_TIMEOUT);
            if waiting {
                if hs
                    .started
                    .is_some_and(|t| t.elapsed() >= REKEY_ATTEMPT_TIME)
                {
                    let dropped = hs.queue.len() as u64;
                    hs.queue.clear();
                    if let Some(p) = hs.pending.take() {
                        self.index
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&p.local_index);
                    }
                    hs.started = None;
                    c.dropped_no_session.fetch_add(dropped, Relaxed);
                    tracing::warn!(peer = %peer.endpoint(), dropped, "no handshake answer; giving up for now");
                } else {
                    self.initiate_locked(peer, &mut hs, sock, c, true);
                }
            }
            let mut cur = peer.current.write().unwrap_or_else(|p| p.into_inner());
            if cur.as_ref().is_some_and(|s| !s.usable(&self.policy)) {
                *cur = None;
            }
        }
        let policy = self.policy;
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, e| match e {
                Entry::Session(s) => s.usable(&policy) && s.peer.strong_count() > 0,
                Entry::Pending(p) => p.strong_count() > 0,
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(2));
        assert!(w.accept(1));
        assert!(!w.accept(1));
        assert!(w.accept(5000));
        // Far behind the top: refused even though never seen.
        assert!(!w.accept(5000 - WINDOW - 1));
        assert!(w.accept(5000 - 100));
        assert!(!w.accept(5000 - 100));
        // A jump past a whole window clears it.
        assert!(w.accept(1_000_000));
        assert!(w.accept(999_999));
        assert!(!w.accept(2));
        // Word boundaries.
        let mut w = ReplayWindow::new();
        for c in 0..10_000u64 {
            assert!(w.accept(c), "{c}");
        }
        for c in 10_000 - WINDOW..10_000 {
            assert!(!w.accept(c), "{c}");
        }
    }

    #[test]
    fn reserve_never_passes_reject_limit() {
        let keys = crate::Keys::generate().unwrap();
        let peer_keys = crate::Keys::generate().unwrap();
        let policy = RekeyPolicy {
            reject_after_messages: 3,
            ..RekeyPolicy::default()
        };
        let params: snow::params::NoiseParams = PROTOCOL.parse().unwrap();
        let mut i = snow::Builder::new(params.clone())
            .local_private_key(keys.private_key())
            .unwrap()
            .remote_public_key(&peer_keys.public_key())
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut r = snow::Builder::new(params)
            .local_private_key(peer_keys.private_key())
            .unwrap()
            .build_responder()
            .unwrap();
        let mut m1 = [0u8; 200];
        let mut p = [0u8; 200];
        let n = i.write_message(&[], &mut m1).unwrap();
        r.read_message(&m1[..n], &mut p).unwrap();
        // The derived public key is the one the handshake saw.
        assert_eq!(r.get_remote_static().unwrap(), &keys.public_key());
        let n = r.write_message(&[], &mut m1).unwrap();
        i.read_message(&m1[..n], &mut p).unwrap();
        let peer = Arc::new(SecurePeer::new(
            peer_keys.public_key(),
            "198.51.100.2:8285".parse().unwrap(),
        ));
        let crypto = Crypto::new(keys, policy).unwrap();
        let s = crypto.make_session(
            1,
            2,
            i.into_stateless_transport_mode().unwrap(),
            true,
            &peer,
        );
        let rt = r.into_stateless_transport_mode().unwrap();
        let mut out = [0u8; 64];
        for want in 0..3 {
            let c = s.reserve(&policy).unwrap();
            assert_eq!(c, want);
            let n = s.seal(c, b"hello", &mut out);
            let mut plain = [0u8; 64];
            assert_eq!(
                rt.read_message(c, &out[DATA_HEADER..n], &mut plain)
                    .unwrap(),
                5
            );
        }
        assert_eq!(s.reserve(&policy), None);
        assert_eq!(s.reserve(&policy), None);
    }
}
