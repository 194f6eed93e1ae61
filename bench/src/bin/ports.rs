//! bench/ports: published ports. (1) iperf3 throughput through a published
//! port against the same server reached directly, for weft and for Docker's
//! `-p`, from an "outside" namespace and from the host itself; (2) weft's
//! nft rule count and the time to publish one more port with 10, 1000 and
//! 10000 ports already published. See bench/README.md.
//!
//! Everything runs inside network namespaces the benchmark makes (names
//! starting with `wftb`), with state under /dev/shm/wftbench-<pid>; all of it
//! is undone on every exit path, Ctrl-C included.

use clap::Parser;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};
use weft_bench::docker::{self, DockerHarness, DockerOpts};
use weft_bench::hostcheck::run_checked;
use weft_bench::image;
use weft_bench::iperf::{self, IperfOpts};
use weft_bench::netns::{self, Netns};
use weft_bench::nftcount::{self, TableCount};
use weft_bench::outside::{self, Outside};
use weft_bench::portsreport::{Level, Pair, PathResult, PortsReport, Scale};
use weft_bench::stats::median;
use weft_bench::sys::{self, bail, require_exe, Context, Result, TempTree};
use weft_bench::weft::{self, WeftHarness, WeftOpts};

#[derive(Parser, Debug)]
#[command(
    name = "ports",
    about = "Published ports: iperf3 throughput through weft's and Docker's -p vs direct, and weft's cost of publishing with thousands of ports published"
)]
struct Args {
    /// The weft binary [default: target/release/weft in the workspace].
    #[arg(long)]
    weft: Option<PathBuf>,
    /// Subnet for weft's default network (inside the agent's namespace).
    #[arg(long, default_value = "10.211.0.0/16")]
    weft_bridge_subnet: String,
    /// Size of the agent's namespace pool (`weft agent --netns-pool`).
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
    /// iperf3, run as client and as server (also copied into the Docker image).
    #[arg(long, default_value = "/usr/bin/iperf3")]
    iperf3: PathBuf,
    /// Seconds per throughput measurement (iperf3 -t).
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Measurements per path; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// TCP congestion control, pinned on both ends (iperf3 -C).
    #[arg(long, default_value = "cubic")]
    congestion: String,
    /// Port of the iperf3 server, published as PORT:PORT.
    #[arg(long, default_value_t = 5201)]
    port: u16,
    /// Each throughput measurement (and each level of the publish test)
    /// starts once the 1-minute load average is below this …
    #[arg(long, default_value_t = 1.0)]
    max_load: f64,
    /// … or after waiting this many seconds (then it says so).
    #[arg(long, default_value_t = 600)]
    max_load_wait: u64,
    /// Numbers of published ports at which publishing one more is timed.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    levels: Vec<usize>,
    /// Single-port publishes timed at each level (then removed again).
    #[arg(long, default_value_t = 20)]
    publishes: usize,
    /// At most this many -p values per bulk `weft run`.
    #[arg(long, default_value_t = 1000)]
    chunk: usize,
    /// First host port of the bulk ports (FIRST:80, FIRST+1:80, …); the
    /// timed publishes use the ports right after the last bulk port.
    #[arg(long, default_value_t = 20000)]
    first_port: u16,
    /// Pause between timed publishes, so the agent's namespace pool refills.
    #[arg(long, default_value_t = 100)]
    pause_ms: u64,
    /// Leave out the throughput measurements.
    #[arg(long)]
    skip_throughput: bool,
    /// Leave out Docker's throughput.
    #[arg(long)]
    skip_docker: bool,
    /// Leave out the rule count and publish times.
    #[arg(long)]
    skip_publish: bool,
    /// Where the work directory wftbench-<pid> goes (tmpfs recommended).
    #[arg(long, default_value = "/dev/shm")]
    root: PathBuf,
    /// Print the results as JSON (with every sample) instead of text.
    #[arg(long)]
    json: bool,
}

/// BR_MAX_PORTS is 1024, port numbers start at 1.
const MAX_BRIDGE_PORTS: usize = 1023;
const DOCKER_IMAGE: &str = "wftbench-iperf3:latest";
/// What the timed publishes and the bulk ports lead to in the sandbox.
const CONTAINER_PORT: u16 = 80;

