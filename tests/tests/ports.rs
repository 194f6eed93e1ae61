//! Published ports: from outside, from the host (localhost and its own
//! addresses), from a sibling sandbox through the host address (hairpin),
//! TCP, UDP and ranges; conflicts; nothing left after removal.

use weft_e2e::{text, TestHost};

/// Reads one line from a TCP or UDP service, retrying while it starts.
fn ask(run: impl Fn() -> std::process::Output, want: &str) -> String {
    let mut got = String::new();
    for _ in 0..30 {
        got = String::from_utf8_lossy(&run().stdout).trim().to_string();
        if got.contains(want) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    got
}

fn tcp(addr: &str) -> String {
    format!("socat -T 2 - TCP:{addr},connect-timeout=2 </dev/null")
}

fn udp(addr: &str) -> String {
    format!("echo hi | socat -T 2 - UDP:{addr}")
}

#[test]
fn published_ports_work_from_everywhere_and_go_with_the_sandbox() {
    let h = TestHost::new(Some("10.151.0.0/16"));
    let outside = h.outside();
    let table_before = h.ns.sh("nft list table inet weft");

    let script = "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo web-tcp' & \
                  socat UDP-RECVFROM:53,fork SYSTEM:'echo web-udp' & \
                  socat TCP-LISTEN:9001,fork,reuseaddr SYSTEM:'echo web-range' & wait";
    h.run_detached(
        "web",
        &[
            "-p",
            "8080:80",
            "-p",
            "5353:53/udp",
            "-p",
            "9000-9002:9000-9002",
            "-p",
            "127.0.0.1:8081:80",
        ],
        &["sh", "-c", script],
    );
    h.run_detached("sibling", &[], &["sleep", "infinity"]);

    // From outside, to the host's address.
    assert_eq!(
        ask(|| outside.try_sh(&tcp("203.0.113.1:8080")), "web-tcp"),
        "web-tcp"
    );
    assert_eq!(
        ask(|| outside.try_sh(&udp("203.0.113.1:5353")), "web-udp"),
        "web-udp"
    );
    assert_eq!(
        ask(|| outside.try_sh(&tcp("203.0.113.1:9001")), "web-range"),
        "web-range"
    );
    // Bound to 127.0.0.1 only: not from outside.
    assert_eq!(outside.try_sh(&tcp("203.0.113.1:8081")).stdout, b"");
    // From the host itself: localhost, its outside address, the bridge address.
    for addr in [
        "127.0.0.1:8080",
        "203.0.113.1:8080",
        "10.151.0.1:8080",
        "127.0.0.1:8081",
    ] {
        assert_eq!(
            ask(|| h.ns.try_sh(&tcp(addr)), "web-tcp"),
            "web-tcp",
            "host -> {addr}"
        );
    }
    assert_eq!(
        ask(|| h.ns.try_sh(&udp("127.0.0.1:5353")), "web-udp"),
        "web-udp"
    );
    // From a sibling on the same bridge, through the host address (hairpin).
    assert_eq!(
        ask(|| h.exec("sibling", &tcp("203.0.113.1:8080")), "web-tcp"),
        "web-tcp"
    );
    assert_eq!(
        ask(|| h.exec("sibling", &udp("203.0.113.1:5353")), "web-udp"),
        "web-udp"
    );
    assert_eq!(
        ask(|| h.exec("sibling", &tcp("203.0.113.1:9001")), "web-range"),
        "web-range"
    );

    // weft port lists them.
    let ports = h.weft_ok(&["port", "web"]);
    assert!(ports.contains("80/tcp -> 0.0.0.0:8080"), "{ports}");
    assert!(
        ports.contains("9000-9002/tcp -> 0.0.0.0:9000-9002"),
        "{ports}"
    );
    assert!(ports.contains("80/tcp -> 127.0.0.1:8081"), "{ports}");
    // A range is one element; the rule count does not depend on ports.
    let table = h.ns.sh("nft list table inet weft");
    assert!(table.contains("tcp . 9000-9002 : "), "{table}");
    assert_eq!(rule_count(&table), rule_count(&table_before));

    // A conflicting publish is refused, naming the holder; nothing is made.
    let links = h.sandbox_veths();
    for p in ["8080:81", "9002:80", "5353:53/udp"] {
        let out = h.weft(&["run", "-d", "-p", p, "--", "sleep", "infinity"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("already published by sandbox web"),
            "-p {p}: {}",
            text(&out)
        );
    }
    assert_eq!(h.sandbox_veths(), links);
    // Another protocol on the same number is fine.
    h.run_detached("udp8080", &["-p", "8080:80/udp"], &["sleep", "infinity"]);

    h.weft_ok(&["rm", "-f", "web", "sibling", "udp8080"]);
    // The shell's background jobs went with it.
    let left = std::process::Command::new("pgrep")
        .args(["-f", "echo web-tcp"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes of web left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert_eq!(outside.try_sh(&tcp("203.0.113.1:8080")).stdout, b"");
    assert_eq!(
        h.ns.sh("nft list table inet weft"),
        table_before,
        "the table is exactly as before"
    );
}

fn rule_count(table: &str) -> usize {
    let rules = ["jump", "dnat", "masquerade", "accept", "drop"];
    table
        .lines()
        .filter(|l| {
            rules
                .iter()
                .any(|r| l.trim_end().ends_with(r) || l.contains(&format!(" {r} ")))
        })
        .count()
}

#[test]
fn ports_need_a_network_that_is_not_internal() {
    let h = TestHost::new(Some("10.152.0.0/16"));
    h.weft_ok(&[
        "network",
        "create",
        "--internal",
        "--subnet",
        "10.153.0.0/24",
        "inside",
    ]);
    for (args, needle) in [
        (
            vec!["run", "--net", "none", "-p", "80:80", "--", "true"],
            "has none",
        ),
        (
            vec!["run", "--net", "inside", "-p", "80:80", "--", "true"],
            "internal",
        ),
        (
            vec!["run", "-p", "80-82", "--", "true"],
            "give the host ports",
        ),
        (
            vec!["run", "-p", "8000-8002:80-81", "--", "true"],
            "same size",
        ),
        (vec!["run", "-P", "--", "true"], "add --expose PORT"),
        (
            vec!["run", "--expose", "http", "-P", "--", "true"],
            "expected PORT",
        ),
        (
            vec!["run", "-p", "80:80", "-p", "80:81", "--", "true"],
            "overlaps",
        ),
    ] {
        let out = h.weft(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    assert_eq!(h.ps().len(), 0);
}

/// A published host port is held like Docker's proxy holds it (issue 18,
/// point 2): a host service already on the port makes `-p` fail, naming
/// it, with nothing made; while the port is published a host process
/// cannot bind it (and so cannot lose its traffic unknowingly); after `rm`
/// it can.
#[test]
fn a_published_port_is_held_against_host_processes() {
    use std::io::ErrorKind;
    use std::net::{TcpListener, UdpSocket};
    let mut h = TestHost::new(Some("10.153.0.0/16"));
    let bind_tcp = |h: &TestHost, port: u16| {
        h.ns.run(move || {
            TcpListener::bind(("0.0.0.0", port))
                .map(drop)
                .map_err(|e| e.kind())
        })
    };

    // A host service on 9191: a socket of this test process in the host's namespace.
    let service =
        h.ns.run(|| TcpListener::bind("0.0.0.0:9191").expect("bind 9191 for the host service"));
    let table_before = h.ns.sh("nft list table inet weft");
    let out = h.weft(&[
        "run", "-d", "--name", "wftheld", "-p", "9191:80", "--", "sleep", "infinity",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "-p on a port in use must fail: {err}"
    );
    assert!(
        err.contains("9191")
            && err.contains("already in use")
            && err.contains(&format!("pid {}", std::process::id())),
        "the error names the port and the process that has it: {err}"
    );
    assert!(h.ps().is_empty(), "nothing half-made: {:?}", h.ps());
    assert_eq!(
        h.ns.sh("nft list table inet weft"),
        table_before,
        "no port rule left behind"
    );
    drop(service);

    h.run_detached(
        "held",
        &["-p", "9191:80", "-p", "9192:53/udp"],
        &["sleep", "infinity"],
    );
    assert_eq!(
        bind_tcp(&h, 9191),
        Err(ErrorKind::AddrInUse),
        "tcp 9191 is held"
    );
    let udp = h.ns.run(|| {
        UdpSocket::bind("0.0.0.0:9192")
            .map(drop)
            .map_err(|e| e.kind())
    });
    assert_eq!(udp, Err(ErrorKind::AddrInUse), "udp 9192 is held");

    // An agent killed and restarted holds the ports again as it adopts.
    h.kill_agent(libc::SIGKILL);
    h.start_agent();
    assert_eq!(
        bind_tcp(&h, 9191),
        Err(ErrorKind::AddrInUse),
        "tcp 9191 is held after an agent restart"
    );

    h.weft_ok(&["rm", "-f", "held"]);
    assert_eq!(bind_tcp(&h, 9191), Ok(()), "free again after rm");
}

/// Docker's other forms of -p (issue 18): no host port (or `IP::PORT`) is a
/// free one of the ephemeral range, skipping ports a sandbox publishes or a
/// host process has; `A-B:PORT` is a free one of A-B; a shifted range maps
/// port by port; -P publishes every --expose port. `weft port` shows the
/// chosen ports and traffic to each arrives where it says.
#[test]
fn docker_port_forms_choose_free_host_ports_and_shift_ranges() {
    use std::net::TcpListener;
    let h = TestHost::new(Some("10.154.0.0/16"));
    let outside = h.outside();
    // The first two ports of the ephemeral range are taken: one by a host
    // service (a socket of this test in the host's namespace), one by a sandbox.
    let service =
        h.ns.run(|| TcpListener::bind("0.0.0.0:49153").expect("bind 49153"));
    h.run_detached("first", &["-p", "49154:80"], &["sleep", "infinity"]);
    let script =
        "for p in 80 81 82; do socat TCP-LISTEN:$p,fork,reuseaddr SYSTEM:\"echo port-$p\" & done; \
                  socat UDP-RECVFROM:53,fork SYSTEM:'echo dns' & wait";
    h.run_detached(
        "web",
        &[
            "-p",
            "80",
            "-p",
            "127.0.0.1::81",
            "-p",
            "7000-7002:82",
            "-p",
            "8000-8002:80-82",
            "--expose",
            "53/udp",
            "-P",
        ],
        &["sh", "-c", script],
    );
    let ports = h.weft_ok(&["port", "web"]);
    // "80/tcp -> 0.0.0.0:49155 (10.154.0.3:80)": the host port of a container port and address.
    let host_port = |container: &str, addr: &str| -> u16 {
        ports
            .lines()
            .find_map(|l| {
                let (c, h) = l.split_once(" -> ")?;
                let (a, p) = h.split(' ').next()?.rsplit_once(':')?;
                (c == container && a == addr)
                    .then(|| p.parse().ok())
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no {container} on {addr} in:\n{ports}"))
    };
    let any80 = host_port("80/tcp", "0.0.0.0");
    assert_eq!(any80, 49155, "the first free port of 49153-60999:\n{ports}");
    let local81 = host_port("81/tcp", "127.0.0.1");
    assert_eq!(
        local81, 49156,
        "49153-49155 are taken on every address, 127.0.0.1 too:\n{ports}"
    );
    let ranged = host_port("82/tcp", "0.0.0.0");
    assert_eq!(ranged, 7000, "one port of 7000-7002:\n{ports}");
    let dns = host_port("53/udp", "0.0.0.0");
    assert_eq!(
        dns, 49153,
        "-P, and UDP ports are apart from TCP's:\n{ports}"
    );
    assert!(ports.contains("80-82/tcp -> 0.0.0.0:8000-8002"), "{ports}");

    let tcp_from = |ns: &weft_e2e::Netns, addr: String, want: &str| {
        assert_eq!(ask(|| ns.try_sh(&tcp(&addr)), want), want, "{addr}");
    };
    tcp_from(&outside, format!("203.0.113.1:{any80}"), "port-80");
    tcp_from(&outside, format!("203.0.113.1:{ranged}"), "port-82");
    for (host, container) in [(8000, 80), (8001, 81), (8002, 82)] {
        tcp_from(
            &outside,
            format!("203.0.113.1:{host}"),
            &format!("port-{container}"),
        );
    }
    tcp_from(&h.ns, format!("127.0.0.1:{local81}"), "port-81");
    assert_eq!(
        ask(
            || outside.try_sh(&udp(&format!("203.0.113.1:{dns}"))),
            "dns"
        ),
        "dns"
    );
    drop(service);
    h.weft_ok(&["rm", "-f", "web", "first"]);
}
