//! bench/dns: weft's embedded resolver against aardvark-dns (podman's),
//! serving the same names to the same client (issue 20, point 3).
//!
//! One namespace, `wftbench-<pid>`, is the host: a weft agent with a
//! user-defined network, `--names` sandboxes on it (one name each) and a
//! client sandbox; aardvark-dns in the same namespace, on the same gateway
//! address but another port, configured with the same sandboxes, names and
//! addresses; and dnsmasq on an address of the host's loopback as the
//! upstream both servers forward to (its `--address` gives every forwarded
//! name a real answer). From the client sandbox, for local names and for
//! forwarded ones, and for each server:
//!
//! - queries per second: dnsperf with `--in-flight` (32) queries outstanding;
//! - server CPU time per query: utime + stime of the server's process
//!   (/proc/PID/stat) across the dnsperf run, over the queries it completed;
//! - latency p50 / p99 with one query in flight: a UDP client built in here,
//!   one query at a time, each timed from send to the reply's arrival.
//!
//! and the ratios weft / aardvark against the issue's goals. Everything is
//! undone on every exit path; the run ends with the host check of the
//! other benchmarks. See bench/README.md.

use clap::Parser;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use weft_bench::hostcheck::run_checked;
use weft_bench::stats::{median, percentile};
use weft_bench::sys::{
    self, bail, require_exe, run_ok, wait_gone, wait_until, Context, Daemon, ProcId, Result,
    TempTree,
};
use weft_bench::weft::{self, WeftHarness, WeftOpts};

#[derive(Parser, Debug)]
#[command(
    name = "dns",
    about = "weft's embedded resolver against aardvark-dns: q/s, latency and CPU per query (issue 20)"
)]
struct Args {
    /// The weft binary [default: target/release/weft in the workspace].
    #[arg(long)]
    weft: Option<PathBuf>,
    #[arg(long, default_value = "/usr/lib/podman/aardvark-dns")]
    aardvark: PathBuf,
    #[arg(long, default_value = "/usr/bin/dnsperf")]
    dnsperf: PathBuf,
    #[arg(long, default_value = "/usr/sbin/dnsmasq")]
    dnsmasq: PathBuf,
    /// Seconds of each dnsperf run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queries dnsperf keeps outstanding.
    #[arg(long, default_value_t = 32)]
    in_flight: u32,
    /// Timed queries of each latency series (one in flight).
    #[arg(long, default_value_t = 20000)]
    latency_queries: usize,
    /// Sandboxes with a name each (the local names), and as many forwarded names.
    #[arg(long, default_value_t = 20)]
    names: usize,
    /// The network both servers serve (weft's gateway is its first address).
    #[arg(long, default_value = "10.231.0.0/24")]
    subnet: String,
    /// aardvark-dns's port on the same gateway address (weft's is 53).
    #[arg(long, default_value_t = 5353)]
    aardvark_port: u16,
    /// Subnet of the agent's default network (unused, inside its namespace).
    #[arg(long, default_value = "10.230.0.0/16")]
    weft_bridge_subnet: String,
    /// Where the work directory wftbench-<pid> goes (tmpfs recommended).
    #[arg(long, default_value = "/dev/shm")]
    root: PathBuf,
}

/// The upstream (dnsmasq), on the host namespace's loopback.
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(10, 231, 250, 1);
/// What dnsmasq answers for every forwarded name.
const FORWARDED_ANSWER: Ipv4Addr = Ipv4Addr::new(10, 231, 250, 7);
const FORWARDED_DOMAIN: &str = "upstream.test";
const NETWORK: &str = "dnsb";

/// The issue's goals, weft / aardvark.
const GOAL_QPS: f64 = 2.0;
const GOAL_CPU: f64 = 0.5;
const GOAL_P99: f64 = 0.75;

fn main() -> ExitCode {
    let args = Args::parse();
    run_checked("dns", &args.root.clone(), |base, pid| run(&args, base, pid))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local,
    Forwarded,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Forwarded => "forwarded",
        }
    }
}

/// One server as the client sees it.
struct Server {
    label: &'static str,
    addr: SocketAddr,
    pid: i32,
}

/// The figures of one server for one kind of name.
#[derive(Default, Clone)]
struct Figures {
    qps: f64,
    completed: u64,
    lost: u64,
    cpu_us_per_query: f64,
    /// dnsperf's own CPU time per query: near 1 s per second at its q/s
    /// means the client, not the server, set the pace.
    client_cpu_us_per_query: f64,
    p50_us: f64,
    p99_us: f64,
    latency_timeouts: usize,
}

