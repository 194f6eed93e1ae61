//! The cluster: global networks and per-host subnet leases in etcd.
//!
//! One task lists everything under the prefix, makes this host match it
//! (its own lease for every overlay network, the local bridge, and each
//! backend programmed with the other hosts' leases), then watches from the
//! listed revision and does the same after every batch of changes. Any
//! watch error, compaction included, goes back to listing: state is
//! reconciled, never replayed, so no event can be lost. A second task keeps
//! the etcd lease alive. While etcd is unreachable nothing is torn down:
//! what is programmed stays, and new sandboxes use the subnet already held.
//!
//! `lease.rs` is how this host gets and keeps its subnet (against a narrow
//! trait over etcd); `dataplane.rs` holds the netlink socket and the
//! backends, which the tasks only reach on blocking threads.

mod dataplane;
mod identity;
pub(crate) use identity::check_public_address;
mod lease;
mod signing;
mod span;
mod state;

use crate::backend;
use crate::config::ClusterConfig;
use crate::error::{AgentError, Result};
use crate::host::Host;
use dataplane::{Dataplane, Job};
use identity::Identity;
use ipnet::Ipv4Net;
use lease::{Claim, LeaseError};
use state::Global;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};
use weft_kernel::Netlink;
use weft_model::api::{ClusterView, NetworkView, OverlayStatus, RemovedNetwork};
use weft_model::overlay::subnet_key;
use weft_model::{network, Lease, Network, NetworkSpec};
use weft_store::{Etcd, EtcdError, FailureKind};

/// How often the backends re-read the kernel to heal what was changed
/// behind weft's back.
const VERIFY_EVERY: Duration = Duration::from_secs(2);
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) fn network_key(name: &str) -> String {
    format!("networks/{name}")
}
fn vni_key(vni: u32) -> String {
    format!("vnis/{vni}")
}
fn lease_dir(network: &str) -> String {
    format!("leases/{network}/")
}
fn lease_key(network: &str, subnet: &Ipv4Net) -> String {
    format!("leases/{network}/{}", subnet_key(subnet))
}

/// A peer's secure-backend key as last seen, and its last change.
type PeerKey = (String, Option<weft_model::api::KeyChange>);

pub struct Cluster {
    cfg: ClusterConfig,
    host: Host,
    etcd: Etcd,
    me: Mutex<Identity>,
    /// The etcd lease every key of this host is bound to (0: none yet).
    lease: AtomicI64,
    wake: Notify,
    status: Mutex<ClusterView>,
    /// Set by `weft leave`: stop claiming subnets.
    left: std::sync::atomic::AtomicBool,
    /// The interface that carries the public address, and its MTU.
    underlay: (u32, u32),
    /// The netlink socket and the backends; only blocking threads lock it.
    dataplane: dataplane::Shared,
    data_dir: std::path::PathBuf,
    /// Signs this host's leases (it has an etcd client certificate).
    signer: Option<signing::Signer>,
    /// Checks other hosts' leases against the etcd CA; with TLS, a lease
    /// that fails is never programmed (see signing.rs).
    verifier: Option<signing::Verifier>,
    /// secure: (network, peer host id) -> the peer's public key as last
    /// seen, and its last change, so `weft status` shows a key change.
    peer_keys: Mutex<HashMap<(String, String), PeerKey>>,
    /// Serialises claims of more room on shared networks (`grow`).
    growing: tokio::sync::Mutex<()>,
    /// Endpoint records written and not yet seen back (`span::publish`).
    written: tokio::sync::Mutex<span::Written>,
    /// Verdicts on other hosts' endpoint records (`believed_endpoints`).
    verdicts: Mutex<span::Verdicts>,
    /// Shared networks: when this host first found every block held.
    full_since: Mutex<HashMap<String, std::time::Instant>>,
}

