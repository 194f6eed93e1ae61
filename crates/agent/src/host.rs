//! `Host`: everything the agent knows about this host.
//!
//! Lock discipline: changes (kernel, stores, pools) happen under one std
//! mutex, so two requests never interleave half-made changes; it is only
//! taken on blocking threads (the API's `spawn_blocking`, the cluster's
//! blocking tasks), never on a tokio worker. Reads never take it: every
//! release of the lock publishes a `Snapshot` of the records (an `Arc`
//! swap), and `ps`, `network ls`, `inspect` and `status` answer from the
//! latest one, so they never wait behind another request's `nft -f` or
//! store fsync.

use crate::config::AgentConfig;
use crate::driver::NetworkDriver;
use crate::error::{AgentError, Result};
use crate::firewall::Firewall;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use weft_kernel::Netlink;
use weft_model::{AddressPool, Network, Sandbox};
use weft_store::{DiskStore, RuntimeStore};

/// A network with its address pool and its driver on this host.
pub(crate) struct NetworkState {
    pub net: Network,
    pub pool: AddressPool,
    /// Chosen once, when the network is loaded or created.
    pub driver: Box<dyn NetworkDriver>,
    /// A shared network: what of its subnet this host may hand out (kept
    /// current by the cluster); None for every other network.
    pub share: Option<weft_model::blocks::HostShare>,
    /// `weft expose`: this host's address on the network (expose.rs).
    pub exposed: Option<Ipv4Addr>,
    /// Addresses other hosts expose on this network (their records): open
    /// to every isolated sub-range, as this host's own.
    pub remote_exposed: std::collections::BTreeSet<Ipv4Addr>,
}

impl NetworkState {
    /// Whether the firewall guards this network's ports: it is carved into
    /// sub-ranges and its sandboxes are ports of a bridge.
    fn guards_ports(&self) -> bool {
        !self.net.subranges.is_empty() && self.net.bridge().is_some()
    }

    pub(crate) fn new(net: Network, pool: AddressPool, driver: Box<dyn NetworkDriver>) -> Self {
        let share = net
            .overlay()
            .is_some_and(|o| o.is_shared())
            .then(Default::default);
        NetworkState {
            net,
            pool,
            driver,
            share,
            exposed: None,
            remote_exposed: Default::default(),
        }
    }

    /// Takes `requested`, or the next free address, for a new endpoint:
    /// inside the sub-range `within`, or (None) outside every sub-range of
    /// the network. On a shared network only what this host may hand out:
    /// `NoRoom` or `NeedsClaim` tell the caller to claim more in the cluster.
    pub(crate) fn allocate(
        &mut self,
        requested: Option<Ipv4Addr>,
        within: Option<ipnet::Ipv4Net>,
    ) -> Result<Ipv4Addr> {
        if let Some(ip) = requested {
            self.check_placement(ip, within)?;
        }
        let carved = within.is_some() || !self.net.subranges.is_empty();
        let ip = match (&mut self.share, requested) {
            (Some(_), Some(ip)) => {
                self.check_share(ip)?;
                Some(ip)
            }
            (Some(share), None) => {
                let (pool, net) = (&self.pool, &self.net);
                let ip = share
                    .pick(net.subnet, net.gateway, |ip| {
                        pool.check_free(*ip).is_err() || !net.places(*ip, within)
                    })
                    .ok_or_else(|| AgentError::NoRoom {
                        network: self.net.name.clone(),
                        within,
                    })?;
                Some(ip)
            }
            (None, None) if carved => {
                // Not the pool's next-fit: it knows no sub-ranges.
                let net = &self.net;
                let space = within.or(net.ip_range).unwrap_or(net.subnet);
                let ip = space
                    .hosts()
                    .find(|ip| {
                        *ip != net.gateway
                            && *ip != net.subnet.broadcast()
                            && net.places(*ip, within)
                            && self.pool.check_free(*ip).is_ok()
                    })
                    .ok_or_else(|| {
                        AgentError::Conflict(format!(
                            "--net {}: every address of {space} is in use; remove sandboxes or use a larger range",
                            net.name
                        ))
                    })?;
                Some(ip)
            }
            (None, r) => r,
        };
        self.pool
            .allocate(ip)
            .map_err(|e| AgentError::BadRequest(e.to_string()))
    }

