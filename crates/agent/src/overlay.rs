//! Overlay networks on this host: the local half of a global network. The
//! cluster (cluster/) decides which overlay networks exist and which subnet
//! this host leased; these methods make the host match: the network on the
//! leased subnet through its driver (driver/overlay.rs), the address pool,
//! the resolver, the firewall, and flannel's subnet file.

use crate::error::{AgentError, Result};
use crate::host::Host;
use tracing::{info, warn};
use weft_model::api::Disconnect;
use weft_model::overlay::subnet_file;
use weft_model::{keys, subnet, Lease, Network};
use weft_store::StoreJson;

/// The local form of a global network: its subnet and gateway are the host's.
pub(crate) fn localize(global: &Network, lease: &Lease) -> Network {
    Network {
        subnet: lease.subnet,
        gateway: subnet::first_host(&lease.subnet),
        ..global.clone()
    }
}

impl Host {
    /// Makes the overlay network `global` ready on this host on the leased
    /// subnet. Idempotent; a changed subnet (the lease was lost and another
    /// one taken) rebuilds the network, disconnecting its sandboxes.
    /// Blocking: call it from a blocking thread.
    pub(crate) fn ensure_overlay(
        &self,
        global: &Network,
        lease: &Lease,
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut local = localize(global, lease);
        local.mtu = local.mtu.or(mtu);
        let Some(overlay) = local.overlay().cloned() else {
            return Err(AgentError::WrongDriver {
                network: local.name.clone(),
                driver: local.driver().to_string(),
                wanted: "overlay",
            });
        };
        let have = self.snapshot().networks.get(&local.name).cloned();
        match have {
            Some(h) if h == local => return Ok(()),
            Some(h) if h.subnet != local.subnet => {
                warn!(network = %local.name, old = %h.subnet, new = %local.subnet,
                    "this host's subnet changed; rebuilding the network");
                self.drop_overlay(&local.name)?;
            }
            _ => {}
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let existed = inner.networks.contains_key(&local.name);
        if existed {
            // Same subnet, other settings (an MTU): keep it, record the change.
            inner
                .networks_db
                .put_json(&keys::network(&local.name), &local)?;
            if let Some(n) = inner.networks.get_mut(&local.name) {
                n.net = local.clone();
            }
            inner.apply_firewall()?;
        } else {
            inner.add_network(local.clone(), false)?;
        }
        let file = inner.cfg.subnet_file(&local.name);
        let written = std::fs::write(
            &file,
            subnet_file(
                &overlay,
                &local.subnet,
                local.gateway,
                local.mtu.unwrap_or(1500),
                !local.internal,
            ),
        )
        .map_err(AgentError::io(format!("write {}", file.display())));
        if let Err(e) = written {
            if !existed {
                let _ = inner.drop_network(&local.name);
            }
            return Err(e);
        }
        if !existed {
            info!(network = %local.name, subnet = %local.subnet, "overlay network ready on this host");
        }
        Ok(())
    }

    /// Removes the local half of an overlay network (it left the cluster,
    /// or this host's subnet changed), disconnecting its sandboxes.
    pub(crate) fn drop_overlay(&self, name: &str) -> Result<()> {
        for sb in self.sandboxes_on(name) {
            warn!(network = %name, sandbox = %sb, "the overlay network is gone; disconnecting");
            self.disconnect(name, Disconnect { sandbox: sb })?;
        }
        let mut g = self.lock();
        if !g.networks.contains_key(name) {
            return Ok(());
        }
        g.drop_network(name)?;
        let _ = std::fs::remove_file(g.cfg.subnet_file(name));
        info!(network = %name, "overlay network removed from this host");
        Ok(())
    }

    /// The overlay networks this host has joined, as stored locally.
    pub(crate) fn local_overlays(&self) -> Vec<Network> {
        let snap = self.snapshot();
        snap.networks
            .values()
            .filter(|n| n.is_global())
            .cloned()
            .collect()
    }

    /// Local networks, to check a new global one against.
    pub(crate) fn local_networks(&self) -> Vec<Network> {
        let snap = self.snapshot();
        snap.networks
            .values()
            .filter(|n| !n.is_global())
            .cloned()
            .collect()
    }

    /// Names of sandboxes on `network`.
    pub(crate) fn sandboxes_on(&self, network: &str) -> Vec<String> {
        self.snapshot().attached_to(network)
    }
}
