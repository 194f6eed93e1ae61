//! Podman 4 (Debian's) with its CNI backend against weft's CNI plugin: two
//! containers on a weft network reach each other by address and by name
//! (weft's resolver on the gateway), a published port (`-p`, the
//! `portMappings` capability) answers at the host's address, and removing
//! the containers removes weft's attachments.
//!
//! Everything podman uses is the test's own: a containers.conf
//! (CONTAINERS_CONF) with `network_backend = "cni"`, `--root`, `--runroot`,
//! `tmp_dir`, a CNI config dir (`--cni-config-dir`) with one conflist of
//! type `weft`, a plugin dir (`cni_plugin_dirs`) holding a link `weft` to
//! the weft binary, a busybox-static root file system (`--rootfs`, no image)
//! and a cgroup parent. Podman runs in the TestHost's namespace (setns, as
//! the agent does), so nothing touches the machine's network.
//!
//! Why these settings (found on a Debian 12 VM with hybrid cgroups and no
//! CAP_SYS_RESOURCE in the bounding set):
//! - `runtime = "runc"`: crun 1.8 refuses hybrid cgroups ("cgroups in
//!   hybrid mode not supported, drop all controllers from cgroupv2"), even
//!   with `cgroups = "disabled"`; runc cannot run without cgroups ("not
//!   compatible with NoCgroups"), hence a cgroup parent of the test's own,
//!   removed at the end.
//! - `default_ulimits = []`: as root, podman 4.3 raises RLIMIT_NOFILE and
//!   RLIMIT_NPROC to 1048576 / 4194304 in every container unless told
//!   otherwise, which needs CAP_SYS_RESOURCE ("error setting rlimit type 7:
//!   operation not permitted"); `--ulimit host` does not help in 4.3. With
//!   an empty list the container keeps the limits it inherits.
//! - the `vfs` storage driver: no overlay mounts to leave behind;
//!   `lock_type = "file"`: locks in `tmp_dir`, not in the machine-wide
//!   /dev/shm/libpod_lock that every root podman would share.
//! - names: podman's CNI backend passes the container name only as
//!   `K8S_POD_NAME` in CNI_ARGS and, as `aliases`, the short id and any
//!   `--network-alias`; weft's plugin reads both, so a container is found
//!   by its `--name`, its `--network-alias` and its short id.
//! - static addresses: podman passes one `--ip` (and `--mac-address`) as
//!   `IP=` (`MAC=`) in CNI_ARGS, only several as the `ips` capability;
//!   weft's plugin reads both.

use std::cell::RefCell;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use weft_e2e::{eventually, output_within, text, unique, weft_bin, TestHost};

/// Busybox applets linked in each root file system.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "mkdir", "sleep", "httpd", "wget", "nslookup", "nc", "ip", "ping",
    "hostname", "grep", "head", "ls", "ps", "true", "timeout",
];

/// One podman "installation" of the test's own, run in a TestHost's namespace.
/// Drop removes every container, process, mount, netns file, cgroup and
/// file it made, pass or fail; it must go before its TestHost (whose agent
/// answers the CNI DEL calls), so declare it after the host.
struct Podman<'h> {
    host: &'h TestHost,
    dir: PathBuf,
    /// Podman's name of the network (the conflist's "name").
    net: String,
    /// The cgroup parent (a directory in every hierarchy) for conmon and the containers.
    cgroup: String,
    /// Network namespace files podman made for the containers (/run/netns/netns-…).
    netns: RefCell<Vec<PathBuf>>,
}

