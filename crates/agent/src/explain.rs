//! `weft explain SRC DST`: walks one packet's path through the live kernel
//! (routes, neighbour entries, bridge ports, VXLAN FDB, weft's nft sets),
//! hop by hop, and says where it ends. weft's records only name the places
//! (which namespace is sandbox `a`, which bridge is network `front`); every
//! fact about the path is read from the kernel, and where the two disagree
//! the explanation says so. What weft's rules do with a packet is decided
//! by weft-model's `explain` functions over the table's live sets.

use crate::error::{AgentError, Result};
use crate::host::Host;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use weft_kernel::lookup::RouteHit;
use weft_kernel::{Link, Netlink, Netns};
use weft_model::api::ClusterView;
use weft_model::explain::{
    forward_rule, postrouting_rule, published, ExplainRequest, Explanation, Hop, LiveTable, Packet,
    Verdict,
};
use weft_model::overlay::format_mac;
use weft_model::{Endpoint, Network, Sandbox};

/// One end of the path.
enum Place {
    Host,
    Sandbox(std::sync::Arc<Sandbox>),
    /// An address no sandbox of this host has.
    Address(Ipv4Addr),
}

struct Walk<'a> {
    networks: &'a std::collections::BTreeMap<String, Network>,
    sandboxes: Vec<std::sync::Arc<Sandbox>>,
    cluster: Option<&'a ClusterView>,
    table: LiveTable,
    host_nl: Netlink,
    /// Links looked up one by one as the walk meets them (a dump of every
    /// link costs O(n^2) in the kernel with many veths), cached.
    links: LinkCache,
    hops: Vec<Hop>,
    disagreements: Vec<String>,
    /// "host" on a single host, "host h1" in a cluster.
    host_at: String,
    /// The source address of a frame that stays on one bridge.
    bridge_src: Option<Ipv4Addr>,
}

fn place_name(p: &Place) -> String {
    match p {
        Place::Host => "host".into(),
        Place::Sandbox(sb) => format!("sandbox {}", sb.name),
        Place::Address(ip) => ip.to_string(),
    }
}

pub(crate) fn explain(
    host: &Host,
    cluster: Option<&ClusterView>,
    req: &ExplainRequest,
) -> Result<Explanation> {
    let proto = req.proto.to_ascii_lowercase();
    if !matches!(proto.as_str(), "tcp" | "udp" | "icmp") {
        return Err(AgentError::BadRequest(format!(
            "--proto {}: use tcp, udp or icmp",
            req.proto
        )));
    }
    if proto != "icmp" && req.port.is_none() && req.dst == "host" {
        return Err(AgentError::BadRequest(
            "a packet to the host's published port needs --port N".into(),
        ));
    }
    let snap = host.snapshot();
    let sandboxes: Vec<_> = snap.sandboxes.values().cloned().collect();
    let resolve = |what: &str, role: &str| -> Result<Place> {
        if what == "host" {
            return Ok(Place::Host);
        }
        if let Some(sb) = sandboxes
            .iter()
            .find(|s| s.name == what || s.id == what)
            .or_else(|| {
                let by_prefix: Vec<_> = sandboxes
                    .iter()
                    .filter(|s| s.id.starts_with(what))
                    .collect();
                (by_prefix.len() == 1).then(|| by_prefix[0])
            })
        {
            return Ok(Place::Sandbox(sb.clone()));
        }
        let ip: Ipv4Addr = what.parse().map_err(|_| {
            AgentError::NotFound(format!(
                "{role} {what:?} is neither a sandbox of this host, nor an IPv4 address, nor `host`; see `weft ps`"
            ))
        })?;
        Ok(sandboxes
            .iter()
            .find(|s| s.attachment.endpoints().iter().any(|e| e.ip == ip))
            .map(|s| Place::Sandbox(s.clone()))
            .unwrap_or(Place::Address(ip)))
    };
    let src = resolve(&req.src, "source")?;
    let dst = resolve(&req.dst, "destination")?;
    let table_json = weft_kernel::nft::list_table_json(
        weft_model::nft::TABLE_FAMILY,
        weft_model::nft::TABLE_NAME,
    )?;
    let table = match table_json {
        Some(j) => LiveTable::from_nft_json(&j).map_err(AgentError::Internal)?,
        None => LiveTable::default(),
    };
    let host_nl = Netlink::open()?;
    let links = LinkCache::new()?;
    let mut w = Walk {
        networks: &snap.networks,
        sandboxes,
        cluster,
        table,
        host_nl,
        links,
        hops: Vec::new(),
        disagreements: Vec::new(),
        bridge_src: None,
        host_at: cluster
            .map(|c| format!("host {}", c.node))
            .unwrap_or_else(|| "host".into()),
    };
    if table_json_missing(&w.table) {
        w.disagreements
            .push("weft's nft table `inet weft` is missing: isolation and masquerade are off until the agent rewrites it".into());
    }
    let verdict = w.walk(&src, &dst, &proto, req.port)?;
    let probe = if req.probe {
        let from = match &src {
            Place::Host => crate::probe::From::Host,
            Place::Sandbox(sb) => match (&sb.netns, Walk::first_ip(&src)) {
                (Some(ns), Some(ip)) => crate::probe::From::Netns(ns.into(), ip),
                _ => crate::probe::From::Host,
            },
            Place::Address(ip) => {
                return Err(AgentError::BadRequest(format!(
                    "--probe sends from the source, and {ip} is not a sandbox of this host nor the host; probe from a sandbox or `host`"
                )))
            }
        };
        let to = match (&dst, req.port) {
            (Place::Host, _) => w.host_address(),
            _ => Walk::first_ip(&dst),
        }
        .ok_or_else(|| AgentError::BadRequest("the destination has no address to probe".into()))?;
        Some(crate::probe::probe(&from, to, &proto, req.port)?)
    } else {
        None
    };
    Ok(Explanation {
        src: place_name(&src),
        dst: place_name(&dst),
        proto: match req.port {
            Some(p) if proto != "icmp" => format!("{proto}/{p}"),
            _ => proto,
        },
        hops: w.hops,
        verdict,
        disagreements: w.disagreements,
        probe,
    })
}

