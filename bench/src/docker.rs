//! Docker's default bridge: a private dockerd (with the containerd it starts
//! itself) inside a network namespace of its own, and `docker run -d` /
//! `docker rm -f` of tiny images made with `docker import` (a one-binary
//! busybox image, or any file tree, see [`DockerHarness::import_tree`]).

use crate::harness::{Harness, Sample};
use crate::netns::{self, Netns};
use crate::sys::{
    self, bail, failed, remove_cgroup, remove_tree, require_exe, run, run_ok, timed, wait_gone,
    wait_until, Context, CreatedDirs, Daemon, ProcId, Result,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct DockerOpts {
    pub dockerd: PathBuf,
    /// The client; Debian's /usr/bin/docker matches Debian's dockerd.
    pub docker: PathBuf,
    /// Static busybox for the `sleep infinity` image imported at start;
    /// none: no image is imported at start (import your own).
    pub busybox: Option<PathBuf>,
    pub storage_driver: String,
}

const IMAGE: &str = "wftbench-busybox:latest";
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Directories dockerd and containerd create at fixed places whatever
/// --exec-root says; removed at the end if they were not there before.
const FIXED_DIRS: &[&str] = &[
    "/run/docker",
    "/run/docker/plugins",
    "/run/containerd",
    "/run/containerd/s",
    "/run/containerd/runc",
];

pub fn preflight(opts: &DockerOpts) -> Result<()> {
    let hint = "install Debian's docker.io (it pulls in containerd and runc) or pass --skip-docker";
    require_exe(&opts.dockerd, hint)?;
    require_exe(&opts.docker, hint)?;
    for tool in [
        "/usr/bin/containerd",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
    ] {
        require_exe(Path::new(tool), hint)?;
    }
    if let Some(busybox) = &opts.busybox {
        require_exe(
            busybox,
            "install Debian's busybox-static or pass --busybox (or --skip-docker)",
        )?;
    }
    let out = run(
        Command::new("tar").arg("--version"),
        Duration::from_secs(10),
    )
    .context("tar is needed to build the image")?;
    if !out.status.success() {
        return bail("`tar --version` failed; tar is needed to build the image");
    }
    Ok(())
}

pub struct DockerHarness {
    dir: PathBuf,
    docker: PathBuf,
    cgroup_parent: String,
    netns: Option<Netns>,
    daemon: Option<Daemon>,
    created: CreatedDirs,
    live: Vec<String>,
    /// Settings that were actually used, and fallbacks taken.
    pub notes: Vec<String>,
}

impl DockerHarness {
    /// `dir` is this harness's own directory (made fresh, removed on drop).
    pub fn start(opts: &DockerOpts, dir: &Path, pid: u32) -> Result<DockerHarness> {
        sys::create_fresh_dir(dir)?;
        let mut h = DockerHarness {
            dir: dir.to_path_buf(),
            docker: opts.docker.clone(),
            cgroup_parent: format!("wftbench-{pid}"),
            netns: None,
            daemon: None,
            created: CreatedDirs::record(FIXED_DIRS),
            live: Vec::new(),
            notes: Vec::new(),
        };
        // Without a key path of ours dockerd writes /etc/docker/key.json.
        let config = serde_json::json!({ "deprecated-key-path": dir.join("key.json") });
        fs::write(dir.join("daemon.json"), config.to_string()).context("writing daemon.json")?;
        fs::create_dir(dir.join("cli")).context("creating the docker client config dir")?;
        h.netns = Some(netns::add(&format!("wftbdock-{pid}"))?);

        let mut driver = opts.storage_driver.clone();
        let mut iptables = true;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match h.start_daemon(opts, &driver, iptables) {
                Ok(()) => break,
                Err(e) => {
                    let daemon = h.daemon.as_ref();
                    let says = |s: &str| daemon.is_some_and(|d| d.log_error_mentions(s));
                    let iptables_trouble = iptables && says("iptables");
                    let driver_trouble = driver != "vfs"
                        && (says("storage-driver")
                            || says("storage driver")
                            || says("graphdriver")
                            || says("driver not supported")
                            || says(&driver));
                    h.stop_daemon();
                    remove_tree(&dir.join("data"));
                    remove_tree(&dir.join("exec"));
                    if attempt >= 3 || !(iptables_trouble || driver_trouble) {
                        return Err(e);
                    }
                    if iptables_trouble {
                        eprintln!("  docker: dockerd failed with iptables; retrying with --iptables=false");
                        h.notes.push("dockerd failed with iptables and was restarted with --iptables=false (no masquerade/filter rules)".into());
                        iptables = false;
                    } else {
                        eprintln!("  docker: storage driver {driver} failed; retrying with vfs");
                        h.notes
                            .push(format!("storage driver {driver} failed; fell back to vfs"));
                        driver = "vfs".into();
                    }
                }
            }
        }
        h.notes.push(format!(
            "dockerd {}, storage driver {driver}, iptables {}",
            h.server_version().unwrap_or_else(|_| "?".into()),
            if iptables { "on" } else { "off" }
        ));
        if let Some(busybox) = &opts.busybox {
            h.import_busybox(busybox)?;
        }
        Ok(h)
    }

    fn start_daemon(&mut self, opts: &DockerOpts, driver: &str, iptables: bool) -> Result<()> {
        let d = &self.dir;
        let mut cmd = self
            .netns
            .as_ref()
            .expect("namespace made before the daemon")
            .entered(&opts.dockerd)?;
        cmd.env_clear()
            .env("PATH", PATH)
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--storage-driver")
            .arg(driver)
            // Container cgroups under a name of ours, removed at the end.
            .arg("--cgroup-parent")
            .arg(format!("/{}", self.cgroup_parent));
        if !iptables {
            cmd.arg("--iptables=false");
        }
        self.daemon = Some(Daemon::spawn(
            "dockerd",
            cmd,
            &d.join("dockerd.log"),
            Duration::from_secs(30),
        )?);
        let sock = d.join("docker.sock");
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(90), Duration::from_millis(100), || {
            let daemon = self.daemon.as_mut().expect("just set");
            if let Some(st) = daemon.exited() {
                exited = Some(st);
                return true;
            }
            sock.exists() && self.server_version().is_ok()
        });
        let daemon = self.daemon.as_ref().expect("just set");
        if let Some(st) = exited {
            return bail(format!(
                "dockerd exited during start-up ({st}); its log ends with:\n{}",
                daemon.log_tail(15)
            ));
        }
        if !ready {
            sys::check_interrupted()?;
            return bail(format!(
                "dockerd did not answer within 90 s; its log ends with:\n{}",
                daemon.log_tail(15)
            ));
        }
        Ok(())
    }

    /// dockerd's namespace: the "host" of its containers.
    pub fn netns(&self) -> &Netns {
        self.netns.as_ref().expect("namespace exists while running")
    }

    /// A docker client command talking to our private dockerd. The client
    /// itself needs no namespace: it only uses the unix socket.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.docker);
        cmd.env(
            "DOCKER_HOST",
            format!("unix://{}", self.dir.join("docker.sock").display()),
        )
        .env("DOCKER_CONFIG", self.dir.join("cli"))
        .env_remove("DOCKER_CONTEXT")
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH");
        cmd
    }

    fn server_version(&self) -> Result<String> {
        let out = run_ok(
            self.cli()
                .args(["version", "--format", "{{.Server.Version}}"]),
            Duration::from_secs(10),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// An image holding only /bin/busybox and /bin/sleep -> busybox.
    fn import_busybox(&self, busybox: &Path) -> Result<()> {
        let root = self.dir.join("img");
        let bin = root.join("bin");
        fs::create_dir_all(&bin).context(format_args!("creating {}", bin.display()))?;
        fs::copy(busybox, bin.join("busybox"))
            .context(format_args!("copying {}", busybox.display()))?;
        std::os::unix::fs::symlink("busybox", bin.join("sleep")).context("making bin/sleep")?;
        self.import_tree(&root, IMAGE, &["/bin/sleep", "infinity"])
            .context("importing the busybox image")
    }

    /// Makes image `name` from everything below `root` (owned by root in
    /// the image), with `cmd` as its CMD: `tar` then `docker import`.
    pub fn import_tree(&self, root: &Path, name: &str, cmd: &[&str]) -> Result<()> {
        let tar = self.dir.join(format!(
            "{}.tar",
            name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        run_ok(
            Command::new("tar")
                .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
                .arg(root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            Duration::from_secs(60),
        )
        .context(format_args!("building the tarball of image {name}"))?;
        let change = format!(
            "CMD {}",
            serde_json::to_string(cmd).expect("strings serialise")
        );
        run_ok(
            self.cli()
                .args(["import", "--change", &change])
                .arg(&tar)
                .arg(name),
            Duration::from_secs(120),
        )
        .context(format_args!("importing image {name}"))?;
        let _ = fs::remove_file(&tar);
        Ok(())
    }

    /// `docker run -d --pull never ARGS…` (unmeasured); the container is
    /// removed at teardown. Returns its id.
    pub fn run_container(&mut self, args: &[&str]) -> Result<String> {
        let mut cmd = self.cli();
        cmd.args(["run", "-d", "--pull", "never"]).args(args);
        let out = run(&mut cmd, Duration::from_secs(120))?;
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bail(format!(
                "`{}` printed {id:?}, not a container id",
                sys::describe(&cmd)
            ));
        }
        self.live.push(id.clone());
        Ok(id)
    }

    /// `docker inspect -f FORMAT ID`, trimmed.
    pub fn inspect(&self, id: &str, format: &str) -> Result<String> {
        let out = run_ok(
            self.cli().args(["inspect", "-f", format, id]),
            Duration::from_secs(30),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// What a container printed (`docker logs`), for error messages.
    pub fn container_logs(&self, id: &str) -> String {
        match run(self.cli().args(["logs", id]), Duration::from_secs(30)) {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_string(),
            Err(e) => format!("(docker logs failed: {e})"),
        }
    }

    fn stop_daemon(&mut self) {
        let Some(mut daemon) = self.daemon.take() else {
            return;
        };
        // Remove whatever containers exist, so dockerd has nothing to stop.
        if daemon.exited().is_none() {
            let mut ids = self.live.clone();
            if let Ok(out) = run(
                self.cli().args(["ps", "-aq", "--no-trunc"]),
                Duration::from_secs(60),
            ) {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if !ids.iter().any(|x| x == id) {
                        ids.push(id.to_string());
                    }
                }
            }
            for chunk in ids.chunks(50) {
                let mut cmd = self.cli();
                cmd.args(["rm", "-f"]).args(chunk);
                match run(&mut cmd, Duration::from_secs(300)) {
                    Ok(out) if !out.status.success() => {
                        eprintln!("warning: {}", failed(&cmd, &out))
                    }
                    Err(e) => eprintln!("warning: {e}"),
                    Ok(_) => {}
                }
            }
        }
        self.live.clear();
        // Processes that outlive dockerd if it has to be killed: its
        // containerd, the shims and the containers' first processes.
        let leftovers = self.runtime_processes();
        daemon.stop();
        let killed: Vec<i32> = leftovers
            .iter()
            .filter(|p| p.kill())
            .map(|p| p.pid)
            .collect();
        if !killed.is_empty() {
            eprintln!(
                "warning: killed {} leftover docker runtime process(es): {killed:?}",
                killed.len()
            );
        }
        wait_gone(&leftovers, Duration::from_secs(5));
    }

    /// containerd, the shims and the containers' first processes, found
    /// through the pid files in our exec root and the shims' working
    /// directories (their bundles, also in our exec root).
    fn runtime_processes(&self) -> Vec<ProcId> {
        let exec = self.dir.join("exec").join("containerd");
        let mut pids = Vec::new();
        let read_pid = |f: &Path| {
            fs::read_to_string(f)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        };
        pids.extend(read_pid(&exec.join("containerd.pid")));
        let tasks = exec.join("daemon/io.containerd.runtime.v2.task/moby");
        if let Ok(rd) = fs::read_dir(tasks) {
            for e in rd.flatten() {
                if let Some(init) = read_pid(&e.path().join("init.pid")) {
                    pids.push(init);
                    // The shim is the container's parent.
                    pids.extend(sys::parent_pid(init).filter(|&p| p > 1));
                }
            }
        }
        let mut procs: Vec<ProcId> = pids.into_iter().filter_map(ProcId::of).collect();
        for p in sys::processes_with_cwd_under(&self.dir) {
            if !procs.contains(&p) {
                procs.push(p);
            }
        }
        procs
    }

    /// Shim sockets that SIGKILLed shims leave in /run/containerd/s, when
    /// that directory is one this run created.
    fn remove_shim_sockets(&self) {
        use std::os::unix::fs::FileTypeExt;
        if !self.created.was_absent(Path::new("/run/containerd")) {
            return;
        }
        if let Ok(rd) = fs::read_dir("/run/containerd/s") {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_socket()).unwrap_or(false) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Harness for DockerHarness {
    type Handle = String;

    fn attach(&mut self) -> Result<(String, Sample)> {
        let mut cmd = self.cli();
        cmd.args(["run", "-d", "--pull", "never", IMAGE]);
        let (wall, out) = timed(&mut cmd, None, &self.dir)?;
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bail(format!(
                "`docker run -d` printed {id:?}, not a container id"
            ));
        }
        self.live.push(id.clone());
        Ok((
            id,
            Sample {
                wall,
                inner_us: None,
            },
        ))
    }

    fn remove(&mut self, id: String) -> Result<Sample> {
        let mut cmd = self.cli();
        cmd.args(["rm", "-f", &id]);
        let (wall, out) = timed(&mut cmd, None, &self.dir)?;
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        self.live.retain(|x| *x != id);
        Ok(Sample {
            wall,
            inner_us: None,
        })
    }
}

impl Drop for DockerHarness {
    fn drop(&mut self) {
        self.stop_daemon();
        remove_cgroup(&self.cgroup_parent);
        remove_tree(&self.dir);
        self.remove_shim_sockets();
        self.created.remove();
        if let Some(mut ns) = self.netns.take() {
            if let Err(e) = ns.delete() {
                eprintln!("warning: {e}");
            }
        }
    }
}
