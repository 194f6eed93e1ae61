//! weft's nftables table, rendered from desired state.
//!
//! The table is owned by name: weft only ever creates, replaces or deletes
//! `table inet weft` and never touches another table. Everything that grows
//! (networks, published ports) is an element of a set or map, so the rules
//! are the same whatever the number of networks, sandboxes and ports.

use crate::ports::PortMapping;
use ipnet::Ipv4Net;
use std::fmt::Write;
use std::net::Ipv4Addr;

pub const TABLE_FAMILY: &str = "inet";
pub const TABLE_NAME: &str = "weft";

/// One network as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRule {
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub internal: bool,
    /// Overlay networks: the whole range across hosts. Traffic inside it is
    /// never masqueraded (sandboxes see each other's real addresses), and
    /// traffic between two different overlay ranges is dropped.
    pub overlay_range: Option<Ipv4Net>,
}

/// One published port and the sandbox address it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    pub mapping: PortMapping,
    pub target: Ipv4Addr,
}

/// A network carved into isolated sub-ranges (`--net NAME:subnet=CIDR`):
/// an endpoint of a sub-range reaches only its own sub-range (and the
/// open addresses); the rest of the network does not reach into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationRule {
    /// The network's whole range (across hosts).
    pub range: Ipv4Net,
    pub subranges: Vec<Ipv4Net>,
    /// Reach and are reached by every sub-range: the gateway, exposed
    /// host addresses.
    pub open: Vec<Ipv4Addr>,
    /// This host's bridge ports of the network with the one address each
    /// may send from (a sandbox cannot forge its way into a sub-range).
    pub ports: Vec<(String, Ipv4Addr)>,
}

/// A network this host exposes (`weft expose`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeRule {
    /// The network's range across hosts (a local network: its subnet).
    pub range: Ipv4Net,
    /// The host's address on it: the source of what the host (shared
    /// kind) and machines routed through this host send into the range,
    /// so the replies come back here.
    pub address: Ipv4Addr,
    /// Shared kind: the gateway, the source the host's own packets leave
    /// the bridge with. Every host has it, so a remote sandbox's reply to
    /// it would stay on that host: such packets get `address` instead.
    pub gateway: Option<Ipv4Addr>,
}

/// What the table must express.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallSpec {
    pub networks: Vec<NetworkRule>,
    pub ports: Vec<PortRule>,
    pub isolation: Vec<IsolationRule>,
    pub exposed: Vec<ExposeRule>,
}

/// The bridge-family table: sub-range isolation between ports of one
/// bridge (and the VXLAN port), which `inet` hooks never see without
/// br_netfilter. Owned by name like the inet table.
pub const BRIDGE_FAMILY: &str = "bridge";

const ISOLATION_RULES: [&str; 2] = [
    "ip saddr @iso_subs ip daddr @iso_nets ip daddr != @iso_open ip saddr . ip daddr != @iso_same",
    "ip daddr @iso_subs ip saddr @iso_nets ip saddr != @iso_open ip saddr . ip daddr != @iso_same",
];

const ANTI_SPOOF: &str = "iifname @guarded iifname . ip saddr != @port_ip drop";

const RULES: &str = r#"	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local jump publish
	}

	chain output {
		type nat hook output priority -100; policy accept;
		fib daddr type local jump publish
	}

	chain publish {
		meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @port_addr
		meta l4proto { tcp, udp } dnat ip to meta l4proto . th dport map @port_any
		meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @range_addr
		meta l4proto { tcp, udp } dnat ip to meta l4proto . th dport map @range_any
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ct status dnat ip saddr 127.0.0.0/8 oifname @bridges masquerade
		ct status dnat iifname . oifname @same_bridge masquerade
		ip saddr . ip daddr @expose_self snat ip to ip daddr map @expose_snat
		iifname != @bridges ip saddr != @overlay_nets ct status ! dnat snat ip to ip daddr map @expose_snat
		ip saddr . ip daddr @overlay_same accept
		ip saddr @masq_nets oifname != @bridges masquerade
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
		ISOLATION
		iifname . oifname @same_bridge accept
		ct status dnat oifname @bridges accept
		iifname @bridges oifname @bridges drop
		iifname @internal_bridges drop
		oifname @internal_bridges drop
		ip saddr @overlay_nets ip daddr @overlay_nets ip saddr . ip daddr != @overlay_same drop
	}
