//! bench/overlay: sandbox-to-sandbox across two hosts of a `weft lab`.
//!
//! In one run, on the same two host namespaces: iperf3 TCP throughput (1
//! and 4 streams, `-C cubic`) and ping latency for
//!   - weft vxlan and weft host-gw (sandboxes on overlay networks),
//!   - a hand-built kernel VXLAN and a hand-built host-gw between the same
//!     hosts, made with `ip` as flannel would (bridge, veth, vxlan device
//!     with learning off, permanent neighbour and FDB entries, onlink
//!     route; or a plain route via the peer),
//!   - weft udp and weft secure (the userspace tunnel, through the agent),
//!   - the wire: the bare veth between the two host namespaces.
//!
//! bench/tunnel compares the userspace datapath alone with a flannel-style
//! reference loop and kernel VXLAN.
//!
//! Prints Gbit/s, ratios against the hand-built peers and the wire, and
//! round-trip times. Everything lives in the lab (under /dev/shm) and in
//! namespaces named `wftbo…`, all removed on every exit path.

use clap::Parser;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;
use weft_bench::hostcheck::run_checked;
use weft_bench::iperf::parse_result;
use weft_bench::labbench::{weft_binary, LabGuard, RemoveDir};
use weft_bench::sys::Error;
use weft_lab::{Lab, LabSpec};

type Result<T> = std::result::Result<T, String>;

#[derive(Parser, Debug)]
#[command(
    about = "Overlay throughput and latency: weft vxlan/host-gw vs hand-built VXLAN/host-gw vs the wire"
)]
struct Args {
    /// Seconds per iperf3 run
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Runs per path and stream count (the median is reported)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The weft binary (default: next to this one)
    #[arg(long)]
    weft: Option<PathBuf>,
}

fn sh(ns: &Path, script: &str) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["sh", "-ec", script])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "in {}: {script}: {}",
            ns.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Named namespaces of the hand-built paths, deleted on drop.
struct NamedNs(Vec<String>);
impl Drop for NamedNs {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One way from a client namespace to a server address.
struct Way {
    name: &'static str,
    client: PathBuf,
    server: PathBuf,
    server_ip: Ipv4Addr,
}

/// A hand-built endpoint on host `h` (namespace path `host`): a namespace
/// with a veth into bridge `br` (gateway `gw`), address `ip`/24.
fn endpoint(
    host: &Path,
    ns: &str,
    br: &str,
    gw: Ipv4Addr,
    ip: Ipv4Addr,
    mtu: u32,
    tag: &str,
) -> Result<()> {
    let st = Command::new("ip")
        .args(["netns", "add", ns])
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("ip netns add {ns}"));
    }
    sh(
        host,
        &format!(
            "ip link show {br} >/dev/null 2>&1 || {{ ip link add {br} type bridge; ip link set {br} mtu {mtu} up; ip addr add {gw}/24 dev {br}; }}
             ip link add {tag} mtu {mtu} type veth peer name eth0 netns {ns}
             ip link set {tag} master {br} up"
        ),
    )?;
    sh(
        Path::new(&format!("/run/netns/{ns}")),
        &format!(
            "ip link set lo up; ip link set eth0 mtu {mtu} up; ip addr add {ip}/24 dev eth0; ip route add default via {gw}"
        ),
    )?;
    Ok(())
}

