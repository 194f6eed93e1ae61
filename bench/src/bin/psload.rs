//! bench/psload: how long `weft ps` takes while the agent is busy with
//! writes (issue 15). A fresh agent in a namespace of its own gets a few
//! sandboxes; then `weft ps` is sampled, first with the agent idle, then
//! while another thread runs `weft network create` / `weft network rm`
//! pairs back to back. Each sample is timed two ways: a direct HTTP
//! `GET /v1/sandboxes` on the agent's unix socket (no process spawn) and
//! the CLI, `weft --format json ps` (spawn to exit). It prints p50, p99 and
//! max per way and phase, and the ratio p99(writes) / p99(idle), whose goal
//! is <= 2. A third kind, the control, asks the same socket for a path
//! weft does not serve (a 404 that reads no state): how much the write
//! loop's CPU use alone (CLI and nft processes on the same cores) slows
//! any answer of the agent, the floor under the other two. With `--weft` given more than once, each binary is measured in
//! turn with an agent of its own and compared with the first.
//!
//! Everything runs inside the namespace `wftbench-<pid>`, with state under
//! /dev/shm/wftbench-<pid>, and is undone on every exit path; the run ends
//! with the same host check as the other benchmarks. See bench/README.md.

use clap::Parser;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weft_bench::hostcheck::run_checked;
use weft_bench::netns;
use weft_bench::stats::{median, percentile, Series, XorShift};
use weft_bench::sys::{self, bail, run_ok, timed, Context, Result, TempTree};
use weft_bench::weft::{self, WeftHarness, WeftOpts};

#[derive(Parser, Debug)]
#[command(
    name = "psload",
    about = "`weft ps` latency with the agent idle and while networks are created and removed (issue 15)"
)]
struct Args {
    /// The weft binary; give it several times to measure several builds
    /// in one run (each with a fresh agent), compared with the first
    /// [default: target/release/weft in the workspace].
    #[arg(long)]
    weft: Vec<PathBuf>,
    /// Sandboxes attached before measuring (what `ps` lists).
    #[arg(long, default_value_t = 10)]
    sandboxes: usize,
    /// `ps` samples per phase and kind (socket GET, CLI), taken alternately.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Unmeasured samples before each phase.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// `network create` / `network rm` pairs per round of the write loop;
    /// rounds repeat until the samples are done.
    #[arg(long, default_value_t = 20)]
    pairs: usize,
    /// Mean pause after each sample, in milliseconds (uniform in 0 to twice this).
    #[arg(long, default_value_t = 5)]
    pause_ms: u64,
    /// Subnet of the agent's default network (inside its namespace).
    #[arg(long, default_value = "10.221.0.0/16")]
    weft_bridge_subnet: String,
    /// Size of the agent's namespace pool.
    #[arg(long, default_value_t = 16)]
    weft_netns_pool: u16,
    /// Where the work directory wftbench-<pid> goes (tmpfs recommended).
    #[arg(long, default_value = "/dev/shm")]
    root: PathBuf,
}

/// A Linux bridge takes 1023 ports; the agent's pool needs a few too.
const MAX_SANDBOXES: usize = 1000;
/// The goal for p99(writes) / p99(idle).
const GOAL: f64 = 2.0;

fn main() -> ExitCode {
    let args = Args::parse();
    run_checked("psload", &args.root.clone(), |base, pid| {
        run(&args, base, pid)
    })
}

/// Timings of one phase, in ms.
#[derive(Default)]
struct Phase {
    get: Series,
    cli: Series,
    /// A 404 from the agent's socket: no state read, no lock.
    control: Series,
    /// Write loop only: wall times of `network create` and `network rm`.
    create: Series,
    remove: Series,
    seconds: f64,
    /// 1-minute load average at the start and at the end of the phase.
    load: (f64, f64),
}

struct Measured {
    bin: PathBuf,
    idle: Phase,
    writes: Phase,
}

