//! A dockerd of a test's own (Debian's docker.io) in a simulated host's
//! network namespace, with weft's plugin as its network and IPAM driver.
//!
//! How dockerd is kept off the machine:
//! - it runs in a simulated host's network namespace (as the agent does), with
//!   --bridge=none, --iptables=false, --ip-forward=false and --ip-masq=false,
//!   so it makes no bridge, rule or sysctl of its own;
//! - its data root, exec root (containerd's state, the containers' namespace
//!   files), pid file, API socket, key file (daemon.json) and client config
//!   are in the test's directory, its containers' cgroups under a parent of
//!   the test's own, removed at the end;
//! - it runs in a mount namespace of its own with a private tmpfs on /run:
//!   dockerd finds plugins only in /run/docker/plugins (and in /etc/docker
//!   and /usr/lib/docker for spec files), a machine-wide directory, and it
//!   and containerd make /run/docker and /run/containerd whatever their
//!   roots. There a link `weft.sock` leads to the agent's plugin socket, so
//!   the driver is `weft` as in production, and nothing is made in the
//!   machine's /run. Its mounts (the containers' root file systems, /dev/shm,
//!   namespace files) live only in that namespace, which goes with its last
//!   process;
//! - the image is `docker import`ed from Debian's busybox-static; nothing is
//!   pulled.

use crate::{output_within, text, unique};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DOCKER: &str = "/usr/bin/docker";
pub const IMAGE: &str = "wftbusybox:test";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Busybox applets linked in the image.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "mkdir", "sleep", "httpd", "wget", "nslookup", "ip", "ping", "hostname",
    "timeout", "true",
];
/// Made by dockerd and containerd at fixed places; here only in their own /run.
const FIXED_DIRS: &[&str] = &["/run/docker", "/run/containerd"];

/// The mount namespace of the process at `proc` (/proc/PID), as `mnt:[INODE]`.
fn mount_ns(proc: &str) -> Option<String> {
    std::fs::read_link(format!("{proc}/ns/mnt"))
        .ok()
        .map(|p| p.display().to_string())
}

/// A directory and all directories under it, parents before children.
fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let subs: Vec<PathBuf> = std::fs::read_dir(&out[i])
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.path())
            .collect();
        out.extend(subs);
        i += 1;
    }
    out
}

/// A dockerd of the test's own in a simulated host's network namespace. Drop
/// stops it and removes everything it made, pass or fail; it must go
/// before the host (whose agent answers Docker's Leave and
/// DeleteEndpoint), so declare it after the host.
pub struct Dockerd {
    /// The host's network namespace.
    netns: PathBuf,
    pub dir: PathBuf,
    /// What /run/docker/plugins/weft.sock leads to inside dockerd's mount namespace.
    plugin_socket: PathBuf,
    /// The cgroup parent (a directory in every hierarchy) of the containers.
    cgroup: String,
    child: Option<Child>,
    /// dockerd's mount namespaces (one per start), for the leftover check.
    mount_namespaces: Vec<String>,
    /// FIXED_DIRS that existed before the test.
    fixed_before: Vec<bool>,
}

