//! Startup: load desired state from the stores, make the kernel match it,
//! and remove what weft owns (by name) but no longer wants. Safe to run
//! against any kernel state: a fresh host, a host whose agent was killed, or
//! one whose sandboxes vanished.

use crate::attach::{self, Links};
use crate::config::AgentConfig;
use crate::driver::{self, Found, Target};
use crate::error::{AgentError, Result};
use crate::firewall::Firewall;
use crate::host::{Host, Inner, NetworkState};
use crate::ids::random_id;
use crate::netns_pool::NetnsPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tracing::{info, warn};
use weft_kernel::{netns, sysctl, Link, Netlink, Netns};
use weft_model::network::{
    BridgeSettings, DriverSettings, BRIDGE_PREFIX, DEFAULT_BRIDGE, DEFAULT_NETWORK, SHIM_PREFIX,
};
use weft_model::sandbox::HOST_VETH_PREFIX;
use weft_model::{keys, subnet, Attachment, Network, Sandbox};
use weft_store::{DiskStore, RuntimeStore, Store, StoreJson};

fn private_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(AgentError::io(format!("create {}", p.display())))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .map_err(AgentError::io(format!("chmod {}", p.display())))
}

/// The default `bridge` network: kept if stored, else created on a subnet
/// that overlaps no route of this host.
fn default_network(
    stored: Option<Network>,
    wanted: Option<ipnet::Ipv4Net>,
    in_use: bool,
    nl: &mut Netlink,
) -> Result<(Network, bool)> {
    if let Some(net) = stored {
        match wanted {
            Some(w) if w.trunc() != net.subnet => {
                if in_use {
                    return Err(AgentError::BadRequest(format!(
                        "--bridge-subnet {w}: the default network already uses {} and has sandboxes; \
                         remove them (weft rm -f) or start the agent without --bridge-subnet",
                        net.subnet
                    )));
                }
                // Nothing attached: move the network to the new subnet.
                if let Some(b) = net.bridge() {
                    nl.delete_link(b)?;
                }
            }
            _ => return Ok((net, false)),
        }
    }
    let subnet = match wanted {
        Some(w) => w.trunc(),
        None => {
            let routes = nl.route_destinations()?;
            subnet::pick_free(subnet::default_bridge_pool(), &routes).ok_or_else(|| {
                AgentError::BadRequest(
                    "every subnet of the default pool overlaps a route of this host; give one with --bridge-subnet".into(),
                )
            })?
        }
    };
    if subnet.prefix_len() > 30 {
        return Err(AgentError::BadRequest(format!(
            "--bridge-subnet {subnet} is too small; use a prefix of /30 or shorter, e.g. /16"
        )));
    }
    let net = Network {
        name: DEFAULT_NETWORK.into(),
        id: random_id(),
        settings: DriverSettings::Bridge(BridgeSettings {
            bridge: DEFAULT_BRIDGE.into(),
        }),
        subnet,
        gateway: subnet::first_host(&subnet),
        ip_range: None,
        mtu: None,
        internal: false,
        labels: Default::default(),
        options: Default::default(),
        subranges: Vec::new(),
    };
    Ok((net, true))
}

/// Opens the stores, makes the kernel match them, and starts the host:
/// watches for auto-removed sandboxes, the namespace pool's refill.
pub fn start(cfg: AgentConfig) -> Result<Host> {
    let began = std::time::Instant::now();
    let inner = load(cfg)?;
    inner
        .metrics
        .reconcile
        .with(&["startup"])
        .observe_duration(began.elapsed());
    let (watch, orphans) = auto_remove_watches(&inner);
    // Only now: garbage collection must not see the pool's fresh entries.
    inner.pool.start();
    let host = Host::new(inner);
    for (id, p) in watch {
        host.remove_when_exited(id, p);
    }
    // A `weft run` killed before it started its process left these.
    for id in orphans {
        let _ = host.remove(&id, true);
    }
    Ok(host)
}