    /// Whether a static address fits where the endpoint is placed.
    pub(crate) fn check_placement(
        &self,
        ip: Ipv4Addr,
        within: Option<ipnet::Ipv4Net>,
    ) -> Result<()> {
        if self.net.places(ip, within) {
            return Ok(());
        }
        let name = &self.net.name;
        Err(AgentError::BadRequest(match (within, self.net.subrange_of(ip)) {
            (Some(s), _) => format!(
                "--net {name}: {ip} is not in the sub-range {s}; pick an address inside it or leave ip= out"
            ),
            (None, Some(s)) => format!(
                "--net {name}: {ip} is in the isolated sub-range {s}; add subnet={s} to place the sandbox there, or pick an address outside it"
            ),
            (None, None) => format!("--net {name}: {ip} cannot be placed"),
        }))
    }
    /// A shared network: whether this host may give `ip` to a sandbox, and
    /// who holds it when another host does.
    pub(crate) fn check_share(&self, ip: Ipv4Addr) -> Result<()> {
        let Some(share) = &self.share else {
            return Ok(());
        };
        if let Some(holder) = share.foreign.get(&ip) {
            return Err(AgentError::Conflict(format!(
                "--net {}: {ip} is taken by {holder}; pick another address or leave --ip out",
                self.net.name
            )));
        }
        if !share.may_take(ip) && self.net.subnet.contains(&ip) {
            return Err(AgentError::NeedsClaim {
                network: self.net.name.clone(),
                ip,
            });
        }
        Ok(())
    }

    /// Whether a new endpoint without `--ip` (placed `within` a sub-range
    /// or outside all) gets an address without asking the cluster.
    pub(crate) fn has_room(&self, within: Option<ipnet::Ipv4Net>) -> bool {
        let net = &self.net;
        let free = |ip: &Ipv4Addr| self.pool.check_free(*ip).is_ok() && net.places(*ip, within);
        self.share.as_ref().is_none_or(|s| {
            s.free(net.subnet, net.gateway, |ip| !free(ip)) > 0 || s.borrowed.iter().any(free)
        })
    }

    /// Gives an address back (a claimed one stops being this host's).
    pub(crate) fn release(&mut self, ip: Ipv4Addr) {
        self.pool.release(ip);
        if let Some(s) = &mut self.share {
            s.borrowed.remove(&ip);
        }
    }
}

pub(crate) struct Inner {
    pub cfg: AgentConfig,
    pub pool: Arc<crate::netns_pool::NetnsPool>,
    pub dns: Arc<crate::dns::Resolver>,
    pub networks_db: DiskStore,
    pub runtime: RuntimeStore,
    /// Netlink socket in the agent's own namespace.
    pub nl: Netlink,
    pub networks: BTreeMap<String, NetworkState>,
    /// Shared with the snapshots, so publishing one copies pointers only.
    pub sandboxes: BTreeMap<String, Arc<Sandbox>>,
    /// Sandbox name -> id.
    pub names: HashMap<String, String>,
    pub firewall: Firewall,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `weft leave` was run: the subnets of the overlay networks are given
    /// up (another host may lease them), so nothing new attaches to one
    /// until the agent restarts and rejoins.
    pub left_cluster: bool,
}

/// The records as of the last release of the lock: what reads answer from.
#[derive(Clone)]
pub(crate) struct Snapshot {
    pub networks: BTreeMap<String, Network>,
    pub sandboxes: BTreeMap<String, Arc<Sandbox>>,
    /// Networks this host exposes (`weft expose`), with its address.
    pub exposed: BTreeMap<String, Ipv4Addr>,
    pub resolv_dir: std::path::PathBuf,
    pub logs_dir: std::path::PathBuf,
}

