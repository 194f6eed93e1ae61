//! bench/attach: time to attach and to remove N sandboxes, three ways —
//! weft (`weft run -d` / `weft rm -f`), Docker's default bridge
//! (`docker run -d` / `docker rm -f`) and the CNI reference plugins
//! (`bridge` + `host-local`, ADD / DEL). See bench/README.md.
//!
//! With `--net shared` it measures instead weft on a network whose one
//! subnet is shared by all hosts against weft on a local bridge network, on
//! h1 of a 2-host `weft lab` (etcd), in the same run.
//!
//! Everything runs inside network namespaces the benchmark makes (names
//! starting with `wftb`) or in the lab, with state under
//! /dev/shm/wftbench-<pid>; all of it is undone on every exit path, Ctrl-C
//! included.

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use weft_bench::cni::{self, CniHarness, CniOpts};
use weft_bench::docker::{self, DockerHarness, DockerOpts};
use weft_bench::harness::{measure, Harness};
use weft_bench::hostcheck::run_checked;
use weft_bench::labbench::{LabGuard, LabHost};
use weft_bench::netns;
use weft_bench::report::{Report, RunReport, Way, WayReport};
use weft_bench::sys::{self, bail, Result, TempTree};
use weft_bench::weft::{self, WeftHarness, WeftOpts};

#[derive(Parser, Debug)]
#[command(
    name = "attach",
    about = "Time to attach and remove N sandboxes: weft vs Docker's default bridge vs the CNI bridge plugin"
)]
struct Args {
    /// Numbers of sandboxes, comma-separated; each is a separate round.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    n: Vec<usize>,
    /// Leave out weft.
    #[arg(long)]
    skip_weft: bool,
    /// Leave out Docker.
    #[arg(long)]
    skip_docker: bool,
    /// Leave out the CNI plugins.
    #[arg(long)]
    skip_cni: bool,
    /// The weft binary [default: target/release/weft in the workspace].
    #[arg(long)]
    weft: Option<PathBuf>,
    /// Subnet for weft's default network (inside the agent's namespace).
    #[arg(long, default_value = "10.201.0.0/16")]
    weft_bridge_subnet: String,
    /// Size of the agent's namespace pool (`weft agent --netns-pool`); 0
    /// makes every attach create its namespace and veth pair inline.
    #[arg(long, default_value_t = 16)]
    weft_netns_pool: u16,
    /// The Docker daemon, started privately for the run.
    #[arg(long, default_value = "/usr/sbin/dockerd")]
    dockerd: PathBuf,
    /// The Docker client (Debian's, matching Debian's dockerd).
    #[arg(long, default_value = "/usr/bin/docker")]
    docker: PathBuf,
    /// Storage driver for the private dockerd (vfs is tried if it fails).
    #[arg(long, default_value = "overlay2")]
    docker_storage_driver: String,
    /// Static busybox for the Docker image.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Directory of the CNI plugins.
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_dir: PathBuf,
    /// Subnet for the CNI bridge (inside its own host namespace).
    #[arg(long, default_value = "10.202.0.0/16")]
    cni_subnet: String,
    /// Where the work directory wftbench-<pid> goes (tmpfs recommended).
    #[arg(long, default_value = "/dev/shm")]
    root: PathBuf,
    /// Sandboxes attached and removed, unmeasured, before each measured round.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print the results as JSON (with every sample) instead of tables.
    #[arg(long)]
    json: bool,
    /// Instead of weft, Docker and CNI: weft on an overlay network of this
    /// kind against weft on a local bridge network, both on h1 of a 2-host
    /// `weft lab` (etcd, an agent per host), in one run; the order of the
    /// two alternates from one N to the next. Kinds: `shared` (one subnet
    /// shared by all hosts).
    #[arg(long, value_name = "KIND")]
    net: Option<String>,
    /// With --net: the local bridge network's subnet.
    #[arg(long, default_value = "10.203.0.0/16")]
    lab_bridge_subnet: String,
    /// With --net: the shared network's subnet.
    #[arg(long, default_value = "10.204.0.0/16")]
    lab_shared_subnet: String,
}

/// BR_MAX_PORTS is 1024, port numbers start at 1.
const MAX_BRIDGE_PORTS: usize = 1023;

