//! bench/converge: how fast the cluster's control plane converges.
//!
//! (1) In a lab of 3 and of 20 hosts: the time from a new host's lease
//!     appearing in etcd to its route being programmed on every other
//!     host (and, on the way out, from the lease's deletion to the route's
//!     removal everywhere). Each sample is a lease the benchmark writes for
//!     a simulated host on the underlay, so the clock starts exactly when
//!     etcd has the lease; the routes are polled over netlink in every
//!     host's namespace.
//! (2) The control plane alone: 1000 simulated hosts' leases written to
//!     etcd, the time one agent needs to program all 1000 routes, and its
//!     memory (RSS now and peak).
//!
//! Everything runs in a `weft lab` under /dev/shm/wftbench-<pid>, removed
//! on every exit path; a snapshot of the machine's network before and
//! after proves nothing leaked.

use clap::Parser;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use weft_bench::hostcheck::run_checked;
use weft_bench::labbench::{weft_binary, LabGuard, RemoveDir};
use weft_bench::stats::Series;
use weft_bench::sys::Error;

type Result<T> = std::result::Result<T, String>;
use weft_kernel::{Netlink, Netns, OVERLAY_ROUTE_PROTOCOL};
use weft_lab::{Lab, LabSpec};

#[derive(Parser, Debug)]
#[command(about = "Cluster convergence: lease to route on every host, and 1000 peers on one agent")]
struct Args {
    /// Lab sizes to measure join/leave convergence in
    #[arg(long, value_delimiter = ',', default_value = "3,20")]
    hosts: Vec<usize>,
    /// Joins (and leaves) measured per lab size
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Simulated peers for the control-plane test (0 skips it)
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// The weft binary (default: next to this one)
    #[arg(long)]
    weft: Option<PathBuf>,
    /// Print JSON instead of the table
    #[arg(long)]
    json: bool,
}

/// An etcd client on a thread of its own inside a lab host's namespace
/// (the benchmark process itself is not on the lab's underlay).
struct EtcdWorker {
    tx: std::sync::mpsc::Sender<(Op, std::sync::mpsc::Sender<std::result::Result<(), String>>)>,
}

enum Op {
    Put(String, Vec<u8>),
    Delete(String),
    CreateAll(Vec<(String, Vec<u8>)>),
}

impl EtcdWorker {
    fn start(netns: &Path, url: String) -> Result<EtcdWorker> {
        let ns =
            std::fs::File::open(netns).map_err(|e| format!("open {}: {e}", netns.display()))?;
        let (tx, rx) = std::sync::mpsc::channel::<(Op, std::sync::mpsc::Sender<_>)>();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // This thread alone enters the namespace, and ends with the benchmark.
            // SAFETY: `ns` is an open namespace file this closure owns;
            // setns changes only this thread's network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let etcd = match rt.block_on(weft_store::Etcd::connect(
                &[url],
                "/weft",
                Duration::from_secs(5),
                &Default::default(),
            )) {
                Ok(e) => e,
                Err(_) => return,
            };
            for (op, reply) in rx {
                let r = rt.block_on(async {
                    match op {
                        Op::Put(k, v) => etcd.put(&k, v, None).await,
                        Op::Delete(k) => etcd.delete(&k).await.map(|_| ()),
                        Op::CreateAll(kvs) => {
                            // etcd takes at most 128 operations per transaction.
                            for chunk in kvs.chunks(100) {
                                etcd.create(chunk, None).await?;
                            }
                            Ok(())
                        }
                    }
                });
                let _ = reply.send(r.map_err(|e| e.to_string()));
            }
        });
        Ok(EtcdWorker { tx })
    }

    fn call(&self, op: Op) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send((op, tx))
            .map_err(|_| "etcd worker gone".to_string())?;
        rx.recv().map_err(|_| "etcd worker gone".to_string())??;
        Ok(())
    }
}

fn lease_json(net: &str, subnet: &str, host: &str, ip: Ipv4Addr) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "network": net, "subnet": subnet, "host_id": host, "node": host, "public_ip": ip,
    }))
    .unwrap()
}

fn lab_spec(root: &Path, name: &str, hosts: usize, weft: &Path) -> LabSpec {
    LabSpec {
        name: name.into(),
        root: root.into(),
        hosts,
        backend: Some("host-gw".into()),
        network: Some(("lab".into(), "10.40.0.0/16".parse().unwrap())),
        lease_ttl: 60,
        weft_bin: weft.into(),
        // The benchmark's own etcd client speaks plain http, as flannel's
        // comparison setup does.
        insecure_etcd: true,
        host_subnet_len: Some(24),
    }
}

