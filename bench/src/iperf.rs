//! iperf3 throughput: the client run inside one of our namespaces against a
//! server in a sandbox or container, its JSON result, and waiting until the
//! machine is quiet enough to measure.

use crate::netns::Netns;
use crate::sys::{self, bail, run, wait_until, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

pub struct IperfOpts {
    pub bin: PathBuf,
    /// Seconds per measurement (`-t`).
    pub seconds: u32,
    /// TCP congestion control for both ends (`-C`; the client passes it to
    /// the server, which sets it on its data socket).
    pub congestion: String,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct IperfResult {
    /// What the receiver got, in Gbit/s.
    pub gbps: f64,
    pub retransmits: Option<u64>,
    pub sender_congestion: String,
    pub receiver_congestion: String,
}

/// Reads iperf3's `-J` output: the receiver's rate and the congestion
/// control both ends used. An `"error"` in it is returned as the error.
pub fn parse_result(json: &[u8]) -> Result<IperfResult> {
    let v: Value = serde_json::from_slice(json).context(format_args!(
        "iperf3 printed no JSON ({:?})",
        String::from_utf8_lossy(&json[..json.len().min(300)])
    ))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return bail(format!("iperf3: {err}"));
    }
    let end = v.get("end").context("iperf3's JSON has no \"end\"")?;
    let bps = end
        .pointer("/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3's JSON has no end.sum_received.bits_per_second")?;
    let cc = |k: &str| {
        end.get(k)
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string()
    };
    Ok(IperfResult {
        gbps: bps / 1e9,
        retransmits: end.pointer("/sum_sent/retransmits").and_then(Value::as_u64),
        sender_congestion: cc("sender_tcp_congestion"),
        receiver_congestion: cc("receiver_tcp_congestion"),
    })
}

/// Makes reno the default congestion control of the namespace at
/// `netns`, so that iperf3's connections do not start under the machine's
/// default.
///
/// iperf3 3.12 sets `-C` on its data sockets only after connect(). On a
/// machine whose default is bbr, bbr's init has by then switched on the
/// socket's internal pacing, and switching to cubic leaves it on. Paced
/// sends go out from the pacing timer's softirq, and a multi-stream run
/// falls at random into a state where one CPU carries the whole path while
/// the other idles (a quarter to a half of the rate, for seconds). reno
/// has no init, so nothing is switched on before cubic takes over. (A
/// non-initial namespace may only default to an allowed algorithm, and
/// reno always is.) Only the test's own sender and receiver change.
pub fn start_unpaced(netns: &std::path::Path) -> Result<()> {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).args([
        "sysctl",
        "-qw",
        "net.ipv4.tcp_congestion_control=reno",
    ]);
    let out = run(&mut cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        return bail(format!(
            "`{}`: {}",
            sys::describe(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// One of iperf3's per-second reports: seconds since the test began, and
/// the rate the sender saw in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub start: f64,
    pub end: f64,
    pub gbps: f64,
}

/// The `intervals` of iperf3's `-J` output (the sum over all streams).
pub fn parse_intervals(json: &[u8]) -> Result<Vec<Interval>> {
    let v: Value = serde_json::from_slice(json).context("iperf3 printed no JSON")?;
    let list = v
        .get("intervals")
        .and_then(Value::as_array)
        .context("iperf3's JSON has no \"intervals\"")?;
    list.iter()
        .map(|i| {
            let f = |k: &str| {
                i.pointer(&format!("/sum/{k}"))
                    .and_then(Value::as_f64)
                    .context(format_args!("an iperf3 interval without sum.{k}"))
            };
            Ok(Interval {
                start: f("start")?,
                end: f("end")?,
                gbps: f("bits_per_second")? / 1e9,
            })
        })
        .collect()
}

/// `iperf3 -c HOST -p PORT -t SECS -C CC -J [-B BIND]` inside `ns`. A
/// server still busy with the previous test is retried for a while.
pub fn run_client(
    ns: &Netns,
    opts: &IperfOpts,
    host: Ipv4Addr,
    port: u16,
    bind: Option<Ipv4Addr>,
) -> Result<IperfResult> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        sys::check_interrupted()?;
        let mut cmd = ns.entered(&opts.bin)?;
        cmd.args(["-c", &host.to_string(), "-p", &port.to_string()])
            .args(["-t", &opts.seconds.to_string()])
            .args(["-C", &opts.congestion])
            .args(["--connect-timeout", "5000", "-J"]);
        if let Some(b) = bind {
            cmd.args(["-B", &b.to_string()]);
        }
        let out = run(&mut cmd, Duration::from_secs(u64::from(opts.seconds) + 40))?;
        let res = parse_result(&out.stdout);
        match res {
            Err(e) if e.to_string().contains("busy") && Instant::now() < deadline => {
                thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stderr = stderr.trim();
                return bail(format!(
                    "`{}` in {} ({}): {e}{}",
                    sys::describe(&cmd),
                    ns.name(),
                    out.status,
                    if stderr.is_empty() {
                        String::new()
                    } else {
                        format!(" (stderr: {stderr})")
                    }
                ));
            }
            Ok(r) => {
                if r.sender_congestion != opts.congestion
                    || r.receiver_congestion != opts.congestion
                {
                    return bail(format!(
                        "iperf3 to {host}:{port} used congestion control {} (sender) / {} (receiver), not {}",
                        r.sender_congestion, r.receiver_congestion, opts.congestion
                    ));
                }
                return Ok(r);
            }
        }
    }
}

/// Whether a /proc/net/tcp or tcp6 table has a socket listening on `port`.
pub fn table_listens(table: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3
            && f[3] == "0A"
            && f[1]
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.eq_ignore_ascii_case(&want))
    })
}

