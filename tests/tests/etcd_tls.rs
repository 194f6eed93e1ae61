//! etcd over TLS with client certificates (the lab's default): what an
//! agent says when the CA, its certificate or its password is wrong. Each
//! must stop the agent at start with an error naming the endpoint, never
//! leave it retrying in silence.

use std::process::Output;
use std::time::Duration;
use weft_e2e::lab::TestLab;
use weft_e2e::{output_within, text};
use weft_lab::pki::{Pki, Validity};

/// Runs host h1's agent by hand (the lab's own stopped first) with some
/// flags given other values and `extra` flags added; it must end by itself.
fn agent_with(lab: &mut TestLab, replace: &[(&str, String)], extra: &[String]) -> Output {
    lab.stop_agent(0, libc::SIGTERM).unwrap();
    let mut argv = vec!["weft".to_string()];
    argv.extend(lab.agent_args(0));
    for (flag, value) in replace {
        let at = argv
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the lab's agent has no {flag}"));
        argv[at + 1] = value.clone();
    }
    argv.extend(extra.iter().cloned());
    let cmd = lab.lab.exec(0, &argv).unwrap();
    output_within(cmd, Duration::from_secs(20))
}

fn assert_refused(out: &Output, lab: &TestLab, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent kept running: {}",
        text(out)
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("weft: "), "{err}");
    assert!(last.contains(&lab.etcd_url()), "no endpoint in: {last}");
    for n in needles {
        assert!(last.contains(n), "{n:?} missing from: {last}");
    }
}

#[test]
fn a_wrong_ca_stops_the_agent_naming_the_endpoint() {
    let mut lab = TestLab::up(1, Some("host-gw"), 60);
    let other = Pki::create(&lab.dir.join("other-ca"), "other").unwrap();
    let out = agent_with(
        &mut lab,
        &[("--etcd-cafile", other.ca_file().display().to_string())],
        &[],
    );
    assert_refused(
        &out,
        &lab,
        &["etcd's certificate is not trusted", "--etcd-cafile"],
    );
}

#[test]
fn a_client_certificate_etcd_refuses_stops_the_agent_naming_the_endpoint() {
    let mut lab = TestLab::up(1, Some("host-gw"), 60);
    // Signed by a CA etcd does not trust.
    let other = Pki::create(&lab.dir.join("other-ca"), "other").unwrap();
    let stranger = other.issue_client("h1", Validity::Current).unwrap();
    // Signed by the lab's CA, but expired.
    let expired = lab
        .pki()
        .issue_client("h1-expired", Validity::Expired)
        .unwrap();
    for c in [stranger, expired] {
        let out = agent_with(
            &mut lab,
            &[
                ("--etcd-certfile", c.cert.display().to_string()),
                ("--etcd-keyfile", c.key.display().to_string()),
            ],
            &[],
        );
        assert_refused(
            &out,
            &lab,
            &[
                "etcd refused this host's client certificate",
                "--etcd-certfile",
            ],
        );
    }
    // And a host with no client certificate at all.
    let mut argv = lab.agent_args(0);
    let at = argv.iter().position(|a| a == "--etcd-certfile").unwrap();
    argv.drain(at..at + 4);
    lab.stop_agent(0, libc::SIGTERM).unwrap();
    let mut full = vec!["weft".to_string()];
    full.extend(argv);
    let out = output_within(lab.lab.exec(0, &full).unwrap(), Duration::from_secs(20));
    assert_refused(&out, &lab, &["--etcd-certfile"]);
}

#[test]
fn a_bad_password_stops_the_agent_and_a_good_certificate_user_works() {
    let mut lab = TestLab::up(1, Some("host-gw"), 60);
    // etcd's authentication: root (the admin certificate's CN), and h1 with
    // a password, allowed weft's keys only.
    for args in [
        vec!["user", "add", "root:wft-root-pw"],
        vec!["user", "add", "h1:wft-good-pw"],
        vec!["role", "add", "weft"],
        vec![
            "role",
            "grant-permission",
            "weft",
            "--prefix=true",
            "readwrite",
            "/weft/",
        ],
        vec!["user", "grant-role", "h1", "weft"],
        vec!["auth", "enable"],
    ] {
        let out = lab
            .etcdctl(0, weft_lab::ADMIN, &args)
            .unwrap()
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
    }
    let pw = lab.dir.join("h1-password");
    std::fs::write(&pw, "not-the-password\n").unwrap();
    let out = agent_with(
        &mut lab,
        &[],
        &[
            "--etcd-username".into(),
            "h1".into(),
            "--etcd-password-file".into(),
            pw.display().to_string(),
        ],
    );
    assert_refused(
        &out,
        &lab,
        &["etcd refused the credentials", "--etcd-password-file"],
    );
    // The certificate alone makes the agent etcd's user h1 (its CN): it
    // works with authentication on.
    lab.start_agent(0).unwrap();
    lab.wait(Duration::from_secs(5), "h1 to see etcd healthy", || {
        lab.status(0).cluster.is_some_and(|c| c.etcd_healthy)
    });
}