impl<'h> Podman<'h> {
    /// Podman set up to attach containers to the weft network `weft_net` of `host`.
    fn new(host: &'h TestHost, weft_net: &str) -> Podman<'h> {
        for tool in [
            "/usr/bin/podman",
            "/usr/sbin/runc",
            "/usr/bin/conmon",
            "/bin/busybox",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run scripts/install-deps.sh (podman, runc, conmon, busybox-static)"
            );
        }
        let name = unique("wftp");
        let p = Podman {
            host,
            dir: PathBuf::from(format!("/dev/shm/{name}")),
            net: format!("{name}n"),
            cgroup: format!("{name}cg"),
            netns: RefCell::new(Vec::new()),
        };
        for sub in ["plugins", "cni", "root", "runroot", "tmp"] {
            std::fs::create_dir_all(p.dir.join(sub)).expect("podman test dir");
        }
        symlink(weft_bin(), p.dir.join("plugins/weft")).expect("plugin link");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": p.net,
            "plugins": [{
                "type": "weft",
                "network": weft_net,
                "stateDir": host.state_dir(),
                "capabilities": { "portMappings": true, "aliases": true, "ips": true, "mac": true },
            }],
        });
        std::fs::write(
            p.dir.join(format!("cni/{}.conflist", p.net)),
            serde_json::to_string_pretty(&conflist).unwrap(),
        )
        .unwrap();
        let conf = format!(
            r#"[containers]
default_ulimits = []
cgroups = "enabled"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{dir}/plugins"]
network_config_dir = "{dir}/cni"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{dir}/tmp"
lock_type = "file"
"#,
            dir = p.dir.display()
        );
        std::fs::write(p.dir.join("containers.conf"), conf).unwrap();
        p
    }

    /// A root file system for one container: busybox-static and its applets.
    fn rootfs(&self, name: &str) -> PathBuf {
        let root = self.dir.join(format!("rootfs-{name}"));
        std::fs::create_dir_all(root.join("bin")).unwrap();
        for d in ["etc", "tmp", "proc", "sys", "dev", "www"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        std::fs::write(root.join("www/index.html"), format!("hello from {name}\n")).unwrap();
        root
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.host.ns.command("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .arg("--cni-config-dir")
            .arg(self.dir.join("cni"))
            .args(args);
        cmd
    }

    fn podman(&self, args: &[&str]) -> Output {
        output_within(self.cmd(args), Duration::from_secs(30))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(out.status.success(), "podman {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman run -d` of a container serving its name over HTTP on port 80;
    /// returns its id.
    fn run_server(&self, name: &str, extra: &[&str]) -> String {
        let rootfs = self.rootfs(name);
        let cgroup = format!("/{}", self.cgroup);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.net,
            "--cgroup-parent",
            &cgroup,
        ];
        args.extend_from_slice(extra);
        let rootfs = rootfs.display().to_string();
        args.extend_from_slice(&["--rootfs", &rootfs, "httpd", "-f", "-p", "80", "-h", "/www"]);
        let id = self.ok(&args);
        let key = self.ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            &id,
        ]);
        assert!(key.starts_with("/run/netns/"), "sandbox key {key:?}");
        self.netns.borrow_mut().push(PathBuf::from(key));
        id
    }

    /// Runs a shell script in a container; its output, whatever its status.
    fn exec(&self, name: &str, script: &str) -> Output {
        self.podman(&["exec", name, "sh", "-c", script])
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

    /// The cgroup parent's directory in every hierarchy that has it
    /// (/sys/fs/cgroup/HIERARCHY/NAME with cgroup v1, /sys/fs/cgroup/NAME with v2).
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

    /// Processes that belong to this podman: in its cgroups, or with its
    /// directory on the command line (conmon, a stuck podman).
    fn processes(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for d in self.cgroup_dirs() {
            for f in walk_dirs(&d) {
                let tasks = std::fs::read_to_string(f.join("cgroup.procs")).unwrap_or_default();
                pids.extend(tasks.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        let me = self.dir.display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&me) {
                pids.push(pid);
            }
        }
        let own = std::process::id() as i32;
        pids.retain(|&p| p != own);
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Mount points under this podman's directory, deepest last.
    fn mounts(&self) -> Vec<String> {
        let me = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(&me))
            .collect()
    }

    /// CNI result cache files of this network (libcni keeps them in /var/lib/cni).
    fn cni_cache(&self) -> Vec<PathBuf> {
        let prefix = format!("{}-", self.net);
        std::fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    }

    /// What is left of this podman outside its directory, for assertions.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        left.extend(self.processes().iter().map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!(
                "process {p}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            )
        }));
        left.extend(self.mounts().into_iter().map(|m| format!("mount {m}")));
        left.extend(
            self.netns
                .borrow()
                .iter()
                .filter(|n| n.exists())
                .map(|n| format!("netns {}", n.display())),
        );
        left.extend(
            self.cni_cache()
                .iter()
                .map(|f| format!("cni cache {}", f.display())),
        );
        left
    }

    /// Removes everything; returns what had to be removed by force (beyond
    /// `podman rm -af` and the cgroup directories, which podman keeps).
    fn clean(&self) -> Vec<String> {
        let mut forced = Vec::new();
        // Through podman itself: stops the containers, CNI DEL, unmounts.
        if self.dir.join("containers.conf").exists() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.podman(&["rm", "-af", "-t", "0"])
            }));
        }
        // Give conmon a moment to go after its container.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        forced.extend(self.leftovers());
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
        for n in self.netns.borrow().iter().filter(|n| n.exists()) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(n)
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_file(n);
        }
        for f in self.cni_cache() {
            let _ = std::fs::remove_file(f);
        }
        // The cgroup directories, deepest first, once their processes are gone.
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
        forced.extend(
            self.cgroup_dirs()
                .iter()
                .map(|d| format!("cgroup {} could not be removed", d.display())),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
        forced
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self.clean();
    }
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

