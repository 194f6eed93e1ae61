//! Sandbox lifecycle: create (validate everything, then act, rolling back on
//! error), record the process, stop, remove. And the views the API returns.

use crate::bridge;
use crate::error::{AgentError, Result};
use crate::host::{Host, Inner, NetworkState};
use crate::netns_pool::Prepared;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use weft_kernel::{process, Netlink, Netns};
use weft_model::api::{CreateSandbox, EndpointView, NetworkView, Removed, SandboxView, State};
use weft_model::sandbox::{host_veth_name, parse_net_modes};
use weft_model::{keys, names, Attachment, Endpoint, NetMode, ProcessRef, Sandbox};
use weft_store::{Store, StoreJson};

/// 32 random bytes as 64 hex digits, like a Docker container id.
pub(crate) fn random_id() -> String {
    let mut buf = [0u8; 32];
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n, 32, "getrandom failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a validated request will do.
enum Plan {
    Networks(Vec<String>),
    None,
    Host,
    Container { id: String, name: String },
}

fn state_of(sb: &Sandbox) -> State {
    match &sb.process {
        None => State::Created,
        Some(p) if process::is_alive(p) => State::Running,
        Some(_) => State::Exited,
    }
}

/// How the veth pairs of a sandbox go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Links {
    /// Delete them now (rollback, repair).
    Delete,
    /// Let the kernel delete them when it destroys the namespace: unpinning a
    /// namespace costs ~0.1 ms, deleting a veth ~13 ms of RCU waits, and the
    /// kernel destroys dying namespaces in batches. `Host::reap_later` deletes
    /// any that something else kept alive.
    WithNamespace,
}