#[test]
fn flags_that_cannot_work_are_refused_with_the_fix() {
    let mut lab = TestLab::up(1, Some("host-gw"), 60);
    let http = lab.etcd_url().replace("https://", "http://");
    let out = agent_with(&mut lab, &[("--etcd-endpoints", http)], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("use https:// URLs"), "{err}");
    let out = agent_with(
        &mut lab,
        &[("--etcd-cafile", "/nonexistent/wft-ca.pem".into())],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--etcd-cafile /nonexistent/wft-ca.pem: cannot read it"),
        "{err}"
    );
    // A node name the certificate does not carry: peers would refuse
    // every lease of this host, so the agent does not start.
    let out = agent_with(&mut lab, &[("--node-name", "wft-other".into())], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--etcd-certfile cannot sign this host's leases")
            && err.contains("\"wft-other\" (--node-name)"),
        "{err}"
    );
}

#[test]
fn an_insecure_lab_works_and_status_warns() {
    let lab = TestLab::up_insecure(2, Some("host-gw"));
    assert!(lab.etcd_url().starts_with("http://"));
    let human = lab.weft_ok(0, &["status"]);
    assert!(human.contains("WARNING: plain http to etcd"), "{human}");
    assert!(lab.status(0).cluster.unwrap().etcd_plaintext);
}

#[test]
fn a_secure_lab_does_not_warn() {
    let lab = TestLab::up(1, Some("host-gw"), 60);
    let human = lab.weft_ok(0, &["status"]);
    assert!(!human.contains("WARNING"), "{human}");
}

/// Every lease of the lab's network as etcd has it: (key, lease).
fn leases(lab: &TestLab, as_host: &str) -> Vec<(String, weft_model::Lease)> {
    let out = lab
        .etcdctl(0, as_host, &["get", "--prefix", "/weft/leases/lab/"])
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = s.lines().collect();
    lines
        .chunks(2)
        .filter_map(|kv| Some((kv[0].to_string(), serde_json::from_str(kv.get(1)?).ok()?)))
        .collect()
}