"#;

fn set(out: &mut String, decl: &str, elements: &[String]) {
    let _ = write!(out, "\t{decl}");
    if elements.is_empty() {
        out.push_str(" }\n");
    } else {
        let _ = writeln!(
            out,
            "\n\t\telements = {{ {} }}\n\t}}",
            elements.join(",\n\t\t\t     ")
        );
    }
}

/// Which map holds a published port, and its elements (`key : value`).
///
/// Single ports sit in hash maps (exact keys), so adding or deleting one
/// costs the same however many are published; only ranges, which need
/// interval maps, pay for the interval tree. A port published on any
/// address has no address in its key; one bound to a host address does.
/// A shifted range (8000-8002:80-82) is one exact element per port: each
/// host port leads to its own container port.
fn port_elements(p: &PortRule) -> Vec<(&'static str, String)> {
    let m = &p.mapping;
    let key = |ports: String| match m.host_ip {
        Some(ip) => format!("{ip} . {} . {ports}", m.protocol),
        None => format!("{} . {ports}", m.protocol),
    };
    if m.host.is_single() || !m.keeps_ports() {
        let map = if m.host_ip.is_some() {
            "port_addr"
        } else {
            "port_any"
        };
        return m
            .pairs()
            .map(|(h, c)| (map, format!("{} : {} . {c}", key(h.to_string()), p.target)))
            .collect();
    }
    // Ranges that keep their port numbers: only the address is translated.
    let map = if m.host_ip.is_some() {
        "range_addr"
    } else {
        "range_any"
    };
    vec![(map, format!("{} : {}", key(m.host.to_string()), p.target))]
}

const PORT_MAPS: [(&str, &str); 4] = [
    (
        "port_addr",
        "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;",
    ),
    (
        "port_any",
        "type inet_proto . inet_service : ipv4_addr . inet_service;",
    ),
    (
        "range_addr",
        "type ipv4_addr . inet_proto . inet_service : ipv4_addr; flags interval;",
    ),
    (
        "range_any",
        "type inet_proto . inet_service : ipv4_addr; flags interval;",
    ),
];

