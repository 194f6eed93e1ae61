//! Embedded DNS: sandboxes find each other by name on user-defined
//! networks; other names go to the host's upstream servers.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Stdio};
use weft_e2e::{text, Netns, TestHost};

/// A host whose upstream resolvers are a dnsmasq in an "outside" namespace
/// (203.0.113.2) and, listed first, an address nobody answers on (203.0.113.9).
struct Setup {
    h: TestHost,
    _outside: Netns,
    dnsmasq: Child,
    resolv: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        if let Some(dir) = self.resolv.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn setup(subnet: &str) -> Setup {
    let dir = std::path::PathBuf::from(format!("/dev/shm/{}", weft_e2e::unique("wftdns")));
    std::fs::create_dir_all(&dir).unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 203.0.113.9\nnameserver 203.0.113.2\nsearch example.test\n",
    )
    .unwrap();
    let h = TestHost::with_agent_args(Some(subnet), &["--resolv-conf", resolv.to_str().unwrap()]);
    let outside = h.outside();
    let dnsmasq = outside
        .command("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=203.0.113.2",
            "--address=/upstream.test/198.51.100.7",
            // No address: dnsmasq answers NXDOMAIN for this domain.
            "--address=/upstream-none.test/",
            "--pid-file=",
            "--user=root",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    Setup {
        h,
        _outside: outside,
        dnsmasq,
        resolv,
    }
}

/// `dig +short` of a name (or -x address) from inside a sandbox.
fn dig(h: &TestHost, sandbox: &str, args: &str) -> (String, String) {
    let out = h.exec(sandbox, &format!("dig +time=3 +tries=1 {args}"));
    let full = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = full
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_default();
    let short = h.exec(sandbox, &format!("dig +short +time=3 +tries=1 {args}"));
    (
        String::from_utf8_lossy(&short.stdout).trim().to_string(),
        status,
    )
}

#[test]
fn names_aliases_ptr_isolation_and_nxdomain() {
    let s = setup("10.161.0.0/16");
    let h = &s.h;
    h.weft_ok(&["network", "create", "--subnet", "10.162.0.0/24", "app"]);
    h.weft_ok(&["network", "create", "--subnet", "10.163.0.0/24", "other"]);
    h.run_detached("web", &["--net", "app:alias=www"], &["sleep", "infinity"]);
    h.run_detached("client", &["--net", "app"], &["sleep", "infinity"]);
    h.run_detached("hidden", &["--net", "other"], &["sleep", "infinity"]);
    let web = h.ip_of("web");
    let rc = String::from_utf8_lossy(&h.exec("client", "cat /etc/resolv.conf").stdout).into_owned();
    assert!(
        rc.contains("nameserver 10.162.0.1") && rc.contains("search example.test"),
        "{rc}"
    );
    assert_eq!(dig(h, "client", "web").0, web);
    assert_eq!(dig(h, "client", "www").0, web, "alias");
    assert_eq!(dig(h, "client", "WEB").0, web, "case-insensitive");
    assert_eq!(dig(h, "client", &format!("-x {web}")).0, "web.");
    assert_eq!(
        dig(h, "client", "hidden"),
        (String::new(), "NXDOMAIN".into()),
        "other network"
    );
    assert_eq!(dig(h, "client", "nosuchname").1, "NXDOMAIN");
    // connect --alias adds a name on that network.
    h.weft_ok(&["network", "connect", "--alias", "spy", "other", "client"]);
    assert_eq!(
        dig(h, "hidden", "spy").0,
        h.sandbox("client").attachment.endpoints()[1].ip.to_string()
    );
    assert_eq!(
        dig(h, "client", "hidden").0,
        h.ip_of("hidden"),
        "now on both networks"
    );
    // The default bridge uses the host's servers, as Docker does.
    h.run_detached("plain", &[], &["sleep", "infinity"]);
    let rc = String::from_utf8_lossy(&h.exec("plain", "cat /etc/resolv.conf").stdout).into_owned();
    assert!(
        rc.contains("nameserver 203.0.113.9") && rc.contains("nameserver 203.0.113.2"),
        "{rc}"
    );
    // --dns and friends override.
    h.run_detached(
        "custom",
        &[
            "--net",
            "app",
            "--dns",
            "203.0.113.2",
            "--dns-search",
            "corp.test",
            "--dns-option",
            "ndots:3",
        ],
        &["sleep", "infinity"],
    );
    let rc = String::from_utf8_lossy(&h.exec("custom", "cat /etc/resolv.conf").stdout).into_owned();
    assert!(
        rc.contains("nameserver 203.0.113.2")
            && rc.contains("search corp.test")
            && rc.contains("options ndots:3"),
        "{rc}"
    );
    assert!(!rc.contains("10.162.0.1"), "{rc}");
}

#[test]
fn a_name_resolves_right_after_run_and_goes_with_rm() {
    let s = setup("10.164.0.0/16");
    let h = &s.h;
    h.weft_ok(&["network", "create", "--subnet", "10.165.0.0/24", "app"]);
    h.run_detached("client", &["--net", "app"], &["sleep", "infinity"]);
    for i in 0..5 {
        let name = format!("fresh{i}");
        h.run_detached(&name, &["--net", "app"], &["sleep", "infinity"]);
        assert_eq!(
            dig(h, "client", &name).0,
            h.ip_of(&name),
            "right after run -d"
        );
        h.weft_ok(&["rm", "-f", &name]);
        assert_eq!(dig(h, "client", &name).1, "NXDOMAIN", "right after rm");
    }
}

#[test]
fn other_names_go_upstream_with_fallback_and_reload() {
    let s = setup("10.166.0.0/16");
    let h = &s.h;
    h.weft_ok(&["network", "create", "--subnet", "10.167.0.0/24", "app"]);
    h.run_detached("client", &["--net", "app"], &["sleep", "infinity"]);
    // The first upstream never answers: the second one does.
    let t = std::time::Instant::now();
    let (addr, status) = dig(h, "client", "upstream.test");
    assert_eq!(
        (addr.as_str(), status.as_str()),
        ("198.51.100.7", "NOERROR")
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1400),
        "the dead server was tried first"
    );
    // An upstream NXDOMAIN passes through.
    assert_eq!(dig(h, "client", "nothing.upstream-none.test").1, "NXDOMAIN");
    // The host's resolv.conf changes: weft rereads it.
    std::fs::write(&s.resolv, "nameserver 203.0.113.9\n").unwrap();
    assert_eq!(dig(h, "client", "upstream.test").1, "SERVFAIL");
    std::fs::write(&s.resolv, "nameserver 203.0.113.2\n").unwrap();
    let t = std::time::Instant::now();
    assert_eq!(dig(h, "client", "upstream.test").0, "198.51.100.7");
    assert!(
        t.elapsed() < std::time::Duration::from_millis(1400),
        "no dead server any more"
    );
    // Over TCP too.
    assert_eq!(dig(h, "client", "+tcp upstream.test").0, "198.51.100.7");
    assert_eq!(dig(h, "client", "+tcp client").0, h.ip_of("client"));
}