fn run(args: &Args, base: &Path, pid: u32) -> Result<bool> {
    if !sys::is_root() {
        return bail("must run as root (it makes network namespaces and starts servers)");
    }
    if args.names == 0 || args.seconds == 0 || args.latency_queries == 0 {
        return bail("--names, --seconds and --latency-queries must be positive");
    }
    let subnet: ipnet::Ipv4Net = args
        .subnet
        .parse()
        .context(format_args!("--subnet {}", args.subnet))?;
    let gateway = subnet
        .hosts()
        .next()
        .context("--subnet has no host addresses")?;
    let opts = WeftOpts {
        bin: args.weft.clone().unwrap_or_else(weft::default_bin),
        bridge_subnet: args.weft_bridge_subnet.clone(),
        netns_pool: 4,
        agent_args: Vec::new(),
    };
    weft::preflight(&opts)?;
    for (exe, pkg) in [
        (&args.aardvark, "aardvark-dns"),
        (&args.dnsperf, "dnsperf"),
        (&args.dnsmasq, "dnsmasq-base"),
    ] {
        require_exe(
            exe,
            &format!("install Debian's {pkg} (scripts/install-deps.sh --bench)"),
        )?;
    }
    let tree = TempTree::create(base)?;
    let dir = tree.path().to_path_buf();
    let resolv = dir.join("upstream-resolv.conf");
    fs::write(&resolv, format!("nameserver {UPSTREAM}\n"))
        .context(format_args!("writing {}", resolv.display()))?;
    let agent_dir = dir.join("agent");
    fs::create_dir(&agent_dir).context(format_args!("creating {}", agent_dir.display()))?;
    let opts = WeftOpts {
        agent_args: vec!["--resolv-conf".into(), resolv.display().to_string()],
        ..opts
    };
    let started = Instant::now();
    let mut h = WeftHarness::start(&opts, &agent_dir, pid)?;
    h.netns()
        .try_ip(&["addr", "add", &format!("{UPSTREAM}/32"), "dev", "lo"])?;

    let mut dnsmasq_cmd = h.netns().entered(&args.dnsmasq)?;
    dnsmasq_cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &format!("--listen-address={UPSTREAM}"),
        &format!("--address=/{FORWARDED_DOMAIN}/{FORWARDED_ANSWER}"),
        "--pid-file=",
        "--user=root",
    ]);
    let _dnsmasq = Daemon::spawn(
        "dnsmasq",
        dnsmasq_cmd,
        &dir.join("dnsmasq.log"),
        Duration::from_secs(5),
    )?;

    run_ok(
        h.cli()?
            .args(["network", "create", "--subnet", &args.subnet, NETWORK]),
        Duration::from_secs(30),
    )?;
    let mut sandboxes = Vec::new();
    for i in 1..=args.names {
        let name = format!("s{i}");
        let r = h
            .run_detached_with(
                &["--name", &name, "--net", NETWORK],
                &[],
                &["sleep", "infinity"],
            )
            .context(format_args!("starting sandbox {name}"))?;
        let ip =
            r.ip.context(format_args!("sandbox {name} has no address"))?;
        sandboxes.push((r.id, ip, name));
        sys::check_interrupted()?;
    }
    let client = h.run_detached_with(
        &["--name", "dnsclient", "--net", NETWORK],
        &[],
        &["sleep", "infinity"],
    )?;
    let client_ip = client.ip.context("the client sandbox has no address")?;
    let client_pid = client
        .pid
        .context("`weft run` gave no pid for the client")?;
    let client_ns = PathBuf::from(format!("/proc/{client_pid}/ns/net"));
    eprintln!(
        "weft: network {NETWORK} {} (resolver {gateway}:53), {} named sandboxes, client {client_ip}",
        args.subnet, args.names
    );

    // aardvark-dns's view of the same network: listen address, then one
    // line per sandbox, `ID IPv4 IPv6 NAMES` (no IPv6 here).
    let ad_dir = dir.join("aardvark");
    fs::create_dir(&ad_dir).context(format_args!("creating {}", ad_dir.display()))?;
    let mut conf = format!("{gateway}\n");
    for (id, ip, name) in &sandboxes {
        conf.push_str(&format!("{id} {ip}  {name}\n"));
    }
    conf.push_str(&format!("{} {client_ip}  dnsclient\n", client.id));
    fs::write(ad_dir.join(NETWORK), conf).context("writing aardvark-dns's configuration")?;
    let aardvark = Aardvark::start(args, h.netns(), &ad_dir, &resolv, &dir)?;

    let weft_pid = h.agent_pid().context("the weft agent has no pid")?;
    let servers = [
        Server {
            label: "weft",
            addr: SocketAddr::from((gateway, 53)),
            pid: weft_pid,
        },
        Server {
            label: "aardvark-dns",
            addr: SocketAddr::from((gateway, args.aardvark_port)),
            pid: aardvark.pid.pid,
        },
    ];
    let local: Vec<String> = sandboxes.iter().map(|(_, _, n)| n.clone()).collect();
    let forwarded: Vec<String> = (1..=args.names)
        .map(|i| format!("f{i}.{FORWARDED_DOMAIN}"))
        .collect();

    // Both servers must give the same, right answers before anything is timed.
    for s in &servers {
        for (name, want) in [
            (local[0].as_str(), sandboxes[0].1),
            (forwarded[0].as_str(), FORWARDED_ANSWER),
        ] {
            let got = in_netns(&client_ns, {
                let (addr, name) = (s.addr, name.to_string());
                move || probe(addr, &name)
            })??;
            if got != Some(want) {
                return bail(format!(
                    "{} answered {name} with {got:?}, expected {want}",
                    s.label
                ));
            }
        }
    }
    eprintln!("both servers answer local and forwarded names; measuring");

    let mut results = Vec::new();
    for (k, kind) in [Kind::Local, Kind::Forwarded].into_iter().enumerate() {
        let names = match kind {
            Kind::Local => &local,
            Kind::Forwarded => &forwarded,
        };
        let data = dir.join(format!("{}.queries", kind.label()));
        let text: String = names.iter().map(|n| format!("{n} A\n")).collect();
        fs::write(&data, text).context(format_args!("writing {}", data.display()))?;
        let mut figs = [Figures::default(), Figures::default()];
        // Alternate which server goes first, so neither always gets the
        // quieter (or warmer) half of the machine's time.
        let order: [usize; 2] = if k % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            sys::check_interrupted()?;
            let s = &servers[i];
            let f = &mut figs[i];
            let load = loadavg();
            let cpu0 = cpu_ticks(s.pid)?;
            let client0 = children_cpu_us();
            let (completed, lost, qps) = dnsperf(args, &client_ns, s.addr, &data, &dir)?;
            let cpu1 = cpu_ticks(s.pid)?;
            f.client_cpu_us_per_query =
                (children_cpu_us() - client0) as f64 / completed.max(1) as f64;
            f.qps = qps;
            f.completed = completed;
            f.lost = lost;
            f.cpu_us_per_query =
                (cpu1 - cpu0) as f64 * 1e6 / clock_ticks() as f64 / completed.max(1) as f64;
            let (lat, timeouts) = in_netns(&client_ns, {
                let (addr, names, n) = (s.addr, names.clone(), args.latency_queries);
                move || latency(addr, &names, n)
            })??;
            f.p50_us = median(&lat);
            f.p99_us = percentile(&lat, 0.99);
            f.latency_timeouts = timeouts;
            eprintln!(
                "  {:9} {:12} {:>9.0} q/s  {:>6.2} us CPU/query (dnsperf {:.2})  p50 {:>6.1} us  p99 {:>6.1} us  (load {load:.2})",
                kind.label(),
                s.label,
                f.qps,
                f.cpu_us_per_query,
                f.client_cpu_us_per_query,
                f.p50_us,
                f.p99_us
            );
        }
        results.push((kind, figs));
    }
    drop(aardvark);
    drop(h);
    drop(tree);
    print_report(args, &results, started.elapsed());
    Ok(true)
}

