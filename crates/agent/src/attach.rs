//! The one attach path. `weft run`, `network connect`, CNI ADD and Docker's
//! CreateEndpoint all come here: validate → allocate → driver attach →
//! ports → record → register (names, DNS). Every step that changed
//! something pushes its undo onto a drop guard; any error (or panic) before
//! the end runs them in reverse, like the CNI bridge plugin's deferred undo.
//!
//! The detach path (`teardown`) is here too: it undoes an attachment,
//! tolerating parts already gone, and reports every failure.

use crate::driver::{self, Target};
use crate::error::{AgentError, Result, Wrap};
use crate::host::Inner;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::warn;
use weft_kernel::{Netlink, Netns};
use weft_model::sandbox::Runtime;
use weft_model::{
    keys, Attachment, Endpoint, HostPorts, PortMapping, PortRequest, Published, Sandbox,
};
use weft_store::{Store, StoreJson};

/// One endpoint to make.
#[derive(Debug, Clone)]
pub(crate) struct EndpointRequest {
    pub network: String,
    pub ip: Option<Ipv4Addr>,
    pub aliases: Vec<String>,
    /// The interface inside (eth0, CNI's ifname, Docker's container end).
    pub ifname: String,
    /// The host end's name, if the driver makes one.
    pub host_ifname: String,
    pub mac: Option<String>,
    /// The address is held for this endpoint already (by Docker's IPAM).
    pub reserved: bool,
    /// An isolated sub-range of the network (declared on it already).
    pub subrange: Option<ipnet::Ipv4Net>,
}

/// Where the endpoints are plugged in.
pub(crate) enum Namespace {
    /// A new namespace of weft's own (`weft run`): from the pool, with the
    /// first veth pair ready, or made now.
    New,
    /// A namespace that exists (a sandbox's, for connect; a runtime's, for CNI).
    Existing(PathBuf),
    /// None yet: Docker plugs the endpoint at Join (`plug_for_runtime`).
    Later,
}

/// Which endpoint carries the sandbox's default route.
pub(crate) enum DefaultRoute {
    /// The one on this network (or none).
    On(Option<String>),
    /// Docker's choice over all the sandbox's endpoints, set after attaching
    /// (a connect may move it).
    Recompute,
}

/// What `weft run` wants in the sandbox's resolv.conf.
pub(crate) struct Resolv {
    pub servers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

pub(crate) struct Attach {
    /// The record as it will be, without the new endpoints (they are
    /// appended to its `Attachment::Networks`) and, for `Namespace::New`,
    /// without its namespace.
    pub sandbox: Sandbox,
    pub endpoints: Vec<EndpointRequest>,
    pub namespace: Namespace,
    pub default_route: DefaultRoute,
    /// Published to the address of the sandbox's first endpoint.
    pub ports: Vec<PortMapping>,
    pub resolv: Option<Resolv>,
    /// The sandbox exists already (connect): its record is replaced.
    pub replace: bool,
    /// When the request began: the record gets the network setup time.
    pub started: Option<std::time::Instant>,
}

/// One undo of a step that was done.
enum Undo {
    Release {
        network: String,
        ip: Ipv4Addr,
    },
    Detach {
        ep: Endpoint,
        inside: Option<PathBuf>,
    },
    DeleteLink(String),
    RemoveNetns(PathBuf),
    DeletePorts(Vec<Published>),
    RemoveFile(PathBuf),
    DeleteRecord(String),
    PutRecord(Box<Sandbox>),
    Unguard(Vec<(String, Ipv4Addr)>),
}

/// The rollback guard: runs the undos in reverse unless `commit`ted.
pub(crate) struct Rollback<'a> {
    inner: &'a mut Inner,
    undo: Vec<Undo>,
    what: String,
}

impl<'a> Rollback<'a> {
    fn new(inner: &'a mut Inner, what: String) -> Self {
        Rollback {
            inner,
            undo: Vec::new(),
            what,
        }
    }