#[test]
fn names_survive_an_agent_restart_and_garbage_does_no_harm() {
    let mut s = setup("10.168.0.0/16");
    s.h.weft_ok(&["network", "create", "--subnet", "10.169.0.0/24", "app"]);
    s.h.run_detached("web", &["--net", "app"], &["sleep", "infinity"]);
    s.h.run_detached("client", &["--net", "app"], &["sleep", "infinity"]);
    let web = s.h.ip_of("web");
    s.h.kill_agent(libc::SIGKILL);
    s.h.start_agent();
    assert_eq!(dig(&s.h, "client", "web").0, web);
    // Malformed queries: short, truncated, random bytes. Then it still answers.
    let out = s.h.exec(
        "client",
        "printf 'x' | socat -T 1 - UDP:10.169.0.1:53; \
         printf '\\022\\064\\001\\000\\000\\001\\000\\000\\000\\000\\000\\000\\003we' | socat -T 1 - UDP:10.169.0.1:53 | od -An -tx1 | head -1; \
         head -c 300 /dev/urandom | socat -T 1 - UDP:10.169.0.1:53 >/dev/null; true",
    );
    let od = String::from_utf8_lossy(&out.stdout).into_owned();
    // FORMERR (a response, rcode 1) with the query's id 0x1234.
    let bytes: Vec<u8> = od
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    assert!(
        bytes.len() >= 4,
        "no answer to the truncated query: {}",
        text(&out)
    );
    assert_eq!(
        (bytes[0], bytes[1], bytes[2] & 0x80, bytes[3] & 0x0f),
        (0x12, 0x34, 0x80, 1),
        "{od}"
    );
    assert_eq!(dig(&s.h, "client", "web").0, web);
}