fn main() -> ExitCode {
    let args = Args::parse();
    run_checked("attach", &args.root.clone(), |base, pid| {
        run(&args, base, pid).map(|()| true)
    })
}

fn run(args: &Args, base: &Path, pid: u32) -> Result<()> {
    if !sys::is_root() {
        return bail("must run as root (it makes network namespaces and starts daemons)");
    }
    if args.n.is_empty() || args.n.contains(&0) {
        return bail("--n needs positive numbers, e.g. --n 10,100");
    }
    if let Some(&n) = args.n.iter().find(|&&n| n + args.warmup > MAX_BRIDGE_PORTS) {
        return bail(format!(
            "--n {n} with --warmup {} is more than the {MAX_BRIDGE_PORTS} ports a Linux bridge takes",
            args.warmup
        ));
    }
    if let Some(kind) = &args.net {
        return run_lab(args, base, kind);
    }
    let mut ways = Vec::new();
    if !args.skip_weft {
        ways.push(Way::Weft);
    }
    if !args.skip_docker {
        ways.push(Way::Docker);
    }
    if !args.skip_cni {
        ways.push(Way::Cni);
    }
    if ways.is_empty() {
        return bail("nothing to measure: all of weft, docker and cni are skipped");
    }
    let weft_opts = WeftOpts {
        bin: args.weft.clone().unwrap_or_else(weft::default_bin),
        bridge_subnet: args.weft_bridge_subnet.clone(),
        netns_pool: args.weft_netns_pool,
        agent_args: Vec::new(),
    };
    let docker_opts = DockerOpts {
        dockerd: args.dockerd.clone(),
        docker: args.docker.clone(),
        busybox: Some(args.busybox.clone()),
        storage_driver: args.docker_storage_driver.clone(),
    };
    let cni_opts = CniOpts {
        dir: args.cni_dir.clone(),
        subnet: args.cni_subnet.clone(),
    };
    for way in &ways {
        match way {
            Way::Weft => weft::preflight(&weft_opts)?,
            Way::Docker => docker::preflight(&docker_opts)?,
            Way::Cni => cni::preflight(&cni_opts)?,
            Way::WeftBridge | Way::WeftShared => {}
        }
    }
    let stale = netns::list_with_prefix(netns::PREFIX);
    if !stale.is_empty() {
        eprintln!("note: namespaces from another run exist (not touched): {stale:?}");
    }

    let tree = TempTree::create(base)?;
    let started = Instant::now();
    let mut runs = Vec::new();
    for &n in &args.n {
        let mut reports = Vec::new();
        for &way in &ways {
            eprintln!("{} N={n}: starting", way.name());
            let r = match way {
                Way::Weft => one_way(way, n, args.warmup, || {
                    let h = WeftHarness::start(&weft_opts, tree.path(), pid)?;
                    Ok((h, Vec::new()))
                })?,
                Way::Docker => one_way(way, n, args.warmup, || {
                    let h = DockerHarness::start(&docker_opts, &tree.path().join("docker"), pid)?;
                    let notes = h.notes.clone();
                    Ok((h, notes))
                })?,
                Way::Cni => one_way(way, n, args.warmup, || {
                    let h = CniHarness::start(&cni_opts, &tree.path().join("cni"), pid)?;
                    Ok((h, Vec::new()))
                })?,
                Way::WeftBridge | Way::WeftShared => return bail("measured by --net alone"),
            };
            eprintln!(
                "{} N={n}: done in {:.1} s (attach median {:.3} ms, remove median {:.3} ms)",
                way.name(),
                r.total_s,
                r.attach.median_ms,
                r.remove.median_ms
            );
            reports.push(r);
        }
        let run = RunReport::new(n, reports);
        if !args.json {
            println!("{}", run.table());
        }
        runs.push(run);
    }
    drop(tree);
    print_report(args, runs, started);
    Ok(())
}

