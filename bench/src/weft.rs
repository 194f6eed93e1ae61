//! weft: an agent started inside a network namespace of its own, and the CLI
//! commands a user types, `weft run -d` (optionally with `-p`) and `weft rm -f`.

use crate::harness::{Harness, Sample};
use crate::netns::{self, Netns};
use crate::sys::{
    self, bail, failed, remove_tree, require_exe, run_ok, timed, wait_gone, wait_until, Context,
    Daemon, ProcId, Result,
};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct WeftOpts {
    pub bin: PathBuf,
    pub bridge_subnet: String,
    pub netns_pool: u16,
    /// More arguments for `weft agent`, after the ones above.
    pub agent_args: Vec<String>,
}

/// target/release/weft of this workspace.
pub fn default_bin() -> PathBuf {
    // bench/ is a member of the workspace; its parent is the workspace root.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join("target/release/weft")
}

pub fn preflight(opts: &WeftOpts) -> Result<()> {
    let hint = "build it with `cargo build --release -p weft`, pass --weft PATH, or --skip-weft";
    require_exe(&opts.bin, hint)?;
    run_ok(
        Command::new(&opts.bin).args(["agent", "--help"]),
        Duration::from_secs(10),
    )
    .context(format_args!("{} does not run ({hint})", opts.bin.display()))?;
    Ok(())
}

pub struct WeftHarness {
    bin: PathBuf,
    /// Parent of the state and data dirs; scratch files go here too.
    dir: PathBuf,
    state_dir: PathBuf,
    data_dir: PathBuf,
    netns: Option<Netns>,
    agent: Option<Daemon>,
    /// Sandboxes attached and not yet removed, with their process if known.
    live: Vec<(String, Option<ProcId>)>,
}

/// A sandbox made by `weft run`.
pub struct WeftSandbox {
    id: String,
}

/// What `weft run -d --format json` said about the sandbox it made.
#[derive(Debug, Clone)]
pub struct WeftRun {
    pub id: String,
    /// The sandbox's first process.
    pub pid: Option<i32>,
    /// `attachment.endpoints[0].ip`, if it has an endpoint.
    pub ip: Option<Ipv4Addr>,
    /// The sandbox's namespace file, if it has one of its own.
    pub netns: Option<PathBuf>,
    /// The first endpoint's prefix length and gateway.
    pub prefix_len: Option<u8>,
    pub gateway: Option<Ipv4Addr>,
    pub network_setup_us: u64,
    /// Wall-clock time of the whole `weft run` command.
    pub wall: Duration,
}

impl WeftRun {
    /// What `weft run -d --format json` printed (`what` names the command
    /// in errors), and how long it took.
    pub fn parse(stdout: &[u8], wall: Duration, what: &str) -> Result<WeftRun> {
        let v: Value = serde_json::from_slice(stdout).context(format_args!(
            "`{what}` did not print JSON ({:?})",
            String::from_utf8_lossy(stdout)
        ))?;
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .context(format_args!("`{what}` printed no string \"id\": {v}"))?
            .to_string();
        let pid = v
            .get("pid")
            .and_then(Value::as_i64)
            .and_then(|p| i32::try_from(p).ok());
        let network_setup_us =
            v.get("network_setup_us")
                .and_then(Value::as_u64)
                .context(format_args!(
                    "`{what}` printed no unsigned integer \"network_setup_us\": {v}"
                ))?;
        let ip = v
            .pointer("/attachment/endpoints/0/ip")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        let netns = v.get("netns").and_then(Value::as_str).map(PathBuf::from);
        let prefix_len = v
            .pointer("/attachment/endpoints/0/prefix_len")
            .and_then(Value::as_u64)
            .and_then(|p| u8::try_from(p).ok());
        let gateway = v
            .pointer("/attachment/endpoints/0/gateway")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        Ok(WeftRun {
            id,
            pid,
            ip,
            netns,
            prefix_len,
            gateway,
            network_setup_us,
            wall,
        })
    }
}

/// The sandboxes `weft rm -f --format json` removed: the entry of `id`
/// (else the first), and its `network_teardown_us`.
pub fn parse_rm(stdout: &[u8], id: &str, cmd: &Command) -> Result<u64> {
    let v = parse_json(cmd, stdout)?;
    let entry = match &v {
        Value::Array(items) => items
            .iter()
            .find(|e| e.get("id").and_then(Value::as_str) == Some(id))
            .or_else(|| items.first()),
        Value::Object(_) => Some(&v),
        _ => None,
    }
    .context(format_args!("`weft rm` printed no removed sandbox: {v}"))?;
    field_u64(entry, "network_teardown_us", cmd)
}

/// Short form of a list of `-p` values for messages: the first and last few.
pub fn describe_ports(ports: &[String]) -> String {
    if ports.len() <= 6 {
        return ports.join(" ");
    }
    format!(
        "{} … {} ({} values)",
        ports[..3].join(" "),
        ports[ports.len() - 3..].join(" "),
        ports.len()
    )
}

