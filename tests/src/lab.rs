//! A `weft lab` for a test: simulated hosts with etcd and an agent each,
//! under a directory of the test's own, removed on drop (pass or fail).

use crate::{text, unique, weft_bin};
use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;
use weft_kernel::{Netns, OVERLAY_ROUTE_PROTOCOL};
use weft_lab::{Lab, LabSpec};
use weft_model::api::{NetworkView, SandboxView, StatusView};

pub const ROOT: &str = "/dev/shm/wft-labs";
pub const NET: &str = "lab";

pub struct TestLab {
    pub lab: Lab,
}

impl Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl DerefMut for TestLab {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.lab.hosts.len() {
                let log = std::fs::read_to_string(self.lab.agent_log(i)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!(
                    "--- agent log of h{} (last lines, newest first) ---\n{}",
                    i + 1,
                    tail.join("\n")
                );
            }
        }
        weft_lab::down(&self.lab.dir).expect("lab down");
    }
}

impl TestLab {
    /// A lab of `hosts` hosts with the overlay network `lab` on 10.40.0.0/16
    /// with a /24 per host (flannel's kind; etcd over TLS with client
    /// certificates, the lab's default).
    pub fn up(hosts: usize, backend: Option<&str>, lease_ttl: u64) -> TestLab {
        TestLab::build(hosts, backend, lease_ttl, false, Some(24))
    }

    /// The same with etcd on plain http (`lab up --insecure-etcd`).
    pub fn up_insecure(hosts: usize, backend: Option<&str>) -> TestLab {
        TestLab::build(hosts, backend, 60, true, Some(24))
    }

    /// A lab whose network `lab` is one subnet shared by all hosts
    /// (`-d overlay --subnet 10.40.0.0/16`, the lab's default kind).
    pub fn up_shared(hosts: usize, lease_ttl: u64) -> TestLab {
        TestLab::build(hosts, None, lease_ttl, false, None)
    }

    /// A lab of `hosts` hosts and no network yet (the test makes its own).
    pub fn up_without_network(hosts: usize) -> TestLab {
        TestLab::with_spec(hosts, None, 60, false, None, None)
    }

    fn build(
        hosts: usize,
        backend: Option<&str>,
        lease_ttl: u64,
        insecure: bool,
        host_subnet_len: Option<u8>,
    ) -> TestLab {
        let net = Some((NET.into(), "10.40.0.0/16".parse().unwrap()));
        TestLab::with_spec(hosts, backend, lease_ttl, insecure, net, host_subnet_len)
    }

    fn with_spec(
        hosts: usize,
        backend: Option<&str>,
        lease_ttl: u64,
        insecure: bool,
        network: Option<(String, ipnet::Ipv4Net)>,
        host_subnet_len: Option<u8>,
    ) -> TestLab {
        let spec = LabSpec {
            name: unique("wftl"),
            root: PathBuf::from(ROOT),
            hosts,
            backend: backend.map(String::from),
            network,
            host_subnet_len,
            lease_ttl,
            weft_bin: weft_bin(),
            insecure_etcd: insecure,
        };
        let lab = Lab::up(&spec, &mut |_| {}).unwrap_or_else(|e| panic!("lab up: {e}"));
        TestLab { lab }
    }

    /// `weft ARGS` as host `i`.
    pub fn weft(&self, i: usize, args: &[&str]) -> Output {
        self.lab.weft(i, args).output().expect("run weft")
    }