fn table_json_missing(t: &LiveTable) -> bool {
    t.bridges.is_empty()
}

/// Host links by index and by name, each asked of the kernel once.
struct LinkCache {
    nl: std::cell::RefCell<Netlink>,
    seen: std::cell::RefCell<HashMap<u32, Option<Link>>>,
    named: std::cell::RefCell<HashMap<String, Option<Link>>>,
}

impl LinkCache {
    fn new() -> Result<LinkCache> {
        Ok(LinkCache {
            nl: std::cell::RefCell::new(Netlink::open()?),
            seen: Default::default(),
            named: Default::default(),
        })
    }

    fn by_index(&self, index: u32) -> Option<Link> {
        if let Some(l) = self.seen.borrow().get(&index) {
            return l.clone();
        }
        let l = self.nl.borrow_mut().link_by_index(index).ok().flatten();
        self.seen.borrow_mut().insert(index, l.clone());
        l
    }

    fn by_name(&self, name: &str) -> Option<Link> {
        if let Some(l) = self.named.borrow().get(name) {
            return l.clone();
        }
        let l = self.nl.borrow_mut().link_by_name(name).ok().flatten();
        self.named.borrow_mut().insert(name.to_string(), l.clone());
        l
    }
}

fn dropped(hop: usize, why: impl Into<String>, fix: Option<String>) -> Verdict {
    Verdict::Dropped {
        hop,
        why: why.into(),
        fix,
    }
}