fn hand_built(lab: &Lab, names: &mut NamedNs, pid: u32) -> Result<(Way, Way)> {
    let (h1, h2) = (lab.host_netns(0), lab.host_netns(1));
    let (p1, p2) = (lab.hosts[0].ip, lab.hosts[1].ip);
    let n = |s: &str| format!("wftbo{pid:x}{s}");
    for s in ["va", "vb", "ga", "gb"] {
        names.0.push(n(s));
    }
    // Kernel VXLAN as flannel makes it: 10.77.1.0/24 on h1, 10.77.2.0/24 on h2.
    endpoint(
        &h1,
        &n("va"),
        "hbrv",
        "10.77.1.1".parse().unwrap(),
        "10.77.1.2".parse().unwrap(),
        1450,
        "hvv0",
    )?;
    endpoint(
        &h2,
        &n("vb"),
        "hbrv",
        "10.77.2.1".parse().unwrap(),
        "10.77.2.2".parse().unwrap(),
        1450,
        "hvv0",
    )?;
    let vx = |local: Ipv4Addr, mine: u8, peer: u8, remote: Ipv4Addr| {
        format!(
            "ip link add hvx0 type vxlan id 77 local {local} dev eth0 dstport 4789 nolearning
             ip link set hvx0 address 06:00:00:00:00:0{mine} mtu 1450 up
             ip addr add 10.77.{mine}.0/32 dev hvx0
             ip neigh replace 10.77.{peer}.0 lladdr 06:00:00:00:00:0{peer} dev hvx0 nud permanent
             bridge fdb replace 06:00:00:00:00:0{peer} dev hvx0 dst {remote} self permanent
             ip route replace 10.77.{peer}.0/24 via 10.77.{peer}.0 dev hvx0 onlink"
        )
    };
    sh(&h1, &vx(p1, 1, 2, p2))?;
    sh(&h2, &vx(p2, 2, 1, p1))?;
    // host-gw by hand: 10.78.1.0/24 and 10.78.2.0/24, routes via the peer.
    endpoint(
        &h1,
        &n("ga"),
        "hbrg",
        "10.78.1.1".parse().unwrap(),
        "10.78.1.2".parse().unwrap(),
        1500,
        "hvg0",
    )?;
    endpoint(
        &h2,
        &n("gb"),
        "hbrg",
        "10.78.2.1".parse().unwrap(),
        "10.78.2.2".parse().unwrap(),
        1500,
        "hvg0",
    )?;
    sh(&h1, &format!("ip route replace 10.78.2.0/24 via {p2}"))?;
    sh(&h2, &format!("ip route replace 10.78.1.0/24 via {p1}"))?;
    let path = |s: &str| PathBuf::from(format!("/run/netns/{}", n(s)));
    Ok((
        Way {
            name: "hand-built VXLAN",
            client: path("va"),
            server: path("vb"),
            server_ip: "10.77.2.2".parse().unwrap(),
        },
        Way {
            name: "hand-built host-gw",
            client: path("ga"),
            server: path("gb"),
            server_ip: "10.78.2.2".parse().unwrap(),
        },
    ))
}

/// Two sandboxes on `net` (h1 client, h2 server), as a way.
fn weft_way(lab: &Lab, net: &str, name: &'static str) -> Result<Way> {
    let mut ends = Vec::new();
    for (i, who) in [(0usize, "c"), (1usize, "s")] {
        let sb = format!("{who}{net}");
        let out = lab
            .weft(
                i,
                &[
                    "--format", "json", "run", "-d", "--name", &sb, "--net", net, "--", "sleep",
                    "1d",
                ],
            )
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "weft run: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let ns = v["netns"]
            .as_str()
            .ok_or("sandbox without netns")?
            .to_string();
        let ip: Ipv4Addr = v["attachment"]["endpoints"][0]["ip"]
            .as_str()
            .ok_or("no address")?
            .parse()
            .map_err(|_| "bad address")?;
        ends.push((PathBuf::from(ns), ip));
    }
    Ok(Way {
        name,
        client: ends[0].0.clone(),
        server: ends[1].0.clone(),
        server_ip: ends[1].1,
    })
}

