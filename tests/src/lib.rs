//! Test harness: throwaway "hosts" (network namespaces) with their own weft
//! agent and directories. Everything a test makes is named `wft…`, lives in
//! namespaces the test created, and is removed on drop, pass or fail.

pub mod lab;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique across parallel tests and processes.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id() & 0xfffff)
}

/// The weft binary built with this workspace (or $WEFT_BIN).
pub fn weft_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/weft
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("weft");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p weft`",
        bin.display()
    );
    bin
}

/// A network namespace made by `ip netns add`, deleted on drop.
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    pub fn new(prefix: &str) -> TestNs {
        let name = unique(prefix);
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        TestNs { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A command that runs inside this namespace (entered between fork and exec).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let file = File::open(self.path()).expect("open netns");
        let mut cmd = Command::new(program);
        // SAFETY: the hook runs in the child between fork and exec and only
        // calls setns, which is async-signal-safe, on a descriptor the
        // closure owns (closed at exec by O_CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a shell command inside this namespace; panics with its output on failure.
    pub fn sh(&self, script: &str) -> String {
        let out = self
            .command("sh")
            .args(["-c", script])
            .output()
            .expect("run sh");
        assert!(
            out.status.success(),
            "in {}: `{script}` failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell command inside this namespace and returns its output, whatever its status.
    pub fn try_sh(&self, script: &str) -> Output {
        self.command("sh")
            .args(["-c", script])
            .output()
            .expect("run sh")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a shell command in the test's own namespace (only `ip netns`/`ip link … netns` plumbing).
pub fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A simulated host: a namespace with its own weft agent and directories.
pub struct TestHost {
    pub ns: TestNs,
    pub dir: PathBuf,
    pub subnet: Option<String>,
    /// More `weft agent` arguments.
    pub agent_args: Vec<String>,
    /// More environment variables for `weft agent`.
    pub agent_env: Vec<(String, String)>,
    agent: Option<Child>,
}

impl TestHost {
    /// A host whose default network uses `subnet` (None: let the agent pick).
    pub fn new(subnet: Option<&str>) -> TestHost {
        TestHost::with_agent_args(subnet, &[])
    }

    pub fn with_agent_args(subnet: Option<&str>, args: &[&str]) -> TestHost {
        TestHost::with_agent_env(subnet, args, &[])
    }

    /// A host whose agent also gets these environment variables.
    pub fn with_agent_env(subnet: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> TestHost {
        let ns = TestNs::new("wfth");
        let dir = PathBuf::from(format!("/dev/shm/{}", ns.name));
        std::fs::create_dir_all(&dir).expect("test dir");
        let mut host = TestHost {
            ns,
            dir,
            subnet: subnet.map(String::from),
            agent_args: args.iter().map(|a| a.to_string()).collect(),
            agent_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent: None,
        };
        host.start_agent();
        host
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let mut cmd = self.ns.command(weft_bin());
        cmd.arg("agent")
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(s) = &self.subnet {
            cmd.args(["--bridge-subnet", s]);
        }
        cmd.args(&self.agent_args);
        cmd.envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        self.agent = Some(cmd.spawn().expect("start agent"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.weft(&["ps"]).status.success() {
                return;
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.agent_log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not come up:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running agent's pid.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Kills the agent with `signal` and waits for it.
    pub fn kill_agent(&mut self, signal: i32) {
        if let Some(mut child) = self.agent.take() {
            // SAFETY: kill takes integers and touches no memory; the pid is
            // our unreaped child's, so it cannot have been reused.
            unsafe { libc::kill(child.id() as i32, signal) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The weft CLI, run in this host's namespace against this host's agent.
    pub fn weft_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.ns.command(weft_bin());
        cmd.args(args).env("WEFT_STATE_DIR", self.state_dir());
        cmd
    }

    pub fn weft(&self, args: &[&str]) -> Output {
        self.weft_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run weft")
    }

    /// Runs weft and returns stdout; panics with stderr if it fails.
    pub fn weft_ok(&self, args: &[&str]) -> String {
        let out = self.weft(args);
        assert!(
            out.status.success(),
            "weft {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `weft run -d --name NAME [extra] -- CMD`; returns the sandbox as JSON.
    pub fn run_detached(&self, name: &str, extra: &[&str], cmd: &[&str]) -> serde_json::Value {
        let mut args = vec!["--format", "json", "run", "-d", "--name", name];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(cmd);
        serde_json::from_str(&self.weft_ok(&args)).expect("run -d prints JSON")
    }

    /// The first address of a sandbox.
    pub fn ip_of(&self, name: &str) -> String {
        let ps = self.ps();
        let sb = ps
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no sandbox {name}"));
        sb["attachment"]["endpoints"][0]["ip"]
            .as_str()
            .expect("an address")
            .to_string()
    }

    pub fn ps(&self) -> serde_json::Value {
        serde_json::from_str(&self.weft_ok(&["--format", "json", "ps"])).expect("ps JSON")
    }

    /// Runs a shell script inside a sandbox with `weft exec`.
    pub fn exec(&self, sandbox: &str, script: &str) -> Output {
        self.weft(&["exec", sandbox, "--", "sh", "-c", script])
    }

    /// Names of links in the host namespace.
    pub fn links(&self) -> Vec<String> {
        self.ns
            .sh("ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1")
            .lines()
            .map(String::from)
            .collect()
    }

    /// An "outside" network behind this host: a namespace joined to the host
    /// by a veth pair, the host at 203.0.113.1/24 and the outside at
    /// 203.0.113.2/24, with no route back to any sandbox.
    pub fn outside(&self) -> TestNs {
        let out = TestNs::new("wfto");
        let (hv, ov) = (unique("wfu"), unique("wfu"));
        sh(&format!(
            "ip link add {hv} netns {} type veth peer name {ov} netns {}",
            self.ns.name, out.name
        ));
        self.ns.sh(&format!(
            "ip addr add 203.0.113.1/24 dev {hv} && ip link set {hv} up"
        ));
        out.sh(&format!(
            "ip addr add 203.0.113.2/24 dev {ov} && ip link set {ov} up"
        ));
        out
    }

    /// Host ends of sandbox veths (`wv…`), leaving out the ready pool's (`wvp…`).
    pub fn sandbox_veths(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .filter(|l| l.starts_with("wv") && !l.starts_with("wvp"))
            .collect()
    }

    /// Waits up to 5 s for the sandbox veths to be exactly `want` (the kernel
    /// deletes a removed sandbox's pair when it destroys its namespace).
    pub fn wait_sandbox_veths(&self, want: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.sandbox_veths();
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox veths {now:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Files in a directory of the state dir.
    pub fn state_files(&self, sub: &str) -> Vec<String> {
        std::fs::read_dir(self.state_dir().join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if self.agent.is_none() && std::fs::metadata(self.state_dir()).is_ok() {
            // Restart to clean up through weft itself when a test left it stopped.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.start_agent()));
        }
        if let Ok(ps) = serde_json::from_slice::<serde_json::Value>(
            &self.weft(&["--format", "json", "ps"]).stdout,
        ) {
            for s in ps.as_array().into_iter().flatten() {
                if let Some(id) = s["id"].as_str() {
                    let _ = self.weft(&["rm", "-f", id]);
                }
            }
        }
        self.kill_agent(libc::SIGTERM);
        // Whatever is still mounted under the state dir (a test that failed half-way).
        let netns_dir = self.state_dir().join("netns");
        for f in std::fs::read_dir(&netns_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(f.path())
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&netns_dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stdout and stderr of an output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A simulated LAN: a bridge in a namespace of its own that hosts plug into
/// with veth pairs, as machines into a switch.
pub struct Lan {
    pub ns: TestNs,
    pub bridge: String,
}

impl Lan {
    pub fn new() -> Lan {
        let ns = TestNs::new("wftl");
        let bridge = "wftlan0".to_string();
        ns.sh(&format!(
            "ip link add {bridge} type bridge && ip link set {bridge} up"
        ));
        Lan { ns, bridge }
    }

    /// Plugs `host` in; returns the name of its interface on the LAN.
    pub fn plug(&self, host: &TestHost) -> String {
        let (hv, lv) = (unique("wfp"), unique("wfq"));
        sh(&format!(
            "ip link add {hv} netns {} type veth peer name {lv} netns {}",
            host.ns.name, self.ns.name
        ));
        self.ns.sh(&format!(
            "ip link set {lv} master {} && ip link set {lv} up",
            self.bridge
        ));
        host.ns.sh(&format!("ip link set {hv} up"));
        hv
    }

    /// Captures `count` frames matching `filter` on the LAN while `f` runs.
    pub fn capture(&self, filter: &str, count: usize, f: impl FnOnce()) -> String {
        let mut child = self
            .ns
            .command("tcpdump")
            .args([
                "-l",
                "-n",
                "-e",
                "-i",
                &self.bridge,
                "-c",
                &count.to_string(),
            ])
            .args(filter.split_whitespace())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(500));
        f();
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Lan {
    fn default() -> Self {
        Lan::new()
    }
}
