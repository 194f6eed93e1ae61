//! The vxlan backend (the default for overlay networks) on a 3-host lab:
//! encapsulation on the wire, isolation by VNI, healing of entries deleted
//! behind weft's back, MTU, and a departing host's entries.

use std::process::Stdio;
use std::time::{Duration, Instant};
use weft_e2e::lab::{TestLab, NET};
use weft_e2e::text;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The VXLAN device of the lab network on host `i` (the only `wvx-` link there).
fn device(lab: &TestLab, i: usize) -> String {
    let out = stdout(&lab.sh(i, "ip -o link show type vxlan"));
    out.split(':')
        .nth(1)
        .map(|s| s.trim().split('@').next().unwrap().to_string())
        .filter(|d| d.starts_with("wvx-"))
        .unwrap_or_else(|| panic!("no VXLAN device on h{}: {out}", i + 1))
}

#[test]
fn traffic_crosses_hosts_inside_vxlan_on_port_8472_only() {
    let lab = TestLab::up(3, Some("vxlan"), 60);
    let _a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let dev = device(&lab, 0);
    let details = stdout(&lab.sh(0, &format!("ip -d link show {dev}")));
    assert!(
        details.contains("dstport 8472") && details.contains("nolearning"),
        "{details}"
    );
    // Capture on the switch while a pings b: VXLAN datagrams on 8472 with
    // the sandboxes' addresses inside, and no frame with a sandbox address
    // in its outer header.
    let cap = lab.lab.dir.join("capture.txt");
    let mut tcpdump = lab
        .underlay_command("tcpdump")
        .args([
            "-l",
            "-n",
            "-T",
            "vxlan",
            "-i",
            "ul0",
            "-c",
            "8",
            "udp port 8472",
        ])
        .stdout(std::fs::File::create(&cap).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut plain = lab
        .underlay_command("tcpdump")
        .args(["-l", "-n", "-i", "ul0", "net 10.40.0.0/16"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let ping = lab.exec(0, "a", &format!("ping -c 4 -i 0.2 {b}"));
    assert!(ping.status.success(), "{}", text(&ping));
    let start = Instant::now();
    while tcpdump.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    let _ = plain.kill();
    let plain_out = plain.wait_with_output().unwrap();
    let seen = std::fs::read_to_string(&cap).unwrap();
    assert!(seen.contains("VXLAN") && seen.contains("vni"), "{seen}");
    assert!(
        seen.contains(&format!("> {b}: ICMP echo request")),
        "inner addresses: {seen}"
    );
    assert!(
        stdout(&plain_out).trim().is_empty(),
        "no sandbox address in an outer header: {}",
        stdout(&plain_out)
    );
}

#[test]
fn two_vxlan_networks_have_their_own_vni_and_cannot_reach_each_other() {
    let lab = TestLab::up(3, Some("vxlan"), 60);
    lab.weft_ok(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--backend",
            "vxlan",
            "--subnet",
            "10.41.0.0/16",
            "--host-subnet-len",
            "24",
            "blue",
        ],
    );
    lab.wait(Duration::from_secs(3), "h2 to join blue", || {
        lab.weft(1, &["network", "inspect", "blue"])
            .status
            .success()
    });
    let vni = |net: &str| lab.network(0, net).overlay.expect("an overlay").vni;
    assert_ne!(vni(NET), vni("blue"));
    let a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let x = lab.sandbox_on(1, "x", "blue");
    lab.sandbox_on(0, "y", "blue");
    assert!(lab.reaches(0, "a", b));
    assert!(lab.reaches(0, "y", x), "blue works across hosts");
    assert!(!lab.ping(0, "a", x), "lab -> blue is dropped");
    assert!(!lab.ping(1, "x", a), "blue -> lab is dropped");
    let tcp = lab.exec(
        0,
        "y",
        &format!("socat -T1 - TCP:{b}:22,connect-timeout=1 </dev/null"),
    );
    assert!(!tcp.status.success());
}

#[test]
fn a_deleted_device_or_fdb_entry_heals_within_5_seconds() {
    let lab = TestLab::up(3, Some("vxlan"), 60);
    let _a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    assert!(lab.reaches(0, "a", b));
    let dev = device(&lab, 0);

    let out = lab.sh(0, &format!("ip link del {dev}"));
    assert!(out.status.success(), "{}", text(&out));
    let took = lab.wait(
        Duration::from_secs(5),
        "the device and b to come back",
        || {
            lab.exec(0, "a", &format!("ping -c 1 -W 0.2 {b}"))
                .status
                .success()
        },
    );
    println!("VXLAN device deleted by hand: traffic back after {took:?}");

    let fdb = stdout(&lab.sh(0, &format!("bridge fdb show dev {dev} | grep dst")));
    let entry = fdb.lines().next().expect("an FDB entry").to_string();
    let mac = entry.split_whitespace().next().unwrap().to_string();
    let dst = entry
        .split_whitespace()
        .skip_while(|w| *w != "dst")
        .nth(1)
        .unwrap()
        .to_string();
    let out = lab.sh(0, &format!("bridge fdb del {mac} dev {dev} dst {dst}"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout(&lab.sh(0, &format!("bridge fdb show dev {dev}"))).contains(&mac));
    let took = lab.wait(Duration::from_secs(5), "the FDB entry to come back", || {
        stdout(&lab.sh(0, &format!("bridge fdb show dev {dev}")))
            .contains(&format!("{mac} dst {dst}"))
    });
    println!("FDB entry deleted by hand: back after {took:?}");
    assert!(lab.reaches(0, "a", b));
}

#[test]
fn mtu_is_the_underlays_minus_vxlan_overhead() {
    let lab = TestLab::up(3, Some("vxlan"), 60);
    let _a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let dev = device(&lab, 0);
    assert!(stdout(&lab.sh(0, &format!("ip link show {dev}"))).contains("mtu 1450"));
    let eth0 = stdout(&lab.exec(0, "a", "ip link show eth0"));
    assert!(eth0.contains("mtu 1450"), "sandbox interface: {eth0}");
    let env = std::fs::read_to_string(lab.state_dir(0).join(format!("{NET}.env"))).unwrap();
    assert!(env.contains("FLANNEL_MTU=1450"), "{env}");
    // 1400-byte packets with DF set cross hosts on the 1500-byte underlay.
    let ok = lab.exec(0, "a", &format!("ping -c 2 -M do -s 1372 {b}"));
    assert!(ok.status.success(), "{}", text(&ok));
    // A sandbox on the default bridge network (MTU 1500) sends 1500 bytes with
    // DF to the overlay: the host answers "fragmentation needed", MTU 1450.
    lab.weft_ok(0, &["run", "-d", "--name", "big", "--", "sleep", "1d"]);
    let big = lab.exec(0, "big", &format!("ping -c 2 -M do -s 1472 {b}"));
    let said = format!("{}{}", stdout(&big), String::from_utf8_lossy(&big.stderr));
    assert!(!big.status.success());
    assert!(
        said.contains("Frag needed") && said.contains("mtu = 1450"),
        "{said}"
    );
}

#[test]
fn a_departing_host_loses_its_three_entries_everywhere() {
    let mut lab = TestLab::up(3, Some("vxlan"), 60);
    let s3 = lab.subnet(2);
    let ip3 = lab.hosts[2].ip;
    let vtep3 = s3.network();
    let entries = |lab: &TestLab, i: usize| {
        let dev = device(lab, i);
        let neigh = stdout(&lab.sh(i, &format!("ip neigh show dev {dev}")));
        let fdb = stdout(&lab.sh(i, &format!("bridge fdb show dev {dev}")));
        let route = stdout(&lab.sh(i, &format!("ip route show {s3}")));
        (
            neigh.contains(&format!("{vtep3} lladdr")) && neigh.contains("PERMANENT"),
            fdb.contains(&format!("dst {ip3}")),
            route.contains(&format!("via {vtep3}")) && route.contains("onlink"),
        )
    };
    for i in 0..2 {
        assert_eq!(
            entries(&lab, i),
            (true, true, true),
            "h{} has h3's three entries",
            i + 1
        );
    }
    lab.weft_ok(2, &["leave"]);
    lab.stop_agent(2, libc::SIGTERM).unwrap();
    lab.wait(Duration::from_secs(5), "h3's entries to go", || {
        (0..2).all(|i| entries(&lab, i) == (false, false, false))
    });
    // The VTEP MAC is stable across an agent restart: h1 restarts, h2 keeps
    // the very same entry for it.
    let mac_on_h2 = |lab: &TestLab| {
        let dev = device(lab, 1);
        stdout(&lab.sh(1, &format!("bridge fdb show dev {dev}")))
    };
    let before = mac_on_h2(&lab);
    lab.stop_agent(0, libc::SIGKILL).unwrap();
    lab.start_agent(0).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mac_on_h2(&lab), before);
}
