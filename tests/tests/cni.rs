//! The CNI plugin, driven as a runtime drives it: `weft` run with CNI_*
//! variables and the network config on stdin, into `ip netns add`
//! namespaces, over the spec versions weft returns.

use std::io::Write;
use std::process::{Output, Stdio};
use weft_e2e::{text, weft_bin, Netns, TestHost};

fn conf(h: &TestHost, version: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "cniVersion": version,
        "name": "cninet",
        "type": "weft",
        "stateDir": h.state_dir(),
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    c
}

/// Runs the plugin in the host's namespace, as a runtime on that host would.
fn cni(
    h: &TestHost,
    command: &str,
    container: &str,
    netns: &str,
    conf: &serde_json::Value,
) -> Output {
    let mut child =
        h.ns.command(weft_bin())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weft as CNI plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("not JSON: {}", text(out)))
}

#[test]
fn add_check_del_over_spec_versions() {
    let h = TestHost::new(Some("10.181.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.182.0.0/24", "cninet"]);
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let c = Netns::new("wftc");
        let netns = c.path().display().to_string();
        let id = format!("ctr{i}{}", "0".repeat(20));
        let out = cni(
            &h,
            "ADD",
            &id,
            &netns,
            &conf(&h, version, serde_json::json!({})),
        );
        assert!(out.status.success(), "{version} ADD: {}", text(&out));
        let res = json_of(&out);
        assert_eq!(res["cniVersion"], *version);
        let addr = res["ips"][0]["address"].as_str().unwrap().to_string();
        assert!(
            addr.starts_with("10.182.0.") && addr.ends_with("/24"),
            "{res}"
        );
        assert_eq!(
            res["ips"][0].get("version").is_some(),
            version.starts_with("0."),
            "{res}"
        );
        assert_eq!(res["routes"][0]["gw"], "10.182.0.1");
        assert_eq!(res["dns"]["nameservers"][0], "10.182.0.1");
        let ip = addr.split('/').next().unwrap();
        // Really there: address inside, gateway reachable, host reaches it.
        c.sh("ping -c 1 -W 2 10.182.0.1");
        h.ns.sh(&format!("ping -c 1 -W 2 {ip}"));
        // A repeated ADD gets the same answer.
        let again = json_of(&cni(
            &h,
            "ADD",
            &id,
            &netns,
            &conf(&h, version, serde_json::json!({})),
        ));
        assert_eq!(again["ips"][0]["address"], addr.as_str());
        // CHECK with the result as prevResult.
        let out = cni(
            &h,
            "CHECK",
            &id,
            &netns,
            &conf(&h, version, serde_json::json!({ "prevResult": res })),
        );
        assert!(out.status.success(), "{version} CHECK: {}", text(&out));
        // DEL, twice (idempotent), the second after the namespace is gone.
        let veths = h.sandbox_veths();
        assert_eq!(veths.len(), 1, "{veths:?}");
        let out = cni(
            &h,
            "DEL",
            &id,
            &netns,
            &conf(&h, version, serde_json::json!({})),
        );
        assert!(out.status.success(), "{version} DEL: {}", text(&out));
        assert!(h.sandbox_veths().is_empty());
        drop(c);
        let out = cni(
            &h,
            "DEL",
            &id,
            &netns,
            &conf(&h, version, serde_json::json!({})),
        );
        assert!(out.status.success(), "{version} second DEL: {}", text(&out));
        let out = cni(
            &h,
            "CHECK",
            &id,
            &netns,
            &conf(&h, version, serde_json::json!({})),
        );
        assert!(!out.status.success(), "CHECK after DEL must fail");
    }
    assert_eq!(h.ps().len(), 0);
}

