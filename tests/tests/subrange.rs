//! Isolated sub-ranges of a network (weave's `WEAVE_CIDR=net:CIDR`, issue
//! 17): `--net NET:subnet=CIDR` gives a sandbox an address and prefix of
//! the sub-range; it reaches the same sub-range on every host and nothing
//! else of the network, whatever it does inside (routes and neighbour
//! entries added by hand, packets with a forged source from a raw socket),
//! while published ports still reach it. Every test builds its own
//! `weft lab`, removed on drop.

use std::net::Ipv4Addr;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use weft_e2e::lab::{TestLab, NET};
use weft_e2e::text;
use weft_model::api::SandboxView;
use weft_model::Endpoint;

const S1: &str = "10.40.2.128/25";
const S2: &str = "10.40.3.0/25";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A sandbox on host `i` in `net` (e.g. `lab:subnet=…`) that answers TCP
/// on 7000 and UDP on 7001 with "tcp PEER" / "udp PEER".
fn server(lab: &TestLab, i: usize, name: &str, net: &str, extra: &[&str]) -> Endpoint {
    let script = "socat UDP-RECVFROM:7001,fork 'SYSTEM:echo udp $SOCAT_PEERADDR' & \
                  exec socat TCP-LISTEN:7000,fork,reuseaddr 'SYSTEM:echo tcp $SOCAT_PEERADDR'";
    let mut args = vec!["run", "-d", "--name", name, "--net", net];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let v: SandboxView = lab.weft_json(i, &args);
    v.attachment.endpoints()[0].clone()
}

