//! `weft expose NET [--ip ADDR]` / `weft hide NET` (issue 17, weave's
//! expose): the host reaches a network's sandboxes on every host by their
//! own addresses, and a machine on the underlay that runs no weft reaches
//! them through the exposing host (`ip route add RANGE via HOST`), for both
//! overlay kinds; a local bridge network is exposed by default. Every test
//! builds its own `weft lab` (3 hosts), removed on drop; the outside
//! machine is a namespace of the test's own on the lab's switch.

use std::net::Ipv4Addr;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use weft_e2e::lab::{TestLab, NET};
use weft_e2e::{text, Netns};
use weft_model::api::{ExposedView, SandboxView};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A sandbox on host `i` that answers TCP on 7000 with "tcp PEER" (the
/// address the connection came from) and ping.
fn echo_server(lab: &TestLab, i: usize, name: &str, extra: &[&str]) -> Ipv4Addr {
    let script = "exec socat TCP-LISTEN:7000,fork,reuseaddr 'SYSTEM:echo tcp $SOCAT_PEERADDR'";
    let mut args = vec!["run", "-d", "--name", name, "--net", NET];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let v: SandboxView = lab.weft_json(i, &args);
    v.attachment.endpoints().first().expect("an address").ip
}

/// What a TCP connection to `to:7000` reads, made by `run` (a shell
/// command runner: a host's namespace or the outside one), retried for up
/// to `secs` while the server starts or the path is programmed.
fn tcp_says(run: impl Fn(&str) -> Output, to: Ipv4Addr, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = run(&format!(
            "socat -T2 - TCP:{to}:7000,connect-timeout=1 </dev/null"
        ));
        let said = stdout(&out).trim().to_string();
        if (out.status.success() && !said.is_empty()) || Instant::now() > deadline {
            return said;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pings(out: Output) -> bool {
    out.status.success()
}

/// `weft expose ARGS` on host `i`, its answer.
fn expose(lab: &TestLab, i: usize, args: &[&str]) -> ExposedView {
    let mut all = vec!["expose"];
    all.extend_from_slice(args);
    lab.weft_json(i, &all)
}

/// The weft links of host `i` (names), without the namespace pool's.
fn links(lab: &TestLab, i: usize) -> Vec<String> {
    let mut v: Vec<String> =
        stdout(&lab.sh(i, "ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1"))
            .lines()
            .filter(|l| !l.starts_with("wvp"))
            .map(String::from)
            .collect();
    v.sort();
    v
}

fn expose_links(lab: &TestLab, i: usize) -> Vec<String> {
    links(lab, i)
        .into_iter()
        .filter(|l| l.starts_with("wex"))
        .collect()
}

/// weft's nft table on host `i`, as the kernel has it.
fn table(lab: &TestLab, i: usize) -> String {
    stdout(&lab.sh(i, "nft list table inet weft"))
}

/// The elements of `expose_snat` on host `i`.
fn expose_elements(lab: &TestLab, i: usize) -> String {
    let t = stdout(&lab.sh(i, "nft -j list map inet weft expose_snat"));
    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["map"]["elem"].as_array())
        .flatten()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every key and value under /weft/endpoints/NET/ in etcd.
fn endpoint_records(lab: &TestLab) -> Vec<String> {
    let out = lab.etcdctl_admin(&["get", "--prefix", &format!("/weft/endpoints/{NET}/")]);
    let mut v: Vec<String> = out.lines().map(String::from).collect();
    v.sort();
    v
}

static OUTSIDE: AtomicU32 = AtomicU32::new(0);

/// A machine on the lab's underlay that runs no weft: a namespace of the
/// test's own with a veth onto the switch `ul0`, removed on drop (the
/// switch's end goes with it).
struct Outside {
    ns: Netns,
    ip: Ipv4Addr,
}

impl Outside {
    /// At 198.51.100.`octet` (the lab has .2 and .11 up), with `range`
    /// routed via `via`.
    fn new(lab: &TestLab, octet: u8, range: &str, via: Ipv4Addr) -> Outside {
        let ns = Netns::new("wfto");
        let n = OUTSIDE.fetch_add(1, Ordering::Relaxed);
        let port = format!("wfo{:x}{n:x}", std::process::id() & 0xfffff);
        let ip = Ipv4Addr::new(198, 51, 100, octet);
        let made = lab.sh_underlay(&format!(
            "ip link add {port} type veth peer name eth0 netns {} && ip link set {port} master ul0 up",
            ns.name()
        ));
        assert!(made.status.success(), "outside veth: {}", text(&made));
        ns.sh(&format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {ip}/24 dev eth0 && ip route add {range} via {via}"
        ));
        Outside { ns, ip }
    }

    fn sh(&self, script: &str) -> Output {
        self.ns.try_sh(script)
    }

    fn ping(&self, to: Ipv4Addr) -> bool {
        pings(self.sh(&format!("ping -c 1 -W 1 {to}")))
    }
}

/// Waits until `cond` holds (up to `secs`), panicking with `what`.
fn wait_for(lab: &TestLab, secs: u64, what: &str, cond: impl FnMut() -> bool) {
    lab.wait(Duration::from_secs(secs), what, cond);
}

// ---- the shared kind: the host itself -------------------------------------

#[test]
fn the_host_reaches_every_hosts_sandboxes_after_expose_and_not_after_hide() {
    let lab = TestLab::up_shared(3, 60);
    let a = echo_server(&lab, 0, "a", &[]);
    let b = echo_server(&lab, 1, "b", &[]);
    let c = echo_server(&lab, 2, "c", &[]);
    let host = |cmd: &str| lab.sh(0, cmd);
    // Without expose the host's source is the gateway, which every host has.
    assert!(
        !pings(host(&format!("ping -c 1 -W 1 {b}"))),
        "h1 reaches {b} before expose"
    );
    assert!(tcp_says(host, b, 1).is_empty());

    let v = expose(&lab, 0, &[NET]);
    assert_eq!(
        (v.network.as_str(), v.kind.as_str(), v.default),
        (NET, "shared", false)
    );
    assert_eq!(v.prefix_len, 16);
    let e = v.ip;
    assert!("10.40.0.0/16"
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .contains(&e));
    assert!(![a, b, c, Ipv4Addr::new(10, 40, 0, 1)].contains(&e), "{e}");
    let text_out = lab.weft(0, &["hide", NET]);
    assert!(text_out.status.success(), "{}", text(&text_out));
    let again = lab.weft_ok(0, &["expose", NET]);
    assert!(
        again.contains(&format!("exposed {NET} on this host as ")),
        "{again}"
    );
    let e = again
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
        .expect("an address");

    for (to, on) in [(a, "h1"), (b, "h2"), (c, "h3")] {
        wait_for(&lab, 10, &format!("h1 to ping {to} on {on}"), || {
            pings(host(&format!("ping -c 1 -W 1 {to}")))
        });
        // The sandbox sees the exposed address as the source.
        assert_eq!(
            tcp_says(host, to, 5),
            format!("tcp {e}"),
            "TCP to {to} on {on}"
        );
    }
    // The one link pair, the address /32 on it, the nft elements.
    assert_eq!(
        expose_links(&lab, 0).len(),
        2,
        "{:?}",
        expose_links(&lab, 0)
    );
    let addr = stdout(&lab.sh(0, "ip -4 -o addr show | grep wex-"));
    assert!(addr.contains(&format!("inet {e}/32 ")), "{addr}");
    let t = table(&lab, 0);
    assert!(t.contains(&format!("10.40.0.0/16 : {e}")), "{t}");
    assert!(t.contains("10.40.0.1 . 10.40.0.0/16"), "{t}");
    // Shown: in status here, in inspect everywhere (h2 from h1's record).
    let s = lab.status(0);
    assert!(
        s.exposed.iter().any(|x| x.network == NET && x.ip == e),
        "{:?}",
        s.exposed
    );
    let st = lab.weft_ok(0, &["status"]);
    assert!(
        st.contains(&format!("exposed: {NET} on this host as {e}/16")),
        "{st}"
    );
    wait_for(&lab, 10, "h2 to show h1 exposing", || {
        lab.network(1, NET)
            .exposed
            .iter()
            .any(|x| x.node == "h1" && x.ip == e)
    });
    let mine = lab.network(0, NET);
    assert!(
        mine.programmed
            .iter()
            .any(|p| p.what == "exposed address" && p.present && p.detail.contains(&e.to_string())),
        "{:?}",
        mine.programmed
    );
    let insp = lab.weft_ok(1, &["network", "inspect", NET]);
    assert!(
        insp.contains("exposed on:") && insp.contains(&e.to_string()),
        "{insp}"
    );

    let hidden = lab.weft_ok(0, &["hide", NET]);
    assert_eq!(hidden.trim(), format!("{NET} hidden: {e} is free again"));
    assert!(expose_links(&lab, 0).is_empty(), "{:?}", links(&lab, 0));
    assert!(expose_elements(&lab, 0).is_empty(), "{}", table(&lab, 0));
    wait_for(&lab, 10, "h1 to stop reaching h2's sandbox", || {
        !pings(host(&format!("ping -c 1 -W 1 {b}")))
    });
    assert!(tcp_says(host, c, 1).is_empty(), "h1 still reaches {c}");
    wait_for(&lab, 10, "h1's exposed record to go", || {
        !endpoint_records(&lab)
            .iter()
            .any(|l| l.ends_with(&format!("/{e}")))
    });
    // The address is back in the pool: a sandbox may have it.
    let v: SandboxView = lab.weft_json(
        0,
        &[
            "run",
            "-d",
            "--name",
            "z",
            "--net",
            NET,
            "--ip",
            &e.to_string(),
            "--",
            "sleep",
            "1d",
        ],
    );
    assert_eq!(v.attachment.endpoints()[0].ip, e);
}

// ---- the shared kind: a machine without weft, and a killed agent ----------

#[test]
fn an_outside_machine_reaches_sandboxes_on_every_host_through_the_exposing_host_even_after_sigkill()
{
    let mut lab = TestLab::up_shared(3, 60);
    let a = echo_server(&lab, 0, "a", &[]);
    let b = echo_server(&lab, 1, "b", &[]);
    let c = echo_server(&lab, 2, "c", &[]);
    let h1 = weft_lab::host_ip(1);
    let out = Outside::new(&lab, 201, "10.40.0.0/16", h1);
    // Before: h1 forwards it untranslated, and h2 answers the outside
    // machine straight from the sandbox's address (on this one LAN that
    // arrives; through any reverse-path filter or stateful firewall on the
    // way it would not): the sandbox sees the outside machine's address.
    assert_eq!(
        tcp_says(|cmd: &str| out.sh(cmd), b, 5),
        format!("tcp {}", out.ip)
    );

    let e = expose(&lab, 0, &[NET]).ip;
    for (to, on) in [(a, "h1"), (b, "h2"), (c, "h3")] {
        wait_for(&lab, 10, &format!("outside to ping {to} on {on}"), || {
            out.ping(to)
        });
        // Translated on h1 to its exposed address; replies find their way back.
        assert_eq!(
            tcp_says(|cmd: &str| out.sh(cmd), to, 5),
            format!("tcp {e}"),
            "TCP to {to} on {on}"
        );
    }
    let links_before = links(&lab, 0);
    let records_before = endpoint_records(&lab);

    lab.stop_agent(0, libc::SIGKILL).unwrap();
    // The kernel keeps it while no agent runs.
    assert!(out.ping(b), "outside lost {b} while h1's agent was down");
    // Deleted behind weft's back while no agent runs: the next one makes it.
    let wex = expose_links(&lab, 0)
        .into_iter()
        .find(|l| l.starts_with("wex-"))
        .expect("the wex- link");
    let del = lab.sh(0, &format!("ip link del {wex}"));
    assert!(del.status.success(), "{}", text(&del));
    assert!(expose_links(&lab, 0).is_empty());
    lab.start_agent(0).unwrap();
    wait_for(&lab, 10, "h1's agent to answer", || {
        lab.weft(0, &["status"])
            .status
            .code()
            .is_some_and(|c| c <= 1)
    });
    let s = lab.status(0);
    assert_eq!(
        s.exposed
            .iter()
            .map(|x| (x.network.as_str(), x.ip))
            .collect::<Vec<_>>(),
        vec![(NET, e)],
        "same address after the restart"
    );
    for (to, on) in [(a, "h1"), (b, "h2"), (c, "h3")] {
        assert!(out.ping(to), "outside to {to} on {on} after the restart");
        assert_eq!(
            tcp_says(|cmd: &str| out.sh(cmd), to, 5),
            format!("tcp {e}"),
            "TCP to {to} on {on} after the restart"
        );
    }
    // No duplicate link, nothing leaked, the same records.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(expose_links(&lab, 0).len(), 2, "{:?}", links(&lab, 0));
    assert_eq!(links(&lab, 0), links_before);
    assert_eq!(endpoint_records(&lab), records_before);
    // A new sandbox after the restart does not get the exposed address.
    let d = echo_server(&lab, 0, "d", &[]);
    assert_ne!(d, e);
    // Once h1 hides the network, it no longer translates.
    lab.weft_ok(0, &["hide", NET]);
    assert_eq!(
        tcp_says(|cmd: &str| out.sh(cmd), b, 5),
        format!("tcp {}", out.ip)
    );
    println!(
        "outside machine at {} reached a, b, c through h1 as {e}",
        out.ip
    );
}

// ---- the per-host kind -----------------------------------------------------

#[test]
fn per_host_expose_lets_an_outside_machine_reach_sandboxes_on_two_hosts() {
    let lab = TestLab::up(3, None, 60);
    let a = echo_server(&lab, 0, "a", &[]);
    let b = echo_server(&lab, 1, "b", &[]);
    let gw = lab.network(0, NET).gateway;
    assert!(lab.subnet(0).contains(&gw));
    let out = Outside::new(&lab, 202, "10.40.0.0/16", weft_lab::host_ip(1));
    // Without expose, h2 answers the outside machine itself, around h1.
    assert_eq!(
        tcp_says(|cmd: &str| out.sh(cmd), b, 5),
        format!("tcp {}", out.ip)
    );

    // --ip other than the gateway cannot be: say why.
    let bad = lab.weft(0, &["expose", NET, "--ip", "10.40.200.9"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains(&format!("its gateway {gw}")),
        "{}",
        text(&bad)
    );
    let v = expose(&lab, 0, &[NET]);
    assert_eq!((v.ip, v.kind.as_str(), v.default), (gw, "per-host", false));
    assert!(expose_links(&lab, 0).is_empty(), "no link of its own");
    for (to, on) in [(a, "h1"), (b, "h2")] {
        wait_for(&lab, 10, &format!("outside to ping {to} on {on}"), || {
            out.ping(to)
        });
        assert_eq!(
            tcp_says(|cmd: &str| out.sh(cmd), to, 5),
            format!("tcp {gw}"),
            "TCP to {to} on {on}"
        );
    }
    assert!(lab.status(0).exposed.iter().any(|x| x.ip == gw));
    wait_for(&lab, 10, "h2 to show h1 exposing", || {
        lab.network(1, NET)
            .exposed
            .iter()
            .any(|x| x.node == "h1" && x.ip == gw)
    });
    let hidden = lab.weft_ok(0, &["hide", NET]);
    assert!(hidden.contains(&format!("{NET} hidden")), "{hidden}");
    assert!(expose_elements(&lab, 0).is_empty(), "{}", table(&lab, 0));
    assert_eq!(
        tcp_says(|cmd: &str| out.sh(cmd), b, 5),
        format!("tcp {}", out.ip),
        "untranslated again after hide"
    );
}

/// A per-host network rebuilt on a new subnet (this host's old one was
/// taken while its agent was down) stays exposed, on its new gateway.
#[test]
fn a_per_host_network_rebuilt_on_a_new_subnet_stays_exposed() {
    let mut lab = TestLab::up(2, None, 60);
    let old = lab.subnet(0);
    let v = expose(&lab, 0, &[NET]);
    assert_eq!(v.ip, lab.network(0, NET).gateway);
    lab.stop_agent(0, libc::SIGKILL).unwrap();
    // Someone else holds h1's subnet now.
    let key = format!(
        "/weft/leases/{NET}/{}",
        weft_model::overlay::subnet_key(&old)
    );
    let mut lease: serde_json::Value = serde_json::from_str(
        lab.etcdctl_admin(&["get", "--print-value-only", &key])
            .trim(),
    )
    .expect("h1's lease");
    lease["host_id"] = "squatter".into();
    lease["node"] = "squatter".into();
    lease["public_ip"] = "198.51.100.99".into();
    lease["signed"] = serde_json::Value::Null;
    lab.etcdctl_admin(&["put", &key, &lease.to_string()]);
    lab.start_agent(0).unwrap();
    let mut new = old;
    lab.wait(
        Duration::from_secs(20),
        "h1 to lease another subnet",
        || {
            new = lab.subnet(0);
            new != old
        },
    );
    let gw = lab.network(0, NET).gateway;
    assert!(new.contains(&gw));
    lab.wait(
        Duration::from_secs(10),
        "h1 exposed on its new gateway",
        || lab.status(0).exposed.iter().any(|x| x.ip == gw) && !expose_elements(&lab, 0).is_empty(),
    );
    let hidden = lab.weft_ok(0, &["hide", NET]);
    assert!(hidden.contains(&format!("{NET} hidden")), "{hidden}");
}

// ---- local networks --------------------------------------------------------

#[test]
fn a_local_bridge_network_is_exposed_by_default_and_macvlan_cannot_be() {
    let lab = TestLab::up_shared(1, 60);
    let said = lab.weft_ok(0, &["expose", "bridge"]);
    assert!(said.contains("exposed by default"), "{said}");
    let v = expose(&lab, 0, &["bridge"]);
    let gw = lab.network(0, "bridge").gateway;
    assert_eq!((v.ip, v.default, v.kind.as_str()), (gw, true, "bridge"));
    let hide = lab.weft(0, &["hide", "bridge"]);
    assert!(!hide.status.success());
    assert!(
        stderr(&hide).contains("cannot be hidden"),
        "{}",
        text(&hide)
    );
    let inspect = lab.network(0, "bridge");
    assert_eq!(inspect.exposed.len(), 1, "{:?}", inspect.exposed);
    assert_eq!(inspect.exposed[0].ip, gw);

    let mk = lab.weft(
        0,
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "--subnet",
            "198.51.100.0/24",
            "--gateway",
            "198.51.100.1",
            "-o",
            "parent=eth0",
            "mv",
        ],
    );
    assert!(mk.status.success(), "{}", text(&mk));
    let out = lab.weft(0, &["expose", "mv"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nothing to expose"), "{}", text(&out));
    assert!(lab.status(0).exposed.is_empty());
}

// ---- bad inputs --------------------------------------------------------------

#[test]
fn bad_exposes_are_refused_each_with_a_clear_error_and_nothing_is_made() {
    let lab = TestLab::up_shared(3, 60);
    let a = echo_server(&lab, 0, "a", &[]);
    let b = echo_server(&lab, 1, "b", &[]);
    wait_for(&lab, 10, "h1 to know b's record", || {
        endpoint_records(&lab)
            .iter()
            .any(|l| l.ends_with(&format!("/{b}")))
    });
    std::thread::sleep(Duration::from_millis(500));
    let links_before = links(&lab, 0);
    let records_before = endpoint_records(&lab);
    let table_before = table(&lab, 0);
    let (a_s, b_s) = (a.to_string(), b.to_string());
    for (args, says) in [
        (
            &["expose", "nosuch"][..],
            &["no network named \"nosuch\""][..],
        ),
        (
            &["hide", NET][..],
            &["not exposed on this host", "weft expose lab"][..],
        ),
        (
            &["expose", NET, "--ip", "10.99.0.5"][..],
            &["10.99.0.5 is not a host address", "10.40.0.0/16"][..],
        ),
        (&["expose", NET, "--ip", "10.40.0.1"][..], &["gateway"][..]),
        (
            &["expose", NET, "--ip", &a_s][..],
            &["taken by sandbox a"][..],
        ),
        (&["expose", NET, "--ip", &b_s][..], &["taken by", "h2"][..]),
    ] {
        let out = lab.weft(0, args);
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out));
        for s in says {
            assert!(
                stderr(&out).contains(s),
                "{args:?}: {s:?} not in {}",
                text(&out)
            );
        }
        assert_eq!(links(&lab, 0), links_before, "{args:?} left a link");
        assert_eq!(table(&lab, 0), table_before, "{args:?} changed the table");
        assert_eq!(
            endpoint_records(&lab),
            records_before,
            "{args:?} changed etcd"
        );
        assert!(lab.status(0).exposed.is_empty(), "{args:?}");
    }
    // Twice: the second is refused, naming the first.
    let e = expose(&lab, 0, &[NET]).ip;
    let links_exposed = links(&lab, 0);
    let twice = lab.weft(0, &["expose", NET]);
    assert!(!twice.status.success());
    assert!(
        stderr(&twice).contains(&format!("already exposed on this host as {e}/16")),
        "{}",
        text(&twice)
    );
    assert_eq!(links(&lab, 0), links_exposed);
    assert_eq!(expose_links(&lab, 0).len(), 2);
    // And a sandbox of another host cannot take the exposed address
    // (once its record is in etcd: h1 publishes it after `expose` returns).
    let suffix = format!("/{e}");
    wait_for(&lab, 10, "h1 to publish the exposed address", || {
        endpoint_records(&lab).iter().any(|k| k.ends_with(&suffix))
    });
    let taken = lab.weft(
        1,
        &[
            "run",
            "-d",
            "--name",
            "x",
            "--net",
            NET,
            "--ip",
            &e.to_string(),
            "--",
            "sleep",
            "1d",
        ],
    );
    assert!(!taken.status.success(), "{}", text(&taken));
    assert!(stderr(&taken).contains("taken by"), "{}", text(&taken));
    lab.weft_ok(0, &["hide", NET]);
    assert_eq!(links(&lab, 0), links_before);
    assert!(expose_elements(&lab, 0).is_empty());

    // The network leaving the host takes its exposure along.
    expose(&lab, 0, &[NET]);
    lab.weft_ok(0, &["network", "rm", "-f", NET]);
    wait_for(&lab, 10, "lab to leave h1", || {
        !lab.weft(0, &["network", "inspect", NET]).status.success()
    });
    assert!(expose_links(&lab, 0).is_empty(), "{:?}", links(&lab, 0));
    assert!(lab.status(0).exposed.is_empty());
    assert!(expose_elements(&lab, 0).is_empty(), "{}", table(&lab, 0));
}

// ---- reset ---------------------------------------------------------------------

#[test]
fn reset_removes_the_exposed_addresss_link() {
    let mut lab = TestLab::up_shared(1, 60);
    expose(&lab, 0, &[NET]);
    assert_eq!(expose_links(&lab, 0).len(), 2);
    lab.stop_agent(0, libc::SIGTERM).unwrap();
    // Stopping the agent leaves it (traffic keeps flowing).
    assert_eq!(expose_links(&lab, 0).len(), 2);
    let data = lab.data_dir(0).display().to_string();
    let out = lab.weft(0, &["reset", "-f", "--data-dir", &data]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("link wex-"), "{}", text(&out));
    assert!(expose_links(&lab, 0).is_empty(), "{:?}", links(&lab, 0));
}