impl Cluster {
    /// Starts the cluster tasks. The agent serves its API at once; the
    /// cluster catches up as soon as etcd answers.
    pub async fn start(cfg: ClusterConfig, host: Host) -> Result<Arc<Cluster>> {
        let data = host.config().clone();
        // Netlink blocks: on a blocking thread, as everything the dataplane does.
        let (file, c2) = (data.cluster_file(), cfg.clone());
        let (nl, me, underlay, underlay_mtu) = tokio::task::spawn_blocking(move || {
            let mut nl = Netlink::open()?;
            let me = Identity::load_or_create(&file, &c2, &mut nl)?;
            let underlay = nl
                .ipv4_addresses()?
                .into_iter()
                .find(|(_, a)| a.addr() == me.public_ip)
                .map(|(i, _)| i)
                .ok_or_else(|| {
                    AgentError::Internal(format!("{} vanished from this host", me.public_ip))
                })?;
            let underlay_mtu = nl.link_mtu(underlay)?.unwrap_or(1500);
            Ok::<_, AgentError>((nl, me, underlay, underlay_mtu))
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;
        let sec = &cfg.etcd_security;
        let signer = match (&sec.cert_file, &sec.key_file) {
            (Some(c), Some(k)) => {
                Some(signing::Signer::load(c, k).map_err(AgentError::BadRequest)?)
            }
            _ => None,
        };
        let verifier = match &sec.ca_file {
            Some(ca) => Some(signing::Verifier::load(ca).map_err(AgentError::BadRequest)?),
            None => None,
        };
        let etcd = Etcd::connect(
            &cfg.etcd_endpoints,
            &cfg.etcd_prefix,
            ETCD_TIMEOUT,
            &cfg.etcd_security,
        )
        .await
        .map_err(|e| AgentError::BadRequest(format!("--etcd-endpoints: {e}")))?;
        // A wrong CA, a refused certificate or a bad password never heal by
        // retrying: the agent stops at once with the reason, instead of
        // serving with a cluster that can never sync. An etcd that is merely
        // down is waited for, as before.
        if let Err(e) = etcd.probe().await {
            if matches!(e.kind(), FailureKind::Tls | FailureKind::Auth) {
                return Err(AgentError::BadRequest(e.to_string()));
            }
            warn!(error = %e, "etcd is not answering yet; the cluster catches up when it does");
        }
        if etcd.is_plaintext() {
            warn!("the connection to etcd is plain http: anyone on the path can read and change the cluster's state; use https:// with --etcd-cafile/--etcd-certfile/--etcd-keyfile");
        }
        if let (Some(sg), Some(v)) = (&signer, &verifier) {
            // Peers would refuse every lease of this host: say so now.
            let trial = sg.sign(Lease {
                network: "trial".into(),
                subnet: Ipv4Net::default(),
                host_id: me.host_id.clone(),
                node: me.node.clone(),
                public_ip: me.public_ip,
                vtep_mac: None,
                public_key: None,
                signed: None,
            });
            let key = lease_key("trial", &trial.subnet);
            if let Some(why) = v.refuse(&key, &trial) {
                return Err(AgentError::BadRequest(format!(
                    "--etcd-certfile cannot sign this host's leases ({why}); its certificate must be issued by --etcd-cafile's CA for client authentication with the DNS name {:?} (--node-name)",
                    me.node
                )));
            }
        }
        info!(node = %me.node, public_ip = %me.public_ip, host_id = %me.host_id, "joining the cluster");
        // Shared networks: attach from the blocks held before, even while
        // etcd is still unreachable (the first sync checks them).
        for (network, blocks) in &me.blocks {
            for b in blocks {
                host.add_claim(network, crate::overlay::Claimed::Block(*b));
            }
        }
        let status = ClusterView {
            etcd_endpoints: cfg.etcd_endpoints.clone(),
            etcd_plaintext: etcd.is_plaintext(),
            host_id: me.host_id.clone(),
            node: me.node.clone(),
            public_ip: Some(me.public_ip),
            lease_ttl_secs: cfg.lease_ttl.as_secs(),
            ..Default::default()
        };
        let c = Arc::new(Cluster {
            lease: AtomicI64::new(me.etcd_lease),
            cfg,
            host,
            etcd,
            me: Mutex::new(me),
            wake: Notify::new(),
            status: Mutex::new(status),
            left: Default::default(),
            underlay: (underlay, underlay_mtu),
            data_dir: data.data_dir.clone(),
            dataplane: dataplane::Shared::new(Dataplane::new(Box::new(nl))),
            signer,
            verifier,
            peer_keys: Default::default(),
            growing: Default::default(),
            written: Default::default(),
            verdicts: Default::default(),
            full_since: Default::default(),
        });
        tokio::spawn(c.clone().keep_lease_alive());
        tokio::spawn(c.clone().sync_forever());
        Ok(c)
    }

    pub fn status(&self) -> ClusterView {
        let mut v = crate::host::recover(self.status.lock()).clone();
        let l = self.lease.load(Ordering::Relaxed);
        v.etcd_lease = (l != 0).then_some(l);
        v
    }

    fn set_health(&self, err: Option<String>) {
        let mut s = crate::host::recover(self.status.lock());
        if s.etcd_healthy != err.is_none() {
            match &err {
                None => info!("etcd reachable"),
                Some(e) => {
                    warn!(error = %e, "etcd unreachable; what is programmed stays, retrying")
                }
            }
        }
        if err.is_none() {
            s.etcd_down_since_unix = None;
        } else if s.etcd_down_since_unix.is_none() {
            s.etcd_down_since_unix = Some(crate::ids::now_unix());
        }
        s.etcd_healthy = err.is_none();
        s.etcd_error = err;
    }

    fn unavailable(e: EtcdError) -> AgentError {
        AgentError::Unavailable(format!(
            "cannot reach etcd ({e}); global networks cannot change now, local ones still work"
        ))
    }

    // ---- the etcd lease -------------------------------------------------

    /// Renews the etcd lease every third of its TTL; when it is gone (etcd
    /// was unreachable longer than the TTL) takes a new one and wakes the
    /// sync task to rebind this host's keys to it.
    async fn keep_lease_alive(self: Arc<Self>) {
        let ttl = self.cfg.lease_ttl;
        loop {
            if self.left.load(Ordering::Relaxed) {
                return;
            }
            let id = self.lease.load(Ordering::Relaxed);
            let ok = if id == 0 {
                false
            } else {
                let r = self.etcd.keep_alive(id).await;
                let outcome = match &r {
                    Ok(_) => "ok",
                    Err(EtcdError::LeaseGone(_)) => "expired",
                    Err(_) => "error",
                };
                self.host.metrics.lease_renewals.with(&[outcome]).inc();
                match r {
                    Ok(_) => true,
                    Err(EtcdError::LeaseGone(_)) => {
                        warn!(lease = id, "the etcd lease expired; taking a new one");
                        false
                    }
                    Err(e) => {
                        self.set_health(Some(e.to_string()));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            };
            if !ok {
                match self.etcd.grant(ttl.as_secs().max(1) as i64).await {
                    Ok(new) => {
                        self.lease.store(new, Ordering::Relaxed);
                        self.save_identity(|me| me.etcd_lease = new);
                        self.wake.notify_one();
                    }
                    Err(e) => {
                        self.set_health(Some(e.to_string()));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            tokio::time::sleep(ttl / 3).await;
        }
    }

    fn save_identity(&self, f: impl FnOnce(&mut Identity)) {
        let path = self.host.config().cluster_file();
        let mut me = crate::host::recover(self.me.lock());
        f(&mut me);
        if let Err(e) = me.save(&path) {
            warn!(error = %e, "cannot record the cluster identity");
        }
    }

    // ---- list, watch, reconcile ----------------------------------------

    async fn sync_forever(self: Arc<Self>) {
        // network -> the etcd lease its key was last bound to.
        let mut bound: HashMap<String, i64> = HashMap::new();
        let mut backoff = Duration::from_millis(200);
        let mut cleaned = false;
        loop {
            let r = self.sync_once(&mut bound, &mut cleaned).await;
            if let Err(e) = r {
                // The client only says "cancelled" when etcd refuses the
                // handshake (a certificate that expired while running):
                // a direct probe says why, for `weft status` and the log.
                let e = match e.kind() {
                    FailureKind::Unreachable => match self.etcd.probe().await {
                        Err(p) if matches!(p.kind(), FailureKind::Tls | FailureKind::Auth) => p,
                        _ => e,
                    },
                    _ => e,
                };
                self.set_health(Some(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.wake.notified() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(3));
            } else {
                backoff = Duration::from_millis(200);
            }
        }
    }

    async fn sync_once(
        &self,
        bound: &mut HashMap<String, i64>,
        cleaned: &mut bool,
    ) -> std::result::Result<(), EtcdError> {
        let (kvs, rev) = self.etcd.list("").await?;
        let mut global = Global::from_list(kvs);
        self.set_health(None);
        self.reconcile(&mut global, bound, true).await?;
        if !*cleaned {
            // Once per process, after the first full sync.
            match self.dataplane.run(Dataplane::remove_stale_routes).await {
                Ok(()) => *cleaned = true,
                Err(e) => warn!(error = %e, "cannot remove stale overlay routes"),
            }
        }
        let mut watch = self.etcd.watch("", rev + 1).await?;
        let mut verify = tokio::time::interval(VERIFY_EVERY);
        verify.tick().await;
        let mut host_changes = self.host.subscribe();
        host_changes.borrow_and_update();
        loop {
            let verify_now = tokio::select! {
                changed = host_changes.changed() => {
                    if changed.is_ok() {
                        host_changes.borrow_and_update();
                        self.publish_all(&global).await?;
                    }
                    continue;
                }
                batch = watch.next() => {
                    match batch? {
                        None => return Err(EtcdError::Cancelled("watch stream ended".into())),
                        Some(changes) if changes.is_empty() => continue,
                        Some(changes) => {
                            for c in changes {
                                global.apply(&c);
                            }
                            // And every batch already waiting: one pass for
                            // a burst (150 sandboxes removed at once came as
                            // ~100 batches, a pass each, seconds behind).
                            while let Ok(more) = tokio::time::timeout(Duration::ZERO, watch.next()).await {
                                match more? {
                                    None => return Err(EtcdError::Cancelled("watch stream ended".into())),
                                    Some(changes) => {
                                        for c in changes {
                                            global.apply(&c);
                                        }
                                    }
                                }
                            }
                            false
                        }
                    }
                }
                _ = verify.tick() => true,
                _ = self.wake.notified() => false,
            };
            self.reconcile(&mut global, bound, verify_now).await?;
        }
    }

    /// Makes this host match `global`: a lease of its own on every overlay
    /// network, the local network on it, and the backend programmed with
    /// every other host's lease. Networks gone from etcd go from the host.
    async fn reconcile(
        &self,
        global: &mut Global,
        bound: &mut HashMap<String, i64>,
        verify: bool,
    ) -> std::result::Result<(), EtcdError> {
        let began = std::time::Instant::now();
        let r = self.reconcile_pass(global, bound, verify).await;
        self.host
            .metrics
            .reconcile
            .with(&["cluster"])
            .observe_duration(began.elapsed());
        r
    }

    async fn reconcile_pass(
        &self,
        global: &mut Global,
        bound: &mut HashMap<String, i64>,
        verify: bool,
    ) -> std::result::Result<(), EtcdError> {
        let me = crate::host::recover(self.me.lock()).clone();
        let mut views = Vec::new();
        // (index in views, what to program): programmed all at once below.
        let mut jobs: Vec<(usize, Job)> = Vec::new();
        // (index in views, node -> its key change): added to the peers' views.
        let mut key_notes: Vec<(usize, HashMap<String, weft_model::api::KeyChange>)> = Vec::new();
        let names: Vec<String> = global.networks.keys().cloned().collect();
        for name in names {
            let net = global.networks[&name].clone();
            let Some(overlay) = net.overlay().cloned() else {
                continue;
            };
            let mut view = OverlayStatus {
                name: name.clone(),
                range: overlay.range,
                backend: overlay.backend.to_string(),
                subnet: None,
                problem: None,
                peers: Vec::new(),
                counters: Default::default(),
                kind: overlay.kind,
                blocks: Vec::new(),
                remote_endpoints: 0,
                exposed: global
                    .endpoints_of(&name)
                    .filter(|r| r.exposed && r.host_id != me.host_id)
                    .map(|r| weft_model::api::ExposedHost {
                        node: r.node.clone(),
                        ip: r.ip,
                    })
                    .collect(),
            };
            if self.left.load(Ordering::Relaxed) {
                view.problem = Some("this host left the cluster (`weft leave`)".into());
                views.push(view);
                continue;
            }
            if !weft_model::overlay::IMPLEMENTED.contains(&overlay.backend) {
                // Never another backend in its place.
                view.problem = Some(format!(
                    "backend {} is not available in this build of weft; the network is not joined",
                    overlay.backend
                ));
                views.push(view);
                continue;
            }
            if overlay.is_shared() {
                if let Some(job) = self.join_shared(global, &net, &me, &mut view).await? {
                    jobs.push((views.len(), job));
                    key_notes.push((views.len(), HashMap::new()));
                }
                views.push(view);
                continue;
            }
            // secure: the host's public key, from the key the backend will use.
            let public_key = if overlay.backend == weft_model::BackendKind::Secure {
                match weft_tunnel::Keys::load_or_create(&backend::key_file(&self.data_dir)) {
                    Ok(k) => Some(weft_tunnel::encode_key(&k.public_key())),
                    Err(e) => {
                        view.problem =
                            Some(format!("no key for the secure backend, not joining: {e}"));
                        views.push(view);
                        continue;
                    }
                }
            } else {
                None
            };
            let claim = Claim {
                net: &net,
                me: &me,
                etcd_lease: self.lease.load(Ordering::Relaxed),
                public_key,
                signer: self.signer.as_ref(),
            };
            let own = match lease::own_lease(&self.etcd, &claim, global, bound).await {
                Ok(l) => l,
                Err(LeaseError::Etcd(e)) => return Err(e),
                Err(LeaseError::NotOverlay) => {
                    view.problem = Some("not an overlay network; skipped".into());
                    views.push(view);
                    continue;
                }
                Err(LeaseError::Full) => {
                    view.problem = Some(format!(
                        "no free subnet of {} left for this host",
                        overlay.range
                    ));
                    views.push(view);
                    continue;
                }
            };
            view.subnet = Some(own.subnet);
            if me.leases.get(&name) != Some(&own.subnet) {
                // Remembered, so a restart prefers it if the key expired.
                self.save_identity(|me| {
                    me.leases.insert(name.clone(), own.subnet);
                });
            }
            let host = self.host.clone();
            let (n2, l2) = (net.clone(), own.clone());
            let overhead = overlay.backend.overhead();
            let mtu = (overhead > 0).then(|| self.underlay.1.saturating_sub(overhead));
            let ensured =
                tokio::task::spawn_blocking(move || host.ensure_overlay(&n2, Some(&l2), mtu))
                    .await
                    .unwrap_or_else(|e| Err(AgentError::Internal(e.to_string())));
            if let Err(e) = ensured {
                view.problem = Some(format!("cannot set the network up on this host: {e}"));
                views.push(view);
                continue;
            }
            // Names across hosts: this host's records out, the others' in.
            let problems = self.publish_endpoints(global, &net, &me).await?;
            if !problems.is_empty() {
                view.problem = Some(problems.join("; "));
            }
            let (believed, refused_records) = self.believed_endpoints(global, &name, &me.host_id);
            let believed: Vec<weft_model::blocks::EndpointRecord> =
                believed.into_iter().cloned().collect();
            view.remote_endpoints = self.take_remote_names(&name, &believed);
            if !refused_records.is_empty() {
                let p = format!("endpoint records refused: {}", refused_records.join("; "));
                view.problem = Some(
                    view.problem
                        .take()
                        .map_or(p.clone(), |q| format!("{q}; {p}")),
                );
            }
            let (peers, refused) = self.believed_peers(global, &name, &me.host_id);
            let changes = self.key_changes(&name, &peers);
            // Shown with the programmed peers below; never programmed.
            view.peers = refused;
            let local = backend::Local {
                host_id: me.host_id.clone(),
                public_ip: me.public_ip,
                underlay: self.underlay.0,
                underlay_mtu: self.underlay.1,
                subnet: own.subnet,
                data_dir: self.data_dir.clone(),
            };
            jobs.push((
                views.len(),
                Job {
                    net,
                    local,
                    peers,
                    endpoints: Vec::new(),
                },
            ));
            key_notes.push((views.len(), changes));
            views.push(view);
        }
        // The kernel's part, on a blocking thread: every backend programmed,
        // and the backends of networks removed from the cluster torn down.
        let keep: BTreeSet<String> = global.networks.keys().cloned().collect();
        bound.retain(|n, _| keep.contains(n));
        let (at, jobs): (Vec<usize>, Vec<Job>) = jobs.into_iter().unzip();
        match self
            .dataplane
            .run(move |dp| dp.sync(&jobs, &keep, verify))
            .await
        {
            Ok(done) => {
                for (i, p) in at.into_iter().zip(done) {
                    let refused = std::mem::take(&mut views[i].peers);
                    views[i].peers = p.peers;
                    views[i].peers.extend(refused);
                    views[i].counters = p.counters;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot program the overlay networks");
                for i in at {
                    views[i].problem = Some(e.to_string());
                }
            }
        }
        for (i, notes) in key_notes {
            for p in &mut views[i].peers {
                p.key_change = notes.get(&p.node).cloned();
            }
        }
        for net in self.host.local_overlays() {
            if !global.networks.contains_key(&net.name) {
                let host = self.host.clone();
                let name = net.name.clone();
                let r = tokio::task::spawn_blocking(move || host.drop_overlay(&name)).await;
                if let Ok(Err(e)) = r {
                    warn!(network = %net.name, error = %e, "cannot remove the overlay network");
                }
                self.save_identity(|me| {
                    me.leases.remove(&net.name);
                    me.blocks.remove(&net.name);
                });
                // What this host wrote of it after `network rm` cleared
                // it (a pass that still had the network).
                self.forget_network(global, &net.name, &me.host_id).await?;
            }
        }
        crate::host::recover(self.status.lock()).networks = views;
        Ok(())
    }

    /// A shared network on this host: the local network (the whole
    /// subnet), blocks held, this host's endpoints published, and the job
    /// that programs every other host's sandboxes; None when it cannot be
    /// set up (the reason is in `view`).
    async fn join_shared(
        &self,
        global: &Global,
        net: &Network,
        me: &identity::Identity,
        view: &mut OverlayStatus,
    ) -> std::result::Result<Option<Job>, EtcdError> {
        view.subnet = Some(net.subnet);
        let host = self.host.clone();
        let n2 = net.clone();
        let overhead = net.overlay().map_or(0, |o| o.backend.overhead());
        let mtu = Some(self.underlay.1.saturating_sub(overhead));
        let ensured = tokio::task::spawn_blocking(move || host.ensure_overlay(&n2, None, mtu))
            .await
            .unwrap_or_else(|e| Err(AgentError::Internal(e.to_string())));
        if let Err(e) = ensured {
            view.problem = Some(format!("cannot set the network up on this host: {e}"));
            return Ok(None);
        }
        let mut problems = Vec::new();
        self.hold_blocks(global, net, me, &mut problems).await?;
        problems.extend(self.publish_endpoints(global, net, me).await?);
        view.blocks = Self::blocks_view(global, net);
        let (believed, refused) = self.believed_endpoints(global, &net.name, &me.host_id);
        let endpoints: Vec<weft_model::blocks::EndpointRecord> =
            believed.into_iter().cloned().collect();
        view.remote_endpoints = self.take_remote_names(&net.name, &endpoints);
        if !refused.is_empty() {
            let n = refused.len();
            problems.push(format!(
                "{n} endpoint record{} refused: {}",
                if n == 1 { "" } else { "s" },
                refused.join("; ")
            ));
        }
        if !problems.is_empty() {
            view.problem = Some(problems.join("; "));
        }
        let local = backend::Local {
            host_id: me.host_id.clone(),
            public_ip: me.public_ip,
            underlay: self.underlay.0,
            underlay_mtu: self.underlay.1,
            subnet: net.subnet,
            data_dir: self.data_dir.clone(),
        };
        Ok(Some(Job {
            net: net.clone(),
            local,
            peers: Vec::new(),
            endpoints,
        }))
    }

    /// Deletes this host's blocks and endpoint records of a network that
    /// is gone from the cluster.
    async fn forget_network(
        &self,
        global: &Global,
        network: &str,
        me: &str,
    ) -> std::result::Result<(), EtcdError> {
        let blocks: Vec<String> = global
            .blocks
            .get(network)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, h)| h.host_id == me)
            .map(|(b, _)| weft_model::blocks::block_key(network, b))
            .collect();
        let records: Vec<String> = global
            .endpoints_of(network)
            .filter(|r| r.host_id == me)
            .map(|r| weft_model::blocks::endpoint_key(network, r.ip))
            .collect();
        for key in blocks.iter().chain(&records) {
            self.etcd.delete(key).await?;
        }
        self.written
            .lock()
            .await
            .retain(|k, _| !records.contains(k));
        Ok(())
    }

    async fn publish_endpoints(
        &self,
        global: &Global,
        net: &Network,
        me: &identity::Identity,
    ) -> std::result::Result<Vec<String>, EtcdError> {
        let mut written = self.written.lock().await;
        self.publish(global, net, me, &mut written).await
    }

    /// Gives the resolver the names of `network`'s sandboxes on other
    /// hosts (the records believed); returns how many there are.
    fn take_remote_names(
        &self,
        network: &str,
        believed: &[weft_model::blocks::EndpointRecord],
    ) -> usize {
        let remote: Vec<(std::net::Ipv4Addr, Vec<String>)> =
            believed.iter().map(|r| (r.ip, r.names.clone())).collect();
        let n = remote.len();
        self.host.set_remote_names(network, remote);
        let exposed = believed
            .iter()
            .filter(|r| r.exposed)
            .map(|r| r.ip)
            .collect();
        self.host.set_remote_exposed(network, exposed);
        n
    }

    /// This host's sandboxes changed: its records of every network that
    /// spans hosts are put right at once (the rest of a pass waits for the
    /// watch to bring them back).
    async fn publish_all(&self, global: &Global) -> std::result::Result<(), EtcdError> {
        let me = crate::host::recover(self.me.lock()).clone();
        let joined = self.host.local_overlays();
        for net in global.networks.values() {
            if joined.iter().any(|n| n.name == net.name) {
                self.publish_endpoints(global, net, &me).await?;
            }
        }
        Ok(())
    }

    /// The other hosts' leases of `network` this host believes, and a view
    /// of each one it refuses with why: with a CA to check against, a lease
    /// must be signed by its node's certificate, and a node holds one
    /// subnet per network (a second one it signs is a grab of someone
    /// else's subnet or a stale copy: all of that node's are refused).
    fn believed_peers(
        &self,
        global: &Global,
        network: &str,
        me: &str,
    ) -> (Vec<Lease>, Vec<weft_model::api::PeerView>) {
        let refuse = |l: &Lease, why: String| {
            warn!(network, node = %l.node, subnet = %l.subnet, reason = %why, "refusing a lease");
            weft_model::api::PeerView {
                node: l.node.clone(),
                subnet: l.subnet,
                public_ip: l.public_ip,
                programmed: None,
                problem: Some(why),
                key_change: None,
            }
        };
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        for (key, l) in global.leases_keyed(network) {
            if l.host_id == me {
                continue;
            }
            match self.verifier.as_ref().and_then(|v| v.refuse(key, l)) {
                Some(why) => refused.push(refuse(l, why)),
                None => ok.push(l.clone()),
            }
        }
        if self.verifier.is_some() {
            let (keep, grabs) = signing::one_subnet_per_node(ok);
            ok = keep;
            refused.extend(grabs.into_iter().map(|(l, why)| refuse(&l, why)));
        }
        (ok, refused)
    }

    /// Remembers each peer's secure-backend key and returns, per node, the
    /// last change seen by this process. The key comes from the peer's
    /// lease: a change is legitimate (a new key file) or a sign that
    /// someone who can sign as that host did it; either way it is shown.
    fn key_changes(
        &self,
        network: &str,
        peers: &[Lease],
    ) -> HashMap<String, weft_model::api::KeyChange> {
        let mut known = crate::host::recover(self.peer_keys.lock());
        let mut out = HashMap::new();
        for p in peers {
            let Some(key) = &p.public_key else { continue };
            let slot = (network.to_string(), p.host_id.clone());
            match known.get_mut(&slot) {
                None => {
                    known.insert(slot, (key.clone(), None));
                }
                Some((old, change)) => {
                    if old != key {
                        warn!(network, node = %p.node, previous = %old, current = %key, "a peer's secure-backend key changed");
                        *change = Some(weft_model::api::KeyChange {
                            previous: old.clone(),
                            current: key.clone(),
                            at_unix: crate::ids::now_unix(),
                        });
                        *old = key.clone();
                    }
                    if let Some(c) = change {
                        out.insert(p.node.clone(), c.clone());
                    }
                }
            }
        }
        out
    }

    // ---- API -------------------------------------------------------------

    /// Creates a global network in etcd; returns once this host has it.
    pub async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkView> {
        let (kvs, _) = self
            .etcd
            .list("networks/")
            .await
            .map_err(Self::unavailable)?;
        let global = Global::from_list(kvs);
        let mut existing: Vec<Network> = global.networks.values().cloned().collect();
        existing.extend(self.host.local_networks());
        let net = network::plan(&spec, &crate::ids::random_id(), &existing, &[])
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let Some(vni) = net.overlay().map(|o| o.vni) else {
            return Err(AgentError::BadRequest(
                "only overlay networks live in etcd; leave out --etcd-endpoints for a local network".into(),
            ));
        };
        let created = self
            .etcd
            .create(
                &[
                    (
                        network_key(&net.name),
                        serde_json::to_vec(&net).expect("serializable"),
                    ),
                    (vni_key(vni), net.name.clone().into_bytes()),
                ],
                None,
            )
            .await
            .map_err(Self::unavailable)?;
        if !created {
            return Err(AgentError::Conflict(format!(
                "a network named {:?} (or VNI {vni}) was just created on another host; pick another name, or try again",
                net.name
            )));
        }
        info!(network = %net.name, range = %net.subnet, "global network created");
        self.wake.notify_one();
        self.wait_local(&net.name, true).await?;
        self.host.network(&net.name)
    }

    /// Removes a global network from the cluster (every host drops it).
    pub async fn remove_network(&self, name: &str, force: bool) -> Result<RemovedNetwork> {
        let raw = self
            .etcd
            .get(&network_key(name))
            .await
            .map_err(Self::unavailable)?;
        let Some(raw) = raw else {
            return Err(AgentError::NotFound(format!(
                "no global network named {name:?}: `weft network ls` lists the networks"
            )));
        };
        let net: Network = serde_json::from_slice(&raw)
            .map_err(|e| AgentError::Internal(format!("network {name} in etcd: {e}")))?;
        let attached = self.host.sandboxes_on(name);
        if !attached.is_empty() && !force {
            return Err(AgentError::Conflict(format!(
                "network {name} has sandboxes attached on this host ({}); disconnect or remove them, or use `weft network rm -f {name}`",
                attached.join(", ")
            )));
        }
        let err = Self::unavailable;
        if !self
            .etcd
            .delete_if(&network_key(name), &raw)
            .await
            .map_err(err)?
        {
            return Err(AgentError::Conflict(format!(
                "network {name} changed while removing it; try again"
            )));
        }
        if let Some(o) = net.overlay() {
            self.etcd.delete(&vni_key(o.vni)).await.map_err(err)?;
        }
        // Its leases, and a shared network's blocks and every host's
        // endpoint records: a network made again with this name starts
        // from nothing (the records would be programmed as its sandboxes).
        for dir in [
            lease_dir(name),
            format!("blocks/{name}/"),
            format!("endpoints/{name}/"),
        ] {
            self.etcd.delete_prefix(&dir).await.map_err(err)?;
        }
        info!(network = %name, "global network removed");
        self.wake.notify_one();
        self.wait_local(name, false).await?;
        Ok(RemovedNetwork {
            name: name.to_string(),
            id: net.id,
        })
    }

    /// Waits until this host has (or no longer has) the network: woken by
    /// every change the host publishes, never polling its lock.
    async fn wait_local(&self, name: &str, present: bool) -> Result<()> {
        let mut changes = self.host.subscribe();
        let has = || self.host.snapshot().networks.contains_key(name) == present;
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while !has() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if waited.is_ok() && has() {
            return Ok(());
        }
        let why = self
            .status()
            .networks
            .into_iter()
            .find(|n| n.name == name)
            .and_then(|n| n.problem)
            .unwrap_or_else(|| "the agent has not caught up yet; see `weft status`".into());
        Err(AgentError::Unavailable(format!(
            "network {name} is {} in etcd but not yet on this host: {why}",
            if present { "created" } else { "removed" }
        )))
    }

    /// Leaves the cluster: revokes the etcd lease, so every other host
    /// removes what it programmed for this one at once.
    pub async fn leave(&self) -> Result<()> {
        self.left.store(true, Ordering::Relaxed);
        // First: no address of a subnet being given up is handed out again.
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || host.lock().left_cluster = true)
            .await
            .map_err(|e| AgentError::Internal(format!("leave: {e}")))?;
        let id = self.lease.swap(0, Ordering::Relaxed);
        if id != 0 {
            self.etcd.revoke(id).await.map_err(Self::unavailable)?;
        }
        self.save_identity(|me| me.etcd_lease = 0);
        info!("left the cluster: leases revoked");
        self.wake.notify_one();
        Ok(())
    }
}