    fn commit(mut self) {
        self.undo.clear();
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        let inner = &mut *self.inner;
        while let Some(step) = self.undo.pop() {
            let r: Result<()> = match step {
                Undo::Release { network, ip } => {
                    if let Some(n) = inner.networks.get_mut(&network) {
                        n.release(ip);
                    }
                    Ok(())
                }
                Undo::Detach { ep, inside } => detach_one(inner, &ep, inside.as_deref()),
                Undo::DeleteLink(name) => {
                    inner.nl.delete_link(&name).map(|_| ()).map_err(Into::into)
                }
                Undo::RemoveNetns(p) => Netns::remove(&p).map(|_| ()).map_err(Into::into),
                Undo::DeletePorts(p) => inner.firewall.delete_ports(&p),
                Undo::RemoveFile(p) => match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(AgentError::io(format!("remove {}", p.display()))(e))
                    }
                    _ => Ok(()),
                },
                Undo::DeleteRecord(key) => {
                    inner.runtime.delete(&key).map(|_| ()).map_err(Into::into)
                }
                Undo::PutRecord(sb) => inner
                    .runtime
                    .put_json(&keys::sandbox(&sb.id), &*sb)
                    .map_err(Into::into),
                Undo::Unguard(ports) => inner.unguard(&ports),
            };
            if let Err(e) = r {
                warn!(what = %self.what, error = %e, "rollback left something behind");
            }
        }
    }
}

/// Unplugs one endpoint through its network's driver; `inside` is the
/// namespace whose interface must go now.
fn detach_one(inner: &mut Inner, ep: &Endpoint, inside: Option<&Path>) -> Result<()> {
    let Some(n) = inner.networks.get(&ep.network) else {
        return Ok(());
    };
    let mut ns_nl = match inside.filter(|p| weft_kernel::netns::is_netns(p)) {
        Some(p) => Some(Netns::open(p)?.netlink()?),
        None => None,
    };
    n.driver.detach(&mut inner.nl, ep, ns_nl.as_mut())
}

/// The validation every attachment passes, before anything is made.
pub(crate) fn validate(inner: &Inner, a: &Attach) -> Result<()> {
    for r in &a.endpoints {
        let n = inner.network(&r.network)?;
        if inner.left_cluster && n.net.is_global() {
            return Err(AgentError::Conflict(format!(
                "--net {}: this host left the cluster (`weft leave`) and gave up its subnet {} of the network, \
                 which another host may lease now; restart `weft agent` to rejoin, then attach again",
                r.network, n.net.subnet
            )));
        }
        if let (Some(ip), false) = (r.ip, r.reserved) {
            n.pool.check_free(ip).map_err(|e| {
                // Taken: by whom, running or exited (its record keeps the address).
                let holder = inner.sandboxes.values().find(|s| {
                    s.attachment
                        .endpoints()
                        .iter()
                        .any(|ep| ep.network == r.network && ep.ip == ip)
                });
                match holder {
                    Some(s) => AgentError::Conflict(format!(
                        "--net {}: {ip} is taken by sandbox {} ({}); pick another address or remove it with `weft rm -f {}`",
                        r.network,
                        s.name,
                        crate::host::state_of(s),
                        s.name
                    )),
                    None => AgentError::BadRequest(format!("--net {}: {e}", r.network)),
                }
            })?;
        }
        if !r.reserved {
            // A shared network: before anything is made, whether this host
            // may hand the address out (the API claims more and retries).
            if let Some(s) = r.subrange {
                if !n.net.subranges.contains(&s) {
                    return Err(AgentError::BadRequest(format!(
                        "--net {}:subnet={s}: the sub-range is not declared on the network (it is, by `weft run` itself, first); try again",
                        r.network
                    )));
                }
            }
            match r.ip {
                Some(ip) => {
                    n.check_placement(ip, r.subrange)?;
                    n.check_share(ip)?
                }
                None if !n.has_room(r.subrange) => {
                    return Err(AgentError::NoRoom {
                        network: r.network.clone(),
                        within: r.subrange,
                    })
                }
                None => {}
            }
        }
        if let Some(mac) = &r.mac {
            driver::parse_mac(mac)?;
        }
    }
    if !a.ports.is_empty() {
        let first = a
            .sandbox
            .attachment
            .endpoints()
            .first()
            .map(|e| e.network.as_str())
            .or(a.endpoints.first().map(|r| r.network.as_str()));
        let Some(first) = first else {
            return Err(AgentError::BadRequest(
                "-p publishes ports of a network; this sandbox is on none".into(),
            ));
        };
        let n = inner.network(first)?;
        if let Some(why) = n.driver.refuses_ports(&n.net) {
            return Err(AgentError::BadRequest(format!("-p: {why}")));
        }
        check_ports_free(inner, &a.ports, &a.sandbox.id)?;
    }
    Ok(())
}

