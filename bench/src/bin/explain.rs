//! bench/explain: how long `weft explain SRC DST` takes on a host with many
//! sandboxes (issue 19: under 200 ms with 1000). A fresh agent in a
//! namespace of its own gets `--sandboxes` sandboxes on its default
//! network, a second network `other` with one sandbox, and an "outside"
//! namespace behind a veth pair with the host's default route through it.
//! Then three walks are sampled: same network (the first sandbox to the
//! last), isolated networks (the first sandbox to `other`'s: dropped by
//! weft's nft forward chain) and egress (the first sandbox to an address
//! beyond the outside's gateway: forwarded and masqueraded). Each is timed
//! three ways, one after the other with a random pause between: a direct
//! `POST /v1/explain` on the agent's unix socket (connect to end of answer,
//! no process spawn), the CLI `weft --format json explain A B` (spawn to
//! exit), and the peer: the same walk by hand, the standard commands a
//! learner types (`nsenter --net=NETNS ip route get …`, `ip neigh show`,
//! `ip link show`, `bridge fdb show br …` or `ip route get … iif …`, `nft
//! list table inet weft`), each run as a process in the sandbox's or the
//! host's namespace, their spawn-to-exit times summed per walk. It prints
//! p50, p99 and max per scenario and way, the ratio explain / hand, and the
//! goal check (p99 < 200 ms, socket and CLI).
//!
//! Everything runs inside namespaces named `wftb…-<pid>`, with state under
//! /dev/shm/wftbench-<pid>, and is undone on every exit path; the run ends
//! with the same host check as the other benchmarks. See bench/README.md.

use clap::Parser;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use weft_bench::hostcheck::run_checked;
use weft_bench::netns;
use weft_bench::outside::{Outside, OUTSIDE_ADDR};
use weft_bench::stats::{median, Series, XorShift};
use weft_bench::sys::{self, bail, run_ok, timed, Context, Result, TempTree};
use weft_bench::weft::{self, WeftHarness, WeftOpts};

#[derive(Parser, Debug)]
#[command(
    name = "explain",
    about = "`weft explain` latency on a host with many sandboxes, against the same walk by hand (issue 19)"
)]
struct Args {
    /// The weft binary [default: target/release/weft in the workspace].
    #[arg(long)]
    weft: Option<PathBuf>,
    /// Sandboxes attached to the default network before measuring.
    #[arg(long, default_value_t = 1000)]
    sandboxes: usize,
    /// Samples per scenario and way (socket, CLI, by hand), taken in turn.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Unmeasured rounds before the samples.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Mean pause after each sample, in milliseconds (uniform in 0 to twice this).
    #[arg(long, default_value_t = 5)]
    pause_ms: u64,
    /// Subnet of the agent's default network (inside its namespace).
    #[arg(long, default_value = "10.222.0.0/16")]
    weft_bridge_subnet: String,
    /// Subnet of the second network, `other`.
    #[arg(long, default_value = "10.223.0.0/24")]
    other_subnet: String,
    /// Destination of the egress walk: beyond the outside namespace, which
    /// is the host's default gateway (TEST-NET-2 by default).
    #[arg(long, default_value = "198.51.100.9")]
    egress_to: Ipv4Addr,
    /// Size of the agent's namespace pool.
    #[arg(long, default_value_t = 16)]
    weft_netns_pool: u16,
    /// Where the work directory wftbench-<pid> goes (tmpfs recommended).
    #[arg(long, default_value = "/dev/shm")]
    root: PathBuf,
}

/// A Linux bridge takes 1023 ports; the agent's pool needs a few too.
const MAX_SANDBOXES: usize = 1000;
/// The issue's goal for the p99 of one explain, in ms.
const GOAL_MS: f64 = 200.0;

fn main() -> ExitCode {
    let args = Args::parse();
    run_checked("explain", &args.root.clone(), |base, pid| {
        run(&args, base, pid)
    })
}

/// What `weft inspect` says about a sandbox, as far as the walk by hand needs.
#[derive(Debug, Clone)]
struct Place {
    id: String,
    netns: String,
    ifname: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    host_end: String,
    /// The bridge the host end is a port of (from `ip -j link show`).
    bridge: String,
}

/// One walk, and its timings in ms.
struct Scenario {
    label: &'static str,
    src: String,
    dst: String,
    /// The standard commands of the walk by hand, each a full argv.
    hand: Vec<Vec<String>>,
    /// `delivered` or `dropped`, from the first (unmeasured) explain.
    verdict: String,
    /// The first explain's verdict in words, and its number of hops.
    said: String,
    hops: usize,
    socket: Series,
    cli: Series,
    by_hand: Series,
}