fn load(cfg: AgentConfig) -> Result<Inner> {
    private_dir(&cfg.state_dir)?;
    private_dir(&cfg.data_dir)?;
    private_dir(&cfg.logs_dir())?;
    std::fs::create_dir_all(cfg.resolv_dir()).map_err(AgentError::io(format!(
        "create {}",
        cfg.resolv_dir().display()
    )))?;
    // The stores first: the network database is locked by its agent, and
    // a data dir in use must fail the start before anything is mounted.
    let networks_db = DiskStore::open(&cfg.network_db())?;
    let runtime = RuntimeStore::open(&cfg.runtime_store_dir())?;
    netns::prepare_dir(&cfg.netns_dir())?;
    let mut nl = Netlink::open()?;
    sysctl::set("net.ipv4.ip_forward", "1")?;

    let sandboxes: Vec<Sandbox> = runtime.list_json(keys::SANDBOXES)?;
    let stored_default = networks_db.get_json::<Network>(&keys::network(DEFAULT_NETWORK))?;
    let default_in_use = sandboxes.iter().any(|s| {
        s.attachment
            .endpoints()
            .iter()
            .any(|e| e.network == DEFAULT_NETWORK)
    });
    let (default, changed) =
        default_network(stored_default, cfg.bridge_subnet, default_in_use, &mut nl)?;
    if changed {
        networks_db.put_json(&keys::network(DEFAULT_NETWORK), &default)?;
        info!(subnet = %default.subnet, bridge = ?default.bridge(), "default network ready");
    }

    let mut networks = BTreeMap::new();
    for mut net in networks_db.list_json::<Network>(keys::NETWORKS)? {
        let mut driver = driver::for_network(&net);
        if let Err(e) = driver.setup(&mut nl, &mut net) {
            // A macvlan parent can vanish with hardware: keep the rest
            // working; the driver refuses attaches until it is back.
            if net.macvlan().is_none() {
                return Err(e);
            }
            warn!(network = %net.name, error = %e, "macvlan network unusable until its parent is back");
        }
        let pool = crate::networks::pool_for(&net)?;
        networks.insert(net.name.clone(), NetworkState::new(net, pool, driver));
    }

    let pool = NetnsPool::new(cfg.netns_dir(), cfg.netns_pool);
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    let dns = std::sync::Arc::new(crate::dns::Resolver::new(
        cfg.resolv_conf.clone(),
        std::sync::Arc::clone(&metrics),
    ));
    // Before the table: apply_firewall fills the redirect's map too.
    let firewall = Firewall::start(&cfg.state_dir);
    let mut inner = Inner {
        pool,
        dns,
        firewall,
        cfg,
        networks_db,
        runtime,
        nl,
        networks,
        sandboxes: BTreeMap::new(),
        names: HashMap::new(),
        left_cluster: false,
        metrics,
    };
    let links: HashMap<String, Link> = inner
        .nl
        .links()?
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    for sb in sandboxes {
        adopt(&mut inner, sb, &links);
    }
    // After the sandboxes: an exposed address is never one of theirs.
    inner.adopt_exposures()?;
    collect_garbage(&mut inner)?;
    for sb in inner.sandboxes.values() {
        inner.dns.add(sb);
    }
    for n in inner.networks.values().filter(|n| n.net.has_resolver()) {
        if let Err(e) = inner.dns.serve(&n.net.name, n.net.gateway) {
            warn!(error = %e, "names on this network will not resolve");
        }
    }
    // After adoption: the table holds every network and published port.
    inner.apply_firewall()?;
    info!(
        sandboxes = inner.sandboxes.len(),
        networks = inner.networks.len(),
        "reconciled"
    );
    Ok(inner)
}

/// Takes a stored sandbox back, or clears it away if its namespace is gone.
fn adopt(inner: &mut Inner, sb: Sandbox, links: &HashMap<String, Link>) {
    let key = keys::sandbox(&sb.id);
    let ns_gone = sb
        .netns
        .as_deref()
        .is_some_and(|p| !netns::is_netns(Path::new(p)));
    if ns_gone {
        warn!(sandbox = %sb.name, "namespace is gone; removing what is left of the sandbox");
        let _ = attach::teardown(
            inner,
            &sb.attachment,
            // A runtime's namespace is never weft's to unmount.
            sb.netns.as_deref().filter(|_| sb.external.is_none()),
            Links::Delete,
        );
        let _ = inner.runtime.delete(&key);
        return;
    }
    for ep in sb.attachment.endpoints() {
        let Some(net) = inner.networks.get_mut(&ep.network) else {
            warn!(sandbox = %sb.name, network = %ep.network, "endpoint on an unknown network");
            continue;
        };
        if let Err(e) = net.pool.restore(ep.ip) {
            warn!(sandbox = %sb.name, error = %e, "address conflict on adoption");
        }
    }
    if let Err(e) = repair_endpoints(inner, &sb, links) {
        warn!(sandbox = %sb.name, error = %e, "could not restore endpoints");
    }
    inner.names.insert(sb.name.clone(), sb.id.clone());
    inner.sandboxes.insert(sb.id.clone(), Arc::new(sb));
}