/// TCP from sandbox `from` (host `i`) to `to:7000`: what the server said,
/// retried for up to `patience` (empty when it never answered).
fn tcp(lab: &TestLab, i: usize, from: &str, to: Ipv4Addr, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    loop {
        let out = lab.exec(
            i,
            from,
            &format!("socat -T1 - TCP:{to}:7000,connect-timeout=1 </dev/null"),
        );
        let said = stdout(&out).trim().to_string();
        if !said.is_empty() || Instant::now() > deadline {
            return said;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// UDP from sandbox `from` to `to:7001`: the server's answer, or empty.
fn udp(lab: &TestLab, i: usize, from: &str, to: Ipv4Addr) -> String {
    let out = lab.exec(i, from, &format!("echo hi | socat -T1 - UDP:{to}:7001"));
    stdout(&out).trim().to_string()
}

/// Sends one ICMP echo request with source `src` to `dst` from a raw
/// socket inside sandbox `from` (IP_HDRINCL: the source is whatever the
/// sandbox writes, as with `--cap-add net_raw` in weave's warning).
fn raw_ping(lab: &TestLab, i: usize, from: &str, src: Ipv4Addr, dst: Ipv4Addr) {
    let py = format!(
        r#"
import socket, struct
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff
icmp = struct.pack("!BBHHH", 8, 0, 0, 0x77, 1) + b"weft-forged-test"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0, 64, 1, 0,
                 socket.inet_aton("{src}"), socket.inet_aton("{dst}"))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s.sendto(ip + icmp, ("{dst}", 0))
"#
    );
    let out = lab.weft(i, &["exec", from, "--", "python3", "-c", &py]);
    assert!(out.status.success(), "raw send in {from}: {}", text(&out));
}

/// Whether sandbox `at` (host `i`) sees an ICMP echo request from `src`
/// while `send` runs: tcpdump inside it, started first.
fn sees_from(lab: &TestLab, i: usize, at: &str, src: Ipv4Addr, send: impl FnOnce()) -> bool {
    let child = lab
        .lab
        .weft(
            i,
            &[
                "exec",
                at,
                "--",
                "timeout",
                "4",
                "tcpdump",
                "-lni",
                "eth0",
                "-c",
                "1",
                &format!("icmp[icmptype] = icmp-echo and src host {src}"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    // tcpdump needs a moment to listen; it ends after one packet or 4 s.
    std::thread::sleep(Duration::from_millis(800));
    send();
    let out = child.wait_with_output().expect("tcpdump output");
    stdout(&out).contains(&src.to_string())
}

#[test]
fn sub_ranges_reach_their_own_on_every_host_and_nothing_else() {
    let lab = TestLab::up_shared(3, 60);
    let a1 = server(&lab, 0, "a1", &format!("{NET}:subnet={S1}"), &[]);
    let a2 = server(&lab, 1, "a2", &format!("{NET}:subnet={S1}"), &[]);
    let b1 = server(
        &lab,
        0,
        "b1",
        &format!("{NET}:subnet={S2}"),
        &["-p", "8080:7000"],
    );
    let b3 = server(&lab, 2, "b3", &format!("{NET}:subnet={S2}"), &[]);
    let r2 = server(&lab, 1, "r2", NET, &[]);

    // Each gets an address and the prefix of its sub-range.
    let s1: ipnet::Ipv4Net = S1.parse().unwrap();
    let s2: ipnet::Ipv4Net = S2.parse().unwrap();
    for (ep, s) in [(&a1, s1), (&a2, s1), (&b1, s2), (&b3, s2)] {
        assert!(s.contains(&ep.ip), "{} not in {s}", ep.ip);
        assert_ne!(ep.ip, s.network(), "the sub-range's own network address");
        assert_eq!(ep.prefix_len, s.prefix_len());
    }
    assert!(!s1.contains(&r2.ip) && !s2.contains(&r2.ip), "{}", r2.ip);
    assert_eq!(r2.prefix_len, 16);
    let inside = stdout(&lab.exec(0, "a1", "ip -4 addr show eth0; ip route"));
    assert!(inside.contains(&format!("{}/25", a1.ip)), "{inside}");
    assert!(
        inside.contains("default via 10.40.0.1 dev eth0"),
        "{inside}"
    );
    // Every host knows both sub-ranges (from the network's record in etcd).
    for i in 0..3 {
        lab.wait(
            Duration::from_secs(5),
            "the sub-ranges on every host",
            || lab.network(i, NET).subranges == vec![s1, s2],
        );
    }

    // The same sub-range across hosts: ICMP, TCP, UDP both ways, real addresses.
    assert!(lab.reaches(0, "a1", a2.ip), "a1 -> a2");
    assert!(lab.reaches(1, "a2", a1.ip), "a2 -> a1");
    assert_eq!(
        tcp(&lab, 0, "a1", a2.ip, Duration::from_secs(5)),
        format!("tcp {}", a1.ip)
    );
    assert_eq!(udp(&lab, 1, "a2", a1.ip), format!("udp {}", a2.ip));
    assert_eq!(
        tcp(&lab, 0, "b1", b3.ip, Duration::from_secs(5)),
        format!("tcp {}", b1.ip)
    );
    // The gateway (weft's resolver) and the world stay reachable.
    assert!(
        lab.ping(0, "a1", "10.40.0.1".parse().unwrap()),
        "a1 -> gateway"
    );
    let h2: Ipv4Addr = weft_lab::host_ip(2);
    assert!(
        lab.ping(0, "a1", h2),
        "a1 -> h2's underlay address (egress)"
    );
    let resolved = stdout(&lab.exec(0, "a1", "getent hosts a2"));
    assert!(
        resolved.contains(&a2.ip.to_string()),
        "a1 resolves a2: {resolved}"
    );

    // Other sub-ranges and the rest of the network: nothing, same host or not.
    let short = Duration::from_millis(0);
    for (i, from, to, what) in [
        (0, "a1", b1.ip, "a1 -> b1 (same host, other sub-range)"),
        (0, "a1", b3.ip, "a1 -> b3 (other host, other sub-range)"),
        (2, "b3", a2.ip, "b3 -> a2"),
        (
            1,
            "r2",
            a2.ip,
            "r2 -> a2 (the rest of the network, same host)",
        ),
        (1, "r2", b1.ip, "r2 -> b1 (the rest of the network)"),
        (
            1,
            "a2",
            r2.ip,
            "a2 -> r2 (out of the sub-range into the rest)",
        ),
    ] {
        assert!(!lab.ping(i, from, to), "ICMP {what}");
        assert_eq!(tcp(&lab, i, from, to, short), "", "TCP {what}");
        assert_eq!(udp(&lab, i, from, to), "", "UDP {what}");
    }

    // By hand inside a1: a link route, a route via the gateway, a static
    // neighbour entry with b1's own MAC. All dropped by the datapath.
    let b1_mac = stdout(&lab.exec(0, "b1", "cat /sys/class/net/eth0/address"))
        .trim()
        .to_string();
    for (setup, undo, what) in [
        (
            format!("ip route add {}/32 dev eth0", b1.ip),
            format!("ip route del {}/32", b1.ip),
            "a link route",
        ),
        (
            format!("ip route add {}/32 via 10.40.0.1 dev eth0 onlink", b3.ip),
            format!("ip route del {}/32", b3.ip),
            "a route via the gateway",
        ),
        (
            format!(
                "ip route add {0}/32 dev eth0 && ip neigh replace {0} lladdr {b1_mac} dev eth0 nud permanent",
                b1.ip
            ),
            format!("ip neigh del {} dev eth0; ip route del {}/32", b1.ip, b1.ip),
            "a static neighbour entry",
        ),
    ] {
        let out = lab.exec(0, "a1", &setup);
        assert!(out.status.success(), "{what}: {}", text(&out));
        let target = if what.contains("gateway") { b3.ip } else { b1.ip };
        let (i, at) = if what.contains("gateway") { (2, "b3") } else { (0, "b1") };
        let seen = sees_from(&lab, i, at, a1.ip, || {
            let _ = lab.exec(0, "a1", &format!("ping -c 2 -W 1 {target}"));
        });
        assert!(!seen, "{what}: a1's ping reached {at}");
        assert_eq!(tcp(&lab, 0, "a1", target, short), "", "TCP by {what}");
        lab.exec(0, "a1", &undo);
    }

    // A raw socket with a forged source inside S2, to b1 (same host) and
    // b3 (other host): dropped. The same packet with b1's own source
    // reaches b3, so the check would see a forged one that got through.
    let forged: Ipv4Addr = "10.40.3.77".parse().unwrap();
    assert!(
        !sees_from(&lab, 0, "b1", forged, || raw_ping(
            &lab, 0, "a1", forged, b1.ip
        )),
        "a forged source reached b1"
    );
    assert!(
        !sees_from(&lab, 2, "b3", forged, || raw_ping(
            &lab, 0, "a1", forged, b3.ip
        )),
        "a forged source reached b3 across hosts"
    );
    assert!(
        sees_from(&lab, 2, "b3", b1.ip, || raw_ping(
            &lab, 0, "b1", b1.ip, b3.ip
        )),
        "control: b1's own raw packet did not reach b3"
    );

    // A published port reaches a sandbox in a sub-range: from h2's host
    // namespace to h1's address.
    let h1 = weft_lab::host_ip(1);
    let out = lab.sh(
        1,
        &format!("socat -T2 - TCP:{h1}:8080,connect-timeout=2 </dev/null"),
    );
    assert!(
        stdout(&out).starts_with("tcp "),
        "published port from h2: {}",
        text(&out)
    );

    // `weft expose` reaches every sub-range: h3 exposes the network and
    // its own namespace then reaches a1 and b1 on h1, and a2 on h2.
    let shown = lab.weft_ok(2, &["expose", NET]);
    assert!(shown.contains("exposed"), "{shown}");
    for (ip, what) in [
        (a1.ip, "a1 on h1"),
        (b1.ip, "b1 on h1"),
        (a2.ip, "a2 on h2"),
    ] {
        lab.wait(
            Duration::from_secs(5),
            &format!("h3 reaches {what}"),
            || lab.sh(2, &format!("ping -c1 -W1 {ip}")).status.success(),
        );
    }
}

#[test]
fn sub_ranges_on_a_local_bridge_network() {
    let mut lab = TestLab::up_shared(1, 60);
    lab.weft_ok(0, &["network", "create", "--subnet", "10.77.0.0/24", "loc"]);
    let a = server(&lab, 0, "la", "loc:subnet=10.77.0.64/26", &[]);
    let b = server(&lab, 0, "lb", "loc:subnet=10.77.0.128/26", &[]);
    let a2 = server(&lab, 0, "la2", "loc:subnet=10.77.0.64/26", &[]);
    let r = server(&lab, 0, "lr", "loc", &[]);
    assert_eq!(a.prefix_len, 26);
    assert!(!"10.77.0.64/26"
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .contains(&r.ip));
    assert!(!"10.77.0.128/26"
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .contains(&r.ip));
    assert_eq!(
        tcp(&lab, 0, "la", a2.ip, Duration::from_secs(5)),
        format!("tcp {}", a.ip)
    );
    assert!(!lab.ping(0, "la", b.ip), "la -> lb");
    assert!(!lab.ping(0, "lr", a.ip), "lr -> la");
    assert_eq!(udp(&lab, 0, "lb", a.ip), "");
    // weft explain names the drop, and delivers within a sub-range.
    let out = lab.weft(0, &["explain", "la", "lb"]);
    let said = text(&out);
    assert!(
        said.contains("isolated sub-ranges of network loc"),
        "{said}"
    );
    assert!(said.contains("rule for sub-ranges drops it"), "{said}");
    let out = lab.weft(0, &["explain", "la", "la2"]);
    assert!(text(&out).contains("delivered"), "{}", text(&out));
    // The record keeps them: inspect shows both.
    let v = lab.network(0, "loc");
    assert_eq!(v.subranges.len(), 2, "{v:?}");
    // An agent killed and restarted keeps them apart (the table is the
    // kernel's meanwhile, and is written again from the records).
    let table = |lab: &TestLab| stdout(&lab.sh(0, "nft list table bridge weft"));
    let before = table(&lab);
    assert!(before.contains(&format!(" . {}", a.ip)), "{before}");
    lab.stop_agent(0, libc::SIGKILL).unwrap();
    lab.start_agent(0).unwrap();
    assert_eq!(table(&lab), before, "the bridge table after a restart");
    assert!(!lab.ping(0, "la", b.ip), "la -> lb after a restart");
    assert!(lab.reaches(0, "la", a2.ip), "la -> la2 after a restart");
    // The host itself reaches every sub-range (a local bridge network is exposed).
    let out = lab.sh(
        0,
        &format!("ping -c1 -W1 {} && ping -c1 -W1 {}", a.ip, b.ip),
    );
    assert!(out.status.success(), "host -> sub-ranges: {}", text(&out));
    // Attach and remove change only the elements of the sandbox's port:
    // after `rm` its address is gone from the table, a new sandbox's is
    // in it and reaches its sub-range at once.
    lab.weft_ok(0, &["rm", "-f", "la2"]);
    let after = table(&lab);
    assert!(!after.contains(&format!(" . {}", a2.ip)), "{after}");
    assert!(after.contains(&format!(" . {}", a.ip)), "{after}");
    let a3 = server(&lab, 0, "la3", "loc:subnet=10.77.0.64/26", &[]);
    assert!(table(&lab).contains(&format!(" . {}", a3.ip)));
    assert!(lab.reaches(0, "la", a3.ip), "la -> la3");
    assert!(!lab.ping(0, "la3", b.ip), "la3 -> lb");
}

/// The network's record in etcd, as JSON.
fn record(lab: &TestLab) -> serde_json::Value {
    let out = lab.etcdctl_admin(&["get", "--print-value-only", "/weft/networks/lab"]);
    serde_json::from_str(&out).expect("the network's record")
}

#[test]
fn bad_sub_ranges_are_refused_and_leave_nothing() {
    let lab = TestLab::up_shared(2, 60);
    server(&lab, 0, "a1", &format!("{NET}:subnet={S1}"), &[]);
    let rest = server(&lab, 1, "r2", NET, &["--ip", "10.40.9.20"]);
    assert_eq!(rest.ip, "10.40.9.20".parse::<Ipv4Addr>().unwrap());
    // h1 learns of r2's address (it refuses a sub-range holding it) by a pass.
    lab.wait(Duration::from_secs(10), "h1 to know r2's record", || {
        lab.status(0).cluster.is_some_and(|c| {
            c.networks
                .iter()
                .any(|n| n.name == NET && n.remote_endpoints == 1)
        })
    });
    let before = record(&lab);
    let links = |i| stdout(&lab.sh(i, "ip -o link show | wc -l"));
    let links_before = (links(0), links(1));
    let ps_before = lab.weft_ok(0, &["ps", "-q"]);
    for (net, wanted) in [
        (
            "lab:subnet=10.41.0.0/24",
            "outside the network's subnet 10.40.0.0/16",
        ),
        (
            "lab:subnet=10.40.2.0/24",
            "overlaps the sub-range 10.40.2.128/25",
        ),
        (
            "lab:subnet=10.40.2.192/26",
            "overlaps the sub-range 10.40.2.128/25",
        ),
        (
            "lab:subnet=10.40.9.0/24",
            "10.40.9.20 of it is in use outside any sub-range",
        ),
        ("lab:subnet=10.40.0.0/16", "that is the whole network"),
        ("lab:subnet=10.40.5.0/30", "too small"),
        ("lab:subnet=10.40.5.1/24", "has host bits set"),
        (
            "lab:subnet=10.40.2.128/25,ip=10.40.3.9",
            "10.40.3.9 is not in the sub-range",
        ),
        (
            "lab:ip=10.40.2.200",
            "is in the isolated sub-range 10.40.2.128/25",
        ),
    ] {
        let out = lab.weft(
            0,
            &[
                "run", "-d", "--name", "bad", "--net", net, "--", "sleep", "1d",
            ],
        );
        assert!(!out.status.success(), "--net {net} was accepted");
        assert!(text(&out).contains(wanted), "--net {net}: {}", text(&out));
    }
    assert_eq!(record(&lab), before, "the network's record changed");
    assert_eq!((links(0), links(1)), links_before, "links were left");
    assert_eq!(
        lab.weft_ok(0, &["ps", "-q"]),
        ps_before,
        "a sandbox was left"
    );

    // flannel's kind has a subnet per host: a sub-range would be one host's.
    lab.weft_ok(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.60.0.0/16",
            "--host-subnet-len",
            "24",
            "fl",
        ],
    );
    lab.wait(Duration::from_secs(10), "fl on h1", || {
        lab.lab.joined(0, "fl")
    });
    let out = lab.weft(
        0,
        &[
            "run",
            "-d",
            "--name",
            "bad",
            "--net",
            "fl:subnet=10.60.0.0/25",
            "--",
            "sleep",
            "1d",
        ],
    );
    assert!(
        !out.status.success() && text(&out).contains("a subnet per host"),
        "{}",
        text(&out)
    );
}
