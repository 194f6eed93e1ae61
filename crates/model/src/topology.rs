//! A host's network as a picture: its bridges, the sandboxes on them (by
//! their veths), its tunnel devices and the peers they reach; several
//! hosts (a lab) drawn together, with the path of one `weft explain`
//! highlighted. The agent fills a [`Topology`] from its records checked
//! against the live links; rendering is pure.

use crate::explain::{Explanation, Verdict};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// The host's name in the cluster, or "host".
    pub host: String,
    pub public_ip: Option<Ipv4Addr>,
    pub bridges: Vec<TopoBridge>,
    pub sandboxes: Vec<TopoSandbox>,
    pub tunnels: Vec<TopoTunnel>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopoBridge {
    pub name: String,
    pub network: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The device exists in the kernel now.
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopoSandbox {
    pub name: String,
    pub ip: Ipv4Addr,
    pub network: String,
    /// The veth's host end (None: macvlan).
    pub host_end: Option<String>,
    /// The host end exists and is a port of the network's bridge.
    pub plugged: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopoTunnel {
    /// `wvx-…` (VXLAN) or `wtu-…` (TUN); None for host-gw (plain routes).
    pub device: Option<String>,
    pub backend: String,
    pub network: String,
    /// The bridge of the network on this host.
    pub bridge: Option<String>,
    pub peers: Vec<TopoPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopoPeer {
    pub node: String,
    pub public_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub programmed: bool,
}

fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\\\""))
}

/// Node ids: unique per host.
fn id(host: &str, kind: &str, name: &str) -> String {
    q(&format!("{host}/{kind}/{name}"))
}

/// What a highlighted path touches: interface names, addresses and host
/// names that appear in its hops.
struct Highlight {
    words: BTreeSet<String>,
    dropped: bool,
}

impl Highlight {
    fn of(e: &Explanation) -> Highlight {
        let mut words = BTreeSet::new();
        let mut add = |s: &str| {
            for w in
                s.split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == '(' || c == ')')
            {
                let w = w.trim_end_matches(['.', ':']);
                if !w.is_empty() {
                    words.insert(w.to_string());
                }
            }
        };
        add(&e.src);
        add(&e.dst);
        for h in &e.hops {
            add(&h.at);
            add(&h.what);
        }
        if let Verdict::Delivered { to } = &e.verdict {
            add(to);
        }
        Highlight {
            words,
            dropped: matches!(e.verdict, Verdict::Dropped { .. }),
        }
    }

    fn has(&self, w: &str) -> bool {
        self.words.contains(w)
    }
}

