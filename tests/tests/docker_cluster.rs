//! Docker across hosts: a lab of two hosts, each with a dockerd of the
//! test's own (weft_e2e::docker) whose network driver is its host's agent
//! (`--docker-plugin-socket`, `--docker-host`). One global network, made
//! once with `weft network create -d overlay --subnet` on h1 (one subnet
//! shared by all hosts), appears in both dockerds by itself; a container
//! on each reaches the other by address and by name (Docker's resolver
//! forwards to weft's, `--dns`, which knows the other host's container by
//! the name the agent read from its dockerd); the network's removal takes
//! it out of both dockerds. A Docker network of the same name as a global
//! network (of the per-host kind) that weft did not make is left alone and
//! shown in `weft status`. At the end nothing of Docker's or weft's is left
//! (the lab and the dockerds clean up on drop, pass or fail).

use std::time::Duration;
use weft_e2e::docker::{Dockerd, IMAGE};
use weft_e2e::eventually;
use weft_e2e::lab::TestLab;

/// The global network the test makes once, and its subnet.
const NET: &str = "dov";
const SUBNET: &str = "10.44.2.0/24";

/// `docker run -d --name NAME --network NET [--dns DNS] IMAGE sleep 1d`.
fn container(d: &Dockerd, name: &str, dns: &str) -> String {
    d.ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        NET,
        "--dns",
        dns,
        IMAGE,
        "sleep",
        "1d",
    ])
}

