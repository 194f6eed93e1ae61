//! Overlay networks on this host: the local half of a global network. The
//! cluster (cluster/) decides which overlay networks exist and which subnet
//! this host leased; these methods make the host match: a bridge whose
//! gateway is the first address of the leased subnet, the address pool,
//! the resolver, the firewall, and flannel's subnet file.

use crate::bridge;
use crate::error::{AgentError, Result};
use crate::firewall;
use crate::host::{Host, NetworkState};
use tracing::{info, warn};
use weft_model::api::Disconnect;
use weft_model::overlay::subnet_file;
use weft_model::{keys, subnet, Lease, Network};
use weft_store::{Store, StoreJson};

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
    pub(crate) fn ensure_overlay(
        &self,
        global: &Network,
        lease: &Lease,
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut local = localize(global, lease);
        local.mtu = local.mtu.or(mtu);
        let have = self.lock().networks.get(&local.name).map(|h| h.net.clone());
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
        let pool = crate::networks::pool_for(&local)?;
        let (bridge_index, shim_index, created) = bridge::ensure(&mut inner.nl, &mut local)?;
        let done = (|| {
            if !existed && local.has_resolver() {
                inner.dns.serve(&local.name, local.gateway)?;
            }
            inner
                .networks_db
                .put_json(&keys::network(&local.name), &local)?;
            let state = NetworkState {
                net: local.clone(),
                pool,
                bridge_index,
                shim_index,
            };
            match inner.networks.get_mut(&local.name) {
                Some(s) => s.net = local.clone(),
                None => {
                    inner.networks.insert(local.name.clone(), state);
                }
            }
            firewall::apply_all(inner)?;
            let overlay = local.overlay.as_ref().expect("overlay network");
            let file = inner.cfg.subnet_file(&local.name);
            std::fs::write(
                &file,
                subnet_file(
                    overlay,
                    &local.subnet,
                    local.gateway,
                    local.mtu.unwrap_or(1500),
                    !local.internal,
                ),
            )
            .map_err(|e| AgentError::Internal(format!("write {}: {e}", file.display())))?;
            Ok(())
        })();
        if let Err(e) = done {
            if !existed {
                inner.dns.stop(&local.name);
                inner.networks.remove(&local.name);
                let _ = inner.networks_db.delete(&keys::network(&local.name));
                if created {
                    let _ = bridge::remove(&mut inner.nl, &local);
                }
                let _ = firewall::apply_all(inner);
            }
            return Err(e);
        }
        if !existed {
            info!(network = %local.name, subnet = %local.subnet, bridge = %local.bridge, "overlay network ready on this host");
        }
        Ok(())
    }

    /// Removes the local half of an overlay network (it left the cluster,
    /// or this host's subnet changed), disconnecting its sandboxes.
    pub(crate) fn drop_overlay(&self, name: &str) -> Result<()> {
        let attached: Vec<String> = {
            let g = self.lock();
            g.sandboxes
                .values()
                .filter(|s| s.attachment.endpoints().iter().any(|e| e.network == name))
                .map(|s| s.name.clone())
                .collect()
        };
        for sb in attached {
            warn!(network = %name, sandbox = %sb, "the overlay network is gone; disconnecting");
            self.disconnect(name, Disconnect { sandbox: sb })?;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(state) = inner.networks.remove(name) else {
            return Ok(());
        };
        inner.dns.stop(name);
        bridge::remove(&mut inner.nl, &state.net)?;
        inner.networks_db.delete(&keys::network(name))?;
        let _ = std::fs::remove_file(inner.cfg.subnet_file(name));
        firewall::apply_all(inner)?;
        info!(network = %name, "overlay network removed from this host");
        Ok(())
    }

    /// The overlay networks this host has joined, as stored locally.
    pub(crate) fn local_overlays(&self) -> Vec<Network> {
        let g = self.lock();
        g.networks
            .values()
            .filter(|n| n.net.is_global())
            .map(|n| n.net.clone())
            .collect()
    }

    /// Local networks, to check a new global one against.
    pub(crate) fn local_networks(&self) -> Vec<Network> {
        let g = self.lock();
        g.networks
            .values()
            .filter(|n| !n.net.is_global())
            .map(|n| n.net.clone())
            .collect()
    }

    /// Names of sandboxes on `network`.
    pub(crate) fn sandboxes_on(&self, network: &str) -> Vec<String> {
        let g = self.lock();
        g.sandboxes
            .values()
            .filter(|s| {
                s.attachment
                    .endpoints()
                    .iter()
                    .any(|e| e.network == network)
            })
            .map(|s| s.name.clone())
            .collect()
    }
}