impl Walk<'_> {
    fn hop(&mut self, at: &str, what: String, command: String) -> usize {
        self.hops.push(Hop {
            at: at.to_string(),
            what,
            command,
        });
        self.hops.len()
    }

    fn link_name(&self, index: u32) -> String {
        self.links
            .by_index(index)
            .map(|l| l.name)
            .unwrap_or_else(|| format!("if{index}"))
    }

    fn index_of(&self, name: &str) -> Option<u32> {
        self.links.by_name(name).map(|l| l.index)
    }

    /// An address of this host to probe `host` at: its first bridge's gateway.
    fn host_address(&self) -> Option<Ipv4Addr> {
        self.networks
            .values()
            .find(|n| n.bridge().is_some())
            .map(|n| n.gateway)
    }

    fn first_ip(p: &Place) -> Option<Ipv4Addr> {
        match p {
            Place::Sandbox(sb) => sb.attachment.endpoints().first().map(|e| e.ip),
            Place::Address(ip) => Some(*ip),
            Place::Host => None,
        }
    }

    fn walk(
        &mut self,
        src: &Place,
        dst: &Place,
        proto: &str,
        port: Option<u16>,
    ) -> Result<Verdict> {
        let host_at = self.host_at.clone();
        match (src, dst) {
            (Place::Sandbox(a), _) => self.leave_sandbox(a, dst, proto),
            (Place::Host, Place::Host) => Ok(Verdict::Delivered {
                to: "the host itself (loopback)".into(),
            }),
            (Place::Host, _) => {
                let d = Self::first_ip(dst).expect("a destination address");
                self.leave_host(&host_at, None, d, dst)
            }
            (Place::Address(from), Place::Host) => self.published_port(*from, proto, port),
            (Place::Address(from), _) => {
                let d = Self::first_ip(dst).expect("a destination address");
                if self.shared_lan_of(*from, d).is_some() {
                    // Bridged, not routed: leave_host says where it comes in.
                    return self.leave_host(&host_at, Some((*from, 0)), d, dst);
                }
                // It comes in where the route back to its source leaves.
                let via = match self.host_nl.route_get(*from, None)? {
                    RouteHit::Unicast { oif, .. } => {
                        format!("on {}, the way back to {from}", self.link_name(oif))
                    }
                    _ => "from an address this host has no route to".into(),
                };
                let h = self.hop(
                    &host_at,
                    format!("a packet from {from} to {d} comes in {via}"),
                    format!("ip route get {from}"),
                );
                self.leave_host(&host_at, Some((*from, h)), d, dst)
            }
        }
    }

    /// Sandbox `a` sends to `dst`: its route, its neighbour, its veth.
    fn leave_sandbox(&mut self, a: &Sandbox, dst: &Place, proto: &str) -> Result<Verdict> {
        let at = format!("sandbox {}", a.name);
        let Some(d) = Self::first_ip(dst) else {
            // To the host: any gateway address of the sandbox's networks.
            let Some(ep) = a.attachment.endpoints().first() else {
                let h = self.hop(
                    &at,
                    "the sandbox has no network interface but lo".into(),
                    format!("weft exec {} -- ip -br addr", a.name),
                );
                return Ok(dropped(
                    h,
                    "no network (--net none)",
                    Some(format!("weft network connect bridge {}", a.name)),
                ));
            };
            let h = self.hop(
                &at,
                format!(
                    "the host is {} (the gateway of network {}), on-link via {}",
                    ep.gateway, ep.network, ep.ifname
                ),
                format!("weft exec {} -- ip route get {}", a.name, ep.gateway),
            );
            let _ = h;
            return Ok(Verdict::Delivered {
                to: format!("the host at {} (input is not filtered by weft)", ep.gateway),
            });
        };
        let Some(path) = a.netns.as_deref() else {
            let h = self.hop(
                &at,
                "the sandbox shares the host's network namespace".into(),
                "ip route get".into(),
            );
            let host_at = self.host_at.clone();
            let _ = h;
            return self.leave_host(&host_at, None, d, dst);
        };
        let mut nl = Netns::open(Path::new(path)).and_then(|ns| ns.netlink())?;
        let sb_links: HashMap<u32, Link> = nl.links()?.into_iter().map(|l| (l.index, l)).collect();
        let route = nl.route_get(d, None)?;
        let cmd = format!("weft exec {} -- ip route get {d}", a.name);
        let (oif, gateway, src_ip) = match route {
            RouteHit::Local => {
                self.hop(&at, format!("{d} is an address of the sandbox itself"), cmd);
                return Ok(Verdict::Delivered {
                    to: format!("sandbox {} itself", a.name),
                });
            }
            RouteHit::Unreachable(why) => {
                let h = self.hop(&at, format!("no route to {d}: {why}"), cmd);
                let eps = a.attachment.endpoints();
                let default_net = weft_model::network::default_route_network(
                    eps.iter().filter_map(|e| self.networks.get(&e.network)),
                )
                .map(String::from);
                let fix = if eps.is_empty() {
                    Some(format!("weft network connect bridge {}", a.name))
                } else if let Some(net) = default_net {
                    let gw = eps
                        .iter()
                        .find(|e| e.network == net)
                        .map(|e| e.gateway)
                        .unwrap_or(eps[0].gateway);
                    self.disagreements.push(format!(
                        "sandbox {} has no route to {d}, but weft gave it a default route via {gw} (deleted by hand?)",
                        a.name
                    ));
                    Some(format!(
                        "weft exec {} -- ip route add default via {gw}  (or recreate the sandbox)",
                        a.name
                    ))
                } else {
                    // Only internal networks: no default route, by design.
                    let h = self.hops.len();
                    let names: Vec<&str> = eps.iter().map(|e| e.network.as_str()).collect();
                    return Ok(dropped(
                        h,
                        format!("sandbox {} is only on internal networks ({}): nothing leaves them, so it has no default route", a.name, names.join(", ")),
                        Some(format!("connect it to a non-internal network too: weft network connect bridge {}", a.name)),
                    ));
                };
                return Ok(dropped(
                    h,
                    format!("sandbox {} has no route to {d}", a.name),
                    fix,
                ));
            }
            RouteHit::Unicast {
                oif,
                gateway,
                prefsrc,
            } => (oif, gateway, prefsrc),
        };
        let ifname = sb_links
            .get(&oif)
            .map(|l| l.name.clone())
            .unwrap_or_default();
        let next = gateway.unwrap_or(d);
        self.hop(&at, route_text(d, gateway, &ifname, src_ip), cmd);
        let neigh = nl.neighbour(oif, next)?;
        self.hop(
            &at,
            match &neigh {
                Some(n) => format!("neighbour {next} is at {} ({})", format_mac(&n.mac), n.state.to_lowercase()),
                None => format!("no neighbour entry for {next} yet: the sandbox asks by ARP on {ifname}, and the first packet waits for the answer"),
            },
            format!("weft exec {} -- ip neigh show {next} dev {ifname}", a.name),
        );
        let Some(ep) = a
            .attachment
            .endpoints()
            .iter()
            .find(|e| e.ifname == ifname)
            .cloned()
        else {
            let h = self.hop(
                &at,
                format!("{ifname} is not an interface weft made"),
                format!("weft exec {} -- ip link show {ifname}", a.name),
            );
            return Ok(dropped(
                h,
                format!("the route leaves by {ifname}, which weft does not manage"),
                None,
            ));
        };
        let Some(bridge) = self
            .networks
            .get(&ep.network)
            .and_then(|n| n.bridge())
            .map(String::from)
        else {
            // macvlan: straight onto the parent's LAN, not through the host.
            self.hop(&at, format!("{ifname} is a macvlan interface: the packet goes straight onto the parent's LAN, bypassing the host's stack"), format!("weft exec {} -- ip -d link show {ifname}", a.name));
            return Ok(Verdict::Delivered {
                to: format!("{next} on network {}'s LAN (macvlan)", ep.network),
            });
        };
        let host_at = self.host_at.clone();
        let host_end = ep.host_ifname().unwrap_or_default().to_string();
        let h = match self.index_of(&host_end) {
            Some(i) => {
                let master = self
                    .links
                    .by_index(i)
                    .and_then(|l| l.master)
                    .map(|m| self.link_name(m));
                if master.as_deref() != Some(bridge.as_str()) {
                    self.disagreements.push(format!(
                        "{host_end} (the host end of {}'s {ifname}) should be a port of {bridge}, but its master is {}",
                        a.name,
                        master.as_deref().unwrap_or("none")
                    ));
                    let h = self.hop(
                        &host_at,
                        format!("veth {ifname} -> {host_end}, which is not a port of {bridge}"),
                        format!("ip link show {host_end}"),
                    );
                    return Ok(dropped(h, format!("{host_end} is not on bridge {bridge}"), Some(format!("ip link set {host_end} master {bridge}  (or restart the agent: it reconciles)"))));
                }
                self.hop(
                    &host_at,
                    format!(
                        "veth {ifname} -> {host_end}, a port of bridge {bridge} (network {})",
                        ep.network
                    ),
                    format!("ip link show {host_end}; bridge link show dev {host_end}"),
                )
            }
            None => {
                self.disagreements.push(format!(
                    "{}'s host end {host_end} is missing from the host",
                    a.name
                ));
                let h = self.hop(
                    &host_at,
                    format!("the host end {host_end} of {ifname} does not exist"),
                    format!("ip link show {host_end}"),
                );
                return Ok(dropped(
                    h,
                    "the veth's host end is gone",
                    Some(format!("weft rm -f {0} and run it again", a.name)),
                ));
            }
        };
        let _ = h;
        if gateway.is_none() {
            self.bridge_src = Some(ep.ip);
            return self.on_bridge(&bridge, &ep.network, d, neigh.map(|n| n.mac));
        }
        let _ = proto;
        let bridge_index = self.index_of(&bridge).unwrap_or(0);
        self.forward(&host_at, (ep.ip, bridge_index, &bridge), d, dst, false)
    }

    /// The frame stays on the bridge: its FDB picks the port.
    fn on_bridge(
        &mut self,
        bridge: &str,
        network: &str,
        d: Ipv4Addr,
        seen: Option<[u8; 6]>,
    ) -> Result<Verdict> {
        let host_at = self.host_at.clone();
        if let Some(v) = self
            .bridge_src
            .and_then(|src| self.isolated(&host_at, src, d, false))
        {
            return Ok(v);
        }
        let Some((sb, ep)) = self.local_endpoint(d) else {
            if let Some(v) = self.on_shared_lan(bridge, network, d)? {
                return Ok(v);
            }
            let h = self.hop(
                &host_at,
                format!("bridge {bridge}: no sandbox of this host has {d}"),
                format!("bridge fdb show br {bridge}"),
            );
            return Ok(dropped(
                h,
                format!("nothing answers ARP for {d} on network {network}"),
                Some("check the address with `weft ps`".into()),
            ));
        };
        let mac = match seen {
            Some(m) => m,
            None => crate::driver::endpoint_mac(&ep)?,
        };
        let bridge_index = self.index_of(bridge).unwrap_or(0);
        let port = self.host_nl.bridge_port_for(bridge_index, mac)?;
        let want = ep.host_ifname().unwrap_or_default().to_string();
        let via = match port {
            Some(p) => format!(
                "the FDB sends {} to port {}",
                format_mac(&mac),
                self.link_name(p)
            ),
            None => format!(
                "{} is not learnt yet: the bridge floods the first frame to every port",
                format_mac(&mac)
            ),
        };
        if let Some(p) = port.map(|p| self.link_name(p)).filter(|p| *p != want) {
            self.disagreements.push(format!(
                "bridge {bridge} sends {d}'s MAC to {p}, but {d} is {}'s, behind {want}",
                sb.name
            ));
        }
        self.hop(
            &host_at,
            format!(
                "bridge {bridge}: {via}; {want} is sandbox {}'s veth",
                sb.name
            ),
            format!("bridge fdb show br {bridge} | grep -i {}", format_mac(&mac)),
        );
        // A frame between two ports; the host's own frames leave by the
        // bridge device and pass no forward hook.
        if let Some(src) = self.bridge_src.filter(|_| bridged_frames_filtered()) {
            let pkt = Packet {
                iif: bridge,
                oif: bridge,
                saddr: src,
                daddr: d,
                dnat: false,
            };
            let cmd = "sysctl net.bridge.bridge-nf-call-iptables; nft list chain inet weft forward";
            match forward_rule(&self.table, &pkt) {
                Some((r, false)) => {
                    let h = self.hop(&host_at, format!("br_netfilter is on: bridged frames pass nft forward too, and `{r}` drops them"), cmd.into());
                    return Ok(dropped(h, format!("weft's rule `{r}`"), None));
                }
                Some((r, true)) => {
                    self.hop(&host_at, format!("br_netfilter is on: bridged frames pass nft forward too, and `{r}` accepts them"), cmd.into());
                }
                None => {
                    self.hop(&host_at, "br_netfilter is on: bridged frames pass nft forward too; no rule of weft's matches, the policy accepts".into(), cmd.into());
                }
            }
        }
        Ok(Verdict::Delivered {
            to: format!("sandbox {} ({d}) on network {network}", sb.name),
        })
    }

    /// A network whose one subnet is shared by all hosts: `d` is on
    /// another host when the network's VXLAN device (a port of the
    /// bridge) has a neighbour entry for it, and its FDB names the host.
    /// None when the network is not of that kind.
    fn on_shared_lan(
        &mut self,
        bridge: &str,
        network: &str,
        d: Ipv4Addr,
    ) -> Result<Option<Verdict>> {
        let Some(net) = self
            .networks
            .get(network)
            .filter(|n| n.overlay().is_some_and(|o| o.is_shared()))
            .cloned()
        else {
            return Ok(None);
        };
        let host_at = self.host_at.clone();
        let dev = weft_model::overlay::vxlan_device(&net.id);
        let Some(index) = self.index_of(&dev) else {
            let h = self.hop(&host_at, format!("bridge {bridge}: {d} is not on this host, and the network's VXLAN device {dev} is missing"), format!("ip -d link show {dev}"));
            self.disagreements.push(format!("network {network} spans hosts, but {dev} is not on this host (the agent makes it again at its next verify)"));
            return Ok(Some(dropped(
                h,
                format!("no way to the other hosts of network {network}"),
                None,
            )));
        };
        let Some(n) = self.host_nl.neighbour(index, d)? else {
            let h = self.hop(&host_at, format!("bridge {bridge}: {d} is not on this host; the ARP request goes to {dev}, which has no neighbour entry for {d}, so nobody answers (no sandbox on any host has it)"), format!("ip neigh show dev {dev} {d}"));
            return Ok(Some(dropped(h, format!("no sandbox of network {network} has {d} on any host"), Some("check the address with `weft ps` on each host, or `weft network inspect` for the blocks".into()))));
        };
        self.hop(&host_at, format!("bridge {bridge}: {d} is on another host of this network; {dev} answers ARP for it from its neighbour entry ({}, permanent, programmed by weft), and the bridge floods the frame to {dev} (it learns no MAC on that port)", format_mac(&n.mac)), format!("ip neigh show dev {dev} {d}"));
        let remote = self
            .host_nl
            .fdb(index)?
            .into_iter()
            .find(|(m, _)| *m == n.mac)
            .map(|(_, r)| r);
        let Some(remote) = remote else {
            let h = self.hop(&host_at, format!("no FDB entry for {} on {dev}: the device does not know which host has it, and drops the frame", format_mac(&n.mac)), format!("bridge fdb show dev {dev}"));
            self.disagreements.push(format!("{dev} has a neighbour entry for {d} but no FDB entry for its MAC (removed by hand? the agent restores it at its next verify)"));
            return Ok(Some(dropped(
                h,
                format!("{dev} has no FDB entry for {d}'s MAC"),
                None,
            )));
        };
        self.hop(&host_at, format!("FDB of {dev}: {} is at host {remote}; the frame goes out in UDP to {remote}:{} (VXLAN)", format_mac(&n.mac), net.overlay().map_or(8472, |o| o.port)), format!("bridge fdb show dev {dev} | grep -i {}", format_mac(&n.mac)));
        self.cross_to_peer(&host_at, remote, d, "the VXLAN")
            .map(Some)
    }

    /// Sub-range isolation: `s` and `d` in different sub-ranges of one
    /// network (or one in a sub-range, the other in the rest) is dropped,
    /// bridged by the bridge table, routed via the gateway by the inet
    /// forward chain. The gateway reaches and is reached by all.
    fn isolated(
        &mut self,
        host_at: &str,
        s: Ipv4Addr,
        d: Ipv4Addr,
        routed: bool,
    ) -> Option<Verdict> {
        let net = self
            .networks
            .values()
            .find(|n| {
                let r = n.overlay().map_or(n.subnet, |o| o.range);
                !n.subranges.is_empty() && r.contains(&s) && r.contains(&d)
            })?
            .clone();
        let (a, b) = (net.subrange_of(s), net.subrange_of(d));
        if a == b || s == net.gateway || d == net.gateway {
            return None;
        }
        let (family, cmd) = if routed {
            ("inet", "nft list chain inet weft forward")
        } else {
            ("bridge", "nft list table bridge weft")
        };
        if !routed && !matches!(weft_kernel::nft::list_table("bridge", "weft"), Ok(Some(_))) {
            self.disagreements.push(format!("network {} has isolated sub-ranges, but table bridge weft is missing: nothing keeps them apart on this host (the agent writes it again with its next firewall change)", net.name));
            return None;
        }
        let place = |x: Option<ipnet::Ipv4Net>| {
            x.map_or("the rest of the network (no sub-range)".to_string(), |s| {
                format!("the isolated sub-range {s}")
            })
        };
        let h = self.hop(
            host_at,
            format!(
                "{s} is in {} and {d} in {} of network {}: weft's {family} rule for sub-ranges drops it (`ip saddr . ip daddr != @iso_same`)",
                place(a),
                place(b),
                net.name
            ),
            cmd.into(),
        );
        Some(dropped(
            h,
            format!(
                "isolated sub-ranges of network {}: {s} and {d} are not in the same one",
                net.name
            ),
            Some(format!(
                "run both in one sub-range (`--net {}:subnet=CIDR`), or publish a port (-p) to reach across",
                net.name
            )),
        ))
    }

    fn local_endpoint(&self, ip: Ipv4Addr) -> Option<(std::sync::Arc<Sandbox>, Endpoint)> {
        self.sandboxes.iter().find_map(|s| {
            s.attachment
                .endpoints()
                .iter()
                .find(|e| e.ip == ip)
                .map(|e| (s.clone(), e.clone()))
        })
    }

    /// The host routes a packet that came in on `iif` (a bridge) from `s`.
    fn forward(
        &mut self,
        host_at: &str,
        (s, iif, iif_name): (Ipv4Addr, u32, &str),
        d: Ipv4Addr,
        dst: &Place,
        dnat: bool,
    ) -> Result<Verdict> {
        let hit = self.host_nl.route_get(d, Some((s, iif)))?;
        let cmd = format!("ip route get {d} from {s} iif {iif_name}");
        match hit {
            RouteHit::Local => {
                self.hop(host_at, format!("{d} is an address of this host"), cmd);
                Ok(Verdict::Delivered {
                    to: format!("the host ({d}); weft does not filter input"),
                })
            }
            RouteHit::Unreachable(why) => {
                let h = self.hop(host_at, format!("the host has no route to {d}: {why}"), cmd);
                Ok(dropped(
                    h,
                    format!("no route to {d} on the host"),
                    self.missing_overlay_route(d),
                ))
            }
            RouteHit::Unicast {
                oif,
                gateway,
                prefsrc,
            } => {
                let oif_name = self.link_name(oif);
                self.hop(host_at, route_text(d, gateway, &oif_name, prefsrc), cmd);
                let pkt = Packet {
                    iif: iif_name,
                    oif: &oif_name,
                    saddr: s,
                    daddr: d,
                    dnat,
                };
                if !dnat {
                    if let Some(v) = self.isolated(host_at, s, d, true) {
                        return Ok(v);
                    }
                }
                let rule = forward_rule(&self.table, &pkt);
                let masq = postrouting_rule(&self.table, &pkt);
                match rule {
                    Some((text, false)) => {
                        let h = self.hop(
                            host_at,
                            format!("nft forward: `{text}` drops it"),
                            "nft list chain inet weft forward".into(),
                        );
                        return Ok(dropped(
                            h,
                            self.why_dropped(text, iif_name, &oif_name),
                            self.fix_for(text, dst, iif_name),
                        ));
                    }
                    Some((text, true)) => {
                        self.hop(
                            host_at,
                            format!("nft forward: `{text}` accepts it"),
                            "nft list chain inet weft forward".into(),
                        );
                    }
                    None => {
                        self.hop(host_at, "nft forward: no rule of weft's matches a new connection's first packet: the chain's policy accepts it".into(), "nft list chain inet weft forward".into());
                    }
                }
                if let Some(m) = masq {
                    self.hop(host_at, format!("nft postrouting: `{m}`: its source becomes {} (the address of {oif_name})", prefsrc.map(|p| p.to_string()).unwrap_or_else(|| "the outgoing interface's".into())), "nft list chain inet weft postrouting".into());
                }
                self.deliver_out(host_at, oif, &oif_name, gateway, d, dst)
            }
        }
    }

    fn why_dropped(&self, rule: &str, iif: &str, oif: &str) -> String {
        let net_of = |bridge: &str| {
            self.networks
                .values()
                .find(|n| n.bridge() == Some(bridge))
                .map(|n| n.name.clone())
                .unwrap_or_else(|| bridge.to_string())
        };
        if rule.contains("@bridges oifname @bridges") {
            format!(
                "networks {} and {} are isolated from each other",
                net_of(iif),
                net_of(oif)
            )
        } else if rule.contains("internal_bridges") {
            format!(
                "network {} is internal: nothing leaves it",
                net_of(if rule.starts_with("iifname") {
                    iif
                } else {
                    oif
                })
            )
        } else if rule.contains("overlay_same") {
            "two different overlay networks are isolated from each other".into()
        } else {
            format!("weft's rule `{rule}`")
        }
    }

    fn fix_for(&self, rule: &str, dst: &Place, _iif: &str) -> Option<String> {
        if rule.contains("@bridges oifname @bridges") {
            if let Place::Sandbox(b) = dst {
                let net = &b.attachment.endpoints().first()?.network;
                return Some(format!(
                    "put both on one network, e.g. `weft network connect {net} <source sandbox>`"
                ));
            }
        }
        None
    }

    /// Where a route out of the host leads: a local bridge, a VXLAN
    /// device, a TUN device, or the underlay.
    fn deliver_out(
        &mut self,
        host_at: &str,
        oif: u32,
        oif_name: &str,
        gateway: Option<Ipv4Addr>,
        d: Ipv4Addr,
        dst: &Place,
    ) -> Result<Verdict> {
        // A macvlan sandbox of this host, reached through its parent: the
        // kernel never passes frames between a parent and its macvlans.
        if let Some((sb, ep)) = self.local_endpoint(d).filter(|(_, e)| !e.kind.is_veth()) {
            let net = self.networks.get(&ep.network).cloned();
            let parent = net
                .as_ref()
                .and_then(|n| n.macvlan())
                .map(|m| m.parent.clone());
            if parent.as_deref() == Some(oif_name) {
                let h = self.hop(
                    host_at,
                    format!("{oif_name} is the macvlan parent of sandbox {}'s {}: a parent never exchanges frames with its own macvlan interfaces", sb.name, ep.ifname),
                    format!("ip -d link show {oif_name}"),
                );
                return Ok(dropped(
                    h,
                    format!("the host cannot reach its own macvlan sandbox {} through the parent", sb.name),
                    Some(format!("give the host its own macvlan on the LAN: create network {} with -o host_access=ADDRESS", ep.network)),
                ));
            }
        }
        if let Some(net) = self
            .networks
            .values()
            .find(|n| n.bridge() == Some(oif_name))
            .cloned()
        {
            let neigh = self.host_nl.neighbour(oif, d)?;
            self.hop(
                host_at,
                match &neigh {
                    Some(n) => format!(
                        "neighbour {d} on {oif_name} is at {} ({})",
                        format_mac(&n.mac),
                        n.state.to_lowercase()
                    ),
                    None => format!(
                        "no neighbour entry for {d} on {oif_name} yet: the host asks by ARP"
                    ),
                },
                format!("ip neigh show {d} dev {oif_name}"),
            );
            return self.on_bridge(oif_name, &net.name, d, neigh.map(|n| n.mac));
        }
        if oif_name.starts_with("wvx-") {
            let Some(g) = gateway else {
                let h = self.hop(
                    host_at,
                    format!("{oif_name} without a gateway: weft's overlay routes always have one"),
                    format!("ip route show dev {oif_name}"),
                );
                return Ok(dropped(h, "an overlay route not made by weft", None));
            };
            let neigh = self.host_nl.neighbour(oif, g)?;
            let Some(n) = neigh else {
                self.disagreements.push(format!("no neighbour entry for the VTEP {g} on {oif_name} (weft programs one per peer)"));
                let h = self.hop(host_at, format!("no neighbour entry for the VTEP {g} on {oif_name}: with learning off nothing answers"), format!("ip neigh show {g} dev {oif_name}"));
                return Ok(dropped(
                    h,
                    format!("the VTEP {g} has no MAC"),
                    Some(
                        "wait for the agent's next verify (it restores entries), or restart it"
                            .into(),
                    ),
                ));
            };
            self.hop(
                host_at,
                format!(
                    "VTEP {g} on {oif_name} is at {} ({})",
                    format_mac(&n.mac),
                    n.state.to_lowercase()
                ),
                format!("ip neigh show {g} dev {oif_name}"),
            );
            let remote = self
                .host_nl
                .fdb(oif)?
                .into_iter()
                .find(|(m, _)| *m == n.mac)
                .map(|(_, r)| r);
            let Some(remote) = remote else {
                self.disagreements.push(format!(
                    "no FDB entry for {} on {oif_name}",
                    format_mac(&n.mac)
                ));
                let h = self.hop(host_at, format!("no FDB entry for {} on {oif_name}: the device does not know which host has it", format_mac(&n.mac)), format!("bridge fdb show dev {oif_name}"));
                return Ok(dropped(
                    h,
                    "no FDB entry for the peer's VTEP",
                    Some(
                        "wait for the agent's next verify (it restores entries), or restart it"
                            .into(),
                    ),
                ));
            };
            self.hop(host_at, format!("FDB of {oif_name}: {} is at host {remote}; the frame goes out in UDP to {remote}:8472 (VXLAN)", format_mac(&n.mac)), format!("bridge fdb show dev {oif_name} | grep -i {}", format_mac(&n.mac)));
            return self.cross_to_peer(host_at, remote, d, "VXLAN");
        }
        if oif_name.starts_with("wtu-") {
            let peer = self.peer_of(d);
            let Some((node, public_ip, _)) = peer else {
                let h = self.hop(
                    host_at,
                    format!(
                        "{oif_name} is weft's userspace tunnel, but no peer's subnet holds {d}"
                    ),
                    "weft status".into(),
                );
                return Ok(dropped(h, format!("no host of the cluster has {d}"), None));
            };
            self.hop(host_at, format!("{oif_name} (weft's userspace tunnel) carries it in UDP to {node} at {public_ip}:8285"), "weft status  (peers of the network)".into());
            return self.cross_to_peer(host_at, public_ip, d, "the tunnel");
        }
        // The underlay: host-gw (the gateway is a peer) or the outside world.
        if let Some(g) = gateway {
            if let Some((node, public_ip, _)) = self.peer_of(d).filter(|(_, ip, _)| *ip == g) {
                self.hop("underlay", format!("out of {oif_name} to {node} ({g}), which routes {d} to its bridge (host-gw)"), format!("ip route get {d}"));
                return Ok(Verdict::Delivered {
                    to: format!("{d} on host {node} ({public_ip})"),
                });
            }
        }
        let _ = dst;
        Ok(Verdict::Delivered {
            to: format!(
                "{d} outside, out of {oif_name}{}",
                gateway.map(|g| format!(" via {g}")).unwrap_or_default()
            ),
        })
    }

    fn cross_to_peer(
        &mut self,
        host_at: &str,
        remote: Ipv4Addr,
        d: Ipv4Addr,
        how: &str,
    ) -> Result<Verdict> {
        let hit = self.host_nl.route_get(remote, None)?;
        let out = match hit {
            RouteHit::Unicast { oif, gateway, .. } => format!(
                "dev {}{}",
                self.link_name(oif),
                gateway.map(|g| format!(" via {g}")).unwrap_or_default()
            ),
            RouteHit::Local => "this host itself".into(),
            RouteHit::Unreachable(why) => {
                let h = self.hop(
                    host_at,
                    format!("no route to the peer {remote}: {why}"),
                    format!("ip route get {remote}"),
                );
                return Ok(dropped(
                    h,
                    format!("the underlay cannot reach {remote}"),
                    None,
                ));
            }
        };
        let node = self
            .peer_at(remote)
            .or_else(|| self.peer_of(d).map(|p| p.0))
            .unwrap_or_else(|| remote.to_string());
        self.hop("underlay", format!("{how} packet to {remote} leaves {out}; on {node} the backend hands the inner packet to its bridge, which delivers it to {d}"), format!("ip route get {remote}"));
        Ok(Verdict::Delivered {
            to: format!("{d} on host {node} ({remote})"),
        })
    }

    /// The shared-subnet network that holds both `s` and `d`, if any.
    fn shared_lan_of(&self, s: Ipv4Addr, d: Ipv4Addr) -> Option<Network> {
        self.networks
            .values()
            .find(|n| {
                n.overlay().is_some_and(|o| o.is_shared())
                    && n.subnet.contains(&s)
                    && n.subnet.contains(&d)
            })
            .cloned()
    }

    /// The node of the overlay peer at public address `remote`.
    fn peer_at(&self, remote: Ipv4Addr) -> Option<String> {
        self.cluster?
            .networks
            .iter()
            .flat_map(|n| &n.peers)
            .find(|p| p.public_ip == remote)
            .map(|p| p.node.clone())
    }

    /// The overlay peer whose subnet holds `d`: (node, public ip, problem).
    fn peer_of(&self, d: Ipv4Addr) -> Option<(String, Ipv4Addr, Option<String>)> {
        self.cluster?
            .networks
            .iter()
            .flat_map(|n| &n.peers)
            .find(|p| p.subnet.contains(&d))
            .map(|p| (p.node.clone(), p.public_ip, p.problem.clone()))
    }

    fn missing_overlay_route(&mut self, d: Ipv4Addr) -> Option<String> {
        let (node, ip, _) = self.peer_of(d)?;
        self.disagreements.push(format!("{d} is in {node}'s subnet, but the host has no route to it (weft programs one; deleted by hand?)"));
        let _ = ip;
        Some("wait for the agent's next verify (it restores overlay routes), or restart it".into())
    }

    /// From the host's own stack.
    fn leave_host(
        &mut self,
        host_at: &str,
        from: Option<(Ipv4Addr, usize)>,
        d: Ipv4Addr,
        dst: &Place,
    ) -> Result<Verdict> {
        if let Some((s, _)) = from {
            // From a sandbox of a shared network on another host: the frame
            // comes out of the network's VXLAN device onto the bridge.
            if let Some(net) = self.shared_lan_of(s, d) {
                let dev = weft_model::overlay::vxlan_device(&net.id);
                let bridge = net.bridge().unwrap_or_default().to_string();
                self.hop(host_at, format!("the VXLAN packet from {s} arrives on {dev}, which hands the inner frame to bridge {bridge} (network {} is one subnet on every host: no route between them)", net.name), format!("ip -d link show {dev}"));
                self.bridge_src = Some(s);
                return self.on_bridge(&bridge, &net.name, d, None);
            }
            // From outside: it arrived on the interface the route back uses.
            let back = self.host_nl.route_get(s, None)?;
            if let RouteHit::Unicast { oif, .. } = back {
                let name = self.link_name(oif);
                return self.forward(host_at, (s, oif, &name), d, dst, false);
            }
        }
        let hit = self.host_nl.route_get(d, None)?;
        let cmd = format!("ip route get {d}");
        match hit {
            RouteHit::Local => {
                self.hop(host_at, format!("{d} is an address of this host"), cmd);
                Ok(Verdict::Delivered {
                    to: "the host itself".into(),
                })
            }
            RouteHit::Unreachable(why) => {
                let h = self.hop(host_at, format!("no route to {d}: {why}"), cmd);
                Ok(dropped(
                    h,
                    format!("the host has no route to {d}"),
                    self.missing_overlay_route(d),
                ))
            }
            RouteHit::Unicast {
                oif,
                gateway,
                prefsrc,
            } => {
                let oif_name = self.link_name(oif);
                self.hop(host_at, route_text(d, gateway, &oif_name, prefsrc), cmd);
                self.hop(
                    host_at,
                    "the host's own packets do not pass weft's forward chain".into(),
                    "nft list chain inet weft forward".into(),
                );
                self.deliver_out(host_at, oif, &oif_name, gateway, d, dst)
            }
        }
    }

    /// From outside to a published port of this host.
    fn published_port(
        &mut self,
        from: Ipv4Addr,
        proto: &str,
        port: Option<u16>,
    ) -> Result<Verdict> {
        let host_at = self.host_at.clone();
        let Some(port) = port else {
            let h = self.hop(
                &host_at,
                format!("a packet from {from} to the host"),
                "ip -br addr".into(),
            );
            let _ = h;
            return Ok(Verdict::Delivered {
                to: "the host (weft does not filter input)".into(),
            });
        };
        let Some((to, to_port)) = published(&self.table, proto, port) else {
            let h = self.hop(
                &host_at,
                format!("nft publish: no published {proto} port {port} in map port_any"),
                "nft list map inet weft port_any".into(),
            );
            return Ok(dropped(h, format!("nothing publishes {proto}/{port}; the host's own stack gets it (and refuses it unless something listens)"), Some("weft run -p HOSTPORT:PORT …, see `weft port SANDBOX`".into())));
        };
        self.hop(
            &host_at,
            format!("nft publish: {proto}/{port} is published: DNAT to {to}:{to_port}"),
            "nft list map inet weft port_any".into(),
        );
        let back = self.host_nl.route_get(from, None)?;
        let (iif, iif_name) = match back {
            RouteHit::Unicast { oif, .. } => (oif, self.link_name(oif)),
            _ => {
                let h = self.hop(&host_at, format!("the host has no route back to {from}: the packet would not come in from there (and no reply could go back)"), format!("ip route get {from}"));
                return Ok(dropped(
                    h,
                    format!("{from} is not reachable from this host"),
                    None,
                ));
            }
        };
        let dst = self
            .local_endpoint(to)
            .map(|(s, _)| Place::Sandbox(s))
            .unwrap_or(Place::Address(to));
        self.forward(&host_at, (from, iif, &iif_name), to, &dst, true)
    }
}

