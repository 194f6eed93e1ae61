//! The kernel side of the cluster: the netlink socket and every overlay
//! network's backend, in one struct behind a std Mutex. Netlink requests
//! and TUN devices block, so they never run on tokio's worker threads:
//! the async tasks reach the dataplane only through [`Shared::run`], which
//! locks it on a blocking thread (`spawn_blocking`) and releases it before
//! the task resumes. No lock is ever held across an `.await`.

use crate::backend::{self, Backend, BackendError, Kernel, Local, PeerState, SharedLan};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tracing::{info, warn};
use weft_kernel::OVERLAY_ROUTE_PROTOCOL;
use weft_model::blocks::EndpointRecord;
use weft_model::{Lease, Network};

/// One network to program: this host, and every other host's lease (a
/// subnet-per-host network) or every other host's sandboxes (a shared one).
pub(crate) struct Job {
    pub net: Network,
    pub local: Local,
    pub peers: Vec<Lease>,
    pub endpoints: Vec<EndpointRecord>,
}

/// What a backend reports for one job.
#[derive(Debug, Default)]
pub(crate) struct Programmed {
    pub peers: Vec<PeerState>,
    pub counters: BTreeMap<String, u64>,
}

pub(crate) struct Dataplane {
    nl: Box<dyn Kernel>,
    backends: HashMap<String, Box<dyn Backend>>,
    /// Shared-subnet networks, programmed from endpoint records.
    lans: HashMap<String, SharedLan>,
}

impl Dataplane {
    pub fn new(nl: Box<dyn Kernel>) -> Dataplane {
        Dataplane {
            nl,
            backends: HashMap::new(),
            lans: HashMap::new(),
        }
    }

