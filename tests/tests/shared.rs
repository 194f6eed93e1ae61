//! Networks whose one subnet spans every host as one LAN (Docker's overlay,
//! weave; issue 16): addresses of one subnet on every host, names across
//! hosts, the wire (VXLAN only, no ARP between hosts), IPAM blocks claimed
//! and borrowed in etcd, static addresses, hosts leaving, dying and
//! restarting, etcd away, bad inputs, MTU, and the seed tutorials replayed.
//! Every test builds its own `weft lab` (3 hosts unless it says otherwise),
//! removed on drop.

use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};
use weft_e2e::lab::{TestLab, NET};
use weft_e2e::{text, unique};
use weft_model::api::{NetworkView, SandboxView};

/// The lab network's range (`TestLab::up_shared`).
const RANGE: &str = "10.40.0.0/16";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A background process, killed on drop.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `weft run -d --name NAME --net NET [extra] -- CMD` on host `i`.
fn run(
    lab: &TestLab,
    i: usize,
    name: &str,
    net: &str,
    extra: &[&str],
    cmd: &[&str],
) -> SandboxView {
    let mut args = vec!["run", "-d", "--name", name, "--net", net];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    lab.weft_json(i, &args)
}

fn ip_of(v: &SandboxView) -> Ipv4Addr {
    v.attachment.endpoints().first().expect("an address").ip
}

/// A sandbox that answers TCP on 7000 and UDP on 7001 with "tcp PEER" /
/// "udp PEER" (the address the connection came from).
fn echo_server(lab: &TestLab, i: usize, name: &str, net: &str, extra: &[&str]) -> Ipv4Addr {
    let script = "socat UDP-RECVFROM:7001,fork 'SYSTEM:echo udp $SOCAT_PEERADDR' & \
                  exec socat TCP-LISTEN:7000,fork,reuseaddr 'SYSTEM:echo tcp $SOCAT_PEERADDR'";
    ip_of(&run(lab, i, name, net, extra, &["sh", "-c", script]))
}