#[derive(Clone)]
pub struct Host {
    inner: Arc<Mutex<Inner>>,
    /// The configuration, fixed at start: read without the lock.
    cfg: Arc<AgentConfig>,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    /// Bumped at every publish: waiters (the cluster) wake on it.
    published: Arc<tokio::sync::watch::Sender<u64>>,
    /// Read by `status` without the lock.
    pub(crate) pool: Arc<crate::netns_pool::NetnsPool>,
    pub(crate) started_unix: u64,
    /// Bumped from anywhere without the lock; read by `/metrics`.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Whether a sandbox's process has not started, runs, or has exited.
pub(crate) fn state_of(sb: &Sandbox) -> weft_model::api::State {
    use weft_model::api::State;
    match &sb.process {
        None => State::Created,
        Some(p) if weft_kernel::process::is_alive(p) => State::Running,
        Some(_) => State::Exited,
    }
}

/// Every lock of weft's recovers from poisoning the same way: a panic while
/// holding it must not take the whole agent down, and the state it guards
/// is kept consistent by rollbacks, not by the panic's unwinding.
pub(crate) fn recover<G>(r: std::result::Result<G, PoisonError<G>>) -> G {
    r.unwrap_or_else(PoisonError::into_inner)
}

/// The lock held: derefs to the state, publishes a snapshot when released.
pub(crate) struct Locked<'a> {
    guard: MutexGuard<'a, Inner>,
    host: &'a Host,
}

impl Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let snap = Arc::new(self.guard.snapshot());
        *recover(self.host.snapshot.write()) = snap;
        self.host.published.send_modify(|v| *v += 1);
    }
}

impl Host {
    pub(crate) fn new(inner: Inner) -> Host {
        let snap = Arc::new(inner.snapshot());
        Host {
            pool: Arc::clone(&inner.pool),
            metrics: Arc::clone(&inner.metrics),
            started_unix: crate::ids::now_unix(),
            cfg: Arc::new(inner.cfg.clone()),
            inner: Arc::new(Mutex::new(inner)),
            snapshot: Arc::new(RwLock::new(snap)),
            published: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Takes the lock for a change. Only on a blocking thread.
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked {
            guard: recover(self.inner.lock()),
            host: self,
        }
    }

    /// Takes the lock for a change no snapshot shows (what a network's
    /// share of a shared subnet is): publishes nothing, wakes no one, so
    /// the cluster can call it from the pass that a publish woke.
    pub(crate) fn lock_quiet(&self) -> MutexGuard<'_, Inner> {
        recover(self.inner.lock())
    }

    /// The records as of the last change, without waiting for the lock.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        recover(self.snapshot.read()).clone()
    }

    pub(crate) fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Wakes on every published change.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }
}