/// Every address of `range` outside all of `subs`, as nft intervals.
fn iso_sets(spec: &FirewallSpec) -> [(&'static str, Vec<String>); 4] {
    let iso = &spec.isolation;
    let nets = iso.iter().map(|i| i.range.to_string()).collect();
    let subs = iso
        .iter()
        .flat_map(|i| i.subranges.iter().map(|s| s.to_string()))
        .collect();
    let same = iso
        .iter()
        .flat_map(|i| i.subranges.iter().map(|s| format!("{s} . {s}")))
        .collect();
    let mut open: Vec<String> = iso
        .iter()
        .flat_map(|i| i.open.iter().map(|a| a.to_string()))
        .collect();
    open.sort();
    open.dedup();
    [
        ("set iso_nets { type ipv4_addr; flags interval;", nets),
        ("set iso_subs { type ipv4_addr; flags interval;", subs),
        (
            "set iso_same { type ipv4_addr . ipv4_addr; flags interval;",
            same,
        ),
        ("set iso_open { type ipv4_addr;", open),
    ]
}

/// The bridge table: made when a network has sub-ranges, else removed.
fn render_bridge(spec: &FirewallSpec) -> String {
    let mut out = format!(
        "add table {BRIDGE_FAMILY} {TABLE_NAME}\ndelete table {BRIDGE_FAMILY} {TABLE_NAME}\n"
    );
    if spec.isolation.is_empty() {
        return out;
    }
    let q = |s: &str| format!("\"{s}\"");
    let mut guarded: Vec<String> = Vec::new();
    let mut port_ip: Vec<String> = Vec::new();
    for (port, ip) in spec.isolation.iter().flat_map(|i| i.ports.iter()) {
        guarded.push(q(port));
        port_ip.push(format!("{} . {ip}", q(port)));
    }
    guarded.sort();
    guarded.dedup();
    let _ = writeln!(out, "table {BRIDGE_FAMILY} {TABLE_NAME} {{");
    set(&mut out, "set guarded { type ifname;", &guarded);
    set(&mut out, "set port_ip { type ifname . ipv4_addr;", &port_ip);
    for (decl, elements) in iso_sets(spec) {
        set(&mut out, decl, &elements);
    }
    let _ = write!(
        out,
        "\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\t{ANTI_SPOOF}\n\t\t{} drop\n\t\t{} drop\n\t}}\n",
        ISOLATION_RULES[0], ISOLATION_RULES[1]
    );
    let _ = write!(
        out,
        "\n\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\t\t{ANTI_SPOOF}\n\t}}\n}}\n"
    );
    out
}

/// The whole table. The batch first makes sure the table exists, then deletes
/// and recreates it, so it applies atomically whatever was there before.
/// The bridge table follows in the same batch.
pub fn render(spec: &FirewallSpec) -> String {
    let q = |s: &str| format!("\"{s}\"");
    let bridges: Vec<String> = spec.networks.iter().map(|n| q(&n.bridge)).collect();
    let same: Vec<String> = spec
        .networks
        .iter()
        .map(|n| format!("{} . {}", q(&n.bridge), q(&n.bridge)))
        .collect();
    let internal: Vec<String> = spec
        .networks
        .iter()
        .filter(|n| n.internal)
        .map(|n| q(&n.bridge))
        .collect();
    let masq: Vec<String> = spec
        .networks
        .iter()
        .filter(|n| !n.internal)
        .map(|n| n.subnet.to_string())
        .collect();
    let mut ranges: Vec<Ipv4Net> = spec
        .networks
        .iter()
        .filter_map(|n| n.overlay_range)
        .collect();
    ranges.sort();
    ranges.dedup();
    let overlay_nets: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    let overlay_same: Vec<String> = ranges.iter().map(|r| format!("{r} . {r}")).collect();
    let elements: Vec<(&str, String)> = spec.ports.iter().flat_map(port_elements).collect();
    let expose_snat: Vec<String> = spec
        .exposed
        .iter()
        .map(|e| format!("{} : {}", e.range, e.address))
        .collect();
    let expose_self: Vec<String> = spec
        .exposed
        .iter()
        .filter_map(|e| Some(format!("{} . {}", e.gateway?, e.range)))
        .collect();
    let mut out = format!(
        "add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
    );
    let _ = writeln!(out, "table {TABLE_FAMILY} {TABLE_NAME} {{");
    set(&mut out, "set bridges { type ifname;", &bridges);
    set(&mut out, "set same_bridge { type ifname . ifname;", &same);
    set(&mut out, "set internal_bridges { type ifname;", &internal);
    set(
        &mut out,
        "set masq_nets { type ipv4_addr; flags interval;",
        &masq,
    );
    set(
        &mut out,
        "set overlay_nets { type ipv4_addr; flags interval;",
        &overlay_nets,
    );
    set(
        &mut out,
        "set overlay_same { type ipv4_addr . ipv4_addr; flags interval;",
        &overlay_same,
    );
    // `weft expose`: a range's exposed address (a miss: the rule does not
    // match, so networks not exposed are untouched), and the host's own
    // source on a shared range.
    set(
        &mut out,
        "map expose_snat { type ipv4_addr : ipv4_addr; flags interval;",
        &expose_snat,
    );
    set(
        &mut out,
        "set expose_self { type ipv4_addr . ipv4_addr; flags interval;",
        &expose_self,
    );
    for (map, decl) in PORT_MAPS {
        let mine: Vec<String> = elements
            .iter()
            .filter(|(m, _)| *m == map)
            .map(|(_, e)| e.clone())
            .collect();
        set(&mut out, &format!("map {map} {{ {decl}"), &mine);
    }
    for (decl, elements) in iso_sets(spec) {
        set(&mut out, decl, &elements);
    }
    out.push('\n');
    // Published ports (DNAT) reach every sub-range.
    let isolation = ISOLATION_RULES
        .iter()
        .map(|r| format!("{r} ct status & dnat == 0 drop"))
        .collect::<Vec<_>>()
        .join("\n\t\t");
    out.push_str(&RULES.replace("ISOLATION", &isolation));
    out.push_str("}\n");
    out.push_str(&render_bridge(spec));
    out
}

/// Adds published ports: one element each, whatever the range.
pub fn render_add_ports(ports: &[PortRule]) -> String {
    ports
        .iter()
        .flat_map(port_elements)
        .map(|(map, e)| format!("add element {TABLE_FAMILY} {TABLE_NAME} {map} {{ {e} }}\n"))
        .collect()
}

/// Removes published ports (by key).
pub fn render_delete_ports(ports: &[PortRule]) -> String {
    ports
        .iter()
        .flat_map(port_elements)
        .map(|(map, e)| {
            let key = e.split(" : ").next().unwrap_or_default();
            format!("delete element {TABLE_FAMILY} {TABLE_NAME} {map} {{ {key} }}\n")
        })
        .collect()
}

/// Guards ports of networks with sub-ranges (port . its one source
/// address): two elements each, whatever the number of ports.
pub fn render_add_guards(ports: &[(String, Ipv4Addr)]) -> String {
    guard_elements(ports, "add")
}

/// Stops guarding ports (a sandbox left such a network).
pub fn render_delete_guards(ports: &[(String, Ipv4Addr)]) -> String {
    guard_elements(ports, "delete")
}

fn guard_elements(ports: &[(String, Ipv4Addr)], verb: &str) -> String {
    ports
        .iter()
        .map(|(port, ip)| {
            format!(
                "{verb} element {BRIDGE_FAMILY} {TABLE_NAME} guarded {{ \"{port}\" }}\n\
                 {verb} element {BRIDGE_FAMILY} {TABLE_NAME} port_ip {{ \"{port}\" . {ip} }}\n"
            )
        })
        .collect()
}

/// Removes the tables, tolerating their absence.
pub fn render_delete() -> String {
    format!(
        "add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n\
         add table {BRIDGE_FAMILY} {TABLE_NAME}\ndelete table {BRIDGE_FAMILY} {TABLE_NAME}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(bridge: &str, subnet: &str, internal: bool) -> NetworkRule {
        NetworkRule {
            bridge: bridge.into(),
            subnet: subnet.parse().unwrap(),
            internal,
            overlay_range: None,
        }
    }

    fn port(m: &str, target: &str) -> PortRule {
        PortRule {
            mapping: m.parse().unwrap(),
            target: target.parse().unwrap(),
        }
    }

    fn rule_lines(t: &str) -> usize {
        t.lines()
            .map(str::trim)
            .filter(|l| {
                ["accept", "drop", "masquerade", "jump publish"]
                    .iter()
                    .any(|r| l.ends_with(r))
                    || l.contains(" dnat ")
                    || l.contains(" snat ")
            })
            .count()
    }

    #[test]
    fn networks_and_ports_are_elements_not_rules() {
        let one = render(&FirewallSpec {
            networks: vec![net("weft0", "10.88.0.0/16", false)],
            ..Default::default()
        });
        let many = render(&FirewallSpec {
            networks: vec![
                net("weft0", "10.88.0.0/16", false),
                net("wbr-1", "10.89.0.0/16", true),
                net("wbr-2", "10.90.0.0/16", false),
            ],
            ports: vec![
                port("8080:80", "10.88.0.2"),
                port("8000-8010:8000-8010/udp", "10.88.0.3"),
                port("127.0.0.1:9000:9000", "10.90.0.2"),
            ],
            exposed: vec![
                ExposeRule {
                    range: "10.40.0.0/16".parse().unwrap(),
                    address: "10.40.0.6".parse().unwrap(),
                    gateway: Some("10.40.0.1".parse().unwrap()),
                },
                ExposeRule {
                    range: "10.41.0.0/16".parse().unwrap(),
                    address: "10.41.3.1".parse().unwrap(),
                    gateway: None,
                },
            ],
            isolation: vec![],
        });
        assert_eq!(rule_lines(&one), rule_lines(&many), "{many}");
        assert!(many.contains("\"wbr-1\" . \"wbr-1\""), "{many}");
        assert!(many.contains("10.40.0.0/16 : 10.40.0.6"), "{many}");
        assert!(many.contains("10.41.0.0/16 : 10.41.3.1"), "{many}");
        let own = many
            .lines()
            .skip_while(|l| !l.contains("set expose_self"))
            .nth(1)
            .unwrap();
        assert!(
            own.contains("10.40.0.1 . 10.40.0.0/16") && !own.contains("10.41."),
            "only shared networks translate the host's own source: {own}"
        );
        assert!(many.contains("tcp . 8080 : 10.88.0.2 . 80"), "{many}");
        assert!(many.contains("udp . 8000-8010 : 10.88.0.3"), "{many}");
        assert!(
            many.contains("127.0.0.1 . tcp . 9000 : 10.90.0.2 . 9000"),
            "{many}"
        );
        let masq = many
            .lines()
            .skip_while(|l| !l.contains("set masq_nets"))
            .nth(1)
            .unwrap();
        assert!(
            masq.contains("10.88.0.0/16") && !masq.contains("10.89.0.0/16"),
            "internal is not masqueraded: {masq}"
        );
    }

    #[test]
    fn port_changes_are_one_element_each() {
        let p = [
            port("8000-8999:8000-8999", "10.88.0.2"),
            port("8080:80/udp", "10.88.0.2"),
        ];
        let add = render_add_ports(&p);
        assert_eq!(add.lines().count(), 2);
        assert!(add.contains("add element inet weft range_any { tcp . 8000-8999 : 10.88.0.2 }"));
        let del = render_delete_ports(&p);
        assert!(
            del.contains("delete element inet weft port_any { udp . 8080 }"),
            "{del}"
        );
    }

    #[test]
    fn a_shifted_range_is_one_exact_element_per_port() {
        let p = [port("127.0.0.1:8000-8002:80-82", "10.88.0.2")];
        let add = render_add_ports(&p);
        for (h, c) in [(8000, 80), (8001, 81), (8002, 82)] {
            assert!(
                add.contains(&format!(
                    "add element inet weft port_addr {{ 127.0.0.1 . tcp . {h} : 10.88.0.2 . {c} }}"
                )),
                "{add}"
            );
        }
        assert_eq!(add.lines().count(), 3);
        assert_eq!(render_delete_ports(&p).lines().count(), 3);
    }

    #[test]
    fn empty_table_starts_by_replacing_the_old_one() {
        let t = render(&FirewallSpec::default());
        assert!(t.starts_with("add table inet weft\ndelete table inet weft\n"));
        assert!(!t.contains("elements"), "{t}");
    }

    #[test]
    fn sub_ranges_are_a_bridge_table_and_forward_rules_only_when_used() {
        let plain = render(&FirewallSpec::default());
        assert!(
            plain.contains("add table bridge weft\ndelete table bridge weft\n")
                && !plain.contains("table bridge weft {"),
            "no sub-ranges, no bridge table: {plain}"
        );
        let spec = FirewallSpec {
            networks: vec![net("wbr-1", "10.32.0.0/16", false)],
            isolation: vec![IsolationRule {
                range: "10.32.0.0/16".parse().unwrap(),
                subranges: vec!["10.32.2.128/25".parse().unwrap()],
                open: vec!["10.32.0.1".parse().unwrap()],
                ports: vec![("wvabc0".into(), "10.32.2.130".parse().unwrap())],
            }],
            ..Default::default()
        };
        let t = render(&spec);
        let bridge = &t[t.find("table bridge weft {").expect("a bridge table")..];
        assert!(bridge.contains("\"wvabc0\" . 10.32.2.130"), "{bridge}");
        assert!(
            bridge.contains("10.32.2.128/25 . 10.32.2.128/25"),
            "{bridge}"
        );
        assert!(bridge.contains(ANTI_SPOOF), "{bridge}");
        assert_eq!(
            bridge.matches(ANTI_SPOOF).count(),
            2,
            "forward and input: {bridge}"
        );
        let inet = &t[..t.find("table bridge weft {").unwrap()];
        for r in ISOLATION_RULES {
            assert!(
                inet.contains(&format!("{r} ct status & dnat == 0 drop")),
                "{inet}"
            );
            assert!(bridge.contains(&format!("{r} drop")), "{bridge}");
        }
        assert!(render_delete().contains("delete table bridge weft"));
        let port = [("wvabc0".to_string(), "10.32.2.130".parse().unwrap())];
        assert_eq!(
            render_add_guards(&port),
            "add element bridge weft guarded { \"wvabc0\" }\n\
             add element bridge weft port_ip { \"wvabc0\" . 10.32.2.130 }\n"
        );
        assert!(render_delete_guards(&port).starts_with("delete element bridge weft guarded"));
    }
}