fn print_report(args: &Args, results: &[(Kind, [Figures; 2])], took: Duration) {
    println!(
        "bench/dns: {} s of dnsperf at {} in flight per figure, {} queries one at a time for latency, {} local and {} forwarded names",
        args.seconds, args.in_flight, args.latency_queries, args.names, args.names
    );
    println!();
    println!("| names | server | q/s | server CPU us/query | server CPU use | dnsperf CPU us/query | dnsperf CPU use | p50 us | p99 us | lost | timeouts |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (kind, figs) in results {
        for (f, label) in figs.iter().zip(["weft", "aardvark-dns"]) {
            println!(
                "| {} | {label} | {:.0} | {:.2} | {:.0}% | {:.2} | {:.0}% | {:.1} | {:.1} | {} of {} | {} |",
                kind.label(),
                f.qps,
                f.cpu_us_per_query,
                f.cpu_us_per_query * f.qps / 1e4,
                f.client_cpu_us_per_query,
                f.client_cpu_us_per_query * f.qps / 1e4,
                f.p50_us,
                f.p99_us,
                f.lost,
                f.completed + f.lost,
                f.latency_timeouts
            );
        }
    }
    println!();
    println!("weft / aardvark-dns (goals: q/s >= {GOAL_QPS}x, CPU/query <= {GOAL_CPU}x, p99 <= {GOAL_P99}x):");
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for (kind, [w, a]) in results {
        let (q, c, p50, p99) = (
            w.qps / a.qps,
            w.cpu_us_per_query / a.cpu_us_per_query,
            w.p50_us / a.p50_us,
            w.p99_us / a.p99_us,
        );
        println!(
            "- {:9}: q/s {q:.2}x ({}), CPU/query {c:.2}x ({}), p99 {p99:.2}x ({}), p50 {p50:.2}x",
            kind.label(),
            verdict(q >= GOAL_QPS),
            verdict(c <= GOAL_CPU),
            verdict(p99 <= GOAL_P99)
        );
    }
    println!("took {:.0} s", took.as_secs_f64());
}

