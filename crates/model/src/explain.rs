//! `weft explain`: the path of one packet, hop by hop, and the pure parts
//! of working it out. The agent reads the live kernel (routes, neighbours,
//! FDBs, weft's nft table) and hands the facts to these functions; they
//! decide what weft's rules do with the packet, and render the answer as
//! text or as a Graphviz picture.

use crate::nft::{TABLE_FAMILY, TABLE_NAME};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::Ipv4Addr;

/// What `weft explain` is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainRequest {
    /// A sandbox (name or id), an address, or `host`.
    pub src: String,
    pub dst: String,
    /// tcp, udp or icmp.
    pub proto: String,
    pub port: Option<u16>,
    /// Also send one real packet and trace it (`--probe`).
    #[serde(default)]
    pub probe: bool,
}

/// What a real packet did (`--probe`): sent from the source, followed
/// through this host's netfilter hooks with nftables tracing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// What was sent, as a command would: "ping -c 1 -W 1 10.1.0.3".
    pub sent: String,
    /// "answered", "refused (RST)", "no answer", …
    pub outcome: String,
    /// Whether the packet reached the destination, as far as the probe
    /// can tell (an answer came back); None when it cannot tell (UDP).
    pub delivered: Option<bool>,
    /// Where this host's netfilter saw it, in order (`nft monitor trace`,
    /// condensed): the hook and interfaces, and weft's rules that decided.
    pub seen: Vec<String>,
}

/// One step of the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// Where the packet is: "sandbox a", "host h1", "underlay".
    pub at: String,
    /// What the kernel holds there and does with the packet.
    pub what: String,
    /// The standard command that shows the same thing.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Delivered {
        to: String,
    },
    Dropped {
        /// 1-based index of the hop where it stops.
        hop: usize,
        why: String,
        fix: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub hops: Vec<Hop>,
    pub verdict: Verdict,
    /// Where weft's records and the kernel disagree.
    #[serde(default)]
    pub disagreements: Vec<String>,
    #[serde(default)]
    pub probe: Option<Probe>,
}

impl Verdict {
    pub fn is_delivered(&self) -> bool {
        matches!(self, Verdict::Delivered { .. })
    }

    /// The host a delivered packet was handed to, when it left this one
    /// for another host of the cluster ("… on host h2 (…)").
    pub fn next_host(&self) -> Option<&str> {
        match self {
            Verdict::Delivered { to } => to.split(" on host ").nth(1)?.split_whitespace().next(),
            Verdict::Dropped { .. } => None,
        }
    }
}

impl Explanation {
    /// This host's part followed by the far host's (what that host's
    /// agent says about the packet arriving there): one path, the far
    /// side's verdict, hop numbers counted through.
    pub fn then(mut self, far: Explanation) -> Explanation {
        let offset = self.hops.len();
        self.hops.extend(far.hops);
        self.disagreements.extend(far.disagreements);
        self.verdict = match far.verdict {
            Verdict::Dropped { hop, why, fix } => Verdict::Dropped {
                hop: hop + offset,
                why,
                fix,
            },
            v => v,
        };
        self
    }
}

impl Explanation {
    pub fn render_text(&self) -> String {
        let mut out = format!("{} -> {} ({})\n", self.src, self.dst, self.proto);
        for (i, h) in self.hops.iter().enumerate() {
            let _ = writeln!(out, "{:>2}. [{}] {}", i + 1, h.at, h.what);
            let _ = writeln!(out, "      $ {}", h.command);
        }
        for d in &self.disagreements {
            let _ = writeln!(out, "!! weft's records and the kernel disagree: {d}");
        }
        match &self.verdict {
            Verdict::Delivered { to } => {
                let _ = writeln!(out, "verdict: delivered to {to}");
            }
            Verdict::Dropped { hop, why, fix } => {
                let _ = writeln!(out, "verdict: dropped at hop {hop}: {why}");
                if let Some(f) = fix {
                    let _ = writeln!(out, "fix: {f}");
                }
            }
        }
        if let Some(p) = &self.probe {
            let _ = writeln!(out, "probe: sent `{}`: {}", p.sent, p.outcome);
            for s in &p.seen {
                let _ = writeln!(out, "  seen: {s}");
            }
            if p.seen.is_empty() {
                let _ = writeln!(out, "  seen: nowhere in this host's netfilter hooks");
            }
            let _ = match p.delivered {
                Some(d) if d == self.verdict.is_delivered() => {
                    writeln!(out, "prediction and probe agree")
                }
                Some(_) => writeln!(out, "!! prediction and probe DISAGREE"),
                None => writeln!(
                    out,
                    "the probe cannot tell whether it arrived (no answer expected)"
                ),
            };
        }
        out
    }

