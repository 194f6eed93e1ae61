//! `weft agent --metrics-listen`: Debian's real Prometheus scrapes an agent
//! of a lab, and its HTTP API shows counters rising after traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use weft_e2e::lab::TestLab;
use weft_testkit::ScratchDir;

const METRICS_PORT: u16 = 9178;
/// Prometheus listens on the etcd namespace's underlay address: a monitoring
/// server on the lab's LAN.
const PROMETHEUS: &str = "198.51.100.2:9090";

/// Kills and reaps a daemon a test started, pass or fail.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.0 request from inside namespace `ns`; the status line and body.
fn http(ns: &weft_kernel::Netns, addr: SocketAddr, method: &str, path: &str) -> (String, String) {
    let request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let reply = ns
        .run_in(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| weft_kernel::KernelError::io("connect", e))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            s.write_all(request.as_bytes())
                .and_then(|_| {
                    let mut out = String::new();
                    s.read_to_string(&mut out).map(|_| out)
                })
                .map_err(|e| weft_kernel::KernelError::io("http", e))
        })
        .unwrap_or_else(|e| format!("request failed: {e}"));
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// An instant query through Prometheus's HTTP API: the first sample's value.
fn query(ns: &weft_kernel::Netns, expr: &str) -> Option<f64> {
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (_, body) = http(
        ns,
        PROMETHEUS.parse().unwrap(),
        "GET",
        &format!("/api/v1/query?query={encoded}"),
    );
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    assert_eq!(v["status"], "success", "query {expr}: {body}");
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_an_agent_and_sees_counters_rise_after_traffic() {
    let mut lab = TestLab::up(2, None, 60);
    let b = lab.sandbox(1, "b");
    // h1's agent again, now with the listener (every host's netns has its
    // own port space: the wildcard address is h1's alone).
    lab.extra_agent_args = vec!["--metrics-listen".into(), format!("0.0.0.0:{METRICS_PORT}")];
    lab.stop_agent(0, libc::SIGTERM).unwrap();
    lab.start_agent(0).unwrap();
    lab.sandbox(0, "a");
    // The peer gauge comes from the view the restarted agent's first pass writes.
    lab.wait(Duration::from_secs(10), "h1 to program h2 again", || {
        lab.lab.programmed_peers(0, "lab") == Some(1)
    });
    let h1 = SocketAddr::from((lab.hosts[0].ip, METRICS_PORT));
    let monitor = weft_kernel::Netns::open(&lab.dir.join("netns/etcd")).unwrap();

    // The page itself: Prometheus's text format, valid by promtool's rules.
    let (status, page) = http(&monitor, h1, "GET", "/metrics");
    assert!(status.contains("200"), "GET /metrics: {status}\n{page}");
    for name in [
        "weft_attach_duration_seconds_count{driver=\"overlay\",result=\"ok\"}",
        "weft_sandboxes{network=\"lab\"} 1",
        "weft_etcd_up 1",
        "weft_peers{network=\"lab\",backend=\"vxlan\",state=\"programmed\"} 1",
        "weft_backend_bytes_total{network=\"lab\",backend=\"vxlan\"",
        "weft_reconcile_duration_seconds_count{pass=\"startup\"} 1",
        "weft_etcd_lease_renewals_total{result=\"ok\"}",
    ] {
        assert!(page.contains(name), "no {name} in:\n{page}");
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; scripts/install-deps.sh does)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Read-only: nothing but the page is served there.
    let (status, _) = http(&monitor, h1, "GET", "/networks");
    assert!(
        status.contains("404"),
        "GET /networks on the metrics listener: {status}"
    );
    let (status, _) = http(&monitor, h1, "POST", "/metrics");
    assert!(status.contains("405"), "POST /metrics: {status}");

    let dir = ScratchDir::new("wft-prom");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: weft\n    static_configs:\n      - targets: ['{h1}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Daemon(
        weft_testkit::command_in(&lab.dir.join("netns/etcd"), "prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    lab.wait(
        Duration::from_secs(30),
        "Prometheus to scrape h1's agent",
        || query(&monitor, "up{job=\"weft\"}") == Some(1.0),
    );
    let bytes = "sum(weft_backend_bytes_total{direction=\"tx\"})";
    let attaches = "sum(weft_attach_duration_seconds_count{result=\"ok\"})";
    let bytes_before = query(&monitor, bytes).expect("backend bytes scraped");
    let attaches_before = query(&monitor, attaches).expect("attaches scraped");
    let names = "sum(weft_dns_queries_total{answer=\"local\"}) or vector(0)";
    let names_before = query(&monitor, names).expect("DNS queries scraped");

    // Traffic: pings from a on h1 to b on h2 through the VXLAN device, and
    // one more sandbox.
    let out = lab.exec(0, "a", &format!("ping -c 5 -i 0.2 -s 1000 -W 1 {b}"));
    assert!(out.status.success(), "a pings b: {}", weft_e2e::text(&out));
    lab.sandbox(0, "c");
    // And a name: a asks the network's resolver for c.
    let a: Vec<weft_model::api::SandboxView> = lab.weft_json(0, &["inspect", "a"]);
    let gw = a[0].attachment.endpoints()[0].gateway;
    let out = lab.exec(0, "a", &format!("dig +short +tries=1 +time=2 @{gw} c"));
    assert!(
        !weft_e2e::text(&out).trim().is_empty(),
        "a resolves c: {}",
        weft_e2e::text(&out)
    );

    lab.wait(
        Duration::from_secs(20),
        "Prometheus to see the traffic",
        || {
            query(&monitor, bytes).is_some_and(|v| v >= bytes_before + 5.0 * 1000.0)
                && query(&monitor, attaches).is_some_and(|v| v > attaches_before)
                && query(&monitor, names).is_some_and(|v| v > names_before)
        },
    );
}
