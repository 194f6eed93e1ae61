//! Sandbox lifecycle: create (validate everything, then act, rolling back on
//! error), record the process, stop, remove. And the views the API returns.

use crate::attach::{self, Attach, DefaultRoute, EndpointRequest, Links, Namespace, Resolv};
use crate::error::{AgentError, Result};
use crate::host::{Host, Inner, Snapshot};
use crate::ids::{now_unix, random_id};
use std::time::{Duration, Instant};
use tracing::{info, warn};
use weft_kernel::process;
use weft_model::api::{CreateSandbox, Removed, SandboxView, State};
use weft_model::sandbox::{host_veth_name, parse_net_modes};
use weft_model::{
    keys, names, Attachment, NetMode, NetRequest, PortMapping, PortRequest, ProcessRef, Sandbox,
};
use weft_store::StoreJson;

/// What a validated request will do.
enum Plan {
    /// Networks in the order given, and which one carries the default route.
    Networks {
        requests: Vec<NetRequest>,
        default_route: Option<String>,
    },
    None,
    Host,
    Container {
        id: String,
        name: String,
    },
}

pub(crate) use crate::host::state_of;

impl Snapshot {
    /// The resolv.conf weft wrote for a sandbox with a namespace of its own
    /// (`create_sandbox` writes one for exactly those); `--net container:`
    /// uses its target's, `--net host` and CNI attachments none.
    fn resolv_path(&self, sb: &Sandbox) -> Option<String> {
        let owner = match &sb.attachment {
            Attachment::Container { id, .. } => self.sandboxes.get(id)?,
            _ => sb,
        };
        (owner.attachment.owns_netns() && owner.external.is_none()).then(|| {
            self.resolv_dir
                .join(format!("{}.conf", owner.id))
                .display()
                .to_string()
        })
    }

    pub(crate) fn view(&self, sb: &Sandbox) -> SandboxView {
        let netns = match &sb.attachment {
            Attachment::Container { id, .. } => {
                self.sandboxes.get(id).and_then(|t| t.netns.clone())
            }
            // The host this agent serves is the agent's own namespace (in a lab, a simulated host's).
            Attachment::Host => Some(format!("/proc/{}/ns/net", std::process::id())),
            _ => sb.netns.clone(),
        };
        let state = state_of(sb);
        // Written by the process's waiter (`weft run -d`) when it ends.
        let exit_code = (state == State::Exited)
            .then(|| std::fs::read_to_string(self.logs_dir.join(format!("{}.exit", sb.id))).ok())
            .flatten()
            .and_then(|s| s.trim().parse().ok());
        SandboxView {
            id: sb.id.clone(),
            name: sb.name.clone(),
            state,
            exit_code,
            pid: sb.process.map(|p| p.pid),
            attachment: sb.attachment.clone(),
            netns,
            command: sb.command.clone(),
            created_unix: sb.created_unix,
            network_setup_us: sb.network_setup_us,
            ports: sb.ports.clone(),
            resolv_conf: self.resolv_path(sb),
            hostname: sb.hostname.clone(),
            process: sb.process,
        }
    }

    pub(crate) fn find(&self, key: &str) -> Result<&Sandbox> {
        crate::host::find_in(&self.sandboxes, key)
    }
}

/// A host name as the kernel and resolvers take it: 1 to 64 bytes of
/// letters, digits, '-' and '.', not starting with '-' or '.'.
fn check_hostname(h: &str) -> std::result::Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--hostname {h:?}: use 1 to 64 letters, digits, '-' and '.', starting with a letter or digit"
        ))
    }
}

