//! Startup: load desired state from the stores, make the kernel match it,
//! and remove what weft owns (by name) but no longer wants. Safe to run
//! against any kernel state: a fresh host, a host whose agent was killed, or
//! one whose sandboxes vanished.

use crate::bridge;
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::firewall;
use crate::host::{Inner, NetworkState};
use crate::netns_pool::NetnsPool;
use crate::sandboxes::{random_id, teardown_network, Links};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tracing::{info, warn};
use weft_kernel::{netns, sysctl, Link, Netlink, Netns};
use weft_model::network::{BRIDGE_PREFIX, DEFAULT_BRIDGE, DEFAULT_NETWORK, SHIM_PREFIX};
use weft_model::sandbox::EndpointKind;
use weft_model::sandbox::HOST_VETH_PREFIX;
use weft_model::{keys, subnet, Attachment, Driver, Network, Sandbox};
use weft_store::{DiskStore, RuntimeStore, Store, StoreJson};

fn private_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p)
        .map_err(|e| AgentError::Internal(format!("create {}: {e}", p.display())))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| AgentError::Internal(format!("chmod {}: {e}", p.display())))
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
                nl.delete_link(&net.bridge)?;
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
        driver: Driver::Bridge,
        subnet,
        gateway: subnet::first_host(&subnet),
        bridge: DEFAULT_BRIDGE.into(),
        parent: None,
        parent_created: false,
        host_access: None,
        ip_range: None,
        mtu: None,
        internal: false,
        labels: Default::default(),
        options: Default::default(),
        overlay: None,
    };
    Ok((net, true))
}

