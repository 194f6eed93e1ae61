//! The plugin's side of dockerd's API (`--docker-host`): what Docker does
//! not tell a network driver, weft asks dockerd, and what the user would
//! otherwise type on every host, weft tells it.
//!
//! - Global networks (in a cluster): every overlay network on this host is
//!   a Docker network of the same name, made by weft with driver and IPAM
//!   driver `weft`, the network's subnet on this host (the whole shared
//!   subnet, or this host's lease) and gateway, `-o weft.network=NAME`, and
//!   the label `weft.auto=1`. A network made once in the cluster is thus
//!   usable by `docker run --network NAME` on every host. Only networks
//!   with the label are ever removed or changed by weft: when their weft
//!   network leaves the host, or their subnet is no longer the host's (a
//!   new lease); a network of the same name that weft did not make is left
//!   alone and shown as a problem in `weft status`.
//! - Names: libnetwork's driver protocol never says which container an
//!   endpoint is for, so after Join weft reads it from dockerd (`GET
//!   /networks/{id}` lists each container with its endpoint id, `GET
//!   /containers/{id}/json` its aliases) and records the name and aliases
//!   with the endpoint, where weft's resolver (and, through the cluster,
//!   other hosts') finds them. Docker's own resolver knows only the
//!   containers of its dockerd.
//!
//! Level-triggered: one pass compares what the host has with what dockerd
//! has and makes the difference; a pass runs when the host's global
//! networks or its unnamed Docker endpoints change, every `PERIOD`, and
//! sooner while dockerd does not answer or a name is not listed yet. The
//! agent never waits for dockerd: the task starts after the plugin socket
//! and simply retries. A pass runs on a blocking thread holding no lock
//! (dockerd calls the plugin back while it creates a network), and takes
//! the plugin's and host's locks only to record names.

use super::driver::docker_of;
use super::engine::{Engine, EngineError, Ipam, IpamConfig, NetworkCreate, NetworkResource};
use super::{short, Plugin};
use crate::host::Snapshot;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use weft_model::api::DockerView;
use weft_model::Network;

/// The label of the Docker networks weft makes.
pub(crate) const AUTO_LABEL: &str = "weft.auto";
const AUTO_VALUE: &str = "1";
/// A pass at least this often: heals a Docker network removed by hand.
const PERIOD: Duration = Duration::from_secs(10);
/// While dockerd does not answer.
const RETRY: Duration = Duration::from_secs(2);
/// While a joined endpoint's container is not listed by dockerd yet (it is
/// as soon as Join's answer is through).
const NAME_RETRY: Duration = Duration::from_millis(300);
/// How long an endpoint's missing container counts as "not yet" rather
/// than "not there" (then only the periodic pass looks again).
const NAME_PATIENCE: Duration = Duration::from_secs(30);

/// What a Docker network of weft's must be: from the weft network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Wanted {
    name: String,
    subnet: String,
    gateway: String,
    internal: bool,
}

impl Wanted {
    fn of(n: &Network) -> Wanted {
        Wanted {
            name: n.name.clone(),
            subnet: n.subnet.to_string(),
            gateway: n.gateway.to_string(),
            internal: n.internal,
        }
    }
}

/// What wakes a pass: the global networks and the joined Docker endpoints
/// whose container's name is not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    networks: Vec<Wanted>,
    unnamed: Vec<(String, String)>,
}

/// Joined Docker endpoints without a name: (Docker network id, endpoint id).
fn unnamed(snap: &Snapshot) -> Vec<(String, String)> {
    snap.sandboxes
        .values()
        .filter_map(|sb| {
            let d = docker_of(sb)?;
            (d.sandbox_key.is_some() && d.container_name.is_none())
                .then(|| (d.network_id.clone(), sb.id.clone()))
        })
        .collect()
}

fn wanted(snap: &Snapshot, auto_networks: bool) -> Vec<Wanted> {
    if !auto_networks {
        return Vec::new();
    }
    snap.networks
        .values()
        .filter(|n| n.is_global())
        .map(Wanted::of)
        .collect()
}

fn is_ours(n: &NetworkResource) -> bool {
    n.labels.get(AUTO_LABEL).map(String::as_str) == Some(AUTO_VALUE)
}

/// Whether dockerd's network is what weft would make now.
fn matches(have: &NetworkResource, want: &Wanted, driver: &str) -> bool {
    have.driver == driver
        && have.ipam.driver == driver
        && have.internal == want.internal
        && have.ipam.config
            == [IpamConfig {
                subnet: want.subnet.clone(),
                gateway: want.gateway.clone(),
            }]
}

/// How one pass ended, for the next wake-up.
#[derive(Debug, Default)]
struct Outcome {
    /// dockerd did not answer, or a call failed in a way worth retrying soon.
    failed: bool,
    /// A joined endpoint's container is not listed yet.
    names_pending: bool,
}

