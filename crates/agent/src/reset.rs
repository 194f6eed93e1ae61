//! `weft reset`: removes everything weft made on this host, with no agent
//! running (it takes the agent's lock, so one cannot start meanwhile).
//!
//! What goes is found from weft's own records and names, never by the
//! look of an object: the sandboxes in the runtime store (their processes,
//! namespace files and host-side veths), the networks in the network
//! database (each driver's `teardown`, plus an overlay's VXLAN or TUN
//! device by its name), routes with weft's two routing protocols, the
//! table `inet weft`, the namespace files left in STATE_DIR/netns and that
//! directory's mount, then weft's files in the state dir and (unless kept)
//! the data dir. Each step runs even when an earlier one failed; every
//! failure is reported.

use crate::config::AgentConfig;
use crate::driver;
use crate::error::{AgentError, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use weft_kernel::{netns, process, Netlink, Netns, OVERLAY_ROUTE_PROTOCOL};
use weft_model::nft::{TABLE_FAMILY, TABLE_NAME};
use weft_model::{keys, Network, Sandbox};
use weft_store::{DiskStore, RuntimeStore, StoreJson};

/// What a reset removed, and what it could not.
#[derive(Debug, Default, serde::Serialize)]
pub struct ResetReport {
    pub removed: Vec<String>,
    pub failed: Vec<String>,
}

impl ResetReport {
    fn step(&mut self, what: String, r: std::result::Result<bool, String>) {
        match r {
            Ok(true) => self.removed.push(what),
            Ok(false) => {}
            Err(e) => self.failed.push(format!("{what}: {e}")),
        }
    }
}

/// Removes what weft made on this host. `keep_data` keeps the data dir
/// (network definitions, the cluster identity), so that the next agent
/// makes the same networks again.
pub fn reset(cfg: &AgentConfig, keep_data: bool) -> Result<ResetReport> {
    // The agent's lock, held to the end: no agent runs, none can start.
    let _lock = take_lock(cfg)?;
    let mut report = ResetReport::default();
    let mut nl = Netlink::open()?;

    let sandboxes: Vec<Sandbox> = match cfg.runtime_store_dir().exists() {
        true => RuntimeStore::open(&cfg.runtime_store_dir())?.list_json(keys::SANDBOXES)?,
        false => Vec::new(),
    };
    let networks: Vec<Network> = match cfg.network_db().exists() {
        true => DiskStore::open(&cfg.network_db())
            .map_err(|e| {
                AgentError::Conflict(format!(
                    "{e}: an agent with another state dir may be using the data dir {}; stop it first",
                    cfg.data_dir.display()
                ))
            })?
            .list_json(keys::NETWORKS)?,
        false => Vec::new(),
    };

    for sb in &sandboxes {
        if let Some(p) = sb.process {
            report.step(
                format!("process {} of sandbox {}", p.pid, sb.name),
                kill(&p),
            );
        }
        for ep in sb.attachment.endpoints() {
            if let Some(name) = ep.host_ifname() {
                report.step(format!("link {name}"), delete_link(&mut nl, name));
            }
        }
        if let (Some(path), None) = (&sb.netns, &sb.external) {
            let path = PathBuf::from(path);
            report.step(
                format!("namespace {}", path.display()),
                Netns::remove(&path).map_err(|e| e.to_string()),
            );
        }
    }
    // The pool's namespaces, and any other file weft left there.
    if let Ok(entries) = std::fs::read_dir(cfg.netns_dir()) {
        for e in entries.flatten() {
            let path = e.path();
            report.step(
                format!("namespace {}", path.display()),
                Netns::remove(&path).map_err(|e| e.to_string()),
            );
        }
    }

    for net in &networks {
        let mut d = driver::for_network(net);
        let links: Vec<String> = d.owned_links(net);
        let r = d
            .teardown(&mut nl, net)
            .map(|()| true)
            .map_err(|e| e.to_string());
        report.step(format!("network {} ({})", net.name, links.join(", ")), r);
        if net.overlay().is_some() {
            for dev in [
                weft_model::overlay::vxlan_device(&net.id),
                crate::backend::tun_device(&net.id),
                // `weft expose`'s pair (deleting one end deletes both).
                weft_model::overlay::expose_link(&net.id),
            ] {
                report.step(format!("link {dev}"), delete_link(&mut nl, &dev));
            }
        }
    }

    for protocol in [
        weft_kernel::netlink::WEFT_ROUTE_PROTOCOL,
        OVERLAY_ROUTE_PROTOCOL,
    ] {
        match nl.routes_of(protocol) {
            Ok(routes) => {
                for r in routes {
                    report.step(
                        format!("route {} (protocol {protocol:#x})", r.dst),
                        nl.delete_route(r.dst, protocol)
                            .map(|()| true)
                            .map_err(|e| e.to_string()),
                    );
                }
            }
            Err(e) => report
                .failed
                .push(format!("routes of protocol {protocol:#x}: {e}")),
        }
    }

    for family in [TABLE_FAMILY, weft_model::nft::BRIDGE_FAMILY] {
        let table = weft_kernel::nft::list_table(family, TABLE_NAME)
            .map_err(|e| e.to_string())
            .and_then(|t| match t {
                Some(_) => {
                    weft_kernel::nft::apply(&format!("delete table {family} {TABLE_NAME}\n"))
                        .map(|()| true)
                        .map_err(|e| e.to_string())
                }
                None => Ok(false),
            });
        // The bridge table exists only while a network has sub-ranges.
        if family == TABLE_FAMILY || matches!(table, Ok(true) | Err(_)) {
            report.step(format!("nft table {family} {TABLE_NAME}"), table);
        }
    }

    let mounted = netns::is_mount_point(&cfg.netns_dir());
    report.step(
        format!("mount {}", cfg.netns_dir().display()),
        netns::release_dir(&cfg.netns_dir())
            .map(|()| mounted)
            .map_err(|e| e.to_string()),
    );

    // weft's files only, then the directories if that left them empty: a
    // state dir given by the user may hold other things.
    let mut files: Vec<PathBuf> = vec![
        cfg.socket_path(),
        cfg.netns_dir(),
        cfg.runtime_store_dir(),
        cfg.resolv_dir(),
        cfg.logs_dir(),
    ];
    files.extend(networks.iter().map(|n| cfg.subnet_file(&n.name)));
    if !keep_data {
        files.extend([
            cfg.network_db(),
            cfg.cluster_file(),
            crate::backend::key_file(&cfg.data_dir),
        ]);
    }
    for f in files {
        report.step(format!("{}", f.display()), remove_path(&f));
    }
    report.step(
        format!("{}", cfg.lock_path().display()),
        remove_path(&cfg.lock_path()),
    );
    let mut dirs = vec![cfg.state_dir.clone()];
    if !keep_data {
        dirs.push(cfg.data_dir.clone());
    }
    for d in dirs {
        // Only if empty: remove_dir refuses otherwise, which is what we want.
        if std::fs::remove_dir(&d).is_ok() {
            report.removed.push(format!("{}", d.display()));
        }
    }
    Ok(report)
}

fn take_lock(cfg: &AgentConfig) -> Result<Option<std::fs::File>> {
    if !cfg.state_dir.exists() {
        return Ok(None);
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.lock_path())
        .map_err(AgentError::io(format!(
            "open {}",
            cfg.lock_path().display()
        )))?;
    // SAFETY: flock(2) on a descriptor `lock` owns and keeps open; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(AgentError::Conflict(format!(
            "an agent is running with state dir {}; stop it first (reset removes what it manages)",
            cfg.state_dir.display()
        )));
    }
    Ok(Some(lock))
}

/// SIGKILL to the sandbox's process group, if that process still runs.
fn kill(p: &weft_model::ProcessRef) -> std::result::Result<bool, String> {
    match process::pidfd(p).map_err(|e| e.to_string())? {
        None => Ok(false),
        Some(fd) => {
            process::signal_group(p, &fd, libc::SIGKILL).map_err(|e| e.to_string())?;
            Ok(process::wait_exit(&fd, 5000))
        }
    }
}

fn delete_link(nl: &mut Netlink, name: &str) -> std::result::Result<bool, String> {
    nl.delete_link(name).map_err(|e| e.to_string())
}

fn remove_path(p: &Path) -> std::result::Result<bool, String> {
    let r = match std::fs::symlink_metadata(p) {
        Err(_) => return Ok(false),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
    };
    r.map(|()| true).map_err(|e| e.to_string())
}
