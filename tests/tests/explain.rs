//! `weft explain`: in every scenario the verdict is compared with what a
//! real packet does (ping, a TCP connection), and for drops a capture shows
//! the packet reached the hop before the one explain names and went no
//! further.

use std::process::Stdio;
use std::time::Duration;
use weft_e2e::lab::TestLab;
use weft_e2e::{text, Lan, Netns, TestHost};
use weft_model::explain::{Explanation, Verdict};

fn explain(h: &TestHost, args: &[&str]) -> Explanation {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    h.weft_json(&all)
}

fn explain_in_lab(lab: &TestLab, i: usize, args: &[&str]) -> Explanation {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    lab.weft_json(i, &all)
}

/// Asserts that some hop satisfies `f`.
fn has_hop(e: &Explanation, f: impl Fn(&weft_model::explain::Hop) -> bool) {
    assert!(e.hops.iter().any(f), "{}", e.render_text());
}

/// `weft lab explain HOST SRC DST` as JSON: the whole way through the lab.
fn lab_explain(lab: &TestLab, host: &str, src: &str, dst: &str) -> Explanation {
    let out = std::process::Command::new(weft_e2e::weft_bin())
        .args([
            "--format",
            "json",
            "lab",
            "explain",
            "--root",
            weft_e2e::lab::ROOT,
        ])
        .args(["--name", &lab.name, host, src, dst])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn delivered(e: &Explanation, to: &str) {
    match &e.verdict {
        Verdict::Delivered { to: t } => assert!(
            t.contains(to),
            "delivered to {t:?}, expected {to:?}:\n{}",
            e.render_text()
        ),
        Verdict::Dropped { .. } => panic!("expected delivered to {to}:\n{}", e.render_text()),
    }
    assert!(e.disagreements.is_empty(), "{}", e.render_text());
}

/// The hop (1-based) where explain says the packet stops; checks the hop's
/// text and the reason.
fn dropped_at(e: &Explanation, hop_says: &str, why: &str) -> usize {
    match &e.verdict {
        Verdict::Dropped { hop, why: w, .. } => {
            assert!(
                w.contains(why),
                "dropped because {w:?}, expected {why:?}:\n{}",
                e.render_text()
            );
            let h = &e.hops[*hop - 1];
            assert!(
                h.what.contains(hop_says),
                "hop {hop} says {:?}, expected {hop_says:?}:\n{}",
                h.what,
                e.render_text()
            );
            *hop
        }
        Verdict::Delivered { .. } => panic!("expected a drop ({why}):\n{}", e.render_text()),
    }
}

/// Packets matching `filter` seen on `iface` in `ns` while `f` runs.
fn seen(ns: &Netns, iface: &str, filter: &str, f: impl FnOnce()) -> usize {
    seen_by(ns.command("tcpdump"), iface, filter, f)
}

/// The same with `tcpdump`, a command set to run in some namespace.
fn seen_by(
    mut tcpdump: std::process::Command,
    iface: &str,
    filter: &str,
    f: impl FnOnce(),
) -> usize {
    let mut child = tcpdump
        .args(["-l", "-n", "-i", iface])
        .args(filter.split_whitespace())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(700));
    f();
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn pings(h: &TestHost, from: &str, to: &str) -> bool {
    h.exec(from, &format!("ping -c 1 -W 1 {to}"))
        .status
        .success()
}

fn bridge_of(h: &TestHost, net: &str) -> String {
    h.network(net).bridge
}

#[test]
fn explain_matches_real_packets_on_one_host() {
    let h = TestHost::new(Some("10.81.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.82.0.0/24", "front"]);
    h.weft_ok(&[
        "network",
        "create",
        "--subnet",
        "10.83.0.0/24",
        "--internal",
        "back",
    ]);
    let out = h.outside();
    h.run_detached("a", &[], &["sleep", "1d"]);
    h.run_detached("b", &[], &["sleep", "1d"]);
    h.run_detached(
        "c",
        &["--net", "front", "-p", "8080:80"],
        &["socat", "TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo c"],
    );
    h.run_detached("i", &["--net", "back"], &["sleep", "1d"]);
    let (b, c) = (h.ip_of("b"), h.ip_of("c"));
    let weft0 = bridge_of(&h, "bridge");

    // 1. Same network: one bridge, its FDB picks b's port.
    let e = explain(&h, &["a", "b"]);
    delivered(&e, "sandbox b");
    assert!(
        e.hops
            .iter()
            .any(|x| x.what.contains(&format!("bridge {weft0}"))),
        "{}",
        e.render_text()
    );
    assert!(
        e.hops.iter().all(|x| !x.command.is_empty()),
        "every hop has its command"
    );
    assert!(pings(&h, "a", &b));

    // 2. Two networks: weft's forward chain drops it. The ping reaches the
    //    host (seen on a's bridge) and never c's bridge.
    let e = explain(&h, &["a", "c"]);
    let hop = dropped_at(&e, "nft forward", "isolated");
    assert!(e.hops[hop - 1]
        .what
        .contains("iifname @bridges oifname @bridges drop"));
    assert!(
        matches!(&e.verdict, Verdict::Dropped { fix: Some(f), .. } if f.contains("weft network connect front"))
    );
    let front = bridge_of(&h, "front");
    let mut ok = true;
    let on_front = seen(&h.ns, &front, &format!("icmp and host {c}"), || {
        let on_weft0 = seen(&h.ns, &weft0, &format!("icmp and host {c}"), || {
            ok = pings(&h, "a", &c)
        });
        assert!(on_weft0 >= 1, "the ping reached the host's bridge");
    });
    assert!(
        !ok && on_front == 0,
        "the ping stopped at the host's forward chain"
    );

    // --probe: a real ping, traced through the host's hooks, beside the
    // prediction: the drop is seen at weft's forward rule.
    let e = explain(&h, &["--probe", "a", "c"]);
    let p = e.probe.as_ref().expect("a probe");
    assert_eq!(p.delivered, Some(false), "{}", e.render_text());
    assert!(
        p.seen
            .iter()
            .any(|s| s.contains("inet weft forward") && s.contains("verdict drop")),
        "{}",
        e.render_text()
    );
    let e = explain(&h, &["--probe", "a", "b"]);
    assert_eq!(
        e.probe.as_ref().unwrap().delivered,
        Some(true),
        "{}",
        e.render_text()
    );
    assert!(
        !h.ns.sh("nft list tables").contains("wftprobe"),
        "the probe's tables are gone"
    );

    // 3. The host to a sandbox.
    let e = explain(&h, &["host", "c"]);
    delivered(&e, "sandbox c");
    assert!(h.ns.try_sh(&format!("ping -c 1 -W 1 {c}")).status.success());

    // 4. Egress: routed to the outside and masqueraded.
    let e = explain(&h, &["a", "203.0.113.2"]);
    delivered(&e, "outside");
    assert!(
        e.hops.iter().any(|x| x.what.contains("masquerade")),
        "{}",
        e.render_text()
    );
    assert!(pings(&h, "a", "203.0.113.2"));

    // 5. An internal network's egress: no default route in the sandbox, by design.
    let e = explain(&h, &["i", "203.0.113.2"]);
    dropped_at(&e, "no route", "only on internal networks");
    assert!(e.disagreements.is_empty(), "{}", e.render_text());
    let back = bridge_of(&h, "back");
    let mut ok = true;
    let on_back = seen(&h.ns, &back, "icmp", || ok = pings(&h, "i", "203.0.113.2"));
    assert!(!ok && on_back == 0, "nothing left sandbox i");

    // 6. A published port from outside: DNAT to c, accepted, delivered.
    let e = explain(
        &h,
        &["203.0.113.2", "host", "--proto", "tcp", "--port", "8080"],
    );
    delivered(&e, "sandbox c");
    assert!(
        e.hops
            .iter()
            .any(|x| x.what.contains("DNAT to") && x.what.contains(&c)),
        "{}",
        e.render_text()
    );
    let reply = out.try_sh("socat -T 2 - TCP:203.0.113.1:8080 </dev/null");
    assert_eq!(
        String::from_utf8_lossy(&reply.stdout).trim(),
        "c",
        "{}",
        text(&reply)
    );

    // 7. A port nothing publishes: no DNAT; the host's own stack refuses it.
    let e = explain(
        &h,
        &["203.0.113.2", "host", "--proto", "tcp", "--port", "8081"],
    );
    dropped_at(
        &e,
        "no published tcp port 8081",
        "nothing publishes tcp/8081",
    );
    let mut reply = None;
    let on_bridges = seen(
        &h.ns,
        "any",
        "tcp port 8081 and not host 203.0.113.1",
        || {
            reply = Some(out.try_sh("socat -T 2 - TCP:203.0.113.1:8081 </dev/null"));
        },
    );
    assert!(
        !reply.unwrap().status.success() && on_bridges == 0,
        "refused by the host, never forwarded"
    );

    // 8. A route deleted by hand inside a sandbox: explain names the
    //    difference from weft's records, and the packet never leaves.
    h.exec("a", "ip route del default");
    let e = explain(&h, &["a", "203.0.113.2"]);
    assert_eq!(dropped_at(&e, "no route", "no route to 203.0.113.2"), 1);
    assert!(
        e.disagreements.iter().any(|d| d.contains("default route")),
        "{}",
        e.render_text()
    );
    let mut ok = true;
    let on_weft0 = seen(&h.ns, &weft0, "icmp and host 203.0.113.2", || {
        ok = pings(&h, "a", "203.0.113.2")
    });
    assert!(!ok && on_weft0 == 0, "the ping never left a");

    // 9. A veth taken off its bridge by hand: the host end is not a port.
    let b_end = weft_e2e::host_ifname(&h.sandbox("b").attachment.endpoints()[0]).unwrap();
    h.ns.sh(&format!("ip link set {b_end} nomaster"));
    let e = explain(&h, &["b", "a"]);
    dropped_at(&e, "not a port of", "is not on bridge");
    assert!(
        e.disagreements.iter().any(|d| d.contains(&b_end)),
        "{}",
        e.render_text()
    );

    let a_ip = h.ip_of("a");
    let mut ok = true;
    let on_bridge = seen(&h.ns, &weft0, &format!("icmp and host {a_ip}"), || {
        let left_b = seen(&h.ns, &b_end, "icmp or arp", || ok = pings(&h, "b", &a_ip));
        assert!(left_b >= 1, "b's packets reach its veth's host end");
    });
    assert!(!ok && on_bridge == 0, "and go no further than the veth");

    // The picture renders with Graphviz.
    let png = h
        .weft_cmd(&["--format", "png", "explain", "a", "c"])
        .output()
        .unwrap();
    assert!(png.status.success(), "{}", text(&png));
    assert!(png.stdout.starts_with(b"\x89PNG"), "a PNG");
    let dot = h.weft_ok(&["--format", "dot", "explain", "a", "c"]);
    assert!(
        dot.starts_with("digraph explain") && dot.contains("color=red"),
        "{dot}"
    );

    // Bad input: a clear error.
    let bad = h.weft(&["explain", "nosuch", "b"]);
    assert!(
        !bad.status.success() && text(&bad).contains("neither a sandbox of this host"),
        "{}",
        text(&bad)
    );
}

#[test]
fn explain_matches_real_packets_across_hosts() {
    let lab = TestLab::up(3, None, 60);
    lab.weft_ok(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.41.0.0/16",
            "--host-subnet-len",
            "24",
            "other",
        ],
    );
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    lab.wait(Duration::from_secs(20), "h3 joins network other", || {
        lab.weft(
            2,
            &[
                "run", "-d", "--name", "o", "--net", "other", "--", "sleep", "1d",
            ],
        )
        .status
        .success()
    });
    let o = lab.weft_json::<Vec<weft_model::api::SandboxView>>(2, &["inspect", "o"]);
    let o = o[0].attachment.endpoints()[0].ip;
    let b_s = b.to_string();

    // 10. Across hosts over VXLAN: route, VTEP neighbour, FDB to h2's address.
    let e = explain_in_lab(&lab, 0, &["a", &b_s]);
    delivered(&e, "on host h2");
    let h2 = lab.hosts[1].ip.to_string();
    assert!(
        e.hops
            .iter()
            .any(|x| x.what.contains("FDB") && x.what.contains(&h2)),
        "{}",
        e.render_text()
    );
    assert!(lab.reaches(0, "a", b));

    // 11. h1's host itself to b on h2.
    let e = explain_in_lab(&lab, 0, &["host", &b_s]);
    delivered(&e, "on host h2");
    assert!(lab.sh(0, &format!("ping -c 1 -W 1 {b}")).status.success());

    // The whole way through the lab, b named though it is on h2: h2's
    // agent continues where h1's hands the packet over, down to b's veth.
    let e = lab_explain(&lab, "h1", "a", "b");
    delivered(&e, "sandbox b");
    assert!(
        e.hops.iter().any(|x| x.at == "host h1") && e.hops.iter().any(|x| x.at == "host h2"),
        "{}",
        e.render_text()
    );

    // The lab as one picture, with that path highlighted; and h1's own view.
    let picture = |format: &str| {
        std::process::Command::new(weft_e2e::weft_bin())
            .args([
                "lab",
                "picture",
                "--root",
                weft_e2e::lab::ROOT,
                "--name",
                &lab.name,
            ])
            .args(["--path", "h1", "a", &b_s, "--format", format])
            .output()
            .unwrap()
    };
    let png = picture("png");
    assert!(
        png.status.success() && png.stdout.starts_with(b"\x89PNG"),
        "{}",
        text(&png)
    );
    let dot = String::from_utf8(picture("dot").stdout).unwrap();
    assert!(
        dot.contains("\"h2/sb/b\" [label=") && dot.contains("color=blue"),
        "{dot}"
    );
    let t: weft_model::topology::Topology = lab.weft_json(0, &["topology"]);
    assert!(
        t.sandboxes.iter().any(|s| s.name == "a" && s.plugged),
        "{t:?}"
    );
    assert!(
        t.tunnels.iter().any(
            |x| x.device.as_deref().is_some_and(|d| d.starts_with("wvx-")) && x.peers.len() == 2
        ),
        "{t:?}"
    );

    // 12. Two overlay networks: isolated from each other.
    let e = explain_in_lab(&lab, 0, &["a", &o.to_string()]);
    dropped_at(&e, "nft forward", "overlay networks are isolated");
    // Seen entering h1 on lab's bridge, never leaving by other's VXLAN device.
    let lab_bridge = lab.network(0, "lab").bridge;
    let other_vx = lab
        .weft_json::<weft_model::topology::Topology>(0, &["topology"])
        .tunnels
        .into_iter()
        .find(|t| t.network == "other")
        .and_then(|t| t.device)
        .expect("other's VXLAN device on h1");
    let in_h1 = || weft_testkit::command_in(&lab.host_netns(0), "tcpdump");
    let mut ok = true;
    let left = seen_by(in_h1(), &other_vx, "icmp", || {
        let entered = seen_by(in_h1(), &lab_bridge, &format!("icmp and host {o}"), || {
            ok = lab.ping(0, "a", o)
        });
        assert!(entered >= 1, "the ping reached h1");
    });
    assert!(!ok && left == 0, "it never left by {other_vx}");
}