fn run(args: &Args, base: &Path, pid: u32) -> Result<bool> {
    if !sys::is_root() {
        return bail("must run as root (it makes a network namespace and starts an agent)");
    }
    if args.samples == 0 || args.pairs == 0 {
        return bail("--samples and --pairs must be positive");
    }
    if args.sandboxes > MAX_SANDBOXES {
        return bail(format!("--sandboxes is at most {MAX_SANDBOXES}"));
    }
    let bins = if args.weft.is_empty() {
        vec![weft::default_bin()]
    } else {
        args.weft.clone()
    };
    for bin in &bins {
        weft::preflight(&opts(args, bin))?;
    }
    let stale = netns::list_with_prefix(netns::PREFIX);
    if !stale.is_empty() {
        eprintln!("note: namespaces from another run exist (not touched): {stale:?}");
    }
    let tree = TempTree::create(base)?;
    let started = Instant::now();
    let mut results = Vec::new();
    for (i, bin) in bins.iter().enumerate() {
        eprintln!("[{}/{}] {}", i + 1, bins.len(), bin.display());
        let dir = tree.path().join(format!("w{i}"));
        sys::create_fresh_dir(&dir)?;
        let m = measure_one(args, bin, &dir, pid)?;
        sys::remove_tree(&dir);
        results.push(m);
    }
    drop(tree);
    print_report(args, &results, started.elapsed());
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

/// One binary: a fresh agent, the sandboxes, the idle phase, the write
/// phase; the agent and everything of it go when `h` drops.
fn measure_one(args: &Args, bin: &Path, dir: &Path, pid: u32) -> Result<Measured> {
    let agent_dir = dir.join("agent");
    std::fs::create_dir(&agent_dir).context(format_args!("creating {}", agent_dir.display()))?;
    let scratch = dir.join("scratch");
    std::fs::create_dir(&scratch).context(format_args!("creating {}", scratch.display()))?;
    let mut h = WeftHarness::start(&opts(args, bin), &agent_dir, pid)?;
    for i in 0..args.sandboxes {
        h.run_detached(&[], &["sleep", "infinity"])
            .context(format_args!(
                "attaching sandbox {} of {}",
                i + 1,
                args.sandboxes
            ))?;
        sys::check_interrupted()?;
    }
    eprintln!("  {} sandboxes attached; idle phase", args.sandboxes);
    let idle = sample_phase(args, &h, &scratch, None)?;
    eprintln!(
        "  idle: get p99 {:.3} ms, cli p99 {:.3} ms; write phase",
        percentile(&idle.get.0, 0.99),
        percentile(&idle.cli.0, 0.99)
    );
    let writes = with_writes(args, &h, &scratch)?;
    eprintln!(
        "  writes: get p99 {:.3} ms, cli p99 {:.3} ms, {} create/rm pairs",
        percentile(&writes.get.0, 0.99),
        percentile(&writes.cli.0, 0.99),
        writes.remove.len()
    );
    drop(h);
    Ok(Measured {
        bin: bin.to_path_buf(),
        idle,
        writes,
    })
}

/// Runs the sampler while a second thread creates and removes networks.
fn with_writes(args: &Args, h: &WeftHarness, scratch: &Path) -> Result<Phase> {
    let stop = AtomicBool::new(false);
    let pairs_done = AtomicUsize::new(0);
    let times: Mutex<(Series, Series)> = Mutex::default();
    let (sampled, written) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let r = write_loop(args, h, &stop, &pairs_done, &times);
            // A failed writer stops the sampler too.
            stop.store(true, Ordering::SeqCst);
            r
        });
        // The first pair under way before the first sample.
        let began = Instant::now();
        while pairs_done.load(Ordering::SeqCst) == 0
            && !stop.load(Ordering::SeqCst)
            && began.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let sampled = sample_phase(args, h, scratch, Some(&stop));
        stop.store(true, Ordering::SeqCst);
        (sampled, writer.join())
    });
    match written {
        Ok(r) => r?,
        Err(_) => return bail("the write loop panicked"),
    }
    let mut phase = sampled?;
    let (create, remove) = times.into_inner().unwrap_or_else(|p| p.into_inner());
    phase.create = create;
    phase.remove = remove;
    Ok(phase)
}