impl Dockerd {
    pub fn new(netns: &Path, plugin_socket: &Path) -> Dockerd {
        for tool in [
            "/usr/sbin/dockerd",
            DOCKER,
            "/usr/bin/containerd",
            "/usr/bin/containerd-shim-runc-v2",
            "/usr/sbin/runc",
            "/bin/busybox",
            "/usr/bin/unshare",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run scripts/install-deps.sh (docker.io, busybox-static)"
            );
        }
        let name = unique("wftk");
        let d = Dockerd {
            netns: netns.to_path_buf(),
            dir: PathBuf::from(format!("/dev/shm/{name}")),
            plugin_socket: plugin_socket.to_path_buf(),
            cgroup: format!("{name}cg"),
            child: None,
            mount_namespaces: Vec::new(),
            fixed_before: FIXED_DIRS.iter().map(|d| Path::new(d).exists()).collect(),
        };
        std::fs::create_dir_all(d.dir.join("cli")).expect("docker test dir");
        // Without a key path of its own dockerd writes /etc/docker/key.json.
        let config = serde_json::json!({ "deprecated-key-path": d.dir.join("key.json") });
        std::fs::write(d.dir.join("daemon.json"), config.to_string()).unwrap();
        d
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Starts dockerd and waits until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "dockerd already running");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .expect("dockerd log");
        // nsenter, unshare and sh exec, so the child is dockerd itself.
        let script = "mount -t tmpfs -o mode=0755 wftrun /run \
            && mkdir -p /run/docker/plugins \
            && ln -s \"$0\" /run/docker/plugins/weft.sock \
            && exec dockerd \"$@\"";
        let d = &self.dir;
        let mut cmd = weft_testkit::command_in(&self.netns, "/usr/bin/unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ])
        .arg(&self.plugin_socket)
        .arg("--data-root")
        .arg(d.join("data"))
        .arg("--exec-root")
        .arg(d.join("exec"))
        .arg("--pidfile")
        .arg(d.join("dockerd.pid"))
        .arg("-H")
        .arg(format!("unix://{}", self.sock().display()))
        .arg("--config-file")
        .arg(d.join("daemon.json"))
        .args([
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--storage-driver=vfs",
            "--exec-opt=native.cgroupdriver=cgroupfs",
        ])
        .arg(format!("--cgroup-parent=/{}", self.cgroup))
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        let child = cmd.spawn().expect("start dockerd");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.sock().exists() && self.docker(&["version"]).status.success() {
                // Only now: until unshare has run, the child is in the test's
                // own mount namespace, and every process there would look like
                // one of dockerd's.
                let ns = mount_ns(&format!("/proc/{pid}"));
                assert!(
                    ns.is_some() && ns != mount_ns("/proc/self"),
                    "dockerd has no mount namespace of its own"
                );
                let ns = ns.expect("checked");
                if !self.mount_namespaces.contains(&ns) {
                    self.mount_namespaces.push(ns);
                }
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("dockerd exited with {st}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops dockerd as a service manager would (SIGTERM): it stops the
    /// containers (Docker's Leave and DeleteEndpoint for each) and its containerd.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill takes integers and touches no memory; the pid is our
        // unreaped child's, so it cannot have been reused.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dockerd did not stop within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env("DOCKER_HOST", format!("unix://{}", self.sock().display()))
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .args(args);
        cmd
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        output_within(self.cmd(args), Duration::from_secs(60))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}\ndockerd log ends with:\n{}",
            text(&out),
            self.log_tail(20)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `ok` of a command line split at spaces.
    pub fn run(&self, line: &str) -> String {
        self.ok(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// `fails` of a command line split at spaces.
    pub fn refuses(&self, line: &str) -> String {
        self.fails(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// A command that must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(!out.status.success(), "docker {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// An image of busybox-static and its applets: `docker import` of a tarball.
    pub fn import_image(&self) {
        let root = self.dir.join("img");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        for d in ["etc", "tmp", "proc", "sys", "dev", "www"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        let tar = self.dir.join("img.tar");
        let out = output_within(
            {
                let mut c = Command::new("tar");
                c.args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
                    .arg(&root)
                    .arg("-cf")
                    .arg(&tar)
                    .arg(".");
                c
            },
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "tar: {}", text(&out));
        self.ok(&[
            "import",
            "--change",
            r#"CMD ["sh"]"#,
            &tar.display().to_string(),
            IMAGE,
        ]);
        let _ = std::fs::remove_file(tar);
    }

    /// `docker run -d` of a container serving "hello from NAME" on port 80.
    pub fn run_server(&self, name: &str, extra: &[&str]) -> String {
        let env = format!("NAME={name}");
        let mut args = vec!["run", "-d", "--name", name, "-e", &env];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            IMAGE,
            "sh",
            "-c",
            "echo hello from $NAME > /www/index.html && exec httpd -f -p 80 -h /www",
        ]);
        self.ok(&args)
    }

    pub fn exec(&self, name: &str, script: &str) -> Output {
        self.docker(&["exec", name, "sh", "-c", script])
    }

    pub fn exec_ok(&self, name: &str, script: &str) -> String {
        let out = self.exec(name, script);
        assert!(
            out.status.success(),
            "in {name}: `{script}`: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What `docker inspect -f FORMAT` says.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["inspect", "-f", format, name])
    }

    /// A container's address and endpoint id on a Docker network.
    pub fn endpoint(&self, container: &str, network: &str) -> (String, String) {
        let v = self.inspect(
            container,
            &format!(
                "{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{.IPAddress}}}} {{{{.EndpointID}}}}{{{{end}}}}"
            ),
        );
        let (ip, id) = v
            .split_once(' ')
            .unwrap_or_else(|| panic!("{container} is not on {network}: {v:?}"));
        (ip.to_string(), id.to_string())
    }

    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        std::iter::once(root.join(&self.cgroup))
            .chain(
                std::fs::read_dir(root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|h| h.path().join(&self.cgroup)),
            )
            .filter(|d| d.is_dir())
            .collect()
    }

    /// Processes of this dockerd: in its containers' cgroups, in its mount
    /// namespaces (dockerd, containerd, the shims), or with a path in its
    /// directory as an argument.
    pub fn processes(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for d in self.cgroup_dirs() {
            for f in walk_dirs(&d) {
                let tasks = std::fs::read_to_string(f.join("cgroup.procs")).unwrap_or_default();
                pids.extend(tasks.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        let me = self.dir.display().to_string();
        let own_ns = mount_ns("/proc/self");
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let mnt = mount_ns(&e.path().display().to_string());
            // Never the test's own namespace, whatever was recorded.
            let in_dockerds = mnt
                .as_ref()
                .is_some_and(|m| Some(m) != own_ns.as_ref() && self.mount_namespaces.contains(m));
            // An argument that is a path of ours (`--data-root DIR/data`,
            // `--root=DIR/…`), not one that merely names our API socket
            // (the agent's `--docker-host unix://DIR/docker.sock`).
            let ours = cmdline.split(|b| *b == 0).any(|arg| {
                let arg = String::from_utf8_lossy(arg);
                arg.starts_with(&me) || arg.contains(&format!("={me}"))
            });
            if ours || in_dockerds {
                pids.push(pid);
            }
        }
        let own = std::process::id() as i32;
        pids.retain(|&p| p != own);
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Mount points under this dockerd's directory that the test's own
    /// mount namespace sees (there should be none: they are dockerd's).
    pub fn mounts(&self) -> Vec<String> {
        let me = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(&me))
            .collect()
    }

    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .processes()
            .iter()
            .map(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                format!(
                    "process {p}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                )
            })
            .collect();
        left.extend(self.mounts().into_iter().map(|m| format!("mount {m}")));
        for (d, before) in FIXED_DIRS.iter().zip(&self.fixed_before) {
            if !before && Path::new(d).exists() {
                left.push(format!("directory {d}"));
            }
        }
        left
    }

    /// Stops everything; returns what had to be removed by force (beyond
    /// the cgroup directories, which Docker keeps).
    pub fn clean(&mut self) -> Vec<String> {
        if self.child.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let ids = self.docker(&["ps", "-aq"]);
                let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
                    .split_whitespace()
                    .map(String::from)
                    .collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids.iter().map(String::as_str));
                    self.docker(&args);
                }
                self.stop();
            }));
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let forced = self.leftovers();
        for pid in self.processes() {
            // SAFETY: kill takes integers and touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for m in self.mounts().iter().rev() {
            let _ = Command::new("umount")
                .args(["-l", m])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left = false;
            for d in self.cgroup_dirs() {
                for sub in walk_dirs(&d).iter().rev() {
                    let _ = std::fs::remove_dir(sub);
                }
                left |= d.exists();
            }
            if !left || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut forced = forced;
        forced.extend(
            self.cgroup_dirs()
                .iter()
                .map(|d| format!("cgroup {} could not be removed", d.display())),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
        forced
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = self.clean();
    }
}
