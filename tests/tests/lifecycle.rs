//! Sandbox lifecycle: concurrency, complete removal, agent restarts.

use std::collections::HashSet;
use weft_e2e::{text, TestHost};

#[test]
fn fifty_concurrent_runs_get_fifty_distinct_addresses() {
    let h = TestHost::new(Some("10.81.0.0/16"));
    let results: Vec<std::process::Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let h = &h;
                s.spawn(move || {
                    h.weft(&[
                        "run",
                        "-d",
                        "--name",
                        &format!("c{i}"),
                        "--",
                        "sleep",
                        "infinity",
                    ])
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for r in &results {
        assert!(r.status.success(), "{}", text(r));
    }
    let ps = h.ps();
    let ips: HashSet<String> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["attachment"]["endpoints"][0]["ip"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ips.len(), 50, "{ps}");
    // And every one of them is really configured in its namespace.
    for i in [0, 25, 49] {
        let name = format!("c{i}");
        let ip = h.ip_of(&name);
        let out = h.exec(&name, "ip -o -4 addr show dev eth0");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&ip),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn rm_leaves_no_veth_address_namespace_or_file() {
    let h = TestHost::new(Some("10.82.0.0/16"));
    let before_links = h.sandbox_veths();
    let v = h.run_detached("gone", &[], &["sleep", "infinity"]);
    let ip = h.ip_of("gone");
    let netns = v["netns"].as_str().unwrap().to_string();
    let veth = v["attachment"]["endpoints"][0]["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(h.links().contains(&veth));
    assert!(std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&netns));
    h.weft_ok(&["rm", "-f", "gone"]);

    h.wait_sandbox_veths(&before_links);
    assert!(!std::path::Path::new(&netns).exists());
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&netns),
        "namespace still mounted"
    );
    assert!(
        h.state_files("store").is_empty(),
        "records: {:?}",
        h.state_files("store")
    );
    assert!(
        h.state_files("logs").is_empty(),
        "logs: {:?}",
        h.state_files("logs")
    );
    let table = h.ns.sh("nft list table inet weft");
    assert!(!table.contains(&ip), "nft still mentions {ip}:\n{table}");
    let addrs = h.ns.sh("ip -o -4 addr");
    assert!(!addrs.contains(&ip), "{addrs}");
    let ps = h.ps();
    assert_eq!(ps.as_array().unwrap().len(), 0);
    // The address is free again (next-fit hands out others first, so ask for it).
    h.run_detached("again", &["--ip", &ip], &["sleep", "infinity"]);
}

#[test]
fn sigkill_of_the_agent_loses_no_packets_and_the_restarted_agent_adopts() {
    let mut h = TestHost::new(Some("10.83.0.0/16"));
    h.run_detached("p1", &[], &["sleep", "infinity"]);
    h.run_detached("p2", &[], &["sleep", "infinity"]);
    let ip = h.ip_of("p1");
    // The ping runs ~3 s; kill and restart the agent while it does.
    let ping =
        h.ns.command("ping")
            .args(["-i", "0.01", "-c", "300", "-W", "1", &ip])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ping");
    let pinger = std::thread::spawn(move || ping.wait_with_output());
    std::thread::sleep(std::time::Duration::from_millis(500));
    h.kill_agent(libc::SIGKILL);
    std::thread::sleep(std::time::Duration::from_millis(500));
    h.start_agent();
    let out = pinger.join().unwrap().expect("ping ran");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("300 packets transmitted, 300 received"), "{s}");

    let names: HashSet<String> = h
        .ps()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, HashSet::from(["p1".to_string(), "p2".to_string()]));
    let p2 = h.ip_of("p2");
    let out = h.exec("p1", &format!("ping -c 1 -W 2 {p2}"));
    assert!(out.status.success(), "{}", text(&out));
    h.weft_ok(&["rm", "-f", "p1", "p2"]);
    h.wait_sandbox_veths(&[]);
}

#[test]
fn a_restarted_agent_removes_what_it_owns_and_nobody_wants() {
    let mut h = TestHost::new(Some("10.84.0.0/16"));
    h.run_detached("keep", &[], &["sleep", "infinity"]);
    let v = h.run_detached("lost", &[], &["sleep", "infinity"]);
    let lost_id = v["id"].as_str().unwrap();
    let lost_pid = v["pid"].as_i64().unwrap() as i32;
    h.kill_agent(libc::SIGKILL);
    // The record of "lost" disappears while the agent is down (as after a crash mid-write).
    let rec = h
        .state_dir()
        .join("store")
        .join(format!("sandboxes%2F{lost_id}"));
    std::fs::remove_file(&rec).unwrap();
    // weft no longer knows the process of "lost", so the test ends it itself.
    unsafe { libc::kill(lost_pid, libc::SIGKILL) };
    h.start_agent();
    let wv = h.sandbox_veths();
    assert_eq!(wv.len(), 1, "only keep's veth remains: {wv:?}");
    assert_eq!(h.ps().as_array().unwrap().len(), 1);
    assert!(h.exec("keep", "ping -c 1 -W 2 10.84.0.1").status.success());
}

#[test]
fn a_deleted_veth_is_restored_on_restart() {
    let mut h = TestHost::new(Some("10.85.0.0/16"));
    let v = h.run_detached("heal", &[], &["sleep", "infinity"]);
    let veth = v["attachment"]["endpoints"][0]["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    h.ns.sh(&format!("ip link del {veth}"));
    assert!(!h.exec("heal", "ping -c 1 -W 1 10.85.0.1").status.success());
    h.kill_agent(libc::SIGTERM);
    h.start_agent();
    let out = h.exec("heal", "ping -c 1 -W 2 10.85.0.1");
    assert!(out.status.success(), "{}\n{}", text(&out), h.agent_log());
}