/// Turns `-p` requests into mappings: given host ports as they are (the
/// checks of `validate` name whoever has them), and for each host port left
/// to weft the first of its range that no sandbox publishes, no other
/// request of the same command takes, and a bind shows no host process has.
pub(crate) fn resolve_ports(
    inner: &Inner,
    requests: &[PortRequest],
    except: &str,
) -> Result<Vec<PortMapping>> {
    let bad = |e: weft_model::ports::PortError| AgentError::BadRequest(e.to_string());
    let mut chosen: Vec<PortMapping> = Vec::with_capacity(requests.len());
    let given = requests
        .iter()
        .filter(|r| matches!(r.host, HostPorts::Exactly(_)));
    for r in given {
        chosen.extend(r.candidates());
    }
    weft_model::ports::check_own(&chosen).map_err(bad)?;
    let published_elsewhere = |m: &PortMapping| {
        inner
            .sandboxes
            .values()
            .filter(|s| s.id != except)
            .any(|s| s.ports.iter().any(|p| p.mapping.conflicts_with(m)))
    };
    for r in requests {
        let HostPorts::AnyOf(range) = r.host else {
            continue;
        };
        let free = r.candidates().find(|m| {
            !chosen.iter().any(|o| o.conflicts_with(m))
                && !published_elsewhere(m)
                // Dropped at once: the firewall takes the port for good.
                && weft_kernel::port_hold::hold(m.protocol, m.host_ip, m.host.start).is_ok()
        });
        let Some(m) = free else {
            return Err(AgentError::Conflict(format!(
                "-p {}: every host port of {range} is published or in use already; give a host port (HOST_PORT:{})",
                describe(r),
                r.container
            )));
        };
        chosen.push(m);
    }
    Ok(chosen)
}

/// A request as `-p` spells it.
fn describe(r: &PortRequest) -> String {
    let ip = r.host_ip.map(|ip| format!("{ip}:")).unwrap_or_default();
    match r.host {
        HostPorts::Exactly(h) => format!("{ip}{h}:{}/{}", r.container, r.protocol),
        HostPorts::AnyOf(h) if h == weft_model::ports::EPHEMERAL => {
            format!(
                "{ip}{}{}/{}",
                if ip.is_empty() { "" } else { ":" },
                r.container,
                r.protocol
            )
        }
        HostPorts::AnyOf(h) => format!("{ip}{h}:{}/{}", r.container, r.protocol),
    }
}