fn two_hosts(backend: &str, via: &str) {
    let lab = TestLab::up(2, Some(backend), 60);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let e = explain_in_lab(&lab, 0, &["a", &b.to_string()]);
    delivered(&e, "on host h2");
    assert!(
        e.hops.iter().any(|x| x.what.contains(via)),
        "{}",
        e.render_text()
    );
    lab.wait(Duration::from_secs(10), "a pings b", || lab.ping(0, "a", b));
}

// 13.
#[test]
fn explain_follows_host_gw_routes() {
    two_hosts("host-gw", "host-gw");
}

// 14.
#[test]
fn explain_follows_the_userspace_tunnel() {
    two_hosts("udp", "userspace tunnel");
}

// 15.
#[test]
fn explain_follows_the_secure_tunnel() {
    two_hosts("secure", "userspace tunnel");
}

// 16, 17: macvlan, straight onto the LAN; and the host that cannot reach
// its own macvlan sandbox through the parent.
#[test]
fn explain_follows_macvlan_onto_the_lan() {
    let lan = Lan::new();
    let (a, b) = (
        TestHost::new(Some("10.176.0.0/16")),
        TestHost::new(Some("10.177.0.0/16")),
    );
    let (pa, pb) = (lan.plug(&a), lan.plug(&b));
    a.ns.sh(&format!("ip addr add 10.170.20.250/24 dev {pa}"));
    for (h, p) in [(&a, &pa), (&b, &pb)] {
        let parent = format!("parent={p}");
        h.weft_ok(&[
            "network",
            "create",
            "-d",
            "macvlan",
            "--subnet",
            "10.170.20.0/24",
            "--gateway",
            "10.170.20.1",
            "-o",
            &parent,
            "lan",
        ]);
    }
    a.run_detached(
        "m2",
        &["--net", "lan", "--ip", "10.170.20.2"],
        &["sleep", "1d"],
    );
    b.run_detached(
        "m3",
        &["--net", "lan", "--ip", "10.170.20.3"],
        &["sleep", "1d"],
    );

    let e = explain(&a, &["m2", "10.170.20.3"]);
    delivered(&e, "LAN (macvlan)");
    let mut ok = false;
    let cap = lan.capture("icmp", 1, || {
        ok = a.exec("m2", "ping -c 1 -W 2 10.170.20.3").status.success()
    });
    assert!(ok && cap.contains("10.170.20.2 > 10.170.20.3"), "{cap}");

    let e = explain(&a, &["host", "m2"]);
    dropped_at(&e, "macvlan parent", "cannot reach its own macvlan sandbox");
    assert!(
        matches!(&e.verdict, Verdict::Dropped { fix: Some(f), .. } if f.contains("host_access"))
    );
    assert!(!a.ns.try_sh("ping -c 1 -W 1 10.170.20.2").status.success());
}