fn main() -> ExitCode {
    let args = Args::parse();
    run_checked("ports", &args.root.clone(), |base, pid| {
        run(&args, base, pid)
    })
}

struct Plan {
    weft: WeftOpts,
    docker: DockerOpts,
    iperf: IperfOpts,
}

fn check_args(args: &Args) -> Result<()> {
    if !sys::is_root() {
        return bail("must run as root (it makes network namespaces and starts daemons)");
    }
    if args.reps == 0 || args.seconds == 0 {
        return bail("--reps and --seconds must be positive");
    }
    if args.levels.is_empty() || args.levels[0] == 0 || args.levels.windows(2).any(|w| w[0] >= w[1])
    {
        return bail("--levels needs increasing positive numbers, e.g. --levels 10,1000,10000");
    }
    if args.chunk == 0 || args.publishes == 0 {
        return bail("--chunk and --publishes must be positive");
    }
    let max = *args.levels.last().expect("checked non-empty");
    let last_port = usize::from(args.first_port) + max + args.publishes - 1;
    if last_port > 65535 {
        return bail(format!(
            "--first-port {} + {max} bulk ports + {} timed publishes run past port 65535",
            args.first_port, args.publishes
        ));
    }
    let sandboxes = max.div_ceil(args.chunk) + 2 * args.publishes;
    if sandboxes > MAX_BRIDGE_PORTS {
        return bail(format!(
            "{sandboxes} sandboxes at the last level are more than the {MAX_BRIDGE_PORTS} ports a Linux bridge takes; raise --chunk or lower --publishes"
        ));
    }
    Ok(())
}

fn run(args: &Args, base: &Path, pid: u32) -> Result<bool> {
    check_args(args)?;
    let plan = Plan {
        weft: WeftOpts {
            bin: args.weft.clone().unwrap_or_else(weft::default_bin),
            bridge_subnet: args.weft_bridge_subnet.clone(),
            netns_pool: args.weft_netns_pool,
            agent_args: Vec::new(),
        },
        docker: DockerOpts {
            dockerd: args.dockerd.clone(),
            docker: args.docker.clone(),
            busybox: None,
            storage_driver: args.docker_storage_driver.clone(),
        },
        iperf: IperfOpts {
            bin: args.iperf3.clone(),
            seconds: args.seconds,
            congestion: args.congestion.clone(),
        },
    };
    let throughput = !args.skip_throughput;
    let with_docker = throughput && !args.skip_docker;
    if !throughput && args.skip_publish {
        return bail("nothing to measure: --skip-throughput and --skip-publish");
    }
    weft::preflight(&plan.weft)?;
    let iperf_version = if throughput {
        iperf_preflight(args)?
    } else {
        String::new()
    };
    if with_docker {
        docker::preflight(&plan.docker)?;
    }
    let stale = netns::list_with_prefix(netns::PREFIX);
    if !stale.is_empty() {
        eprintln!("note: namespaces from another run exist (not touched): {stale:?}");
    }

    let tree = TempTree::create(base)?;
    let started = Instant::now();
    let mut notes = Vec::new();
    let mut all_ok = true;
    let mut pairs = Vec::new();
    let mut phase = |name: &str, notes: &mut Vec<String>, r: Result<()>| -> Result<()> {
        if let Err(e) = r {
            sys::check_interrupted()?;
            eprintln!("{name}: FAILED: {e}");
            notes.push(format!("{name} FAILED: {e}"));
            all_ok = false;
        }
        Ok(())
    };
    if throughput {
        let r = weft_throughput(args, &plan, tree.path(), pid, &mut pairs, &mut notes);
        phase("weft throughput", &mut notes, r)?;
    }
    if with_docker {
        let r = docker_throughput(args, &plan, tree.path(), pid, &mut pairs, &mut notes);
        phase("docker throughput", &mut notes, r)?;
    }
    let mut scale = None;
    if !args.skip_publish {
        let r = publish_scale(args, &plan, tree.path(), pid, &mut notes).map(|s| {
            scale = Some(s);
        });
        phase("weft publish test", &mut notes, r)?;
    }
    drop(tree);
    for p in &pairs {
        for path in [&p.published, &p.direct] {
            if path.error.is_some() {
                all_ok = false;
            }
            let noisy = path.load.iter().filter(|l| l.gave_up).count();
            if noisy > 0 {
                notes.push(format!(
                    "{} {}: {noisy} measurement(s) started at a 1-minute load average ≥ {} after waiting {} s",
                    p.way, path.label, args.max_load, args.max_load_wait
                ));
            }
        }
    }
    let report = PortsReport {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus: thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        iperf3: iperf_version,
        seconds: args.seconds,
        reps: args.reps,
        congestion: args.congestion.clone(),
        max_load: args.max_load,
        throughput: pairs,
        scale,
        notes,
        total_s: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        print!("{}", report.text());
    }
    Ok(all_ok)
}