/// Waits until a TCP socket listens on `port` in the network namespace of
/// process `pid` (read from /proc/PID/net, which shows that namespace).
pub fn wait_listening(pid: i32, port: u16, timeout: Duration) -> Result<()> {
    let listening = || {
        ["tcp", "tcp6"].iter().any(|t| {
            fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                .map(|s| table_listens(&s, port))
                .unwrap_or(false)
        })
    };
    if wait_until(timeout, Duration::from_millis(20), listening) {
        return Ok(());
    }
    sys::check_interrupted()?;
    let alive = sys::proc_start_time(pid).is_some();
    bail(format!(
        "nothing listens on TCP port {port} in the namespace of process {pid} after {} s (the process is {})",
        timeout.as_secs(),
        if alive { "running" } else { "gone" }
    ))
}

// ---------------------------------------------------------------------------
// Load

/// The 1-minute load average.
pub fn loadavg1() -> Result<f64> {
    let s = fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    s.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .context(format_args!("unexpected /proc/loadavg: {s:?}"))
}

/// How quiet the machine was when a measurement started.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LoadSeen {
    /// 1-minute load average when we started waiting.
    pub before_wait: f64,
    /// … and when the measurement started.
    pub at_start: f64,
    pub waited_s: f64,
    /// Gave up waiting: measured at a load at or above the limit.
    pub gave_up: bool,
}

/// Waits until the 1-minute load average is below `max`, up to `limit`,
/// saying on stderr what it waits for (after 10 s, then every 30 s).
/// The measurements themselves load the machine (iperf3's two ends keep
/// both CPUs of a small machine busy), so back-to-back runs typically wait
/// a few seconds each for the average to fall again.
pub fn wait_for_quiet(max: f64, limit: Duration, what: &str) -> Result<LoadSeen> {
    let t = Instant::now();
    let before = loadavg1()?;
    let mut now = before;
    // Said after 10 s of waiting, then every 30 s.
    let mut said = Instant::now() - Duration::from_secs(20);
    while now >= max {
        sys::check_interrupted()?;
        if t.elapsed() >= limit {
            eprintln!(
                "  load {now:.2} still ≥ {max} after {} s; measuring {what} anyway",
                limit.as_secs()
            );
            return Ok(LoadSeen {
                before_wait: before,
                at_start: now,
                waited_s: t.elapsed().as_secs_f64(),
                gave_up: true,
            });
        }
        if said.elapsed() >= Duration::from_secs(30) {
            eprintln!(
                "  waiting for the 1-minute load average ({now:.2}) to fall below {max} before {what} ({:.0} s so far)",
                t.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
        thread::sleep(Duration::from_secs(2));
        now = loadavg1()?;
    }
    Ok(LoadSeen {
        before_wait: before,
        at_start: now,
        waited_s: t.elapsed().as_secs_f64(),
        gave_up: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_result() {
        let j = br#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.1e10,"retransmits":3},
            "sum_received":{"bits_per_second":2.0e10},
            "sender_tcp_congestion":"cubic","receiver_tcp_congestion":"cubic"}}"#;
        let r = parse_result(j).unwrap();
        assert_eq!(r.gbps, 20.0);
        assert_eq!(r.retransmits, Some(3));
        assert_eq!(r.sender_congestion, "cubic");
        assert_eq!(r.receiver_congestion, "cubic");
    }

    #[test]
    fn reads_intervals() {
        let j = br#"{"intervals":[{"streams":[],"sum":{"start":0,"end":1.0002,"bits_per_second":3.0e10}},
            {"streams":[],"sum":{"start":1.0002,"end":2.0001,"bits_per_second":1.5e10}}],"end":{}}"#;
        let v = parse_intervals(j).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].start, 1.0002);
        assert_eq!(v[1].gbps, 15.0);
        assert!(parse_intervals(br#"{"intervals":[{"sum":{"start":0}}]}"#).is_err());
        assert!(parse_intervals(br#"{"end":{}}"#).is_err());
    }

    #[test]
    fn reads_error() {
        let j = br#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#;
        let e = parse_result(j).unwrap_err().to_string();
        assert!(e.contains("Connection refused"), "{e}");
        assert!(parse_result(b"garbage").is_err());
    }

    #[test]
    fn finds_listeners() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:9C40 0100007F:1451 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert!(table_listens(v4, 5201));
        assert!(!table_listens(v4, 40000)); // established, not listening
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000000000000:1451 00000000000000000000000000000000:0000 0A 0\n";
        assert!(table_listens(v6, 5201));
        assert!(!table_listens(v6, 80));
    }
}
