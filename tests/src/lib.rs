//! Test harness: throwaway "hosts" (network namespaces of weft-testkit)
//! with their own weft agent and directories. Everything a test makes is named `wft…`, lives in
//! namespaces the test created, and is removed on drop, pass or fail.

pub mod docker;
pub mod lab;

pub use weft_testkit::{
    eventually, host_ifname, output_within, text, unique, veth_pair, weft_bin, Netns,
};

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use weft_model::api::{NetworkView, SandboxView};

/// A simulated host: a namespace with its own weft agent and directories.
pub struct TestHost {
    pub ns: Netns,
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
        let ns = Netns::new("wfth");
        let dir = PathBuf::from(format!("/dev/shm/{}", ns.name()));
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

    /// Runs weft with `--format json` first and reads its answer as a `T`
    /// (one of weft-model's API types); panics if it fails or does not parse.
    pub fn weft_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        let out = self.weft_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "weft {args:?} printed no {}: {e}\n{out}",
                std::any::type_name::<T>()
            )
        })
    }

    /// `weft run -d --name NAME [extra] -- CMD`; returns the sandbox.
    pub fn run_detached(&self, name: &str, extra: &[&str], cmd: &[&str]) -> SandboxView {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(cmd);
        self.weft_json(&args)
    }

    /// The sandbox `name` as `weft ps` shows it.
    pub fn sandbox(&self, name: &str) -> SandboxView {
        self.ps()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no sandbox {name}"))
    }

    /// The first address of a sandbox.
    pub fn ip_of(&self, name: &str) -> String {
        self.sandbox(name)
            .attachment
            .endpoints()
            .first()
            .unwrap_or_else(|| panic!("sandbox {name} has no address"))
            .ip
            .to_string()
    }

    pub fn ps(&self) -> Vec<SandboxView> {
        self.weft_json(&["ps", "-a"])
    }

    /// `weft network ls`.
    pub fn networks(&self) -> Vec<NetworkView> {
        self.weft_json(&["network", "ls"])
    }

    /// `weft network inspect NAME`.
    pub fn network(&self, name: &str) -> NetworkView {
        let mut v: Vec<NetworkView> = self.weft_json(&["network", "inspect", name]);
        assert_eq!(v.len(), 1, "network inspect {name}: {v:?}");
        v.remove(0)
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
    pub fn outside(&self) -> Netns {
        let out = Netns::new("wfto");
        weft_testkit::outside::join(&self.ns, &unique("wftu"), &out, &unique("wftu"))
            .unwrap_or_else(|e| panic!("{e}"));
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
        if let Ok(ps) = serde_json::from_slice::<Vec<SandboxView>>(
            &self.weft(&["--format", "json", "ps", "-a"]).stdout,
        ) {
            for s in ps {
                let _ = self.weft(&["rm", "-f", &s.id]);
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

/// A simulated LAN: a bridge in a namespace of its own that hosts plug into
/// with veth pairs, as machines into a switch.
pub struct Lan {
    pub ns: Netns,
    pub bridge: String,
}

impl Lan {
    pub fn new() -> Lan {
        let ns = Netns::new("wftl");
        let bridge = "wftlan0".to_string();
        ns.sh(&format!(
            "ip link add {bridge} type bridge && ip link set {bridge} up"
        ));
        Lan { ns, bridge }
    }

    /// Plugs `host` in; returns the name of its interface on the LAN.
    pub fn plug(&self, host: &TestHost) -> String {
        let (hv, lv) = (unique("wftp"), unique("wftq"));
        veth_pair(&host.ns, &hv, None, &self.ns, &lv, None).unwrap_or_else(|e| panic!("{e}"));
        self.ns
            .sh(&format!("ip link set {lv} master {}", self.bridge));
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