fn iperf_preflight(args: &Args) -> Result<String> {
    require_exe(
        &args.iperf3,
        "install Debian's iperf3 or pass --iperf3 (or --skip-throughput)",
    )?;
    let out = sys::run(
        Command::new(&args.iperf3).arg("--version"),
        Duration::from_secs(10),
    )?;
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if !version.starts_with("iperf 3") {
        return bail(format!(
            "{} --version printed {version:?}, not iperf 3",
            args.iperf3.display()
        ));
    }
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default();
    if !available.split_whitespace().any(|c| c == args.congestion) {
        return bail(format!(
            "TCP congestion control {} is not available (tcp_available_congestion_control: {}); load its module (modprobe tcp_{}) or pass --congestion",
            args.congestion,
            available.trim(),
            args.congestion
        ));
    }
    Ok(version)
}

/// A path to measure: the client's namespace and the server's address.
struct Target<'a> {
    ns: &'a Netns,
    addr: Ipv4Addr,
    port: u16,
    /// The client's own address (iperf3 -B), when it matters to the path.
    bind: Option<Ipv4Addr>,
}

fn path(label: &str, t: &Target) -> PathResult {
    PathResult::new(
        label.to_string(),
        t.ns.name().to_string(),
        format!("{}:{}", t.addr, t.port),
    )
}