/// weft's sandboxes as (container id of the runtime, address).
fn weft_sandboxes(h: &TestHost) -> Vec<(String, String)> {
    h.ps()
        .iter()
        .map(|s| {
            (
                // An attachment made over CNI shows as the command `cni <container id>`.
                s.command.get(1).cloned().unwrap_or_default(),
                s.attachment
                    .endpoints()
                    .first()
                    .map(|e| e.ip.to_string())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn podman_cni_containers_reach_each_other_and_a_published_port() {
    let h = TestHost::new(Some("10.186.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.187.0.0/24", "pmnet"]);
    // The host's own address (203.0.113.1) and a machine outside it.
    let outside = h.outside();
    let p = Podman::new(&h, "pmnet");

    // web by --name and a static --ip/--mac-address; client also by an alias.
    let web = p.run_server(
        "web",
        &[
            "--ip",
            "10.187.0.50",
            "--mac-address",
            "02:42:0a:bb:00:32",
            "-p",
            "18080:80",
        ],
    );
    let client = p.run_server("client", &["--network-alias", "front"]);

    // Podman's view and weft's agree: two external sandboxes on pmnet.
    let ip_of = |name: &str| {
        p.ok(&[
            "inspect",
            "--format",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                p.net
            ),
            name,
        ])
    };
    let (web_ip, client_ip) = (ip_of("web"), ip_of("client"));
    for ip in [&web_ip, &client_ip] {
        assert!(ip.starts_with("10.187.0."), "{ip}");
    }
    assert_eq!(web_ip, "10.187.0.50", "podman's --ip reached weft");
    assert!(
        p.exec_ok("web", "ip link show eth0")
            .contains("02:42:0a:bb:00:32"),
        "podman's --mac-address reached weft"
    );
    let mut sandboxes = weft_sandboxes(&h);
    sandboxes.sort();
    let mut want = vec![
        (web.clone(), web_ip.clone()),
        (client.clone(), client_ip.clone()),
    ];
    want.sort();
    assert_eq!(sandboxes, want, "weft ps: {:?}", h.ps());
    assert_eq!(h.sandbox_veths().len(), 2);

    // resolv.conf: weft's resolver on the gateway comes first.
    let resolv = p.exec_ok("client", "cat /etc/resolv.conf");
    assert_eq!(
        resolv.lines().find(|l| l.starts_with("nameserver")),
        Some("nameserver 10.187.0.1"),
        "{resolv}"
    );
    assert!(p
        .exec_ok("client", "ip -4 route")
        .contains("default via 10.187.0.1"));

    // By address and by name, both ways (`timeout`: busybox 1.35's `wget -T` segfaults).
    let get = |from: &str, target: &str| {
        let out = p.exec(from, &format!("timeout 5 wget -q -O - http://{target}/"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + &if out.status.success() {
                String::new()
            } else {
                format!(" [{}]", text(&out))
            }
    };
    assert_eq!(get("client", &web_ip), "hello from web");
    assert_eq!(get("web", &client_ip), "hello from client");
    assert_eq!(get("client", "web"), "hello from web");
    assert_eq!(get("web", "client"), "hello from client");
    assert_eq!(get("web", "front"), "hello from client");
    // The short id, which podman always passes as an alias.
    assert_eq!(get("client", &web[..12]), "hello from web");
    let ns = p.exec_ok("client", "nslookup web 10.187.0.1");
    assert!(ns.contains(&web_ip), "{ns}");
    // An unknown single-label name: NXDOMAIN from weft, not forwarded.
    let nx = text(&p.exec("client", "nslookup nosuchname 10.187.0.1"));
    assert!(nx.contains("NXDOMAIN"), "{nx}");

    // The published port: from the host itself and from outside, at the host's address.
    let host_get = |ns: &weft_e2e::Netns, url: &str| {
        let out = ns.try_sh(&format!("timeout 5 busybox wget -q -O - {url}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    eventually(
        "published port from the host",
        Duration::from_secs(5),
        || match host_get(&h.ns, "http://203.0.113.1:18080/").as_str() {
            "hello from web" => Ok(()),
            got => Err(format!("{got:?}")),
        },
    );
    assert_eq!(
        host_get(&outside, "http://203.0.113.1:18080/"),
        "hello from web",
        "published port from outside"
    );
    let port = p.ok(&["port", "web"]);
    assert!(port.contains("80/tcp -> 0.0.0.0:18080"), "{port}");

    // Removing a container removes its attachment, port and namespace.
    p.ok(&["rm", "-f", "-t", "0", "web"]);
    assert_eq!(
        weft_sandboxes(&h),
        vec![(client.clone(), client_ip.clone())]
    );
    assert!(!h.ns.sh("nft list table inet weft").contains("18080"));
    assert_eq!(h.sandbox_veths().len(), 1);
    assert!(!p.netns.borrow()[0].exists(), "web's netns file");
    assert_eq!(host_get(&h.ns, "http://203.0.113.1:18080/"), "");

    // A container that ends by itself is detached by podman's cleanup
    // (conmon's exit command), which must find the same configuration.
    let rootfs = p.rootfs("brief").display().to_string();
    let cgroup = format!("/{}", p.cgroup);
    let brief = p.ok(&[
        "run",
        "-d",
        "--name",
        "brief",
        "--network",
        &p.net,
        "--cgroup-parent",
        &cgroup,
        "--rootfs",
        &rootfs,
        "sh",
        "-c",
        "sleep 2",
    ]);
    let key = p.ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.SandboxKey}}",
        &brief,
    ]);
    p.netns.borrow_mut().push(PathBuf::from(key));
    assert!(
        weft_sandboxes(&h).iter().any(|s| s.0 == brief),
        "brief is attached: {:?}",
        h.ps()
    );
    eventually(
        "the ended container's attachment is removed",
        Duration::from_secs(10),
        || {
            let ids: Vec<String> = weft_sandboxes(&h).into_iter().map(|s| s.0).collect();
            if ids.contains(&brief) {
                Err(format!("{ids:?}"))
            } else {
                Ok(())
            }
        },
    );

    // Everything goes with `podman rm -af`; nothing is left to force.
    let forced = p.clean();
    assert!(forced.is_empty(), "left behind by podman: {forced:?}");
    assert!(weft_sandboxes(&h).is_empty(), "weft ps: {:?}", h.ps());
    assert!(h.sandbox_veths().is_empty());
    assert!(!p.dir.exists());
}
