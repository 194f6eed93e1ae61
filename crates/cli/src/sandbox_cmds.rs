//! run, ps, exec, stop, rm.

use crate::client::{Client, ClientError};
use crate::filter::{ago, shell_quote, Filters};
use crate::output::{emit, table};
use crate::spawn::{
    exit_code, find_program, ignore_terminal_signals, spawn, spawn_with_waiter, Spec,
};
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
#[command(
    after_help = "Examples:\n  weft run -- ip addr                                  # on the default network, removed when done\n  \
weft run -d --name web -p 8080:80 -- busybox httpd -f -p 80\n  \
weft run --net red --net green:ip=10.2.0.9 -- sh    # one interface per network\n  \
weft run --net container:web -- ss -tln             # in web's network namespace"
)]
pub struct RunArgs {
    /// Name of the sandbox (default: the short id)
    #[arg(long)]
    name: Option<String>,
    /// Network: bridge (default), host, none, container:NAME, or a network's
    /// name as NAME[:ip=ADDR][,alias=NAME][,subnet=CIDR]; repeat for one interface per
    /// network (eth0, eth1, …). subnet=CIDR places the sandbox in an isolated sub-range of
    /// the network (weave's WEAVE_CIDR=net:CIDR): it reaches only the same sub-range, on
    /// any host, plus the gateway and the world
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
    /// Return once the command runs and leave it running (output goes to
    /// STATE_DIR/logs/ID.log; read it with `weft logs`)
    #[arg(short = 'd', long)]
    detach: bool,
    /// Remove the sandbox when the command ends: what weft does anyway
    /// without -d (accepted for Docker's habit)
    #[arg(long, conflicts_with = "detach")]
    rm: bool,
    /// Set an environment variable for the command, KEY=VALUE (or KEY, to
    /// pass this shell's value on); repeatable
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = env_var)]
    env: Vec<(String, String)>,
    /// Host name the command sees (it gets a UTS namespace of its own)
    #[arg(long)]
    hostname: Option<String>,
    /// MAC address of the interface on the only network, e.g. 02:42:0a:00:00:05
    #[arg(long)]
    mac_address: Option<String>,
    /// Keep stdin open for the command (without it, it reads /dev/null, as in Docker)
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Accepted for Docker's habit: the command runs on this terminal directly
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// `-e KEY=VALUE`, or `-e KEY` for this environment's value (left out when unset).
fn env_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = match s.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (s, std::env::var(s).ok()),
    };
    if k.is_empty() || k.contains('\0') || v.as_deref().is_some_and(|v| v.contains('\0')) {
        return Err(format!("{s:?}: expected KEY=VALUE, as in -e LANG=C"));
    }
    Ok((k.to_string(), v.unwrap_or_default()))
}

#[derive(Args)]
#[command(after_help = "Examples:\n  weft exec web -- ip route\n  weft exec -i web -- sh")]
pub struct ExecArgs {
    /// Sandbox name or id
    sandbox: String,
    /// Set an environment variable for the command, KEY=VALUE; repeatable
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = env_var)]
    env: Vec<(String, String)>,
    /// Keep stdin open for the command (without it, it reads /dev/null)
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Accepted for Docker's habit: the command runs on this terminal directly
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
#[command(after_help = "Examples:\n  weft stop web\n  weft stop -t 2 web db")]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL
    #[arg(short = 't', long, default_value_t = 10)]
    time: u64,
    /// Sandbox names or ids
    #[arg(required = true)]
    sandboxes: Vec<String>,
}

