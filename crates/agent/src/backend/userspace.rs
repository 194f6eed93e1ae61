//! udp and secure: the userspace datapath (weft-tunnel). A TUN device per
//! overlay network (`wtu-<id>`) carries this host's subnet address (so the
//! host's own packets to peers leave with a source inside its subnet); each
//! peer's subnet is routed into it, and the tunnel sends each packet to the
//! peer's public address in a UDP datagram, encrypted and authenticated
//! per host pair in secure mode. In secure mode a peer without a public key
//! in its lease gets no traffic at all: never plaintext.
//!
//! The TUN device lives as long as the agent's process: a restarted agent
//! makes it again (a short interruption that kernel backends do not have).

use super::{all_failed, peer_state, Backend, BackendError, Kernel, Local, PeerState};
use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use tracing::{info, warn};
use weft_kernel::{Route, OVERLAY_ROUTE_PROTOCOL};
use weft_model::{Lease, Network};
use weft_tunnel::{decode_key, Keys, Peer, Tunnel, TunnelConfig};

/// The TUN device of an overlay network.
pub(crate) fn tun_device(network_id: &str) -> String {
    format!("wtu-{}", &network_id[..10.min(network_id.len())])
}

/// The file with this host's private key for the secure backend (0600).
pub(crate) fn key_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("secure.key")
}

pub(crate) struct Userspace {
    secure: bool,
    tunnel: Option<Tunnel>,
    dev: Option<u32>,
    /// Peer subnets routed into the device.
    routes: BTreeSet<Ipv4Net>,
    /// What the tunnel was given last.
    peers: Vec<Peer>,
}

impl Userspace {
    pub fn new(secure: bool) -> Userspace {
        Userspace {
            secure,
            tunnel: None,
            dev: None,
            routes: BTreeSet::new(),
            peers: Vec::new(),
        }
    }

    fn ensure_tunnel(
        &mut self,
        nl: &mut dyn Kernel,
        net: &Network,
        me: &Local,
    ) -> Result<u32, BackendError> {
        let name = tun_device(&net.id);
        if let (Some(_), Some(dev)) = (&self.tunnel, self.dev) {
            match nl.link_by_name(&name) {
                Ok(Some(l)) if l.index == dev => return Ok(dev),
                _ => {
                    warn!(device = %name, "the TUN device vanished; restarting the tunnel");
                    if let Some(t) = self.tunnel.take() {
                        t.stop();
                    }
                    self.routes.clear();
                    self.peers.clear();
                }
            }
        }
        let Some(o) = net.overlay() else {
            return Err(BackendError::NotOverlay {
                network: net.name.clone(),
            });
        };
        let mut cfg = TunnelConfig::new(
            name.clone(),
            TunnelConfig::mtu_for(me.underlay_mtu, self.secure),
            SocketAddrV4::new(me.public_ip, o.port),
        );
        if self.secure {
            let keys =
                Keys::load_or_create(&key_file(&me.data_dir)).map_err(BackendError::HostKey)?;
            cfg.crypto = Some(keys);
        }
        let tunnel = Tunnel::start(cfg).map_err(BackendError::TunnelStart)?;
        let no_device = |source| BackendError::TunDevice {
            device: name.clone(),
            source,
        };
        // On failure below the tunnel is dropped, which stops it; the next
        // call starts again.
        let dev = nl
            .link_by_name(&name)
            .map_err(no_device)?
            .ok_or_else(|| BackendError::DeviceVanished {
                device: name.clone(),
            })?
            .index;
        nl.add_address(dev, Ipv4Net::new(me.subnet.network(), 32).expect("valid"))
            .map_err(no_device)?;
        info!(device = %name, port = o.port, secure = self.secure, "userspace tunnel ready");
        self.tunnel = Some(tunnel);
        self.dev = Some(dev);
        Ok(dev)
    }
}

