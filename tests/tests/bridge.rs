//! The default bridge network on one host: connectivity, masquerade, modes.

use weft_e2e::{text, TestHost};

#[test]
fn two_sandboxes_ping_each_other_and_the_gateway() {
    let h = TestHost::new(Some("10.71.0.0/16"));
    h.run_detached("a", &[], &["sleep", "infinity"]);
    h.run_detached("b", &[], &["sleep", "infinity"]);
    let (a, b) = (h.ip_of("a"), h.ip_of("b"));
    assert_ne!(a, b);
    for (from, to) in [("a", &b), ("b", &a), ("a", &"10.71.0.1".to_string())] {
        let out = h.exec(from, &format!("ping -c 2 -W 2 {to}"));
        assert!(out.status.success(), "{from} -> {to}: {}", text(&out));
    }
    // eth0 with the address, lo up, default route via the bridge.
    let out = h.exec(
        "a",
        "ip -o -4 addr show dev eth0; ip route show default; ip -o link show lo",
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains(&format!("{a}/16")), "{s}");
    assert!(s.contains("default via 10.71.0.1 dev eth0"), "{s}");
    assert!(s.contains("LOOPBACK,UP"), "{s}");
}

#[test]
fn host_pings_a_sandbox_and_connects_to_its_tcp_server() {
    let h = TestHost::new(Some("10.72.0.0/16"));
    h.run_detached(
        "srv",
        &[],
        &[
            "socat",
            "TCP-LISTEN:8080,fork,reuseaddr",
            "SYSTEM:echo hello-from-sandbox",
        ],
    );
    let ip = h.ip_of("srv");
    h.ns.sh(&format!("ping -c 2 -W 2 {ip}"));
    // The listener may need a moment after `run -d` returns.
    let mut last = String::new();
    for _ in 0..50 {
        let out =
            h.ns.try_sh(&format!("socat -T 2 - TCP:{ip}:8080 </dev/null"));
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains("hello-from-sandbox") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no answer from the TCP server in the sandbox: {last:?}");
}

#[test]
fn sandbox_reaches_the_outside_through_masquerade() {
    let h = TestHost::new(Some("10.73.0.0/16"));
    // An "outside" network behind the host, with no route back to the sandboxes.
    let out = h.outside();
    let mut server = out
        .command("socat")
        .args([
            "TCP-LISTEN:9000,fork,reuseaddr",
            "SYSTEM:echo $SOCAT_PEERADDR",
        ])
        .spawn()
        .expect("socat");
    h.run_detached("c", &[], &["sleep", "infinity"]);
    let ping = h.exec("c", "ping -c 2 -W 2 203.0.113.2");
    let mut seen = String::new();
    for _ in 0..50 {
        let o = h.exec("c", "socat -T 2 - TCP:203.0.113.2:9000 </dev/null");
        seen = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !seen.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(ping.status.success(), "ping outside: {}", text(&ping));
    assert_eq!(
        seen, "203.0.113.1",
        "the outside must see the host's address"
    );
}

#[test]
fn host_none_and_container_modes() {
    let h = TestHost::new(Some("10.74.0.0/16"));
    // host: the agent's namespace, with the bridge in it.
    let out = h.weft(&[
        "run", "--net", "host", "--", "ip", "-o", "link", "show", "weft0",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // none: only lo, up.
    let out = h.weft(&["run", "--net", "none", "--", "ip", "-o", "link"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(s.lines().count(), 1, "{s}");
    assert!(s.contains("lo:") && s.contains("LOOPBACK,UP"), "{s}");
    // container: same address, same ports.
    h.run_detached(
        "base",
        &[],
        &[
            "socat",
            "TCP-LISTEN:7000,bind=127.0.0.1,fork,reuseaddr",
            "SYSTEM:echo shared",
        ],
    );
    let ip = h.ip_of("base");
    let out = h.weft(&[
        "run",
        "--net",
        "container:base",
        "--",
        "ip",
        "-o",
        "-4",
        "addr",
        "show",
        "dev",
        "eth0",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&ip),
        "{}",
        text(&out)
    );
    let mut got = String::new();
    for _ in 0..50 {
        let out = h.weft(&[
            "run",
            "--net",
            "container:base",
            "--",
            "socat",
            "-T",
            "2",
            "-",
            "TCP:127.0.0.1:7000",
        ]);
        got = String::from_utf8_lossy(&out.stdout).into_owned();
        if got.contains("shared") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        got.contains("shared"),
        "port of base not reachable from container:base: {got:?}"
    );
    // Only base is left: the foreground runs removed themselves.
    let ps = h.ps();
    assert_eq!(ps.len(), 1, "{ps:?}");
}

#[test]
fn foreground_run_returns_the_exit_code_and_removes_the_sandbox() {
    let h = TestHost::new(Some("10.75.0.0/16"));
    let out = h.weft(&["run", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(h.ps().len(), 0);
    h.wait_sandbox_veths(&[]);
}

#[test]
fn default_subnet_avoids_the_hosts_routes() {
    // Start a host whose namespace already routes 172.17.0.0/16: weft must pick another.
    let h = TestHost::new(None);
    let first = h.networks();
    assert_eq!(
        first[0].subnet.to_string(),
        "172.17.0.0/16",
        "empty host takes the first of the pool"
    );
    drop(h);

    let mut h = TestHost::new(Some("10.76.0.0/16"));
    h.kill_agent(libc::SIGTERM);
    std::fs::remove_dir_all(h.data_dir()).unwrap();
    h.ns.sh("ip link del weft0; ip link add wftdum0 type bridge && ip addr add 172.17.5.1/16 dev wftdum0 && ip link set wftdum0 up && ip route add unreachable 172.18.0.0/16");
    h.subnet = None;
    h.start_agent();
    let nets = h.networks();
    assert_eq!(nets[0].subnet.to_string(), "172.19.0.0/16", "{nets:?}");
}

#[test]
fn removing_sandboxes_keeps_the_gateway_reachable() {
    // A bridge without a MAC of its own takes its lowest port's and changes
    // it when that port goes; weft's bridges have a fixed one.
    let h = TestHost::new(Some("10.77.0.0/16"));
    for n in ["g1", "g2", "g3", "g4"] {
        h.run_detached(n, &[], &["sleep", "infinity"]);
    }
    for n in ["g1", "g2", "g4"] {
        assert!(h.exec(n, "ping -c 1 -W 2 10.77.0.1").status.success());
    }
    h.weft_ok(&["rm", "-f", "g1", "g2", "g4"]);
    let out = h.exec("g3", "ping -c 2 -W 2 10.77.0.1");
    assert!(out.status.success(), "{}", text(&out));
    let link = h.ns.sh("ip -o link show weft0");
    assert!(link.contains("02:77:0a:4d:00:01"), "{link}");
}
