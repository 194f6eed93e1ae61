//! Overlay networks on this host: the local half of a global network. The
//! cluster (cluster/) decides which overlay networks exist and which subnet
//! this host leased; these methods make the host match: the network on the
//! leased subnet through its driver (driver/overlay.rs), the address pool,
//! the resolver, the firewall, and flannel's subnet file.

use crate::error::{AgentError, Result};
use crate::host::Host;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use tracing::{info, warn};
use weft_model::api::Disconnect;
use weft_model::blocks::EndpointRecord;
use weft_model::overlay::format_mac;
use weft_model::overlay::subnet_file;
use weft_model::sandbox::mac_for;
use weft_model::{keys, subnet, Lease, Network};
use weft_store::StoreJson;

/// This host as its endpoint records name it.
pub(crate) struct Me {
    pub host_id: String,
    pub node: String,
    pub public_ip: Ipv4Addr,
}

/// What the cluster just claimed for this host on a shared network.
pub(crate) enum Claimed {
    Block(Ipv4Net),
    Address(Ipv4Addr),
}

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
        lease: Option<&Lease>,
        mtu: Option<u32>,
    ) -> Result<()> {
        // A shared network is the same on every host: the whole subnet.
        let mut local = lease.map_or_else(|| global.clone(), |l| localize(global, l));
        local.mtu = local.mtu.or(mtu);
        let Some(overlay) = local.overlay().cloned() else {
            return Err(AgentError::WrongDriver {
                network: local.name.clone(),
                driver: local.driver().to_string(),
                wanted: "overlay",
            });
        };
        let have = self.snapshot().networks.get(&local.name).cloned();
        // An exposed network stays exposed through a rebuild, on its new gateway.
        let mut expose_again = false;
        match have {
            Some(h) if h == local => return Ok(()),
            Some(h) if h.subnet != local.subnet => {
                warn!(network = %local.name, old = %h.subnet, new = %local.subnet,
                    "this host's subnet changed; rebuilding the network");
                expose_again = self
                    .lock_quiet()
                    .networks
                    .get(&local.name)
                    .is_some_and(|n| n.exposed.is_some());
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
        drop(g);
        if expose_again {
            if let Err(e) = self.expose(&local.name, &Default::default()) {
                warn!(network = %local.name, error = %e, "the rebuilt network is no longer exposed: `weft expose` it again");
            }
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

    /// A shared network: sets what this host holds of it (its blocks) and
    /// what other hosts hold (their addresses, with who). An address this
    /// host uses outside its blocks (claimed before a restart) stays
    /// claimed. `contended`: every block of the network is held (see
    /// `HostShare::contended`). Returns how many addresses are free to hand
    /// out. Changes nothing a snapshot shows, so it wakes no one.
    pub(crate) fn set_share(
        &self,
        network: &str,
        held: BTreeSet<Ipv4Net>,
        foreign: BTreeMap<Ipv4Addr, String>,
        contended: bool,
    ) -> usize {
        let mut g = self.lock_quiet();
        let Some(n) = g.networks.get_mut(network) else {
            return 0;
        };
        let (range, gw) = (n.net.subnet, n.net.gateway);
        let in_use: Vec<Ipv4Addr> = n.pool.in_use_addresses();
        let Some(share) = n.share.as_mut() else {
            return 0;
        };
        share.held = held;
        share.foreign = foreign;
        share.contended = contended;
        for ip in in_use {
            if !share.held.iter().any(|b| b.contains(&ip)) {
                share.borrowed.insert(ip);
            }
        }
        let pool = &n.pool;
        share.free(range, gw, |ip| pool.check_free(*ip).is_err())
    }

    /// A shared network: whether every block of it is held (so this host
    /// claims each address it hands out).
    pub(crate) fn is_contended(&self, network: &str) -> bool {
        let g = self.lock_quiet();
        g.networks
            .get(network)
            .and_then(|n| n.share.as_ref())
            .is_some_and(|s| s.contended)
    }

    /// Whether this host gives `ip` of `network` to a sandbox now (it may
    /// not be published yet).
    pub(crate) fn in_use(&self, network: &str, ip: Ipv4Addr) -> bool {
        let g = self.lock_quiet();
        g.networks
            .get(network)
            .is_some_and(|n| n.pool.check_free(ip).is_err())
    }

    /// A shared network: marks it contended (a fresh read of the cluster
    /// found every block held before the next pass did).
    pub(crate) fn set_contended(&self, network: &str) {
        let mut g = self.lock_quiet();
        if let Some(share) = g.networks.get_mut(network).and_then(|n| n.share.as_mut()) {
            share.contended = true;
        }
    }

    /// A shared network: a block or an address this host just claimed.
    pub(crate) fn add_claim(&self, network: &str, claim: Claimed) {
        let mut g = self.lock_quiet();
        if let Some(share) = g.networks.get_mut(network).and_then(|n| n.share.as_mut()) {
            match claim {
                Claimed::Block(b) => {
                    share.held.insert(b);
                }
                Claimed::Address(ip) => {
                    share.borrowed.insert(ip);
                }
            }
        }
    }

    /// The names of `network`'s sandboxes on other hosts, for the resolver.
    pub(crate) fn set_remote_names(&self, network: &str, entries: Vec<(Ipv4Addr, Vec<String>)>) {
        let dns = std::sync::Arc::clone(&self.lock_quiet().dns);
        dns.set_remote(network, entries);
    }

    /// The addresses other hosts expose on `network`; an isolated
    /// network's table opens its sub-ranges to them.
    pub(crate) fn set_remote_exposed(&self, network: &str, exposed: BTreeSet<Ipv4Addr>) {
        let mut g = self.lock_quiet();
        let inner = &mut *g;
        let Some(n) = inner.networks.get_mut(network) else {
            return;
        };
        if n.remote_exposed == exposed {
            return;
        }
        n.remote_exposed = exposed;
        if !n.net.subranges.is_empty() {
            if let Err(e) = inner.apply_firewall() {
                warn!(network, error = %e, "could not open the sub-ranges to another host's exposed address");
            }
        }
    }

    /// Whether `network` has room for a sandbox (placed `within` a
    /// sub-range or outside all) without asking the cluster.
    pub(crate) fn has_room(&self, network: &str, within: Option<Ipv4Net>) -> bool {
        let g = self.lock_quiet();
        g.networks.get(network).is_some_and(|n| n.has_room(within))
    }

    /// The records of this host's endpoints on a network that spans hosts,
    /// as the cluster publishes them: one per sandbox address, and one per
    /// address claimed for an attach that is not plugged in yet.
    pub(crate) fn endpoint_records(&self, network: &str, me: &Me) -> Vec<EndpointRecord> {
        let snap = self.snapshot();
        let mut out: BTreeMap<Ipv4Addr, EndpointRecord> = BTreeMap::new();
        for sb in snap.sandboxes.values() {
            for ep in sb.attachment.endpoints() {
                if ep.network != network {
                    continue;
                }
                let mac = crate::driver::endpoint_mac(ep).unwrap_or_else(|_| mac_for(ep.ip));
                let names = std::iter::once(sb.name.clone())
                    .chain(ep.aliases.iter().cloned())
                    .collect();
                out.insert(
                    ep.ip,
                    EndpointRecord {
                        ip: ep.ip,
                        mac: format_mac(&mac),
                        host_id: me.host_id.clone(),
                        node: me.node.clone(),
                        public_ip: me.public_ip,
                        sandbox: Some(sb.name.clone()),
                        names,
                        exposed: false,
                        signed: None,
                    },
                );
            }
        }
        // A record of no sandbox: this host's exposed address, or one
        // claimed for an attach in progress.
        let bare = |ip: Ipv4Addr, exposed: bool| EndpointRecord {
            ip,
            mac: format_mac(&mac_for(ip)),
            host_id: me.host_id.clone(),
            node: me.node.clone(),
            public_ip: me.public_ip,
            sandbox: None,
            names: Vec::new(),
            exposed,
            signed: None,
        };
        // `weft expose`: other hosts program it as a sandbox's address, so
        // replies to it cross to this host (shared kind).
        if let Some(ip) = snap.exposed.get(network).copied() {
            out.insert(ip, bare(ip, true));
        }
        let borrowed: Vec<Ipv4Addr> = {
            let g = self.lock_quiet();
            g.networks
                .get(network)
                .and_then(|n| n.share.as_ref())
                .map(|s| s.borrowed.iter().copied().collect())
                .unwrap_or_default()
        };
        for ip in borrowed {
            out.entry(ip).or_insert_with(|| bare(ip, false));
        }
        out.into_values().collect()
    }

    /// Names of sandboxes on `network`.
    pub(crate) fn sandboxes_on(&self, network: &str) -> Vec<String> {
        self.snapshot().attached_to(network)
    }
}

impl Host {
    /// Whether `sub` may be used on `network` here (see
    /// `Network::check_subrange`): every address this host gives out on it
    /// and every address other hosts hold (a sub-range must hold none of
    /// the rest of the network). Returns the network if `sub` is new.
    pub(crate) fn check_subrange(&self, network: &str, sub: Ipv4Net) -> Result<Option<Network>> {
        let g = self.lock_quiet();
        let n = g
            .networks
            .get(network)
            .ok_or_else(|| crate::host::not_found(network))?;
        let mine: Vec<(Ipv4Addr, Option<Ipv4Net>, String)> = g
            .sandboxes
            .values()
            .flat_map(|s| {
                s.attachment
                    .endpoints()
                    .iter()
                    .filter(|e| e.network == network)
                    .map(|e| {
                        let placed = (e.prefix_len != n.net.subnet.prefix_len())
                            .then(|| Ipv4Net::new(e.ip, e.prefix_len).map(|p| p.trunc()).ok())
                            .flatten();
                        (e.ip, placed, format!("sandbox {}", s.name))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let foreign: Vec<(Ipv4Addr, Option<Ipv4Net>, String)> = n
            .share
            .iter()
            .flat_map(|s| s.foreign.iter())
            .map(|(ip, who)| (*ip, n.net.subrange_of(*ip), who.clone()))
            .collect();
        let new = n
            .net
            .check_subrange(
                sub,
                mine.iter()
                    .chain(foreign.iter())
                    .map(|(ip, p, who)| (*ip, *p, who.as_str())),
            )
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        Ok(new.then(|| n.net.clone()))
    }

    /// Records `sub` as a sub-range of `network` on this host: the record
    /// (a local network's is the configuration; an overlay network's
    /// local copy follows etcd's) and the firewall.
    pub(crate) fn declare_subrange(&self, network: &str, sub: Ipv4Net) -> Result<()> {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(n) = inner.networks.get_mut(network) else {
            return Err(crate::host::not_found(network));
        };
        if n.net.subranges.contains(&sub) {
            return Ok(());
        }
        let before = n.net.clone();
        n.net.subranges.push(sub);
        n.net.subranges.sort();
        let net = n.net.clone();
        let done = inner
            .networks_db
            .put_json(&keys::network(network), &net)
            .map_err(AgentError::from)
            .and_then(|_| inner.apply_firewall());
        if let Err(e) = done {
            if let Some(n) = inner.networks.get_mut(network) {
                n.net = before.clone();
            }
            let _ = inner.networks_db.put_json(&keys::network(network), &before);
            let _ = inner.apply_firewall();
            return Err(e);
        }
        info!(network, subrange = %sub, "isolated sub-range declared");
        Ok(())
    }
}