impl Backend for Userspace {
    fn program(
        &mut self,
        nl: &mut dyn Kernel,
        net: &Network,
        me: &Local,
        peers: &[Lease],
        verify: bool,
    ) -> Vec<PeerState> {
        let dev = match self.ensure_tunnel(nl, net, me) {
            Ok(d) => d,
            Err(e) => return all_failed(peers, &e),
        };
        let Some(port) = net.overlay().map(|o| o.port) else {
            return all_failed(
                peers,
                &BackendError::NotOverlay {
                    network: net.name.clone(),
                },
            );
        };
        if verify {
            if let Ok(kernel) = nl.routes_of(OVERLAY_ROUTE_PROTOCOL) {
                self.routes
                    .retain(|dst| kernel.iter().any(|r| r.dst == *dst && r.oif == Some(dev)));
            }
        }
        let mut out = Vec::with_capacity(peers.len());
        let mut wanted = Vec::new();
        for p in peers {
            let mut st = peer_state(p);
            let key = match (&p.public_key, self.secure) {
                (_, false) => None,
                (Some(k), true) => match decode_key(k) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        st.problem = Some(BackendError::PeerKeyInvalid(e).to_string());
                        out.push(st);
                        continue;
                    }
                },
                (None, true) => {
                    st.problem = Some(BackendError::NoPeerKey.to_string());
                    out.push(st);
                    continue;
                }
            };
            wanted.push(Peer {
                subnet: p.subnet,
                endpoint: SocketAddrV4::new(p.public_ip, port),
                public_key: key,
            });
            if !self.routes.contains(&p.subnet) {
                let r = Route {
                    dst: p.subnet,
                    gateway: None,
                    oif: Some(dev),
                };
                if let Err(source) = nl.replace_route(&r, OVERLAY_ROUTE_PROTOCOL, false) {
                    let e = BackendError::Route {
                        subnet: p.subnet,
                        via: None,
                        source,
                    };
                    st.problem = Some(e.to_string());
                    out.push(st);
                    continue;
                }
                self.routes.insert(p.subnet);
            }
            st.programmed = Some(format!(
                "route {} dev {}, {} to {}:{port}",
                p.subnet,
                tun_device(&net.id),
                if self.secure { "encrypted" } else { "udp" },
                p.public_ip
            ));
            out.push(st);
        }
        if wanted != self.peers {
            if let Some(t) = &self.tunnel {
                match t.set_peers(wanted.clone()) {
                    Ok(()) => self.peers = wanted,
                    Err(e) => warn!(error = %BackendError::TunnelPeers(e), "cannot set peers"),
                }
            }
        }
        let gone: Vec<Ipv4Net> = self
            .routes
            .iter()
            .filter(|d| !self.peers.iter().any(|p| p.subnet == **d))
            .copied()
            .collect();
        for dst in gone {
            let _ = nl.delete_route(dst, OVERLAY_ROUTE_PROTOCOL);
            self.routes.remove(&dst);
        }
        out
    }

    fn teardown(&mut self, nl: &mut dyn Kernel) {
        for dst in std::mem::take(&mut self.routes) {
            let _ = nl.delete_route(dst, OVERLAY_ROUTE_PROTOCOL);
        }
        if let Some(t) = self.tunnel.take() {
            t.stop();
        }
        self.dev = None;
    }

    fn owned_routes(&self) -> Vec<Ipv4Net> {
        self.routes.iter().copied().collect()
    }

    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        let Some(t) = &self.tunnel else {
            return Default::default();
        };
        let s = t.stats();
        [
            ("tx_packets", s.tx_packets),
            ("tx_bytes", s.tx_bytes),
            ("rx_packets", s.rx_packets),
            ("rx_bytes", s.rx_bytes),
            ("dropped_no_peer", s.dropped_no_peer),
            ("dropped_no_session", s.dropped_no_session),
            ("dropped_bad_auth", s.dropped_bad_auth),
            ("dropped_replayed", s.dropped_replayed),
            ("dropped_unknown_sender", s.dropped_unknown_sender),
            ("dropped_bad_source", s.dropped_bad_source),
            ("dropped_malformed", s.dropped_malformed),
            ("handshakes_completed", s.handshakes_completed),
            ("handshakes_rejected", s.handshakes_rejected),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
