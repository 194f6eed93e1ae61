//! `Host`: everything the agent knows about this host, behind one lock.
//! Kernel changes for one request happen under that lock, so two requests
//! never interleave half-made changes; each takes about a millisecond.

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use weft_kernel::Netlink;
use weft_model::{AddressPool, Network, Sandbox};
use weft_store::{DiskStore, RuntimeStore};

/// A network with its address pool and its bridge on this host.
pub(crate) struct NetworkState {
    pub net: Network,
    pub pool: AddressPool,
    /// What endpoints attach to: the bridge, or the macvlan parent.
    pub bridge_index: u32,
    /// macvlan with host access: the host's own macvlan interface.
    pub shim_index: Option<u32>,
}

pub(crate) struct Inner {
    pub cfg: AgentConfig,
    pub pool: std::sync::Arc<crate::netns_pool::NetnsPool>,
    pub dns: std::sync::Arc<crate::dns::Resolver>,
    pub networks_db: DiskStore,
    pub runtime: RuntimeStore,
    /// Netlink socket in the agent's own namespace.
    pub nl: Netlink,
    pub networks: BTreeMap<String, NetworkState>,
    pub sandboxes: BTreeMap<String, Sandbox>,
    /// Sandbox name -> id.
    pub names: HashMap<String, String>,
}

#[derive(Clone)]
pub struct Host {
    inner: Arc<Mutex<Inner>>,
    /// Set once the cluster has started (agents with --etcd-endpoints).
    pub(crate) cluster: Arc<std::sync::OnceLock<Arc<crate::cluster::Cluster>>>,
}

impl Host {
    /// Opens the stores, then makes the kernel match them (see reconcile.rs).
    pub fn start(cfg: AgentConfig) -> Result<Host> {
        let inner = crate::reconcile::start(cfg)?;
        let (watch, orphans) = crate::reconcile::auto_remove_watches(&inner);
        // Only now: garbage collection must not see the pool's fresh entries.
        inner.pool.start();
        let host = Host {
            inner: Arc::new(Mutex::new(inner)),
            cluster: Default::default(),
        };
        for (id, p) in watch {
            host.remove_when_exited(id, p);
        }
        // A `weft run` killed before it started its process left these.
        for id in orphans {
            let _ = host.remove(&id, true);
        }
        Ok(host)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock must not take the whole agent down.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// Finds a sandbox by name, full id or unique id prefix.
    pub fn find(&self, key: &str) -> Result<&Sandbox> {
        if let Some(id) = self.names.get(key) {
            return Ok(&self.sandboxes[id]);
        }
        if let Some(s) = self.sandboxes.get(key) {
            return Ok(s);
        }
        let mut matches = self
            .sandboxes
            .values()
            .filter(|s| key.len() >= 4 && s.id.starts_with(key));
        match (matches.next(), matches.next()) {
            (Some(s), None) => Ok(s),
            (Some(_), Some(_)) => Err(AgentError::BadRequest(format!(
                "id prefix {key:?} matches several sandboxes; give more of the id or the name"
            ))),
            _ => Err(AgentError::NotFound(format!(
                "no sandbox named {key:?}; `weft ps` lists the sandboxes"
            ))),
        }
    }
}