/// A shared-subnet network: explain finds the other host through the
/// VXLAN device's neighbour and FDB entries, the far host's half takes the
/// frame off the device onto the bridge, and an address no sandbox holds
/// on any host is a drop at the ARP hop, which a capture confirms (the
/// ARP request never leaves h1 and nothing crosses the underlay).
#[test]
fn explain_follows_a_shared_subnet_across_hosts() {
    let lab = TestLab::up_shared(2, 60);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let b_s = b.to_string();
    // explain names the far host from h1's cluster view, which a pass
    // writes just after it programs the kernel: wait for the view.
    lab.wait(Duration::from_secs(10), "h1 to list h2 as a peer", || {
        lab.status(0).cluster.is_some_and(|c| {
            c.networks
                .iter()
                .any(|n| n.peers.iter().any(|p| p.node == "h2"))
        })
    });
    let e = explain_in_lab(&lab, 0, &["a", &b_s]);
    delivered(&e, "on host h2");
    let h2 = lab.hosts[1].ip.to_string();
    has_hop(&e, |x| {
        x.what.contains("answers ARP") && x.command.contains("ip neigh show dev wvx-")
    });
    has_hop(&e, |x| {
        x.what.contains("FDB of wvx-") && x.what.contains(&h2)
    });
    assert!(lab.reaches(0, "a", b));
    // The whole way: on h2 the frame comes out of the VXLAN device onto the bridge.
    let e = lab_explain(&lab, "h1", "a", "b");
    delivered(&e, "sandbox b");
    has_hop(&e, |x| {
        x.at == "host h2" && x.what.contains("arrives on wvx-")
    });
    assert!(
        !e.hops.iter().any(|x| x.what.contains("the way back")),
        "bridged, not routed, on h2:\n{}",
        e.render_text()
    );
    // Nobody has 10.40.250.9: dropped where the ARP goes unanswered.
    let e = explain_in_lab(&lab, 0, &["a", "10.40.250.9"]);
    dropped_at(&e, "no neighbour entry for 10.40.250.9", "on any host");
    let underlay = lab.underlay_command("tcpdump");
    let crossed = seen_by(underlay, "ul0", "udp port 8472", || {
        assert!(!lab.ping(0, "a", "10.40.250.9".parse().unwrap()));
    });
    assert_eq!(crossed, 0, "nothing for 10.40.250.9 crossed the underlay");
}