/// Whether bridged IPv4 frames also traverse the inet hooks here
/// (br_netfilter loaded and on in this namespace).
fn bridged_frames_filtered() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1")
}

/// A route as `ip route get` prints it: "route to D: via G dev X src S",
/// or "on-link, dev X" without a gateway.
fn route_text(d: Ipv4Addr, gateway: Option<Ipv4Addr>, dev: &str, src: Option<Ipv4Addr>) -> String {
    let src = src.map(|s| format!(" src {s}")).unwrap_or_default();
    match gateway {
        Some(g) => format!("route to {d}: via {g} dev {dev}{src}"),
        None => format!("route to {d}: on-link, dev {dev}{src}"),
    }
}

/// This host's network for a picture: records named, checked against the
/// live links (a bridge that is gone, a veth off its bridge show dashed).
pub(crate) fn topology(
    host: &Host,
    cluster: Option<&ClusterView>,
) -> Result<weft_model::topology::Topology> {
    use weft_model::topology::{TopoBridge, TopoPeer, TopoSandbox, TopoTunnel, Topology};
    let snap = host.snapshot();
    let mut nl = Netlink::open()?;
    let links: HashMap<String, Link> = nl
        .links()?
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    let index_of = |name: &str| links.get(name).map(|l| l.index);
    let bridges: Vec<TopoBridge> = snap
        .networks
        .values()
        .filter_map(|n| {
            n.bridge().map(|b| TopoBridge {
                name: b.to_string(),
                network: n.name.clone(),
                subnet: n.subnet,
                gateway: n.gateway,
                present: links.contains_key(b),
            })
        })
        .collect();
    let mut sandboxes = Vec::new();
    for sb in snap.sandboxes.values() {
        for ep in sb.attachment.endpoints() {
            let bridge = snap.networks.get(&ep.network).and_then(|n| n.bridge());
            let end = ep.host_ifname().map(String::from);
            let plugged = match (&end, bridge) {
                (Some(e), Some(b)) => links.get(e).and_then(|l| l.master) == index_of(b),
                _ => true,
            };
            sandboxes.push(TopoSandbox {
                name: sb.name.clone(),
                ip: ep.ip,
                network: ep.network.clone(),
                host_end: end,
                plugged,
            });
        }
    }
    let tunnels = cluster
        .map(|c| {
            c.networks
                .iter()
                .filter_map(|o| {
                    let net = snap.networks.get(&o.name)?;
                    Some(TopoTunnel {
                        device: crate::backend::device_of(net),
                        backend: o.backend.clone(),
                        network: o.name.clone(),
                        bridge: net.bridge().map(String::from),
                        peers: o
                            .peers
                            .iter()
                            .map(|p| TopoPeer {
                                node: p.node.clone(),
                                public_ip: p.public_ip,
                                subnet: p.subnet,
                                programmed: p.problem.is_none(),
                            })
                            .collect(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Topology {
        host: cluster
            .map(|c| c.node.clone())
            .unwrap_or_else(|| "host".into()),
        public_ip: cluster.and_then(|c| c.public_ip),
        bridges,
        sandboxes,
        tunnels,
    })
}
