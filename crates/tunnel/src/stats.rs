//! Counters of the datapath.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of a tunnel's counters since start. Packets and bytes are
/// inner IP packets (what the TUN device sees), summed over all queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Inner packets sent to peers (after GSO splitting), and their bytes.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Inner packets received from peers and written to the TUN device.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Outgoing packets to an address no peer's subnet contains (or not IPv4).
    pub dropped_no_peer: u64,
    /// Outgoing packets dropped because no session with the peer could be
    /// established in time (secure mode; they are queued first, never sent
    /// in plaintext).
    pub dropped_no_session: u64,
    /// Datagrams whose authentication failed: modified, forged, or under a
    /// key we do not hold.
    pub dropped_bad_auth: u64,
    /// Datagrams whose counter was already seen or is too old (replays).
    pub dropped_replayed: u64,
    /// Datagrams from an unknown sender: (plain) not a peer's endpoint,
    /// (secure) a session index we do not have.
    pub dropped_unknown_sender: u64,
    /// Decrypted packets whose inner source is not in the sending peer's
    /// subnet (a peer may only speak for its own subnet).
    pub dropped_bad_source: u64,
    /// Datagrams or TUN reads too short or otherwise malformed.
    pub dropped_malformed: u64,
    /// Datagrams the kernel refused to send, and packets the TUN device
    /// refused.
    pub send_errors: u64,
    pub tun_errors: u64,
    /// Handshake initiations sent, handshakes completed (either role), and
    /// handshake messages rejected (bad key, unknown peer, replayed
    /// initiation).
    pub handshakes_sent: u64,
    pub handshakes_completed: u64,
    pub handshakes_rejected: u64,
}

macro_rules! counters {
    ($($f:ident),* $(,)?) => {
        /// The live counters, shared by the workers.
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $(pub $f: AtomicU64,)* }

        impl Counters {
            pub fn snapshot(&self) -> Stats {
                Stats { $($f: self.$f.load(Relaxed),)* }
            }
        }

        /// A worker's counts for one batch, added to [`Counters`] at once so
        /// the shared cache lines are touched once per batch, not per packet.
        #[derive(Debug, Default)]
        pub(crate) struct Local { $(pub $f: u64,)* }

        impl Local {
            pub fn flush(&mut self, to: &Counters) {
                $(if self.$f != 0 { to.$f.fetch_add(std::mem::take(&mut self.$f), Relaxed); })*
            }
        }
    };
}

counters!(
    tx_packets,
    tx_bytes,
    rx_packets,
    rx_bytes,
    dropped_no_peer,
    dropped_no_session,
    dropped_bad_auth,
    dropped_replayed,
    dropped_unknown_sender,
    dropped_bad_source,
    dropped_malformed,
    send_errors,
    tun_errors,
    handshakes_sent,
    handshakes_completed,
    handshakes_rejected,
);