/// aardvark-dns forks itself into the background: `run` returns once the
/// server is up, and the server's pid is in `aardvark.pid` of its config
/// directory. It runs in a mount namespace of its own where
/// /etc/resolv.conf is the bench's (naming dnsmasq), since it forwards to
/// the servers of that file. Dropping this stops it.
struct Aardvark {
    pid: ProcId,
}

impl Aardvark {
    fn start(
        args: &Args,
        ns: &weft_bench::netns::Netns,
        conf_dir: &Path,
        resolv: &Path,
        dir: &Path,
    ) -> Result<Aardvark> {
        let mut cmd = ns.entered("unshare")?;
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"mount --bind "$0" /etc/resolv.conf && exec "$1" --config "$2" -p "$3" run"#,
        ])
        .arg(resolv)
        .arg(&args.aardvark)
        .arg(conf_dir)
        .arg(args.aardvark_port.to_string());
        let mut launcher = Daemon::spawn(
            "aardvark-dns launcher",
            cmd,
            &dir.join("aardvark.log"),
            Duration::from_secs(5),
        )?;
        let pid_file = conf_dir.join("aardvark.pid");
        let mut pid = None;
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            pid = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .and_then(ProcId::of);
            pid.is_some()
        });
        let Some(pid) = pid else {
            let status = launcher.exited();
            return bail(format!(
                "aardvark-dns did not start (launcher: {status:?}); its output ends with:\n{}",
                launcher.log_tail(10)
            ));
        };
        // The launcher exits once the server is up; nothing to stop there.
        launcher.stop();
        Ok(Aardvark { pid })
    }
}

impl Drop for Aardvark {
    fn drop(&mut self) {
        if self.pid.alive() {
            // SAFETY: plain syscall on a pid whose identity was just checked.
            unsafe { libc::kill(self.pid.pid, libc::SIGTERM) };
        }
        if !wait_gone(&[self.pid], Duration::from_secs(5)) {
            eprintln!("warning: aardvark-dns ignored SIGTERM; killing it");
            self.pid.kill();
        }
    }
}

/// Runs `f` on a thread that entered the network namespace `path`.
fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = fs::File::open(path).context(format_args!("opening {}", path.display()))?;
    let what = path.display().to_string();
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a descriptor we own.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context(format_args!("setns {what}"));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| sys::Error::new("a thread in the client's namespace panicked"))?
}