#[derive(Args)]
#[command(after_help = "Examples:\n  weft rm web\n  weft rm -f web   # stops it first")]
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
        hostname: a.hostname.clone(),
        mac_address: a.mac_address,
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
    let spec = Spec {
        argv: &a.command,
        netns: ns.as_ref(),
        resolv_conf: view.resolv_conf.as_deref(),
        detach_log: log,
        env: &a.env,
        hostname: a.hostname.as_deref(),
        uts: None,
        interactive: a.interactive,
    };
    let record = |pid: u32, start_time: Option<u64>| -> Result<SandboxView, ClientError> {
        ctx.client.post(
            &format!("{}/started", sandbox_path(&view.id)),
            &StartedProcess {
                pid: pid as i32,
                start_time,
            },
        )
    };
    if a.detach {
        // Under a waiter that records the exit code next to the log.
        let exit_file = ctx.state_dir.join("logs").join(format!("{}.exit", view.id));
        let (pid, start_time) = spawn_with_waiter(spec, &exit_file)
            .map_err(|e| undo(format!("start {}: {e}", a.command[0])))?;
        let view = match record(pid, start_time) {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: kill takes plain integers; pid is the command's.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                return Err(undo(format!("record the process: {e}")));
            }
        };
        emit(ctx.format, &view, || view.id.clone());
        return Ok(0);
    }
    let mut child = spawn(spec).map_err(|e| undo(format!("start {}: {e}", a.command[0])))?;
    // The agent learns the pid; a foreground run waits for the command itself.
    let _ = record(child.id(), None);
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

#[derive(Args)]
#[command(
    after_help = "Examples:\n  weft ps\n  weft ps -a --filter status=exited\n  weft ps -q --filter network=red   # ids, for scripts\n\n\
Filters: name=PART (a part of the name), id=PREFIX, status=created|running|exited, network=NAME. \
Values of one key: any matches; different keys: all must."
)]
pub struct PsArgs {
    /// Show exited sandboxes too (hidden by default, as in Docker)
    #[arg(short, long)]
    all: bool,
    /// Print short ids only, one per line
    #[arg(short, long)]
    quiet: bool,
    /// Only sandboxes that match KEY=VALUE (repeatable; see below)
    #[arg(short, long, value_name = "KEY=VALUE")]
    filter: Vec<String>,
}

/// Published ports as Docker's PORTS column: `0.0.0.0:8080->80/tcp`.
fn ports_column(v: &SandboxView) -> String {
    let p: Vec<String> = v
        .ports
        .iter()
        .map(|p| {
            let m = &p.mapping;
            let ip = m
                .host_ip
                .map_or_else(|| "0.0.0.0".into(), |ip| ip.to_string());
            format!("{ip}:{}->{}/{}", m.host, m.container, m.protocol)
        })
        .collect();
    p.join(", ")
}

