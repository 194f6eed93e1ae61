//! The kit itself, over real namespaces (needs root): names, namespaces
//! gone after drop (also after a panic), veth pairs, commands and threads
//! inside a namespace, waiting.

use std::net::{Ipv4Addr, UdpSocket};
use std::process::Command;
use std::time::Duration;
use weft_testkit::{
    eventually, host_ifname, list_with_prefix, output_within, outside, unique, veth_pair, Netns,
};

#[test]
fn unique_names_differ_and_keep_the_prefix() {
    let (a, b) = (unique("wftk"), unique("wftk"));
    assert_ne!(a, b);
    assert!(a.starts_with("wftk") && b.starts_with("wftk"));
    assert!(a.len() <= 15, "{a} is too long for an interface name");
}

#[test]
#[should_panic(expected = "start with")]
fn names_without_the_prefix_are_refused() {
    unique("veth");
}

#[test]
fn a_namespace_without_the_prefix_is_refused() {
    assert!(Netns::add("notours").is_err());
    assert!(!std::path::Path::new("/run/netns/notours").exists());
}

#[test]
fn a_namespace_is_deleted_on_drop_also_after_a_panic() {
    let ns = Netns::new("wftk");
    let name = ns.name().to_string();
    assert!(ns.path().exists());
    // lo is up, as on a fresh host.
    assert!(ns.sh("ip -o link show lo").contains("UP"));
    drop(ns);
    assert!(list_with_prefix(&name).is_empty());

    let name = std::panic::catch_unwind(|| {
        let ns = Netns::new("wftk");
        let name = ns.name().to_string();
        std::panic::panic_any(name);
    })
    .unwrap_err()
    .downcast::<String>()
    .unwrap();
    assert!(
        list_with_prefix(&name).is_empty(),
        "{name} survived a panic"
    );
}

#[test]
fn commands_and_threads_run_inside_the_namespace() {
    let ns = Netns::new("wftk");
    // nsenter changes the network namespace only, not the mount namespace.
    let inode = |path: &str| std::fs::read_link(path).unwrap();
    let out = ns
        .command("readlink")
        .args(["/proc/self/ns/net", "/proc/self/ns/mnt"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    let mut lines = s.lines();
    assert_ne!(
        lines.next().unwrap(),
        inode("/proc/self/ns/net").to_str().unwrap()
    );
    assert_eq!(
        lines.next().unwrap(),
        inode("/proc/self/ns/mnt").to_str().unwrap()
    );
    // The same namespace whichever way it is entered.
    let mut cmd = Command::new("readlink");
    cmd.arg("/proc/self/ns/net");
    ns.enter(&mut cmd).unwrap();
    let entered = cmd.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&entered.stdout).trim(),
        s.lines().next().unwrap()
    );
    let from_thread = ns.run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap());
    assert_eq!(from_thread.to_str().unwrap(), s.lines().next().unwrap());
    assert!(!ns.try_sh("exit 3").status.success());
}

#[test]
fn veth_pairs_join_two_namespaces() {
    let (a, b) = (Netns::new("wftk"), Netns::new("wftk"));
    veth_pair(
        &a,
        "wftka",
        Some("192.0.2.1/24"),
        &b,
        "wftkb",
        Some("192.0.2.2/24"),
    )
    .unwrap();
    a.sh("ping -c 1 -W 2 192.0.2.2");
    // A socket opened in b's namespace, reached from a's.
    let server = b.run(|| UdpSocket::bind("192.0.2.2:7777").unwrap());
    a.run(|| {
        UdpSocket::bind("192.0.2.1:0")
            .unwrap()
            .send_to(b"hi", "192.0.2.2:7777")
            .unwrap()
    });
    let mut buf = [0u8; 2];
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (n, from) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hi");
    assert_eq!(from.ip(), Ipv4Addr::new(192, 0, 2, 1));
    // The pair goes with a namespace.
    drop(a);
    eventually(
        "the veth pair to go with its namespace",
        Duration::from_secs(5),
        || !b.sh("ip -o link").contains("wftkb"),
    );
}

#[test]
fn an_outside_network_behind_a_host() {
    let (host, out) = (Netns::new("wftk"), Netns::new("wftk"));
    outside::join(&host, "wftkh", &out, "wftko").unwrap();
    host.sh(&format!("ping -c 1 -W 2 {}", outside::OUTSIDE_ADDR));
    assert!(out.sh("ip -o -4 addr").contains("203.0.113.2/24"));
}

#[test]
fn eventually_waits_and_reports() {
    let mut n = 0;
    let took = eventually("n to reach 3", Duration::from_secs(5), || {
        n += 1;
        n >= 3
    });
    assert!(took >= Duration::from_millis(100));
    let err = std::panic::catch_unwind(|| {
        eventually("the impossible", Duration::from_millis(100), || {
            Err::<(), _>("no luck".to_string())
        })
    })
    .unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("the impossible") && msg.contains("no luck"),
        "{msg}"
    );
}

#[test]
fn output_within_returns_output_or_kills() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo out; echo err >&2; exit 2"]);
    let out = output_within(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let mut slow = Command::new("sleep");
    slow.arg("30");
    let t = std::time::Instant::now();
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        output_within(slow, Duration::from_millis(200))
    }));
    assert!(err.is_err());
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn host_ifname_of_an_endpoint() {
    let ep: weft_model::Endpoint = serde_json::from_value(serde_json::json!({
        "network": "bridge", "ifname": "eth0", "kind": "veth", "host_ifname": "wv1234",
        "ip": "10.0.0.2", "prefix_len": 24, "gateway": "10.0.0.1"
    }))
    .unwrap();
    assert_eq!(host_ifname(&ep).as_deref(), Some("wv1234"));
    let mac: weft_model::Endpoint = serde_json::from_value(serde_json::json!({
        "network": "lan", "ifname": "eth0", "kind": "macvlan",
        "ip": "10.0.0.3", "prefix_len": 24, "gateway": "10.0.0.1"
    }))
    .unwrap();
    assert_eq!(
        host_ifname(&mac),
        None,
        "a macvlan endpoint has no host end"
    );
}