/// Refuses host ports that another sandbox already publishes, naming it.
pub(crate) fn check_ports_free(
    inner: &Inner,
    mappings: &[PortMapping],
    except: &str,
) -> Result<()> {
    for m in mappings {
        for sb in inner.sandboxes.values().filter(|s| s.id != except) {
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

/// Attaches: see the module's comment. Returns the registered record.
/// Timed, by driver and result, for `/metrics`.
pub(crate) fn attach(inner: &mut Inner, a: Attach) -> Result<Arc<Sandbox>> {
    let began = std::time::Instant::now();
    let driver = driver_label(inner, a.endpoints.first().map(|e| e.network.as_str()));
    let r = attach_untimed(inner, a);
    inner
        .metrics
        .attach
        .with(&[&driver, crate::metrics::result_label(&r)])
        .observe_duration(began.elapsed());
    r
}

/// The network driver of an attach or detach, for its label: the first
/// endpoint's (a sandbox on no network has "none").
fn driver_label(inner: &Inner, network: Option<&str>) -> String {
    network
        .and_then(|n| inner.networks.get(n))
        .map(|n| n.net.driver().to_string())
        .unwrap_or_else(|| "none".into())
}

fn attach_untimed(inner: &mut Inner, a: Attach) -> Result<Arc<Sandbox>> {
    validate(inner, &a)?;
    let Attach {
        mut sandbox,
        endpoints,
        namespace,
        default_route,
        ports,
        resolv,
        replace,
        started,
    } = a;
    let old = replace.then(|| sandbox.clone());
    let mut rb = Rollback::new(inner, sandbox.name.clone());

    // The namespace, its netlink socket, and the veth pair a pooled one comes with.
    let mut pair: Option<(u32, u32)> = None;
    let (ns, mut ns_nl) = match &namespace {
        Namespace::Later => (None, None),
        Namespace::Existing(p) => {
            let ns = Netns::open(p).wrap(|| format!("open namespace {}", p.display()))?;
            let nl = ns.netlink()?;
            (Some(ns), Some(nl))
        }
        Namespace::New => {
            let veth_first = endpoints.first().is_some_and(|r| {
                rb.inner.networks[&r.network]
                    .driver
                    .endpoint_kind(String::new())
                    .is_veth()
            });
            let (ns, nl) = if veth_first {
                let p = match rb.inner.pool.take() {
                    Some(p) => p,
                    None => {
                        let dir = rb.inner.pool.dir().to_path_buf();
                        crate::netns_pool::Prepared::make(&dir, &mut rb.inner.nl)?
                    }
                };
                rb.undo.push(Undo::RemoveNetns(p.ns.path().to_path_buf()));
                // Until attached, the host end carries its parked name.
                rb.undo.push(Undo::DeleteLink(p.host_ifname.clone()));
                pair = Some((p.host_index, p.peer_index));
                (p.ns, p.ns_nl)
            } else {
                // A sandbox whose eth0 is a macvlan gets a bare namespace.
                let path = rb
                    .inner
                    .cfg
                    .netns_dir()
                    .join(&crate::ids::random_id()[..32]);
                let made = Netns::create(&path, crate::netns_pool::SANDBOX_SYSCTLS)?;
                rb.undo.push(Undo::RemoveNetns(path));
                made
            };
            sandbox.netns = Some(ns.path().display().to_string());
            (Some(ns), Some(nl))
        }
    };

    let route_on = match &default_route {
        DefaultRoute::On(n) => n.clone(),
        DefaultRoute::Recompute => None,
    };
    let mut made = Vec::with_capacity(endpoints.len());
    for r in endpoints {
        let state = rb.inner.networks.get_mut(&r.network).expect("validated");
        let ip = if r.reserved {
            r.ip.ok_or_else(|| {
                AgentError::Internal("a reserved address without an address".into())
            })?
        } else {
            let ip = state.allocate(r.ip, r.subrange)?;
            rb.undo.push(Undo::Release {
                network: r.network.clone(),
                ip,
            });
            ip
        };
        let ep = Endpoint {
            network: r.network.clone(),
            ifname: r.ifname.clone(),
            ip,
            prefix_len: r
                .subrange
                .map_or(state.net.subnet.prefix_len(), |s| s.prefix_len()),
            gateway: state.net.gateway,
            aliases: r.aliases.clone(),
            kind: state.driver.endpoint_kind(r.host_ifname.clone()),
            mac: r.mac.clone(),
        };
        if let (Some(ns), Some(nl)) = (&ns, ns_nl.as_mut()) {
            // The pooled pair serves the first veth endpoint only.
            let use_pair = if ep.kind.is_veth() { pair.take() } else { None };
            rb.undo.push(Undo::Detach {
                ep: ep.clone(),
                inside: Some(ns.path().to_path_buf()),
            });
            let inner = &mut *rb.inner;
            let state = &inner.networks[&r.network];
            state
                .driver
                .attach(
                    &mut inner.nl,
                    &state.net,
                    &ep,
                    Target::Namespace {
                        ns,
                        nl,
                        prepared: use_pair,
                        default_route: route_on.as_deref() == Some(r.network.as_str()),
                    },
                )
                .map_err(|e| bridge_full_hint(e, &r.network))?;
        }
        made.push(ep);
    }
    match &mut sandbox.attachment {
        Attachment::Networks { endpoints } => endpoints.extend(made),
        other if !made.is_empty() => {
            return Err(AgentError::BadRequest(format!(
                "sandbox {} uses --net {}; only sandboxes on networks can be connected to more",
                sandbox.name,
                other.describe()
            )))
        }
        _ => {}
    }
    if let (DefaultRoute::Recompute, Some(nl)) = (&default_route, ns_nl.as_mut()) {
        fix_default_route(rb.inner, &sandbox, nl)?;
    }

    if let Some(first) = sandbox.attachment.endpoints().first() {
        // A CNI runtime that publishes ports binds them itself (podman does).
        let held_by_runtime = sandbox
            .external
            .as_ref()
            .is_some_and(|e| e.runtime == Runtime::Cni);
        let published: Vec<Published> = ports
            .iter()
            .map(|m| Published {
                mapping: *m,
                network: first.network.clone(),
                target: first.ip,
                held_by_runtime,
            })
            .collect();
        rb.inner.firewall.add_ports(&published)?;
        rb.undo.push(Undo::DeletePorts(published.clone()));
        sandbox.ports.extend(published);
    }

    if let Some(t) = started {
        sandbox.network_setup_us = t.elapsed().as_micros() as u64;
    }

    if let Some(want) = resolv {
        let file = rb
            .inner
            .cfg
            .resolv_dir()
            .join(format!("{}.conf", sandbox.id));
        let upstream = rb.inner.dns.upstream().conf();
        let embedded = sandbox
            .attachment
            .endpoints()
            .iter()
            .find(|e| {
                rb.inner
                    .networks
                    .get(&e.network)
                    .is_some_and(|n| n.net.has_resolver())
            })
            .map(|e| e.gateway);
        let rc = crate::dns::resolv_for(
            &upstream,
            embedded,
            &want.servers,
            &want.search,
            &want.options,
        );
        std::fs::write(&file, weft_dns::render_resolv_conf(&rc))
            .map_err(AgentError::io(format!("write {}", file.display())))?;
        rb.undo.push(Undo::RemoveFile(file));
    }

    // Ports new to the firewall: a reattach keeps the old ones guarded.
    let had: Vec<&Endpoint> = old.iter().flat_map(|o| o.attachment.endpoints()).collect();
    let guard = rb.inner.guarded_ports(
        sandbox
            .attachment
            .endpoints()
            .iter()
            .filter(|e| !had.contains(e)),
    );
    let key = keys::sandbox(&sandbox.id);
    match old {
        Some(old) => {
            rb.inner.runtime.put_json(&key, &sandbox)?;
            rb.undo.push(Undo::PutRecord(Box::new(old)));
        }
        None => {
            rb.inner.runtime.create_json(&key, &sandbox)?;
            rb.undo.push(Undo::DeleteRecord(key));
        }
    }
    // A port of a network carved into sub-ranges is guarded (its one
    // source address, its sub-range) before the sandbox's process runs.
    if !guard.is_empty() {
        rb.inner.firewall.guard(&guard)?;
        rb.undo.push(Undo::Unguard(guard));
    }
    rb.commit();
    Ok(inner.register(sandbox))
}

/// Docker's Join: plugs an endpoint made by `attach` with `Namespace::Later`.
pub(crate) fn plug_for_runtime(inner: &mut Inner, ep: &Endpoint) -> Result<()> {
    let state = inner
        .networks
        .get(&ep.network)
        .ok_or_else(|| crate::host::not_found(&ep.network))?;
    let (driver, net) = (&state.driver, &state.net);
    let r = driver.attach(&mut inner.nl, net, ep, Target::HostForRuntime);
    if r.is_err() {
        let _ = driver.detach(&mut inner.nl, ep, None);
    }
    r
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

/// Sets the sandbox's default route to the network Docker would pick.
pub(crate) fn fix_default_route(inner: &Inner, sb: &Sandbox, ns_nl: &mut Netlink) -> Result<()> {
    let eps = sb.attachment.endpoints();
    let chosen = weft_model::network::default_route_network(
        eps.iter()
            .filter_map(|e| inner.networks.get(&e.network))
            .map(|n| &n.net),
    );
    match chosen.and_then(|c| eps.iter().find(|e| e.network == c)) {
        Some(ep) => {
            let link = ns_nl
                .link_by_name(&ep.ifname)?
                .ok_or_else(|| AgentError::Vanished {
                    what: ep.ifname.clone(),
                    place: format!("sandbox {}", sb.name),
                })?;
            let onlink =
                ipnet::Ipv4Net::new(ep.ip, ep.prefix_len).is_ok_and(|n| !n.contains(&ep.gateway));
            ns_nl.replace_default_route(ep.gateway, link.index, onlink)?;
        }
        None => ns_nl.delete_default_route()?,
    }
    Ok(())
}

/// How the veth pairs of a sandbox go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Links {
    /// Delete them now (rollback, repair, a runtime's namespace).
    Delete,
    /// Let the kernel delete them when it destroys the namespace: unpinning a
    /// namespace costs ~0.1 ms, deleting a veth ~13 ms of RCU waits, and the
    /// kernel destroys dying namespaces in batches. `Host::reap_later` deletes
    /// any that something else kept alive.
    WithNamespace,
}

/// Undoes the network side of a sandbox: endpoints (through their drivers),
/// addresses, and the namespace file if `netns` is weft's to remove.
/// Tolerates parts that are already gone; reports every failure.
pub(crate) fn teardown(
    inner: &mut Inner,
    attachment: &Attachment,
    netns: Option<&str>,
    links: Links,
) -> Result<()> {
    let mut errors = Vec::new();
    for ep in attachment.endpoints() {
        let Some(n) = inner.networks.get_mut(&ep.network) else {
            continue;
        };
        if links == Links::Delete || netns.is_none() || n.driver.detach_outlives_namespace() {
            if let Err(e) = n.driver.detach(&mut inner.nl, ep, None) {
                errors.push(e);
            }
        }
        n.release(ep.ip);
    }
    if let Some(path) = netns {
        if let Err(e) = Netns::remove(Path::new(path)) {
            errors.push(e.into());
        }
    }
    AgentError::all(errors)
}

/// Removes a sandbox's network side and record: published ports, endpoints
/// and addresses, the namespace file if it is weft's, resolv.conf, the
/// record, names and DNS. On a teardown failure the sandbox stays
/// registered, so that the next reconcile retries.
pub(crate) fn remove(inner: &mut Inner, sb: &Sandbox, links: Links) -> Result<()> {
    let began = std::time::Instant::now();
    let driver = driver_label(
        inner,
        sb.attachment
            .endpoints()
            .first()
            .map(|e| e.network.as_str()),
    );
    let r = remove_untimed(inner, sb, links);
    inner
        .metrics
        .detach
        .with(&[&driver, crate::metrics::result_label(&r)])
        .observe_duration(began.elapsed());
    r
}

fn remove_untimed(inner: &mut Inner, sb: &Sandbox, links: Links) -> Result<()> {
    if let Err(e) = inner.firewall.delete_ports(&sb.ports) {
        // Rewrite the whole table from what is left instead.
        warn!(sandbox = %sb.name, error = %e, "deleting published ports failed; rewriting the table");
        let kept = inner.sandboxes.remove(&sb.id);
        let rewritten = inner.apply_firewall();
        if let Some(k) = kept {
            inner.sandboxes.insert(sb.id.clone(), k);
        }
        rewritten?;
    }
    // A runtime's namespace is never weft's to unmount.
    let netns = sb.netns.as_deref().filter(|_| sb.external.is_none());
    teardown(inner, &sb.attachment, netns, links)?;
    // A runtime's namespace outlives the attachment: interfaces a driver
    // left inside (macvlan) go now.
    if let Some(path) = sb
        .netns
        .as_deref()
        .filter(|_| sb.external.is_some())
        .map(Path::new)
        .filter(|p| weft_kernel::netns::is_netns(p))
    {
        let mut errors = Vec::new();
        for ep in sb
            .attachment
            .endpoints()
            .iter()
            .filter(|e| !e.kind.is_veth())
        {
            if let Err(e) = Netns::open(path)
                .and_then(|ns| ns.netlink())
                .and_then(|mut nl| nl.delete_link(&ep.ifname))
            {
                errors.push(e.into());
            }
        }
        AgentError::all(errors)?;
    }
    inner.runtime.delete(&keys::sandbox(&sb.id))?;
    let _ = std::fs::remove_file(inner.cfg.resolv_dir().join(format!("{}.conf", sb.id)));
    let guarded = inner.guarded_ports(sb.attachment.endpoints());
    inner.unregister(&sb.id);
    if let Err(e) = inner.unguard(&guarded) {
        warn!(sandbox = %sb.name, error = %e, "the firewall still guards the removed sandbox's ports until its next rewrite");
    }
    Ok(())
}
