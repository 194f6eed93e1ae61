//! The habits of Docker's CLI (issue 18): `-e`, `--hostname`,
//! `--mac-address`, `-i`, `logs`, `inspect`, `version`, `ps -a/-q/--filter`
//! with Docker's columns and order; and every command's help has a
//! description for each argument.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use weft_e2e::{eventually, text, weft_bin, TestHost};
use weft_model::api::{SandboxView, State};

#[test]
fn run_takes_env_hostname_mac_and_stdin_as_docker_does() {
    let h = TestHost::new(Some("10.161.0.0/16"));
    // -e and a KEY passed on from this environment; the rest is inherited.
    let out = h
        .weft_cmd(&[
            "run",
            "-e",
            "GREETING=hello there",
            "-e",
            "WFT_FROM_HERE",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING/$WFT_FROM_HERE\"",
        ])
        .env("WFT_FROM_HERE", "passed")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello there/passed"
    );

    // --hostname: a UTS namespace of the sandbox's own; exec sees it too,
    // and the host's name is untouched.
    let host_name = h.ns.sh("hostname");
    let v = h.run_detached(
        "named",
        &[
            "--hostname",
            "wft-box.example",
            "--mac-address",
            "02:42:0a:a1:00:99",
        ],
        &["sleep", "infinity"],
    );
    assert_eq!(v.hostname.as_deref(), Some("wft-box.example"));
    let out = h.exec("named", "hostname");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "wft-box.example",
        "{}",
        text(&out)
    );
    assert_eq!(h.ns.sh("hostname"), host_name, "the host keeps its name");
    // --mac-address: the interface on the network has it.
    // (ip, not /sys: sysfs shows the namespace of whoever mounted it.)
    let out = h.exec("named", "ip -o link show eth0");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("link/ether 02:42:0a:a1:00:99 "),
        "{}",
        text(&out)
    );

    // -i keeps stdin; without it the command reads /dev/null.
    let piped = |interactive: bool| {
        let mut args = vec!["run"];
        if interactive {
            args.push("-i");
        }
        args.extend(["--", "cat"]);
        let mut child = h
            .weft_cmd(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // A reader that does not take it (no -i) closes the pipe: ignore that.
        let _ = child.stdin.take().unwrap().write_all(b"typed\n");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(piped(true), "typed\n");
    assert_eq!(piped(false), "");

    // A taken address names the sandbox that holds it, exited or not.
    let ip = h.ip_of("named");
    h.weft_ok(&["stop", "-t", "1", "named"]);
    let out = h.weft(&["run", "--ip", &ip, "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("{ip} is taken by sandbox named (exited)")),
        "{err}"
    );
}

#[test]
fn logs_inspect_and_version() {
    let h = TestHost::new(Some("10.162.0.0/16"));
    h.run_detached(
        "talker",
        &[],
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo line-$i; done; echo oops >&2; sleep 1; echo late",
        ],
    );
    eventually("the first lines in the log", Duration::from_secs(5), || {
        h.weft_ok(&["logs", "talker"]).contains("oops")
    });
    let all = h.weft_ok(&["logs", "talker"]);
    assert!(all.starts_with("line-1\nline-2\n"), "{all}");
    let tail = h.weft_ok(&["logs", "--tail", "2", "talker"]);
    assert_eq!(
        tail, "line-5\noops\n",
        "stdout and stderr, the last 2 lines"
    );
    // -f prints what comes later and ends when the command does.
    let followed = h.weft_ok(&["logs", "-f", "-n", "1", "talker"]);
    assert!(followed.ends_with("late\n"), "{followed}");
    // No log (as for a foreground run, which writes to its terminal): the
    // error says so. A detached sandbox whose log is gone stands in for it.
    let quiet = h.run_detached("quiet", &[], &["sleep", "infinity"]).id;
    std::fs::remove_file(h.state_dir().join("logs").join(format!("{quiet}.log"))).unwrap();
    let out = h.weft(&["logs", "quiet"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("only `weft run -d` keeps one"),
        "{}",
        text(&out)
    );

    // inspect: a JSON array of the records, whatever --format says.
    let out = h.weft_ok(&["inspect", "talker", "quiet"]);
    let views: Vec<SandboxView> = serde_json::from_str(&out).expect("a JSON array of sandboxes");
    assert_eq!(
        views.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["talker", "quiet"]
    );
    assert!(views[1].attachment.endpoints()[0]
        .ip
        .to_string()
        .starts_with("10.162."));
    let out = h.weft(&["inspect", "nosuch"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nosuch"));

    // version: this binary's and the agent's.
    let v = h.weft_ok(&["version"]);
    let want = format!("weft {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        v.lines().filter(|l| l.contains(&want)).count(),
        2,
        "client and agent: {v}"
    );
    let gone = Command::new(weft_bin())
        .args(["--state-dir", "/nonexistent/wft", "version"])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
    let said = String::from_utf8_lossy(&gone.stdout);
    assert!(
        said.contains(&want) && said.contains("not reachable"),
        "{said}"
    );
}

#[test]
fn ps_shows_dockers_columns_newest_first_and_filters() {
    let h = TestHost::new(Some("10.163.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.164.0.0/24", "side"]);
    h.run_detached("old", &["-p", "8080:80"], &["sleep", "infinity"]);
    // created_unix has whole seconds: the next one is a second newer.
    std::thread::sleep(Duration::from_millis(1100));
    h.run_detached(
        "new",
        &["--net", "side"],
        &["sh", "-c", "sleep 'a long time' || sleep infinity"],
    );
    std::thread::sleep(Duration::from_millis(1100));
    h.run_detached("done", &[], &["true"]);
    eventually("done to exit", Duration::from_secs(5), || {
        h.sandbox("done").state == State::Exited
    });

    let table = h.weft_ok(&["ps"]);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in ["NAME", "ID", "STATE", "CREATED", "PORTS", "COMMAND"] {
        assert!(header.contains(col), "{header}");
    }
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "exited ones are hidden without -a:\n{table}");
    assert!(
        rows[0].starts_with("new ") && rows[1].starts_with("old "),
        "newest first:\n{table}"
    );
    assert!(
        rows[0].contains("sh -c 'sleep '\\''a long time'\\'' || sleep infinity'"),
        "quoted as given:\n{table}"
    );
    assert!(rows[1].contains("0.0.0.0:8080->80/tcp"), "{table}");
    assert!(rows[1].contains("seconds ago"), "{table}");

    let all = h.weft_ok(&["ps", "-a"]);
    let done = all.lines().nth(1).unwrap();
    assert!(
        done.starts_with("done ") && done.contains("exited (0)"),
        "{all}"
    );
    assert_eq!(h.sandbox("done").exit_code, Some(0));

    let ids =
        |args: &[&str]| -> Vec<String> { h.weft_ok(args).lines().map(String::from).collect() };
    let short = |name: &str| h.sandbox(name).id[..12].to_string();
    assert_eq!(ids(&["ps", "-q"]), [short("new"), short("old")]);
    assert_eq!(
        ids(&["ps", "-q", "--filter", "network=side"]),
        [short("new")]
    );
    assert_eq!(
        ids(&["ps", "-aq", "--filter", "status=exited"]),
        [short("done")]
    );
    assert_eq!(
        ids(&["ps", "-q", "--filter", "name=ol", "--filter", "name=ne"]),
        [short("new"), short("old")]
    );
    assert!(ids(&[
        "ps",
        "-q",
        "--filter",
        "name=ol",
        "--filter",
        "network=side"
    ])
    .is_empty());
    // A stopped one ended by SIGTERM: 128 + 15, as a shell says.
    h.weft_ok(&["stop", "-t", "5", "old"]);
    eventually("old's exit code", Duration::from_secs(5), || {
        h.sandbox("old").exit_code == Some(143)
    });
    h.run_detached("fails", &[], &["sh", "-c", "exit 3"]);
    eventually("fails' exit code", Duration::from_secs(5), || {
        h.sandbox("fails").exit_code == Some(3)
    });
    assert!(h.weft_ok(&["ps", "-a"]).contains("exited (3)"));
    let out = h.weft(&["ps", "--filter", "colour=red"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr)
                .contains("use one of name, id, status, network"),
        "{}",
        text(&out)
    );

    // network ls -q and --filter, the same way.
    let nets = ids(&["network", "ls", "-q", "--filter", "name=sid"]);
    assert_eq!(nets.len(), 1);
    assert_eq!(nets[0], h.network("side").id[..12]);
    let bridges = ids(&["network", "ls", "-q", "--filter", "driver=bridge"]);
    assert_eq!(bridges.len(), 2, "bridge and side");
}

/// Every command and subcommand has a description, and so has each of its
/// arguments and options, and every command's help shows an example.
#[test]
fn every_command_and_argument_is_described() {
    fn help(path: &[String]) -> String {
        let out = Command::new(weft_bin())
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{path:?} --help: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    // Lines of a section ("Commands:", "Arguments:", "Options:") up to the next blank line.
    fn section<'a>(help: &'a str, name: &str) -> Vec<&'a str> {
        help.lines()
            .skip_while(|l| *l != name)
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .collect()
    }
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let text = help(&path);
        seen += 1;
        for line in section(&text, "Commands:") {
            let mut words = line.split_whitespace();
            let name = words.next().unwrap();
            assert!(
                words.next().is_some(),
                "weft {path:?}: command {name} has no description"
            );
            if name != "help" {
                let mut sub = path.clone();
                sub.push(name.to_string());
                todo.push(sub);
            }
        }
        for sec in ["Arguments:", "Options:"] {
            // An item is indented less than 8; its description is text after
            // the name on its line, or the more indented line below (clap puts
            // long ones there).
            let indent = |l: &str| l.len() - l.trim_start().len();
            let lines = section(&text, sec);
            for (i, line) in lines.iter().enumerate() {
                if indent(line) >= 8 {
                    continue;
                }
                let t = line.trim_start();
                let described =
                    t.contains("  ") || lines.get(i + 1).is_some_and(|n| indent(n) >= 8);
                assert!(described, "weft {path:?}: {t} has no description\n{text}");
            }
        }
        let leaf = section(&text, "Commands:").is_empty();
        if leaf && !path.is_empty() && path != ["agent"] && path[0] != "cni" {
            assert!(
                text.contains("Example"),
                "weft {path:?} --help shows no example:\n{text}"
            );
        }
    }
    assert!(seen > 20, "every command was visited ({seen})");
}

/// `weft status` on one host says what a user needs (issue 18) and exits 1
/// when something weft made is gone; the agent's log has no colour codes
/// when it goes to a file, and `--log-format json` gives one object a line.
#[test]
fn status_shows_the_host_and_fails_when_unhealthy_and_logs_suit_collectors() {
    let h = TestHost::with_agent_args(Some("10.165.0.0/16"), &["--log-format", "json"]);
    h.weft_ok(&["network", "create", "--subnet", "10.166.0.0/24", "extra"]);
    h.run_detached("s", &["--net", "extra"], &["sleep", "infinity"]);
    let out = h.weft_ok(&["status"]);
    for want in [
        "health:  ok",
        "(1 running)",
        &format!("state:   {}", h.state_dir().display()),
        "namespaces ready",
        "cluster: none",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    let row = out
        .lines()
        .find(|l| l.starts_with("extra "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("bridge") && row.contains("10.166.0.0/24") && row.trim_end().ends_with('1'),
        "{row}"
    );

    // A bridge deleted behind weft's back: unhealthy, named, exit status 1.
    let bridge = h.network("extra").bridge;
    h.ns.sh(&format!("ip link del {bridge}"));
    let out = h.weft(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("PROBLEMS") && said.contains(&format!("bridge {bridge} is missing")),
        "{said}"
    );

    let log = h.agent_log();
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI codes in a log file:\n{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l.contains("\"agent ready\"")), "{log}");
}

/// Disconnecting the network that carries a sandbox's published ports
/// takes them away, and says so.
#[test]
fn disconnect_says_which_published_ports_went() {
    let h = TestHost::new(Some("10.167.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.168.0.0/24", "front"]);
    h.weft_ok(&["network", "create", "--subnet", "10.169.0.0/24", "back"]);
    h.run_detached(
        "web",
        &["--net", "front", "--net", "back", "-p", "8085:80"],
        &["sleep", "infinity"],
    );
    let out = h.weft(&["network", "disconnect", "front", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("web no longer publishes -p 8085:80/tcp (published on network front)"),
        "{err}"
    );
    assert!(h.sandbox("web").ports.is_empty());
    let out = h.weft(&["network", "disconnect", "back", "web"]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "nothing to say: {}",
        text(&out)
    );
}