/// The hosts as one Graphviz graph: a frame per host, the underlay
/// joining them, the path of `path` (if any) in bold blue (red when it was
/// dropped).
pub fn render_dot(hosts: &[Topology], path: Option<&Explanation>) -> String {
    let hl = path.map(Highlight::of);
    let on = |w: &str| hl.as_ref().is_some_and(|h| h.has(w));
    let colour = if hl.as_ref().is_some_and(|h| h.dropped) {
        "red"
    } else {
        "blue"
    };
    let style = |lit: bool| {
        if lit {
            format!("color={colour}, penwidth=3")
        } else {
            "color=gray40".to_string()
        }
    };
    let mut out = String::from(
        "graph topology {\n  rankdir=TB;\n  compound=true;\n  node [fontname=\"monospace\", fontsize=10];\n",
    );
    if let Some(e) = path {
        let _ = writeln!(
            out,
            "  label={};\n  labelloc=t;",
            q(&format!(
                "{} -> {} ({}): {}",
                e.src,
                e.dst,
                e.proto,
                match &e.verdict {
                    Verdict::Delivered { .. } => "delivered".to_string(),
                    Verdict::Dropped { hop, .. } => format!("dropped at hop {hop}"),
                }
            ))
        );
    }
    let _ = writeln!(out, "  underlay [label=\"underlay\", shape=box3d];");
    for (n, t) in hosts.iter().enumerate() {
        let host = &t.host;
        // Devices have the same names on every host (they are named after
        // the network): only the hosts the path crosses light theirs.
        let host_on = on(host) || t.public_ip.is_some_and(|ip| on(&ip.to_string()));
        let on = |w: &str| host_on && on(w);
        let _ = writeln!(
            out,
            "  subgraph cluster_{n} {{\n    label={};\n    style=rounded;",
            q(&match t.public_ip {
                Some(ip) => format!("{host} ({ip})"),
                None => host.clone(),
            })
        );
        let eth = id(host, "if", "eth0");
        let _ = writeln!(out, "    {eth} [label=\"underlay interface\", shape=box];");
        for b in &t.bridges {
            let lit = on(&b.name);
            let _ = writeln!(
                out,
                "    {} [label={}, shape=box, style={}, {}];",
                id(host, "br", &b.name),
                q(&format!(
                    "{}\\nnetwork {}\\n{} gw {}",
                    b.name, b.network, b.subnet, b.gateway
                )),
                if b.present { "solid" } else { "dashed" },
                style(lit)
            );
        }
        for s in &t.sandboxes {
            let lit = on(&s.name) || on(&s.ip.to_string());
            let _ = writeln!(
                out,
                "    {} [label={}, shape=ellipse, {}];",
                id(host, "sb", &s.name),
                q(&format!("{}\\n{}", s.name, s.ip)),
                style(lit)
            );
            if let Some(b) = t.bridges.iter().find(|b| b.network == s.network) {
                let end = s.host_end.clone().unwrap_or_else(|| "macvlan".into());
                let lit = lit && (on(&end) || on(&b.name));
                let _ = writeln!(
                    out,
                    "    {} -- {} [label={}, style={}, {}];",
                    id(host, "sb", &s.name),
                    id(host, "br", &b.name),
                    q(&end),
                    if s.plugged { "solid" } else { "dashed" },
                    style(lit)
                );
            }
        }
        for tu in &t.tunnels {
            let name = tu
                .device
                .clone()
                .unwrap_or_else(|| format!("routes ({})", tu.backend));
            let node = id(host, "tun", &name);
            let lit = tu.device.as_deref().is_some_and(on);
            let _ = writeln!(
                out,
                "    {node} [label={}, shape=hexagon, {}];",
                q(&format!("{name}\\n{} / {}", tu.network, tu.backend)),
                style(lit)
            );
            if let Some(b) = &tu.bridge {
                let _ = writeln!(
                    out,
                    "    {} -- {node} [{}];",
                    id(host, "br", b),
                    style(lit && on(b))
                );
            }
            let _ = writeln!(out, "    {node} -- {eth} [{}];", style(lit));
        }
        out.push_str("  }\n");
        let _ = writeln!(out, "  {eth} -- underlay [{}];", style(host_on));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::Hop;

    fn host(name: &str, ip: &str, sb: &str, sb_ip: &str) -> Topology {
        Topology {
            host: name.into(),
            public_ip: Some(ip.parse().unwrap()),
            bridges: vec![TopoBridge {
                name: "wbr-1".into(),
                network: "lab".into(),
                subnet: "10.40.1.0/24".parse().unwrap(),
                gateway: "10.40.1.1".parse().unwrap(),
                present: true,
            }],
            sandboxes: vec![TopoSandbox {
                name: sb.into(),
                ip: sb_ip.parse().unwrap(),
                network: "lab".into(),
                host_end: Some(format!("wv{sb}")),
                plugged: true,
            }],
            tunnels: vec![TopoTunnel {
                device: Some("wvx-1".into()),
                backend: "vxlan".into(),
                network: "lab".into(),
                bridge: Some("wbr-1".into()),
                peers: vec![],
            }],
        }
    }

    #[test]
    fn the_path_is_highlighted_on_the_hosts_it_crosses() {
        let hosts = [
            host("h1", "198.51.100.11", "a", "10.40.1.2"),
            host("h2", "198.51.100.12", "b", "10.40.2.2"),
            host("h3", "198.51.100.13", "c", "10.40.3.2"),
        ];
        let e = Explanation {
            src: "sandbox a".into(),
            dst: "10.40.2.2".into(),
            proto: "icmp".into(),
            hops: vec![Hop {
                at: "host h1".into(),
                what: "veth eth0 -> wva, a port of bridge wbr-1; route via dev wvx-1; FDB: at host 198.51.100.12".into(),
                command: String::new(),
            }],
            verdict: Verdict::Delivered { to: "10.40.2.2 on host h2 (198.51.100.12)".into() },
            disagreements: vec![],
            probe: None,
        };
        let dot = render_dot(&hosts, Some(&e));
        assert!(dot.starts_with("graph topology {"), "{dot}");
        assert!(
            dot.contains("\"h1/sb/a\" [label=\"a\\n10.40.1.2\", shape=ellipse, color=blue"),
            "{dot}"
        );
        assert!(
            dot.contains("\"h2/sb/b\" [label=\"b\\n10.40.2.2\", shape=ellipse, color=blue"),
            "{dot}"
        );
        assert!(
            dot.contains("\"h3/sb/c\" [label=\"c\\n10.40.3.2\", shape=ellipse, color=gray40"),
            "{dot}"
        );
        assert!(
            dot.contains("\"h2/if/eth0\" -- underlay [color=blue"),
            "{dot}"
        );
        assert!(
            dot.contains("\"h3/if/eth0\" -- underlay [color=gray40"),
            "{dot}"
        );
    }
}
