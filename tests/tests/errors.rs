//! Bad input: a one-line error that says what is wrong and how to fix it, a
//! non-zero exit, and nothing half-made.

use std::os::unix::process::CommandExt;
use weft_e2e::{text, weft_bin, TestHost};

/// What a failed command could have left behind.
fn footprint(h: &TestHost) -> (Vec<String>, Vec<String>, Vec<String>, usize) {
    (
        h.links(),
        h.state_files("netns"),
        h.state_files("store"),
        h.ps().len(),
    )
}

fn expect_error(h: &TestHost, args: &[&str], needle: &str) {
    let before = footprint(h);
    let out = h.weft(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "weft {args:?} should fail: {}",
        text(&out)
    );
    assert!(
        err.contains(needle),
        "weft {args:?}: expected {needle:?} in {err:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err:?}");
    assert_eq!(footprint(h), before, "weft {args:?} left something behind");
}

#[test]
fn bad_inputs_fail_cleanly() {
    // Without the namespace pool, every link and namespace file is a sandbox's.
    let h = TestHost::with_agent_args(Some("10.91.0.0/16"), &["--netns-pool", "0"]);
    h.run_detached("taken", &["--ip", "10.91.0.50"], &["sleep", "infinity"]);
    expect_error(
        &h,
        &["run", "--net", "nosuchnet", "--", "true"],
        "no network named \"nosuchnet\"",
    );
    expect_error(
        &h,
        &["run", "--net", "container:nobody", "--", "true"],
        "no sandbox named \"nobody\"",
    );
    expect_error(
        &h,
        &["run", "--net", "container:", "--", "true"],
        "needs a sandbox name",
    );
    expect_error(
        &h,
        &["run", "--net", "host", "--net", "bridge", "--", "true"],
        "cannot be combined",
    );
    expect_error(
        &h,
        &["run", "--ip", "10.92.0.5", "--", "true"],
        "outside subnet 10.91.0.0/16",
    );
    expect_error(
        &h,
        &["run", "--ip", "10.91.0.50", "--", "true"],
        "10.91.0.50 is taken by sandbox taken (running)",
    );
    expect_error(
        &h,
        &["run", "--mac-address", "02:42:zz:00:00:01", "--", "true"],
        "MAC",
    );
    expect_error(
        &h,
        &[
            "run",
            "--net",
            "none",
            "--mac-address",
            "02:42:0a:00:00:01",
            "--",
            "true",
        ],
        "--mac-address needs exactly one network",
    );
    expect_error(
        &h,
        &["run", "--hostname", "bad_name", "--", "true"],
        "--hostname \"bad_name\"",
    );

    expect_error(&h, &["run", "--ip", "10.91.0.1", "--", "true"], "reserved");
    expect_error(
        &h,
        &["run", "--name", "taken", "--", "true"],
        "already taken",
    );
    expect_error(
        &h,
        &["run", "--name", "bad name", "--", "true"],
        "invalid sandbox name",
    );
    expect_error(&h, &["run", "--", "/no/such/program"], "command not found");
    expect_error(
        &h,
        &["run", "-d", "--", "no-such-program-wft"],
        "command not found",
    );
    expect_error(&h, &["rm", "nobody"], "no sandbox named");
    expect_error(&h, &["rm", "taken"], "is running");
    expect_error(&h, &["exec", "nobody", "--", "true"], "no sandbox named");
    expect_error(&h, &["network", "inspect", "nosuchnet"], "no network named");
    let out = h.weft(&["run", "--", "no-such-program-wft"]);
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn no_agent_running_says_how_to_start_one() {
    let h = TestHost::new(Some("10.93.0.0/16"));
    let out = h
        .weft_cmd(&["ps"])
        .env("WEFT_STATE_DIR", h.dir.join("elsewhere"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no weft agent is running") && err.contains("weft agent"),
        "{err}"
    );
}

#[test]
fn not_root_is_refused() {
    let h = TestHost::new(Some("10.94.0.0/16"));
    // weft_cmd's nsenter would run as nobody too and fail to enter the
    // namespace; the same command entering it by setns before the setuid.
    let mut cmd = std::process::Command::new(weft_bin());
    h.ns.enter(&mut cmd).expect("enter the host's namespace");
    cmd.arg("ps").env("WEFT_STATE_DIR", h.state_dir());
    // SAFETY: the hook runs in the child between fork and exec and only
    // calls setgid and setuid, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs root"),
        "{}",
        text(&out)
    );
    // The socket itself is root-only.
    let meta = std::fs::metadata(h.state_dir().join("weft.sock")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_second_agent_on_the_same_state_dir_is_refused() {
    let h = TestHost::new(Some("10.95.0.0/16"));
    let out =
        h.ns.command(weft_bin())
            .arg("agent")
            .arg("--state-dir")
            .arg(h.state_dir())
            .arg("--data-dir")
            .arg(h.data_dir())
            .output()
            .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        text(&out)
    );
}

/// `weft … | head` with a reader that has gone: weft ends quietly instead
/// of panicking on the closed pipe (issue 18, point 4). The pipe's read end
/// is closed before weft starts, so every write fails: no race decides it.
#[test]
fn a_closed_stdout_ends_quietly() {
    let h = TestHost::new(Some("10.95.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.96.0.0/24", "wftpipe"]);
    for args in [
        &["network", "ls"][..],
        &["--format", "json", "network", "ls"],
        &["ps"],
        &["--format", "json", "ps"],
        &["--format", "json", "network", "inspect", "wftpipe"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = h
            .weft_cmd(args)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run weft");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "weft {args:?} on a closed pipe: {err}"
        );
        assert!(
            out.status.success(),
            "weft {args:?} on a closed pipe exited {:?}: {err}",
            out.status
        );
    }
    h.weft_ok(&["network", "rm", "wftpipe"]);
}

/// Whether `dir` is a mount point in this (the test's) mount namespace,
/// which is the one an agent started through nsenter --net uses.
fn is_mounted(dir: &std::path::Path) -> bool {
    let want = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_str()))
}