/// dnsperf from the client's namespace: (completed, lost, q/s).
fn dnsperf(
    args: &Args,
    netns: &Path,
    server: SocketAddr,
    data: &Path,
    dir: &Path,
) -> Result<(u64, u64, f64)> {
    let mut cmd = weft_testkit::command_in(netns, &args.dnsperf);
    cmd.arg("-s")
        .arg(server.ip().to_string())
        .arg("-p")
        .arg(server.port().to_string())
        .arg("-d")
        .arg(data)
        .args(["-c", "1", "-T", "1", "-t", "2"])
        .arg("-q")
        .arg(args.in_flight.to_string())
        .arg("-l")
        .arg(args.seconds.to_string());
    let (_, out) = sys::timed(&mut cmd, None, dir)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return bail(format!(
            "dnsperf failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let field = |key: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context(format_args!("dnsperf printed no {key:?}:\n{text}"))
    };
    let completed = field("Queries completed:")? as u64;
    let lost = field("Queries lost:")? as u64;
    let qps = field("Queries per second:")?;
    if !text.contains(&format!("NOERROR {completed} ")) {
        return bail(format!("not every dnsperf answer was NOERROR:\n{text}"));
    }
    Ok((completed, lost, qps))
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .context(format_args!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields resume after the last ')'.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    match f.as_slice() {
        [u, s] => Ok(u + s),
        _ => bail(format!("cannot parse /proc/{pid}/stat: {stat}")),
    }
}

/// CPU time (user + system) of the children we have waited for, in us:
/// dnsperf's, taken before and after its run (nsenter execs it, so it is
/// our child itself).
fn children_cpu_us() -> u64 {
    // SAFETY: all-zero is a valid rusage, filled in by the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// A query for the A record of `name`, recursion desired, no EDNS (what
/// dnsperf sends by default).
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The first A record of a reply, if its id is `id`: enough to check that
/// an answer is the expected one.
fn first_a(reply: &[u8], id: u16) -> Option<Ipv4Addr> {
    if reply.len() < 12 || reply[..2] != id.to_be_bytes() {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([reply[i], reply[i + 1]]);
    let (qd, an) = (count(4), count(6));
    let mut at = 12;
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let len = *reply.get(at)? as usize;
            if len == 0 {
                return Some(at + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(at + 2);
            }
            at += 1 + len;
        }
    };
    for _ in 0..qd {
        at = skip_name(at)? + 4;
    }
    for _ in 0..an {
        at = skip_name(at)?;
        let rr = reply.get(at..at + 10)?;
        let (rtype, rdlen) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        at += 10;
        let data = reply.get(at..at + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += rdlen;
    }
    None
}

fn probe(server: SocketAddr, name: &str) -> Result<Option<Ipv4Addr>> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    sock.connect(server).context("connecting a UDP socket")?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .context("setting a timeout")?;
    let mut buf = [0u8; 1500];
    // A few tries: a server may still be binding its sockets.
    for id in 1..=5u16 {
        sock.send(&query(id, name))
            .context(format_args!("sending a query to {server}"))?;
        if let Ok(n) = sock.recv(&mut buf) {
            return Ok(first_a(&buf[..n], id));
        }
    }
    bail(format!("{server} did not answer {name}"))
}

/// `n` queries one at a time, round-robin over `names`, after 200
/// unmeasured ones: each one's time from send to reply, in microseconds,
/// and how many got no reply within 2 s (left out of the times).
fn latency(server: SocketAddr, names: &[String], n: usize) -> Result<(Vec<f64>, usize)> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    sock.connect(server).context("connecting a UDP socket")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .context("setting a timeout")?;
    let queries: Vec<Vec<u8>> = names.iter().map(|n| query(0, n)).collect();
    let mut buf = [0u8; 1500];
    let mut times = Vec::with_capacity(n);
    let mut timeouts = 0;
    let warmup = 200;
    for i in 0..n + warmup {
        let id = (i % 65536) as u16;
        let mut q = queries[i % queries.len()].clone();
        q[..2].copy_from_slice(&id.to_be_bytes());
        let t = Instant::now();
        sock.send(&q).context(format_args!("sending to {server}"))?;
        let got = loop {
            match sock.recv(&mut buf) {
                Ok(len) if len >= 2 && buf[..2] == id.to_be_bytes() => break true,
                // A late reply to an earlier query that timed out.
                Ok(_) => continue,
                Err(_) => break false,
            }
        };
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i >= warmup {
            if got {
                times.push(us);
            } else {
                timeouts += 1;
            }
        }
    }
    Ok((times, timeouts))
}

/// The 1-minute load average (NaN if unreadable), for the report.
fn loadavg() -> f64 {
    weft_bench::iperf::loadavg1().unwrap_or(f64::NAN)
}