/// What a dockerd says of network `name`: driver, subnet, gateway, weft's label.
fn docker_network(d: &Dockerd, name: &str) -> Option<String> {
    let out = d.docker(&[
        "network",
        "inspect",
        "-f",
        "{{.Driver}} {{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}} {{.IPAM.Driver}} {{index .Labels \"weft.auto\"}}",
        name,
    ]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn ping(d: &Dockerd, from: &str, to: &str) {
    eventually(
        &format!("{from} pings {to}"),
        Duration::from_secs(10),
        || {
            let out = d.exec(from, &format!("ping -c 1 -W 1 {to}"));
            if out.status.success() {
                Ok(())
            } else {
                Err(weft_e2e::text(&out))
            }
        },
    );
}

#[test]
fn a_global_network_is_usable_by_the_dockerd_of_every_host() {
    let mut lab = TestLab::up_without_network(2);
    // Declared after the lab, so they go first (their agents answer
    // Docker's Leave and DeleteEndpoint on the way down).
    let mut docks: Vec<Dockerd> = Vec::new();
    for i in 0..2 {
        let dir = lab.dir.join(format!("docker-{}", lab.hosts[i].name));
        std::fs::create_dir_all(&dir).unwrap();
        let plugin = dir.join("weft.sock");
        let d = Dockerd::new(&lab.host_netns(i), &plugin);
        let name = lab.hosts[i].name.clone();
        lab.host_agent_args.insert(
            name,
            vec![
                "--docker-plugin-socket".into(),
                plugin.display().to_string(),
                "--docker-host".into(),
                format!("unix://{}", d.sock().display()),
            ],
        );
        lab.stop_agent(i, libc::SIGTERM).unwrap();
        lab.start_agent(i).unwrap();
        docks.push(d);
    }
    for d in &mut docks {
        d.start();
        d.import_image();
    }
    // A Docker network of h2's own, named as the second global network
    // will be: weft leaves it alone.
    docks[1].run("network create -d weft --subnet 10.45.0.0/24 dtaken");

    // Made once, on h1: one subnet shared by all hosts, the same gateway
    // on each.
    lab.weft_ok(
        0,
        &[
            "network", "create", "-d", "overlay", "--subnet", SUBNET, NET,
        ],
    );
    let mut gateways = Vec::new();
    for (i, d) in docks.iter().enumerate() {
        eventually(
            &format!("weft network {NET} on h{}", i + 1),
            Duration::from_secs(20),
            || {
                let out = lab.weft(i, &["--format", "json", "network", "inspect", NET]);
                if !out.status.success() {
                    return Err(weft_e2e::text(&out));
                }
                Ok(())
            },
        );
        let n = lab.network(i, NET);
        assert_eq!(n.subnet.to_string(), SUBNET, "h{}: {n:?}", i + 1);
        gateways.push(n.gateway.to_string());
        let expected = format!("weft {SUBNET} 10.44.2.1 weft 1");
        eventually(
            &format!("Docker network {NET} in h{}'s dockerd", i + 1),
            Duration::from_secs(20),
            || match docker_network(d, NET) {
                Some(got) if got == expected => Ok(()),
                got => Err(format!("{got:?}, want {expected:?}")),
            },
        );
    }

    // A container on each host, on the network nobody made in Docker.
    container(&docks[0], "c1", &gateways[0]);
    container(&docks[1], "c2", &gateways[1]);
    let (c1_ip, c1_ep) = docks[0].endpoint("c1", NET);
    let (c2_ip, c2_ep) = docks[1].endpoint("c2", NET);
    assert_ne!(c1_ip, c2_ip);
    for ip in [&c1_ip, &c2_ip] {
        assert!(ip.starts_with("10.44.2."), "{ip}");
    }
    // By address, across hosts, both ways.
    ping(&docks[0], "c1", &c2_ip);
    ping(&docks[1], "c2", &c1_ip);

    // weft knows each container by its name (Docker does not send it; the
    // agent asks its dockerd), and its resolver answers it.
    for (i, (name, ep, ip)) in [("c1", &c1_ep, &c1_ip), ("c2", &c2_ep, &c2_ip)]
        .into_iter()
        .enumerate()
    {
        eventually(
            &format!("weft's record of {name}'s name on h{}", i + 1),
            Duration::from_secs(10),
            || {
                let eps = lab.network(i, NET).endpoints;
                match eps.iter().find(|e| &e.sandbox_id == ep) {
                    Some(e) if e.aliases.iter().any(|a| a == name) => Ok(()),
                    _ => Err(format!("{eps:?}")),
                }
            },
        );
        let answer = docks[i].exec_ok(name, &format!("nslookup {name} {}", gateways[i]));
        assert!(answer.contains(ip.as_str()), "{answer}");
    }

    // By name, across hosts: Docker's resolver does not know the other
    // dockerd's container and asks weft's (--dns), which does.
    ping(&docks[0], "c1", "c2");
    ping(&docks[1], "c2", "c1");

    // The network weft did not make is left alone, and said so (on a
    // network of the other kind, a /24 leased per host).
    lab.weft_ok(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.46.0.0/16",
            "--host-subnet-len",
            "24",
            "dtaken",
        ],
    );
    eventually(
        "dtaken in h1's dockerd",
        Duration::from_secs(20),
        || match docker_network(&docks[0], "dtaken") {
            Some(got) if got.starts_with("weft 10.46.") && got.ends_with(" 1") => Ok(()),
            got => Err(format!("{got:?}")),
        },
    );
    eventually(
        "h2's status names the Docker network weft did not make",
        Duration::from_secs(20),
        || {
            let s = lab.status(1);
            let found = s
                .problems
                .iter()
                .any(|p| p.contains("a Docker network named dtaken exists that weft did not make"));
            if found && !s.healthy {
                Ok(())
            } else {
                Err(format!("{:?}", s.problems))
            }
        },
    );
    let kept = docker_network(&docks[1], "dtaken").unwrap_or_default();
    assert!(
        kept.starts_with("weft 10.45.0.0/24") && !kept.ends_with(" 1"),
        "{kept}"
    );
    // The plugin's status is written after its pass names the networks.
    lab.wait(
        Duration::from_secs(10),
        "h1's plugin to list dov and dtaken",
        || {
            lab.status(0).docker.is_some_and(|d| {
                d.reachable && d.networks == vec!["dov".to_string(), "dtaken".into()]
            })
        },
    );

    // The network leaves the cluster: it leaves both dockerds, and h2's own
    // dtaken stays.
    docks[0].ok(&["rm", "-f", "c1"]);
    docks[1].ok(&["rm", "-f", "c2"]);
    lab.weft_ok(0, &["network", "rm", NET]);
    lab.weft_ok(0, &["network", "rm", "dtaken"]);
    for (i, d) in docks.iter().enumerate() {
        eventually(
            &format!("the networks gone from h{}'s dockerd", i + 1),
            Duration::from_secs(20),
            || {
                let ls = d.run("network ls --filter label=weft.auto=1 --format {{.Name}}");
                if ls.is_empty() {
                    Ok(())
                } else {
                    Err(ls)
                }
            },
        );
    }
    assert!(docker_network(&docks[1], "dtaken").is_some());
    docks[1].run("network rm dtaken");
    for d in &mut docks {
        let forced = d.clean();
        assert!(forced.is_empty(), "left behind by dockerd: {forced:?}");
    }
}
