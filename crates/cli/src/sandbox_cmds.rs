//! run, ps, exec, stop, rm.

use crate::client::{Client, ClientError};
use crate::output::{emit, table};
use crate::spawn::{exit_code, find_program, ignore_terminal_signals, spawn, Spec};
use crate::{Failure, Format};
use clap::Args;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use weft_model::api::{CreateSandbox, Removed, SandboxView, StartedProcess, State};

pub struct Context {
    pub client: Client,
    pub format: Format,
    pub state_dir: PathBuf,
}

#[derive(Args)]
pub struct RunArgs {
    /// Name of the sandbox (default: the short id)
    #[arg(long)]
    name: Option<String>,
    /// Network: bridge (default), host, none, container:NAME, or a network's
    /// name as NAME[:ip=ADDR][,alias=NAME]; repeat for one interface per network (eth0, eth1, …)
    #[arg(long = "net", alias = "network", value_name = "NET")]
    net: Vec<String>,
    /// Address for the sandbox on its only network (default: the next free one)
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    /// Publish a port of the first network, as Docker does:
    /// [[HOST_IP:][HOST_PORT[-END]]:]CONTAINER_PORT[-END][/tcp|/udp].
    /// 8080:80 (host 8080 to 80); 80 or :80 (a free host port, see `weft port`);
    /// 127.0.0.1::80 (a free port on that address); 8000-8010:80 (a free one
    /// of those); 8000-8002:80-82 (port by port)
    #[arg(short = 'p', long = "publish", value_name = "PORTS")]
    publish: Vec<String>,
    /// A port the command serves, PORT[/tcp|/udp] (repeatable); only -P uses it
    #[arg(long, value_name = "PORT")]
    expose: Vec<String>,
    /// Publish every --expose port on a free host port (weft has no images,
    /// so --expose is the only source of ports)
    #[arg(short = 'P', long = "publish-all")]
    publish_all: bool,
    /// Name server for the sandbox instead of weft's resolver (repeatable)
    #[arg(long)]
    dns: Vec<std::net::IpAddr>,
    /// Search domain for the sandbox (repeatable)
    #[arg(long)]
    dns_search: Vec<String>,
    /// resolv.conf option for the sandbox, e.g. ndots:2 (repeatable)
    #[arg(long = "dns-option")]
    dns_options: Vec<String>,
    /// Return once the command runs and leave it running (output goes to STATE_DIR/logs/ID.log)
    #[arg(short = 'd', long)]
    detach: bool,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
pub struct ExecArgs {
    /// Sandbox name or id
    sandbox: String,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL
    #[arg(short = 't', long, default_value_t = 10)]
    time: u64,
    /// Sandbox names or ids
    #[arg(required = true)]
    sandboxes: Vec<String>,
}

#[derive(Args)]
pub struct RmArgs {
    /// Kill a running sandbox's process first
    #[arg(short, long)]
    force: bool,
    /// Sandbox names or ids
    #[arg(required = true)]
    sandboxes: Vec<String>,
}

fn sandbox_path(key: &str) -> String {
    format!("/v1/sandboxes/{}", key)
}

fn check_program(argv: &[String]) -> Result<(), Failure> {
    if find_program(&argv[0]).is_none() {
        return Err(Failure {
            code: 127,
            message: format!(
                "{}: command not found (not an executable file, nor in PATH)",
                argv[0]
            ),
        });
    }
    Ok(())
}

fn open_netns(view: &SandboxView) -> Result<Option<File>, Failure> {
    view.netns
        .as_ref()
        .map(|p| {
            File::open(p).map_err(|e| {
                Failure::from(format!("open namespace {p} of sandbox {}: {e}", view.name))
            })
        })
        .transpose()
}

/// The -p values, with -P's: each --expose port on a free host port.
fn published(a: &RunArgs) -> Result<Vec<String>, Failure> {
    let mut ports = a.publish.clone();
    for e in &a.expose {
        let (port, proto) = e.split_once('/').unwrap_or((e.as_str(), "tcp"));
        if port.parse::<u16>().map_or(true, |p| p == 0) || !matches!(proto, "tcp" | "udp") {
            return Err(Failure {
                code: 2,
                message: format!("--expose {e}: expected PORT[/tcp|/udp], as in 80 or 53/udp"),
            });
        }
        if a.publish_all {
            ports.push(format!("{port}/{proto}"));
        }
    }
    if a.publish_all && a.expose.is_empty() {
        return Err(Failure {
            code: 2,
            message: "-P publishes the --expose ports, and none is given: add --expose PORT".into(),
        });
    }
    Ok(ports)
}

pub fn run(ctx: &Context, a: RunArgs) -> Result<i32, Failure> {
    // Validate what the agent cannot before anything is made.
    check_program(&a.command)?;
    let ports = published(&a)?;
    let req = CreateSandbox {
        name: a.name,
        net: a.net,
        ip: a.ip,
        command: a.command.clone(),
        auto_remove: !a.detach,
        ports,
        dns: a.dns,
        dns_search: a.dns_search,
        dns_options: a.dns_options,
    };
    let view: SandboxView = ctx
        .client
        .post("/v1/sandboxes", &req)
        .map_err(|e| Failure {
            code: 125,
            message: e.to_string(),
        })?;
    let undo = |msg: String| -> Failure {
        let _ = ctx
            .client
            .delete::<Removed>(&format!("{}?force=true", sandbox_path(&view.id)));
        Failure {
            code: 125,
            message: msg,
        }
    };
    let ns = open_netns(&view).map_err(|f| undo(f.message))?;
    let log = if a.detach {
        let dir = ctx.state_dir.join("logs");
        let path = dir.join(format!("{}.log", view.id));
        Some(File::create(&path).map_err(|e| undo(format!("create {}: {e}", path.display())))?)
    } else {
        ignore_terminal_signals();
        None
    };
    let mut child = spawn(Spec {
        argv: &a.command,
        netns: ns.as_ref(),
        resolv_conf: view.resolv_conf.as_deref(),
        detach_log: log,
    })
    .map_err(|e| undo(format!("start {}: {e}", a.command[0])))?;
    let started: Result<SandboxView, ClientError> = ctx.client.post(
        &format!("{}/started", sandbox_path(&view.id)),
        &StartedProcess {
            pid: child.id() as i32,
        },
    );
    if a.detach {
        let view = match started {
            Ok(v) => v,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(undo(format!("record the process: {e}")));
            }
        };
        emit(ctx.format, &view, || view.id.clone());
        return Ok(0);
    }
    let status = child
        .wait()
        .map_err(|e| undo(format!("wait for {}: {e}", a.command[0])))?;
    // The agent also removes it when the process ends; whoever is first wins.
    match ctx
        .client
        .delete::<Removed>(&format!("{}?force=true", sandbox_path(&view.id)))
    {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => eprintln!("weft: removing sandbox {}: {e}", view.name),
    }
    Ok(exit_code(status))
}

