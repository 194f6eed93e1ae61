//! `weft reset` (issue 18, point 7): with the agent stopped, one command
//! removes everything weft made on the host, and afterwards nothing of
//! weft's is left: no link but lo, no nft table, no route of weft's, no
//! mount, no sandbox process, no state or data dir.

use weft_e2e::{text, TestHost};

fn gone(pid: i32) -> bool {
    // Absent, or a zombie waiting for its new parent to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn mounted_under(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(String::from)
        .collect()
}

#[test]
fn reset_removes_everything_weft_made() {
    let mut h = TestHost::new(Some("10.99.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.100.0.0/24", "wftrs"]);
    h.run_detached(
        "a",
        &["--net", "wftrs", "-p", "9300:80"],
        &["sleep", "infinity"],
    );
    h.run_detached("b", &[], &["sleep", "infinity"]);
    let pids: Vec<i32> = h.ps().iter().filter_map(|s| s.pid).collect();
    assert_eq!(pids.len(), 2, "two sandbox processes");
    let data = h.data_dir().display().to_string();

    let out = h.weft(&["reset", "-f", "--data-dir", &data]);
    assert!(
        !out.status.success(),
        "reset with the agent running: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("an agent is running"),
        "{}",
        text(&out)
    );
    assert_eq!(h.ps().len(), 2, "a refused reset touched nothing");

    h.kill_agent(libc::SIGKILL);
    let out = h.weft(&["reset", "--data-dir", &data]);
    assert!(!out.status.success(), "reset without -f must refuse");
    assert!(String::from_utf8_lossy(&out.stderr).contains("weft reset -f"));

    let report = h.weft_ok(&["reset", "-f", "--data-dir", &data]);
    assert!(report.contains("removed network wftrs"), "{report}");

    let links = h.ns.sh("ip -o link show");
    assert_eq!(links.lines().count(), 1, "only lo is left: {links}");
    assert_eq!(h.ns.sh("nft list tables"), "", "no nft table");
    for proto in ["0x77", "0x78"] {
        assert_eq!(
            h.ns.sh(&format!("ip route show proto {proto}")),
            "",
            "no route of weft's (protocol {proto})"
        );
    }
    assert_eq!(mounted_under(&h.dir), Vec::<String>::new(), "no mount");
    weft_e2e::eventually(
        "the sandbox processes end",
        std::time::Duration::from_secs(10),
        || match pids.iter().find(|p| !gone(**p)) {
            None => Ok(()),
            Some(p) => Err(format!("pid {p} still runs")),
        },
    );
    assert!(!h.state_dir().exists(), "state dir removed");
    assert!(!h.data_dir().exists(), "data dir removed");

    // Nothing left to do: a second reset says so.
    let again = h.weft_ok(&["reset", "-f", "--data-dir", &data]);
    assert!(again.contains("nothing of weft's"), "{again}");
}
