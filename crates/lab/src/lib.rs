//! `weft lab`: several simulated hosts on one machine.
//!
//! A lab is a directory (`<root>/<name>`) and everything in it: an underlay
//! namespace with one bridge (the "switch"), a namespace per host with an
//! `eth0` on that switch, a namespace for etcd, and the processes: etcd and
//! one `weft agent` per host, each with its own state and data dirs. Nothing
//! touches the machine's own network. `down` removes all of it from the
//! directory alone (it finds the lab's processes by their network
//! namespace), so it works after a crash half-way through `up` too.
//! The end-to-end tests use this same code as their harness.

pub mod pki;

use ipnet::Ipv4Net;
use pki::{CertFiles, Pki, Validity};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weft_kernel::{netns, process, Netns};
use weft_model::ProcessRef;

/// The lab's underlay: every host's `eth0` is on it.
pub const UNDERLAY_PREFIX: u8 = 24;
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const SWITCH: &str = "ul0";
pub const MAX_HOSTS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Bad(String),
    #[error("kernel: {0}")]
    Kernel(#[from] weft_kernel::KernelError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, LabError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// The lease TTLs `weft agent --lease-ttl` accepts, in seconds.
pub const LEASE_TTL_SECS: std::ops::RangeInclusive<u64> = 2..=86400;

/// What `weft lab up` asks for.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub name: String,
    /// Labs live in `<root>/<name>`.
    pub root: PathBuf,
    pub hosts: usize,
    /// Backend of the lab's overlay network (None: weft's default).
    pub backend: Option<String>,
    /// The overlay network made at start (None: no network).
    pub network: Option<(String, Ipv4Net)>,
    /// Some: the network has a subnet of this length per host (flannel's
    /// kind). None: one subnet shared by all hosts (Docker overlay's and
    /// weave's), or /24 per host with a backend other than vxlan, which
    /// only carries the per-host kind.
    pub host_subnet_len: Option<u8>,
    pub lease_ttl: u64,
    /// The weft binary the agents run.
    pub weft_bin: PathBuf,
    /// etcd on plain http without client certificates (default: TLS, and
    /// every host with a client certificate of the lab's CA).
    pub insecure_etcd: bool,
}

impl LabSpec {
    /// The host subnet length the lab's network is made with (see the field).
    pub fn lab_host_subnet_len(&self) -> Option<u8> {
        let vxlan = self.backend.as_deref().is_none_or(|b| b == "vxlan");
        self.host_subnet_len.or((!vxlan).then_some(24))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub ip: Ipv4Addr,
    pub agent: Option<ProcessRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    pub weft_bin: PathBuf,
    pub backend: Option<String>,
    pub lease_ttl: u64,
    pub etcd: Option<ProcessRef>,
    pub hosts: Vec<LabHost>,
    /// etcd on plain http (`lab up --insecure-etcd`).
    #[serde(default)]
    pub insecure_etcd: bool,
    /// More options for every agent the lab starts from now on (a test's
    /// `--metrics-listen`, say).
    #[serde(default)]
    pub extra_agent_args: Vec<String>,
    /// More options for one host's agent, by host name, after
    /// `extra_agent_args` (a test's `--docker-host` of that host's dockerd).
    #[serde(default)]
    pub host_agent_args: std::collections::BTreeMap<String, Vec<String>>,
}

/// What `down` removed.
#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    pub processes_killed: usize,
    pub namespaces_removed: usize,
    pub existed: bool,
}

pub fn host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 10 + i as u8)
}