fn print_report(args: &Args, runs: Vec<RunReport>, started: Instant) {
    if args.json {
        let report = Report {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            warmup: args.warmup,
            runs,
            total_s: started.elapsed().as_secs_f64(),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        println!("total {:.1} s", started.elapsed().as_secs_f64());
    }
}

/// `--net KIND`: a fresh 2-host lab per N, a local bridge network and one
/// of KIND, and `weft run -d` / `weft rm -f` on h1 on each.
fn run_lab(args: &Args, base: &Path, kind: &str) -> Result<()> {
    if kind != "shared" {
        return bail(format!(
            "--net {kind}: the kind measured is `shared` (one subnet shared by all hosts)"
        ));
    }
    let bin = args.weft.clone().unwrap_or_else(weft::default_bin);
    weft::preflight(&WeftOpts {
        bin: bin.clone(),
        bridge_subnet: String::new(),
        netns_pool: 0,
        agent_args: Vec::new(),
    })?;
    let tree = TempTree::create(base)?;
    let started = Instant::now();
    let mut runs = Vec::new();
    for (k, &n) in args.n.iter().enumerate() {
        sys::check_interrupted()?;
        eprintln!("N={n}: a 2-host lab...");
        let t = Instant::now();
        let lab = LabGuard(
            weft_lab::Lab::up(
                &weft_lab::LabSpec {
                    name: format!("at{k}"),
                    root: tree.path().join("labs"),
                    hosts: 2,
                    backend: None,
                    network: None,
                    lease_ttl: 60,
                    weft_bin: bin.clone(),
                    insecure_etcd: false,
                    host_subnet_len: None,
                },
                &mut |s| eprintln!("  {s}"),
            )
            .map_err(|e| sys::Error::new(format!("lab up: {e}")))?,
        );
        let l = &lab.0;
        let weft_ok = |i: usize, a: &[&str]| -> Result<()> {
            sys::run_ok(&mut l.weft(i, a), std::time::Duration::from_secs(60)).map(|_| ())
        };
        weft_ok(
            0,
            &[
                "network",
                "create",
                "--subnet",
                &args.lab_bridge_subnet,
                "br",
            ],
        )?;
        weft_ok(
            0,
            &[
                "network",
                "create",
                "-d",
                "overlay",
                "--subnet",
                &args.lab_shared_subnet,
                "sh",
            ],
        )?;
        for i in 0..2 {
            if !sys::wait_until(
                std::time::Duration::from_secs(20),
                std::time::Duration::from_millis(50),
                || l.joined(i, "sh"),
            ) {
                return bail(format!("h{} has not joined network sh after 20 s", i + 1));
            }
        }
        let start_s = t.elapsed().as_secs_f64();
        let mut order = [(Way::WeftBridge, "br"), (Way::WeftShared, "sh")];
        if k % 2 == 1 {
            order.reverse();
        }
        let mut reports = Vec::new();
        for (way, net) in order {
            eprintln!("{} N={n}: starting", way.name());
            let mut h = LabHost::new(l, 0, net, &tree.path().join("scratch"))?;
            let m = measure(&mut h, way.name(), n, args.warmup)?;
            drop(h);
            eprintln!(
                "{} N={n}: attach median {:.3} ms, remove median {:.3} ms",
                way.name(),
                m.attach.summary().median_ms,
                m.remove.summary().median_ms
            );
            let note = format!(
                "h1 of a 2-host lab (its agent's --netns-pool is the lab's 2); measured {}",
                if k % 2 == 0 {
                    "bridge first"
                } else {
                    "shared first"
                }
            );
            reports.push(WayReport::new(way, m, start_s, 0.0, vec![note]));
        }
        // The table lists the bridge network first whatever the order.
        reports.sort_by_key(|r| r.way != Way::WeftBridge);
        drop(lab);
        let run = RunReport::new(n, reports);
        if !args.json {
            println!("{}", run.table());
        }
        runs.push(run);
    }
    drop(tree);
    print_report(args, runs, started);
    Ok(())
}

/// Starts a way's environment, measures N, tears the environment down.
fn one_way<H: Harness>(
    way: Way,
    n: usize,
    warmup: usize,
    start: impl FnOnce() -> Result<(H, Vec<String>)>,
) -> Result<WayReport> {
    let t = Instant::now();
    let (mut h, mut notes) = start()?;
    let start_s = t.elapsed().as_secs_f64();
    let mut m = measure(&mut h, way.name(), n, warmup)?;
    notes.extend(m.settle_note.take());
    let t = Instant::now();
    drop(h);
    let teardown_s = t.elapsed().as_secs_f64();
    sys::check_interrupted()?;
    Ok(WayReport::new(way, m, start_s, teardown_s, notes))
}