/// Netlink sockets in every host's namespace.
fn sockets(lab: &Lab) -> Result<Vec<Netlink>> {
    (0..lab.hosts.len())
        .map(|i| {
            Netns::open(&lab.host_netns(i))
                .and_then(|ns| ns.netlink())
                .map_err(|e| format!("netlink in h{}: {e}", i + 1))
        })
        .collect()
}

fn has_route(nl: &mut Netlink, dst: ipnet::Ipv4Net) -> bool {
    nl.routes_of(OVERLAY_ROUTE_PROTOCOL)
        .map(|r| r.iter().any(|r| r.dst == dst))
        .unwrap_or(false)
}

fn wait_all(nls: &mut [Netlink], dst: ipnet::Ipv4Net, present: bool) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if nls.iter_mut().all(|nl| has_route(nl, dst) == present) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "route to {dst} not {} after 10 s",
                if present { "everywhere" } else { "gone" }
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

struct Convergence {
    hosts: usize,
    join: Series,
    leave: Series,
}

fn convergence(root: &Path, weft: &Path, hosts: usize, samples: usize) -> Result<Convergence> {
    eprintln!("converge: lab of {hosts} hosts...");
    let lab = LabGuard(
        Lab::up(
            &lab_spec(root, &format!("c{hosts}"), hosts, weft),
            &mut |s| eprintln!("  {s}"),
        )
        .map_err(|e| format!("lab up: {e}"))?,
    );
    let etcd = EtcdWorker::start(&lab.0.host_netns(0), lab.0.etcd_url())?;
    let mut nls = sockets(&lab.0)?;
    let mut out = Convergence {
        hosts,
        join: Series::default(),
        leave: Series::default(),
    };
    for k in 0..samples {
        let subnet = format!("10.40.{}.0/24", 200 + (k % 50));
        let dst: ipnet::Ipv4Net = subnet.parse().unwrap();
        let key = format!("leases/lab/10.40.{}.0-24", 200 + (k % 50));
        let ip = Ipv4Addr::new(198, 51, 100, 240 + (k % 10) as u8);
        let value = lease_json("lab", &subnet, &format!("sim{k}"), ip);
        // The clock starts before the write: the lease exists somewhere
        // inside its round trip, which therefore counts against weft.
        let t0 = Instant::now();
        etcd.call(Op::Put(key.clone(), value))?;
        wait_all(&mut nls, dst, true)?;
        out.join.push(t0.elapsed());
        let t0 = Instant::now();
        etcd.call(Op::Delete(key))?;
        wait_all(&mut nls, dst, false)?;
        out.leave.push(t0.elapsed());
    }
    Ok(out)
}

