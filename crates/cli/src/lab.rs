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
        /// The lab's overlay network: one subnet shared by all hosts
        /// (Docker overlay, weave), or with --host-subnet-len the range cut
        /// into a subnet per host
        #[arg(long, default_value = "10.40.0.0/16")]
        subnet: ipnet::Ipv4Net,
        /// Give each host a subnet of this length, routed between hosts
        /// (flannel's kind; the default with a backend other than vxlan,
        /// which carries only that kind: /24)
        #[arg(long)]
        host_subnet_len: Option<u8>,
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
    /// The lab as one picture: every host's bridges, sandboxes and
    /// tunnels, with the path of one `weft explain` highlighted (DOT;
    /// --format svg or png through Graphviz)
    #[command(
        after_help = "Examples:\n  weft lab picture --format png > lab.png\n  weft lab picture --path h1 a 10.40.7.2 --format svg > path.svg   # explain a -> 10.40.7.2, as h1 sees it"
    )]
    Picture {
        /// Highlight `weft explain SRC DST` run on HOST
        #[arg(long, num_args = 3, value_names = ["HOST", "SRC", "DST"])]
        path: Option<Vec<String>>,
        /// Name of the lab
        #[arg(long, default_value = "lab")]
        name: String,
        /// Where labs live
        #[arg(long, env = "WEFT_LAB_ROOT", default_value = "/run/weft-lab")]
        root: PathBuf,
    },
    /// `weft explain` the whole way through the lab: on HOST, then, when
    /// the packet is handed to another host, on that host as it arrives
    #[command(
        after_help = "Example:\n  weft lab explain h1 web 10.40.10.2   # web on h1 to the sandbox at 10.40.10.2 on h2"
    )]
    Explain {
        /// The host the packet starts on: h1, h2, …
        host: String,
        /// A sandbox of that host (name or id), an address, or `host`
        src: String,
        /// A sandbox of any host of the lab (name or id), an address, or `host`
        dst: String,
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
            host_subnet_len,
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
                host_subnet_len,
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
                "[{:>5.1}s] lab {name} is up: {} hosts; try `weft lab exec h1 -- weft run --net lab -d -- sleep 1d`; its picture: `weft lab picture --name {name} --format png > lab.png`",
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
                            let node = c.node.as_str();
                            let held = n.blocks.iter().filter(|b| b.node == node).count();
                            if n.kind == weft_model::overlay::OverlayKind::Shared {
                                format!(
                                    "{}={held} block{}",
                                    n.name,
                                    if held == 1 { "" } else { "s" }
                                )
                            } else {
                                format!(
                                    "{}={}",
                                    n.name,
                                    n.subnet.map_or("-".into(), |s| s.to_string())
                                )
                            }
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
        LabCommand::Explain {
            host,
            src,
            dst,
            name,
            root,
        } => explain_through(format, &Lab::load(&root, &name)?, &host, &src, &dst),
        LabCommand::Picture { path, name, root } => {
            picture(format, &Lab::load(&root, &name)?, path)
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

/// `weft --format json ARGS` as lab host `i`, its answer parsed.
fn ask_json<T: serde::de::DeserializeOwned>(
    lab: &Lab,
    i: usize,
    args: &[&str],
) -> Result<T, Failure> {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let out = lab.weft(i, &all).output()?;
    if !out.status.success() {
        return Err(Failure {
            code: 1,
            message: format!(
                "weft {} on {}: {}",
                args.join(" "),
                lab.hosts[i].name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Explains on `host`, then on every host the packet is handed to.
fn explain_through(
    format: Format,
    lab: &Lab,
    host: &str,
    src: &str,
    dst: &str,
) -> Result<i32, Failure> {
    let mut i = lab.index_of(host)?;
    // A name of a sandbox on another host of the lab: its address (an
    // agent knows only its own sandboxes' names).
    let dst = match dst.parse::<std::net::Ipv4Addr>() {
        Ok(_) => dst.to_string(),
        Err(_) if dst == "host" => dst.to_string(),
        Err(_) => {
            let mine = lab.weft(i, &["inspect", dst]).output()?.status.success();
            let found = (0..lab.hosts.len())
                .filter(|j| *j != i && !mine)
                .find_map(|j| {
                    let sbs: Vec<weft_model::api::SandboxView> =
                        ask_json(lab, j, &["inspect", dst]).ok()?;
                    Some(sbs.first()?.attachment.endpoints().first()?.ip.to_string())
                });
            found.unwrap_or_else(|| dst.to_string())
        }
    };
    let dst = dst.as_str();
    let mut e: weft_model::explain::Explanation = ask_json(lab, i, &["explain", src, dst])?;
    // Inside an overlay the source address stays the sandbox's own.
    let src_ip = match src.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => {
            let sbs: Vec<weft_model::api::SandboxView> = ask_json(lab, i, &["inspect", src])?;
            sbs.first()
                .and_then(|s| s.attachment.endpoints().first())
                .map(|ep| ep.ip.to_string())
                .ok_or_else(|| Failure {
                    code: 1,
                    message: format!("{src} on {host} has no address"),
                })?
        }
    };
    // At most once per host: a path never crosses a host twice.
    for _ in 0..lab.hosts.len() {
        let Some(next) = e.verdict.next_host().map(String::from) else {
            break;
        };
        let Ok(j) = lab.index_of(&next) else {
            break;
        };
        if j == i {
            break;
        }
        let far: weft_model::explain::Explanation = ask_json(lab, j, &["explain", &src_ip, dst])?;
        e = e.then(far);
        i = j;
    }
    match format {
        Format::Table => crate::output::print_line(e.render_text().trim_end()),
        Format::Json => emit(format, &e, String::new),
        _ => crate::explain_cmd::picture(format, &e.render_dot())?,
    }
    Ok(0)
}

/// Every host's topology (from its agent) and the path, as one picture.
fn picture(format: Format, lab: &Lab, path: Option<Vec<String>>) -> Result<i32, Failure> {
    let hosts: Vec<weft_model::topology::Topology> = (0..lab.hosts.len())
        .map(|i| ask_json(lab, i, &["topology"]))
        .collect::<Result<_, _>>()?;
    let explained: Option<weft_model::explain::Explanation> = match &path {
        Some(p) => Some(ask_json(
            lab,
            lab.index_of(&p[0])?,
            &["explain", &p[1], &p[2]],
        )?),
        None => None,
    };
    if format == Format::Json {
        emit(format, &hosts, String::new);
        return Ok(0);
    }
    let dot = weft_model::topology::render_dot(&hosts, explained.as_ref());
    crate::explain_cmd::picture(format, &dot)?;
    Ok(0)
}