impl Inner {
    fn validate(&self, req: &CreateSandbox) -> Result<(String, Plan, Vec<PortMapping>)> {
        let bad = |e: String| AgentError::BadRequest(e);
        if req.command.is_empty() {
            return Err(bad(
                "no command given: use weft run [OPTIONS] -- CMD [ARGS...]".into(),
            ));
        }
        let mut modes = parse_net_modes(&req.net).map_err(|e| bad(e.to_string()))?;
        if modes.is_empty() {
            modes.push(NetMode::Network(NetRequest {
                network: weft_model::network::DEFAULT_NETWORK.into(),
                ..Default::default()
            }));
        }
        let name = match &req.name {
            Some(n) => {
                names::validate("sandbox", n).map_err(|e| bad(e.to_string()))?;
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
        if let Some(h) = &req.hostname {
            check_hostname(h).map_err(bad)?;
        }
        if let Some(mac) = &req.mac_address {
            match modes.as_mut_slice() {
                [NetMode::Network(r)] => r.mac = Some(mac.clone()),
                _ => {
                    return Err(bad(
                        "--mac-address needs exactly one network (--net NAME): it names the interface on it".into(),
                    ))
                }
            }
        }
        if let Some(ip) = req.ip {
            // --ip is shorthand for NAME:ip=ADDR on the only network.
            match modes.as_mut_slice() {
                [NetMode::Network(r)] if r.ip.is_none() => r.ip = Some(ip),
                [NetMode::Network(_)] => return Err(bad("--ip and --net NAME:ip= are both given; keep one".into())),
                _ => {
                    return Err(bad(
                        "--ip needs exactly one network; with several, give each its own: --net NAME:ip=ADDR".into(),
                    ))
                }
            }
        }
        let mut port_requests = Vec::with_capacity(req.ports.len());
        for p in &req.ports {
            port_requests.push(p.parse::<PortRequest>().map_err(|e| bad(e.to_string()))?);
        }
        if !port_requests.is_empty() && !matches!(modes[0], NetMode::Network(_)) {
            return Err(bad(format!(
                "-p publishes ports of a network; --net {} has none",
                modes[0]
            )));
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
                    return Err(bad(format!(
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
                let mut requests = Vec::new();
                for m in &modes {
                    let NetMode::Network(r) = m else {
                        unreachable!("checked by parse_net_modes")
                    };
                    if !self.networks.contains_key(&r.network) {
                        return Err(AgentError::NotFound(format!(
                            "no network named {:?}: `weft network ls` lists the networks; --net also takes host, none and container:NAME",
                            r.network
                        )));
                    }
                    requests.push(r.clone());
                }
                let default_route = weft_model::network::default_route_network(
                    requests.iter().map(|r| &self.networks[&r.network].net),
                )
                .map(String::from);
                Plan::Networks {
                    requests,
                    default_route,
                }
            }
        };
        // The sandbox has no id yet: no published port is its own.
        let mappings = crate::attach::resolve_ports(self, &port_requests, "")?;
        Ok((name, plan, mappings))
    }
}

impl Host {
    pub fn create_sandbox(&self, req: CreateSandbox) -> Result<SandboxView> {
        let id = random_id();
        {
            let mut g = self.lock();
            let (name, plan, mappings) = g.validate(&req)?;
            let name = if name.is_empty() {
                id[..12].to_string()
            } else {
                name
            };
            let started = Instant::now();
            let mut sb = Sandbox {
                id: id.clone(),
                name: name.clone(),
                attachment: Attachment::None,
                netns: None,
                process: None,
                auto_remove: req.auto_remove,
                command: req.command.clone(),
                created_unix: now_unix(),
                network_setup_us: 0,
                ports: Vec::new(),
                external: None,
                hostname: req.hostname.clone(),
            };
            let resolv = Resolv {
                servers: req.dns.clone(),
                search: req.dns_search.clone(),
                options: req.dns_options.clone(),
            };
            let bare = |sb: Sandbox, namespace, resolv| Attach {
                sandbox: sb,
                endpoints: Vec::new(),
                namespace,
                default_route: DefaultRoute::On(None),
                ports: Vec::new(),
                resolv,
                replace: false,
                started: Some(started),
            };
            let sb = match plan {
                Plan::Networks {
                    requests,
                    default_route,
                } => {
                    sb.attachment = Attachment::Networks {
                        endpoints: Vec::new(),
                    };
                    let endpoints = requests
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| EndpointRequest {
                            network: r.network,
                            ip: r.ip,
                            aliases: r.aliases,
                            ifname: format!("eth{i}"),
                            host_ifname: host_veth_name(&id, i),
                            mac: r.mac,
                            reserved: false,
                            subrange: r.subrange,
                        })
                        .collect();
                    let a = Attach {
                        sandbox: sb,
                        endpoints,
                        namespace: Namespace::New,
                        default_route: DefaultRoute::On(default_route),
                        ports: mappings,
                        resolv: Some(resolv),
                        replace: false,
                        started: Some(started),
                    };
                    attach::attach(&mut g, a)?
                }
                // A namespace with `lo` only.
                Plan::None => attach::attach(&mut g, bare(sb, Namespace::New, Some(resolv)))?,
                Plan::Host => {
                    sb.attachment = Attachment::Host;
                    attach::attach(&mut g, bare(sb, Namespace::Later, None))?
                }
                Plan::Container {
                    id: tid,
                    name: tname,
                } => {
                    sb.attachment = Attachment::Container {
                        id: tid,
                        name: tname,
                    };
                    attach::attach(&mut g, bare(sb, Namespace::Later, None))?
                }
            };
            info!(sandbox = %name, id = &id[..12], net = %sb.attachment.describe(), setup_us = sb.network_setup_us, "created");
        }
        self.get(&id)
    }

    /// Records the process now running in the sandbox.
    pub fn started(&self, key: &str, pid: i32, start_time: Option<u64>) -> Result<SandboxView> {
        let (id, watch) = {
            let mut g = self.lock();
            let id = g.find(key)?.id.clone();
            // With the start time its parent read, a command that has
            // already ended is recorded as exited (its waiter writes the code).
            let p = match start_time {
                Some(start_time) => weft_model::ProcessRef { pid, start_time },
                None => process::identify(pid).ok_or_else(|| {
                    AgentError::BadRequest(format!("process {pid} does not exist"))
                })?,
            };
            let Some(sb) = g.sandboxes.get_mut(&id).map(std::sync::Arc::make_mut) else {
                return Err(AgentError::NotFound(format!(
                    "sandbox {key} was removed meanwhile"
                )));
            };
            if sb.process.is_some() {
                return Err(AgentError::Conflict(format!(
                    "sandbox {} already has a process",
                    sb.name
                )));
            }
            sb.process = Some(p);
            let sb = sb.clone();
            if let Err(e) = g.runtime.put_json(&keys::sandbox(&id), &sb) {
                // Memory and record stay in step: no process without a record of it.
                if let Some(m) = g.sandboxes.get_mut(&id) {
                    std::sync::Arc::make_mut(m).process = None;
                }
                return Err(e.into());
            }
            (id, sb.auto_remove.then_some(p))
        };
        if let Some(p) = watch {
            self.remove_when_exited(id.clone(), p);
        }
        self.get(&id)
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

    /// From the latest snapshot: never waits for the lock.
    pub fn list(&self) -> Vec<SandboxView> {
        let snap = self.snapshot();
        let mut v: Vec<SandboxView> = snap.sandboxes.values().map(|s| snap.view(s)).collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.created_unix));
        v
    }

    pub fn get(&self, key: &str) -> Result<SandboxView> {
        let snap = self.snapshot();
        let sb = snap.find(key)?;
        Ok(snap.view(sb))
    }

    /// A `run -d` command's waiter writes its exit code once it has reaped
    /// it, a moment after the pidfd reports the exit: waits (2 s at most)
    /// for that, so the file is not written after `rm` deleted it.
    fn wait_for_exit_file(&self, id: &str) {
        let logs = self.config().logs_dir();
        if !logs.join(format!("{id}.log")).exists() {
            return;
        }
        let exit = logs.join(format!("{id}.exit"));
        let deadline = Instant::now() + Duration::from_secs(2);
        while !exit.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM, then SIGKILL after `timeout`. The sandbox stays until `rm`.
    pub fn stop(&self, key: &str, timeout: Duration) -> Result<SandboxView> {
        let p = self.snapshot().find(key)?.process;
        if let Some(p) = p {
            if let Some(fd) = process::pidfd(&p)? {
                process::signal_group(&p, &fd, libc::SIGTERM)?;
                if !process::wait_exit(&fd, timeout.as_millis() as i32) {
                    process::signal_group(&p, &fd, libc::SIGKILL)?;
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
                process::signal_group(&p, &fd, libc::SIGKILL)?;
                if process::wait_exit(&fd, 5000) {
                    self.wait_for_exit_file(&id);
                }
            }
        }
        let mut g = self.lock();
        let Some(sb) = g.sandboxes.get(&id).cloned() else {
            return Err(AgentError::NotFound(format!(
                "sandbox {name} was removed meanwhile"
            )));
        };
        let started = Instant::now();
        // A runtime's namespace (CNI) is not weft's: its veths go one by one.
        let links = match sb.external {
            Some(_) => Links::Delete,
            None => Links::WithNamespace,
        };
        attach::remove(&mut g, &sb, links)?;
        let network_teardown_us = started.elapsed().as_micros() as u64;
        let _ = std::fs::remove_file(g.cfg.logs_dir().join(format!("{id}.log")));
        let _ = std::fs::remove_file(g.cfg.logs_dir().join(format!("{id}.exit")));
        drop(g);
        self.reap_later(
            sb.attachment
                .endpoints()
                .iter()
                .filter_map(|e| e.host_ifname().map(String::from))
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

    /// From the latest snapshot, and what the drivers programmed as the
    /// kernel has it now (read on a socket of its own: no lock).
    pub fn status(&self) -> weft_model::api::StatusView {
        let snap = self.snapshot();
        let mut missing = Vec::new();
        match weft_kernel::Netlink::open() {
            Ok(mut nl) => {
                for net in snap.networks.values() {
                    let exposed = snap.exposed.get(&net.name).copied();
                    let mine = crate::expose::programmed(&mut nl, net, exposed);
                    for p in crate::driver::for_network(net)
                        .programmed(&mut nl, net)
                        .into_iter()
                        .chain(mine)
                    {
                        if !p.present {
                            missing.push((net.name.clone(), p));
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "status: cannot read the kernel"),
        }
        let on = |net: &str| {
            snap.sandboxes
                .values()
                .filter(|s| s.attachment.endpoints().iter().any(|e| e.network == net))
                .count()
        };
        let problems = missing
            .iter()
            .map(|(net, p)| {
                format!(
                    "network {net}: {} {} is missing from the kernel (check: {}); restart the agent to make it again",
                    p.what, p.name, p.check
                )
            })
            .collect::<Vec<_>>();
        weft_model::api::StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            networks: snap.networks.len(),
            sandboxes: snap.sandboxes.len(),
            healthy: problems.is_empty(),
            problems,
            sandboxes_running: snap
                .sandboxes
                .values()
                .filter(|s| state_of(s) == State::Running)
                .count(),
            network_list: snap
                .networks
                .values()
                .map(|n| weft_model::api::NetworkSummary {
                    name: n.name.clone(),
                    driver: n.driver().to_string(),
                    subnet: n.subnet,
                    sandboxes: on(&n.name),
                })
                .collect(),
            state_dir: self.config().state_dir.display().to_string(),
            data_dir: self.config().data_dir.display().to_string(),
            started_unix: self.started_unix,
            netns_pool: self.pool.fill(),
            missing,
            exposed: snap
                .exposed
                .iter()
                .filter_map(|(name, ip)| {
                    let n = snap.networks.get(name)?;
                    Some(weft_model::api::ExposedView {
                        network: name.clone(),
                        ip: *ip,
                        prefix_len: n.subnet.prefix_len(),
                        default: false,
                        kind: if n.overlay().is_some_and(|o| o.is_shared()) {
                            "shared"
                        } else {
                            "per-host"
                        }
                        .into(),
                    })
                })
                .collect(),
            cluster: None,
            docker: None,
        }
    }

    /// Stops the namespace pool and removes its entries (graceful shutdown).
    pub fn shutdown(&self) {
        self.lock().pool.drain();
    }
}