/// Measures every path `reps` times, interleaved (run 1 of every path, then
/// run 2, …) so that drift in the machine's state spreads evenly. A path
/// that fails is not measured again; its error is kept.
fn measure(
    args: &Args,
    iperf: &IperfOpts,
    pairs: &mut [Pair],
    targets: &[(Target, Target)],
    server_output: &dyn Fn() -> String,
) -> Result<()> {
    for rep in 0..args.reps {
        for (pair, (tp, td)) in pairs.iter_mut().zip(targets) {
            for (p, t) in [(&mut pair.published, tp), (&mut pair.direct, td)] {
                if p.error.is_some() {
                    continue;
                }
                let what = format!("{} {} run {}/{}", pair.way, p.label, rep + 1, args.reps);
                let load = iperf::wait_for_quiet(
                    args.max_load,
                    Duration::from_secs(args.max_load_wait),
                    &what,
                )?;
                p.load.push(load);
                match iperf::run_client(t.ns, iperf, t.addr, t.port, t.bind) {
                    Ok(r) => {
                        eprintln!("  {what}: {:.2} Gbit/s (load {:.2})", r.gbps, load.at_start);
                        p.gbps.push(r.gbps);
                        p.retransmits.push(r.retransmits);
                    }
                    Err(e) => {
                        sys::check_interrupted()?;
                        let said = last_lines(&server_output(), 5);
                        let e = if said.is_empty() {
                            e.to_string()
                        } else {
                            format!("{e}; the iperf3 server's output ends with: {said}")
                        };
                        eprintln!("  {what}: FAILED: {e}");
                        p.error = Some(e);
                    }
                }
            }
        }
    }
    for p in pairs.iter_mut() {
        p.finish();
    }
    Ok(())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn weft_throughput(
    args: &Args,
    plan: &Plan,
    base: &Path,
    pid: u32,
    pairs: &mut Vec<Pair>,
    notes: &mut Vec<String>,
) -> Result<()> {
    eprintln!("weft throughput: starting the agent");
    let mut h = WeftHarness::start(&plan.weft, base, pid)?;
    let out = Outside::attach(h.netns(), &format!("wftbout-{pid}"))?;
    out.route_via_host(&args.weft_bridge_subnet)?;
    let port = args.port;
    let bin = args.iperf3.to_string_lossy().into_owned();
    let server = h
        .run_detached(&[format!("{port}:{port}")], &[&bin, "-s"])
        .context("starting the iperf3 server in a weft sandbox")?;
    let ip = server.ip.context(format_args!(
        "`weft run` gave sandbox {} no address (attachment.endpoints[0].ip)",
        server.id
    ))?;
    let spid = server.pid.context(format_args!(
        "`weft run` printed no pid for sandbox {}",
        server.id
    ))?;
    if let Err(e) = iperf::wait_listening(spid, port, Duration::from_secs(15)) {
        return bail(format!(
            "iperf3 server in weft sandbox {}: {e}; its output: {:?}",
            server.id,
            h.sandbox_output(&server.id)
        ));
    }
    // The agent says at start whether its connect-time redirect is on
    // (off: WEFT_CONNECT_REDIRECT=off, or BPF unavailable; nft serves all).
    let redirect = h.agent_log_tail(500).contains("connect redirect attached");
    let localhost_way = if redirect {
        "connect-time redirect (BPF)"
    } else {
        "DNAT + masquerade; the agent's connect redirect is OFF"
    };
    notes.push(format!(
        "weft: host → 127.0.0.1 uses the {}; the same with the client bound to 127.0.0.1 (iperf3 -B) is left to nft DNAT + masquerade, the path every localhost connection took before the redirect",
        if redirect { "connect-time redirect (BPF programs of the agent attached)" } else { "nft path: the agent did NOT attach its connect redirect (see its log)" }
    ));
    notes.push(format!(
        "weft: iperf3 -s in sandbox {} at {ip}, published with -p {port}:{port} (network_setup {} µs); agent namespace {}, outside namespace {}",
        &server.id[..12.min(server.id.len())],
        server.network_setup_us,
        h.netns().name(),
        out.netns().name()
    ));
    let targets = [
        (
            Target {
                ns: out.netns(),
                addr: outside::HOST_ADDR,
                port,
                bind: None,
            },
            Target {
                ns: out.netns(),
                addr: ip,
                port,
                bind: None,
            },
        ),
        (
            Target {
                ns: h.netns(),
                addr: Ipv4Addr::LOCALHOST,
                port,
                bind: None,
            },
            Target {
                ns: h.netns(),
                addr: ip,
                port,
                bind: None,
            },
        ),
        (
            Target {
                ns: h.netns(),
                addr: Ipv4Addr::LOCALHOST,
                port,
                bind: Some(Ipv4Addr::LOCALHOST),
            },
            Target {
                ns: h.netns(),
                addr: ip,
                port,
                bind: None,
            },
        ),
    ];
    let mut mine = vec![
        Pair {
            way: "weft".into(),
            scenario: format!(
                "from an outside namespace ({} → {} over a veth pair)",
                outside::OUTSIDE_ADDR,
                outside::HOST_ADDR
            ),
            published: path(
                &format!("published {}:{port} (DNAT)", outside::HOST_ADDR),
                &targets[0].0,
            ),
            direct: path(&format!("direct {ip}:{port} (routed)"), &targets[0].1),
            ratio: None,
        },
        Pair {
            way: "weft".into(),
            scenario: "from the host namespace itself".into(),
            published: path(
                &format!("published 127.0.0.1:{port} ({localhost_way})"),
                &targets[1].0,
            ),
            direct: path(&format!("direct {ip}:{port}"), &targets[1].1),
            ratio: None,
        },
        Pair {
            way: "weft".into(),
            scenario: "from the host, client bound to 127.0.0.1 (nft path)".into(),
            published: path(
                &format!("published 127.0.0.1:{port} from 127.0.0.1 (DNAT + masquerade)"),
                &targets[2].0,
            ),
            direct: path(&format!("direct {ip}:{port}"), &targets[2].1),
            ratio: None,
        },
    ];
    let r = measure(args, &plan.iperf, &mut mine, &targets, &|| {
        h.sandbox_output(&server.id)
    });
    pairs.extend(mine);
    r?;
    // An iperf3 server that died during the runs explains failures.
    if sys::proc_start_time(spid).is_none() {
        notes.push(format!(
            "weft: the iperf3 server (pid {spid}) had exited by the end; its output: {:?}",
            h.sandbox_output(&server.id)
        ));
    }
    drop(out);
    drop(h);
    Ok(())
}

/// net.ipv4.tcp_congestion_control as seen inside `ns`.
fn default_congestion(ns: &Netns) -> Result<String> {
    let mut cmd = ns.entered("cat")?;
    cmd.arg("/proc/sys/net/ipv4/tcp_congestion_control");
    let out = sys::run_ok(&mut cmd, Duration::from_secs(10)).context(format_args!(
        "reading the default congestion control of {}",
        ns.name()
    ))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// docker-proxy processes serving `port` for `container_ip`.
fn docker_proxies(container_ip: Ipv4Addr, port: u16) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let after = |flag: &str| {
                args.iter()
                    .position(|a| a == flag)
                    .and_then(|i| args.get(i + 1))
                    .cloned()
            };
            args.first().is_some_and(|a| a.ends_with("docker-proxy"))
                && after("-container-ip") == Some(container_ip.to_string())
                && after("-container-port") == Some(port.to_string())
        })
        .collect()
}