#[test]
fn a_lease_forged_with_a_hosts_own_credentials_is_refused_by_every_agent() {
    let lab = TestLab::up(3, Some("host-gw"), 60);
    let all = leases(&lab, "h1");
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|(_, l)| l.signed.is_some()), "{all:?}");
    let (key, mut forged) = all.into_iter().find(|(_, l)| l.node == "h2").unwrap();
    let stolen = forged.subnet;
    // h1, with its own etcd credentials, points h2's subnet at itself,
    // keeping h2's certificate and signature (another host id, so that h2
    // does not simply take the key back as its own).
    forged.public_ip = lab.hosts[0].ip;
    forged.host_id = "wft-forged".into();
    let value = serde_json::to_string(&forged).unwrap();
    let out = lab
        .etcdctl(0, "h1", &["put", key.as_str(), value.as_str()])
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // And an unsigned claim on a free subnet in h3's name.
    let free = "10.40.250.0/24".parse().unwrap();
    let unsigned = weft_model::Lease {
        subnet: free,
        host_id: "wft-unsigned".into(),
        node: "h3".into(),
        signed: None,
        ..forged.clone()
    };
    let out = lab
        .etcdctl(
            0,
            "h1",
            &[
                "put",
                "/weft/leases/lab/10.40.250.0-24",
                &serde_json::to_string(&unsigned).unwrap(),
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for i in 0..3 {
        lab.wait(
            Duration::from_secs(5),
            &format!("h{} to refuse both leases", i + 1),
            || {
                let s = lab.status(i);
                let Some(n) = s.cluster.and_then(|c| c.networks.into_iter().next()) else {
                    return false;
                };
                let refused = |subnet: ipnet::Ipv4Net, why: &str| {
                    n.peers.iter().any(|p| {
                        p.subnet == subnet
                            && p.programmed.is_none()
                            && p.problem.as_deref().is_some_and(|e| e.contains(why))
                    })
                };
                refused(stolen, "its signature does not match its content")
                    && refused(free, "not signed")
            },
        );
        // Nothing routes the stolen subnet to h1, nor the unsigned one anywhere.
        assert!(
            !lab.routes(i)
                .iter()
                .any(|(d, via)| (*d == stolen && *via == Some(lab.hosts[0].ip)) || *d == free),
            "h{}: {:?}",
            i + 1,
            lab.routes(i)
        );
    }
    let human = lab.weft(2, &["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("cannot have written it"), "{human}");
}

#[test]
fn a_peers_new_secure_key_shows_in_status() {
    let mut lab = TestLab::up(2, Some("secure"), 60);
    let key_of = |lab: &TestLab| {
        leases(lab, "h1")
            .into_iter()
            .find(|(_, l)| l.node == "h2")
            .and_then(|(_, l)| l.public_key)
            .unwrap()
    };
    let before = key_of(&lab);
    // h2 gets a new key pair: its key file is gone when its agent starts.
    lab.stop_agent(1, libc::SIGTERM).unwrap();
    std::fs::remove_file(lab.data_dir(1).join("secure.key")).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait(Duration::from_secs(10), "h2 to publish its new key", || {
        key_of(&lab) != before
    });
    let after = key_of(&lab);
    lab.wait(Duration::from_secs(5), "h1 to show h2's key change", || {
        lab.status(0).cluster.is_some_and(|c| {
            c.networks[0].peers.iter().any(|p| {
                p.node == "h2"
                    && p.key_change
                        .as_ref()
                        .is_some_and(|k| k.previous == before && k.current == after)
            })
        })
    });
    let human = lab.weft_ok(0, &["status"]);
    assert!(human.contains("KEY CHANGED"), "{human}");
    assert!(human.contains(&before[..12]), "{human}");
}

/// A shared-subnet network: h1, with its own etcd credentials, rewrites
/// h2's sandbox's record to send its traffic to h1 (keeping h2's
/// signature), and posts an unsigned record in h3's name; h3 programs
/// neither (no FDB entry for them, no name) and says why in its status.
#[test]
fn an_endpoint_record_forged_with_a_hosts_own_credentials_is_refused() {
    let lab = TestLab::up_shared(3, 60);
    let b = lab.sandbox(1, "b");
    lab.sandbox(2, "c");
    let key = format!("/weft/endpoints/lab/{b}");
    let read = || {
        lab.etcdctl(0, "h1", &["get", "--print-value-only", key.as_str()])
            .unwrap()
            .output()
            .unwrap()
    };
    // h2 publishes the record of an address it picked after `run` returns.
    lab.wait(Duration::from_secs(10), "h2 to publish b's record", || {
        !read().stdout.is_empty()
    });
    let get = read();
    let mut rec: weft_model::blocks::EndpointRecord =
        serde_json::from_slice(&get.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&get)));
    assert!(rec.signed.is_some(), "h2 signs its records: {rec:?}");
    // Another host id, so that h2 does not simply write its own back.
    rec.public_ip = lab.hosts[0].ip;
    rec.host_id = "wft-forged".into();
    let put = |k: &str, v: &weft_model::blocks::EndpointRecord| {
        let out = lab
            .etcdctl(0, "h1", &["put", k, &serde_json::to_string(v).unwrap()])
            .unwrap()
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    put(&key, &rec);
    let fake: std::net::Ipv4Addr = "10.40.250.9".parse().unwrap();
    let unsigned = weft_model::blocks::EndpointRecord {
        ip: fake,
        node: "h3".into(),
        host_id: "wft-unsigned".into(),
        sandbox: Some("ghost".into()),
        names: vec!["ghost".into()],
        signed: None,
        ..rec.clone()
    };
    put(&format!("/weft/endpoints/lab/{fake}"), &unsigned);
    lab.wait(Duration::from_secs(5), "h3 to refuse both records", || {
        let s = lab.status(2);
        let p = s
            .cluster
            .and_then(|c| c.networks.into_iter().next())
            .and_then(|n| n.problem)
            .unwrap_or_default();
        p.contains(&format!(
            "the record of {b} refused, its signature does not match"
        )) && p.contains(&format!("the record of {fake} is not signed"))
    });
    let fdb =
        String::from_utf8_lossy(&lab.sh(2, "bridge fdb show | grep wvx-").stdout).into_owned();
    let h1 = lab.hosts[0].ip.to_string();
    assert!(
        !fdb.contains(&format!("dst {h1}")),
        "nothing of b's is sent to h1:\n{fdb}"
    );
    assert!(
        !lab.exec(2, "c", "getent hosts ghost").status.success(),
        "the unsigned record's name is not served"
    );
}
