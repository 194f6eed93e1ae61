//! Backends: how an overlay network's packets reach the other hosts. Each
//! backend is told the complete, current set of peers (the other hosts'
//! leases) and makes the kernel match it: level-triggered, so a missed
//! event or a restart is healed by the next call. One backend per file.

mod hostgw;

pub(crate) use hostgw::HostGw;

use ipnet::Ipv4Net;
use weft_kernel::Netlink;
pub(crate) use weft_model::api::PeerView as PeerState;
use weft_model::{BackendKind, Lease, Network};

pub(crate) trait Backend: Send {
    /// Makes the kernel hold exactly what `peers` need (adds, replaces and
    /// removes), and reports each peer. Uses the backend's memory of what it
    /// programmed; `verify` re-reads the kernel first, to heal changes made
    /// behind weft's back.
    fn program(
        &mut self,
        nl: &mut Netlink,
        net: &Network,
        peers: &[Lease],
        verify: bool,
    ) -> Vec<PeerState>;
    /// Removes everything programmed for the network.
    fn teardown(&mut self, nl: &mut Netlink);
    /// Route destinations this backend owns (marked with the overlay
    /// protocol), so the agent can remove stale ones nobody wants.
    fn owned_routes(&self) -> Vec<Ipv4Net>;
}

pub(crate) fn new(kind: BackendKind) -> Option<Box<dyn Backend>> {
    match kind {
        BackendKind::HostGw => Some(Box::new(HostGw::default())),
        _ => None,
    }
}
