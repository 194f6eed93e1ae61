//! bench/tunnel: TCP throughput between two simulated hosts through the
//! overlay datapaths, in one run: a flannel-style reference loop (one
//! packet per read()/sendto(), one thread, TUN without offloads), weft's
//! userspace tunnel in plain and in secure mode, hand-built kernel VXLAN,
//! and the bare veth between the hosts. iperf3 (`-C cubic`, 1 and 4
//! streams) runs in subprocesses; the tunnels run in this process.
//!
//! Hosts are namespaces `wftb<pid>a` / `wftb<pid>b` joined by a veth pair
//! (198.51.100.1/24, .2/24); each has an address of its subnet on lo
//! (10.50.1.1, 10.50.2.1) and routes the other's subnet through the
//! datapath under test. Everything is removed on every exit path.

use clap::Parser;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};
use weft_bench::iperf;
use weft_bench::netns::{self, veth_pair, Netns};
use weft_bench::reference::machine_busy_secs;
use weft_bench::sys::{self, bail, Context, Daemon, Result};
use weft_tunnel::{Keys, Peer, Tunnel, TunnelConfig};

#[derive(Parser, Debug)]
#[command(
    name = "tunnel",
    about = "Overlay datapaths compared: reference loop, weft udp and secure, kernel VXLAN, veth"
)]
struct Args {
    /// Seconds per iperf3 measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Parallel streams to measure (comma-separated).
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    streams: Vec<u32>,
    /// Worker threads (TUN queues) per weft tunnel.
    #[arg(long, default_value_t = 2)]
    queues: usize,
    #[arg(long, default_value = "/usr/bin/iperf3")]
    iperf3: String,
    /// Paths to measure (comma-separated): veth, vxlan, reference, udp, secure.
    #[arg(
        long,
        default_value = "veth,vxlan,reference,udp,secure",
        value_delimiter = ','
    )]
    paths: Vec<String>,
    /// Print the results as a Markdown table as well.
    #[arg(long)]
    markdown: bool,
}

const A_UNDER: &str = "198.51.100.1";
const B_UNDER: &str = "198.51.100.2";
const A_ADDR: &str = "10.50.1.1";
const B_ADDR: &str = "10.50.2.1";
const A_NET: &str = "10.50.1.0/24";
const B_NET: &str = "10.50.2.0/24";
const UNDERLAY_MTU: u32 = 1500;
const IPERF_PORT: u16 = 5201;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Reference,
    WeftUdp,
    WeftSecure,
    Vxlan,
    Veth,
}

impl Path {
    fn key(self) -> &'static str {
        match self {
            Path::Reference => "reference",
            Path::WeftUdp => "udp",
            Path::WeftSecure => "secure",
            Path::Vxlan => "vxlan",
            Path::Veth => "veth",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Path::Reference => "reference loop (flannel udp style)",
            Path::WeftUdp => "weft-tunnel udp",
            Path::WeftSecure => "weft-tunnel secure",
            Path::Vxlan => "kernel VXLAN",
            Path::Veth => "bare veth",
        }
    }
}

