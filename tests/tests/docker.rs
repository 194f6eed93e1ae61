//! Debian's docker.io (dockerd 20.10) with weft as its network and IPAM
//! driver: a Docker network on a weft network, two containers that reach
//! each other by address and by name, a published port reached from the
//! host and from outside, connect and disconnect (with weft's IPAM, next to
//! a sandbox of weft's own), and all of it again after the agent and then
//! dockerd restart. At the end nothing of Docker's or weft's is left.
//!
//! How dockerd is kept off the machine: see weft_e2e::docker, where the
//! test's dockerd lives (tests/src/docker.rs).
//!
//! Found on the way: Docker's embedded resolver (127.0.0.11) answers for
//! containers on a remote driver's network too, so names work without
//! weft's resolver; `--dns <gateway>` makes it forward other names to weft's,
//! which knows weft's sandboxes. `docker port` and `docker ps` show no ports
//! for a remote driver (dockerd reads them only from its own drivers' data),
//! so the test reads the published ports from weft and nft.

use std::time::Duration;
use weft_e2e::docker::{Dockerd, IMAGE};
use weft_e2e::{eventually, text, Netns, TestHost};
use weft_testkit::ScratchDir;

/// weft's Docker endpoints: (endpoint id, address).
fn docker_endpoints(h: &TestHost) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = h
        .ps()
        .iter()
        .filter(|s| s.command.first().is_some_and(|c| c == "docker"))
        .map(|s| {
            (
                s.command.get(1).cloned().unwrap_or_default(),
                s.attachment
                    .endpoints()
                    .first()
                    .map(|e| e.ip.to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

/// An HTTP GET with busybox from a namespace; the body, or "" on failure.
fn get_from(ns: &Netns, url: &str) -> String {
    let out = ns.try_sh(&format!("timeout 5 busybox wget -q -O - {url}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An HTTP GET from inside a container (`timeout`: busybox 1.35's `wget -T` segfaults).
fn get_in(d: &Dockerd, container: &str, target: &str) -> String {
    let out = d.exec(
        container,
        &format!("timeout 5 wget -q -O - http://{target}/"),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
        + &if out.status.success() {
            String::new()
        } else {
            format!(" [{}]", text(&out))
        }
}

fn ping_ok(d: &Dockerd, from: &str, target: &str) {
    d.exec_ok(from, &format!("ping -c 1 -W 2 {target}"));
}

fn published(h: &TestHost) -> String {
    h.ns.sh("nft list map inet weft port_any")
}

/// The reach of one network: by address, by name both ways, the web page,
/// and the published port from the host and from outside.
fn check_reach(d: &Dockerd, h: &TestHost, outside: &Netns, web_ip: &str) {
    ping_ok(d, "client", web_ip);
    ping_ok(d, "client", "web");
    ping_ok(d, "web", "client");
    assert_eq!(get_in(d, "client", "web"), "hello from web");
    eventually(
        "published port from the host",
        Duration::from_secs(10),
        || match get_from(&h.ns, "http://203.0.113.1:18080/").as_str() {
            "hello from web" => Ok(()),
            got => Err(format!("{got:?}; {}", published(h))),
        },
    );
    assert_eq!(
        get_from(&h.ns, "http://127.0.0.1:18080/"),
        "hello from web",
        "published port on the host's loopback"
    );
    assert_eq!(
        get_from(outside, "http://203.0.113.1:18080/"),
        "hello from web",
        "published port from outside"
    );
}

#[test]
fn docker_containers_on_a_weft_network() {
    // Declared first, so that it goes last.
    let scratch = ScratchDir::new("wftd");
    let plugin = scratch.path().join("weft.sock");
    let mut h = TestHost::with_agent_args(
        Some("10.191.0.0/16"),
        &["--docker-plugin-socket", &plugin.display().to_string()],
    );
    let outside = h.outside();
    // A weft network made beforehand, with a sandbox of weft's own on it.
    h.weft_ok(&["network", "create", "--subnet", "10.193.0.0/24", "wpre"]);
    let www = scratch.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from wapi\n").unwrap();
    h.run_detached(
        "wapi",
        &["--net", "wpre"],
        &[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            &www.display().to_string(),
        ],
    );
    let wapi_ip = h.ip_of("wapi");

    let mut d = Dockerd::new(&h.ns.path(), &plugin);
    // The agent asks this dockerd for its containers' names.
    h.agent_args.extend([
        "--docker-host".into(),
        format!("unix://{}", d.sock().display()),
    ]);
    h.kill_agent(libc::SIGTERM);
    h.start_agent();
    d.start();
    d.import_image();

    // Errors come back with weft's words: the IPAM driver's under `Error`,
    // the network driver's under `Err`.
    let e = d.refuses("network create -d weft --ipam-driver weft --ipv6 bad6");
    assert!(e.contains("weft networks are IPv4 only"), "{e}");
    let e = d.refuses("network create -d weft -o weft.network=wpre --subnet 10.194.0.0/24 badsub");
    assert!(
        e.contains("weft network wpre has subnet 10.193.0.0/24"),
        "{e}"
    );

    // A Docker network that makes its weft network (Docker's own IPAM) …
    d.run("network create -d weft -o weft.network=wnet --subnet 10.192.0.0/24 dnet");
    let wnet = h.network("wnet");
    assert_eq!(wnet.subnet.to_string(), "10.192.0.0/24", "{wnet:?}");
    assert_eq!(wnet.gateway.to_string(), "10.192.0.1", "{wnet:?}");
    assert_eq!(
        wnet.labels.get("com.docker.network.id").map(String::as_str),
        Some(d.inspect("dnet", "{{.Id}}").as_str())
    );
    // … and one on the weft network that exists, with weft's IPAM.
    d.run("network create -d weft --ipam-driver weft --subnet 10.193.0.0/24 -o weft.network=wpre dpre");

    d.run_server(
        "web",
        &["--network", "dnet", "-p", "18080:80", "--restart", "always"],
    );
    d.run_server("client", &["--network", "dnet"]);
    let (web_ip, web_ep) = d.endpoint("web", "dnet");
    let (client_ip, client_ep) = d.endpoint("client", "dnet");
    for ip in [&web_ip, &client_ip] {
        assert!(ip.starts_with("10.192.0."), "{ip}");
    }
    // Docker's view and weft's agree: one weft sandbox record per endpoint.
    assert_eq!(
        docker_endpoints(&h),
        sorted(vec![
            (web_ep.clone(), web_ip.clone()),
            (client_ep.clone(), client_ip.clone())
        ]),
        "weft ps: {:?}",
        h.ps()
    );
    // Docker's embedded resolver answers for the containers' names.
    let resolv = d.exec_ok("client", "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    let route = d.exec_ok("client", "ip -4 route");
    assert!(route.contains("default via 10.192.0.1"), "{route}");
    let mac = d.exec_ok("client", "cat /sys/class/net/eth0/address");
    let o: Vec<u8> = client_ip.split('.').map(|b| b.parse().unwrap()).collect();
    assert_eq!(
        mac.trim(),
        format!("02:77:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]),
        "the MAC follows the address, as for weft's sandboxes"
    );
    check_reach(&d, &h, &outside, &web_ip);
    assert!(published(&h).contains(&format!("tcp . 18080 : {web_ip} . 80")));
    // Docker does not tell a driver its container's name; weft asks dockerd
    // and records it (and Docker's aliases) with the endpoint, so weft's
    // resolver answers it too (asked directly here, not through 127.0.0.11).
    eventually(
        "the containers' names in weft",
        Duration::from_secs(10),
        || {
            let names: Vec<(String, Vec<String>)> = h
                .network("wnet")
                .endpoints
                .into_iter()
                .map(|e| (e.sandbox_id, e.aliases))
                .collect();
            let has = |ep: &str, name: &str| {
                names
                    .iter()
                    .any(|(id, a)| id == ep && a.iter().any(|n| n == name))
            };
            if has(&web_ep, "web") && has(&client_ep, "client") {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        },
    );
    let answer = d.exec_ok("client", "nslookup web 10.192.0.1");
    assert!(answer.contains(&web_ip), "weft's resolver: {answer}");
    let status = h.weft_ok(&["status"]);
    let line = format!("dockerd: {} answers", d.sock().display());
    assert!(status.contains(&line), "{status}");

    // `-p 80`: weft picks the host port, from Docker's ephemeral range.
    d.run_server("eph", &["--network", "dnet", "-p", "80"]);
    let (_, eph_ep) = d.endpoint("eph", "dnet");
    let port = h.weft_ok(&["port", &format!("docker-{}", &eph_ep[..12])]);
    // 80/tcp -> 0.0.0.0:PORT (ADDRESS:80)
    let host_port: u16 = port
        .split("0.0.0.0:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("weft port: {port:?}"));
    assert!((49153..=60999).contains(&host_port), "{port}");
    eventually(
        "the chosen host port",
        Duration::from_secs(10),
        || match get_from(&h.ns, &format!("http://203.0.113.1:{host_port}/")).as_str() {
            "hello from eph" => Ok(()),
            got => Err(got.to_string()),
        },
    );
    d.ok(&["rm", "-f", "eph"]);
    assert!(!published(&h).contains(&host_port.to_string()));

    // Connect to the network weft's sandbox is on: weft's IPAM gives an
    // address next to wapi's, never wapi's.
    d.ok(&["network", "connect", "dpre", "client"]);
    let (pre_ip, pre_ep) = d.endpoint("client", "dpre");
    assert!(
        pre_ip.starts_with("10.193.0.") && pre_ip != wapi_ip,
        "{pre_ip}"
    );
    let addrs = d.exec_ok("client", "ip -4 -o addr");
    assert!(addrs.contains(&format!("{pre_ip}/24")), "{addrs}");
    assert_eq!(get_in(&d, "client", &wapi_ip), "hello from wapi");
    assert!(docker_endpoints(&h).contains(&(pre_ep.clone(), pre_ip.clone())));
    // With --dns on the gateway Docker forwards what it does not know to
    // weft's resolver, which knows weft's sandboxes.
    let out = d.ok(&[
        "run",
        "--rm",
        "--network",
        "dpre",
        "--dns",
        "10.193.0.1",
        IMAGE,
        "sh",
        "-c",
        "timeout 5 wget -q -O - http://wapi/",
    ]);
    assert_eq!(out, "hello from wapi");
    d.ok(&["network", "disconnect", "dpre", "client"]);
    let addrs = d.exec_ok("client", "ip -4 -o addr");
    assert!(!addrs.contains("10.193.0."), "{addrs}");
    let wpre = h.network("wpre");
    let on_wpre: Vec<&str> = wpre.endpoints.iter().map(|e| e.sandbox.as_str()).collect();
    assert_eq!(on_wpre, vec!["wapi"], "{wpre:?}");

    // The agent killed and restarted: the kernel was not touched, and the
    // restarted agent knows every endpoint and port.
    h.kill_agent(libc::SIGKILL);
    check_reach(&d, &h, &outside, &web_ip);
    h.start_agent();
    assert_eq!(
        docker_endpoints(&h),
        sorted(vec![
            (web_ep.clone(), web_ip.clone()),
            (client_ep.clone(), client_ip.clone())
        ])
    );
    check_reach(&d, &h, &outside, &web_ip);
    // Docker's next requests go to the restarted agent.
    d.ok(&["stop", "-t", "1", "client"]);
    assert_eq!(docker_endpoints(&h), vec![(web_ep.clone(), web_ip.clone())]);
    d.ok(&["start", "client"]);
    check_reach(&d, &h, &outside, &web_ip);

    // dockerd restarted: it stops its containers on the way down (weft
    // removes their endpoints and ports), keeps its networks, and on the way
    // up restarts `web` (--restart always) through weft.
    d.stop();
    assert_eq!(docker_endpoints(&h), vec![]);
    assert!(!published(&h).contains("18080"));
    d.start();
    let nets = d.run("network ls --filter driver=weft --format {{.Name}}");
    let mut nets: Vec<&str> = nets.lines().collect();
    nets.sort();
    assert_eq!(nets, vec!["dnet", "dpre"]);
    eventually(
        "web restarted with dockerd",
        Duration::from_secs(30),
        || match docker_endpoints(&h).len() {
            1 => Ok(()),
            n => Err(format!("{n} endpoints: {:?}", h.ps())),
        },
    );
    d.ok(&["start", "client"]);
    let (web_ip, _) = d.endpoint("web", "dnet");
    check_reach(&d, &h, &outside, &web_ip);

    // stop, rm, network rm.
    d.ok(&["stop", "-t", "1", "web"]);
    assert_eq!(docker_endpoints(&h).len(), 1);
    assert!(!published(&h).contains("18080"));
    d.ok(&["rm", "-f", "web", "client"]);
    assert_eq!(docker_endpoints(&h), vec![]);
    d.ok(&["network", "rm", "dnet", "dpre"]);
    let nets: Vec<String> = h.networks().into_iter().map(|n| n.name).collect();
    assert_eq!(
        nets,
        vec!["bridge", "wpre"],
        "the network made for Docker went with it; wpre was weft's"
    );

    // Nothing is left: no process, mount, cgroup or /run directory of
    // Docker's; no record, veth or port of the Docker endpoints in weft.
    let forced = d.clean();
    assert!(forced.is_empty(), "left behind by dockerd: {forced:?}");
    assert!(!d.dir.exists());
    let records = h.state_files("store");
    assert_eq!(records.len(), 1, "only wapi's record is left: {records:?}");
    let wapi_veth = h.sandbox_veths();
    assert_eq!(wapi_veth.len(), 1, "{wapi_veth:?}");
    assert!(
        !published(&h).contains("elements"),
        "no published port: {}",
        published(&h)
    );
    h.weft_ok(&["rm", "-f", "wapi"]);
    h.weft_ok(&["network", "rm", "wpre"]);
    // The plugin socket goes with the agent.
    h.kill_agent(libc::SIGTERM);
    assert!(!plugin.exists(), "{} is left", plugin.display());
}
