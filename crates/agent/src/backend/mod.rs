//! Backends: how an overlay network's packets reach the other hosts. Each
//! backend is told the complete, current set of peers (the other hosts'
//! leases) and makes the kernel match it: level-triggered, so a missed
//! event or a restart is healed by the next call. One backend per file.

mod hostgw;
mod userspace;
mod vxlan;

pub(crate) use hostgw::HostGw;
pub(crate) use userspace::{key_file, Userspace};
pub(crate) use vxlan::Vxlan;

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use weft_kernel::Netlink;
pub(crate) use weft_model::api::PeerView as PeerState;
use weft_model::{BackendKind, Lease, Network};

/// Why a backend could not program something.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Kernel(#[from] weft_kernel::KernelError),
    #[error("{0}")]
    Other(String),
}

/// This host as the backends need it.
#[derive(Debug, Clone)]
pub(crate) struct Local {
    pub host_id: String,
    pub public_ip: Ipv4Addr,
    /// The interface that carries `public_ip`, and its MTU.
    pub underlay: u32,
    pub underlay_mtu: u32,
    /// This host's leased subnet of the network being programmed.
    pub subnet: Ipv4Net,
    /// The agent's data dir (the secure backend's key lives there).
    pub data_dir: std::path::PathBuf,
}

/// A peer's report with nothing programmed yet.
pub(crate) fn peer_state(p: &Lease) -> PeerState {
    PeerState {
        node: p.node.clone(),
        subnet: p.subnet,
        public_ip: p.public_ip,
        programmed: None,
        problem: None,
    }
}

/// Every peer reported with the same problem (the backend could not start).
pub(crate) fn all_failed(peers: &[Lease], problem: &str) -> Vec<PeerState> {
    peers
        .iter()
        .map(|p| PeerState {
            problem: Some(problem.to_string()),
            ..peer_state(p)
        })
        .collect()
}

/// Whether `ip` is on one of the connected subnets in `connected`.
pub(crate) fn on_link(connected: &[weft_kernel::Route], ip: Ipv4Addr) -> bool {
    connected
        .iter()
        .any(|r| r.dst.prefix_len() > 0 && r.dst.contains(&ip))
}

pub(crate) trait Backend: Send {
    /// Makes the kernel hold exactly what `peers` need (adds, replaces and
    /// removes), and reports each peer. Uses the backend's memory of what it
    /// programmed; `verify` re-reads the kernel first, to heal changes made
    /// behind weft's back.
    fn program(
        &mut self,
        nl: &mut Netlink,
        net: &Network,
        me: &Local,
        peers: &[Lease],
        verify: bool,
    ) -> Vec<PeerState>;
    /// Removes everything programmed for the network.
    fn teardown(&mut self, nl: &mut Netlink);
    /// Route destinations this backend owns (marked with the overlay
    /// protocol), so the agent can remove stale ones nobody wants.
    fn owned_routes(&self) -> Vec<Ipv4Net>;
    /// Datapath counters for `weft status` (userspace backends).
    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        Default::default()
    }
}

pub(crate) fn new(kind: BackendKind) -> Option<Box<dyn Backend>> {
    match kind {
        BackendKind::HostGw => Some(Box::new(HostGw::default())),
        BackendKind::Vxlan => Some(Box::new(Vxlan::default())),
        BackendKind::Udp => Some(Box::new(Userspace::new(false))),
        BackendKind::Secure => Some(Box::new(Userspace::new(true))),
    }
}
