//! Debian's docker.io (dockerd 20.10) with weft as its network and IPAM
//! driver: a Docker network on a weft network, two containers that reach
//! each other by address and by name, a published port reached from the
//! host and from outside, connect and disconnect (with weft's IPAM, next to
//! a sandbox of weft's own), and all of it again after the agent and then
//! dockerd restart. At the end nothing of Docker's or weft's is left.
//!
//! How dockerd is kept off the machine:
//! - it runs in the TestHost's network namespace (as the agent does), with
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
//!
//! Found on the way: Docker's embedded resolver (127.0.0.11) answers for
//! containers on a remote driver's network too, so names work without
//! weft's resolver; `--dns <gateway>` makes it forward other names to weft's,
//! which knows weft's sandboxes. `docker port` and `docker ps` show no ports
//! for a remote driver (dockerd reads them only from its own drivers' data),
//! so the test reads the published ports from weft and nft.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use weft_e2e::{eventually, output_within, text, unique, Netns, TestHost};
use weft_testkit::ScratchDir;

const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "wftbusybox:test";
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

/// A dockerd of the test's own in a TestHost's network namespace. Drop
/// stops it and removes everything it made, pass or fail; it must go
/// before the TestHost (whose agent answers Docker's Leave and
/// DeleteEndpoint), so declare it after the host.
struct Dockerd {
    /// The TestHost's network namespace.
    netns: PathBuf,
    dir: PathBuf,
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
    fn new(host: &TestHost, plugin_socket: &Path) -> Dockerd {
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
            netns: host.ns.path(),
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

    fn sock(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Starts dockerd and waits until it answers.
    fn start(&mut self) {
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
    fn stop(&mut self) {
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

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env("DOCKER_HOST", format!("unix://{}", self.sock().display()))
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .args(args);
        cmd
    }

    fn docker(&self, args: &[&str]) -> Output {
        output_within(self.cmd(args), Duration::from_secs(60))
    }

    fn ok(&self, args: &[&str]) -> String {
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
    fn run(&self, line: &str) -> String {
        self.ok(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// `fails` of a command line split at spaces.
    fn refuses(&self, line: &str) -> String {
        self.fails(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// A command that must fail; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(!out.status.success(), "docker {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// An image of busybox-static and its applets: `docker import` of a tarball.
    fn import_image(&self) {
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
    fn run_server(&self, name: &str, extra: &[&str]) -> String {
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

    fn exec(&self, name: &str, script: &str) -> Output {
        self.docker(&["exec", name, "sh", "-c", script])
    }

    fn exec_ok(&self, name: &str, script: &str) -> String {
        let out = self.exec(name, script);
        assert!(
            out.status.success(),
            "in {name}: `{script}`: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What `docker inspect -f FORMAT` says.
    fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["inspect", "-f", format, name])
    }

    /// A container's address and endpoint id on a Docker network.
    fn endpoint(&self, container: &str, network: &str) -> (String, String) {
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

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
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
    /// namespaces (dockerd, containerd, the shims), or with its directory on
    /// the command line.
    fn processes(&self) -> Vec<i32> {
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
            if String::from_utf8_lossy(&cmdline).contains(&me) || in_dockerds {
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
    fn mounts(&self) -> Vec<String> {
        let me = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(&me))
            .collect()
    }

    fn leftovers(&self) -> Vec<String> {
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
    fn clean(&mut self) -> Vec<String> {
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

/// weft's Docker endpoints: (endpoint id, address).
fn docker_endpoints(h: &TestHost) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = h
        .ps()
        .iter()
        .filter(|s| s.command.first().is_some_and(|c| c == "docker"))
        .map(|s| {
            (
                s.command.get(1).cloned().unwrap_or_default(),
                s.attachment
                    .endpoints()
                    .first()
                    .map(|e| e.ip.to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

/// An HTTP GET with busybox from a namespace; the body, or "" on failure.
fn get_from(ns: &Netns, url: &str) -> String {
    let out = ns.try_sh(&format!("timeout 5 busybox wget -q -O - {url}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An HTTP GET from inside a container (`timeout`: busybox 1.35's `wget -T` segfaults).
fn get_in(d: &Dockerd, container: &str, target: &str) -> String {
    let out = d.exec(
        container,
        &format!("timeout 5 wget -q -O - http://{target}/"),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
        + &if out.status.success() {
            String::new()
        } else {
            format!(" [{}]", text(&out))
        }
}

fn ping_ok(d: &Dockerd, from: &str, target: &str) {
    d.exec_ok(from, &format!("ping -c 1 -W 2 {target}"));
}

fn published(h: &TestHost) -> String {
    h.ns.sh("nft list map inet weft port_any")
}

/// The reach of one network: by address, by name both ways, the web page,
/// and the published port from the host and from outside.
fn check_reach(d: &Dockerd, h: &TestHost, outside: &Netns, web_ip: &str) {
    ping_ok(d, "client", web_ip);
    ping_ok(d, "client", "web");
    ping_ok(d, "web", "client");
    assert_eq!(get_in(d, "client", "web"), "hello from web");
    eventually(
        "published port from the host",
        Duration::from_secs(10),
        || match get_from(&h.ns, "http://203.0.113.1:18080/").as_str() {
            "hello from web" => Ok(()),
            got => Err(format!("{got:?}; {}", published(h))),
        },
    );
    assert_eq!(
        get_from(&h.ns, "http://127.0.0.1:18080/"),
        "hello from web",
        "published port on the host's loopback"
    );
    assert_eq!(
        get_from(outside, "http://203.0.113.1:18080/"),
        "hello from web",
        "published port from outside"
    );
}

#[test]
fn docker_containers_on_a_weft_network() {
    // Declared first, so that it goes last.
    let scratch = ScratchDir::new("wftd");
    let plugin = scratch.path().join("weft.sock");
    let mut h = TestHost::with_agent_args(
        Some("10.191.0.0/16"),
        &["--docker-plugin-socket", &plugin.display().to_string()],
    );
    let outside = h.outside();
    // A weft network made beforehand, with a sandbox of weft's own on it.
    h.weft_ok(&["network", "create", "--subnet", "10.193.0.0/24", "wpre"]);
    let www = scratch.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from wapi\n").unwrap();
    h.run_detached(
        "wapi",
        &["--net", "wpre"],
        &[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            &www.display().to_string(),
        ],
    );
    let wapi_ip = h.ip_of("wapi");

    let mut d = Dockerd::new(&h, &plugin);
    d.start();
    d.import_image();

    // Errors come back with weft's words: the IPAM driver's under `Error`,
    // the network driver's under `Err`.
    let e = d.refuses("network create -d weft --ipam-driver weft --ipv6 bad6");
    assert!(e.contains("weft networks are IPv4 only"), "{e}");
    let e = d.refuses("network create -d weft -o weft.network=wpre --subnet 10.194.0.0/24 badsub");
    assert!(
        e.contains("weft network wpre has subnet 10.193.0.0/24"),
        "{e}"
    );

    // A Docker network that makes its weft network (Docker's own IPAM) …
    d.run("network create -d weft -o weft.network=wnet --subnet 10.192.0.0/24 dnet");
    let wnet = h.network("wnet");
    assert_eq!(wnet.subnet.to_string(), "10.192.0.0/24", "{wnet:?}");
    assert_eq!(wnet.gateway.to_string(), "10.192.0.1", "{wnet:?}");
    assert_eq!(
        wnet.labels.get("com.docker.network.id").map(String::as_str),
        Some(d.inspect("dnet", "{{.Id}}").as_str())
    );
    // … and one on the weft network that exists, with weft's IPAM.
    d.run("network create -d weft --ipam-driver weft --subnet 10.193.0.0/24 -o weft.network=wpre dpre");

    d.run_server(
        "web",
        &["--network", "dnet", "-p", "18080:80", "--restart", "always"],
    );
    d.run_server("client", &["--network", "dnet"]);
    let (web_ip, web_ep) = d.endpoint("web", "dnet");
    let (client_ip, client_ep) = d.endpoint("client", "dnet");
    for ip in [&web_ip, &client_ip] {
        assert!(ip.starts_with("10.192.0."), "{ip}");
    }
    // Docker's view and weft's agree: one weft sandbox record per endpoint.
    assert_eq!(
        docker_endpoints(&h),
        sorted(vec![
            (web_ep.clone(), web_ip.clone()),
            (client_ep.clone(), client_ip.clone())
        ]),
        "weft ps: {:?}",
        h.ps()
    );
    // Docker's embedded resolver answers for the containers' names.
    let resolv = d.exec_ok("client", "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    let route = d.exec_ok("client", "ip -4 route");
    assert!(route.contains("default via 10.192.0.1"), "{route}");
    let mac = d.exec_ok("client", "cat /sys/class/net/eth0/address");
    let o: Vec<u8> = client_ip.split('.').map(|b| b.parse().unwrap()).collect();
    assert_eq!(
        mac.trim(),
        format!("02:77:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]),
        "the MAC follows the address, as for weft's sandboxes"
    );
    check_reach(&d, &h, &outside, &web_ip);
    assert!(published(&h).contains(&format!("tcp . 18080 : {web_ip} . 80")));

    // `-p 80`: weft picks the host port, from Docker's ephemeral range.
    d.run_server("eph", &["--network", "dnet", "-p", "80"]);
    let (_, eph_ep) = d.endpoint("eph", "dnet");
    let port = h.weft_ok(&["port", &format!("docker-{}", &eph_ep[..12])]);
    // 80/tcp -> 0.0.0.0:PORT (ADDRESS:80)
    let host_port: u16 = port
        .split("0.0.0.0:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("weft port: {port:?}"));
    assert!((49153..=60999).contains(&host_port), "{port}");
    eventually(
        "the chosen host port",
        Duration::from_secs(10),
        || match get_from(&h.ns, &format!("http://203.0.113.1:{host_port}/")).as_str() {
            "hello from eph" => Ok(()),
            got => Err(got.to_string()),
        },
    );
    d.ok(&["rm", "-f", "eph"]);
    assert!(!published(&h).contains(&host_port.to_string()));

    // Connect to the network weft's sandbox is on: weft's IPAM gives an
    // address next to wapi's, never wapi's.
    d.ok(&["network", "connect", "dpre", "client"]);
    let (pre_ip, pre_ep) = d.endpoint("client", "dpre");
    assert!(
        pre_ip.starts_with("10.193.0.") && pre_ip != wapi_ip,
        "{pre_ip}"
    );
    let addrs = d.exec_ok("client", "ip -4 -o addr");
    assert!(addrs.contains(&format!("{pre_ip}/24")), "{addrs}");
    assert_eq!(get_in(&d, "client", &wapi_ip), "hello from wapi");
    assert!(docker_endpoints(&h).contains(&(pre_ep.clone(), pre_ip.clone())));
    // With --dns on the gateway Docker forwards what it does not know to
    // weft's resolver, which knows weft's sandboxes.
    let out = d.ok(&[
        "run",
        "--rm",
        "--network",
        "dpre",
        "--dns",
        "10.193.0.1",
        IMAGE,
        "sh",
        "-c",
        "timeout 5 wget -q -O - http://wapi/",
    ]);
    assert_eq!(out, "hello from wapi");
    d.ok(&["network", "disconnect", "dpre", "client"]);
    let addrs = d.exec_ok("client", "ip -4 -o addr");
    assert!(!addrs.contains("10.193.0."), "{addrs}");
    let wpre = h.network("wpre");
    let on_wpre: Vec<&str> = wpre.endpoints.iter().map(|e| e.sandbox.as_str()).collect();
    assert_eq!(on_wpre, vec!["wapi"], "{wpre:?}");

    // The agent killed and restarted: the kernel was not touched, and the
    // restarted agent knows every endpoint and port.
    h.kill_agent(libc::SIGKILL);
    check_reach(&d, &h, &outside, &web_ip);
    h.start_agent();
    assert_eq!(
        docker_endpoints(&h),
        sorted(vec![
            (web_ep.clone(), web_ip.clone()),
            (client_ep.clone(), client_ip.clone())
        ])
    );
    check_reach(&d, &h, &outside, &web_ip);
    // Docker's next requests go to the restarted agent.
    d.ok(&["stop", "-t", "1", "client"]);
    assert_eq!(docker_endpoints(&h), vec![(web_ep.clone(), web_ip.clone())]);
    d.ok(&["start", "client"]);
    check_reach(&d, &h, &outside, &web_ip);

    // dockerd restarted: it stops its containers on the way down (weft
    // removes their endpoints and ports), keeps its networks, and on the way
    // up restarts `web` (--restart always) through weft.
    d.stop();
    assert_eq!(docker_endpoints(&h), vec![]);
    assert!(!published(&h).contains("18080"));
    d.start();
    let nets = d.run("network ls --filter driver=weft --format {{.Name}}");
    let mut nets: Vec<&str> = nets.lines().collect();
    nets.sort();
    assert_eq!(nets, vec!["dnet", "dpre"]);
    eventually(
        "web restarted with dockerd",
        Duration::from_secs(30),
        || match docker_endpoints(&h).len() {
            1 => Ok(()),
            n => Err(format!("{n} endpoints: {:?}", h.ps())),
        },
    );
    d.ok(&["start", "client"]);
    let (web_ip, _) = d.endpoint("web", "dnet");
    check_reach(&d, &h, &outside, &web_ip);

    // stop, rm, network rm.
    d.ok(&["stop", "-t", "1", "web"]);
    assert_eq!(docker_endpoints(&h).len(), 1);
    assert!(!published(&h).contains("18080"));
    d.ok(&["rm", "-f", "web", "client"]);
    assert_eq!(docker_endpoints(&h), vec![]);
    d.ok(&["network", "rm", "dnet", "dpre"]);
    let nets: Vec<String> = h.networks().into_iter().map(|n| n.name).collect();
    assert_eq!(
        nets,
        vec!["bridge", "wpre"],
        "the network made for Docker went with it; wpre was weft's"
    );

    // Nothing is left: no process, mount, cgroup or /run directory of
    // Docker's; no record, veth or port of the Docker endpoints in weft.
    let forced = d.clean();
    assert!(forced.is_empty(), "left behind by dockerd: {forced:?}");
    assert!(!d.dir.exists());
    let records = h.state_files("store");
    assert_eq!(records.len(), 1, "only wapi's record is left: {records:?}");
    let wapi_veth = h.sandbox_veths();
    assert_eq!(wapi_veth.len(), 1, "{wapi_veth:?}");
    assert!(
        !published(&h).contains("elements"),
        "no published port: {}",
        published(&h)
    );
    h.weft_ok(&["rm", "-f", "wapi"]);
    h.weft_ok(&["network", "rm", "wpre"]);
    // The plugin socket goes with the agent.
    h.kill_agent(libc::SIGTERM);
    assert!(!plugin.exists(), "{} is left", plugin.display());
}
