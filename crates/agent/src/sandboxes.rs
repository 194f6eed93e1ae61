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
use weft_model::api::{CreateSandbox, Removed, SandboxView, State};
use weft_model::sandbox::EndpointKind;
use weft_model::sandbox::{host_veth_name, parse_net_modes};
use weft_model::Driver;
use weft_model::{
    keys, names, ports, Attachment, Endpoint, NetMode, NetRequest, PortMapping, ProcessRef,
    Published, Sandbox,
};
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

pub(crate) fn state_of(sb: &Sandbox) -> State {
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
        let shim = networks.get(&ep.network).and_then(|n| n.shim_index);
        // A macvlan endpoint's host route goes in any case; its interface goes
        // with the namespace.
        if links == Links::Delete || netns.is_none() || ep.kind == EndpointKind::Macvlan {
            if let Err(e) = bridge::detach(nl, ep, shim) {
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
    /// The resolv.conf weft wrote for a sandbox with a namespace of its own
    /// (`create_sandbox` writes one for exactly those); `--net container:`
    /// uses its target's, `--net host` and CNI attachments none.
    fn resolv_path(&self, sb: &Sandbox) -> Option<String> {
        let owner = match &sb.attachment {
            Attachment::Container { id, .. } => self.sandboxes.get(id)?,
            _ => sb,
        };
        (owner.attachment.owns_netns() && owner.external.is_none()).then(|| {
            self.cfg
                .resolv_dir()
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
            ports: sb.ports.clone(),
            resolv_conf: self.resolv_path(sb),
            process: sb.process,
        }
    }

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
        let mut mappings = Vec::with_capacity(req.ports.len());
        for p in &req.ports {
            mappings.push(p.parse::<PortMapping>().map_err(|e| bad(e.to_string()))?);
        }
        ports::check_own(&mappings).map_err(|e| bad(e.to_string()))?;
        if !mappings.is_empty() && !matches!(modes[0], NetMode::Network(_)) {
            return Err(bad(format!(
                "-p publishes ports of a network; --net {} has none",
                modes[0]
            )));
        }
        self.check_ports_free(&mappings)?;
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
                    let Some(state) = self.networks.get(&r.network) else {
                        return Err(AgentError::NotFound(format!(
                            "no network named {:?}: `weft network ls` lists the networks; --net also takes host, none and container:NAME",
                            r.network
                        )));
                    };
                    if let Some(ip) = r.ip {
                        state
                            .pool
                            .check_free(ip)
                            .map_err(|e| bad(format!("--net {}: {e}", r.network)))?;
                    }
                    requests.push(r.clone());
                }
                let first = &self.networks[&requests[0].network].net;
                if !mappings.is_empty() && first.driver == Driver::Macvlan {
                    return Err(bad(format!(
                        "-p: network {} is a macvlan network: its sandboxes are on the LAN with their own addresses; reach them there",
                        first.name
                    )));
                }
                if !mappings.is_empty() && first.internal {
                    return Err(bad(format!(
                        "-p: network {} is internal, so nothing outside may reach it",
                        first.name
                    )));
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
        Ok((name, plan, mappings))
    }

    /// Refuses host ports that another sandbox already publishes, naming it.
    pub(crate) fn check_ports_free(&self, mappings: &[PortMapping]) -> Result<()> {
        for m in mappings {
            for sb in self.sandboxes.values() {
                if let Some(p) = sb.ports.iter().find(|p| p.mapping.conflicts_with(m)) {
                    return Err(AgentError::Conflict(format!(
                        "-p {m}: host port {} is already published by sandbox {} (-p {}); pick another host port or remove {}",
                        m.host, sb.name, p.mapping, sb.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Creates the sandbox's namespace and endpoints; rolls back on error.
    fn build(&mut self, id: &str, plan: &Plan) -> Result<(Attachment, Option<String>)> {
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
            Plan::Networks {
                requests,
                default_route,
            } => {
                let t = Instant::now();
                let macvlan_first =
                    self.networks[&requests[0].network].net.driver == Driver::Macvlan;
                // A ready namespace comes with a veth pair for eth0; a sandbox whose
                // eth0 is a macvlan gets a bare namespace instead.
                let (ns, mut ns_nl, parked) = if macvlan_first {
                    let (ns, ns_nl) = Netns::create(&path, crate::netns_pool::SANDBOX_SYSCTLS)?;
                    (ns, ns_nl, None)
                } else {
                    let p = match self.pool.take() {
                        Some(p) => p,
                        None => Prepared::make(self.pool.dir(), &mut self.nl)?,
                    };
                    (
                        p.ns,
                        p.ns_nl,
                        Some((p.host_ifname, p.host_index, p.peer_index)),
                    )
                };
                debug!(prepare_us = t.elapsed().as_micros(), "namespace ready");
                let path = ns.path().display().to_string();
                let mut endpoints = Vec::with_capacity(requests.len());
                let made = (|| {
                    for (i, r) in requests.iter().enumerate() {
                        let state = self.networks.get_mut(&r.network).expect("validated");
                        let addr = state
                            .pool
                            .allocate(r.ip)
                            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
                        let ep = Endpoint {
                            network: r.network.clone(),
                            ifname: format!("eth{i}"),
                            host_ifname: host_veth_name(id, i),
                            ip: addr,
                            prefix_len: state.net.subnet.prefix_len(),
                            gateway: state.net.gateway,
                            aliases: r.aliases.clone(),
                            kind: EndpointKind::of(state.net.driver),
                            mac: None,
                        };
                        let (bridge_index, shim, mtu) =
                            (state.bridge_index, state.shim_index, state.net.mtu);
                        let route = default_route.as_deref() == Some(r.network.as_str());
                        endpoints.push(ep.clone());
                        let attached = match (&parked, ep.kind) {
                            (Some((_, host_index, peer_index)), EndpointKind::Veth) if i == 0 => {
                                bridge::attach_prepared(
                                    &mut self.nl,
                                    (*host_index, *peer_index, &mut ns_nl),
                                    bridge_index,
                                    &ep,
                                    mtu,
                                    route,
                                )
                            }
                            (_, EndpointKind::Veth) => bridge::attach(
                                &mut self.nl,
                                &ns,
                                &mut ns_nl,
                                bridge_index,
                                &ep,
                                mtu,
                                route,
                            )
                            .map(|_| ()),
                            (_, EndpointKind::Macvlan) => bridge::attach_macvlan(
                                &mut self.nl,
                                &ns,
                                &mut ns_nl,
                                bridge_index,
                                shim,
                                &ep,
                                mtu,
                                route,
                            ),
                        };
                        attached.map_err(|e| bridge_full_hint(e, &r.network))?;
                    }
                    Ok(())
                })();
                let attachment = Attachment::Networks { endpoints };
                if let Err(e) = made {
                    // The host end may still carry its parked name.
                    if let Some((name, _, _)) = &parked {
                        let _ = self.nl.delete_link(name);
                    }
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
        let (name, plan, mappings) = g.validate(&req)?;
        let dns = (
            req.dns.clone(),
            req.dns_search.clone(),
            req.dns_options.clone(),
        );
        let id = random_id();
        let name = if name.is_empty() {
            id[..12].to_string()
        } else {
            name
        };
        let started = Instant::now();
        let (attachment, netns) = g.build(&id, &plan)?;
        // Ports lead to the address on the first network.
        let ports: Vec<Published> = match attachment.endpoints().first() {
            Some(ep) => mappings
                .iter()
                .map(|m| Published {
                    mapping: *m,
                    network: ep.network.clone(),
                    target: ep.ip,
                })
                .collect(),
            None => Vec::new(),
        };
        let published = crate::firewall::add_ports(&ports);
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
            ports,
            external: None,
        };
        let resolv_file = g.cfg.resolv_dir().join(format!("{id}.conf"));
        let recorded = published
            .and_then(|_| {
                if sb.attachment.owns_netns() {
                    let host = g.dns.upstream().conf();
                    let embedded = sb
                        .attachment
                        .endpoints()
                        .iter()
                        .find(|e| {
                            g.networks
                                .get(&e.network)
                                .is_some_and(|n| n.net.has_resolver())
                        })
                        .map(|e| e.gateway);
                    let rc = crate::dns::resolv_for(&host, embedded, &dns.0, &dns.1, &dns.2);
                    std::fs::write(&resolv_file, weft_dns::render_resolv_conf(&rc)).map_err(
                        |e| AgentError::Internal(format!("write {}: {e}", resolv_file.display())),
                    )?;
                }
                Ok(())
            })
            .and_then(|_| Ok(g.runtime.create_json(&keys::sandbox(&id), &sb)?));
        if let Err(e) = recorded {
            let inner = &mut *g;
            let _ = crate::firewall::delete_ports(&sb.ports);
            let _ = std::fs::remove_file(&resolv_file);
            let _ = teardown_network(
                &mut inner.nl,
                &mut inner.networks,
                &sb.attachment,
                sb.netns.as_deref(),
                Links::Delete,
            );
            return Err(e);
        }
        info!(sandbox = %name, id = &id[..12], net = %sb.attachment.describe(), setup_us = network_setup_us, "created");
        g.dns.add(&sb);
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
        if let Err(e) = crate::firewall::delete_ports(&sb.ports) {
            // Rewrite the whole table from what is left instead.
            warn!(sandbox = %sb.name, error = %e, "deleting published ports failed; rewriting the table");
            crate::firewall::apply_all(inner)?;
        }
        // A runtime's namespace (CNI) is not weft's: its veths go one by one.
        let (netns, links) = match sb.external {
            Some(_) => (None, Links::Delete),
            None => (sb.netns.as_deref(), Links::WithNamespace),
        };
        let torn = teardown_network(
            &mut inner.nl,
            &mut inner.networks,
            &sb.attachment,
            netns,
            links,
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
        let _ = std::fs::remove_file(inner.cfg.resolv_dir().join(format!("{id}.conf")));
        inner.dns.remove(&id);
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

    pub fn status(&self) -> weft_model::api::StatusView {
        let (networks, sandboxes) = {
            let g = self.lock();
            (g.networks.len(), g.sandboxes.len())
        };
        weft_model::api::StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            networks,
            sandboxes,
            cluster: self.cluster.get().map(|c| c.status()),
        }
    }

    /// Stops the namespace pool and removes its entries (graceful shutdown).
    pub fn shutdown(&self) {
        self.lock().pool.drain();
    }
}
