//! weft lab: several simulated hosts on this machine (see crates/lab).

use crate::output::{emit, table};
use crate::{Failure, Format};
use clap::Subcommand;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Instant;
use weft_lab::{Lab, LabSpec};
use weft_model::api::StatusView;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Build a lab: an underlay switch, etcd, N hosts with an agent each, and
    /// an overlay network `lab` (10.40.0.0/16) that every host joins
    #[command(
        after_help = "Examples:\n  weft lab up\n  weft lab up --hosts 4 --backend host-gw --name gw"
    )]
    Up {
        /// How many simulated hosts
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Backend of the lab's overlay network (default: weft's default for -d overlay)
        #[arg(long)]
        backend: Option<String>,
        /// Name of the lab
        #[arg(long, default_value = "lab")]
        name: String,
        /// Range of the lab's overlay network
        #[arg(long, default_value = "10.40.0.0/16")]
        subnet: ipnet::Ipv4Net,
        /// Lease TTL of the agents, in seconds
        #[arg(long, default_value_t = 60)]
        lease_ttl: u64,
        /// Run etcd on plain http without client certificates (default:
        /// TLS with a CA of the lab's own and a client certificate per host)
        #[arg(long)]
        insecure_etcd: bool,
        /// Where labs live
        #[arg(long, env = "WEFT_LAB_ROOT", default_value = "/run/weft-lab")]
        root: PathBuf,
    },
    /// Run a command as one of the lab's hosts: in its namespace, with
    /// `weft` talking to that host's agent
    #[command(
        after_help = "Examples:\n  weft lab exec h1 -- weft run -d --net lab --name a -- sleep 1d\n  weft lab exec h2 -- ip route"
    )]
    Exec {
        /// The host: h1, h2, …
        host: String,
        /// Name of the lab
        #[arg(long, default_value = "lab")]
        name: String,
        /// Where labs live
        #[arg(long, env = "WEFT_LAB_ROOT", default_value = "/run/weft-lab")]
        root: PathBuf,
        /// The command and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Hosts, their agents, leases and peers
    #[command(
        after_help = "Examples:\n  weft lab status\n  weft --format json lab status --name gw"
    )]
    Status {
        /// Name of the lab
        #[arg(long, default_value = "lab")]
        name: String,
        /// Where labs live
        #[arg(long, env = "WEFT_LAB_ROOT", default_value = "/run/weft-lab")]
        root: PathBuf,
    },
    /// Remove every namespace, process and file of the lab, even after a crash
    #[command(after_help = "Example:\n  weft lab down --name gw")]
    Down {
        /// Name of the lab
        #[arg(long, default_value = "lab")]
        name: String,
        /// Where labs live
        #[arg(long, env = "WEFT_LAB_ROOT", default_value = "/run/weft-lab")]
        root: PathBuf,
    },
}

pub fn dispatch(format: Format, cmd: LabCommand) -> Result<i32, Failure> {
    match cmd {
        LabCommand::Up {
            hosts,
            backend,
            name,
            subnet,
            lease_ttl,
            insecure_etcd,
            root,
        } => {
            let spec = LabSpec {
                name: name.clone(),
                root,
                hosts,
                backend,
                network: Some(("lab".into(), subnet)),
                lease_ttl,
                weft_bin: std::env::current_exe()?,
                insecure_etcd,
            };
            let start = Instant::now();
            let mut step = 0;
            let lab = Lab::up(&spec, &mut |what| {
                step += 1;
                eprintln!(
                    "[{:>5.1}s] {step:>2}. {what}",
                    start.elapsed().as_secs_f64()
                );
            })?;
            eprintln!(
                "[{:>5.1}s] lab {name} is up: {} hosts; try `weft lab exec h1 -- weft run --net lab -d -- sleep 1d`",
                start.elapsed().as_secs_f64(),
                lab.hosts.len()
            );
            Ok(0)
        }
        LabCommand::Exec {
            host,
            name,
            root,
            command,
        } => {
            let lab = Lab::load(&root, &name)?;
            let i = lab.index_of(&host)?;
            let err = lab.exec(i, &command)?.exec();
            Err(Failure {
                code: 127,
                message: format!("{}: {err}", command[0]),
            })
        }
        LabCommand::Status { name, root } => {
            let lab = Lab::load(&root, &name)?;
            let mut rows = Vec::new();
            let mut views = Vec::new();
            for (i, h) in lab.hosts.iter().enumerate() {
                let alive = h.agent.as_ref().is_some_and(weft_kernel_alive);
                let status: Option<StatusView> = lab
                    .weft(i, &["--format", "json", "status"])
                    .output()
                    .ok()
                    // 1 is an unhealthy host: its view says why.
                    .filter(|o| matches!(o.status.code(), Some(0 | 1)))
                    .and_then(|o| serde_json::from_slice(&o.stdout).ok());
                let c = status.as_ref().and_then(|s| s.cluster.as_ref());
                let leases = c.map_or("-".into(), |c| {
                    c.networks
                        .iter()
                        .map(|n| {
                            format!(
                                "{}={}",
                                n.name,
                                n.subnet.map_or("-".into(), |s| s.to_string())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                });
                let peers = c.map_or("-".into(), |c| {
                    let all: Vec<_> = c.networks.iter().flat_map(|n| &n.peers).collect();
                    let ok = all.iter().filter(|p| p.programmed.is_some()).count();
                    format!("{ok}/{} programmed", all.len())
                });
                rows.push(vec![
                    h.name.clone(),
                    h.ip.to_string(),
                    match (&h.agent, alive) {
                        (Some(p), true) => format!("running (pid {})", p.pid),
                        _ => "STOPPED".into(),
                    },
                    c.map_or("-".into(), |c| {
                        if c.etcd_healthy {
                            "ok".into()
                        } else {
                            "unreachable".into()
                        }
                    }),
                    leases,
                    peers,
                ]);
                views.push(serde_json::json!({"host": h.name, "ip": h.ip, "alive": alive, "status": status}));
            }
            emit(format, &views, || {
                format!(
                    "lab {} ({}), etcd {}\n{}",
                    lab.name,
                    lab.dir.display(),
                    if lab.etcd.as_ref().is_some_and(weft_kernel_alive) {
                        "running"
                    } else {
                        "STOPPED"
                    },
                    table(
                        &["HOST", "ADDRESS", "AGENT", "ETCD", "LEASES", "PEERS"],
                        &rows
                    )
                )
            });
            Ok(0)
        }
        LabCommand::Down { name, root } => {
            let r = weft_lab::down(&Lab::path(&root, &name))?;
            if !r.existed {
                eprintln!(
                    "weft: no lab named {name} under {}; nothing to do",
                    root.display()
                );
            } else {
                eprintln!(
                    "weft: lab {name} removed ({} processes stopped, {} namespaces removed)",
                    r.processes_killed, r.namespaces_removed
                );
            }
            Ok(0)
        }
    }
}

fn weft_kernel_alive(p: &weft_model::ProcessRef) -> bool {
    weft_lab::is_alive(p)
}
