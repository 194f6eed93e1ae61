//! Sandbox lifecycle: concurrency, complete removal, agent restarts.

use std::collections::HashSet;
use weft_e2e::{host_ifname, text, TestHost};
use weft_model::api::State;

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
        .iter()
        .map(|s| s.attachment.endpoints()[0].ip.to_string())
        .collect();
    assert_eq!(ips.len(), 50, "{ps:?}");
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
    let netns = v.netns.clone().expect("a namespace");
    let veth = host_ifname(&v.attachment.endpoints()[0]).expect("a host veth");
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
    assert_eq!(ps.len(), 0);
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

    let names: HashSet<String> = h.ps().into_iter().map(|s| s.name).collect();
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
    let lost_id = &v.id;
    let lost_pid = v.pid.expect("a pid");
    h.kill_agent(libc::SIGKILL);
    // The record of "lost" disappears while the agent is down (as after a crash mid-write).
    let rec = h
        .state_dir()
        .join("store")
        .join(format!("sandboxes%2F{lost_id}"));
    std::fs::remove_file(&rec).unwrap();
    // weft no longer knows the process of "lost", so the test ends it itself.
    // SAFETY: kill takes integers and touches no memory of ours.
    unsafe { libc::kill(lost_pid, libc::SIGKILL) };
    h.start_agent();
    let wv = h.sandbox_veths();
    assert_eq!(wv.len(), 1, "only keep's veth remains: {wv:?}");
    assert_eq!(h.ps().len(), 1);
    assert!(h.exec("keep", "ping -c 1 -W 2 10.84.0.1").status.success());
}

#[test]
fn a_deleted_veth_is_restored_on_restart() {
    let mut h = TestHost::new(Some("10.85.0.0/16"));
    let v = h.run_detached("heal", &[], &["sleep", "infinity"]);
    let veth = host_ifname(&v.attachment.endpoints()[0]).expect("a host veth");
    h.ns.sh(&format!("ip link del {veth}"));
    assert!(!h.exec("heal", "ping -c 1 -W 1 10.85.0.1").status.success());
    h.kill_agent(libc::SIGTERM);
    h.start_agent();
    let out = h.exec("heal", "ping -c 1 -W 2 10.85.0.1");
    assert!(out.status.success(), "{}\n{}", text(&out), h.agent_log());
}

#[test]
fn stop_ends_the_process_and_keeps_the_sandbox_until_rm() {
    let h = TestHost::new(Some("10.86.0.0/16"));
    let v = h.run_detached("s", &[], &["sleep", "infinity"]);
    let pid = v.pid.expect("a pid");
    assert_eq!(v.state, State::Running);
    h.weft_ok(&["stop", "-t", "5", "s"]);
    let ps = h.ps();
    assert_eq!(ps[0].state, State::Exited, "{ps:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
            // A zombie waiting for init to reap it has an empty cmdline.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        }
    );
    let out = h.exec("s", "true");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not running"),
        "{}",
        text(&out)
    );
    // Not running any more, so rm needs no -f.
    h.weft_ok(&["rm", "s"]);
    assert_eq!(h.ps().len(), 0);
}

#[test]
fn an_attach_that_fails_half_way_is_rolled_back() {
    let mut h = TestHost::with_agent_args(Some("10.87.0.0/16"), &["--netns-pool", "0"]);
    h.run_detached("before", &[], &["sleep", "infinity"]);
    let files = h.state_files("netns");
    let veths = h.sandbox_veths();
    // The bridge disappears behind weft's back: the namespace and veth are
    // made, enslaving fails, and everything made must go again.
    h.ns.sh("ip link del weft0");
    let out = h.weft(&["run", "-d", "--name", "half", "--", "sleep", "infinity"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(h.state_files("netns"), files, "namespace file left");
    assert_eq!(h.sandbox_veths(), veths, "veth left");
    assert_eq!(h.ps().len(), 1);
    // A restarted agent puts the bridge back, and attaching works again.
    h.kill_agent(libc::SIGTERM);
    h.start_agent();
    h.run_detached("after", &[], &["sleep", "infinity"]);
    let before = h.ip_of("before");
    let out = h.exec("after", &format!("ping -c 1 -W 2 {before}"));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_full_bridge_refuses_the_1024th_sandbox_cleanly() {
    // One Linux bridge takes 1023 ports; attach 1023 sandboxes through the
    // API's own client path (weft run) and check the next one's error.
    let h = TestHost::new(Some("10.88.0.0/16"));
    let chunks: Vec<Vec<usize>> = (0..1023)
        .collect::<Vec<_>>()
        .chunks(512)
        .map(|c| c.to_vec())
        .collect();
    std::thread::scope(|s| {
        for chunk in &chunks {
            let h = &h;
            s.spawn(move || {
                for i in chunk {
                    let out = h.weft(&[
                        "run",
                        "-d",
                        "--name",
                        &format!("f{i}"),
                        "--",
                        "sleep",
                        "infinity",
                    ]);
                    assert!(out.status.success(), "sandbox {i}: {}", text(&out));
                }
            });
        }
    });
    let veths = h.sandbox_veths().len();
    assert_eq!(veths, 1023);
    let out = h.weft(&[
        "run",
        "-d",
        "--name",
        "one-too-many",
        "--",
        "sleep",
        "infinity",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is full") && err.contains("1023"), "{err}");
    assert_eq!(
        h.sandbox_veths().len(),
        1023,
        "the refused attach left a veth"
    );
    assert_eq!(h.ps().len(), 1023);
}