struct Measured {
    bin: PathBuf,
    attach: Series,
    attach_seconds: f64,
    scenarios: Vec<Scenario>,
    load: (f64, f64),
    seconds: f64,
}

fn run(args: &Args, base: &Path, pid: u32) -> Result<bool> {
    if !sys::is_root() {
        return bail("must run as root (it makes network namespaces and starts an agent)");
    }
    if args.samples == 0 {
        return bail("--samples must be positive");
    }
    if args.sandboxes < 2 || args.sandboxes > MAX_SANDBOXES {
        return bail(format!("--sandboxes is 2 to {MAX_SANDBOXES}"));
    }
    let bin = args.weft.clone().unwrap_or_else(weft::default_bin);
    weft::preflight(&opts(args, &bin))?;
    let stale = netns::list_with_prefix(netns::PREFIX);
    if !stale.is_empty() {
        eprintln!("note: namespaces from another run exist (not touched): {stale:?}");
    }
    let tree = TempTree::create(base)?;
    let started = Instant::now();
    let m = measure(args, &bin, tree.path(), pid)?;
    drop(tree);
    // The goal's outcome is a result, printed; not a failure of the run.
    print_report(args, &m, started.elapsed());
    Ok(true)
}

fn opts(args: &Args, bin: &Path) -> WeftOpts {
    WeftOpts {
        bin: bin.to_path_buf(),
        bridge_subnet: args.weft_bridge_subnet.clone(),
        netns_pool: args.weft_netns_pool,
        agent_args: Vec::new(),
    }
}