impl WeftHarness {
    /// State in `base`/state and `base`/data (both made fresh, removed on drop).
    pub fn start(opts: &WeftOpts, base: &Path, pid: u32) -> Result<WeftHarness> {
        let state_dir = base.join("state");
        let data_dir = base.join("data");
        sys::create_fresh_dir(&state_dir)?;
        let mut h = WeftHarness {
            bin: opts.bin.clone(),
            dir: base.to_path_buf(),
            state_dir,
            data_dir,
            netns: None,
            agent: None,
            live: Vec::new(),
        };
        sys::create_fresh_dir(&h.data_dir)?;
        h.netns = Some(netns::add(&format!("wftbench-{pid}"))?);

        let mut cmd = h.ns().entered(&h.bin)?;
        cmd.arg("agent")
            .arg("--state-dir")
            .arg(&h.state_dir)
            .arg("--data-dir")
            .arg(&h.data_dir)
            .arg("--bridge-subnet")
            .arg(&opts.bridge_subnet)
            .arg("--netns-pool")
            .arg(opts.netns_pool.to_string())
            .args(&opts.agent_args);
        h.agent = Some(Daemon::spawn(
            "weft agent",
            cmd,
            &base.join("weft-agent.log"),
            Duration::from_secs(15),
        )?);

        let sock = h.state_dir.join("weft.sock");
        let mut exited = None;
        let mut last_err = String::new();
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
            if let Some(st) = h.agent.as_mut().expect("just set").exited() {
                exited = Some(st);
                return true;
            }
            if !sock.exists() {
                return false;
            }
            match h
                .cli()
                .and_then(|mut c| run_ok(c.arg("ps"), Duration::from_secs(10)))
            {
                Ok(_) => true,
                Err(e) => {
                    last_err = e.to_string();
                    false
                }
            }
        });
        let agent = h.agent.as_ref().expect("just set");
        if let Some(st) = exited {
            return bail(format!(
                "weft agent exited during start-up ({st}); its log ends with:\n{}",
                agent.log_tail(15)
            ));
        }
        if !ready {
            sys::check_interrupted()?;
            return bail(format!(
                "weft agent not ready within 30 s ({} {}; last `weft ps` error: {}); its log ends with:\n{}",
                sock.display(),
                if sock.exists() { "exists" } else { "never appeared" },
                if last_err.is_empty() { "none" } else { &last_err },
                agent.log_tail(15)
            ));
        }
        Ok(h)
    }

    fn ns(&self) -> &Netns {
        self.netns.as_ref().expect("namespace exists while running")
    }

    /// The agent's API socket (STATE_DIR/weft.sock), for clients that talk
    /// HTTP to it directly instead of through the CLI.
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("weft.sock")
    }

    /// The agent's process id, for reading its CPU time.
    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.as_ref().and_then(Daemon::pid)
    }

    /// The agent's namespace: the "host" of its sandboxes.
    pub fn netns(&self) -> &Netns {
        self.ns()
    }

    /// A weft CLI command, run inside the agent's namespace, finding the
    /// agent through WEFT_STATE_DIR.
    pub fn cli(&self) -> Result<Command> {
        let mut cmd = self.ns().entered(&self.bin)?;
        cmd.env("WEFT_STATE_DIR", &self.state_dir);
        Ok(cmd)
    }

    /// The last lines of the agent's log, for error messages.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        self.agent
            .as_ref()
            .map(|a| a.log_tail(lines))
            .unwrap_or_default()
    }

    /// What a `run -d` sandbox's command printed (STATE_DIR/logs/ID.log).
    pub fn sandbox_output(&self, id: &str) -> String {
        std::fs::read_to_string(self.state_dir.join("logs").join(format!("{id}.log")))
            .unwrap_or_default()
    }

    /// `weft run -d --format json [-p PORTS]… -- ARGV…`, timed. The sandbox
    /// is removed at teardown unless [`WeftHarness::remove_all`] removes it
    /// first.
    pub fn run_detached(&mut self, ports: &[String], argv: &[&str]) -> Result<WeftRun> {
        self.run_detached_with(&[], ports, argv)
    }

    /// [`WeftHarness::run_detached`] with more options of `weft run`
    /// before the ports, e.g. `["--net", "other"]`.
    pub fn run_detached_with(
        &mut self,
        options: &[&str],
        ports: &[String],
        argv: &[&str],
    ) -> Result<WeftRun> {
        let mut cmd = self.cli()?;
        cmd.args(["run", "-d", "--format", "json"]).args(options);
        for p in ports {
            cmd.arg("-p").arg(p);
        }
        cmd.arg("--").args(argv);
        let what = || {
            let options = if options.is_empty() {
                String::new()
            } else {
                format!("{} ", options.join(" "))
            };
            if ports.is_empty() {
                format!("weft run -d {options}-- {}", argv.join(" "))
            } else {
                format!(
                    "weft run -d {options}-p {} -- {}",
                    describe_ports(ports),
                    argv.join(" ")
                )
            }
        };
        let (wall, out) = timed(&mut cmd, None, &self.dir)?;
        if !out.status.success() {
            return bail(format!(
                "`{}` failed ({}): {}",
                what(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let r = WeftRun::parse(&out.stdout, wall, &what());
        // Recorded even when the rest of the output is bad, so cleanup
        // can find it.
        let id = match &r {
            Ok(r) => Some((r.id.clone(), r.pid)),
            Err(_) => serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(|id| (id.to_string(), None))),
        };
        if let Some((id, pid)) = id {
            self.live.push((id, pid.and_then(ProcId::of)));
        }
        r
    }

    /// `weft rm -f --format json ID`, timed: wall time of the command and
    /// the agent's `network_teardown_us`.
    pub fn remove_timed(&mut self, sandbox: &str) -> Result<Sample> {
        let mut cmd = self.cli()?;
        cmd.args(["rm", "-f", "--format", "json", sandbox]);
        let (wall, out) = timed(&mut cmd, None, &self.dir)?;
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        self.live.retain(|(id, _)| id != sandbox);
        let teardown = parse_rm(&out.stdout, sandbox, &cmd)?;
        Ok(Sample {
            wall,
            inner_us: Some(teardown),
        })
    }

    /// `weft rm -f ID…` in one command (unmeasured).
    pub fn remove_all(&mut self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = self.cli()?;
        cmd.args(["rm", "-f"]).args(ids);
        run_ok(&mut cmd, Duration::from_secs(120)).context(format_args!(
            "removing {} weft sandbox(es) with `weft rm -f`",
            ids.len()
        ))?;
        self.live.retain(|(id, _)| !ids.contains(id));
        Ok(())
    }

    fn teardown(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            if agent.exited().is_none() {
                for (id, _) in &self.live {
                    let res = self.cli().and_then(|mut c| {
                        run_ok(c.args(["rm", "-f", id]), Duration::from_secs(30))
                    });
                    if let Err(e) = res {
                        eprintln!("warning: removing weft sandbox {id}: {e}");
                    }
                }
            }
            agent.stop();
        }
        // Sandbox processes that `weft rm` did not take away.
        let procs: Vec<ProcId> = self.live.drain(..).filter_map(|(_, p)| p).collect();
        let killed: Vec<i32> = procs.iter().filter(|p| p.kill()).map(|p| p.pid).collect();
        if !killed.is_empty() {
            eprintln!(
                "warning: killed {} leftover sandbox process(es): {killed:?}",
                killed.len()
            );
        }
        wait_gone(&procs, Duration::from_secs(5));
        remove_tree(&self.state_dir);
        remove_tree(&self.data_dir);
        let _ = std::fs::remove_file(self.dir.join("weft-agent.log"));
        if let Some(mut ns) = self.netns.take() {
            if let Err(e) = ns.delete() {
                eprintln!("warning: {e}");
            }
        }
    }
}

fn parse_json(cmd: &Command, stdout: &[u8]) -> Result<Value> {
    serde_json::from_slice(stdout).context(format_args!(
        "`{}` did not print JSON ({:?})",
        sys::describe(cmd),
        String::from_utf8_lossy(stdout)
    ))
}

fn field_u64(v: &Value, key: &str, cmd: &Command) -> Result<u64> {
    v.get(key).and_then(Value::as_u64).context(format_args!(
        "`{}` printed no unsigned integer {key:?}: {v}",
        sys::describe(cmd)
    ))
}

impl Harness for WeftHarness {
    type Handle = WeftSandbox;

    /// `weft rm` unpins a sandbox's namespace and leaves deleting its veth
    /// pair to the kernel, which does it when it destroys the namespace.
    /// This measures how long after the last `rm` the last pair is gone.
    fn settle(&mut self) -> Result<Option<String>> {
        let t = std::time::Instant::now();
        let ns = self.ns().name().to_string();
        let sandbox_veth = |name: &str| {
            name.strip_prefix("wv")
                .and_then(|r| r.chars().next())
                .is_some_and(|c| c.is_ascii_hexdigit())
        };
        let gone = wait_until(Duration::from_secs(60), Duration::from_millis(5), || {
            Command::new("ip")
                .args(["-n", &ns, "-o", "link", "show"])
                .output()
                .map(|o| {
                    !String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter_map(|l| l.split(": ").nth(1))
                        .any(|n| sandbox_veth(n.split('@').next().unwrap_or("")))
                })
                .unwrap_or(false)
        });
        if !gone {
            return bail(
                "veth pairs of removed sandboxes still there 60 s after the last `weft rm`",
            );
        }
        Ok(Some(format!(
            "veth pairs gone {:.1} ms after the last rm returned (the kernel deletes them with the namespaces)",
            t.elapsed().as_secs_f64() * 1000.0
        )))
    }

    fn attach(&mut self) -> Result<(WeftSandbox, Sample)> {
        let r = self.run_detached(&[], &["sleep", "infinity"])?;
        Ok((
            WeftSandbox { id: r.id },
            Sample {
                wall: r.wall,
                inner_us: Some(r.network_setup_us),
            },
        ))
    }

    fn remove(&mut self, sb: WeftSandbox) -> Result<Sample> {
        self.remove_timed(&sb.id)
    }
}

impl Drop for WeftHarness {
    fn drop(&mut self) {
        self.teardown();
    }
}
