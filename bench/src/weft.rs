//! weft: an agent started inside a network namespace of its own, and the CLI
//! commands a user types, `weft run -d` and `weft rm -f`.

use crate::harness::{Harness, Sample};
use crate::netns::Netns;
use crate::sys::{
    self, bail, failed, remove_tree, require_exe, run_ok, timed, wait_gone, wait_until, Context,
    Daemon, ProcId, Result,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct WeftOpts {
    pub bin: PathBuf,
    pub bridge_subnet: String,
    pub netns_pool: u16,
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
        h.netns = Some(Netns::add(&format!("wftbench-{pid}"))?);

        let mut cmd = h.ns().command(&h.bin)?;
        cmd.arg("agent")
            .arg("--state-dir")
            .arg(&h.state_dir)
            .arg("--data-dir")
            .arg(&h.data_dir)
            .arg("--bridge-subnet")
            .arg(&opts.bridge_subnet)
            .arg("--netns-pool")
            .arg(opts.netns_pool.to_string());
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

    /// A weft CLI command, run inside the agent's namespace, finding the
    /// agent through WEFT_STATE_DIR.
    fn cli(&self) -> Result<Command> {
        let mut cmd = self.ns().command(&self.bin)?;
        cmd.env("WEFT_STATE_DIR", &self.state_dir);
        Ok(cmd)
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
        let mut cmd = self.cli()?;
        cmd.args(["run", "-d", "--format", "json", "--", "sleep", "infinity"]);
        let (wall, out) = timed(&mut cmd, None, &self.dir)?;
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        let v = parse_json(&cmd, &out.stdout)?;
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .context(format_args!("`weft run` printed no string \"id\": {v}"))?
            .to_string();
        // Known before the setup time is checked, so cleanup can find it.
        let proc = v
            .get("pid")
            .and_then(Value::as_i64)
            .and_then(|p| i32::try_from(p).ok())
            .and_then(ProcId::of);
        self.live.push((id.clone(), proc));
        let setup = field_u64(&v, "network_setup_us", &cmd)?;
        Ok((
            WeftSandbox { id },
            Sample {
                wall,
                inner_us: Some(setup),
            },
        ))
    }

    fn remove(&mut self, sb: WeftSandbox) -> Result<Sample> {
        let mut cmd = self.cli()?;
        cmd.args(["rm", "-f", "--format", "json", &sb.id]);
        let (wall, out) = timed(&mut cmd, None, &self.dir)?;
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        self.live.retain(|(id, _)| *id != sb.id);
        let v = parse_json(&cmd, &out.stdout)?;
        let entry = match &v {
            Value::Array(items) => items
                .iter()
                .find(|e| e.get("id").and_then(Value::as_str) == Some(&sb.id))
                .or_else(|| items.first()),
            Value::Object(_) => Some(&v),
            _ => None,
        }
        .context(format_args!("`weft rm` printed no removed sandbox: {v}"))?;
        let teardown = field_u64(entry, "network_teardown_us", &cmd)?;
        Ok(Sample {
            wall,
            inner_us: Some(teardown),
        })
    }
}

impl Drop for WeftHarness {
    fn drop(&mut self) {
        self.teardown();
    }
}
