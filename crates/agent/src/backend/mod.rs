//! Backends: how an overlay network's packets reach the other hosts. Each
//! backend is told the complete, current set of peers (the other hosts'
//! leases) and makes the kernel match it: level-triggered, so a missed
//! event or a restart is healed by the next call. One backend per file.

#[cfg(test)]
pub(crate) mod fake;
mod hostgw;
mod kernel;
mod lan;
mod userspace;
mod vxlan;

pub(crate) use hostgw::HostGw;
pub(crate) use kernel::Kernel;
pub(crate) use lan::SharedLan;
pub(crate) use userspace::{key_file, tun_device, Userspace};
pub(crate) use vxlan::Vxlan;

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use weft_kernel::KernelError;
pub(crate) use weft_model::api::PeerView as PeerState;
use weft_model::{BackendKind, Lease, Network};

/// Why a backend could not program something. Rendered with `to_string()`
/// as a peer's `problem` in `weft status`, so each message reads as the
/// reason a peer (or every peer of the network) has no traffic.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("network {network} is not an overlay network")]
    NotOverlay { network: String },
    /// vxlan: the device could not be made, found, brought up or addressed.
    #[error("no VXLAN device {device}: {source}")]
    VxlanDevice {
        device: String,
        #[source]
        source: KernelError,
    },
    /// lan: the network's bridge, which the VXLAN device joins, is not there.
    #[error(
        "no bridge {bridge} to put the VXLAN device on (the network is not set up on this host)"
    )]
    NoBridge { bridge: String },
    /// A device made a moment ago is not there.
    #[error("{device} vanished right after it was made")]
    DeviceVanished { device: String },
    /// udp/secure: the TUN device of a started tunnel could not be found
    /// or addressed.
    #[error("TUN device {device}: {source}")]
    TunDevice {
        device: String,
        #[source]
        source: KernelError,
    },
    /// secure: this host's own key cannot be read or made.
    #[error("the host's key: {0}")]
    HostKey(#[source] weft_tunnel::Error),
    #[error("cannot start the tunnel: {0}")]
    TunnelStart(#[source] weft_tunnel::Error),
    #[error("cannot give the tunnel its peers: {0}")]
    TunnelPeers(#[source] weft_tunnel::Error),
    /// secure: the key in a peer's lease does not decode.
    #[error("its public key is not valid: {0}")]
    PeerKeyInvalid(#[source] weft_tunnel::Error),
    /// secure: a peer's lease carries no key, so it gets no traffic at all.
    #[error(
        "its lease has no public key (is that host running the secure backend?); no traffic to it"
    )]
    NoPeerKey,
    /// vxlan: a peer's lease carries no VTEP MAC.
    #[error("its lease has no VTEP MAC (is that host running the vxlan backend?)")]
    NoVtepMac,
    /// host-gw: the peer is not on a connected subnet.
    #[error("{0} is not on a subnet directly connected to this host; host-gw needs all hosts on one L2 segment (use the vxlan backend otherwise)")]
    NotOnLink(Ipv4Addr),
    #[error("route to {subnet}{}: {source}", via_text(.via))]
    Route {
        subnet: Ipv4Net,
        via: Option<Ipv4Addr>,
        #[source]
        source: KernelError,
    },
    #[error("neighbour {ip} lladdr {}: {source}", weft_model::overlay::format_mac(.mac))]
    Neighbour {
        ip: Ipv4Addr,
        mac: [u8; 6],
        #[source]
        source: KernelError,
    },
    #[error("fdb {} dst {remote}: {source}", weft_model::overlay::format_mac(.mac))]
    Fdb {
        mac: [u8; 6],
        remote: Ipv4Addr,
        #[source]
        source: KernelError,
    },
    /// The blocking task that programs the kernel did not finish (it
    /// panicked); the next verify re-reads the kernel and heals.
    #[error("programming the kernel failed unexpectedly: {0}")]
    Panicked(String),
}

fn via_text(via: &Option<Ipv4Addr>) -> String {
    via.map(|v| format!(" via {v}")).unwrap_or_default()
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
        key_change: None,
    }
}

/// Every peer reported with the same problem (the backend could not start).
pub(crate) fn all_failed(peers: &[Lease], problem: &BackendError) -> Vec<PeerState> {
    let problem = problem.to_string();
    peers
        .iter()
        .map(|p| PeerState {
            problem: Some(problem.clone()),
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
        nl: &mut dyn Kernel,
        net: &Network,
        me: &Local,
        peers: &[Lease],
        verify: bool,
    ) -> Vec<PeerState>;
    /// Removes everything programmed for the network.
    fn teardown(&mut self, nl: &mut dyn Kernel);
    /// Route destinations this backend owns (marked with the overlay
    /// protocol), so the agent can remove stale ones nobody wants.
    fn owned_routes(&self) -> Vec<Ipv4Net>;
    /// Datapath counters for `weft status` (userspace backends).
    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        Default::default()
    }
}

/// A network's VXLAN device `wvx-<id>`: found, or made with the network's
/// VNI and port, this host's public address and VTEP MAC and MTU underlay
/// − 50 (`proxy`: answering ARP from its neighbour table, for a shared
/// subnet). `had_one`: the caller had one before (made again: logged).
/// Returns the link, whether it was made now, and its MTU.
pub(crate) fn vxlan_link(
    nl: &mut dyn Kernel,
    net: &Network,
    me: &Local,
    proxy: bool,
    had_one: bool,
) -> Result<(weft_kernel::Link, bool, u32), BackendError> {
    let Some(o) = net.overlay() else {
        return Err(BackendError::NotOverlay {
            network: net.name.clone(),
        });
    };
    let name = weft_model::overlay::vxlan_device(&net.id);
    let no_device = |source| BackendError::VxlanDevice {
        device: name.clone(),
        source,
    };
    let mtu = me.underlay_mtu.saturating_sub(o.backend.overhead());
    if let Some(l) = nl.link_by_name(&name).map_err(no_device)? {
        return Ok((l, false, mtu));
    }
    if had_one {
        tracing::warn!(device = %name, "the VXLAN device vanished; recreating it");
    }
    nl.add_vxlan(&weft_kernel::VxlanSpec {
        name: name.clone(),
        vni: o.vni,
        local: me.public_ip,
        dev: me.underlay,
        port: o.port,
        mac: weft_model::overlay::vtep_mac(&me.host_id, o.vni),
        mtu,
        proxy,
    })
    .map_err(no_device)?;
    tracing::info!(device = %name, vni = o.vni, port = o.port, mtu, proxy, "VXLAN device created");
    let l =
        nl.link_by_name(&name)
            .map_err(no_device)?
            .ok_or_else(|| BackendError::DeviceVanished {
                device: name.clone(),
            })?;
    Ok((l, true, mtu))
}

/// Deletes the link with `index`, if it is still there (a device's name is
/// derived from its network, which a teardown may no longer have).
pub(crate) fn delete_link_at(nl: &mut dyn Kernel, index: u32) {
    if let Ok(links) = nl.links() {
        if let Some(l) = links.into_iter().find(|l| l.index == index) {
            let _ = nl.delete_link(&l.name);
        }
    }
}

/// The device a network's backend carries its packets on, when it has one
/// of its own (host-gw routes through the underlay interface).
pub(crate) fn device_of(net: &Network) -> Option<String> {
    match net.overlay()?.backend {
        BackendKind::Vxlan => Some(weft_model::overlay::vxlan_device(&net.id)),
        BackendKind::Udp | BackendKind::Secure => Some(tun_device(&net.id)),
        BackendKind::HostGw => None,
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