struct Row {
    path: Path,
    streams: u32,
    gbps: f64,
    retransmits: Option<u64>,
    /// CPU seconds per GB received: the whole machine (/proc/stat, so
    /// iperf3, softirqs and the tunnels alike) and this process alone
    /// (the tunnel threads; nothing else here is busy meanwhile). The
    /// machine figure includes whatever else runs: `background_cores` is
    /// how many CPUs were busy just before the run.
    background_cores: f64,
    machine_cpu_s_per_gb: f64,
    tunnel_cpu_s_per_gb: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = sys::install_signal_handlers() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if !sys::is_root() {
        return bail("needs root (network namespaces, TUN devices)");
    }
    sys::require_exe(
        std::path::Path::new(&args.iperf3),
        "install it with `apt-get install -y iperf3`",
    )?;
    let pid = std::process::id();
    let a = netns::add(&format!("wftb{pid}a"))?;
    let b = netns::add(&format!("wftb{pid}b"))?;
    veth_pair(
        &a,
        "veth0",
        Some(&format!("{A_UNDER}/24")),
        &b,
        "veth0",
        Some(&format!("{B_UNDER}/24")),
    )?;
    a.try_ip(&["addr", "add", &format!("{A_ADDR}/32"), "dev", "lo"])?;
    b.try_ip(&["addr", "add", &format!("{B_ADDR}/32"), "dev", "lo"])?;
    // iperf3's connections must not start under the machine's bbr.
    iperf::start_unpaced(&a.path())?;
    iperf::start_unpaced(&b.path())?;
    let mut log = std::env::temp_dir();
    log.push(format!("wftb{pid}-iperf3.log"));
    let mut server = {
        let mut cmd = b.entered(&args.iperf3)?;
        cmd.args(["-s", "-B", B_ADDR, "-p", &IPERF_PORT.to_string()]);
        Daemon::spawn("iperf3 server", cmd, &log, Duration::from_secs(3))?
    };
    let server_pid = server.pid().context("iperf3 server has no pid")?;
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        iperf::wait_listening(server_pid, IPERF_PORT, Duration::from_secs(10))?;
        for path in [
            Path::Veth,
            Path::Vxlan,
            Path::Reference,
            Path::WeftUdp,
            Path::WeftSecure,
        ] {
            if !args.paths.iter().any(|p| p == path.key()) {
                continue;
            }
            sys::check_interrupted()?;
            eprintln!("== {}", path.label());
            let setup = Setup::new(path, &a, &b, args)?;
            for &streams in &args.streams {
                // The pause between runs doubles as a measurement of what
                // else keeps the machine busy (it may be shared), reported
                // with the machine-wide CPU figure.
                let (m0, t0) = (machine_busy_secs()?, Instant::now());
                thread::sleep(Duration::from_secs(3));
                let background = (machine_busy_secs()? - m0) / t0.elapsed().as_secs_f64();
                let row = measure(path, streams, &a, args, background)
                    .context(format_args!("{} with {streams} stream(s)", path.label()))?;
                eprintln!(
                    "   {streams} stream(s): {:.2} Gbit/s, {:.2} CPU s/GB (machine), {:.2} CPU s/GB (tunnel threads); background {:.2} cores",
                    row.gbps, row.machine_cpu_s_per_gb, row.tunnel_cpu_s_per_gb, row.background_cores
                );
                rows.push(row);
            }
            setup.teardown(&a, &b)?;
        }
        Ok(())
    })();
    server.stop();
    let _ = std::fs::remove_file(&log);
    result?;
    report(&rows, args);
    Ok(())
}

/// What one path needs set up; dropping it (or `teardown`) undoes it.
struct Setup {
    tunnels: Vec<Tunnel>,
    reference: Vec<weft_bench::reference::Loop>,
    path: Path,
}

fn routes(a: &Netns, b: &Netns, dev: &str, via: Option<(&str, &str)>) -> Result<()> {
    let mut ra = vec!["route", "add", B_NET, "dev", dev, "src", A_ADDR];
    let mut rb = vec!["route", "add", A_NET, "dev", dev, "src", B_ADDR];
    if let Some((va, vb)) = via {
        ra.extend(["via", va]);
        rb.extend(["via", vb]);
    }
    a.try_ip(&ra)?;
    b.try_ip(&rb)?;
    Ok(())
}