fn docker_throughput(
    args: &Args,
    plan: &Plan,
    base: &Path,
    pid: u32,
    pairs: &mut Vec<Pair>,
    notes: &mut Vec<String>,
) -> Result<()> {
    eprintln!("docker throughput: starting dockerd");
    let dir = base.join("docker");
    let mut h = DockerHarness::start(&plan.docker, &dir, pid)?;
    notes.extend(h.notes.iter().map(|n| format!("docker: {n}")));
    let root = dir.join("iperf3-rootfs");
    std::fs::create_dir(&root).context(format_args!("creating {}", root.display()))?;
    let files = image::program_rootfs(&args.iperf3, &root)?;
    let bin = args.iperf3.to_string_lossy().into_owned();
    h.import_tree(&root, DOCKER_IMAGE, &[&bin, "-s"])?;
    let port = args.port;
    // A process without CAP_NET_ADMIN may only pick congestion controls in
    // the (machine-wide) net.ipv4.tcp_allowed_congestion_control; the
    // server must be able to set the one the client asks for.
    let id = h
        .run_container(&[
            "--cap-add",
            "NET_ADMIN",
            "-p",
            &format!("{port}:{port}"),
            DOCKER_IMAGE,
        ])
        .context("starting the iperf3 container")?;
    let ip_text = h.inspect(&id, "{{.NetworkSettings.IPAddress}}")?;
    let ip: Ipv4Addr = ip_text.parse().context(format_args!(
        "container {id} has no IPv4 address on the default bridge ({ip_text:?})"
    ))?;
    let cpid_text = h.inspect(&id, "{{.State.Pid}}")?;
    let cpid: i32 = cpid_text
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .context(format_args!(
            "container {id} has no process ({cpid_text:?}); its output: {:?}",
            h.container_logs(&id)
        ))?;
    if let Err(e) = iperf::wait_listening(cpid, port, Duration::from_secs(15)) {
        return bail(format!(
            "iperf3 server in container {}: {e}; its output: {:?}",
            &id[..12],
            h.container_logs(&id)
        ));
    }
    let out = sys::run_ok(
        h.cli().args([
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            "bridge",
        ]),
        Duration::from_secs(30),
    )
    .context("asking dockerd for the default bridge's subnet")?;
    let subnet = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|s| s.contains('.') && s.contains('/'))
        .map(str::to_string)
        .context("dockerd's default bridge has no IPv4 subnet")?;
    let outside = Outside::attach(h.netns(), &format!("wftbdout-{pid}"))?;
    outside.route_via_host(&subnet)?;
    let proxies = docker_proxies(ip, port);
    notes.push(format!(
        "docker: image {DOCKER_IMAGE} from `docker import` of {} files ({}) + /tmp; container {} at {ip} ({subnet}), -p {port}:{port}; docker-proxy {}; dockerd namespace {}, outside namespace {}",
        files.len(),
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        &id[..12],
        if proxies.is_empty() {
            "NOT running (so 127.0.0.1 is not served through it)".to_string()
        } else {
            format!("running (pid {proxies:?})")
        },
        h.netns().name(),
        outside.netns().name()
    ));
    let ns_default = default_congestion(h.netns())?;
    if ns_default != args.congestion {
        notes.push(format!(
            "docker: on the 127.0.0.1 path docker-proxy relays to the container over sockets of its own, which use the namespace's default congestion control, {ns_default}, not {}: a namespace other than the initial one may only make an algorithm its default if it is in the machine-wide net.ipv4.tcp_allowed_congestion_control ({}), which the benchmark does not change",
            args.congestion,
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
                .unwrap_or_default()
                .trim()
        ));
    }
    let targets = [
        (
            Target {
                ns: outside.netns(),
                addr: outside::HOST_ADDR,
                port,
                bind: None,
            },
            Target {
                ns: outside.netns(),
                addr: ip,
                port,
                bind: None,
            },
        ),
        (
            Target {
                ns: h.netns(),
                addr: Ipv4Addr::LOCALHOST,
                port,
                bind: None,
            },
            Target {
                ns: h.netns(),
                addr: ip,
                port,
                bind: None,
            },
        ),
    ];
    let mut mine = vec![
        Pair {
            way: "docker".into(),
            scenario: format!(
                "from an outside namespace ({} → {} over a veth pair)",
                outside::OUTSIDE_ADDR,
                outside::HOST_ADDR
            ),
            published: path(
                &format!("published {}:{port} (DNAT)", outside::HOST_ADDR),
                &targets[0].0,
            ),
            direct: path(&format!("direct {ip}:{port} (routed)"), &targets[0].1),
            ratio: None,
        },
        Pair {
            way: "docker".into(),
            scenario: "from the host namespace itself".into(),
            published: path(
                &format!("published 127.0.0.1:{port} (docker-proxy)"),
                &targets[1].0,
            ),
            direct: path(&format!("direct {ip}:{port}"), &targets[1].1),
            ratio: None,
        },
    ];
    let r = measure(args, &plan.iperf, &mut mine, &targets, &|| {
        h.container_logs(&id)
    });
    pairs.extend(mine);
    r?;
    drop(outside);
    drop(h);
    Ok(())
}