fn iperf(way: &Way, streams: u32, seconds: u32) -> Result<f64> {
    let _srv = Server(
        Command::new("nsenter")
            .arg(format!("--net={}", way.server.display()))
            .args(["iperf3", "-s", "-p", "5301"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    let mut last = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let out = Command::new("nsenter")
            .arg(format!("--net={}", way.client.display()))
            .args([
                "iperf3",
                "-c",
                &way.server_ip.to_string(),
                "-p",
                "5301",
                "-C",
                "cubic",
                "-J",
            ])
            .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
            .output()
            .map_err(|e| e.to_string())?;
        match parse_result(&out.stdout) {
            Ok(r) => return Ok(r.gbps),
            Err(e) => last = e.to_string(),
        }
        if !last.contains("connect") {
            break;
        }
    }
    Err(format!("{}: {last}", way.name))
}

fn ping_ms(way: &Way) -> Result<f64> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", way.client.display()))
        .args([
            "ping",
            "-q",
            "-c",
            "200",
            "-i",
            "0.005",
            &way.server_ip.to_string(),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 0.051/0.062/0.150/0.010 ms
    text.lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{}: ping failed: {text}", way.name))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    name: &'static str,
    one: f64,
    four: f64,
    rtt: f64,
}

fn run(base: &Path, args: &Args, pid: u32) -> Result<bool> {
    let weft = weft_binary(args.weft.as_ref())?;
    std::fs::create_dir_all(base).map_err(|e| e.to_string())?;
    let _base = RemoveDir(base);
    eprintln!("overlay: a 2-host lab...");
    let lab = LabGuard(
        Lab::up(
            &LabSpec {
                name: "ov".into(),
                root: base.into(),
                hosts: 2,
                backend: Some("vxlan".into()),
                network: Some(("vx".into(), "10.40.0.0/16".parse().unwrap())),
                lease_ttl: 60,
                weft_bin: weft,
            },
            &mut |s| eprintln!("  {s}"),
        )
        .map_err(|e| format!("lab up: {e}"))?,
    );
    let l = &lab.0;
    for (name, backend, range) in [
        ("hg", "host-gw", "10.41.0.0/16"),
        ("ud", "udp", "10.42.0.0/16"),
        ("se", "secure", "10.43.0.0/16"),
    ] {
        let out = l
            .weft(
                0,
                &[
                    "network",
                    "create",
                    "-d",
                    "overlay",
                    "--backend",
                    backend,
                    "--subnet",
                    range,
                    name,
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
        for i in 0..2 {
            for _ in 0..100 {
                if l.programmed_peers(i, name) == Some(1) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let mut names = NamedNs(Vec::new());
    let (hand_vx, hand_gw) = hand_built(l, &mut names, pid)?;
    let ways = [
        Way {
            name: "wire (bare veth)",
            client: l.host_netns(0),
            server: l.host_netns(1),
            server_ip: l.hosts[1].ip,
        },
        hand_vx,
        weft_way(l, "vx", "weft vxlan")?,
        hand_gw,
        weft_way(l, "hg", "weft host-gw")?,
        weft_way(l, "ud", "weft udp")?,
        weft_way(l, "se", "weft secure")?,
    ];
    // Round-robin over the ways, so a busy moment of the machine spreads
    // over all of them instead of skewing one.
    let mut one = vec![Vec::new(); ways.len()];
    let mut four = vec![Vec::new(); ways.len()];
    let mut rtt = vec![Vec::new(); ways.len()];
    for run in 0..args.runs {
        // Every other round in reverse, so no way always follows the same one.
        let mut order: Vec<usize> = (0..ways.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for k in order {
            let w = &ways[k];
            eprintln!("overlay: run {} of {}: {}...", run + 1, args.runs, w.name);
            rtt[k].push(ping_ms(w)? * 1000.0);
            one[k].push(iperf(w, 1, args.seconds)?);
            four[k].push(iperf(w, 4, args.seconds)?);
        }
    }
    let rows: Vec<Row> = ways
        .iter()
        .enumerate()
        .map(|(k, w)| Row {
            name: w.name,
            one: median(one[k].clone()),
            four: median(four[k].clone()),
            rtt: median(rtt[k].clone()),
        })
        .collect();
    let by = |n: &str| rows.iter().find(|r| r.name == n).unwrap();
    let wire = by("wire (bare veth)");
    println!(
        "iperf3 -C cubic, {} s, median of {} interleaved runs (every other one in reverse order); RTT: median of the runs' mean of 200 pings at 5 ms",
        args.seconds, args.runs
    );
    println!(
        "{:<20} {:>10} {:>8} {:>10} {:>8} {:>10}",
        "path", "1 stream", "/wire", "4 streams", "/wire", "RTT"
    );
    for r in &rows {
        println!(
            "{:<20} {:>6.2} Gb/s {:>7.2}x {:>6.2} Gb/s {:>7.2}x {:>7.1} us",
            r.name,
            r.one,
            r.one / wire.one,
            r.four,
            r.four / wire.four,
            r.rtt
        );
    }
    let mut ok = true;
    for (weft, hand) in [
        ("weft vxlan", "hand-built VXLAN"),
        ("weft host-gw", "hand-built host-gw"),
    ] {
        let (w, h) = (by(weft), by(hand));
        let (r1, r4, lat) = (w.one / h.one, w.four / h.four, w.rtt / h.rtt);
        let met = r1 >= 0.95 && r4 >= 0.95 && lat <= 1.10;
        ok &= met;
        println!(
            "{weft} / {hand}: 1 stream {r1:.2}x, 4 streams {r4:.2}x, RTT {lat:.2}x  (goal >= 0.95x, RTT <= 1.10x: {})",
            if met { "met" } else { "NOT met" }
        );
    }
    let vx = by("hand-built VXLAN");
    for (weft, goal) in [("weft udp", 0.5), ("weft secure", 0.3)] {
        let w = by(weft);
        let (r1, r4) = (w.one / vx.one, w.four / vx.four);
        println!(
            "{weft} / hand-built VXLAN: 1 stream {r1:.2}x, 4 streams {r4:.2}x  (goal >= {goal}x: {})",
            if r1 >= goal && r4 >= goal { "met" } else { "NOT met" }
        );
    }
    drop(names);
    let _ = ok;
    // The figures are the result; a goal not met is reported above, not an error.
    Ok(true)
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_checked("overlay", Path::new("/dev/shm"), |base, pid| {
        run(base, &args, pid).map_err(Error::new)
    })
}