/// What a TCP connection from sandbox `from` on host `i` to `to:7000` reads
/// (retried for up to 5 s while the server starts).
fn tcp_says(lab: &TestLab, i: usize, from: &str, to: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = lab.exec(i, from, &format!("socat -T2 - TCP:{to}:7000 </dev/null"));
        let said = stdout(&out).trim().to_string();
        if (out.status.success() && !said.is_empty()) || Instant::now() > deadline {
            return said;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a UDP datagram from sandbox `from` on host `i` to `to:7001` gets back.
fn udp_says(lab: &TestLab, i: usize, from: &str, to: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = lab.exec(i, from, &format!("echo hi | socat -t1 - UDP:{to}:7001"));
        let said = stdout(&out).trim().to_string();
        if !said.is_empty() || Instant::now() > deadline {
            return said;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The network `net` as host `i` inspects it.
fn inspect(lab: &TestLab, i: usize, net: &str) -> NetworkView {
    lab.network(i, net)
}

/// The VXLAN device of network `net` on host `i`.
fn device(lab: &TestLab, i: usize, net: &str) -> String {
    let id = inspect(lab, i, net).id;
    format!("wvx-{}", &id[..10])
}

/// The bridge of network `net` on host `i`.
fn bridge(lab: &TestLab, i: usize, net: &str) -> String {
    inspect(lab, i, net).bridge
}

/// A name as the network's resolver (at the gateway) answers it to
/// sandbox `from` on host `i`; None when it has no address for it. (`-q`:
/// dig reads a bare `a` as the record type.)
fn resolve(lab: &TestLab, i: usize, from: &str, name: &str) -> Option<Ipv4Addr> {
    let gw = lab
        .exec(i, from, "ip -4 route show default")
        .stdout
        .split(|b| *b == b' ')
        .nth(2)
        .map(|g| String::from_utf8_lossy(g).to_string())
        .expect("a default route");
    let out = lab.exec(
        i,
        from,
        &format!("dig +short +time=1 +tries=1 @{gw} -q {name} -t A"),
    );
    stdout(&out).lines().find_map(|l| l.trim().parse().ok())
}

/// The MAC of eth0 as seen inside sandbox `name` on host `i`.
fn mac_inside(lab: &TestLab, i: usize, name: &str) -> String {
    let out = lab.exec(i, name, "ip -o link show eth0");
    assert!(out.status.success(), "{}", text(&out));
    link_field(&stdout(&out), "link/ether")
}

/// The word after `key` in a line of `ip -o link show` (`mtu`, `link/ether`).
/// (Not /sys/class/net: sysfs shows the namespace it was mounted in, the
/// machine's, not the one `nsenter --net` or `weft exec` entered.)
fn link_field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
}

/// A link's field as host `i` sees it.
fn host_link_field(lab: &TestLab, i: usize, dev: &str, key: &str) -> String {
    let out = lab.sh(i, &format!("ip -o link show dev {dev}"));
    assert!(out.status.success(), "h{}: {dev}: {}", i + 1, text(&out));
    link_field(&stdout(&out), key)
}

/// Whether host `i` has the neighbour entry and the FDB entry of a remote
/// sandbox `ip`/`mac` on `dev` (each separately).
fn entries(lab: &TestLab, i: usize, dev: &str, ip: Ipv4Addr, mac: &str) -> (bool, bool) {
    let neigh = stdout(&lab.sh(i, &format!("ip neigh show dev {dev}")));
    let fdb = stdout(&lab.sh(i, &format!("bridge fdb show dev {dev}")));
    (
        neigh
            .lines()
            .any(|l| l.starts_with(&format!("{ip} ")) && l.contains(mac)),
        fdb.lines().any(|l| l.starts_with(mac) && l.contains("dst")),
    )
}

/// Every key under `/weft/PREFIX` with its value as JSON (blocks and
/// endpoint records are JSON), read with etcdctl from h1 as the lab's admin.
fn etcd(lab: &TestLab, prefix: &str) -> Vec<(String, serde_json::Value)> {
    let s = lab.etcdctl_admin(&["get", "--prefix", &format!("/weft/{prefix}")]);
    let lines: Vec<&str> = s.lines().collect();
    lines
        .chunks(2)
        .filter(|kv| kv.len() == 2)
        .map(|kv| {
            (
                kv[0].to_string(),
                serde_json::from_str(kv[1]).unwrap_or(serde_json::Value::String(kv[1].into())),
            )
        })
        .collect()
}

/// Keys of `blocks/NET/` and `endpoints/NET/` whose holder is `node`.
fn keys_of(lab: &TestLab, net: &str, node: &str) -> Vec<String> {
    let mut v: Vec<String> = etcd(lab, &format!("blocks/{net}/"))
        .into_iter()
        .chain(etcd(lab, &format!("endpoints/{net}/")))
        .filter(|(_, v)| v["node"] == node)
        .map(|(k, _)| k)
        .collect();
    v.sort();
    v
}

/// The blocks of `net` in etcd: block key -> holder's node.
fn blocks_in_etcd(lab: &TestLab, net: &str) -> BTreeMap<String, String> {
    etcd(lab, &format!("blocks/{net}/"))
        .into_iter()
        .map(|(k, v)| (k, v["node"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// A tcpdump on the lab's switch (`ul0` in the underlay namespace).
struct Capture {
    child: Option<Child>,
    out: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -l -n -i ul0 ARGS` and waits until it listens.
    fn start(lab: &TestLab, args: &[&str]) -> Capture {
        let out = lab.lab.dir.join(unique("wftcap"));
        let err = out.with_extension("err");
        let child = lab
            .underlay_command("tcpdump")
            .args(["-l", "-n", "-i", "ul0"])
            .args(args)
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .expect("tcpdump");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&err).is_ok_and(|s| s.contains("listening on")) {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture {
            child: Some(child),
            out,
        }
    }

    /// Stops the capture and returns what it printed.
    fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Links in host `i`'s namespace (names only).
/// The namespace pool's spare pairs (`wvp…`) are left out: the pool
/// refills with new names on its own.
fn links(lab: &TestLab, i: usize) -> BTreeSet<String> {
    stdout(&lab.sh(i, "ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1"))
        .lines()
        .filter(|l| !l.starts_with("wvp"))
        .map(String::from)
        .collect()
}

fn create_network(lab: &TestLab, i: usize, args: &[&str]) -> Output {
    let mut all = vec!["network", "create", "-d", "overlay"];
    all.extend_from_slice(args);
    lab.weft(i, &all)
}

/// Creates a shared network on h1 and waits until every host holds a
/// block of it or, when the subnet has fewer blocks than hosts, knows it.
fn shared_network(lab: &TestLab, name: &str, subnet: &str) {
    let out = create_network(lab, 0, &["--subnet", subnet, name]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait(Duration::from_secs(10), "every host to join", || {
        (0..lab.hosts.len()).all(|i| lab.weft(i, &["network", "inspect", name]).status.success())
    });
}

// ---- 1. one subnet across hosts -------------------------------------------

#[test]
fn one_subnet_spans_three_hosts_by_address_and_by_name_over_ping_tcp_and_udp() {
    let lab = TestLab::up_shared(3, 60);
    let range: ipnet::Ipv4Net = RANGE.parse().unwrap();
    let ips: Vec<Ipv4Addr> = (0..3)
        .map(|i| echo_server(&lab, i, &format!("s{}", i + 1), NET, &[]))
        .collect();
    assert_eq!(ips.iter().collect::<BTreeSet<_>>().len(), 3, "{ips:?}");
    for (i, ip) in ips.iter().enumerate() {
        assert!(range.contains(ip), "{ip} is in {range}");
        // The whole subnet on eth0: one LAN, not a subnet per host.
        let addr = stdout(&lab.exec(i, &format!("s{}", i + 1), "ip -4 -o addr show eth0"));
        assert!(
            addr.contains(&format!("inet {ip}/16 ")),
            "h{}: {addr}",
            i + 1
        );
    }
    for from in 0..3 {
        for to in 0..3 {
            if from == to {
                continue;
            }
            let (f, t) = (format!("s{}", from + 1), format!("s{}", to + 1));
            let (fi, ti) = (ips[from], ips[to]);
            assert!(lab.reaches(from, &f, ti), "{f} pings {t} ({ti}) by address");
            let by_name = lab.exec(from, &f, &format!("ping -c 1 -W 2 {t}"));
            assert!(
                by_name.status.success() && stdout(&by_name).contains(&format!("({ti})")),
                "{f} pings {t} by name: {}",
                text(&by_name)
            );
            assert_eq!(
                resolve(&lab, from, &f, &t),
                Some(ti),
                "{t} resolves on h{}",
                from + 1
            );
            // The peer sees the sandbox's own address: no NAT inside the LAN.
            assert_eq!(
                tcp_says(&lab, from, &f, &t),
                format!("tcp {fi}"),
                "TCP {f} -> {t}"
            );
            assert_eq!(
                udp_says(&lab, from, &f, &t),
                format!("udp {fi}"),
                "UDP {f} -> {t}"
            );
        }
    }
}

// ---- 2. TTL and the peer's own MAC -------------------------------------------

#[test]
fn a_remote_sandbox_is_one_hop_away_with_its_own_mac() {
    let lab = TestLab::up_shared(3, 60);
    let a = ip_of(&run(&lab, 0, "a", NET, &[], &["sleep", "1d"]));
    // A MAC of its own (not derived from the address), so the neighbour
    // entry can only come from what h2 published.
    let b = ip_of(&run(
        &lab,
        1,
        "b",
        NET,
        &["--mac-address", "02:42:c0:ff:ee:07"],
        &["sleep", "1d"],
    ));
    // h1 programs b's entries in a pass after h2 publishes them.
    lab.wait(
        Duration::from_secs(10),
        "h1 to program h2's sandbox",
        || {
            lab.status(0).cluster.is_some_and(|c| {
                c.networks
                    .iter()
                    .any(|n| n.peers.iter().any(|p| p.node == "h2"))
            })
        },
    );
    let ping = lab.exec(0, "a", &format!("ping -c 3 -i 0.2 {b}"));
    assert!(ping.status.success(), "{}", text(&ping));
    let replies: Vec<&str> = std::str::from_utf8(&ping.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.contains("bytes from"))
        .collect();
    assert_eq!(replies.len(), 3, "{}", stdout(&ping));
    assert!(
        replies.iter().all(|l| l.contains("ttl=64")),
        "no router in between: {replies:?}"
    );
    let back = lab.exec(1, "b", &format!("ping -c 1 {a}"));
    assert!(stdout(&back).contains("ttl=64"), "{}", text(&back));

    let b_mac = mac_inside(&lab, 1, "b");
    assert_eq!(b_mac, "02:42:c0:ff:ee:07");
    let neigh = stdout(&lab.exec(0, "a", "ip neigh show"));
    assert!(
        neigh
            .lines()
            .any(|l| l.starts_with(&format!("{b} ")) && l.contains(&format!("lladdr {b_mac}"))),
        "a's ARP table has b's own MAC: {neigh}"
    );
    let a_mac = mac_inside(&lab, 0, "a");
    let neigh = stdout(&lab.exec(1, "b", "ip neigh show"));
    assert!(
        neigh
            .lines()
            .any(|l| l.starts_with(&format!("{a} ")) && l.contains(&format!("lladdr {a_mac}"))),
        "b's ARP table has a's own MAC: {neigh}"
    );
}

// ---- 3. egress -----------------------------------------------------------------

#[test]
fn every_host_masquerades_its_own_sandboxes_to_the_outside() {
    let lab = TestLab::up_shared(3, 60);
    // The outside: the switch's namespace as a machine of its own
    // (203.0.113.1 on its loopback, 198.51.100.1 on the switch), each
    // host's route to it via 198.51.100.1. The outside has no route to any
    // sandbox: only a masqueraded connection gets an answer.
    let out = lab.sh_underlay(
        "ip link set lo up && ip addr add 203.0.113.1/32 dev lo && \
         ip addr add 198.51.100.1/24 dev ul0",
    );
    assert!(out.status.success(), "{}", text(&out));
    for i in 0..3 {
        let out = lab.sh(i, "ip route add 203.0.113.0/24 via 198.51.100.1");
        assert!(out.status.success(), "{}", text(&out));
    }
    let _server = Bg(lab
        .underlay_command("socat")
        .args([
            "TCP-LISTEN:8080,fork,reuseaddr,bind=203.0.113.1",
            "SYSTEM:echo $SOCAT_PEERADDR",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    for i in 0..3 {
        let name = format!("e{}", i + 1);
        lab.sandbox(i, &name);
        assert!(
            lab.ping(i, &name, "203.0.113.1".parse().unwrap()),
            "{name} pings the outside"
        );
        let mut seen = String::new();
        for _ in 0..50 {
            let out = lab.exec(i, &name, "socat -T2 - TCP:203.0.113.1:8080 </dev/null");
            seen = stdout(&out).trim().to_string();
            if !seen.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            seen,
            lab.hosts[i].ip.to_string(),
            "the outside sees h{}'s own address for {name}",
            i + 1
        );
    }
}

// ---- 4. the wire ----------------------------------------------------------------

#[test]
fn the_underlay_carries_vxlan_only_and_no_arp_for_sandboxes() {
    let lab = TestLab::up_shared(3, 60);
    // Every IPv4 frame on the switch except etcd's, inner headers decoded;
    // the outer headers that carry a sandbox address; every ARP. Not IGMP:
    // an interface without an address (0.0.0.0) reports its multicast
    // groups to 224.0.0.22 when it comes up, which is no traffic between
    // hosts.
    let all = Capture::start(
        &lab,
        &["-T", "vxlan", "ip and not host 198.51.100.2 and not igmp"],
    );
    let plain = Capture::start(&lab, &["net", RANGE]);
    let arp = Capture::start(&lab, &["-e", "arp"]);
    // Fresh sandboxes: their ARP caches are empty, so they must resolve.
    let a = echo_server(&lab, 0, "a", NET, &[]);
    let b = echo_server(&lab, 1, "b", NET, &[]);
    let c = echo_server(&lab, 2, "c", NET, &[]);
    for (i, from, to) in [(0, "a", b), (1, "b", c), (2, "c", a)] {
        let out = lab.exec(i, from, &format!("ping -c 2 -i 0.2 {to}"));
        assert!(out.status.success(), "{from} pings {to}: {}", text(&out));
    }
    assert_eq!(tcp_says(&lab, 0, "a", "c"), format!("tcp {a}"));
    assert_eq!(udp_says(&lab, 2, "c", "b"), format!("udp {c}"));
    let all = all.stop();
    let plain = plain.stop();
    let arp = arp.stop();
    // A frame's line starts with its time; with -T vxlan the inner packet
    // follows on a line of its own.
    let outer: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(outer.len() >= 12, "the traffic was seen: {all}");
    for l in &outer {
        assert!(
            l.contains(".8472: VXLAN") && l.contains("vni "),
            "only VXLAN on UDP 8472 between hosts: {l}"
        );
    }
    for ip in [a, b, c] {
        assert!(all.contains(&ip.to_string()), "{ip} inside VXLAN: {all}");
    }
    assert!(
        plain.trim().is_empty(),
        "no sandbox address outside VXLAN: {plain}"
    );
    assert!(!all.contains("ARP"), "no ARP inside VXLAN either: {all}");
    let sandbox_arp: Vec<&str> = arp.lines().filter(|l| l.contains("10.40.")).collect();
    assert!(
        sandbox_arp.is_empty(),
        "no ARP for sandboxes on the underlay: {sandbox_arp:?}"
    );
}

// ---- 5. many sandboxes at once: blocks claimed, borrowed -------------------

#[test]
fn fifty_sandboxes_on_each_of_three_hosts_at_once_get_150_distinct_addresses() {
    let lab = TestLab::up_shared(3, 60);
    shared_network(&lab, "burst", "10.50.0.0/24");
    let subnet: ipnet::Ipv4Net = "10.50.0.0/24".parse().unwrap();
    let started = Instant::now();
    let results: Vec<(usize, String, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .flat_map(|i| (0..50).map(move |n| (i, format!("b{}-{n}", i + 1))))
            .map(|(i, name)| {
                let lab = &lab;
                s.spawn(move || {
                    let out = lab.weft(
                        i,
                        &[
                            "--format", "json", "run", "-d", "--net", "burst", "--name", &name,
                            "--", "sleep", "1d",
                        ],
                    );
                    (i, name, out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed();
    let mut by_ip: BTreeMap<Ipv4Addr, (usize, String)> = BTreeMap::new();
    for (i, name, out) in &results {
        assert!(out.status.success(), "{name} on h{}: {}", i + 1, text(out));
        let v: SandboxView = serde_json::from_slice(&out.stdout).unwrap();
        let ip = ip_of(&v);
        assert!(subnet.contains(&ip) && ip != subnet.network() && ip != subnet.broadcast());
        assert_ne!(
            ip,
            "10.50.0.1".parse::<Ipv4Addr>().unwrap(),
            "not the gateway"
        );
        if let Some(other) = by_ip.insert(ip, (*i, name.clone())) {
            panic!("{ip} given to {name} on h{} and to {other:?}", i + 1);
        }
    }
    assert_eq!(by_ip.len(), 150);
    println!("150 sandboxes on 3 hosts at once: {took:?}");
    // Blocks were claimed as the hosts ran out: each holds several, and
    // every address is in a block (its host's, or borrowed from another's).
    let view = lab.wait(
        Duration::from_secs(10),
        "150 addresses counted in blocks",
        || {
            inspect(&lab, 0, "burst")
                .blocks
                .iter()
                .map(|b| b.used)
                .sum::<usize>()
                == 150
        },
    );
    println!("blocks caught up {view:?} after the last run");
    let blocks = inspect(&lab, 0, "burst").blocks;
    for h in ["h1", "h2", "h3"] {
        let held = blocks.iter().filter(|b| b.node == h).count();
        assert!(
            held >= 2,
            "{h} claimed more blocks as it ran out: {blocks:?}"
        );
    }
    let keys: BTreeSet<Ipv4Net> = blocks.iter().map(|b| b.block).collect();
    assert_eq!(keys.len(), blocks.len(), "no block held twice: {blocks:?}");
    for (ip, (i, name)) in &by_ip {
        assert!(
            blocks.iter().any(|b| b.block.contains(ip)),
            "{name}'s {ip} is in a held block"
        );
        let _ = i;
    }
    // The records in etcd say which host each address is on.
    let records = etcd(&lab, "endpoints/burst/");
    assert_eq!(records.len(), 150);
    for (_, r) in &records {
        let ip: Ipv4Addr = r["ip"].as_str().unwrap().parse().unwrap();
        let (i, name) = &by_ip[&ip];
        assert_eq!(r["node"], format!("h{}", i + 1).as_str(), "{name}: {r}");
        assert_eq!(r["sandbox"], name.as_str());
    }
    // A few of them across hosts.
    for (from, to) in [(0usize, 1usize), (1, 2), (2, 0)] {
        let f = format!("b{}-49", from + 1);
        let t = by_ip
            .iter()
            .find(|(_, (i, n))| *i == to && n.ends_with("-7"))
            .unwrap()
            .0;
        let took = lab.wait(Duration::from_secs(3), "a ping across hosts", || {
            lab.exec(from, &f, &format!("ping -c 1 -W 0.3 {t}"))
                .status
                .success()
        });
        println!("{f} pings {t} after {took:?}");
    }
    // Removed at once: every record goes, on every host's device too.
    std::thread::scope(|s| {
        for (_, (i, name)) in by_ip.iter() {
            let lab = &lab;
            s.spawn(move || {
                let out = lab.weft(*i, &["rm", "-f", name]);
                assert!(out.status.success(), "rm {name}: {}", text(&out));
            });
        }
    });
    lab.wait(Duration::from_secs(10), "every record to go", || {
        etcd(&lab, "endpoints/burst/").is_empty()
    });
    let dev = device(&lab, 0, "burst");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let neigh = stdout(&lab.sh(0, &format!("ip neigh show dev {dev} nud permanent")));
        let fdb = stdout(&lab.sh(0, &format!("bridge fdb show dev {dev} | grep dst")));
        if neigh.trim().is_empty() && fdb.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "h1's entries of removed sandboxes after 5 s:\n{neigh}\n{fdb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_subnet_is_used_to_its_last_address_by_borrowing() {
    let lab = TestLab::up_shared(3, 60);
    // A /26: 8 blocks of 8, 61 addresses (no network, broadcast, gateway).
    shared_network(&lab, "tight", "10.51.0.0/26");
    let results: Vec<(usize, Output)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .flat_map(|i| (0..20).map(move |n| (i, n)))
            .map(|(i, n)| {
                let lab = &lab;
                s.spawn(move || {
                    let name = format!("t{}-{n}", i + 1);
                    let out = lab.weft(
                        i,
                        &[
                            "--format", "json", "run", "-d", "--net", "tight", "--name", &name,
                            "--", "sleep", "1d",
                        ],
                    );
                    (i, out)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = BTreeSet::new();
    for (i, out) in &results {
        assert!(out.status.success(), "h{}: {}", i + 1, text(out));
        let v: SandboxView = serde_json::from_slice(&out.stdout).unwrap();
        assert!(ips.insert(ip_of(&v)), "{} twice", ip_of(&v));
    }
    assert_eq!(ips.len(), 60);
    // The 61st address, wherever it is, goes to h3; then there is none.
    let last = lab.weft(
        2,
        &[
            "--format", "json", "run", "-d", "--net", "tight", "--name", "last", "--", "sleep",
            "1d",
        ],
    );
    assert!(last.status.success(), "the 61st address: {}", text(&last));
    let v: SandboxView = serde_json::from_slice(&last.stdout).unwrap();
    assert!(ips.insert(ip_of(&v)));
    let full = lab.weft(
        1,
        &[
            "run", "-d", "--net", "tight", "--name", "over", "--", "sleep", "1d",
        ],
    );
    assert!(!full.status.success());
    let why = stderr(&full);
    assert!(
        why.contains("10.51.0.0/26") && why.contains("no free address on any host"),
        "{why}"
    );
    let ps: Vec<SandboxView> = lab.weft_json(1, &["ps", "-a"]);
    assert!(
        !ps.iter().any(|s| s.name == "over"),
        "nothing half-made: {ps:?}"
    );
    // Borrowed addresses are reachable like any other.
    lab.wait(
        Duration::from_secs(5),
        "61 records, each of its sandbox",
        || {
            let r = etcd(&lab, "endpoints/tight/");
            r.len() == 61 && r.iter().all(|(_, r)| r["sandbox"].is_string())
        },
    );
    let records = etcd(&lab, "endpoints/tight/");
    let blocks = blocks_in_etcd(&lab, "tight");
    let borrowed: Vec<&serde_json::Value> = records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| {
            let ip: Ipv4Addr = r["ip"].as_str().unwrap().parse().unwrap();
            let holder = blocks.iter().find(|(k, _)| {
                let b = k.rsplit('/').next().unwrap().replace('-', "/");
                b.parse::<Ipv4Net>().unwrap().contains(&ip)
            });
            holder.map(|(_, n)| n.as_str()) != r["node"].as_str()
        })
        .collect();
    println!(
        "{} of 61 addresses borrowed from another host's block; blocks: {blocks:?}",
        borrowed.len()
    );
    if let Some(r) = borrowed.first() {
        let node = r["node"].as_str().unwrap();
        let i = node[1..].parse::<usize>().unwrap() - 1;
        let name = r["sandbox"].as_str().unwrap();
        let other = (i + 1) % 3;
        let peer = format!("t{}-0", other + 1);
        let ip: Ipv4Addr = r["ip"].as_str().unwrap().parse().unwrap();
        assert!(
            lab.ping(other, &peer, ip),
            "{peer} reaches {name}'s borrowed {ip}"
        );
    }
}

// ---- 6. a static --ip held elsewhere -----------------------------------------

#[test]
fn a_static_ip_held_on_another_host_is_refused_naming_the_holder() {
    let lab = TestLab::up_shared(3, 60);
    run(
        &lab,
        0,
        "holder",
        NET,
        &["--ip", "10.40.200.7"],
        &["sleep", "1d"],
    );
    let auto = lab.sandbox(0, "auto");
    lab.wait(Duration::from_secs(5), "h1's records in etcd", || {
        keys_of(&lab, NET, "h1")
            .iter()
            .filter(|k| k.contains("/endpoints/"))
            .count()
            == 2
    });
    let links_before = links(&lab, 1);
    for (ip, who) in [
        ("10.40.200.7", "holder"),
        (auto.to_string().as_str(), "auto"),
    ] {
        let out = lab.weft(
            1,
            &[
                "run", "-d", "--name", "thief", "--net", NET, "--ip", ip, "--", "sleep", "1d",
            ],
        );
        assert!(!out.status.success(), "{}", text(&out));
        assert_eq!(
            out.status.code(),
            Some(125),
            "weft could not make the sandbox"
        );
        let why = stderr(&out);
        assert!(
            why.contains(&format!("{ip} is taken by sandbox {who} on host h1")),
            "{why}"
        );
        // Nothing half-made on h2: no sandbox, no link, no record.
        let ps: Vec<SandboxView> = lab.weft_json(1, &["ps", "-a"]);
        assert!(ps.is_empty(), "{ps:?}");
        lab.wait(Duration::from_secs(2), "h2's links as before", || {
            links(&lab, 1) == links_before
        });
        let rec = etcd(&lab, &format!("endpoints/{NET}/{ip}"));
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].1["node"], "h1");
        assert!(keys_of(&lab, NET, "h2")
            .iter()
            .all(|k| k.contains("/blocks/")));
    }
    // The refused name is free: the same command without --ip works.
    let ok = lab.weft(
        1,
        &[
            "run", "-d", "--name", "thief", "--net", NET, "--", "sleep", "1d",
        ],
    );
    assert!(ok.status.success(), "{}", text(&ok));
}

// ---- 7. an address that moves ------------------------------------------------

#[test]
fn an_address_moved_to_another_host_is_reached_there_within_a_second() {
    let lab = TestLab::up_shared(3, 60);
    let x: Ipv4Addr = "10.40.123.45".parse().unwrap();
    let xs = x.to_string();
    // Each owner says which host it is on.
    let server = [
        "socat",
        "TCP-LISTEN:7000,fork,reuseaddr",
        "SYSTEM:echo $WHERE",
    ];
    run(
        &lab,
        0,
        "old",
        NET,
        &["--ip", &xs, "-e", "WHERE=h1"],
        &server,
    );
    lab.sandbox(2, "c");
    assert!(lab.reaches(2, "c", x));
    assert_eq!(tcp_says(&lab, 2, "c", &xs), "h1");
    lab.weft_ok(0, &["rm", "-f", "old"]);
    let freed = lab.wait(Duration::from_secs(3), "h1's record of X to go", || {
        etcd(&lab, &format!("endpoints/{NET}/{xs}")).is_empty()
    });
    println!("{xs} free in etcd {freed:?} after rm on h1");
    // Traffic to X for h1 from now on, on the switch.
    let to_h1 = Capture::start(&lab, &["udp port 8472 and dst host 198.51.100.11"]);
    run(
        &lab,
        1,
        "new",
        NET,
        &["--ip", &xs, "-e", "WHERE=h2"],
        &server,
    );
    let started = Instant::now();
    let took = lab.wait(
        Duration::from_secs(1),
        "h3 to reach X on h2 within 1 s",
        || {
            lab.exec(2, "c", &format!("ping -c 1 -W 0.2 {x}"))
                .status
                .success()
        },
    );
    println!(
        "h3 reaches {xs} on h2 {took:?} after `run -d` returned ({:?})",
        started.elapsed()
    );
    // The new owner answers, not the old host.
    assert_eq!(tcp_says(&lab, 2, "c", &xs), "h2");
    for _ in 0..5 {
        assert!(lab.reaches(2, "c", x));
    }
    let seen = to_h1.stop();
    assert!(seen.trim().is_empty(), "nothing for X went to h1: {seen}");
    let dev = device(&lab, 2, NET);
    let fdb = stdout(&lab.sh(2, &format!("bridge fdb show dev {dev}")));
    let mac = "02:77:0a:28:7b:2d";
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(mac) && l.contains("dst 198.51.100.12")),
        "{fdb}"
    );
    assert!(
        !fdb.lines()
            .any(|l| l.starts_with(mac) && l.contains("dst 198.51.100.11")),
        "{fdb}"
    );
}

// ---- 8. leave -------------------------------------------------------------------

#[test]
fn leave_takes_a_hosts_endpoints_names_and_blocks_away_everywhere() {
    let lab = TestLab::up_shared(3, 60);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let b2 = lab.sandbox(1, "b2");
    lab.sandbox(2, "c");
    let macs: Vec<String> = [b, b2]
        .iter()
        .map(|ip| weft_model::overlay::format_mac(&weft_model::sandbox::mac_for(*ip)))
        .collect();
    for (i, from) in [(0, "a"), (2, "c")] {
        let dev = device(&lab, i, NET);
        for (ip, mac) in [b, b2].iter().zip(&macs) {
            lab.wait(Duration::from_secs(5), "h2's entries", || {
                entries(&lab, i, &dev, *ip, mac) == (true, true)
            });
        }
        assert_eq!(resolve(&lab, i, from, "b"), Some(b));
    }
    assert!(
        keys_of(&lab, NET, "h2").len() >= 3,
        "h2's block and two records"
    );
    lab.weft_ok(1, &["leave"]);
    let took = lab.wait(
        Duration::from_secs(5),
        "h2's entries and names to go",
        || {
            [(0, "a"), (2, "c")].iter().all(|(i, from)| {
                let dev = device(&lab, *i, NET);
                [b, b2]
                    .iter()
                    .zip(&macs)
                    .all(|(ip, mac)| entries(&lab, *i, &dev, *ip, mac) == (false, false))
                    && resolve(&lab, *i, from, "b").is_none()
                    && resolve(&lab, *i, from, "b2").is_none()
            })
        },
    );
    println!("h2 left: its entries and names were gone on h1 and h3 after {took:?}");
    assert!(
        keys_of(&lab, NET, "h2").is_empty(),
        "{:?}",
        keys_of(&lab, NET, "h2")
    );
    assert!(!lab.ping(0, "a", b));
    // The others go on.
    let c = resolve(&lab, 0, "a", "c").expect("c still resolves");
    assert!(lab.reaches(0, "a", c));
}

// ---- 9. lease expiry --------------------------------------------------------------

#[test]
fn a_killed_hosts_endpoints_names_and_blocks_go_when_its_lease_expires() {
    let mut lab = TestLab::up_shared(3, 3);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    lab.sandbox(2, "c");
    let mac = weft_model::overlay::format_mac(&weft_model::sandbox::mac_for(b));
    let gone = |lab: &TestLab| {
        [(0usize, "a"), (2, "c")].iter().all(|(i, from)| {
            let dev = device(lab, *i, NET);
            entries(lab, *i, &dev, b, &mac) == (false, false)
                && resolve(lab, *i, from, "b").is_none()
        }) && keys_of(lab, NET, "h2").is_empty()
    };
    lab.wait(Duration::from_secs(5), "b known on h1 and h3", || {
        [0usize, 2]
            .iter()
            .all(|i| entries(&lab, *i, &device(&lab, *i, NET), b, &mac) == (true, true))
    });
    let killed = Instant::now();
    lab.stop_agent(1, libc::SIGKILL).unwrap();
    // Still there right after: only the lease's expiry takes it away.
    assert!(!gone(&lab));
    assert!(!keys_of(&lab, NET, "h2").is_empty());
    lab.wait(
        Duration::from_secs(15),
        "h2's endpoints, names and blocks to expire",
        || gone(&lab),
    );
    let took = killed.elapsed();
    println!("h2 killed: gone everywhere after {took:?} (lease TTL 3 s)");
    assert!(
        took >= Duration::from_secs(1),
        "not before the lease expired: {took:?}"
    );
    let c = resolve(&lab, 0, "a", "c").unwrap();
    assert!(lab.reaches(0, "a", c));
}

// ---- 10. etcd away -------------------------------------------------------------------

#[test]
fn traffic_and_new_sandboxes_carry_on_through_thirty_seconds_without_etcd() {
    let mut lab = TestLab::up_shared(3, 60);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    lab.sandbox(2, "c");
    assert!(lab.reaches(0, "a", b));
    // 350 pings at 100 ms: before, through and after the outage.
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
                "350",
                "-i",
                "0.1",
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
    lab.stop_etcd().unwrap();
    let down = Instant::now();
    lab.wait(
        Duration::from_secs(20),
        "h1 to see etcd unreachable",
        || lab.status(0).cluster.is_some_and(|c| !c.etcd_healthy),
    );
    // h1 has room in its block (a /26 for the /16): no etcd needed.
    let started = Instant::now();
    let d = lab.sandbox(0, "d");
    println!(
        "a sandbox started with etcd down in {:?}",
        started.elapsed()
    );
    // d reaches a on its own host; a still reaches b (b's entries stay on
    // h1). h2 cannot know d before etcd is back, so d <-> b waits for that.
    let a = lab.exec(0, "d", "ping -c 1 -W 1 a");
    assert!(a.status.success(), "d pings a by name: {}", text(&a));
    assert!(lab.reaches(0, "a", b));
    while down.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.start_etcd().unwrap();
    let took = lab.wait(Duration::from_secs(20), "h2 and h3 to reach d", || {
        lab.ping(1, "b", d) && lab.ping(2, "c", d)
    });
    println!("etcd back: d reachable from h2 and h3 after {took:?}");
    assert_eq!(resolve(&lab, 1, "b", "d"), Some(d));
    let out = pinger.wait_with_output().unwrap();
    // The datapath never asks etcd: not one ping of 350 is lost.
    assert!(
        stdout(&out).contains("350 packets transmitted, 350 received"),
        "{}",
        text(&out)
    );
}

// ---- 11. an agent killed and restarted --------------------------------------

#[test]
fn an_agent_killed_and_restarted_loses_no_packet_and_leaks_nothing() {
    let mut lab = TestLab::up_shared(3, 60);
    let a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    assert!(lab.reaches(0, "a", b));
    let blocks_before = blocks_in_etcd(&lab, NET);
    let h1_keys = keys_of(&lab, NET, "h1");
    let links_before = links(&lab, 0);
    let pinger = lab
        .lab
        .weft(
            1,
            &[
                "exec",
                "b",
                "--",
                "ping",
                "-q",
                "-c",
                "400",
                "-i",
                "0.01",
                "-W",
                "1",
                &a.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent(0, libc::SIGKILL).unwrap();
    lab.start_agent(0).unwrap();
    lab.stop_agent(1, libc::SIGKILL).unwrap();
    lab.start_agent(1).unwrap();
    let out = pinger.wait_with_output().unwrap();
    assert!(
        stdout(&out).contains("400 packets transmitted, 400 received"),
        "{}",
        text(&out)
    );
    let ps: Vec<SandboxView> = lab.weft_json(0, &["ps"]);
    assert_eq!(
        ps.iter().map(ip_of).collect::<Vec<_>>(),
        vec![a],
        "same address"
    );
    // Nothing leaked: one VXLAN device, the same links, blocks and records.
    std::thread::sleep(Duration::from_millis(500));
    let vx = stdout(&lab.sh(0, "ip -o link show type vxlan"));
    assert_eq!(vx.lines().count(), 1, "{vx}");
    assert_eq!(links(&lab, 0), links_before);
    assert_eq!(blocks_in_etcd(&lab, NET), blocks_before);
    assert_eq!(keys_of(&lab, NET, "h1"), h1_keys);
    // And a new sandbox after the restart gets an address nobody has.
    let e = lab.sandbox(0, "e");
    assert!(e != a && e != b);
    assert!(lab.reaches(1, "b", e));
}

// ---- 12. bad inputs -------------------------------------------------------------

#[test]
fn bad_shared_networks_are_refused_and_nothing_is_made() {
    let lab = TestLab::up_shared(3, 60);
    let before: Vec<BTreeSet<String>> = (0..3).map(|i| links(&lab, i)).collect();
    let keys_before = etcd(&lab, "").len();
    for (args, says, not) in [
        (
            &["--subnet", "10.60.0.0/29", "small"][..],
            &["10.60.0.0/29 is too small", "/28 or larger"][..],
            &[][..],
        ),
        (
            &["--subnet", "10.40.128.0/17", "overlap"][..],
            &["overlaps 10.40.0.0/16 of network lab"][..],
            &[][..],
        ),
        (
            &["--subnet", "10.61.0.0/16", "--backend", "udp", "udpnet"][..],
            &["only vxlan", "--host-subnet-len"][..],
            &["host-gw", "secure", "wireguard", "ipip"][..],
        ),
    ] {
        let name = args.last().unwrap();
        let out = create_network(&lab, 0, args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let err = stderr(&out);
        for s in says {
            assert!(err.contains(s), "{args:?}: {err}");
        }
        for s in not {
            assert!(!err.contains(s), "{args:?} mentions {s}: {err}");
        }
        assert!(
            etcd(&lab, &format!("networks/{name}")).is_empty()
                && etcd(&lab, &format!("blocks/{name}/")).is_empty()
        );
        assert_eq!(
            etcd(&lab, "").len(),
            keys_before,
            "{args:?}: no key in etcd"
        );
        for (i, links_before) in before.iter().enumerate() {
            assert!(!lab.weft(i, &["network", "inspect", name]).status.success());
            assert_eq!(
                &links(&lab, i),
                links_before,
                "{args:?}: no link on h{}",
                i + 1
            );
        }
    }
    // A host address is masked, as Docker does: not an error.
    let out = create_network(&lab, 0, &["--subnet", "10.62.0.1/24", "masked"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait(Duration::from_secs(5), "h3 to know masked", || {
        lab.weft(2, &["network", "inspect", "masked"])
            .status
            .success()
    });
    let v = inspect(&lab, 2, "masked");
    assert_eq!(v.subnet.to_string(), "10.62.0.0/24");
    assert_eq!(v.gateway.to_string(), "10.62.0.1");
}

// ---- 13. MTU ------------------------------------------------------------------------

#[test]
fn mtu_is_the_underlays_minus_fifty_on_every_link_of_the_lan() {
    let lab = TestLab::up_shared(3, 60);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let mtu_of =
        |i: usize, dev: &str| -> u32 { host_link_field(&lab, i, dev, "mtu").parse().unwrap() };
    let underlay = mtu_of(0, "eth0");
    let want = underlay - 50;
    lab.wait(Duration::from_secs(3), "h1 to program b", || {
        lab.status(0)
            .cluster
            .is_some_and(|c| c.networks[0].remote_endpoints == 1)
    });
    for i in 0..2 {
        assert_eq!(
            mtu_of(i, &device(&lab, i, NET)),
            want,
            "vxlan device on h{}",
            i + 1
        );
        assert_eq!(
            mtu_of(i, &bridge(&lab, i, NET)),
            want,
            "bridge on h{}",
            i + 1
        );
        assert_eq!(
            inspect(&lab, i, NET).mtu,
            Some(want),
            "inspect on h{}",
            i + 1
        );
    }
    let eth0 = stdout(&lab.exec(0, "a", "ip -o link show eth0"));
    assert_eq!(
        link_field(&eth0, "mtu"),
        want.to_string(),
        "the sandbox's eth0"
    );
    // The largest packet with DF set crosses; one byte more does not.
    let payload = want - 28;
    let fits = lab.exec(0, "a", &format!("ping -c 2 -M do -s {payload} {b}"));
    assert!(fits.status.success(), "{}", text(&fits));
    let over = lab.exec(
        0,
        "a",
        &format!("ping -c 1 -W 1 -M do -s {} {b}", payload + 1),
    );
    assert!(!over.status.success(), "{}", text(&over));
}

// ---- 14. the seeds replayed ---------------------------------------------------------

#[test]
fn seed_000_docker_overlay_across_two_hosts_replayed() {
    // /work/shared/seeds/000: "docker容器跨主机通信", the part "DOCKER的内置OVERLAY网络".
    let lab = TestLab::up_shared(2, 60);
    let net = "www.yuchaoit.cn_overlay_net";
    // [root@docker-200 ~]#docker network create -d overlay --subnet=10.0.2.1/24 www.yuchaoit.cn_overlay_net
    let out = lab.weft(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet=10.0.2.1/24",
            net,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // [root@docker-200 ~]#docker network ls   (... overlay   global)
    let ls = lab.weft_ok(0, &["network", "ls"]);
    let row = ls
        .lines()
        .find(|l| l.starts_with(net))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(
        row.contains("overlay") && row.contains("global") && row.contains("10.0.2.0/24"),
        "{row}"
    );
    // "在docker-200上创建的网络信息,会立即同步到docker-201上。" (the network appears on docker-201 by itself)
    let took = lab.wait(Duration::from_secs(3), "the network on h2", || {
        lab.weft_ok(1, &["network", "ls"])
            .lines()
            .any(|l| l.starts_with(net))
    });
    println!("{net} on h2 {took:?} after create on h1");
    // docker run -it busybox /bin/sh   (on each host, on the overlay network)
    let c200 = ip_of(&run(&lab, 0, "c200", net, &[], &["sleep", "1d"]));
    let c201 = ip_of(&run(&lab, 1, "c201", net, &[], &["sleep", "1d"]));
    // / # ifconfig |grep 10.0.2   (10.0.2.x, Mask:255.255.255.0)
    for (i, name, ip) in [(0, "c200", c200), (1, "c201", c201)] {
        let addr = stdout(&lab.exec(i, name, "ip -4 -o addr show eth0"));
        assert!(
            addr.contains(&format!("inet {ip}/24 ")) && ip.octets()[..3] == [10, 0, 2],
            "{addr}"
        );
    }
    // "测试跨主机的通信": ping each other
    assert!(
        lab.ping(0, "c200", c201),
        "docker-200's container pings docker-201's"
    );
    assert!(lab.reaches(1, "c201", c200), "and back");
}

#[test]
fn seed_004_weave_one_big_subnet_across_two_hosts_replayed() {
    // /work/shared/seeds/004: "15.6docker跨主机网络---Weave".
    let lab = TestLab::up_shared(2, 60);
    // The lab's own network (10.40.0.0/16) is inside weave's range: gone first.
    lab.weft_ok(0, &["network", "rm", NET]);
    // weave launch   ("driver是weave,subnet是10.32.0.0/12")
    let out = lab.weft(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.32.0.0/12",
            "weave",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    lab.wait(Duration::from_secs(5), "docker2 to join weave", || {
        lab.lab.joined(1, "weave")
    });
    // eval $(weave env); docker run --name weave1 -itd busybox   (on docker1)
    let weave1 = ip_of(&run(&lab, 0, "weave1", "weave", &[], &["sleep", "1d"]));
    // docker run -itd --name weave11 busybox   (on docker2)
    let weave11 = ip_of(&run(&lab, 1, "weave11", "weave", &[], &["sleep", "1d"]));
    // "掩码是12位的,实际上这个两个IP 是在同一个subnet10.32.0.0/12"
    for (i, name, ip) in [(0, "weave1", weave1), (1, "weave11", weave11)] {
        let addr = stdout(&lab.exec(i, name, "ip -4 -o addr show eth0"));
        assert!(addr.contains(&format!("inet {ip}/12 ")), "{addr}");
    }
    // "docker2上面的weave11能够ping通docker1上的weave1" (by address, and by
    // name as weave DNS does: weft's names have no .weave.local domain)
    assert!(lab.reaches(1, "weave11", weave1));
    let by_name = lab.exec(1, "weave11", "ping -c 1 -W 2 weave1");
    assert!(
        by_name.status.success() && stdout(&by_name).contains(&format!("({weave1})")),
        "{}",
        text(&by_name)
    );
    assert!(lab.reaches(0, "weave1", weave11));
}

// ---- 15. blocks in inspect ------------------------------------------------------

#[test]
fn inspect_shows_each_hosts_blocks_and_how_full_they_are() {
    let lab = TestLab::up_shared(3, 60);
    let used_of = |i: usize, node: &str| -> usize {
        inspect(&lab, i, NET)
            .blocks
            .iter()
            .filter(|b| b.node == node)
            .map(|b| b.used)
            .sum()
    };
    let v = inspect(&lab, 1, NET);
    for h in ["h1", "h2", "h3"] {
        let mine: Vec<_> = v.blocks.iter().filter(|b| b.node == h).collect();
        assert!(!mine.is_empty(), "{h} holds a block: {:?}", v.blocks);
        assert!(
            mine.iter()
                .all(|b| b.block.prefix_len() == 26 && b.capacity >= 62),
            "{mine:?}"
        );
    }
    assert_eq!(used_of(1, "h1"), 0);
    let a = lab.sandbox(0, "a");
    lab.sandbox(0, "a2");
    lab.wait(
        Duration::from_secs(3),
        "2 used on h1, as h2 and h3 see it",
        || used_of(1, "h1") == 2 && used_of(2, "h1") == 2,
    );
    let v = inspect(&lab, 2, NET);
    let b = v
        .blocks
        .iter()
        .find(|b| b.block.contains(&a))
        .expect("a's block");
    assert_eq!((b.node.as_str(), b.used), ("h1", 2), "{:?}", v.blocks);
    let human = lab.weft_ok(1, &["network", "inspect", NET]);
    let row = human
        .lines()
        .find(|l| l.contains(&b.block.to_string()))
        .unwrap_or_else(|| panic!("{human}"));
    assert!(
        human.contains("HOST") && human.contains("BLOCK") && human.contains("USED"),
        "{human}"
    );
    assert!(
        row.contains("h1") && row.contains(&format!("2/{}", b.capacity)),
        "{row}"
    );
    lab.weft_ok(0, &["rm", "-f", "a2"]);
    lab.wait(
        Duration::from_secs(3),
        "1 used on h1, as h3 sees it",
        || used_of(2, "h1") == 1,
    );
    assert_eq!(used_of(0, "h2") + used_of(0, "h3"), 0);
}

// ---- 16. a removed sandbox ---------------------------------------------------------

#[test]
fn a_removed_sandbox_leaves_the_other_hosts_at_once() {
    let lab = TestLab::up_shared(3, 60);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    lab.sandbox(2, "c");
    let mac = weft_model::overlay::format_mac(&weft_model::sandbox::mac_for(b));
    let dev = device(&lab, 2, NET);
    lab.wait(Duration::from_secs(5), "b on h3", || {
        entries(&lab, 2, &dev, b, &mac) == (true, true)
    });
    assert_eq!(resolve(&lab, 2, "c", "b"), Some(b));
    lab.weft_ok(1, &["rm", "-f", "b"]);
    let took = lab.wait(
        Duration::from_secs(5),
        "b's entries and name to leave h1 and h3",
        || {
            entries(&lab, 2, &dev, b, &mac) == (false, false)
                && entries(&lab, 0, &device(&lab, 0, NET), b, &mac) == (false, false)
                && resolve(&lab, 2, "c", "b").is_none()
        },
    );
    println!("b removed on h2: gone from h1 and h3 after {took:?}");
    assert!(etcd(&lab, &format!("endpoints/{NET}/{b}")).is_empty());
}

// ---- more -------------------------------------------------------------------------

#[test]
fn every_host_has_the_same_gateway_address_and_mac() {
    let lab = TestLab::up_shared(3, 60);
    let mut seen = BTreeSet::new();
    for i in 0..3 {
        let br = bridge(&lab, i, NET);
        let addr = stdout(&lab.sh(i, &format!("ip -4 -o addr show dev {br}")));
        assert!(addr.contains("inet 10.40.0.1/16 "), "h{}: {addr}", i + 1);
        let mac = host_link_field(&lab, i, &br, "link/ether");
        assert_eq!(mac.len(), 17, "{mac}");
        seen.insert(mac);
        let name = format!("s{}", i + 1);
        lab.sandbox(i, &name);
        let route = stdout(&lab.exec(i, &name, "ip -4 route show default"));
        assert!(route.contains("via 10.40.0.1 dev eth0"), "{route}");
    }
    assert_eq!(seen.len(), 1, "one gateway MAC on every host: {seen:?}");
    // A sandbox's ARP entry for its gateway is that MAC, on every host.
    let mac = seen.into_iter().next().unwrap();
    for i in 0..3 {
        let name = format!("s{}", i + 1);
        let out = lab.exec(
            i,
            &name,
            "ping -c 1 -W 1 10.40.0.1 >/dev/null; ip neigh show 10.40.0.1",
        );
        assert!(stdout(&out).contains(&mac), "h{}: {}", i + 1, text(&out));
    }
}

#[test]
fn a_host_added_later_finds_the_sandboxes_already_there_by_name() {
    let mut lab = TestLab::up_shared(2, 60);
    let a = lab.sandbox(0, "a");
    lab.sandbox(1, "b");
    let h3 = lab.add_host().unwrap();
    lab.wait(Duration::from_secs(10), "h3 to join", || {
        lab.lab.joined(h3, NET)
    });
    let c = lab.sandbox(h3, "c");
    assert_eq!(resolve(&lab, h3, "c", "a"), Some(a));
    let out = lab.exec(h3, "c", "ping -c 1 -W 2 a && ping -c 1 -W 2 b");
    assert!(out.status.success(), "{}", text(&out));
    lab.wait(Duration::from_secs(3), "a to reach c", || {
        lab.ping(0, "a", c)
    });
    assert_eq!(resolve(&lab, 0, "a", "c"), Some(c));
}

#[test]
fn two_shared_networks_are_isolated_from_each_other() {
    let lab = TestLab::up_shared(2, 60);
    shared_network(&lab, "blue", "10.52.0.0/24");
    let a = lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    let x = ip_of(&run(&lab, 1, "x", "blue", &[], &["sleep", "1d"]));
    let y = ip_of(&run(&lab, 0, "y", "blue", &[], &["sleep", "1d"]));
    assert!(
        lab.ping(0, "a", b) && lab.ping(0, "y", x),
        "each works across hosts"
    );
    assert!(!lab.ping(0, "a", x), "lab -> blue is dropped");
    assert!(!lab.ping(1, "x", a), "blue -> lab is dropped");
    assert_eq!(
        resolve(&lab, 0, "a", "x"),
        None,
        "and its names are its own"
    );
    assert_eq!(resolve(&lab, 0, "y", "x"), Some(x));
    let _ = y;
}

#[test]
fn removing_a_shared_network_frees_its_blocks_and_records_in_etcd() {
    let lab = TestLab::up_shared(3, 60);
    shared_network(&lab, "gone", "10.53.0.0/24");
    for i in 0..3 {
        run(
            &lab,
            i,
            &format!("g{}", i + 1),
            "gone",
            &[],
            &["sleep", "1d"],
        );
    }
    lab.wait(Duration::from_secs(5), "three records", || {
        etcd(&lab, "endpoints/gone/").len() == 3
    });
    assert!(!blocks_in_etcd(&lab, "gone").is_empty());
    let out = lab.weft(0, &["network", "rm", "-f", "gone"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait(Duration::from_secs(5), "the network's keys to go", || {
        etcd(&lab, "blocks/gone/").is_empty() && etcd(&lab, "endpoints/gone/").is_empty()
    });
    // A new network of the same name starts from nothing.
    shared_network(&lab, "gone", "10.54.0.0/24");
    let subnet: Ipv4Net = "10.54.0.0/24".parse().unwrap();
    lab.wait(
        Duration::from_secs(5),
        "blocks of the new range only",
        || {
            let v = inspect(&lab, 0, "gone");
            !v.blocks.is_empty()
                && v.blocks
                    .iter()
                    .all(|b| subnet.contains(&b.block) && b.used == 0)
        },
    );
    let st = lab.status(0);
    let n = st
        .cluster
        .unwrap()
        .networks
        .into_iter()
        .find(|n| n.name == "gone")
        .unwrap();
    assert_eq!(
        n.remote_endpoints, 0,
        "no stale sandbox of the old network: {n:?}"
    );
}
