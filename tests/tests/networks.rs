//! User-defined networks: lifecycle, refused input, several networks per
//! sandbox, connect/disconnect, isolation and internal networks.

use weft_e2e::{text, TestHost};
use weft_model::api::{RemovedNetwork, State};

/// The error of a weft command that must fail.
fn err_of(h: &TestHost, args: &[&str]) -> String {
    let out = h.weft(args);
    assert!(
        !out.status.success(),
        "weft {args:?} should fail: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn create_ls_inspect_rm_prune() {
    let h = TestHost::new(Some("10.101.0.0/16"));
    h.weft_ok(&[
        "network",
        "create",
        "--subnet",
        "10.102.0.0/24",
        "--label",
        "team=a",
        "front",
    ]);
    // No --subnet: a free one from the pool.
    h.weft_ok(&["network", "create", "back"]);
    h.weft_ok(&[
        "network",
        "create",
        "--subnet",
        "10.103.0.0/16",
        "--ip-range",
        "10.103.7.0/24",
        "--gateway",
        "10.103.0.254",
        "--mtu",
        "1400",
        "-o",
        "bridge.name=wftmybr",
        "ranged",
    ]);
    let ls = h.networks();
    let names: Vec<&str> = ls.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["back", "bridge", "front", "ranged"]);
    let back = ls.iter().find(|n| n.name == "back").unwrap();
    assert_eq!(
        back.subnet.to_string(),
        "172.17.0.0/16",
        "first free subnet of the pool"
    );
    let ranged = h.network("ranged");
    assert_eq!(ranged.gateway.to_string(), "10.103.0.254");
    assert_eq!(ranged.bridge, "wftmybr");
    assert_eq!(ranged.mtu, Some(1400));
    let table = h.weft_ok(&["network", "inspect", "front"]);
    assert!(
        table.contains("team=a") && table.contains("10.102.0.0/24"),
        "{table}"
    );
    // The bridge exists with its gateway and MTU.
    let link =
        h.ns.sh("ip -o addr show dev wftmybr; ip -o link show dev wftmybr");
    assert!(
        link.contains("10.103.0.254/16") && link.contains("mtu 1400"),
        "{link}"
    );
    // Dynamic addresses come from the range; the sandbox has the MTU too.
    h.run_detached("r", &["--net", "ranged"], &["sleep", "infinity"]);
    assert!(h.ip_of("r").starts_with("10.103.7."), "{}", h.ip_of("r"));
    let mtu = h.exec("r", "cat /sys/class/net/eth0/mtu");
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1400");

    // rm is refused while a sandbox is attached, naming it; prune keeps it too.
    let e = err_of(&h, &["network", "rm", "ranged"]);
    assert!(e.contains("sandboxes attached (r)"), "{e}");
    let pruned: Vec<RemovedNetwork> = h.weft_json(&["network", "prune"]);
    let pruned: Vec<&str> = pruned.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(pruned, ["back", "front"]);
    // -f disconnects the sandbox, which keeps running.
    h.weft_ok(&["network", "rm", "-f", "ranged"]);
    assert_eq!(h.ps()[0].state, State::Running);
    assert!(!h.links().contains(&"wftmybr".to_string()));
    let ls = h.networks();
    assert_eq!(ls.len(), 1);
    let e = err_of(&h, &["network", "rm", "bridge"]);
    assert!(e.contains("default network"), "{e}");
}