fn addresses(v: &SandboxView) -> String {
    let a: Vec<String> = v
        .attachment
        .endpoints()
        .iter()
        .map(|e| format!("{}/{}", e.ip, e.prefix_len))
        .collect();
    a.join(",")
}

pub fn ps(ctx: &Context) -> Result<i32, Failure> {
    let list: Vec<SandboxView> = ctx.client.get("/v1/sandboxes")?;
    emit(ctx.format, &list, || {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.id[..12].to_string(),
                    s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    s.state.to_string(),
                    s.attachment.describe(),
                    addresses(s),
                    s.command.join(" "),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "ID",
                "PID",
                "STATE",
                "NETWORKS",
                "ADDRESSES",
                "COMMAND",
            ],
            &rows,
        )
    });
    Ok(0)
}

/// `weft port SANDBOX`: its published ports, as Docker prints them.
pub fn port(ctx: &Context, sandbox: &str) -> Result<i32, Failure> {
    let view: SandboxView = ctx.client.get(&sandbox_path(sandbox))?;
    emit(ctx.format, &view.ports, || {
        view.ports
            .iter()
            .map(|p| {
                let m = &p.mapping;
                let host = m
                    .host_ip
                    .map_or_else(|| "0.0.0.0".to_string(), |ip| ip.to_string());
                format!(
                    "{}/{} -> {host}:{} ({}:{})",
                    m.container, m.protocol, m.host, p.target, m.container
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(0)
}

pub fn exec(ctx: &Context, a: ExecArgs) -> Result<i32, Failure> {
    let view: SandboxView = ctx
        .client
        .get(&sandbox_path(&a.sandbox))
        .map_err(|e| Failure {
            code: 125,
            message: e.to_string(),
        })?;
    if view.state != State::Running {
        return Err(Failure {
            code: 125,
            message: format!(
                "sandbox {} is not running ({}); exec needs a running sandbox",
                view.name, view.state
            ),
        });
    }
    check_program(&a.command)?;
    let ns = open_netns(&view).map_err(|mut f| {
        f.code = 125;
        f
    })?;
    ignore_terminal_signals();
    let mut child = spawn(Spec {
        argv: &a.command,
        netns: ns.as_ref(),
        resolv_conf: view.resolv_conf.as_deref(),
        detach_log: None,
    })
    .map_err(|e| Failure {
        code: 126,
        message: format!("start {}: {e}", a.command[0]),
    })?;
    let status = child.wait()?;
    Ok(exit_code(status))
}

pub fn stop(ctx: &Context, a: StopArgs) -> Result<i32, Failure> {
    let mut done = Vec::new();
    let mut failed = None;
    for s in &a.sandboxes {
        match ctx.client.post_empty::<SandboxView>(&format!(
            "{}/stop?timeout={}",
            sandbox_path(s),
            a.time
        )) {
            Ok(v) => done.push(v),
            Err(e) => {
                eprintln!("weft: stop {s}: {e}");
                failed = Some(1);
            }
        }
    }
    emit(ctx.format, &done, || {
        done.iter()
            .map(|v| v.name.clone())
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(failed.unwrap_or(0))
}

pub fn rm(ctx: &Context, a: RmArgs) -> Result<i32, Failure> {
    let mut done: Vec<Removed> = Vec::new();
    let mut failed = None;
    for s in &a.sandboxes {
        match ctx
            .client
            .delete::<Removed>(&format!("{}?force={}", sandbox_path(s), a.force))
        {
            Ok(r) => done.push(r),
            Err(e) => {
                eprintln!("weft: rm {s}: {e}");
                failed = Some(1);
            }
        }
    }
    emit(ctx.format, &done, || {
        done.iter()
            .map(|r| r.name.clone())
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(failed.unwrap_or(0))
}
