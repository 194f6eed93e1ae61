//! The cluster: overlay networks in etcd, per-host subnet leases, the
//! host-gw backend, and `weft lab` itself. Every test builds its own lab
//! (simulated hosts on an underlay switch, etcd, an agent per host) under
//! /dev/shm/wft-labs and removes it on drop.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weft_e2e::lab::{TestLab, NET, ROOT};
use weft_e2e::{text, unique, weft_bin};
use weft_model::api::SandboxView;

#[test]
fn sandboxes_on_three_hosts_reach_each_other_by_their_own_addresses_vxlan() {
    three_hosts(None);
}

#[test]
fn sandboxes_on_three_hosts_reach_each_other_by_their_own_addresses_host_gw() {
    three_hosts(Some("host-gw"));
}

fn three_hosts(backend: Option<&str>) {
    let lab = TestLab::up(3, backend, 60);
    // A lab host has its own name (a UTS namespace per command), the
    // machine keeps its own, and a sandbox started there inherits it.
    let hostname = |cmd: &[&str]| {
        let argv: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let out = lab.lab.exec(1, &argv).unwrap().output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(hostname(&["hostname"]), "h2");
    assert_eq!(
        hostname(&["weft", "run", "--net", "lab", "--", "hostname"]),
        "h2"
    );
    assert_ne!(
        String::from_utf8_lossy(&Command::new("hostname").output().unwrap().stdout).trim(),
        "h2"
    );
    let subnets: BTreeSet<_> = (0..3).map(|i| lab.subnet(i)).collect();
    assert_eq!(subnets.len(), 3, "leases are distinct: {subnets:?}");
    for s in &subnets {
        assert!(
            s.prefix_len() == 24
                && "10.40.0.0/16"
                    .parse::<ipnet::Ipv4Net>()
                    .unwrap()
                    .contains(s)
        );
    }
    let ips: Vec<_> = (0..3).map(|i| lab.sandbox(i, &format!("s{i}"))).collect();
    for (i, ip) in ips.iter().enumerate() {
        assert!(
            lab.subnet(i).contains(ip),
            "{ip} is from h{}'s subnet",
            i + 1
        );
    }
    for from in 0..3 {
        for (to, ip) in ips.iter().enumerate() {
            if from != to {
                assert!(
                    lab.ping(from, &format!("s{from}"), *ip),
                    "s{from} on h{} pings s{to} ({ip})",
                    from + 1
                );
            }
        }
    }
    // Names across hosts (flannel's kind too): every host's resolver knows
    // the other hosts' sandboxes, and forgets one when it is removed.
    lab.wait(Duration::from_secs(3), "s2's name on h1", || {
        lab.exec(0, "s0", "ping -c 1 -W 1 s2").status.success()
    });
    let answer = lab.exec(1, "s1", "getent hosts s0");
    assert!(
        String::from_utf8_lossy(&answer.stdout).contains(&ips[0].to_string()),
        "s0 resolves on h2: {}",
        text(&answer)
    );
    lab.weft_ok(
        2,
        &[
            "run", "-d", "--name", "gone", "--net", "lab", "--", "sleep", "1d",
        ],
    );
    lab.wait(Duration::from_secs(3), "gone's name on h1", || {
        lab.exec(0, "s0", "getent hosts gone").status.success()
    });
    lab.weft_ok(2, &["rm", "-f", "gone"]);
    lab.wait(Duration::from_secs(3), "gone's name to leave h1", || {
        !lab.exec(0, "s0", "getent hosts gone").status.success()
    });
    // TCP across hosts, and the peer sees the sandbox's own address (no masquerade inside the overlay).
    let server = lab
        .lab
        .weft(
            2,
            &[
                "exec",
                "s2",
                "--",
                "socat",
                "TCP-LISTEN:7000,reuseaddr",
                "SYSTEM:echo $SOCAT_PEERADDR",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = scopeguard(server);
    let mut seen = String::new();
    for _ in 0..50 {
        let out = lab.exec(
            0,
            "s0",
            &format!("socat -T2 - TCP:{}:7000 </dev/null", ips[2]),
        );
        seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !seen.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen,
        ips[0].to_string(),
        "the server on h3 sees s0's own address"
    );
    let _ = server.0.kill();

    // flannel's subnet file, for tools built for flannel.
    let env = std::fs::read_to_string(lab.state_dir(0).join(format!("{NET}.env"))).unwrap();
    let gw = lab.subnet(0).hosts().next().unwrap();
    assert!(env.contains("FLANNEL_NETWORK=10.40.0.0/16"), "{env}");
    assert!(env.contains(&format!("FLANNEL_SUBNET={gw}/24")), "{env}");
    assert!(
        env.contains("FLANNEL_IPMASQ=true") && env.contains("FLANNEL_MTU="),
        "{env}"
    );
}

/// Kills a child process on drop.
struct Guard(std::process::Child);
fn scopeguard(c: std::process::Child) -> Guard {
    Guard(c)
}
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_new_host_is_routed_everywhere_within_a_second_and_a_leaving_one_disappears() {
    let mut lab = TestLab::up(3, None, 60);
    let started = Instant::now();
    let h4 = lab.add_host().unwrap();
    let agent_up = started.elapsed();
    let subnet = lab.wait(Duration::from_secs(5), "h4's lease", || {
        lab.status(h4)
            .cluster
            .is_some_and(|c| c.networks.first().is_some_and(|n| n.subnet.is_some()))
    });
    let s4 = lab.subnet(h4);
    let lease_at = Instant::now();
    let converged = lab.wait(Duration::from_secs(5), "h4's route on every host", || {
        (0..3).all(|i| lab.routes(i).iter().any(|(d, _)| *d == s4))
    });
    println!(
        "4th host: agent up in {agent_up:?}, lease seen {subnet:?} later, route on all 3 other hosts {converged:?} after that ({:?} in all)",
        started.elapsed()
    );
    let _ = lease_at;
    assert!(
        converged < Duration::from_secs(1),
        "routes converge within 1 s, took {converged:?}"
    );
    // And h4 routes to the others.
    assert_eq!(lab.routes(h4).len(), 3, "{:?}", lab.routes(h4));

    // A clean departure: `weft leave` revokes the lease, then the agent stops.
    lab.weft_ok(h4, &["leave"]);
    // The subnet is given up: no address of it is handed out any more.
    let run = ["run", "-d", "--net", NET, "--", "sleep", "1d"];
    let refused = lab.weft(h4, &run);
    assert!(!refused.status.success(), "{}", text(&refused));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("left the cluster") && why.contains(&s4.to_string()) && why.contains("rejoin"),
        "{why}"
    );
    // Until the host rejoins (a restarted agent), then it is served again.
    lab.stop_agent(h4, libc::SIGTERM).unwrap();
    lab.start_agent(h4).unwrap();
    lab.wait(Duration::from_secs(5), "h4 to rejoin", || {
        lab.status(h4)
            .cluster
            .is_some_and(|c| c.networks.first().is_some_and(|n| n.subnet.is_some()))
    });
    lab.weft_ok(h4, &run);
    lab.weft_ok(h4, &["leave"]);
    lab.stop_agent(h4, libc::SIGTERM).unwrap();
    let gone = lab.wait(Duration::from_secs(5), "h4's route to go", || {
        (0..3).all(|i| !lab.routes(i).iter().any(|(d, _)| *d == s4))
    });
    println!("h4 left: its route was gone from every host after {gone:?}");
    // The view is written just after the routes go.
    lab.wait(Duration::from_secs(5), "h1 to show two peers left", || {
        lab.status(0).cluster.expect("a cluster").networks[0]
            .peers
            .len()
            == 2
    });
}

#[test]
fn a_killed_host_disappears_when_its_lease_expires() {
    let mut lab = TestLab::up(3, None, 3);
    let s3 = lab.subnet(2);
    lab.wait(Duration::from_secs(5), "h3's route on h1", || {
        lab.routes(0).iter().any(|(d, _)| *d == s3)
    });
    let killed = Instant::now();
    lab.stop_agent(2, libc::SIGKILL).unwrap();
    lab.wait(Duration::from_secs(15), "h3's route to expire", || {
        (0..2).all(|i| !lab.routes(i).iter().any(|(d, _)| *d == s3))
    });
    let took = killed.elapsed();
    println!("h3 killed: its route left h1 and h2 after {took:?} (lease TTL 3 s)");
    assert!(
        took >= Duration::from_secs(1),
        "not before the lease expired: {took:?}"
    );
}

#[test]
fn an_agent_killed_and_restarted_keeps_its_subnet_and_traffic_flows_through() {
    let mut lab = TestLab::up(2, None, 60);
    let before = lab.subnet(0);
    let _a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    assert!(lab.reaches(0, "a", b));
    // 400 pings at 10 ms across the restart of h1's agent.
    let pinger = lab
        .lab
        .weft(
            0,
            &[
                "exec",
                "a",
                "--",
                "ping",
                "-q",
                "-c",
                "400",
                "-i",
                "0.01",
                "-W",
                "1",
                &b.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent(0, libc::SIGKILL).unwrap();
    lab.start_agent(0).unwrap();
    let out = pinger.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("400 packets transmitted, 400 received"),
        "{}",
        text(&out)
    );
    assert_eq!(lab.subnet(0), before, "same subnet after the restart");
    assert!(lab.reaches(1, "b", lab_ip(&lab, 0, "a")));
}

fn lab_ip(lab: &TestLab, i: usize, name: &str) -> std::net::Ipv4Addr {
    let ps: Vec<SandboxView> = lab.weft_json(i, &["ps"]);
    ps.iter()
        .find(|s| s.name == name)
        .map(|s| s.attachment.endpoints()[0].ip)
        .unwrap()
}

#[test]
fn traffic_and_new_sandboxes_survive_an_etcd_outage_and_a_host_joins_after() {
    let mut lab = TestLab::up(2, None, 60);
    let _a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    lab.stop_etcd().unwrap();
    let down = Instant::now();
    lab.wait(
        Duration::from_secs(20),
        "h1 to see etcd unreachable",
        || lab.status(0).cluster.is_some_and(|c| !c.etcd_healthy),
    );
    let mut checks = 0;
    while down.elapsed() < Duration::from_secs(30) {
        assert!(
            lab.ping(0, "a", b),
            "traffic flows {:?} into the outage",
            down.elapsed()
        );
        checks += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    // A new sandbox on the subnet h1 already holds.
    let c = lab.sandbox(0, "c");
    assert!(lab.subnet(0).contains(&c));
    assert!(lab.reaches(0, "c", b), "the new sandbox reaches h2");
    println!(
        "etcd down 30 s: {checks} pings across hosts all answered; a sandbox started meanwhile"
    );
    lab.start_etcd().unwrap();
    lab.wait(Duration::from_secs(20), "h1 to reconnect", || {
        lab.status(0).cluster.is_some_and(|c| c.etcd_healthy)
    });
    let h3 = lab.add_host().unwrap();
    let s3 = lab.subnet(h3);
    lab.wait(Duration::from_secs(5), "h3's route on h1 and h2", || {
        (0..2).all(|i| lab.routes(i).iter().any(|(d, _)| *d == s3))
    });
    lab.sandbox(h3, "d");
    assert!(lab.reaches(h3, "d", b));
}

#[test]
fn overlay_networks_are_isolated_from_each_other_and_validated() {
    let lab = TestLab::up(2, None, 60);
    // A second overlay network from a flannel config, created on h2, known on h1.
    let out = lab.weft(
        1,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--from-flannel-config",
            r#"{"Network":"10.41.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#,
            "other",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    lab.wait(Duration::from_secs(2), "h1 to know network other", || {
        lab.weft(0, &["network", "inspect", "other"])
            .status
            .success()
    });
    let a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let x = lab.sandbox_on(1, "x", "other");
    assert!(lab.reaches(0, "a", b));
    assert!(!lab.ping(0, "a", x), "lab -> other across hosts is dropped");
    assert!(!lab.ping(1, "x", a), "other -> lab across hosts is dropped");
    let tcp = lab.exec(
        0,
        "a",
        &format!("socat -T1 - TCP:{x}:22,connect-timeout=1 </dev/null"),
    );
    assert!(!tcp.status.success());

    // Refused with reasons; nothing is created.
    let refuse = |args: &[&str], want: &str| {
        let out = lab.weft(0, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {}",
            text(&out)
        );
    };
    refuse(
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.42.0.0/16",
            "--backend",
            "pigeon",
            "p",
        ],
        "unknown backend",
    );
    refuse(
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.40.128.0/17",
            "--host-subnet-len",
            "24",
            "dup",
        ],
        "overlaps 10.40.0.0/16 of network lab",
    );
    refuse(
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.43.0.0/16",
            "--host-subnet-len",
            "24",
            "lab",
        ],
        "already exists",
    );
    refuse(
        &["network", "create", "-d", "overlay", "q"],
        "needs --subnet",
    );
    refuse(
        &["network", "create", "--subnet", "10.40.7.0/24", "local"],
        "overlaps 10.40.0.0/16 of network lab",
    );
    // Without a backend, weft says which one it used.
    let out = lab.weft(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.44.0.0/16",
            "--host-subnet-len",
            "24",
            "dflt",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("using vxlan"),
        "{}",
        text(&out)
    );
    // Removing a global network removes it from every host.
    lab.weft_ok(1, &["network", "rm", "dflt"]);
    lab.wait(Duration::from_secs(2), "h1 to drop network dflt", || {
        !lab.weft(0, &["network", "inspect", "dflt"])
            .status
            .success()
    });
}

#[test]
fn an_unreachable_peer_is_reported_not_routed() {
    // Plain http: the lease written here by hand is unsigned, which a
    // secure lab refuses before looking at its address (etcd_tls.rs).
    let lab = TestLab::up_insecure(2, Some("host-gw"));
    // A lease of a host whose address is not on the underlay segment.
    let lease = r#"{"network":"lab","subnet":"10.40.250.0/24","host_id":"faraway","node":"far","public_ip":"203.0.113.77"}"#;
    let out = lab
        .lab
        .etcdctl(
            0,
            weft_lab::ADMIN,
            &["put", "/weft/leases/lab/10.40.250.0-24", lease],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    lab.wait(Duration::from_secs(3), "h1 to report the peer", || {
        let s = lab.status(0);
        s.cluster.is_some_and(|c| {
            c.networks.first().is_some_and(|n| {
                n.peers.iter().any(|p| {
                    p.node == "far"
                        && p.problem
                            .as_deref()
                            .is_some_and(|e| e.contains("not on a subnet directly connected"))
                })
            })
        })
    });
    assert!(!lab
        .routes(0)
        .iter()
        .any(|(d, _)| d.to_string() == "10.40.250.0/24"));
    let human = String::from_utf8_lossy(&lab.weft(0, &["status"]).stdout).into_owned();
    assert!(human.contains("NOT PROGRAMMED"), "{human}");
}

#[test]
fn overlay_networks_need_a_cluster() {
    let host = weft_e2e::TestHost::new(None);
    let out = host.weft(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--subnet",
        "10.45.0.0/16",
        "--host-subnet-len",
        "24",
        "ov",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--etcd-endpoints"),
        "{}",
        text(&out)
    );
    assert!(!host.weft(&["network", "inspect", "ov"]).status.success());
}

#[test]
fn lab_down_removes_a_lab_killed_half_way() {
    let name = unique("wftk");
    let mut up = Command::new(weft_bin())
        .args(["lab", "up", "--hosts", "4", "--name", &name, "--root", ROOT])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = std::path::Path::new(ROOT).join(&name);
    // Kill it once some hosts exist but before it is done.
    let start = Instant::now();
    while !std::fs::read_to_string(dir.join("lab.json")).is_ok_and(|s| s.contains("\"h2\"")) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "lab up never got to h2"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    up.kill().unwrap();
    up.wait().unwrap();
    let lab: weft_lab::Lab =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap();
    let pids: Vec<i32> = lab
        .hosts
        .iter()
        .filter_map(|h| h.agent.as_ref().map(|a| a.pid))
        .chain(lab.etcd.as_ref().map(|e| e.pid))
        .collect();
    assert!(!pids.is_empty(), "something was running: {lab:?}");
    let out = Command::new(weft_bin())
        .args(["lab", "down", "--name", &name, "--root", ROOT])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dir.exists(), "the lab's directory is gone");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&name), "no mount of the lab is left");
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "process {pid} is gone: {stat}"
        );
    }
    // A second down is a no-op, not an error.
    let again = Command::new(weft_bin())
        .args(["lab", "down", "--name", &name, "--root", ROOT])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
}