impl Inner {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            networks: self
                .networks
                .iter()
                .map(|(k, n)| (k.clone(), n.net.clone()))
                .collect(),
            sandboxes: self.sandboxes.clone(),
            exposed: self
                .networks
                .iter()
                .filter_map(|(k, n)| Some((k.clone(), n.exposed?)))
                .collect(),
            resolv_dir: self.cfg.resolv_dir(),
            logs_dir: self.cfg.logs_dir(),
        }
    }

    /// Finds a sandbox by name, full id or unique id prefix.
    pub fn find(&self, key: &str) -> Result<&Sandbox> {
        if let Some(id) = self.names.get(key) {
            if let Some(s) = self.sandboxes.get(id) {
                return Ok(s);
            }
        }
        find_in(&self.sandboxes, key)
    }

    /// A network of this host, or the error that says how to list them.
    pub fn network(&self, name: &str) -> Result<&NetworkState> {
        self.networks.get(name).ok_or_else(|| not_found(name))
    }

    /// Records the sandbox as it is now, under its name, with its DNS names.
    pub fn register(&mut self, sb: Sandbox) -> Arc<Sandbox> {
        self.dns.add(&sb);
        self.names.insert(sb.name.clone(), sb.id.clone());
        let sb = Arc::new(sb);
        self.sandboxes.insert(sb.id.clone(), sb.clone());
        sb
    }

    /// Forgets the sandbox: record in memory, name, DNS names.
    pub fn unregister(&mut self, id: &str) -> Option<Arc<Sandbox>> {
        let sb = self.sandboxes.remove(id)?;
        if self.names.get(&sb.name).map(String::as_str) == Some(id) {
            self.names.remove(&sb.name);
        }
        self.dns.remove(id);
        Some(sb)
    }

    /// Rewrites weft's whole nft table from the networks and ports.
    pub fn apply_firewall(&mut self) -> Result<()> {
        let rules = self
            .networks
            .values()
            .filter_map(|n| n.driver.firewall(&n.net))
            .collect();
        let exposed = self
            .networks
            .values()
            .filter_map(|n| {
                // `weft expose` (expose.rs): on a shared network the host's
                // own source (the gateway) is translated too.
                let o = n.net.overlay()?;
                Some(weft_model::nft::ExposeRule {
                    range: o.range,
                    address: n.exposed?,
                    gateway: o.is_shared().then_some(n.net.gateway),
                })
            })
            .collect();
        let isolation = self.isolation_rules();
        let sandboxes = &self.sandboxes;
        self.firewall.apply_all(
            rules,
            isolation,
            sandboxes.values().flat_map(|s| s.ports.iter()),
            exposed,
        )
    }

    /// Networks carved into sub-ranges, with this host's ports on each
    /// (a port's set changes with each attach and detach there).
    fn isolation_rules(&self) -> Vec<weft_model::nft::IsolationRule> {
        self.networks
            .values()
            .filter(|n| n.guards_ports())
            .map(|n| weft_model::nft::IsolationRule {
                range: n.net.overlay().map_or(n.net.subnet, |o| o.range),
                subranges: n.net.subranges.clone(),
                open: std::iter::once(n.net.gateway)
                    .chain(n.exposed)
                    .chain(n.remote_exposed.iter().copied())
                    .collect(),
                ports: self.guarded_ports(
                    self.sandboxes
                        .values()
                        .flat_map(|s| s.attachment.endpoints())
                        .filter(|e| e.network == n.net.name),
                ),
            })
            .collect()
    }

    /// The bridge ports of `eps` that the firewall guards (those on
    /// networks carved into sub-ranges), as (host-side port, address).
    pub(crate) fn guarded_ports<'a>(
        &self,
        eps: impl IntoIterator<Item = &'a weft_model::sandbox::Endpoint>,
    ) -> Vec<(String, Ipv4Addr)> {
        eps.into_iter()
            .filter(|e| {
                self.networks
                    .get(&e.network)
                    .is_some_and(|n| n.guards_ports())
            })
            .filter_map(|e| e.host_ifname().map(|h| (h.to_string(), e.ip)))
            .collect()
    }

    /// Stops guarding the ports of endpoints that are gone; if the
    /// elements cannot be deleted one by one, the whole table is
    /// rewritten from what is registered.
    pub(crate) fn unguard(&mut self, ports: &[(String, Ipv4Addr)]) -> Result<()> {
        if let Err(e) = self.firewall.unguard(ports) {
            tracing::warn!(error = %e, "cannot stop guarding the ports one by one; rewriting the table");
            return self.apply_firewall();
        }
        Ok(())
    }
}

pub(crate) fn not_found(name: &str) -> AgentError {
    AgentError::NotFound(format!(
        "no network named {name:?}: `weft network ls` lists the networks"
    ))
}

/// By name, full id or unique id prefix (4 characters at least).
pub(crate) fn find_in<'a>(
    sandboxes: &'a BTreeMap<String, Arc<Sandbox>>,
    key: &str,
) -> Result<&'a Sandbox> {
    if let Some(s) = sandboxes.get(key) {
        return Ok(s);
    }
    if let Some(s) = sandboxes.values().find(|s| s.name == key) {
        return Ok(s);
    }
    let mut matches = sandboxes
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