#[test]
fn bad_network_input_is_refused_and_leaves_nothing() {
    // Without the namespace pool, every link is a network's or a sandbox's.
    let h = TestHost::with_agent_args(Some("10.104.0.0/16"), &["--netns-pool", "0"]);
    h.weft_ok(&["network", "create", "--subnet", "10.105.0.0/16", "taken"]);
    let before = (
        h.links(),
        h.weft_ok(&["network", "ls"]),
        h.ns.sh("nft list table inet weft"),
    );
    let cases: &[(&[&str], &str)] = &[
        (
            &["--subnet", "10.105.3.0/24", "x"],
            "overlaps 10.105.0.0/16 of network taken",
        ),
        (
            &["--subnet", "10.104.0.0/24", "x"],
            "overlaps 10.104.0.0/16 of network bridge",
        ),
        (
            &["--subnet", "10.106.0.0/16", "--gateway", "10.107.0.1", "x"],
            "not a host address",
        ),
        (
            &[
                "--subnet",
                "10.106.0.0/16",
                "--ip-range",
                "10.107.0.0/24",
                "x",
            ],
            "not inside",
        ),
        (&["--subnet", "10.106.0.0/16", "taken"], "already exists"),
        (
            &["--subnet", "10.106.0.0/16", "bad/name"],
            "invalid network name",
        ),
        (
            &["--subnet", "10.106.0.0/16", "--mtu", "50", "x"],
            "out of range",
        ),
        (
            &["--subnet", "10.106.0.0/16", "--mtu", "70000", "x"],
            "out of range",
        ),
        (
            &["--subnet", "10.106.0.0/16", "-o", "color=blue", "x"],
            "unknown option",
        ),
        (&["-d", "overlay9", "x"], "unknown driver"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["network", "create"];
        full.extend_from_slice(args);
        let e = err_of(&h, &full);
        assert!(e.contains(needle), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    let after = (
        h.links(),
        h.weft_ok(&["network", "ls"]),
        h.ns.sh("nft list table inet weft"),
    );
    assert_eq!(before, after);
}

#[test]
fn several_networks_one_interface_each_default_route_by_name() {
    let h = TestHost::new(Some("10.111.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.112.0.0/24", "zeta"]);
    h.weft_ok(&["network", "create", "--subnet", "10.113.0.0/24", "alpha"]);
    h.weft_ok(&[
        "network",
        "create",
        "--subnet",
        "10.114.0.0/24",
        "--internal",
        "aaa-internal",
    ]);
    h.run_detached(
        "m",
        &[
            "--net",
            "zeta:ip=10.112.0.9",
            "--net",
            "alpha",
            "--net",
            "aaa-internal",
        ],
        &["sleep", "infinity"],
    );
    let out = h.exec("m", "ip -o -4 addr show dev eth0; ip -o -4 addr show dev eth1; ip -o -4 addr show dev eth2; ip route show default");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("eth0    inet 10.112.0.9/24"), "{s}");
    assert!(s.contains("eth1    inet 10.113.0."), "{s}");
    assert!(s.contains("eth2    inet 10.114.0."), "{s}");
    // alpha sorts first among the non-internal networks.
    assert!(s.contains("default via 10.113.0.1 dev eth1"), "{s}");
    let e = err_of(
        &h,
        &[
            "run",
            "--net",
            "zeta",
            "--net",
            "alpha",
            "--ip",
            "10.112.0.5",
            "--",
            "true",
        ],
    );
    assert!(e.contains("NAME:ip=ADDR"), "{e}");
}

#[test]
fn connect_and_disconnect_a_running_sandbox() {
    let h = TestHost::new(Some("10.121.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.122.0.0/24", "blue"]);
    h.run_detached("a", &[], &["sleep", "infinity"]);
    h.run_detached("b", &["--net", "blue"], &["sleep", "infinity"]);
    let b = h.ip_of("b");
    let pid = h.sandbox("a").pid;
    assert!(
        !h.exec("a", &format!("ping -c 1 -W 1 {b}")).status.success(),
        "isolated before connect"
    );
    h.weft_ok(&[
        "network",
        "connect",
        "--ip",
        "10.122.0.50",
        "--alias",
        "alpha",
        "blue",
        "a",
    ]);
    let out = h.exec("a", &format!("ping -c 1 -W 2 {b}"));
    assert!(out.status.success(), "after connect: {}", text(&out));
    let inspect = h.weft_ok(&["network", "inspect", "blue"]);
    assert!(
        inspect.contains("10.122.0.50") && inspect.contains("alpha"),
        "{inspect}"
    );
    // The default route stays on bridge (b < blue? "blue" < "bridge"): Docker's rule moves it to blue.
    let route = String::from_utf8_lossy(&h.exec("a", "ip route show default").stdout).into_owned();
    assert!(route.contains("dev eth1"), "{route}");
    h.weft_ok(&["network", "disconnect", "blue", "a"]);
    assert!(
        !h.exec("a", &format!("ping -c 1 -W 1 {b}")).status.success(),
        "isolated after disconnect"
    );
    let route = String::from_utf8_lossy(&h.exec("a", "ip route show default").stdout).into_owned();
    assert!(route.contains("default via 10.121.0.1 dev eth0"), "{route}");
    assert!(h.exec("a", "ping -c 1 -W 2 10.121.0.1").status.success());
    // Same process all along: not restarted.
    let now = h.sandbox("a").pid;
    assert_eq!(pid, now);
    let e = err_of(&h, &["network", "disconnect", "blue", "a"]);
    assert!(e.contains("not on network blue"), "{e}");
}

/// Whether `from` reaches `to` over ICMP, TCP and UDP (each checked on its own).
fn reach(h: &TestHost, from: &str, to: &str) -> [bool; 3] {
    let icmp = h
        .exec(from, &format!("ping -c 1 -W 1 {to}"))
        .status
        .success();
    let tcp = String::from_utf8_lossy(
        &h.exec(
            from,
            &format!("socat -T 1 - TCP:{to}:7001,connect-timeout=1 </dev/null"),
        )
        .stdout,
    )
    .contains("tcp-ok");
    let udp = String::from_utf8_lossy(
        // -T 3: the server forks a shell per datagram, slow on a busy machine.
        &h.exec(from, &format!("echo ping | socat -T 3 - UDP:{to}:7002"))
            .stdout,
    )
    .contains("udp-ok");
    [icmp, tcp, udp]
}

/// `reach` for a pair that must reach each other: a probe that fails is
/// tried again (up to three times), since a datagram's forked reply can
/// miss its 3 s on a machine busy with parallel tests. A pair that must
/// not reach is probed once: no second probe could undo a packet that got through.
fn reach_all(h: &TestHost, from: &str, to: &str) -> [bool; 3] {
    let mut got = reach(h, from, to);
    for _ in 0..2 {
        if got == [true; 3] {
            break;
        }
        got = reach(h, from, to);
    }
    got
}

fn servers(h: &TestHost, name: &str, extra: &[&str]) {
    h.run_detached(name, extra, &["sh", "-c", "socat TCP-LISTEN:7001,fork,reuseaddr SYSTEM:'echo tcp-ok' & socat UDP-RECVFROM:7002,fork SYSTEM:'echo udp-ok' & wait"]);
}

#[test]
fn networks_are_isolated_both_ways_over_icmp_tcp_udp() {
    let h = TestHost::new(Some("10.131.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.132.0.0/24", "red"]);
    h.weft_ok(&["network", "create", "--subnet", "10.133.0.0/24", "green"]);
    servers(&h, "r1", &["--net", "red"]);
    servers(&h, "r2", &["--net", "red"]);
    servers(&h, "g1", &["--net", "green"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (r2, g1, r1) = (h.ip_of("r2"), h.ip_of("g1"), h.ip_of("r1"));
    assert_eq!(reach_all(&h, "r1", &r2), [true; 3], "same network");
    assert_eq!(reach(&h, "r1", &g1), [false; 3], "red -> green");
    assert_eq!(reach(&h, "g1", &r1), [false; 3], "green -> red");
    // The host reaches every network.
    for ip in [&r1, &g1] {
        h.ns.sh(&format!("ping -c 1 -W 2 {ip}"));
    }
    // A sandbox on both networks reaches both.
    servers(&h, "both", &["--net", "red", "--net", "green"]);
    assert_eq!(reach_all(&h, "both", &g1), [true; 3]);
    assert_eq!(reach_all(&h, "both", &r1), [true; 3]);
}

#[test]
fn an_internal_network_has_no_way_out() {
    let h = TestHost::new(Some("10.141.0.0/16"));
    let _outside = h.outside();
    h.weft_ok(&[
        "network",
        "create",
        "--internal",
        "--subnet",
        "10.142.0.0/24",
        "vault",
    ]);
    h.run_detached("v", &["--net", "vault"], &["sleep", "infinity"]);
    h.run_detached("open", &[], &["sleep", "infinity"]);
    let routes = String::from_utf8_lossy(&h.exec("v", "ip route").stdout).into_owned();
    assert!(!routes.contains("default"), "no default route: {routes}");
    assert!(
        !h.exec("v", "ping -c 1 -W 1 203.0.113.2").status.success(),
        "internal reached outside"
    );
    // Even with a route added by hand inside, the host does not forward it.
    let _ = h.exec("v", "ip route add default via 10.142.0.1");
    assert!(
        !h.exec("v", "ping -c 1 -W 1 203.0.113.2").status.success(),
        "internal forwarded"
    );
    assert!(!h
        .exec("v", &format!("ping -c 1 -W 1 {}", h.ip_of("open")))
        .status
        .success());
    // The host still reaches it, and the normal network still gets out.
    h.ns.sh(&format!("ping -c 1 -W 2 {}", h.ip_of("v")));
    assert!(h
        .exec("open", "ping -c 1 -W 2 203.0.113.2")
        .status
        .success());
    let table = h.ns.sh("nft list set inet weft masq_nets");
    assert!(
        !table.contains("10.142.0.0"),
        "internal is masqueraded: {table}"
    );
}