/// Undoes the network side of a sandbox: veths, addresses, namespace file.
/// Tolerates parts that are already gone.
pub(crate) fn teardown_network(
    nl: &mut Netlink,
    networks: &mut BTreeMap<String, NetworkState>,
    attachment: &Attachment,
    netns: Option<&str>,
    links: Links,
) -> Result<()> {
    let mut first_err = None;
    for ep in attachment.endpoints() {
        if links == Links::Delete || netns.is_none() {
            if let Err(e) = bridge::detach(nl, ep) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(n) = networks.get_mut(&ep.network) {
            n.pool.release(ep.ip);
        }
    }
    if let Some(path) = netns {
        if let Err(e) = Netns::remove(Path::new(path)) {
            first_err.get_or_insert(e.into());
        }
    }
    first_err.map_or(Ok(()), Err)
}

impl Inner {
    fn view(&self, sb: &Sandbox) -> SandboxView {
        let netns = match &sb.attachment {
            Attachment::Container { id, .. } => {
                self.sandboxes.get(id).and_then(|t| t.netns.clone())
            }
            // The host this agent serves is the agent's own namespace (in a lab, a simulated host's).
            Attachment::Host => Some(format!("/proc/{}/ns/net", std::process::id())),
            _ => sb.netns.clone(),
        };
        SandboxView {
            id: sb.id.clone(),
            name: sb.name.clone(),
            state: state_of(sb),
            pid: sb.process.map(|p| p.pid),
            attachment: sb.attachment.clone(),
            netns,
            command: sb.command.clone(),
            created_unix: sb.created_unix,
            network_setup_us: sb.network_setup_us,
            process: sb.process,
        }
    }

    fn validate(&self, req: &CreateSandbox) -> Result<(String, Plan)> {
        if req.command.is_empty() {
            return Err(AgentError::BadRequest(
                "no command given: use weft run [OPTIONS] -- CMD [ARGS...]".into(),
            ));
        }
        let mut modes =
            parse_net_modes(&req.net).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        if modes.is_empty() {
            modes.push(NetMode::Network(
                weft_model::network::DEFAULT_NETWORK.into(),
            ));
        }
        let name = match &req.name {
            Some(n) => {
                names::validate("sandbox", n).map_err(|e| AgentError::BadRequest(e.to_string()))?;
                if let Some(id) = self.names.get(n) {
                    return Err(AgentError::Conflict(format!(
                        "the name {n:?} is already taken by sandbox {}; pick another name or remove it with `weft rm -f {n}`",
                        &id[..12]
                    )));
                }
                n.clone()
            }
            None => String::new(),
        };
        if req.ip.is_some() && !(modes.len() == 1 && matches!(modes[0], NetMode::Network(_))) {
            return Err(AgentError::BadRequest(
                "--ip needs exactly one network to take the address from (not host, none or container:)".into(),
            ));
        }
        let plan = match &modes[0] {
            NetMode::Host => Plan::Host,
            NetMode::None => Plan::None,
            NetMode::Container(target) => {
                let t = self.find(target).map_err(|e| match e {
                    AgentError::NotFound(_) => AgentError::NotFound(format!(
                        "--net container:{target}: no sandbox named {target:?}; `weft ps` lists the sandboxes"
                    )),
                    e => e,
                })?;
                if !t.attachment.owns_netns() {
                    return Err(AgentError::BadRequest(format!(
                        "--net container:{target}: sandbox {target} has no namespace of its own (it uses --net {}); join the sandbox it shares instead",
                        t.attachment.describe()
                    )));
                }
                if state_of(t) != State::Running {
                    return Err(AgentError::Conflict(format!(
                        "--net container:{target}: sandbox {target} is not running"
                    )));
                }
                Plan::Container {
                    id: t.id.clone(),
                    name: t.name.clone(),
                }
            }
            NetMode::Network(_) => {
                let mut nets = Vec::new();
                for m in &modes {
                    let NetMode::Network(n) = m else {
                        unreachable!("checked by parse_net_modes")
                    };
                    let Some(state) = self.networks.get(n) else {
                        return Err(AgentError::NotFound(format!(
                            "no network named {n:?}: `weft network ls` lists the networks; --net also takes host, none and container:NAME"
                        )));
                    };
                    if let Some(ip) = req.ip {
                        state
                            .pool
                            .check_free(ip)
                            .map_err(|e| AgentError::BadRequest(format!("--ip: {e}")))?;
                    }
                    nets.push(n.clone());
                }
                Plan::Networks(nets)
            }
        };
        Ok((name, plan))
    }

    /// Creates the sandbox's namespace and endpoints; rolls back on error.
    fn build(
        &mut self,
        id: &str,
        plan: &Plan,
        ip: Option<std::net::Ipv4Addr>,
    ) -> Result<(Attachment, Option<String>)> {
        let path = self.cfg.netns_dir().join(&random_id()[..32]);
        match plan {
            Plan::Host => Ok((Attachment::Host, None)),
            Plan::Container { id, name } => Ok((
                Attachment::Container {
                    id: id.clone(),
                    name: name.clone(),
                },
                None,
            )),
            Plan::None => {
                Netns::create(&path, crate::netns_pool::SANDBOX_SYSCTLS)?;
                Ok((Attachment::None, Some(path.display().to_string())))
            }
            Plan::Networks(nets) => {
                let t = Instant::now();
                let mut prepared = match self.pool.take() {
                    Some(p) => p,
                    None => Prepared::make(self.pool.dir(), &mut self.nl)?,
                };
                debug!(prepare_us = t.elapsed().as_micros(), "namespace ready");
                let path = prepared.ns.path().display().to_string();
                let parked = prepared.host_ifname.clone();
                let mut endpoints = Vec::with_capacity(nets.len());
                let made = (|| {
                    for (i, n) in nets.iter().enumerate() {
                        let state = self.networks.get_mut(n).expect("validated");
                        let addr = state
                            .pool
                            .allocate(if i == 0 { ip } else { None })
                            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
                        let ep = Endpoint {
                            network: n.clone(),
                            ifname: format!("eth{i}"),
                            host_ifname: host_veth_name(id, i),
                            ip: addr,
                            prefix_len: state.net.subnet.prefix_len(),
                            gateway: state.net.gateway,
                        };
                        let bridge_index = state.bridge_index;
                        endpoints.push(ep.clone());
                        let attached = if i == 0 {
                            bridge::attach_prepared(
                                &mut self.nl,
                                &mut prepared,
                                bridge_index,
                                &ep,
                                true,
                            )
                        } else {
                            bridge::attach(
                                &mut self.nl,
                                &prepared.ns,
                                &mut prepared.ns_nl,
                                bridge_index,
                                &ep,
                                false,
                            )
                        };
                        attached.map_err(|e| bridge_full_hint(e, n))?;
                    }
                    Ok(())
                })();
                let attachment = Attachment::Networks { endpoints };
                if let Err(e) = made {
                    // The host end may still carry its parked name.
                    let _ = self.nl.delete_link(&parked);
                    if let Err(undo) = teardown_network(
                        &mut self.nl,
                        &mut self.networks,
                        &attachment,
                        Some(&path),
                        Links::Delete,
                    ) {
                        warn!(sandbox = id, error = %undo, "rollback left something behind");
                    }
                    return Err(e);
                }
                Ok((attachment, Some(path)))
            }
        }
    }
}

/// A Linux bridge takes at most 1024 ports (BR_MAX_PORTS); the kernel says EXFULL.
fn bridge_full_hint(e: AgentError, network: &str) -> AgentError {
    match &e {
        AgentError::Kernel(k) if k.errno() == Some(libc::EXFULL) => AgentError::Conflict(format!(
            "network {network} is full: its Linux bridge already has the 1023 sandbox ports the kernel allows; \
             create another network for more sandboxes"
        )),
        _ => e,
    }
}

impl Host {
    pub fn create_sandbox(&self, req: CreateSandbox) -> Result<SandboxView> {
        let mut g = self.lock();
        let (name, plan) = g.validate(&req)?;
        let id = random_id();
        let name = if name.is_empty() {
            id[..12].to_string()
        } else {
            name
        };
        let started = Instant::now();
        let (attachment, netns) = g.build(&id, &plan, req.ip)?;
        let network_setup_us = started.elapsed().as_micros() as u64;
        let sb = Sandbox {
            id: id.clone(),
            name: name.clone(),
            attachment,
            netns,
            process: None,
            auto_remove: req.auto_remove,
            command: req.command,
            created_unix: now_unix(),
            network_setup_us,
        };
        if let Err(e) = g.runtime.create_json(&keys::sandbox(&id), &sb) {
            let inner = &mut *g;
            let _ = teardown_network(
                &mut inner.nl,
                &mut inner.networks,
                &sb.attachment,
                sb.netns.as_deref(),
                Links::Delete,
            );
            return Err(e.into());
        }
        info!(sandbox = %name, id = &id[..12], net = %sb.attachment.describe(), setup_us = network_setup_us, "created");
        let view = g.view(&sb);
        g.names.insert(name, id.clone());
        g.sandboxes.insert(id, sb);
        Ok(view)
    }

    /// Records the process now running in the sandbox.
    pub fn started(&self, key: &str, pid: i32) -> Result<SandboxView> {
        let (view, watch) = {
            let mut g = self.lock();
            let id = g.find(key)?.id.clone();
            let p = process::identify(pid)
                .ok_or_else(|| AgentError::BadRequest(format!("process {pid} does not exist")))?;
            let sb = g.sandboxes.get_mut(&id).expect("found");
            if sb.process.is_some() {
                return Err(AgentError::Conflict(format!(
                    "sandbox {} already has a process",
                    sb.name
                )));
            }
            sb.process = Some(p);
            let sb = sb.clone();
            g.runtime.put_json(&keys::sandbox(&id), &sb)?;
            (g.view(&sb), sb.auto_remove.then_some((id, p)))
        };
        if let Some((id, p)) = watch {
            self.remove_when_exited(id, p);
        }
        Ok(view)
    }

    /// For `weft run` without -d: the sandbox goes when its process does, even
    /// if the CLI that waits for it was killed.
    pub(crate) fn remove_when_exited(&self, id: String, p: ProcessRef) {
        let host = self.clone();
        tokio::runtime::Handle::current().spawn(async move {
            if let Ok(Some(fd)) = process::pidfd(&p) {
                // SAFETY: the AsyncFd owns the pidfd, so it stays open while registered.
                let afd = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        fd,
                        tokio::io::Interest::READABLE,
                    )
                };
                if let Ok(afd) = afd {
                    let _ = afd.readable().await;
                }
            }
            let _ = tokio::task::spawn_blocking(move || match host.remove(&id, true) {
                Ok(_) | Err(AgentError::NotFound(_)) => {}
                Err(e) => warn!(id = &id[..12], error = %e, "auto-remove failed"),
            })
            .await;
        });
    }

    pub fn list(&self) -> Vec<SandboxView> {
        let g = self.lock();
        let mut v: Vec<SandboxView> = g.sandboxes.values().map(|s| g.view(s)).collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.created_unix));
        v
    }

    pub fn get(&self, key: &str) -> Result<SandboxView> {
        let g = self.lock();
        let sb = g.find(key)?;
        Ok(g.view(sb))
    }

    /// SIGTERM, then SIGKILL after `timeout`. The sandbox stays until `rm`.
    pub fn stop(&self, key: &str, timeout: Duration) -> Result<SandboxView> {
        let p = self.lock().find(key)?.process;
        if let Some(p) = p {
            if let Some(fd) = process::pidfd(&p)? {
                process::signal(&fd, libc::SIGTERM)?;
                if !process::wait_exit(&fd, timeout.as_millis() as i32) {
                    process::signal(&fd, libc::SIGKILL)?;
                    process::wait_exit(&fd, 5000);
                }
            }
        }
        self.get(key)
    }

    pub fn remove(&self, key: &str, force: bool) -> Result<Removed> {
        let (id, name, p) = {
            let g = self.lock();
            let sb = g.find(key)?;
            let running = state_of(sb) == State::Running;
            if running && !force {
                return Err(AgentError::Conflict(format!(
                    "sandbox {} is running: stop it first with `weft stop {0}`, or use `weft rm -f {0}`",
                    sb.name
                )));
            }
            let joiners: Vec<&str> = g
                .sandboxes
                .values()
                .filter(
                    |o| matches!(&o.attachment, Attachment::Container { id, .. } if *id == sb.id),
                )
                .filter(|o| state_of(o) == State::Running)
                .map(|o| o.name.as_str())
                .collect();
            if !joiners.is_empty() && !force {
                return Err(AgentError::Conflict(format!(
                    "sandbox {} shares its namespace with running sandboxes ({}); remove them first or use `weft rm -f {}`",
                    sb.name,
                    joiners.join(", "),
                    sb.name
                )));
            }
            (
                sb.id.clone(),
                sb.name.clone(),
                running.then_some(sb.process).flatten(),
            )
        };
        if let Some(p) = p {
            if let Some(fd) = process::pidfd(&p)? {
                process::signal(&fd, libc::SIGKILL)?;
                process::wait_exit(&fd, 5000);
            }
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(sb) = inner.sandboxes.remove(&id) else {
            return Err(AgentError::NotFound(format!(
                "sandbox {name} was removed meanwhile"
            )));
        };
        inner.names.remove(&sb.name);
        let started = Instant::now();
        let torn = teardown_network(
            &mut inner.nl,
            &mut inner.networks,
            &sb.attachment,
            sb.netns.as_deref(),
            Links::WithNamespace,
        );
        let network_teardown_us = started.elapsed().as_micros() as u64;
        if let Err(e) = torn {
            // Keep the record so that the next reconcile retries.
            inner.names.insert(sb.name.clone(), id.clone());
            inner.sandboxes.insert(id, sb);
            return Err(e);
        }
        inner.runtime.delete(&keys::sandbox(&id))?;
        let _ = std::fs::remove_file(inner.cfg.logs_dir().join(format!("{id}.log")));
        drop(g);
        self.reap_later(
            sb.attachment
                .endpoints()
                .iter()
                .map(|e| e.host_ifname.clone())
                .collect(),
        );
        info!(sandbox = %name, id = &id[..12], teardown_us = network_teardown_us, "removed");
        Ok(Removed {
            id,
            name,
            network_teardown_us,
        })
    }

    /// Deletes, a while after a removal, host veths that outlived their
    /// namespace because something else still holds it open.
    fn reap_later(&self, links: Vec<String>) {
        if links.is_empty() {
            return;
        }
        let host = self.clone();
        tokio::runtime::Handle::current().spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = tokio::task::spawn_blocking(move || {
                let mut g = host.lock();
                for l in links {
                    match g.nl.delete_link(&l) {
                        Ok(true) => info!(link = %l, "deleted a veth its namespace outlived"),
                        Ok(false) => {}
                        Err(e) => warn!(link = %l, error = %e, "could not delete veth"),
                    }
                }
            })
            .await;
        });
    }

    /// Stops the namespace pool and removes its entries (graceful shutdown).
    pub fn shutdown(&self) {
        self.lock().pool.drain();
    }

    pub fn networks(&self) -> Vec<NetworkView> {
        let g = self.lock();
        g.networks.values().map(|n| network_view(&g, n)).collect()
    }

    pub fn network(&self, name: &str) -> Result<NetworkView> {
        let g = self.lock();
        let n = g.networks.get(name).ok_or_else(|| {
            AgentError::NotFound(format!(
                "no network named {name:?}: `weft network ls` lists the networks"
            ))
        })?;
        Ok(network_view(&g, n))
    }
}

fn network_view(g: &Inner, n: &NetworkState) -> NetworkView {
    let endpoints = g
        .sandboxes
        .values()
        .flat_map(|s| s.attachment.endpoints().iter().map(move |e| (s, e)))
        .filter(|(_, e)| e.network == n.net.name)
        .map(|(s, e)| EndpointView {
            sandbox: s.name.clone(),
            sandbox_id: s.id.clone(),
            ip: e.ip,
            host_ifname: e.host_ifname.clone(),
        })
        .collect();
    NetworkView {
        name: n.net.name.clone(),
        id: n.net.id.clone(),
        driver: n.net.driver.to_string(),
        subnet: n.net.subnet,
        gateway: n.net.gateway,
        bridge: n.net.bridge.clone(),
        endpoints,
    }
}