/// `weft network create` / `weft network rm` pairs, `args.pairs` per
/// round, until `stop`. Counts a pair once its rm returned.
fn write_loop(
    args: &Args,
    h: &WeftHarness,
    stop: &AtomicBool,
    pairs_done: &AtomicUsize,
    times: &Mutex<(Series, Series)>,
) -> Result<()> {
    let t = Duration::from_secs(60);
    while !stop.load(Ordering::SeqCst) {
        for k in 0..args.pairs {
            if sys::interrupted() {
                return bail("interrupted");
            }
            // Each pair removes what it made, so stopping between pairs
            // leaves no network behind.
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let name = format!("psload-{k}");
            let mut create = h.cli()?;
            create.args(["network", "create", &name]);
            let t0 = Instant::now();
            run_ok(&mut create, t)?;
            let created = t0.elapsed();
            let mut rm = h.cli()?;
            rm.args(["network", "rm", &name]);
            let t0 = Instant::now();
            run_ok(&mut rm, t)?;
            let removed = t0.elapsed();
            {
                let mut g = times.lock().unwrap_or_else(|p| p.into_inner());
                g.0.push(created);
                g.1.push(removed);
            }
            pairs_done.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// `args.samples` samples of each kind (after `args.warmup` unmeasured
/// ones), the kinds alternating: a socket GET, then a CLI `ps`, each
/// followed by a random pause of 0 to 2 x `--pause-ms`. One sample at a time
/// and a random pause, so that neither kind is systematically the one that
/// meets a write holding the agent (a GET and a CLI run back to back would
/// split the wait between them by their order, not by what they cost).
/// With `stop`, a writer that stopped (failed) before the samples were
/// done is an error.
fn sample_phase(
    args: &Args,
    h: &WeftHarness,
    scratch: &Path,
    stop: Option<&AtomicBool>,
) -> Result<Phase> {
    let mut phase = Phase::default();
    let load_start = loadavg();
    let started = Instant::now();
    let sock = h.socket();
    let mut rng = XorShift::seeded();
    for i in 0..2 * (args.warmup + args.samples) {
        sys::check_interrupted()?;
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return bail("the write loop stopped before the samples were done");
        }
        let measured = i / 2 >= args.warmup;
        if i % 2 == 0 {
            let t = get_sandboxes(&sock, args.sandboxes)?;
            if measured {
                phase.get.push(t);
            }
            // The control right after each GET, same socket, same load.
            let t = get_control(&sock)?;
            if measured {
                phase.control.push(t);
            }
        } else {
            let t = cli_ps(h, scratch, args.sandboxes)?;
            if measured {
                phase.cli.push(t);
            }
        }
        let pause_us = rng.below(2 * args.pause_ms * 1000 + 1);
        std::thread::sleep(Duration::from_micros(pause_us));
    }
    phase.seconds = started.elapsed().as_secs_f64();
    phase.load = (load_start, loadavg());
    Ok(phase)
}

/// `GET /v1/sandboxes` on the agent's socket, timed from connect to the
/// end of the answer; then checked (status 200, a list of `want`).
fn get_sandboxes(sock: &Path, want: usize) -> Result<Duration> {
    let what = || format!("GET /v1/sandboxes on {}", sock.display());
    let t0 = Instant::now();
    let mut s = UnixStream::connect(sock).context(what())?;
    s.write_all(b"GET /v1/sandboxes HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n")
        .context(what())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context(what())?;
    let took = t0.elapsed();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context(format_args!("{}: no end of headers", what()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    if !head.starts_with("HTTP/1.1 200") {
        return bail(format!("{}: {}", what(), head.lines().next().unwrap_or("")));
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        let list: serde_json::Value = serde_json::from_slice(&raw[end + 4..])
            .context(format_args!("{}: the body is not JSON", what()))?;
        let n = list.as_array().map(Vec::len);
        if n != Some(want) {
            return bail(format!("{}: {n:?} sandboxes, not {want}", what()));
        }
    }
    Ok(took)
}

/// A path the agent does not serve, timed like [`get_sandboxes`]; the
/// answer must be a 404 (nothing read, nothing locked).
fn get_control(sock: &Path) -> Result<Duration> {
    let what = || format!("GET /v1/psload-control on {}", sock.display());
    let t0 = Instant::now();
    let mut s = UnixStream::connect(sock).context(what())?;
    s.write_all(b"GET /v1/psload-control HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n")
        .context(what())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context(what())?;
    let took = t0.elapsed();
    if !raw.starts_with(b"HTTP/1.1 404") {
        let first = String::from_utf8_lossy(&raw);
        return bail(format!(
            "{}: expected a 404, got {}",
            what(),
            first.lines().next().unwrap_or("nothing")
        ));
    }
    Ok(took)
}

/// `weft --format json ps`, spawn to exit; then checked.
fn cli_ps(h: &WeftHarness, scratch: &Path, want: usize) -> Result<Duration> {
    let mut cmd = h.cli()?;
    cmd.args(["--format", "json", "ps"]);
    let (took, out) = timed(&mut cmd, None, scratch)?;
    if !out.status.success() {
        return Err(sys::failed(&cmd, &out));
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("`weft --format json ps` did not print JSON")?;
    let n = list.as_array().map(Vec::len);
    if n != Some(want) {
        return bail(format!(
            "`weft --format json ps` listed {n:?} sandboxes, not {want}"
        ));
    }
    Ok(took)
}

fn print_report(args: &Args, results: &[Measured], total: Duration) {
    println!(
        "psload: {} sandboxes, {} samples per phase and kind (+{} warm-up), alternating GET and CLI, random pause 0-{} ms, writes: rounds of {} `network create`/`network rm` pairs",
        args.sandboxes,
        args.samples,
        args.warmup,
        2 * args.pause_ms,
        args.pairs
    );
    println!(
        "kernel {}, {} CPUs",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    for m in results {
        println!();
        println!("weft {}", m.bin.display());
        println!(
            "  {:<28} {:>9} {:>9} {:>9} {:>9}",
            "ms", "p50", "p99", "max", "samples"
        );
        for (label, s) in [
            ("GET /v1/sandboxes, idle", &m.idle.get),
            ("GET /v1/sandboxes, writes", &m.writes.get),
            ("weft ps (CLI), idle", &m.idle.cli),
            ("weft ps (CLI), writes", &m.writes.cli),
            ("control (404), idle", &m.idle.control),
            ("control (404), writes", &m.writes.control),
        ] {
            println!(
                "  {:<28} {:>9.3} {:>9.3} {:>9.3} {:>9}",
                label,
                median(&s.0),
                s.p(0.99),
                s.max(),
                s.len()
            );
        }
        println!(
            "  load average (1 min) at start/end: idle {:.2}/{:.2}, writes {:.2}/{:.2}",
            m.idle.load.0, m.idle.load.1, m.writes.load.0, m.writes.load.1
        );
        println!(
            "  writes during the phase: {} pairs in {:.1} s; network create median {:.1} ms (p99 {:.1}), network rm median {:.1} ms (p99 {:.1})",
            m.writes.remove.len(),
            m.writes.seconds,
            median(&m.writes.create.0),
            m.writes.create.p(0.99),
            median(&m.writes.remove.0),
            m.writes.remove.p(0.99)
        );
        for (label, idle, writes) in [
            ("GET", &m.idle.get, &m.writes.get),
            ("CLI", &m.idle.cli, &m.writes.cli),
            ("control", &m.idle.control, &m.writes.control),
        ] {
            let r = writes.p(0.99) / idle.p(0.99);
            println!(
                "  {label}: p99(writes)/p99(idle) = {r:.2} (goal <= {GOAL}: {}); p50(writes)/p50(idle) = {:.2}",
                if r <= GOAL { "met" } else { "NOT met" },
                median(&writes.0) / median(&idle.0)
            );
        }
    }
    if results.len() > 1 {
        let first = &results[0];
        println!();
        println!(
            "against the first binary ({}), ratio of p99 under writes (lower is better):",
            first.bin.display()
        );
        for m in &results[1..] {
            println!(
                "  {}: GET {:.2}, CLI {:.2}",
                m.bin.display(),
                m.writes.get.p(0.99) / first.writes.get.p(0.99),
                m.writes.cli.p(0.99) / first.writes.cli.p(0.99)
            );
        }
    }
    println!("total {:.1} s", total.as_secs_f64());
}

/// The 1-minute load average (NaN if unreadable): other work on the machine
/// shows here, and in the idle figures.
fn loadavg() -> f64 {
    weft_bench::iperf::loadavg1().unwrap_or(f64::NAN)
}