impl Setup {
    fn new(path: Path, a: &Netns, b: &Netns, args: &Args) -> Result<Setup> {
        let mut s = Setup {
            tunnels: Vec::new(),
            reference: Vec::new(),
            path,
        };
        match path {
            Path::Veth => routes(a, b, "veth0", Some((B_UNDER, A_UNDER)))?,
            Path::Vxlan => {
                for (ns, local, remote, addr) in [
                    (a, A_UNDER, B_UNDER, "10.60.0.1/24"),
                    (b, B_UNDER, A_UNDER, "10.60.0.2/24"),
                ] {
                    ns.try_ip(&[
                        "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local,
                        "remote", remote, "dstport", "4789", "dev", "veth0",
                    ])?;
                    ns.try_ip(&[
                        "link",
                        "set",
                        "vx0",
                        "mtu",
                        &(UNDERLAY_MTU - 50).to_string(),
                        "up",
                    ])?;
                    ns.try_ip(&["addr", "add", addr, "dev", "vx0"])?;
                }
                routes(a, b, "vx0", Some(("10.60.0.2", "10.60.0.1")))?;
            }
            Path::Reference => {
                let mtu = UNDERLAY_MTU - 28;
                s.reference.push(weft_bench::reference::Loop::start(
                    &a.path(),
                    "wref0",
                    mtu,
                    B_NET.parse().unwrap(),
                    B_UNDER.parse().unwrap(),
                    8286,
                )?);
                s.reference.push(weft_bench::reference::Loop::start(
                    &b.path(),
                    "wref0",
                    mtu,
                    A_NET.parse().unwrap(),
                    A_UNDER.parse().unwrap(),
                    8286,
                )?);
                routes(a, b, "wref0", None)?;
            }
            Path::WeftUdp | Path::WeftSecure => {
                let secure = path == Path::WeftSecure;
                let keys: Vec<Option<Keys>> = (0..2)
                    .map(|_| secure.then(Keys::generate).transpose())
                    .collect::<std::result::Result<_, _>>()
                    .context("generating keys")?;
                for (ns, k) in [(a, &keys[0]), (b, &keys[1])] {
                    let mut cfg = TunnelConfig::new(
                        "wtun0",
                        TunnelConfig::mtu_for(UNDERLAY_MTU, secure),
                        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, weft_tunnel::DEFAULT_PORT),
                    );
                    cfg.queues = args.queues;
                    cfg.crypto = k.clone();
                    let file = std::fs::File::open(ns.path()).context("opening a namespace")?;
                    s.tunnels
                        .push(Tunnel::start_in(cfg, file.as_fd()).context("starting weft-tunnel")?);
                }
                let peer = |net: &str, under: &str, k: &Option<Keys>| Peer {
                    subnet: net.parse().unwrap(),
                    endpoint: SocketAddrV4::new(under.parse().unwrap(), weft_tunnel::DEFAULT_PORT),
                    public_key: k.as_ref().map(Keys::public_key),
                };
                s.tunnels[0]
                    .set_peers(vec![peer(B_NET, B_UNDER, &keys[1])])
                    .context("peers")?;
                s.tunnels[1]
                    .set_peers(vec![peer(A_NET, A_UNDER, &keys[0])])
                    .context("peers")?;
                routes(a, b, "wtun0", None)?;
            }
        }
        // One unmeasured ping: ARP, handshakes.
        let mut ping = a.entered("ping")?;
        ping.args(["-c", "3", "-i", "0.2", "-W", "2", B_ADDR]);
        sys::run_ok(&mut ping, Duration::from_secs(10))
            .context(format_args!("ping through {}", path.label()))?;
        Ok(s)
    }

    fn teardown(mut self, a: &Netns, b: &Netns) -> Result<()> {
        for t in self.tunnels.drain(..) {
            let st = t.stats();
            eprintln!(
                "   {}: tx {} rx {} packets; dropped: no_peer {} no_session {} bad_auth {} replayed {}; send errors {}",
                t.ifname(),
                st.tx_packets,
                st.rx_packets,
                st.dropped_no_peer,
                st.dropped_no_session,
                st.dropped_bad_auth,
                st.dropped_replayed,
                st.send_errors
            );
            t.stop();
        }
        self.reference.clear();
        match self.path {
            Path::Veth => {
                a.try_ip(&["route", "del", B_NET])?;
                b.try_ip(&["route", "del", A_NET])?;
            }
            Path::Vxlan => {
                a.try_ip(&["link", "del", "vx0"])?;
                b.try_ip(&["link", "del", "vx0"])?;
            }
            // The TUN devices, and their routes, went with their owners.
            _ => {}
        }
        Ok(())
    }
}