    /// The path as a Graphviz digraph, top to bottom: one box per hop,
    /// grouped in a frame per place (the sandbox, each host, the
    /// underlay), the edge into the hop that drops drawn red.
    pub fn render_dot(&self) -> String {
        let mut out = String::from(
            "digraph explain {\n  rankdir=TB;\n  node [shape=box, style=rounded, fontname=\"monospace\", fontsize=10];\n",
        );
        let _ = writeln!(
            out,
            "  label={};\n  labelloc=t;",
            dot_str(&format!("{} -> {} ({})", self.src, self.dst, self.proto))
        );
        let _ = writeln!(out, "  n0 [label={}, shape=ellipse];", dot_str(&self.src));
        let dropped_at = match &self.verdict {
            Verdict::Dropped { hop, .. } => Some(*hop),
            Verdict::Delivered { .. } => None,
        };
        let mut i = 0;
        let mut frame = 0;
        while i < self.hops.len() {
            let at = &self.hops[i].at;
            let _ = writeln!(
                out,
                "  subgraph cluster_{frame} {{\n    label={};\n    style=dashed;",
                dot_str(at)
            );
            while i < self.hops.len() && &self.hops[i].at == at {
                let n = i + 1;
                let color = if dropped_at == Some(n) {
                    "red"
                } else {
                    "black"
                };
                let _ = writeln!(
                    out,
                    "    n{n} [label={}, color={color}];",
                    dot_str(&format!("{n}. {}", wrap(&self.hops[i].what, 60)))
                );
                i += 1;
            }
            out.push_str("  }\n");
            frame += 1;
        }
        for n in 1..=self.hops.len() {
            let color = if dropped_at == Some(n) {
                "red"
            } else {
                "black"
            };
            let _ = writeln!(out, "  n{} -> n{n} [color={color}, penwidth=2];", n - 1);
        }
        let last = self.hops.len();
        match &self.verdict {
            Verdict::Delivered { to } => {
                let _ = writeln!(
                    out,
                    "  done [label={}, shape=ellipse, color=darkgreen];\n  n{last} -> done [color=darkgreen, penwidth=2];",
                    dot_str(&format!("delivered: {}", wrap(to, 60)))
                );
            }
            Verdict::Dropped { why, .. } => {
                let _ = writeln!(
                    out,
                    "  done [label={}, shape=octagon, color=red];\n  n{} -> done [color=red, penwidth=2];",
                    dot_str(&format!("dropped: {}", wrap(why, 60))),
                    dropped_at.unwrap_or(last)
                );
            }
        }
        out.push_str("}\n");
        out
    }
}