/// The name of the client certificate for etcdctl and other admin work:
/// with etcd's authentication on, it is etcd's `root` user.
pub const ADMIN: &str = "root";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Lab {
    pub fn path(root: &Path, name: &str) -> PathBuf {
        root.join(name)
    }

    /// etcd's client URL: https unless the lab is insecure.
    pub fn etcd_url(&self) -> String {
        let scheme = if self.insecure_etcd { "http" } else { "https" };
        format!("{scheme}://{ETCD_IP}:2379")
    }

    /// The lab's CA (certificates in `<lab>/pki/`).
    pub fn pki(&self) -> Pki {
        Pki::open(&self.dir.join("pki"), &self.name)
    }

    /// A client certificate of the lab's CA: a host's, or [`ADMIN`].
    pub fn client_cert(&self, name: &str) -> CertFiles {
        self.pki().files(name)
    }

    /// The agent's flags for etcd as `name` (URL, CA, client certificate).
    pub fn etcd_args(&self, name: &str) -> Vec<String> {
        let mut v = vec!["--etcd-endpoints".to_string(), self.etcd_url()];
        if !self.insecure_etcd {
            let c = self.client_cert(name);
            v.extend([
                "--etcd-cafile".into(),
                self.pki().ca_file().display().to_string(),
                "--etcd-certfile".into(),
                c.cert.display().to_string(),
                "--etcd-keyfile".into(),
                c.key.display().to_string(),
            ]);
        }
        v
    }

    /// `etcdctl ARGS` (API v3) from host `i`'s namespace, as `name` (a
    /// host's certificate or [`ADMIN`]).
    pub fn etcdctl<S: AsRef<std::ffi::OsStr>>(
        &self,
        i: usize,
        name: &str,
        args: &[S],
    ) -> Result<Command> {
        let etcdctl = which("etcdctl").ok_or_else(|| {
            LabError::Bad(
                "etcdctl is not installed: apt-get install etcd-client (scripts/install-deps.sh does)"
                    .into(),
            )
        })?;
        let mut cmd = Self::command_in(&self.host_netns(i), &etcdctl, false)?;
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.etcd_url());
        if !self.insecure_etcd {
            let c = self.client_cert(name);
            cmd.arg("--cacert")
                .arg(self.pki().ca_file())
                .arg("--cert")
                .arg(c.cert)
                .arg("--key")
                .arg(c.key);
        }
        cmd.args(args);
        Ok(cmd)
    }

    fn netns_path(&self, what: &str) -> PathBuf {
        self.dir.join("netns").join(what)
    }

    pub fn host_netns(&self, i: usize) -> PathBuf {
        self.netns_path(&self.hosts[i].name)
    }

    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.hosts[i].name).join("state")
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.hosts[i].name).join("data")
    }

    pub fn agent_log(&self, i: usize) -> PathBuf {
        self.dir.join(&self.hosts[i].name).join("agent.log")
    }

    pub fn index_of(&self, host: &str) -> Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| {
                LabError::Bad(format!(
                    "lab {} has no host {host:?}; it has {}",
                    self.name,
                    self.hosts
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    fn save(&self) -> Result<()> {
        let p = self.dir.join("lab.json");
        let tmp = self.dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializable"))
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(io(format!("write {}", p.display())))
    }

    pub fn load(root: &Path, name: &str) -> Result<Lab> {
        let p = Lab::path(root, name).join("lab.json");
        let b = std::fs::read(&p).map_err(|_| {
            LabError::Bad(format!(
                "no lab named {name:?} under {} (`weft lab up --name {name}` makes one)",
                root.display()
            ))
        })?;
        serde_json::from_slice(&b)
            .map_err(|e| LabError::Failed(format!("{} is damaged: {e}", p.display())))
    }

    /// Builds the lab. On any failure everything made so far is removed.
    pub fn up(spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<Lab> {
        if !valid_name(&spec.name) {
            return Err(LabError::Bad(format!(
                "lab name {:?} is not valid: use 1 to 32 letters, digits, '-' or '_'",
                spec.name
            )));
        }
        if spec.hosts == 0 || spec.hosts > MAX_HOSTS {
            return Err(LabError::Bad(format!(
                "--hosts {}: use 1 to {MAX_HOSTS}",
                spec.hosts
            )));
        }
        // Everything the agents and the network would refuse, refused before
        // anything is built (a bad value used to fail after the whole build).
        if !LEASE_TTL_SECS.contains(&spec.lease_ttl) {
            return Err(LabError::Bad(format!(
                "--lease-ttl {}: use {} to {} seconds (what `weft agent --lease-ttl` accepts)",
                spec.lease_ttl,
                LEASE_TTL_SECS.start(),
                LEASE_TTL_SECS.end()
            )));
        }
        if let Some((net, range)) = &spec.network {
            let req = weft_model::overlay::OverlayRequest {
                range: Some(*range),
                host_subnet_len: spec.lab_host_subnet_len(),
                backend: spec.backend.clone(),
                flannel_config: None,
            };
            let planned = weft_model::overlay::plan(&req, &[])
                .map_err(|e| LabError::Bad(format!("the lab's network {net} ({range}): {e}")))?;
            let room = planned.capacity();
            if !planned.is_shared() && room < spec.hosts as u64 {
                return Err(LabError::Bad(format!(
                    "--subnet {range} has room for {room} host subnets of /{}, not {} hosts: give a larger range",
                    planned.host_subnet_len, spec.hosts
                )));
            }
        }
        let dir = Lab::path(&spec.root, &spec.name);
        if dir.exists() {
            return Err(LabError::Bad(format!(
                "lab {} already exists ({}); remove it first with `weft lab down --name {}`",
                spec.name,
                dir.display(),
                spec.name
            )));
        }
        let mut lab = Lab {
            name: spec.name.clone(),
            dir: dir.clone(),
            weft_bin: spec.weft_bin.clone(),
            backend: spec.backend.clone(),
            lease_ttl: spec.lease_ttl,
            etcd: None,
            extra_agent_args: Vec::new(),
            host_agent_args: Default::default(),
            hosts: Vec::new(),
            insecure_etcd: spec.insecure_etcd,
        };
        let built = lab.build(spec, progress);
        if let Err(e) = built {
            // The logs go with the lab: what they said goes into the error.
            let logs = lab.log_tails(15);
            let _ = down(&dir);
            return Err(match e {
                LabError::Failed(m) if !logs.is_empty() => LabError::Failed(format!("{m}\n{logs}")),
                e => e,
            });
        }
        Ok(lab)
    }

    fn build(&mut self, spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(io(format!("create {}", self.dir.display())))?;
        self.save()?;
        netns::prepare_dir(&self.dir.join("netns"))?;
        progress("underlay switch");
        let (_, mut ul) = Netns::create(&self.netns_path("underlay"), &[])?;
        ul.ensure_bridge(SWITCH, [0x02, 0x77, 0xff, 0, 0, 1], None)?;
        if !self.insecure_etcd {
            progress("certificates");
            let pki = Pki::create(&self.dir.join("pki"), &self.name)?;
            pki.issue_server("etcd", ETCD_IP)?;
            pki.issue_client(ADMIN, Validity::Current)?;
        }
        progress("etcd");
        self.plug("etcd", ETCD_IP)?;
        self.start_etcd()?;
        for i in 0..spec.hosts {
            progress(&format!("host h{} of {} and its agent", i + 1, spec.hosts));
            self.add_host()?;
        }
        if let Some((net, range)) = &spec.network {
            progress(&format!("overlay network {net} ({range})"));
            let mut args = vec![
                "network".to_string(),
                "create".into(),
                "-d".into(),
                "overlay".into(),
                "--subnet".into(),
                range.to_string(),
            ];
            if let Some(b) = &spec.backend {
                args.extend(["--backend".into(), b.clone()]);
            }
            if let Some(len) = spec.lab_host_subnet_len() {
                args.extend(["--host-subnet-len".into(), len.to_string()]);
            }
            args.push(net.clone());
            let out = self
                .weft(0, &args)
                .output()
                .map_err(io("run weft network create"))?;
            if !out.status.success() {
                return Err(LabError::Failed(format!(
                    "weft network create: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            if spec.lab_host_subnet_len().is_none() {
                // A shared subnet has no peers until sandboxes start.
                progress("every host joins the network and holds a block of it");
                for i in 0..self.hosts.len() {
                    let what = format!("{} to join {net}", self.hosts[i].name);
                    self.wait_for(Duration::from_secs(10), &what, |lab| lab.joined(i, net))?;
                }
            } else {
                progress("every host joins the network and routes to every other");
                let others = self.hosts.len() - 1;
                for i in 0..self.hosts.len() {
                    let what = format!(
                        "{} to join {net} and program {others} peers",
                        self.hosts[i].name
                    );
                    self.wait_for(Duration::from_secs(10), &what, |lab| {
                        lab.programmed_peers(i, net) == Some(others)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// A namespace of the lab plugged into the switch with address `ip`.
    fn plug(&self, what: &str, ip: Ipv4Addr) -> Result<()> {
        let path = self.netns_path(what);
        let (ns, mut inside) = Netns::create(&path, &[("net.ipv4.ip_forward", "1")])?;
        let ul = Netns::open(&self.netns_path("underlay"))?;
        let mut ul_nl = ul.netlink()?;
        let sw = ul_nl
            .link_by_name(SWITCH)?
            .ok_or_else(|| LabError::Failed("the lab's switch is gone".into()))?;
        ul_nl.add_veth(what, Some(sw.index), "eth0", ns.fd(), None)?;
        let eth0 = inside
            .link_by_name("eth0")?
            .ok_or_else(|| LabError::Failed(format!("eth0 missing in {what}")))?;
        inside.set_up(eth0.index)?;
        inside.add_address(
            eth0.index,
            Ipv4Net::new(ip, UNDERLAY_PREFIX).expect("valid prefix"),
        )?;
        Ok(())
    }

    /// Adds one more host (plugged in, agent started); returns its index.
    pub fn add_host(&mut self) -> Result<usize> {
        let i = self.hosts.len();
        if i >= MAX_HOSTS {
            return Err(LabError::Bad(format!(
                "a lab has at most {MAX_HOSTS} hosts"
            )));
        }
        let name = format!("h{}", i + 1);
        let ip = host_ip(i + 1);
        self.hosts.push(LabHost {
            name: name.clone(),
            ip,
            agent: None,
        });
        self.save()?;
        self.plug(&name, ip)?;
        if !self.insecure_etcd {
            self.pki().issue_client(&name, Validity::Current)?;
        }
        for d in [self.state_dir(i), self.data_dir(i)] {
            std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
        }
        self.start_agent(i)?;
        Ok(i)
    }

    /// A command run inside the namespace at `ns`, in a new session when
    /// `detach` (so it outlives the caller), with output to `log`.
    fn command_in(ns: &Path, program: &Path, detach: bool) -> Result<Command> {
        let f = File::open(ns).map_err(io(format!("open {}", ns.display())))?;
        let mut cmd = Command::new(program);
        // SAFETY: setns and setsid are async-signal-safe; `f` outlives spawn
        // because the closure owns it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if detach && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Gives `cmd` a UTS namespace of its own named `host`, so `hostname`
    /// as a lab host prints that host's name (and the agent's default node
    /// name is it), leaving the machine's name alone.
    fn named(cmd: &mut Command, host: &str) -> Result<()> {
        let name = std::ffi::CString::new(host)
            .map_err(|_| LabError::Bad(format!("host name {host:?} has a NUL byte")))?;
        // SAFETY: unshare and sethostname are async-signal-safe; `name` is
        // owned by the closure and outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                let b = name.as_bytes();
                if libc::unshare(libc::CLONE_NEWUTS) != 0
                    || libc::sethostname(b.as_ptr().cast(), b.len()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    fn spawn_logged(mut cmd: Command, log: &Path) -> Result<ProcessRef> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("open {}", log.display())))?;
        let err = out.try_clone().map_err(io("dup log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("start {:?}", cmd.get_program())))?;
        let pid = child.id() as i32;
        // Not waited for here: `down` (or stop_*) ends it; the lab owns it.
        std::mem::forget(child);
        process::identify(pid).ok_or_else(|| {
            LabError::Failed(format!(
                "process {pid} exited at once; see {}",
                log.display()
            ))
        })
    }

    pub fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.join("etcd");
        std::fs::create_dir_all(&data).map_err(io("create etcd dir"))?;
        let etcd = which("etcd").ok_or_else(|| {
            LabError::Bad(
                "etcd is not installed: apt-get install etcd-server (scripts/install-deps.sh does)"
                    .into(),
            )
        })?;
        let mut cmd = Self::command_in(&self.netns_path("etcd"), &etcd, true)?;
        let url = self.etcd_url();
        if !self.insecure_etcd {
            // Every client must show a certificate of the lab's CA.
            let pki = self.pki();
            let server = pki.files("etcd");
            cmd.arg("--cert-file")
                .arg(&server.cert)
                .arg("--key-file")
                .arg(&server.key)
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(pki.ca_file());
        }
        cmd.args([
            "--name",
            "lab",
            "--data-dir",
            &data.join("data").display().to_string(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "lab=http://127.0.0.1:2380",
        ]);
        self.etcd = Some(Self::spawn_logged(cmd, &data.join("etcd.log"))?);
        self.save()?;
        let ns = Netns::open(&self.netns_path("etcd"))?;
        let addr = SocketAddr::from((ETCD_IP, 2379));
        self.wait_for(Duration::from_secs(20), "etcd to listen", |_| {
            ns.run_in(move || {
                Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })
            .unwrap_or(false)
        })
    }

    /// Stops etcd (SIGKILL: as if its machine died); `start_etcd` brings it back with its data.
    pub fn stop_etcd(&mut self) -> Result<()> {
        if let Some(p) = self.etcd.take() {
            kill_and_wait(&p, libc::SIGKILL);
        }
        self.save()
    }

    /// The arguments of host `i`'s `weft` for its agent (tests vary them).
    pub fn agent_args(&self, i: usize) -> Vec<String> {
        let mut v = vec![
            "--state-dir".to_string(),
            self.state_dir(i).display().to_string(),
            "agent".into(),
            "--data-dir".into(),
            self.data_dir(i).display().to_string(),
        ];
        v.extend(self.etcd_args(&self.hosts[i].name));
        v.extend([
            "--public-ip".into(),
            self.hosts[i].ip.to_string(),
            "--node-name".into(),
            self.hosts[i].name.clone(),
            "--lease-ttl".into(),
            self.lease_ttl.to_string(),
            "--netns-pool".into(),
            "2".into(),
        ]);
        v.extend(self.extra_agent_args.iter().cloned());
        v.extend(
            self.host_agent_args
                .get(&self.hosts[i].name)
                .into_iter()
                .flatten()
                .cloned(),
        );
        v
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let mut cmd = Self::command_in(&self.host_netns(i), &self.weft_bin, true)?;
        Self::named(&mut cmd, &self.hosts[i].name)?;
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .args(self.agent_args(i));
        let p = Self::spawn_logged(cmd, &self.agent_log(i))?;
        self.hosts[i].agent = Some(p);
        self.save()?;
        let log = self.agent_log(i);
        self.wait_for(
            Duration::from_secs(20),
            &format!(
                "the agent of {} (log: {})",
                self.hosts[i].name,
                log.display()
            ),
            |lab| {
                if !lab.hosts[i].agent.as_ref().is_some_and(process::is_alive) {
                    return false;
                }
                lab.weft(i, &["status"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        )
    }

    /// The last `n` lines of etcd's and every agent's log, each under a
    /// heading (for an error, before the lab and its logs are removed).
    fn log_tails(&self, n: usize) -> String {
        let mut logs = vec![("etcd".to_string(), self.dir.join("etcd").join("etcd.log"))];
        logs.extend(
            (0..self.hosts.len())
                .map(|i| (format!("{} agent", self.hosts[i].name), self.agent_log(i))),
        );
        let mut out = String::new();
        for (what, path) in logs {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(n)..];
            if !tail.is_empty() {
                out.push_str(&format!(
                    "--- {what} log, last {} lines ---\n{}\n",
                    tail.len(),
                    tail.join("\n")
                ));
            }
        }
        out
    }

    /// Stops a host's agent with `signal` (SIGTERM: a clean stop; SIGKILL: a crash).
    pub fn stop_agent(&mut self, i: usize, signal: i32) -> Result<()> {
        if let Some(p) = self.hosts[i].agent.take() {
            kill_and_wait(&p, signal);
        }
        self.save()
    }

    /// `weft ARGS` as host `i`: in its namespace, talking to its agent.
    pub fn weft<S: AsRef<std::ffi::OsStr>>(&self, i: usize, args: &[S]) -> Command {
        let mut cmd = Self::command_in(&self.host_netns(i), &self.weft_bin, false)
            .expect("the host's namespace exists");
        cmd.env("WEFT_STATE_DIR", self.state_dir(i)).args(args);
        cmd
    }

    /// Any command as host `i` (`weft` means this lab's weft binary).
    pub fn exec(&self, i: usize, argv: &[String]) -> Result<Command> {
        let (first, rest) = argv
            .split_first()
            .ok_or_else(|| LabError::Bad("give a command after --".into()))?;
        let program = if first == "weft" {
            self.weft_bin.clone()
        } else {
            PathBuf::from(first)
        };
        let mut cmd = Self::command_in(&self.host_netns(i), &program, false)?;
        Self::named(&mut cmd, &self.hosts[i].name)?;
        cmd.env("WEFT_STATE_DIR", self.state_dir(i)).args(rest);
        Ok(cmd)
    }

    /// How many peers host `i` has programmed on `network` (None: not joined).
    /// Whether host `i` has joined `network` with no problem (for a
    /// shared network: it holds a block of it).
    pub fn joined(&self, i: usize, network: &str) -> bool {
        let Ok(out) = self.weft(i, &["--format", "json", "status"]).output() else {
            return false;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        let node = &self.hosts[i].name;
        v["cluster"]["networks"].as_array().is_some_and(|nets| {
            nets.iter().any(|n| {
                n["name"] == network
                    && n["subnet"].is_string()
                    && n["problem"].is_null()
                    && (n["kind"] != "shared"
                        || n["blocks"]
                            .as_array()
                            .is_some_and(|b| b.iter().any(|b| b["node"] == node.as_str())))
            })
        })
    }

    pub fn programmed_peers(&self, i: usize, network: &str) -> Option<usize> {
        let out = self
            .weft(i, &["--format", "json", "status"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let net = v["cluster"]["networks"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == network && n["subnet"].is_string())?;
        Some(
            net["peers"]
                .as_array()?
                .iter()
                .filter(|p| p["programmed"].is_string())
                .count(),
        )
    }

    fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&Lab) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if ready(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(LabError::Failed(format!(
            "timed out after {} s waiting for {what}",
            timeout.as_secs()
        )))
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn kill_and_wait(p: &ProcessRef, signal: i32) {
    if !process::is_alive(p) {
        return;
    }
    // SAFETY: kill takes integers and touches no memory of ours; the pid
    // was checked to be the very process just above.
    unsafe {
        libc::kill(p.pid, signal);
    }
    let start = Instant::now();
    while process::is_alive(p) && start.elapsed() < Duration::from_secs(10) {
        reap(p.pid);
        std::thread::sleep(Duration::from_millis(10));
    }
    reap(p.pid);
}

/// Collects the exit status if the process is our child (else a no-op).
fn reap(pid: i32) {
    // SAFETY: a null status pointer is allowed (the status is not stored);
    // WNOHANG never blocks.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
    }
}

/// Inode numbers of every namespace file mounted under `dir`.
fn namespaces_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    mounts_under(dir)
        .into_iter()
        .filter(|p| netns::is_netns(p))
        .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.ino())))
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(canon) = dir.canonicalize() else {
        return Vec::new();
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&canon))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Processes whose network namespace is one of `inodes`.
fn processes_in(inodes: &HashSet<u64>) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| inodes.contains(&m.ino()))
        })
        .collect()
}

/// Removes a lab completely: kills every process in any of its namespaces
/// (agents, etcd, sandboxes' processes), unmounts every namespace and mount
/// under its directory, then deletes the directory. Needs only the
/// directory, so it also cleans up a lab whose `up` crashed half-way.
pub fn down(dir: &Path) -> Result<DownReport> {
    let mut report = DownReport {
        existed: dir.exists(),
        ..Default::default()
    };
    if !report.existed {
        return Ok(report);
    }
    let spaces = namespaces_under(dir);
    let inodes: HashSet<u64> = spaces.iter().map(|(_, i)| *i).collect();
    let start = Instant::now();
    loop {
        let pids = processes_in(&inodes);
        if pids.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(LabError::Failed(format!(
                "processes {pids:?} in the lab's namespaces do not die"
            )));
        }
        for pid in pids {
            // SAFETY: kill takes integers and touches no memory of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            reap(pid);
            report.processes_killed += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report.namespaces_removed = spaces.len();
    // Deepest first: sandbox namespaces inside an agent's netns dir, then
    // the dirs themselves.
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: `c` is a NUL-terminated CString that outlives the call.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
    std::fs::remove_dir_all(dir).map_err(io(format!("remove {}", dir.display())))?;
    // The labs' root goes with its last lab (fails harmlessly if not empty).
    if let Some(root) = dir.parent() {
        let _ = std::fs::remove_dir(root);
    }
    Ok(report)
}

/// Every lab under `root`.
pub fn list(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    v.sort();
    v
}

/// Whether a process the lab started still runs.
pub fn is_alive(p: &ProcessRef) -> bool {
    process::is_alive(p)
}