/// Puts endpoints back as they should be (each driver checks its own), and
/// recreates those deleted behind weft's back.
fn repair_endpoints(inner: &mut Inner, sb: &Sandbox, links: &HashMap<String, Link>) -> Result<()> {
    let (Some(path), Attachment::Networks { endpoints }) = (&sb.netns, &sb.attachment) else {
        return Ok(());
    };
    let mut missing = Vec::new();
    for ep in endpoints {
        let Some(n) = inner.networks.get(&ep.network) else {
            continue;
        };
        if n.driver.repair(&mut inner.nl, &n.net, ep, links)? == Found::Missing {
            missing.push(ep);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let ns = Netns::open(Path::new(path))?;
    let mut ns_nl = ns.netlink()?;
    let route_on = weft_model::network::default_route_network(
        endpoints
            .iter()
            .filter_map(|e| inner.networks.get(&e.network))
            .map(|n| &n.net),
    )
    .map(String::from);
    for ep in missing {
        let Some(n) = inner.networks.get(&ep.network) else {
            continue;
        };
        // A half-left sandbox end would block the new pair.
        ns_nl.delete_link(&ep.ifname)?;
        n.driver.attach(
            &mut inner.nl,
            &n.net,
            ep,
            Target::Namespace {
                ns: &ns,
                nl: &mut ns_nl,
                prepared: None,
                default_route: route_on.as_deref() == Some(ep.network.as_str()),
            },
        )?;
        info!(sandbox = %sb.name, ifname = %ep.ifname, "endpoint restored");
    }
    Ok(())
}

/// Removes weft-owned kernel objects and files that no sandbox claims.
fn collect_garbage(inner: &mut Inner) -> Result<()> {
    // Host ends of endpoints, and what each network's driver owns (bridges,
    // host-access interfaces, VXLAN devices that keep traffic flowing
    // through an agent restart).
    let mut owned_by_networks: Vec<String> = inner
        .networks
        .values()
        .flat_map(|n| n.driver.owned_links(&n.net))
        .collect();
    owned_by_networks.extend(inner.exposure_links());
    let wanted: HashSet<&str> = inner
        .sandboxes
        .values()
        .flat_map(|s| s.attachment.endpoints())
        .filter_map(|e| e.host_ifname())
        .chain(owned_by_networks.iter().map(String::as_str))
        .collect();
    let owned = |name: &str| {
        name.starts_with(HOST_VETH_PREFIX)
            || name.starts_with(BRIDGE_PREFIX)
            || name.starts_with(SHIM_PREFIX)
            || name.starts_with(weft_model::overlay::VXLAN_PREFIX)
            || name.starts_with(weft_model::overlay::EXPOSE_PREFIX)
    };
    let stale: Vec<String> = inner
        .nl
        .links()?
        .into_iter()
        .filter(|l| owned(&l.name) && !wanted.contains(l.name.as_str()))
        .map(|l| l.name)
        .collect();
    for name in stale {
        info!(link = %name, "removing a stale link of weft's");
        inner.nl.delete_link(&name)?;
    }
    let claimed: HashSet<String> = inner
        .sandboxes
        .values()
        .filter_map(|s| s.netns.clone())
        .collect();
    if let Ok(dir) = std::fs::read_dir(inner.cfg.netns_dir()) {
        for entry in dir.flatten() {
            let p = entry.path();
            if !claimed.contains(&p.display().to_string()) {
                info!(path = %p.display(), "removing stale namespace");
                Netns::remove(&p)?;
            }
        }
    }
    let ids: HashSet<&String> = inner.sandboxes.keys().collect();
    // ID.log, ID.exit, ID.conf: the sandbox's id is the name up to the dot.
    for dir in [inner.cfg.logs_dir(), inner.cfg.resolv_dir()] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let name = file.split('.').next().unwrap_or_default().to_string();
            if !ids.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// Auto-removed sandboxes after a restart: those with a process to watch,
/// and those whose process never started.
pub(crate) fn auto_remove_watches(
    inner: &Inner,
) -> (Vec<(String, weft_model::ProcessRef)>, Vec<String>) {
    let mut watch = Vec::new();
    let mut orphans = Vec::new();
    for s in inner.sandboxes.values().filter(|s| s.auto_remove) {
        match s.process {
            Some(p) => watch.push((s.id.clone(), p)),
            None => orphans.push(s.id.clone()),
        }
    }
    (watch, orphans)
}