fn wrap(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in s.split(' ') {
        if line > 0 && line + word.len() > width {
            out.push_str("\\n");
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out
}

fn dot_str(s: &str) -> String {
    // `\n` sequences are kept: DOT reads them as line breaks.
    format!("\"{}\"", s.replace('"', "\\\""))
}

/// weft's nft table as it is in the kernel now (`nft -j list table inet
/// weft`): the sets its rules match on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveTable {
    pub bridges: BTreeSet<String>,
    pub same_bridge: BTreeSet<(String, String)>,
    pub internal_bridges: BTreeSet<String>,
    pub masq_nets: Vec<Ipv4Net>,
    pub overlay_nets: Vec<Ipv4Net>,
    pub overlay_same: Vec<(Ipv4Net, Ipv4Net)>,
    /// `port_any`: (protocol, host port) -> (address, port).
    pub ports: Vec<(String, u16, Ipv4Addr, u16)>,
}

impl LiveTable {
    /// Reads `nft -j list table inet weft`'s output.
    pub fn from_nft_json(json: &str) -> Result<LiveTable, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("nft's JSON: {e}"))?;
        let items = v["nftables"]
            .as_array()
            .ok_or("nft's JSON has no \"nftables\" list")?;
        let mut t = LiveTable::default();
        for item in items {
            let (set, is_map) = match (item.get("set"), item.get("map")) {
                (Some(s), _) => (s, false),
                (_, Some(m)) => (m, true),
                _ => continue,
            };
            if set["table"] != TABLE_NAME || set["family"] != TABLE_FAMILY {
                continue;
            }
            let elems = set["elem"].as_array().cloned().unwrap_or_default();
            let name = set["name"].as_str().unwrap_or("");
            for e in &elems {
                match (name, is_map) {
                    ("bridges", false) => t.bridges.extend(e.as_str().map(String::from)),
                    ("internal_bridges", false) => {
                        t.internal_bridges.extend(e.as_str().map(String::from))
                    }
                    ("same_bridge", false) => {
                        if let [a, b] = concat(e).as_slice() {
                            if let (Some(a), Some(b)) = (a.as_str(), b.as_str()) {
                                t.same_bridge.insert((a.into(), b.into()));
                            }
                        }
                    }
                    ("masq_nets", false) => t.masq_nets.extend(prefix(e)),
                    ("overlay_nets", false) => t.overlay_nets.extend(prefix(e)),
                    ("overlay_same", false) => {
                        if let [a, b] = concat(e).as_slice() {
                            if let (Some(a), Some(b)) = (prefix(a), prefix(b)) {
                                t.overlay_same.push((a, b));
                            }
                        }
                    }
                    ("port_any", true) => {
                        let Some([k, v]) = e.as_array().map(|a| a.as_slice()) else {
                            continue;
                        };
                        if let ([proto, port], [ip, to]) =
                            (concat(k).as_slice(), concat(v).as_slice())
                        {
                            if let (Some(proto), Some(port), Some(ip), Some(to)) = (
                                proto.as_str(),
                                port.as_u64(),
                                ip.as_str().and_then(|s| s.parse().ok()),
                                to.as_u64(),
                            ) {
                                t.ports.push((proto.into(), port as u16, ip, to as u16));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(t)
    }
}

fn concat(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["concat"].as_array().cloned().unwrap_or_default()
}

fn prefix(v: &serde_json::Value) -> Option<Ipv4Net> {
    if let Some(s) = v.as_str() {
        return s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from);
    }
    let p = &v["prefix"];
    Ipv4Net::new(p["addr"].as_str()?.parse().ok()?, p["len"].as_u64()? as u8).ok()
}

/// A packet as weft's forward and postrouting chains see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    pub iif: &'a str,
    pub oif: &'a str,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    /// Its destination was translated (a published port).
    pub dnat: bool,
}

/// The rule of `chain forward` that decides a new connection's first
/// packet, with its text as in the table, and whether it accepts. None:
/// no rule matched, so the chain's policy (accept) lets it through.
pub fn forward_rule(t: &LiveTable, p: &Packet) -> Option<(&'static str, bool)> {
    let in_any = |nets: &[Ipv4Net], ip: Ipv4Addr| nets.iter().any(|n| n.contains(&ip));
    if t.same_bridge
        .contains(&(p.iif.to_string(), p.oif.to_string()))
    {
        return Some(("iifname . oifname @same_bridge accept", true));
    }
    if p.dnat && t.bridges.contains(p.oif) {
        return Some(("ct status dnat oifname @bridges accept", true));
    }
    if t.bridges.contains(p.iif) && t.bridges.contains(p.oif) {
        return Some(("iifname @bridges oifname @bridges drop", false));
    }
    if t.internal_bridges.contains(p.iif) {
        return Some(("iifname @internal_bridges drop", false));
    }
    if t.internal_bridges.contains(p.oif) {
        return Some(("oifname @internal_bridges drop", false));
    }
    if in_any(&t.overlay_nets, p.saddr)
        && in_any(&t.overlay_nets, p.daddr)
        && !t
            .overlay_same
            .iter()
            .any(|(a, b)| a.contains(&p.saddr) && b.contains(&p.daddr))
    {
        return Some((
            "ip saddr @overlay_nets ip daddr @overlay_nets ip saddr . ip daddr != @overlay_same drop",
            false,
        ));
    }
    None
}

/// The source translation `chain postrouting` applies, as the rule's text.
pub fn postrouting_rule(t: &LiveTable, p: &Packet) -> Option<&'static str> {
    if p.dnat && p.saddr.is_loopback() && t.bridges.contains(p.oif) {
        return Some("ct status dnat ip saddr 127.0.0.0/8 oifname @bridges masquerade");
    }
    if p.dnat
        && t.same_bridge
            .contains(&(p.iif.to_string(), p.oif.to_string()))
    {
        return Some("ct status dnat iifname . oifname @same_bridge masquerade");
    }
    if t.overlay_same
        .iter()
        .any(|(a, b)| a.contains(&p.saddr) && b.contains(&p.daddr))
    {
        return None;
    }
    if t.masq_nets.iter().any(|n| n.contains(&p.saddr)) && !t.bridges.contains(p.oif) {
        return Some("ip saddr @masq_nets oifname != @bridges masquerade");
    }
    None
}

/// Where a published port leads (`chain publish`, map `port_any`).
pub fn published(t: &LiveTable, proto: &str, port: u16) -> Option<(Ipv4Addr, u16)> {
    t.ports
        .iter()
        .find(|(p, h, _, _)| p == proto && *h == port)
        .map(|(_, _, ip, to)| (*ip, *to))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "weft", "handle": 1}},
      {"set": {"family": "inet", "name": "bridges", "table": "weft", "type": "ifname", "elem": ["weft0", "wbr-a", "wbr-i"]}},
      {"set": {"family": "inet", "name": "same_bridge", "table": "weft", "type": ["ifname", "ifname"], "elem": [{"concat": ["weft0", "weft0"]}, {"concat": ["wbr-a", "wbr-a"]}]}},
      {"set": {"family": "inet", "name": "internal_bridges", "table": "weft", "type": "ifname", "elem": ["wbr-i"]}},
      {"set": {"family": "inet", "name": "masq_nets", "table": "weft", "type": "ipv4_addr", "flags": ["interval"], "elem": [{"prefix": {"addr": "10.40.1.0", "len": 24}}, {"prefix": {"addr": "172.17.0.0", "len": 16}}]}},
      {"set": {"family": "inet", "name": "overlay_nets", "table": "weft", "type": "ipv4_addr", "flags": ["interval"], "elem": [{"prefix": {"addr": "10.40.0.0", "len": 16}}]}},
      {"set": {"family": "inet", "name": "overlay_same", "table": "weft", "type": ["ipv4_addr", "ipv4_addr"], "flags": ["interval"], "elem": [{"concat": [{"prefix": {"addr": "10.40.0.0", "len": 16}}, {"prefix": {"addr": "10.40.0.0", "len": 16}}]}]}},
      {"map": {"family": "inet", "name": "port_any", "table": "weft", "type": ["inet_proto", "inet_service"], "map": "ipv4_addr . inet_service", "elem": [[{"concat": ["tcp", 8080]}, {"concat": ["172.17.0.2", 80]}]]}}]}"#;

    fn pkt<'a>(iif: &'a str, oif: &'a str, s: &str, d: &str) -> Packet<'a> {
        Packet {
            iif,
            oif,
            saddr: s.parse().unwrap(),
            daddr: d.parse().unwrap(),
            dnat: false,
        }
    }

    #[test]
    fn the_live_table_is_read_from_nfts_json() {
        let t = LiveTable::from_nft_json(LIVE).unwrap();
        assert_eq!(t.bridges.len(), 3);
        assert!(t.same_bridge.contains(&("wbr-a".into(), "wbr-a".into())));
        assert!(t.internal_bridges.contains("wbr-i"));
        assert_eq!(t.masq_nets.len(), 2);
        assert_eq!(t.overlay_same.len(), 1);
        assert_eq!(
            published(&t, "tcp", 8080),
            Some(("172.17.0.2".parse().unwrap(), 80))
        );
        assert_eq!(published(&t, "udp", 8080), None);
    }

    #[test]
    fn forward_and_postrouting_decide_as_the_tables_rules_do() {
        let t = LiveTable::from_nft_json(LIVE).unwrap();
        let same = pkt("wbr-a", "wbr-a", "10.40.1.2", "10.40.1.3");
        assert_eq!(forward_rule(&t, &same).map(|r| r.1), Some(true));
        let across = pkt("weft0", "wbr-a", "172.17.0.2", "10.40.1.3");
        assert_eq!(
            forward_rule(&t, &across),
            Some(("iifname @bridges oifname @bridges drop", false))
        );
        let out = pkt("wbr-i", "eth0", "10.40.9.2", "203.0.113.9");
        assert_eq!(forward_rule(&t, &out).map(|r| r.1), Some(false));
        let egress = pkt("weft0", "eth0", "172.17.0.2", "203.0.113.9");
        assert_eq!(forward_rule(&t, &egress), None);
        assert_eq!(
            postrouting_rule(&t, &egress),
            Some("ip saddr @masq_nets oifname != @bridges masquerade")
        );
        let overlay = pkt("wbr-a", "wvx-a", "10.40.1.2", "10.40.7.2");
        assert_eq!(forward_rule(&t, &overlay), None);
        assert_eq!(
            postrouting_rule(&t, &overlay),
            None,
            "no masquerade inside the overlay"
        );
        // Every rule named is a rule of the table, word for word.
        let table = crate::nft::render(&Default::default());
        for rule in [
            forward_rule(&t, &same).unwrap().0,
            forward_rule(&t, &across).unwrap().0,
            forward_rule(&t, &out).unwrap().0,
            postrouting_rule(&t, &egress).unwrap(),
        ] {
            assert!(table.contains(rule), "{rule} is not in the table");
        }
    }

    #[test]
    fn the_far_hosts_part_continues_the_path() {
        let hop = |at: &str| Hop {
            at: at.into(),
            what: "x".into(),
            command: "y".into(),
        };
        let near = Explanation {
            src: "sandbox a".into(),
            dst: "10.40.2.2".into(),
            proto: "icmp".into(),
            hops: vec![hop("sandbox a"), hop("host h1")],
            verdict: Verdict::Delivered {
                to: "10.40.2.2 on host h2 (198.51.100.12)".into(),
            },
            disagreements: vec![],
            probe: None,
        };
        assert_eq!(near.verdict.next_host(), Some("h2"));
        let far = Explanation {
            hops: vec![hop("host h2")],
            verdict: Verdict::Dropped {
                hop: 1,
                why: "w".into(),
                fix: None,
            },
            ..near.clone()
        };
        let all = near.then(far);
        assert_eq!(all.hops.len(), 3);
        assert!(matches!(all.verdict, Verdict::Dropped { hop: 3, .. }));
    }

    #[test]
    fn dot_output_marks_the_hop_that_drops() {
        let e = Explanation {
            src: "a".into(),
            dst: "b".into(),
            proto: "icmp".into(),
            hops: vec![
                Hop {
                    at: "sandbox a".into(),
                    what: "route 10.1.0.3 dev eth0".into(),
                    command: "ip route get 10.1.0.3".into(),
                },
                Hop {
                    at: "host".into(),
                    what: "nft forward: \"drop\"".into(),
                    command: "nft list chain inet weft forward".into(),
                },
            ],
            verdict: Verdict::Dropped {
                hop: 2,
                why: "isolated".into(),
                fix: None,
            },
            disagreements: vec![],
            probe: None,
        };
        let dot = e.render_dot();
        assert!(dot.starts_with("digraph explain {"), "{dot}");
        assert!(
            dot.contains("subgraph cluster_1 {\n    label=\"host\";"),
            "{dot}"
        );
        assert!(
            dot.contains("n2 [label=\"2. nft forward: \\\"drop\\\"\", color=red]"),
            "{dot}"
        );
        assert!(dot.contains("n1 -> n2 [color=red"), "{dot}");
        assert!(dot.contains("n2 -> done [color=red"), "{dot}");
        assert!(e
            .render_text()
            .contains("verdict: dropped at hop 2: isolated"));
    }
}