fn table(h: &WeftHarness) -> Result<TableCount> {
    nftcount::weft_table(h.netns())
}

fn publish_scale(
    args: &Args,
    plan: &Plan,
    base: &Path,
    pid: u32,
    notes: &mut Vec<String>,
) -> Result<Scale> {
    let t = Instant::now();
    eprintln!("weft publish test: starting the agent");
    let mut h = WeftHarness::start(&plan.weft, base, pid)?;
    let empty_table = table(&h)?;
    let max = *args.levels.last().expect("checked non-empty");
    let mut next_port = usize::from(args.first_port);
    let probe_base = next_port + max;
    let mut published = 0;
    let mut levels = Vec::new();
    let pause = Duration::from_millis(args.pause_ms);
    for &level in &args.levels {
        let mut bulk_runs = Vec::new();
        while published < level {
            sys::check_interrupted()?;
            let n = args.chunk.min(level - published);
            let ports: Vec<String> = (next_port..next_port + n)
                .map(|p| format!("{p}:{CONTAINER_PORT}"))
                .collect();
            let r = h
                .run_detached(&ports, &["sleep", "infinity"])
                .context(format_args!(
                    "publishing ports {next_port}-{} (to reach {level})",
                    next_port + n - 1
                ))?;
            let ms = r.wall.as_secs_f64() * 1e3;
            eprintln!(
                "  published {n} ports in one weft run ({ms:.0} ms, network_setup {:.1} ms); {} in all",
                r.network_setup_us as f64 / 1e3,
                published + n
            );
            bulk_runs.push((n, ms));
            published += n;
            next_port += n;
        }
        let load = iperf::wait_for_quiet(
            args.max_load,
            Duration::from_secs(args.max_load_wait),
            &format!("timing publishes at {level} ports"),
        )?;
        let tbl = table(&h)?;
        if tbl.publish_elements != level {
            notes.push(format!(
                "weft: with {level} ports published, the publish maps hold {} elements (expected {level})",
                tbl.publish_elements
            ));
        }
        let mut lv = Level {
            ports: level,
            bulk_runs,
            table: tbl,
            table_with_probes: tbl,
            table_after: tbl,
            load,
            publish_wall_ms: Vec::new(),
            publish_setup_ms: Vec::new(),
            plain_wall_ms: Vec::new(),
            plain_setup_ms: Vec::new(),
            unpublish_wall_ms: Vec::new(),
            unpublish_teardown_ms: Vec::new(),
            plain_rm_wall_ms: Vec::new(),
            plain_rm_teardown_ms: Vec::new(),
        };
        let mut ids = Vec::new();
        for i in 0..args.publishes {
            sys::check_interrupted()?;
            let p = format!("{}:{CONTAINER_PORT}", probe_base + i);
            let r = h
                .run_detached(std::slice::from_ref(&p), &["sleep", "infinity"])
                .context(format_args!("timed publish {} at {level} ports", i + 1))?;
            let with_port = r.id;
            lv.publish_wall_ms.push(r.wall.as_secs_f64() * 1e3);
            lv.publish_setup_ms.push(r.network_setup_us as f64 / 1e3);
            thread::sleep(pause);
            let r = h
                .run_detached(&[], &["sleep", "infinity"])
                .context(format_args!("run without -p {} at {level} ports", i + 1))?;
            ids.push((with_port, r.id));
            lv.plain_wall_ms.push(r.wall.as_secs_f64() * 1e3);
            lv.plain_setup_ms.push(r.network_setup_us as f64 / 1e3);
            thread::sleep(pause);
        }
        lv.table_with_probes = table(&h)?;
        if lv.table_with_probes.publish_elements != level + args.publishes {
            notes.push(format!(
                "weft: with {} more ports published at {level}, the publish maps hold {} elements (expected {})",
                args.publishes,
                lv.table_with_probes.publish_elements,
                level + args.publishes
            ));
        }
        // Removed one by one, timed, in the order made.
        for (i, (with_port, plain)) in ids.iter().enumerate() {
            sys::check_interrupted()?;
            let s = h
                .remove_timed(with_port)
                .context(format_args!("removing timed publish {} at {level}", i + 1))?;
            lv.unpublish_wall_ms.push(s.wall.as_secs_f64() * 1e3);
            lv.unpublish_teardown_ms
                .push(s.inner_us.unwrap_or(0) as f64 / 1e3);
            thread::sleep(pause);
            let s = h
                .remove_timed(plain)
                .context(format_args!("removing run without -p {} at {level}", i + 1))?;
            lv.plain_rm_wall_ms.push(s.wall.as_secs_f64() * 1e3);
            lv.plain_rm_teardown_ms
                .push(s.inner_us.unwrap_or(0) as f64 / 1e3);
            thread::sleep(pause);
        }
        lv.table_after = table(&h)?;
        if lv.table_after.publish_elements != level {
            notes.push(format!(
                "weft: after removing the {} timed sandboxes at {level}, the publish maps hold {} elements (expected {level})",
                args.publishes, lv.table_after.publish_elements
            ));
        }
        eprintln!(
            "  {level} ports: {} rules, publish median {:.3} ms wall, {:.3} ms network_setup (without -p {:.3} / {:.3} ms); rm median {:.3} ms wall, {:.3} ms network_teardown (without -p {:.3} / {:.3} ms); load {:.2}",
            lv.table.rules,
            lv.publish_wall_median(),
            lv.publish_setup_median(),
            lv.plain_wall_median(),
            lv.plain_setup_median(),
            median(&lv.unpublish_wall_ms),
            median(&lv.unpublish_teardown_ms),
            median(&lv.plain_rm_wall_ms),
            median(&lv.plain_rm_teardown_ms),
            load.at_start
        );
        levels.push(lv);
    }
    drop(h);
    let mut s = Scale {
        empty_table,
        levels,
        rules_constant: false,
        last_over_previous_wall: None,
        last_over_previous_setup: None,
        unpublish_last_over_previous_wall: None,
        unpublish_last_over_previous_teardown: None,
        took_s: t.elapsed().as_secs_f64(),
    };
    s.finish();
    Ok(s)
}