pub(crate) fn start(cfg: AgentConfig) -> Result<Inner> {
    private_dir(&cfg.state_dir)?;
    private_dir(&cfg.data_dir)?;
    private_dir(&cfg.logs_dir())?;
    std::fs::create_dir_all(cfg.resolv_dir())
        .map_err(|e| AgentError::Internal(format!("create {}: {e}", cfg.resolv_dir().display())))?;
    netns::prepare_dir(&cfg.netns_dir())?;
    let networks_db = DiskStore::open(&cfg.network_db())?;
    let runtime = RuntimeStore::open(&cfg.runtime_store_dir())?;
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
        info!(subnet = %default.subnet, bridge = %default.bridge, "default network ready");
    }

    let mut networks = BTreeMap::new();
    for mut net in networks_db.list_json::<Network>(keys::NETWORKS)? {
        let (bridge_index, shim_index) = match bridge::ensure(&mut nl, &mut net) {
            Ok((i, shim, _)) => (i, shim),
            // A macvlan parent can vanish with hardware: keep the rest working.
            Err(e) if net.driver == Driver::Macvlan => {
                warn!(network = %net.name, error = %e, "macvlan network unusable until its parent is back");
                (0, None)
            }
            Err(e) => return Err(e),
        };
        let pool = crate::networks::pool_for(&net)?;
        networks.insert(
            net.name.clone(),
            NetworkState {
                net,
                pool,
                bridge_index,
                shim_index,
            },
        );
    }

    let pool = NetnsPool::new(cfg.netns_dir(), cfg.netns_pool);
    let dns = std::sync::Arc::new(crate::dns::Resolver::new(cfg.resolv_conf.clone()));
    let mut inner = Inner {
        pool,
        dns,
        cfg,
        networks_db,
        runtime,
        nl,
        networks,
        sandboxes: BTreeMap::new(),
        names: HashMap::new(),
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
    collect_garbage(&mut inner)?;
    for sb in inner.sandboxes.values() {
        inner.dns.add(sb);
    }
    for n in inner.networks.values().filter(|n| n.net.has_resolver()) {
        if let Err(e) = inner.dns.serve(&n.net.name, n.net.gateway) {
            warn!(error = %e, "names on this network will not resolve");
        }
    }
    // Before the table: apply_all fills the redirect's map too.
    firewall::start_redirect(&inner.cfg.state_dir);
    // After adoption: the table holds every network and published port.
    firewall::apply_all(&inner)?;
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
        let _ = teardown_network(
            &mut inner.nl,
            &mut inner.networks,
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
    inner.sandboxes.insert(sb.id.clone(), sb);
}

/// Puts endpoints back as they should be: host ends on their bridge and up,
/// and pairs deleted behind weft's back recreated.
fn repair_endpoints(inner: &mut Inner, sb: &Sandbox, links: &HashMap<String, Link>) -> Result<()> {
    let (Some(path), Attachment::Networks { endpoints }) = (&sb.netns, &sb.attachment) else {
        return Ok(());
    };
    let mut missing = Vec::new();
    for (i, ep) in endpoints.iter().enumerate() {
        let Some(net) = inner.networks.get(&ep.network) else {
            continue;
        };
        if ep.kind == EndpointKind::Macvlan {
            continue;
        }
        match links.get(&ep.host_ifname) {
            None => missing.push((i, ep)),
            Some(l) if l.master != Some(net.bridge_index) || !l.up => {
                inner
                    .nl
                    .enslave_up(l.index, None, net.bridge_index, net.net.mtu)?;
                info!(sandbox = %sb.name, link = %l.name, "veth put back on its bridge");
            }
            Some(_) => {}
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let ns = Netns::open(Path::new(path))?;
    let mut ns_nl = ns.netlink()?;
    for (_, ep) in missing {
        let Some(net) = inner.networks.get(&ep.network) else {
            continue;
        };
        // A half-left sandbox end would block the new pair.
        ns_nl.delete_link(&ep.ifname)?;
        let route = weft_model::network::default_route_network(
            endpoints
                .iter()
                .filter_map(|e| inner.networks.get(&e.network))
                .map(|n| &n.net),
        ) == Some(ep.network.as_str());
        bridge::attach(
            &mut inner.nl,
            &ns,
            &mut ns_nl,
            net.bridge_index,
            ep,
            net.net.mtu,
            route,
        )?;
        info!(sandbox = %sb.name, ifname = %ep.ifname, "endpoint restored");
    }
    Ok(())
}

/// Removes weft-owned kernel objects and files that no sandbox claims.
fn collect_garbage(inner: &mut Inner) -> Result<()> {
    let wanted: HashSet<&str> = inner
        .sandboxes
        .values()
        .flat_map(|s| s.attachment.endpoints())
        .map(|e| e.host_ifname.as_str())
        .chain(inner.networks.values().map(|n| n.net.bridge.as_str()))
        .collect();
    let shims: Vec<String> = inner
        .networks
        .values()
        .filter(|n| n.net.host_access.is_some())
        .map(|n| n.net.shim())
        .collect();
    // VXLAN devices of the overlay networks this host has joined stay:
    // traffic keeps flowing through an agent restart.
    let vxlans: Vec<String> = inner
        .networks
        .values()
        .filter(|n| {
            n.net
                .overlay
                .as_ref()
                .is_some_and(|o| o.backend == weft_model::BackendKind::Vxlan)
        })
        .map(|n| weft_model::overlay::vxlan_device(&n.net.id))
        .collect();
    let wanted: HashSet<&str> = wanted
        .into_iter()
        .chain(shims.iter().map(String::as_str))
        .chain(vxlans.iter().map(String::as_str))
        .collect();
    let owned = |name: &str| {
        name.starts_with(HOST_VETH_PREFIX)
            || name.starts_with(BRIDGE_PREFIX)
            || name.starts_with(SHIM_PREFIX)
            || name.starts_with(weft_model::overlay::VXLAN_PREFIX)
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
    for (dir, ext) in [
        (inner.cfg.logs_dir(), ".log"),
        (inner.cfg.resolv_dir(), ".conf"),
    ] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry
                .file_name()
                .to_string_lossy()
                .trim_end_matches(ext)
                .to_string();
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