    /// Programs every job's backend (made on first use), in order, then
    /// tears down the backends of networks not in `keep` (gone from the
    /// cluster). Backends of networks kept but not in `jobs` (skipped this
    /// time) are left as they are. Blocking.
    pub fn sync(&mut self, jobs: &[Job], keep: &BTreeSet<String>, verify: bool) -> Vec<Programmed> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.net.overlay().is_some_and(|o| o.is_shared()) {
                let lan = self.lans.entry(job.net.name.clone()).or_default();
                let peers = lan.program(
                    self.nl.as_mut(),
                    &job.net,
                    &job.local,
                    &job.endpoints,
                    verify,
                );
                out.push(Programmed {
                    peers,
                    counters: Default::default(),
                });
                continue;
            }
            let Some(kind) = job.net.overlay().map(|o| o.backend) else {
                let e = BackendError::NotOverlay {
                    network: job.net.name.clone(),
                };
                out.push(Programmed {
                    peers: backend::all_failed(&job.peers, &e),
                    counters: Default::default(),
                });
                continue;
            };
            let b = match self.backends.entry(job.net.name.clone()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => match backend::new(kind) {
                    Some(b) => v.insert(b),
                    None => {
                        // The caller checks `IMPLEMENTED` first; never another backend.
                        out.push(Programmed::default());
                        continue;
                    }
                },
            };
            let peers = b.program(self.nl.as_mut(), &job.net, &job.local, &job.peers, verify);
            out.push(Programmed {
                peers,
                counters: b.counters(),
            });
        }
        let gone: Vec<String> = self
            .backends
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut b) = self.backends.remove(&name) {
                info!(network = %name, "the network left the cluster; removing what was programmed for it");
                b.teardown(self.nl.as_mut());
            }
        }
        let gone: Vec<String> = self
            .lans
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut lan) = self.lans.remove(&name) {
                info!(network = %name, "the shared network left the cluster; removing its VXLAN device");
                lan.teardown(self.nl.as_mut());
            }
        }
        out
    }

    /// Routes marked as weft's overlay routes that no backend wants (a
    /// peer that left while this agent was down) go. Nobody else's routes
    /// are touched. Blocking.
    pub fn remove_stale_routes(&mut self) {
        let wanted: BTreeSet<Ipv4Net> = self
            .backends
            .values()
            .flat_map(|b| b.owned_routes())
            .collect();
        match self.nl.routes_of(OVERLAY_ROUTE_PROTOCOL) {
            Ok(routes) => {
                for r in routes.into_iter().filter(|r| !wanted.contains(&r.dst)) {
                    info!(subnet = %r.dst, "removing a stale overlay route");
                    if let Err(e) = self.nl.delete_route(r.dst, OVERLAY_ROUTE_PROTOCOL) {
                        warn!(subnet = %r.dst, error = %e, "cannot remove a stale overlay route");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list routes"),
        }
    }
}

/// The dataplane as the async tasks hold it.
#[derive(Clone)]
pub(crate) struct Shared(Arc<Mutex<Dataplane>>);

impl Shared {
    pub fn new(dp: Dataplane) -> Shared {
        Shared(Arc::new(Mutex::new(dp)))
    }

    /// Runs `f` on the dataplane on a blocking thread. A panic in `f` is
    /// an error here (the lock it poisoned is recovered next time: the
    /// backends re-read the kernel, so nothing depends on the unwinding).
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Dataplane) -> R + Send + 'static,
    ) -> Result<R, BackendError> {
        let dp = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = crate::host::recover(dp.lock());
            f(&mut guard)
        })
        .await
        .map_err(|e| BackendError::Panicked(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{local, overlay_network, peer, FakeKernel};
    use weft_kernel::Route;

    fn job(name: &str, peer_subnet: &str) -> Job {
        Job {
            net: overlay_network(name, weft_model::BackendKind::HostGw),
            local: local("10.40.1.0/24"),
            peers: vec![peer("b", peer_subnet, "198.51.100.12")],
            endpoints: vec![],
        }
    }

    async fn routes(dp: &Shared, protocol: u8) -> BTreeSet<String> {
        dp.run(move |dp| dp.nl.routes_of(protocol).unwrap())
            .await
            .unwrap()
            .iter()
            .map(|r| r.dst.to_string())
            .collect()
    }

    #[tokio::test]
    async fn programs_tears_down_gone_networks_and_removes_stale_routes() {
        let mut k = FakeKernel::with_underlay("198.51.100.0/24");
        // A route of a peer that left while the agent was down, and
        // someone else's route.
        let stale = Route {
            dst: "10.40.9.0/24".parse().unwrap(),
            gateway: Some("198.51.100.19".parse().unwrap()),
            oif: None,
        };
        k.replace_route(&stale, OVERLAY_ROUTE_PROTOCOL, false)
            .unwrap();
        let theirs = Route {
            dst: "10.99.0.0/24".parse().unwrap(),
            ..stale
        };
        k.replace_route(&theirs, 4, false).unwrap();
        let dp = Shared::new(Dataplane::new(Box::new(k)));
        let keep: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let jobs = vec![job("a", "10.40.2.0/24"), job("b", "10.50.2.0/24")];
        let out = dp
            .run(move |dp| dp.sync(&jobs, &keep, false))
            .await
            .unwrap();
        assert_eq!(out.len(), 2);
        assert!(
            out.iter().all(|p| p.peers[0].programmed.is_some()),
            "{out:?}"
        );
        dp.run(|dp| dp.remove_stale_routes()).await.unwrap();
        assert_eq!(
            routes(&dp, OVERLAY_ROUTE_PROTOCOL).await,
            ["10.40.2.0/24".to_string(), "10.50.2.0/24".to_string()].into(),
            "the stale route went"
        );
        assert_eq!(routes(&dp, 4).await.len(), 1, "not ours: kept");
        // Network b leaves the cluster.
        let keep: BTreeSet<String> = ["a".to_string()].into();
        let jobs = vec![job("a", "10.40.2.0/24")];
        dp.run(move |dp| dp.sync(&jobs, &keep, false))
            .await
            .unwrap();
        assert_eq!(
            routes(&dp, OVERLAY_ROUTE_PROTOCOL).await,
            ["10.40.2.0/24".to_string()].into(),
            "b's route went with b"
        );
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_the_dataplane_stays_usable() {
        let dp = Shared::new(Dataplane::new(Box::new(FakeKernel::with_underlay(
            "198.51.100.0/24",
        ))));
        let r: Result<(), _> = dp.run(|_| panic!("boom")).await;
        assert!(matches!(r, Err(BackendError::Panicked(_))));
        let keep: BTreeSet<String> = ["a".to_string()].into();
        let jobs = vec![job("a", "10.40.2.0/24")];
        let out = dp
            .run(move |dp| dp.sync(&jobs, &keep, false))
            .await
            .unwrap();
        assert!(out[0].peers[0].programmed.is_some());
    }
}