pub fn ps(ctx: &Context, a: PsArgs) -> Result<i32, Failure> {
    let filters =
        Filters::parse(&a.filter, &["name", "id", "status", "network"]).map_err(|m| Failure {
            code: 2,
            message: m,
        })?;
    let mut list: Vec<SandboxView> = ctx.client.get("/v1/sandboxes")?;
    list.retain(|s| {
        (a.all || s.state != State::Exited || filters.has("status"))
            && filters.matches(
                |k| match k {
                    "name" => vec![s.name.clone()],
                    "id" => vec![s.id.clone()],
                    "status" => vec![s.state.to_string()],
                    _ => s
                        .attachment
                        .endpoints()
                        .iter()
                        .map(|e| e.network.clone())
                        .collect(),
                },
                |k| k != "name" && k != "id",
            )
    });
    // Newest first, as Docker; ties (the same second) by name, so the order is stable.
    list.sort_by(|x, y| {
        y.created_unix
            .cmp(&x.created_unix)
            .then_with(|| x.name.cmp(&y.name))
    });
    if a.quiet {
        let ids: Vec<String> = list.iter().map(|s| s.id[..12].to_string()).collect();
        emit(ctx.format, &ids, || ids.join("\n"));
        return Ok(0);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    emit(ctx.format, &list, || {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.id[..12].to_string(),
                    s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    match s.exit_code {
                        Some(c) => format!("{} ({c})", s.state),
                        None => s.state.to_string(),
                    },
                    ago(s.created_unix, now),
                    s.attachment.describe(),
                    addresses(s),
                    ports_column(s),
                    s.command
                        .iter()
                        .map(|c| shell_quote(c))
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "ID",
                "PID",
                "STATE",
                "CREATED",
                "NETWORKS",
                "ADDRESSES",
                "PORTS",
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
    // A sandbox with a host name has a UTS namespace: its process's.
    let uts =
        match (&view.hostname, view.pid) {
            (Some(_), Some(pid)) => Some(File::open(format!("/proc/{pid}/ns/uts")).map_err(
                |e| Failure {
                    code: 125,
                    message: format!("open the UTS namespace of sandbox {}: {e}", view.name),
                },
            )?),
            _ => None,
        };
    ignore_terminal_signals();
    let mut child = spawn(Spec {
        argv: &a.command,
        netns: ns.as_ref(),
        resolv_conf: view.resolv_conf.as_deref(),
        detach_log: None,
        env: &a.env,
        hostname: None,
        uts: uts.as_ref(),
        interactive: a.interactive,
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

#[derive(Args)]
#[command(
    after_help = "Examples:\n  weft logs web\n  weft logs -f --tail 20 web\n\n\
Only `weft run -d` keeps a log (STATE_DIR/logs/ID.log); a foreground run writes to your terminal."
)]
pub struct LogsArgs {
    /// Keep printing what the command writes until it ends
    #[arg(short, long)]
    follow: bool,
    /// Print only the last N lines first
    #[arg(short = 'n', long, value_name = "N")]
    tail: Option<usize>,
    /// Sandbox name or id
    sandbox: String,
}

/// Writes raw output bytes; a reader that has gone ends weft quietly.
fn write_out(bytes: &[u8]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        drop(out);
        eprintln!("weft: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// The last `n` lines of `text` (all of it when it has fewer).
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let start = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    if n == 0 {
        &text[text.len()..]
    } else {
        &text[start..]
    }
}

/// `weft logs`: what a detached sandbox's command wrote, stdout and stderr.
pub fn logs(ctx: &Context, a: LogsArgs) -> Result<i32, Failure> {
    use std::io::{Read, Seek, SeekFrom};
    let view: SandboxView = ctx.client.get(&sandbox_path(&a.sandbox))?;
    let path = ctx.state_dir.join("logs").join(format!("{}.log", view.id));
    let mut file = File::open(&path).map_err(|e| {
        Failure::from(if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "sandbox {} has no log: only `weft run -d` keeps one (a foreground run writes to its terminal)",
                view.name
            )
        } else {
            format!("open {}: {e}", path.display())
        })
    })?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .map_err(|e| Failure::from(format!("read {}: {e}", path.display())))?;
    write_out(a.tail.map_or(&text[..], |n| last_lines(&text, n)));
    if !a.follow {
        return Ok(0);
    }
    let mut at = text.len() as u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Checked before reading, so what was written before the end is printed.
        let running = ctx
            .client
            .get::<SandboxView>(&sandbox_path(&view.id))
            .is_ok_and(|v| v.state == State::Running);
        file.seek(SeekFrom::Start(at))
            .map_err(|e| Failure::from(format!("read {}: {e}", path.display())))?;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| Failure::from(format!("read {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            write_out(&buf[..n]);
            at += n as u64;
        }
        if !running {
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  weft inspect web\n  weft inspect web db | jq '.[0].attachment'"
)]
pub struct InspectArgs {
    /// Sandbox names or ids
    #[arg(required = true)]
    sandboxes: Vec<String>,
}

/// `weft inspect`: every sandbox's record as JSON (an array, as `docker inspect`).
pub fn inspect(ctx: &Context, a: InspectArgs) -> Result<i32, Failure> {
    let mut views = Vec::with_capacity(a.sandboxes.len());
    for s in &a.sandboxes {
        views.push(ctx.client.get::<SandboxView>(&sandbox_path(s))?);
    }
    crate::output::print_line(&serde_json::to_string_pretty(&views).expect("serializable"));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::last_lines;

    #[test]
    fn tail_takes_whole_lines_from_the_end() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
        assert_eq!(last_lines(b"", 3), b"");
    }
}