    pub fn weft_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.weft(i, args);
        assert!(
            out.status.success(),
            "weft {args:?} on h{}: {}",
            i + 1,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `weft run -d --net lab --name NAME -- sleep 1d` on host `i`; returns its address.
    pub fn sandbox(&self, i: usize, name: &str) -> Ipv4Addr {
        self.sandbox_on(i, name, NET)
    }

    pub fn sandbox_on(&self, i: usize, name: &str, net: &str) -> Ipv4Addr {
        let v: SandboxView = self.weft_json(
            i,
            &[
                "run", "-d", "--name", name, "--net", net, "--", "sleep", "1d",
            ],
        );
        v.attachment.endpoints().first().expect("an address").ip
    }

    /// Runs weft as host `i` with `--format json` first and reads its
    /// answer as a `T` (one of weft-model's API types).
    pub fn weft_json<T: serde::de::DeserializeOwned>(&self, i: usize, args: &[&str]) -> T {
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        let out = self.weft_ok(i, &all);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "weft {args:?} on h{} printed no {}: {e}\n{out}",
                i + 1,
                std::any::type_name::<T>()
            )
        })
    }

    /// A shell script inside sandbox `name` on host `i`.
    pub fn exec(&self, i: usize, name: &str, script: &str) -> Output {
        self.weft(i, &["exec", name, "--", "sh", "-c", script])
    }

    pub fn ping(&self, i: usize, from: &str, to: Ipv4Addr) -> bool {
        self.exec(i, from, &format!("ping -c 1 -W 1 {to}"))
            .status
            .success()
    }

    /// etcdctl as the lab's administrator (it must succeed); its stdout.
    pub fn etcdctl_admin(&self, args: &[&str]) -> String {
        let out = self
            .lab
            .etcdctl(0, weft_lab::ADMIN, args)
            .expect("etcdctl")
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `from` reaches `to` within 5 s: one ping a try, for a
    /// path that another host's agent programs by its next pass.
    pub fn reaches(&self, i: usize, from: &str, to: Ipv4Addr) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.ping(i, from, to) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// `weft status` as host `i`: its view whether healthy (exit 0) or
    /// not (exit 1, what the cluster tests wait through).
    pub fn status(&self, i: usize) -> StatusView {
        let out = self.weft(i, &["--format", "json", "status"]);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "weft status on h{}: {}",
            i + 1,
            text(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "weft status on h{} printed no status: {e}\n{}",
                i + 1,
                text(&out)
            )
        })
    }

    /// `weft network inspect NAME` on host `i`.
    pub fn network(&self, i: usize, name: &str) -> NetworkView {
        let mut v: Vec<NetworkView> = self.weft_json(i, &["network", "inspect", name]);
        assert_eq!(v.len(), 1, "network inspect {name} on h{}: {v:?}", i + 1);
        v.remove(0)
    }

    /// Host `i`'s leased subnet of the lab network (an agent just started
    /// may take a moment to join: waits up to 10 s).
    pub fn subnet(&self, i: usize) -> ipnet::Ipv4Net {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status(i);
            let found = s
                .cluster
                .iter()
                .flat_map(|c| c.networks.iter())
                .find(|n| n.name == NET)
                .and_then(|n| n.subnet);
            match found {
                Some(n) => return n,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                None => panic!("host {i} has no subnet of {NET} after 10 s: {s:?}"),
            }
        }
    }

    /// The overlay routes weft programmed in host `i` (destination, gateway).
    pub fn routes(&self, i: usize) -> Vec<(ipnet::Ipv4Net, Option<Ipv4Addr>)> {
        let ns = Netns::open(&self.lab.host_netns(i)).expect("host namespace");
        let mut nl = ns.netlink().expect("netlink");
        nl.routes_of(OVERLAY_ROUTE_PROTOCOL)
            .expect("routes")
            .into_iter()
            .map(|r| (r.dst, r.gateway))
            .collect()
    }

    /// A shell script in host `i`'s namespace (for `ip`, `bridge`, `tcpdump`).
    pub fn sh(&self, i: usize, script: &str) -> Output {
        self.in_netns(&self.lab.host_netns(i), script)
    }

    /// A shell script in the lab's underlay namespace (the switch).
    pub fn sh_underlay(&self, script: &str) -> Output {
        self.in_netns(&self.lab.dir.join("netns/underlay"), script)
    }

    /// A command run in the lab's underlay namespace (the switch).
    pub fn underlay_command(&self, program: &str) -> std::process::Command {
        weft_testkit::command_in(&self.lab.dir.join("netns/underlay"), program)
    }

    fn in_netns(&self, ns: &std::path::Path, script: &str) -> Output {
        weft_testkit::command_in(ns, "sh")
            .args(["-c", script])
            .output()
            .expect("nsenter")
    }

    /// Waits until `cond` holds, polling every 5 ms; returns how long it took.
    pub fn wait(&self, timeout: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
        weft_testkit::eventually_every(what, timeout, Duration::from_millis(5), cond)
    }
}