#[test]
fn lab_up_refuses_bad_options_before_building_anything() {
    let name = unique("wftb");
    let dir = std::path::Path::new(ROOT).join(&name);
    for (args, says) in [
        (&["--lease-ttl", "0"][..], "--lease-ttl 0: use 2 to 86400"),
        (&["--backend", "foo"][..], "unknown backend \"foo\""),
        (&["--subnet", "10.40.0.0/29"][..], "use /28 or larger"),
        (
            &["--subnet", "10.40.0.0/30", "--host-subnet-len", "30"][..],
            "use /29 or larger",
        ),
        (
            &[
                "--hosts",
                "3",
                "--subnet",
                "10.40.0.0/23",
                "--host-subnet-len",
                "24",
            ][..],
            "room for 2 host subnets of /24, not 3 hosts",
        ),
        (
            &[
                "--backend",
                "udp",
                "--subnet",
                "10.40.0.0/23",
                "--hosts",
                "3",
            ][..],
            "room for 2 host subnets of /24, not 3 hosts",
        ),
    ] {
        let out = Command::new(weft_bin())
            .args(["lab", "up", "--name", &name, "--root", ROOT])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        // Refused before the first step: no directory, namespace or process.
        assert!(!dir.exists(), "{args:?}: {} was made", dir.display());
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&netns.stdout).contains(&name),
            "{args:?}: a namespace of the lab was made"
        );
        let ps = Command::new("pgrep").args(["-f", &name]).output().unwrap();
        assert!(ps.stdout.is_empty(), "{args:?}: a process of the lab runs");
    }
}