fn measure(args: &Args, bin: &Path, dir: &Path, pid: u32) -> Result<Measured> {
    let agent_dir = dir.join("agent");
    std::fs::create_dir(&agent_dir).context(format_args!("creating {}", agent_dir.display()))?;
    let scratch = dir.join("scratch");
    std::fs::create_dir(&scratch).context(format_args!("creating {}", scratch.display()))?;
    let mut h = WeftHarness::start(&opts(args, bin), &agent_dir, pid)?;

    let mut attach = Series::default();
    let mut ids = Vec::with_capacity(args.sandboxes);
    let t0 = Instant::now();
    for i in 0..args.sandboxes {
        let r = h
            .run_detached(&[], &["sleep", "infinity"])
            .context(format_args!(
                "attaching sandbox {} of {}",
                i + 1,
                args.sandboxes
            ))?;
        attach.push(r.wall);
        ids.push(r.id);
        if (i + 1) % 100 == 0 {
            eprintln!(
                "  {} sandboxes attached ({:.1} s)",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
        sys::check_interrupted()?;
    }
    let attach_seconds = t0.elapsed().as_secs_f64();
    run_ok(
        h.cli()?
            .args(["network", "create", "--subnet", &args.other_subnet, "other"]),
        Duration::from_secs(60),
    )?;
    let other = h.run_detached_with(&["--net", "other"], &[], &["sleep", "infinity"])?;
    // Drops before `h`: the outside namespace and the veth pair go first.
    let outside = Outside::attach(h.netns(), &format!("wftbxout-{pid}"))?;
    h.netns()
        .try_ip(&["route", "add", "default", "via", &OUTSIDE_ADDR.to_string()])
        .context("adding the host's default route via the outside")?;

    let first = place(&h, &ids[0])?;
    let last = place(&h, &ids[ids.len() - 1])?;
    let iso = place(&h, &other.id)?;
    // One packet on the same network first, so that neighbour and FDB
    // entries exist as on a host whose sandboxes talk (and so that the
    // explanation is checked against a real packet once).
    let ping = run_ok(
        &mut nsenter(
            &first.netns,
            &["ping", "-c", "1", "-W", "2", &last.ip.to_string()],
        ),
        Duration::from_secs(10),
    );
    if let Err(e) = ping {
        eprintln!("note: the ping from the first sandbox to the last failed: {e}");
    }

    let host_ns = h.netns().path().to_string_lossy().into_owned();
    let a = &first;
    let sb = |argv: &[&str]| nsenter_argv(&a.netns, argv);
    let host = |argv: &[&str]| nsenter_argv(&host_ns, argv);
    let forward_walk = |to: Ipv4Addr| {
        vec![
            sb(&["ip", "route", "get", &to.to_string()]),
            sb(&[
                "ip",
                "neigh",
                "show",
                &a.gateway.to_string(),
                "dev",
                &a.ifname,
            ]),
            host(&["ip", "link", "show", &a.host_end]),
            host(&[
                "ip",
                "route",
                "get",
                &to.to_string(),
                "from",
                &a.ip.to_string(),
                "iif",
                &a.bridge,
            ]),
            host(&["nft", "list", "table", "inet", "weft"]),
        ]
    };
    let mut scenarios = vec![
        Scenario::new(
            "same network",
            &a.id,
            &last.id,
            vec![
                sb(&["ip", "route", "get", &last.ip.to_string()]),
                sb(&[
                    "ip",
                    "neigh",
                    "show",
                    &last.ip.to_string(),
                    "dev",
                    &a.ifname,
                ]),
                host(&["ip", "link", "show", &a.host_end]),
                host(&["bridge", "fdb", "show", "br", &a.bridge]),
                host(&["nft", "list", "table", "inet", "weft"]),
            ],
        ),
        Scenario::new("isolated networks", &a.id, &iso.id, forward_walk(iso.ip)),
        Scenario::new(
            "egress",
            &a.id,
            &args.egress_to.to_string(),
            forward_walk(args.egress_to),
        ),
    ];
    let sock = h.socket();
    for s in &mut scenarios {
        let (_, v) = post_explain(&sock, &s.src, &s.dst)?;
        s.verdict = verdict_of(&v)?;
        s.hops = v.get("hops").and_then(Value::as_array).map_or(0, Vec::len);
        s.said = match s.verdict.as_str() {
            "delivered" => format!(
                "delivered to {}",
                v.pointer("/verdict/to")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            ),
            _ => format!(
                "dropped at hop {}: {}",
                v.pointer("/verdict/hop")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                v.pointer("/verdict/why")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            ),
        };
        eprintln!("  {}: {} ({} hops)", s.label, s.said, s.hops);
        // Each hand command must work once before it is timed.
        for argv in &s.hand {
            run_ok(&mut command(argv), Duration::from_secs(30))?;
        }
    }
    let want = [
        ("same network", "delivered"),
        ("isolated networks", "dropped"),
    ];
    for (label, verdict) in want {
        let s = scenarios
            .iter()
            .find(|s| s.label == label)
            .expect("made above");
        if s.verdict != verdict {
            return bail(format!(
                "{label}: explain says {}, expected {verdict}",
                s.said
            ));
        }
    }

    eprintln!(
        "  sampling: {} rounds (+{} warm-up) of 3 scenarios x 3 ways",
        args.samples, args.warmup
    );
    let load_start = loadavg();
    let started = Instant::now();
    let mut rng = XorShift::seeded();
    for round in 0..args.warmup + args.samples {
        let measured = round >= args.warmup;
        for s in &mut scenarios {
            sys::check_interrupted()?;
            let (t, v) = post_explain(&sock, &s.src, &s.dst)?;
            s.check(&v, "POST /v1/explain")?;
            if measured {
                s.socket.push(t);
            }
            pause(&mut rng, args.pause_ms);
            let t = cli_explain(&h, &scratch, s)?;
            if measured {
                s.cli.push(t);
            }
            pause(&mut rng, args.pause_ms);
            let t = walk_by_hand(&scratch, &s.hand)?;
            if measured {
                s.by_hand.push(t);
            }
            pause(&mut rng, args.pause_ms);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let load = (load_start, loadavg());
    drop(outside);
    drop(h);
    Ok(Measured {
        bin: bin.to_path_buf(),
        attach,
        attach_seconds,
        scenarios,
        load,
        seconds,
    })
}

impl Scenario {
    fn new(label: &'static str, src: &str, dst: &str, hand: Vec<Vec<String>>) -> Scenario {
        Scenario {
            label,
            src: src.to_string(),
            dst: dst.to_string(),
            hand,
            verdict: String::new(),
            said: String::new(),
            hops: 0,
            socket: Series::default(),
            cli: Series::default(),
            by_hand: Series::default(),
        }
    }

    /// Every sample must give the first sample's verdict.
    fn check(&self, v: &Value, way: &str) -> Result<()> {
        let got = verdict_of(v)?;
        if got != self.verdict {
            return bail(format!(
                "{} ({way}): verdict {got}, the first explain said {}",
                self.label, self.said
            ));
        }
        Ok(())
    }
}

fn verdict_of(v: &Value) -> Result<String> {
    v.pointer("/verdict/verdict")
        .and_then(Value::as_str)
        .map(String::from)
        .context(format_args!("an explanation without a verdict: {v}"))
}

fn pause(rng: &mut XorShift, pause_ms: u64) {
    let us = rng.below(2 * pause_ms * 1000 + 1);
    std::thread::sleep(Duration::from_micros(us));
}

/// `weft --format json inspect ID`: the namespace, interface, addresses
/// and host end of its first endpoint; the bridge from `ip -j link show`.
fn place(h: &WeftHarness, id: &str) -> Result<Place> {
    let out = run_ok(
        h.cli()?.args(["--format", "json", "inspect", id]),
        Duration::from_secs(30),
    )?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .context(format_args!("`weft inspect {id}` did not print JSON"))?;
    let sb = v
        .get(0)
        .context(format_args!("`weft inspect {id}` printed no sandbox"))?;
    let ep = sb
        .pointer("/attachment/endpoints/0")
        .context(format_args!("sandbox {id} has no endpoint: {sb}"))?;
    let s = |v: &Value, k: &str| -> Result<String> {
        v.get(k)
            .and_then(Value::as_str)
            .map(String::from)
            .context(format_args!("sandbox {id}: no string {k:?} in {v}"))
    };
    let ip = |k: &str| -> Result<Ipv4Addr> {
        s(ep, k)?
            .parse()
            .ok()
            .context(format_args!("sandbox {id}: {k} is not an IPv4 address"))
    };
    let host_end = s(ep, "host_ifname")?;
    let link = h
        .netns()
        .try_ip(&["-j", "link", "show", "dev", &host_end])
        .context(format_args!("ip -j link show dev {host_end}"))?;
    let lv: Value = serde_json::from_slice(&link.stdout)
        .context(format_args!("`ip -j link show dev {host_end}` is not JSON"))?;
    let bridge = lv
        .pointer("/0/master")
        .and_then(Value::as_str)
        .map(String::from)
        .context(format_args!("{host_end} has no master: {lv}"))?;
    Ok(Place {
        id: id.to_string(),
        netns: s(sb, "netns")?,
        ifname: s(ep, "ifname")?,
        ip: ip("ip")?,
        gateway: ip("gateway")?,
        host_end,
        bridge,
    })
}

fn nsenter_argv(netns: &str, argv: &[&str]) -> Vec<String> {
    let mut v = vec!["nsenter".to_string(), format!("--net={netns}")];
    v.extend(argv.iter().map(|a| a.to_string()));
    v
}

fn nsenter(netns: &str, argv: &[&str]) -> Command {
    command(&nsenter_argv(netns, argv))
}

fn command(argv: &[String]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// The walk by hand: each command spawn to exit, one after the other,
/// the times summed (its output goes to a file, as a terminal would show it).
fn walk_by_hand(scratch: &Path, hand: &[Vec<String>]) -> Result<Duration> {
    let mut total = Duration::ZERO;
    for argv in hand {
        let mut cmd = command(argv);
        let (t, out) = timed(&mut cmd, None, scratch)?;
        if !out.status.success() {
            return Err(sys::failed(&cmd, &out));
        }
        total += t;
    }
    Ok(total)
}

/// `weft --format json explain SRC DST`, spawn to exit; then checked.
fn cli_explain(h: &WeftHarness, scratch: &Path, s: &Scenario) -> Result<Duration> {
    let mut cmd = h.cli()?;
    cmd.args(["--format", "json", "explain", &s.src, &s.dst]);
    let (took, out) = timed(&mut cmd, None, scratch)?;
    if !out.status.success() {
        return Err(sys::failed(&cmd, &out));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .context("`weft --format json explain` did not print JSON")?;
    s.check(&v, "CLI")?;
    Ok(took)
}

/// `POST /v1/explain` on the agent's socket, timed from connect to the end
/// of the answer; then the body parsed (status 200).
fn post_explain(sock: &Path, src: &str, dst: &str) -> Result<(Duration, Value)> {
    let what = || format!("POST /v1/explain {src} -> {dst} on {}", sock.display());
    let body =
        serde_json::json!({"src": src, "dst": dst, "proto": "icmp", "port": null}).to_string();
    let request = format!(
        "POST /v1/explain HTTP/1.1\r\nHost: weft\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    let mut s = UnixStream::connect(sock).context(what())?;
    s.write_all(request.as_bytes()).context(what())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context(what())?;
    let took = t0.elapsed();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context(format_args!("{}: no end of headers", what()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut payload = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload).context(format_args!("{}: bad chunked body", what()))?;
    }
    if !head.starts_with("HTTP/1.1 200") {
        return bail(format!(
            "{}: {}: {}",
            what(),
            head.lines().next().unwrap_or(""),
            String::from_utf8_lossy(&payload)
        ));
    }
    let v: Value = serde_json::from_slice(&payload)
        .context(format_args!("{}: the body is not JSON", what()))?;
    Ok((took, v))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

fn print_report(args: &Args, m: &Measured, total: Duration) {
    println!(
        "explain: {} sandboxes on the default network + 1 on `other` ({}), {} samples per scenario and way (+{} warm-up rounds), in turn socket, CLI, by hand, random pause 0-{} ms",
        args.sandboxes,
        args.other_subnet,
        args.samples,
        args.warmup,
        2 * args.pause_ms
    );
    println!(
        "weft {}; kernel {}, {} CPUs",
        m.bin.display(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "attach (context): {} sandboxes in {:.1} s, `weft run -d` median {:.1} ms, p99 {:.1} ms, first 10 {:.1} ms, last 10 {:.1} ms",
        m.attach.len(),
        m.attach_seconds,
        median(&m.attach.0),
        m.attach.p(0.99),
        m.attach.summary().first10_median_ms,
        m.attach.summary().last10_median_ms
    );
    println!(
        "sampling: {:.1} s, 1-minute load average at start/end {:.2}/{:.2}",
        m.seconds, m.load.0, m.load.1
    );
    for s in &m.scenarios {
        println!(
            "  {}: {} -> {}: {} ({} hops)",
            s.label,
            short(&s.src),
            short(&s.dst),
            s.said,
            s.hops
        );
    }
    println!();
    println!(
        "  {:<18} {:<26} {:>9} {:>9} {:>9} {:>8}",
        "ms", "way", "p50", "p99", "max", "samples"
    );
    for s in &m.scenarios {
        for (way, series) in [
            ("POST /v1/explain", &s.socket),
            ("weft explain (CLI)", &s.cli),
            ("by hand (5 commands)", &s.by_hand),
        ] {
            println!(
                "  {:<18} {:<26} {:>9.3} {:>9.3} {:>9.3} {:>8}",
                s.label,
                way,
                median(&series.0),
                series.p(0.99),
                series.max(),
                series.len()
            );
        }
    }
    println!();
    println!("ratio explain / by hand (lower is better for explain):");
    for s in &m.scenarios {
        println!(
            "  {:<18} socket p50 {:.2}, p99 {:.2}; CLI p50 {:.2}, p99 {:.2}",
            s.label,
            median(&s.socket.0) / median(&s.by_hand.0),
            s.socket.p(0.99) / s.by_hand.p(0.99),
            median(&s.cli.0) / median(&s.by_hand.0),
            s.cli.p(0.99) / s.by_hand.p(0.99)
        );
    }
    let worst = |f: fn(&Scenario) -> &Series| {
        m.scenarios
            .iter()
            .map(|s| (f(s).p(0.99), s.label))
            .fold((f64::NAN, ""), |a, b| if a.0 >= b.0 { a } else { b })
    };
    let (sock99, sock_at) = worst(|s| &s.socket);
    let (cli99, cli_at) = worst(|s| &s.cli);
    let sock_ok = sock99 < GOAL_MS;
    let cli_ok = cli99 < GOAL_MS;
    println!();
    println!(
        "goal (issue 19): p99 < {GOAL_MS} ms with {} sandboxes: socket {} (worst p99 {sock99:.1} ms, {sock_at}); CLI {} (worst p99 {cli99:.1} ms, {cli_at})",
        args.sandboxes,
        if sock_ok { "met" } else { "NOT met" },
        if cli_ok { "met" } else { "NOT met" },
    );
    println!("total {:.1} s", total.as_secs_f64());
}

/// A sandbox id's first 12 characters (addresses unchanged).
fn short(s: &str) -> &str {
    if s.parse::<Ipv4Addr>().is_ok() {
        s
    } else {
        &s[..s.len().min(12)]
    }
}

/// The 1-minute load average (NaN if unreadable), for the report.
fn loadavg() -> f64 {
    weft_bench::iperf::loadavg1().unwrap_or(f64::NAN)
}