pub(super) struct Auto {
    plugin: Arc<Plugin>,
    engine: Engine,
    /// The driver name dockerd knows the plugin by (its socket's name).
    driver: String,
    /// In a cluster: make global networks Docker networks.
    auto_networks: bool,
    status: Arc<Mutex<DockerView>>,
    /// Endpoint id -> when a pass first looked for its container.
    first_looked: Mutex<HashMap<String, Instant>>,
}

impl Auto {
    pub(super) fn new(
        plugin: Arc<Plugin>,
        engine: Engine,
        driver: String,
        auto_networks: bool,
        status: Arc<Mutex<DockerView>>,
    ) -> Auto {
        Auto {
            plugin,
            engine,
            driver,
            auto_networks,
            status,
            first_looked: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self) -> Key {
        let snap = self.plugin.host.snapshot();
        Key {
            networks: wanted(&snap, self.auto_networks),
            unnamed: unnamed(&snap),
        }
    }

    /// Runs passes until the task is aborted (the plugin stops).
    pub(super) async fn run(self: Arc<Self>) {
        let mut changes = self.plugin.host.subscribe();
        let mut last: Option<Key> = None;
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Every change of the host publishes; most are not ours.
                    if last.as_ref() == Some(&self.key()) {
                        continue;
                    }
                }
            }
            let key = self.key();
            let me = Arc::clone(&self);
            let outcome = tokio::task::spawn_blocking(move || me.pass())
                .await
                .unwrap_or_else(|e| {
                    warn!(error = %e, "a pass over dockerd's networks panicked");
                    Outcome {
                        failed: true,
                        ..Default::default()
                    }
                });
            last = Some(key);
            let wait = if outcome.names_pending {
                NAME_RETRY
            } else if outcome.failed {
                RETRY
            } else {
                PERIOD
            };
            next = tokio::time::Instant::now() + wait;
        }
    }

    /// One pass: networks, then names; the status for `weft status`.
    fn pass(&self) -> Outcome {
        let snap = self.plugin.host.snapshot();
        let mut outcome = Outcome::default();
        let mut problems = Vec::new();
        let mut made = Vec::new();
        let mut result = Ok(());
        if self.auto_networks {
            result = self.sync_networks(&snap, &mut made, &mut problems);
        }
        if result.is_ok() {
            result = self.sync_names(&snap, &mut outcome);
        }
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let was_reachable = st.reachable || st.checked_unix == 0;
        st.checked_unix = crate::ids::now_unix();
        match result {
            Ok(()) => {
                if !st.reachable {
                    info!(api = %self.engine.socket().display(), "dockerd answers");
                }
                st.reachable = true;
                st.error = None;
                st.networks = made;
                st.problems = problems;
            }
            Err(e) => {
                outcome.failed = true;
                if e.is_unreachable() {
                    // Said once, not every retry: dockerd may simply start later.
                    if was_reachable {
                        warn!(error = %e, "dockerd does not answer; retrying every {} s", RETRY.as_secs());
                    }
                    st.reachable = false;
                } else {
                    warn!(error = %e, "a call to dockerd failed; retrying");
                    st.reachable = true;
                }
                st.error = Some(e.to_string());
            }
        }
        outcome
    }

    /// Makes dockerd's weft-made networks the host's global networks.
    fn sync_networks(
        &self,
        snap: &Snapshot,
        made: &mut Vec<String>,
        problems: &mut Vec<String>,
    ) -> Result<(), EngineError> {
        let want: BTreeMap<String, Wanted> = wanted(snap, true)
            .into_iter()
            .map(|w| (w.name.clone(), w))
            .collect();
        let have = self.engine.networks()?;
        // Names dockerd has after this pass's removals.
        let mut taken: BTreeSet<String> = have.iter().map(|n| n.name.clone()).collect();
        for n in have.iter().filter(|n| is_ours(n)) {
            let why = match want.get(&n.name) {
                Some(w) if matches(n, w, &self.driver) => {
                    made.push(n.name.clone());
                    continue;
                }
                Some(w) => format!(
                    "weft network {} is now {} (gateway {}) on this host",
                    w.name, w.subnet, w.gateway
                ),
                None => format!("weft network {} left this host", n.name),
            };
            match self.engine.remove_network(&n.id) {
                Ok(()) => {
                    info!(docker_network = short(&n.id), name = %n.name, reason = %why, "removed the Docker network weft made");
                    taken.remove(&n.name);
                }
                Err(e) if e.is_unreachable() => return Err(e),
                Err(e) => {
                    // Containers still on it, most likely: Docker refuses, and
                    // the next pass tries again.
                    warn!(name = %n.name, error = %e, reason = %why, "cannot remove the Docker network weft made");
                    problems.push(format!(
                        "Docker network {} (made by weft) should go, as {why}, but dockerd refuses: {e}",
                        n.name
                    ));
                    made.push(n.name.clone());
                }
            }
        }
        for w in want.values() {
            if taken.contains(&w.name) {
                let other = have.iter().find(|n| n.name == w.name && !is_ours(n));
                if let Some(o) = other {
                    problems.push(format!(
                        "a Docker network named {} exists that weft did not make (driver {}), so weft \
                         network {} is not made known to Docker; remove or rename that one \
                         (`docker network rm {}`) and weft makes it",
                        o.name, o.driver, w.name, o.name
                    ));
                }
                continue;
            }
            match self.engine.create_network(&self.create_request(w)) {
                Ok(c) => {
                    info!(docker_network = short(&c.id), name = %w.name, subnet = %w.subnet, "global network made known to dockerd");
                    made.push(w.name.clone());
                }
                Err(e) if e.is_unreachable() => return Err(e),
                Err(e) => {
                    warn!(name = %w.name, error = %e, "dockerd refused the Docker network of a global network");
                    problems.push(format!(
                        "weft network {} could not be made a Docker network: {e}",
                        w.name
                    ));
                }
            }
        }
        made.sort();
        Ok(())
    }

    fn create_request(&self, w: &Wanted) -> NetworkCreate {
        let option = BTreeMap::from([(super::driver::NETWORK_OPTION.to_string(), w.name.clone())]);
        NetworkCreate {
            name: w.name.clone(),
            check_duplicate: true,
            driver: self.driver.clone(),
            internal: w.internal,
            ipam: Ipam {
                driver: self.driver.clone(),
                config: vec![IpamConfig {
                    subnet: w.subnet.clone(),
                    gateway: w.gateway.clone(),
                }],
                options: option.clone(),
            },
            options: option,
            labels: BTreeMap::from([(AUTO_LABEL.to_string(), AUTO_VALUE.to_string())]),
        }
    }

    /// Records the container's names of every joined endpoint that has none.
    fn sync_names(&self, snap: &Snapshot, outcome: &mut Outcome) -> Result<(), EngineError> {
        let unnamed = unnamed(snap);
        let mut first = self.first_looked.lock().unwrap_or_else(|p| p.into_inner());
        first.retain(|eid, _| unnamed.iter().any(|(_, e)| e == eid));
        drop(first);
        let mut by_network: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (nid, eid) in &unnamed {
            by_network.entry(nid).or_default().push(eid);
        }
        for (nid, eids) in by_network {
            let net = match self.engine.network(nid) {
                Ok(n) => n,
                // dockerd does not know the network (another dockerd's record?).
                Err(e) if e.status() == Some(404) => {
                    debug!(docker_network = short(nid), "dockerd has no such network");
                    continue;
                }
                Err(e) => return Err(e),
            };
            for eid in eids {
                let Some((cid, c)) = net.containers.iter().find(|(_, c)| c.endpoint_id == eid)
                else {
                    let mut first = self.first_looked.lock().unwrap_or_else(|p| p.into_inner());
                    let since = *first.entry(eid.to_string()).or_insert_with(Instant::now);
                    if since.elapsed() < NAME_PATIENCE {
                        outcome.names_pending = true;
                    }
                    continue;
                };
                let mut names = vec![c.name.clone()];
                match self.engine.container(cid) {
                    Ok(cj) => names.extend(
                        cj.network_settings
                            .networks
                            .values()
                            .filter(|s| s.endpoint_id == eid)
                            .flat_map(|s| s.aliases.iter().cloned()),
                    ),
                    Err(e) if e.is_unreachable() => return Err(e),
                    // Gone meanwhile; its name alone will do.
                    Err(e) => {
                        debug!(container = short(cid), error = %e, "container inspect failed")
                    }
                }
                if let Err(e) = self.plugin.record_names(eid, &c.name, &names) {
                    warn!(endpoint = short(eid), error = %e, "recording a Docker container's names failed");
                    outcome.failed = true;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(driver: &str, subnet: &str, gateway: &str) -> NetworkResource {
        NetworkResource {
            name: "ov".into(),
            id: "abc".into(),
            driver: driver.into(),
            ipam: Ipam {
                driver: driver.into(),
                config: vec![IpamConfig {
                    subnet: subnet.into(),
                    gateway: gateway.into(),
                }],
                options: BTreeMap::new(),
            },
            labels: BTreeMap::from([(AUTO_LABEL.to_string(), AUTO_VALUE.to_string())]),
            ..Default::default()
        }
    }

    #[test]
    fn a_network_matches_only_with_the_same_subnet_gateway_and_driver() {
        let w = Wanted {
            name: "ov".into(),
            subnet: "10.0.2.0/24".into(),
            gateway: "10.0.2.1".into(),
            internal: false,
        };
        let n = resource("weft", "10.0.2.0/24", "10.0.2.1");
        assert!(is_ours(&n));
        assert!(matches(&n, &w, "weft"));
        assert!(!matches(&n, &w, "weft2"));
        assert!(!matches(
            &resource("weft", "10.0.3.0/24", "10.0.3.1"),
            &w,
            "weft"
        ));
        assert!(!matches(
            &resource("weft", "10.0.2.0/24", "10.0.2.254"),
            &w,
            "weft"
        ));
        let mut other = n.clone();
        other.labels.clear();
        assert!(!is_ours(&other));
    }
}