fn rss_kb(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct ControlPlane {
    peers: usize,
    write_ms: f64,
    program_ms: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
    rss_peak_kb: u64,
}

fn control_plane(root: &Path, weft: &Path, peers: usize) -> Result<ControlPlane> {
    eprintln!("converge: {peers} simulated peers on one agent...");
    let mut spec = lab_spec(root, "cp", 1, weft);
    spec.network = None;
    let lab =
        LabGuard(Lab::up(&spec, &mut |s| eprintln!("  {s}")).map_err(|e| format!("lab up: {e}"))?);
    let l = &lab.0;
    // Simulated peers live on a /16 that h1 has on its underlay link, so
    // host-gw can route to each of them.
    let ns = Netns::open(&l.host_netns(0)).map_err(|e| e.to_string())?;
    let mut nl = ns.netlink().map_err(|e| e.to_string())?;
    let eth0 = nl
        .link_by_name("eth0")
        .map_err(|e| e.to_string())?
        .ok_or("eth0 missing")?;
    nl.add_address(eth0.index, "10.99.0.1/16".parse().unwrap())
        .map_err(|e| e.to_string())?;
    let out = l
        .weft(
            0,
            &[
                "network",
                "create",
                "-d",
                "overlay",
                "--backend",
                "host-gw",
                "--subnet",
                "10.64.0.0/12",
                "big",
            ],
        )
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "network create: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let agent = l.hosts[0].agent.as_ref().ok_or("agent not running")?.pid;
    let (rss_before, _) = rss_kb(agent);
    // Unique subnets: k -> the k-th /24 after 10.64.16.0.
    let leases: Vec<(String, Vec<u8>)> = (0..peers)
        .map(|k| {
            let n = 16 * 256 + k as u32; // /24 index inside 10.64.0.0/12
            let base = u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (n << 8);
            let net = Ipv4Addr::from(base);
            let subnet = format!("{net}/24");
            let key = format!("leases/big/{net}-24");
            let ip = Ipv4Addr::new(10, 99, (1 + k / 250) as u8, (1 + k % 250) as u8);
            (key, lease_json("big", &subnet, &format!("sim{k}"), ip))
        })
        .collect();
    let etcd = EtcdWorker::start(&l.host_netns(0), l.etcd_url())?;
    let start = Instant::now();
    etcd.call(Op::CreateAll(leases))?;
    let write_ms = start.elapsed().as_secs_f64() * 1e3;
    loop {
        let n = nl
            .routes_of(OVERLAY_ROUTE_PROTOCOL)
            .map_err(|e| e.to_string())?
            .len();
        if n >= peers {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("only {n} of {peers} routes after 60 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let program_ms = start.elapsed().as_secs_f64() * 1e3;
    let (rss_after, rss_peak) = rss_kb(agent);
    Ok(ControlPlane {
        peers,
        write_ms,
        program_ms,
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        rss_peak_kb: rss_peak,
    })
}

fn run(base: &Path, args: &Args) -> Result<bool> {
    let weft = weft_binary(args.weft.as_ref())?;
    std::fs::create_dir_all(base).map_err(|e| e.to_string())?;
    let _base = RemoveDir(base);
    let mut rows = Vec::new();
    for &h in &args.hosts {
        rows.push(convergence(base, &weft, h, args.samples)?);
    }
    let cp = if args.peers > 0 {
        Some(control_plane(base, &weft, args.peers)?)
    } else {
        None
    };
    let mut ok = true;
    if args.json {
        let v = serde_json::json!({
            "convergence": rows.iter().map(|r| serde_json::json!({
                "hosts": r.hosts, "join": r.join.summary(), "leave": r.leave.summary(),
            })).collect::<Vec<_>>(),
            "control_plane": cp.as_ref().map(|c| serde_json::json!({
                "peers": c.peers, "write_ms": c.write_ms, "program_ms": c.program_ms,
                "rss_before_kb": c.rss_before_kb, "rss_after_kb": c.rss_after_kb, "rss_peak_kb": c.rss_peak_kb,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    } else {
        println!(
            "lease -> route on every other host (host-gw), {} samples each",
            args.samples
        );
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>14} {:>14}",
            "hosts", "join median", "join p99", "join max", "leave median", "leave p99"
        );
        for r in &rows {
            let (j, l) = (r.join.summary(), r.leave.summary());
            println!(
                "{:<8} {:>9.1} ms {:>9.1} ms {:>9.1} ms {:>11.1} ms {:>11.1} ms",
                r.hosts, j.median_ms, j.p99_ms, j.max_ms, l.median_ms, l.p99_ms
            );
            let goal = j.median_ms < 200.0 && j.p99_ms < 1000.0;
            println!(
                "         goal median < 200 ms, p99 < 1 s: {}",
                if goal { "met" } else { "NOT met" }
            );
            ok &= goal;
        }
        if let Some(c) = &cp {
            println!(
                "\ncontrol plane: {} leases written in {:.0} ms; all {} routes programmed {:.0} ms after the first write",
                c.peers, c.write_ms, c.peers, c.program_ms
            );
            println!(
                "agent RSS: {:.1} MB before, {:.1} MB after, {:.1} MB peak",
                c.rss_before_kb as f64 / 1024.0,
                c.rss_after_kb as f64 / 1024.0,
                c.rss_peak_kb as f64 / 1024.0
            );
            let goal = c.program_ms < 2000.0 && c.rss_peak_kb < 50 * 1024;
            println!(
                "goal < 2 s and < 50 MB: {}",
                if goal { "met" } else { "NOT met" }
            );
            ok &= goal;
        }
    }
    let _ = ok;
    // The figures are the result; a goal not met is reported above, not an error.
    Ok(true)
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_checked("converge", Path::new("/dev/shm"), |base, _| {
        run(base, &args).map_err(Error::new)
    })
}