#[test]
fn capabilities_ports_ips_mac_aliases() {
    let h = TestHost::new(Some("10.183.0.0/16"));
    h.weft_ok(&["network", "create", "--subnet", "10.184.0.0/24", "cninet"]);
    let (a, b) = (Netns::new("wftc"), Netns::new("wftc"));
    let rc = serde_json::json!({ "runtimeConfig": {
        "portMappings": [{ "hostPort": 8088, "containerPort": 80, "protocol": "tcp" }],
        "ips": ["10.184.0.77/24"],
        "mac": "02:42:0a:b8:00:4d",
        "aliases": { "cninet": ["webapp"] },
    }});
    let out = cni(
        &h,
        "ADD",
        "aaaa",
        &a.path().display().to_string(),
        &conf(&h, "1.1.0", rc),
    );
    assert!(out.status.success(), "{}", text(&out));
    let res = json_of(&out);
    assert_eq!(res["ips"][0]["address"], "10.184.0.77/24");
    assert_eq!(res["interfaces"][1]["mac"], "02:42:0a:b8:00:4d");
    assert!(a.sh("ip -o link show eth0").contains("02:42:0a:b8:00:4d"));
    let mut server = a
        .command("socat")
        .args(["TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo cni-web"])
        .spawn()
        .unwrap();
    let out = cni(
        &h,
        "ADD",
        "bbbb",
        &b.path().display().to_string(),
        &conf(&h, "1.1.0", serde_json::json!({})),
    );
    assert!(out.status.success(), "{}", text(&out));
    // The published port, from the host.
    let mut got = String::new();
    for _ in 0..30 {
        got = String::from_utf8_lossy(
            &h.ns
                .try_sh("socat -T 2 - TCP:127.0.0.1:8088 </dev/null")
                .stdout,
        )
        .into_owned();
        if got.contains("cni-web") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(got.contains("cni-web"), "{got:?}");
    // The alias resolves from the other container through weft's resolver.
    let dig = b.sh("dig +short +time=2 +tries=1 @10.184.0.1 webapp");
    assert_eq!(dig.trim(), "10.184.0.77");
    // GC keeps only what the runtime lists.
    let gc = serde_json::json!({ "cni.dev/valid-attachments": [{ "containerID": "bbbb", "ifname": "eth0" }] });
    let out = cni(&h, "GC", "", "", &conf(&h, "1.1.0", gc));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(h.ps().len(), 1);
    assert!(
        !h.ns.sh("nft list table inet weft").contains("8088"),
        "ports of the collected attachment"
    );
    let out = cni(
        &h,
        "STATUS",
        "",
        "",
        &conf(&h, "1.1.0", serde_json::json!({})),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = cni(
        &h,
        "DEL",
        "bbbb",
        "",
        &conf(&h, "1.1.0", serde_json::json!({})),
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn errors_are_cni_json() {
    let h = TestHost::new(Some("10.185.0.0/16"));
    let c = Netns::new("wftc");
    let netns = c.path().display().to_string();
    let code = |out: &Output| {
        assert!(!out.status.success(), "{}", text(out));
        json_of(out)["code"].as_u64().unwrap()
    };
    let out = cni(
        &h,
        "ADD",
        "x",
        &netns,
        &conf(&h, "9.9.9", serde_json::json!({})),
    );
    assert_eq!(code(&out), 1, "incompatible version");
    let out = cni(
        &h,
        "ADD",
        "x",
        "",
        &conf(&h, "1.0.0", serde_json::json!({})),
    );
    assert_eq!(code(&out), 4, "missing CNI_NETNS");
    let out = cni(
        &h,
        "ADD",
        "x",
        &netns,
        &conf(&h, "1.0.0", serde_json::json!({})),
    );
    assert_eq!(code(&out), 7, "no weft network named cninet");
    assert!(json_of(&out)["msg"]
        .as_str()
        .unwrap()
        .contains("weft network create"));
    let out = cni(
        &h,
        "STATUS",
        "",
        "",
        &conf(
            &h,
            "1.1.0",
            serde_json::json!({ "stateDir": "/nonexistent-wft" }),
        ),
    );
    assert_eq!(code(&out), 50);
    let out = cni(
        &h,
        "VERSION",
        "",
        "",
        &serde_json::json!({ "cniVersion": "1.1.0" }),
    );
    let v = json_of(&out);
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("0.4.0")));
    assert_eq!(h.ps().len(), 0);
}