/// A `weft agent` that cannot start fails before it makes anything (issue
/// 18, point 5): a data dir in use by another agent, a `--public-ip` that is
/// not this host's. No namespace mount, link or nft table is left.
#[test]
fn a_failed_agent_start_leaves_nothing() {
    use std::time::Duration;
    use weft_testkit::{output_within, Netns, ScratchDir};

    // The data dir of a running agent, with a state dir of its own.
    let h = TestHost::new(Some("10.97.0.0/16"));
    let second = h.dir.join("state2");
    let mut cmd = h.ns.command(weft_bin());
    cmd.arg("agent")
        .arg("--state-dir")
        .arg(&second)
        .arg("--data-dir")
        .arg(h.data_dir());
    let out = output_within(cmd, Duration::from_secs(20));
    assert!(
        !out.status.success(),
        "a second agent on one data dir must fail: {}",
        text(&out)
    );
    assert!(
        !is_mounted(&second.join("netns")),
        "the failed agent left its namespace directory mounted"
    );
    assert!(!second.join("weft.sock").exists(), "no socket left");

    // A --public-ip this host does not have, in a namespace of its own.
    let ns = Netns::new("wftag");
    let dir = ScratchDir::new("wftag");
    let state = dir.path().join("state");
    let mut cmd = ns.command(weft_bin());
    cmd.arg("agent")
        .arg("--state-dir")
        .arg(&state)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--bridge-subnet", "10.98.0.0/16"])
        .args(["--etcd-endpoints", "http://127.0.0.1:2379"])
        .args(["--public-ip", "198.51.100.77"]);
    let out = output_within(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a foreign --public-ip must fail");
    assert!(
        err.contains("--public-ip 198.51.100.77 is not an address of this host"),
        "the error says what was wrong: {err}"
    );
    let links = ns.sh("ip -o link show");
    assert_eq!(links.lines().count(), 1, "only lo is left: {links}");
    assert_eq!(ns.sh("nft list tables"), "", "no nft table is left");
    assert!(
        !is_mounted(&state.join("netns")),
        "no namespace mount is left"
    );
}

/// An explicit bridge subnet on the host's own network would cut the host
/// off it: refused, naming the interface or route (issue 18, point 1).
#[test]
fn a_bridge_subnet_on_the_hosts_own_network_is_refused() {
    let h = TestHost::with_agent_args(Some("10.101.0.0/16"), &["--netns-pool", "0"]);
    // The host gets 203.0.113.1/24 on a veth to an "outside" namespace.
    let _outside = h.outside();
    h.ns.sh("ip route add 10.123.0.0/16 via 203.0.113.2");
    expect_error(
        &h,
        &["network", "create", "--subnet", "203.0.113.0/25", "wftown"],
        "contains 203.0.113.1, an address of this host's interface wftu",
    );
    expect_error(
        &h,
        &[
            "network",
            "create",
            "--subnet",
            "203.0.113.128/25",
            "wftown",
        ],
        "overlaps this host's route 203.0.113.0/24 dev wftu",
    );
    expect_error(
        &h,
        &["network", "create", "--subnet", "10.123.4.0/24", "wftown"],
        "overlaps this host's route 10.123.0.0/16 via 203.0.113.2",
    );
    // Clear of them: accepted.
    h.weft_ok(&["network", "create", "--subnet", "10.124.0.0/24", "wftown"]);
    h.weft_ok(&["network", "rm", "wftown"]);
}