/// CPU time (user + system) of all threads of this process.
fn process_cpu_secs() -> f64 {
    // SAFETY: rusage is integers only; all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills `ru`, a live rusage we pass by pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn measure(path: Path, streams: u32, a: &Netns, args: &Args, background: f64) -> Result<Row> {
    let mut cmd = a.entered(&args.iperf3)?;
    cmd.args(["-c", B_ADDR, "-p", &IPERF_PORT.to_string()])
        .args(["-t", &args.seconds.to_string(), "-P", &streams.to_string()])
        .args(["-C", "cubic", "--connect-timeout", "5000", "-J"]);
    let (m0, p0, t0) = (machine_busy_secs()?, process_cpu_secs(), Instant::now());
    let out = sys::run(&mut cmd, Duration::from_secs(u64::from(args.seconds) + 40))?;
    let (m1, p1, wall) = (machine_busy_secs()?, process_cpu_secs(), t0.elapsed());
    let r = iperf::parse_result(&out.stdout).context(format_args!("`{}`", sys::describe(&cmd)))?;
    if r.sender_congestion != "cubic" {
        return bail(format!(
            "iperf3 used {} instead of cubic",
            r.sender_congestion
        ));
    }
    // Bytes over the whole client run (the rate is over its -t seconds;
    // the CPU is over the run, which is a little longer: setup, teardown).
    let gb = r.gbps * f64::from(args.seconds) / 8.0;
    // Not subtracted: on a saturated machine the background takes less
    // while we run, so subtracting it would hide our own cost. It is
    // reported beside the figure instead.
    let _ = wall;
    let machine = m1 - m0;
    Ok(Row {
        path,
        streams,
        gbps: r.gbps,
        retransmits: r.retransmits,
        background_cores: background,
        machine_cpu_s_per_gb: machine / gb,
        tunnel_cpu_s_per_gb: (p1 - p0) / gb,
    })
}

fn report(rows: &[Row], args: &Args) {
    let find = |p: Path, s: u32| {
        rows.iter()
            .find(|r| r.path == p && r.streams == s)
            .map(|r| r.gbps)
    };
    println!();
    println!(
        "{:<36} {:>7} {:>9} {:>8} {:>9} {:>10} {:>12} {:>12}",
        "path",
        "streams",
        "Gbit/s",
        "retrans",
        "x VXLAN",
        "x ref loop",
        "CPU s/GB all",
        "CPU s/GB tun"
    );
    let mut md = String::new();
    md.push_str("| path | streams | Gbit/s | retransmits | × kernel VXLAN | × reference loop | CPU s/GB (machine) | CPU s/GB (tunnel threads) | background (cores) |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let vs =
            |p: Path| find(p, r.streams).map_or("-".to_string(), |g| format!("{:.2}", r.gbps / g));
        let tun = if matches!(r.path, Path::Vxlan | Path::Veth) {
            "-".to_string()
        } else {
            format!("{:.2}", r.tunnel_cpu_s_per_gb)
        };
        println!(
            "{:<36} {:>7} {:>9.2} {:>8} {:>9} {:>10} {:>12.2} {:>12} {:>6.2}",
            r.path.label(),
            r.streams,
            r.gbps,
            r.retransmits.map_or("-".into(), |x| x.to_string()),
            vs(Path::Vxlan),
            vs(Path::Reference),
            r.machine_cpu_s_per_gb,
            tun,
            r.background_cores
        );
        md.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {:.2} | {} | {:.2} |\n",
            r.path.label(),
            r.streams,
            r.gbps,
            r.retransmits.map_or("-".into(), |x| x.to_string()),
            vs(Path::Vxlan),
            vs(Path::Reference),
            r.machine_cpu_s_per_gb,
            tun,
            r.background_cores
        ));
    }
    println!();
    for &s in &args.streams {
        let (Some(vx), Some(rf), Some(udp), Some(sec)) = (
            find(Path::Vxlan, s),
            find(Path::Reference, s),
            find(Path::WeftUdp, s),
            find(Path::WeftSecure, s),
        ) else {
            continue;
        };
        let ok = |b: bool| if b { "met" } else { "NOT met" };
        println!(
            "goals, {s} stream(s): udp >= 10x reference loop: {:.1}x ({}); udp >= 0.5x VXLAN: {:.2}x ({}); secure >= 0.3x VXLAN: {:.2}x ({})",
            udp / rf,
            ok(udp / rf >= 10.0),
            udp / vx,
            ok(udp / vx >= 0.5),
            sec / vx,
            ok(sec / vx >= 0.3)
        );
    }
    if args.markdown {
        println!();
        print!("{md}");
    }
}
