//! Sandboxes (a container's network namespace) and their attachments.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// One `--net NAME[:ip=ADDR][,alias=NAME…][,subnet=CIDR]` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRequest {
    pub network: String,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// `subnet=CIDR`: an isolated sub-range of the network (weave's
    /// `WEAVE_CIDR=net:CIDR`): the endpoint gets an address and the prefix
    /// length of it, and reaches only endpoints of the same sub-range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subrange: Option<ipnet::Ipv4Net>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `--mac-address` on the only network.
    #[serde(default)]
    pub mac: Option<String>,
}

/// What the user asked for with `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// A network by name (`bridge` is the default network).
    Network(NetRequest),
    Host,
    None,
    /// Share the namespace of another sandbox (by name or id).
    Container(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetModeError {
    #[error("--net container: needs a sandbox name, as in --net container:web")]
    EmptyContainer,
    #[error("--net {0} cannot be combined with other --net values")]
    ModeNotAlone(String),
    #[error("--net {0} is given twice")]
    Duplicate(String),
    #[error("--net {value}: {why}; the form is NAME[:ip=ADDR][,alias=NAME][,subnet=CIDR]")]
    BadOption { value: String, why: String },
}

fn parse_request(s: &str) -> Result<NetRequest, NetModeError> {
    let bad = |why: String| NetModeError::BadOption {
        value: s.to_string(),
        why,
    };
    let (network, opts) = match s.split_once(':') {
        Some((n, o)) => (n, Some(o)),
        None => (s, None),
    };
    let mut req = NetRequest {
        network: network.to_string(),
        ..Default::default()
    };
    for opt in opts.into_iter().flat_map(|o| o.split(',')) {
        match opt.split_once('=') {
            Some(("ip", v)) => {
                if req.ip.is_some() {
                    return Err(bad("ip is given twice".into()));
                }
                req.ip = Some(
                    v.parse()
                        .map_err(|_| bad(format!("{v:?} is not an IPv4 address")))?,
                );
            }
            Some(("alias", v)) => {
                crate::names::validate("alias", v).map_err(|e| bad(e.to_string()))?;
                req.aliases.push(v.to_string());
            }
            Some(("subnet", v)) => {
                if req.subrange.is_some() {
                    return Err(bad("subnet is given twice".into()));
                }
                let net: ipnet::Ipv4Net = v.parse().map_err(|_| {
                    bad(format!(
                        "{v:?} is not an IPv4 subnet in CIDR form, such as 10.32.2.128/25"
                    ))
                })?;
                if net.addr() != net.network() {
                    return Err(bad(format!(
                        "{v} has host bits set: the sub-range is {}",
                        net.trunc()
                    )));
                }
                req.subrange = Some(net);
            }
            _ => return Err(bad(format!("unknown option {opt:?}"))),
        }
    }
    Ok(req)
}

impl std::str::FromStr for NetMode {
    type Err = NetModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "host" => NetMode::Host,
            "none" => NetMode::None,
            _ => match s.strip_prefix("container:") {
                Some("") => return Err(NetModeError::EmptyContainer),
                Some(name) => NetMode::Container(name.to_string()),
                None => NetMode::Network(parse_request(s)?),
            },
        })
    }
}

impl std::fmt::Display for NetMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetMode::Network(n) => f.write_str(&n.network),
            NetMode::Host => f.write_str("host"),
            NetMode::None => f.write_str("none"),
            NetMode::Container(c) => write!(f, "container:{c}"),
        }
    }
}

/// Parses every `--net` value; `host`, `none` and `container:` stand alone.
pub fn parse_net_modes(values: &[String]) -> Result<Vec<NetMode>, NetModeError> {
    let modes = values
        .iter()
        .map(|v| v.parse())
        .collect::<Result<Vec<NetMode>, _>>()?;
    if modes.len() > 1 {
        if let Some(m) = modes.iter().find(|m| !matches!(m, NetMode::Network(_))) {
            return Err(NetModeError::ModeNotAlone(m.to_string()));
        }
    }
    for (i, m) in modes.iter().enumerate() {
        if modes[..i].iter().any(|o| o.to_string() == m.to_string()) {
            return Err(NetModeError::Duplicate(m.to_string()));
        }
    }
    Ok(modes)
}

/// One sandbox's attachment to one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network: String,
    /// Interface name inside the sandbox (eth0, eth1, …).
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// More names the sandbox answers to on this network.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// How it is plugged in; flattened with the tag `kind`, so a record
    /// reads as before (`"kind": "veth", "host_ifname": "wv…"`).
    #[serde(flatten)]
    pub kind: EndpointKind,
    /// A MAC the runtime asked for; otherwise derived from the address.
    #[serde(default)]
    pub mac: Option<String>,
}

impl Endpoint {
    /// The host end of a veth endpoint (macvlan endpoints have none).
    pub fn host_ifname(&self) -> Option<&str> {
        match &self.kind {
            EndpointKind::Veth { host_ifname } => Some(host_ifname),
            EndpointKind::Macvlan => None,
        }
    }
}

impl EndpointKind {
    pub fn is_veth(&self) -> bool {
        matches!(self, EndpointKind::Veth { .. })
    }
}

/// How an endpoint is plugged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EndpointKind {
    /// A veth pair whose host end is on the network's bridge; owned by weft
    /// through the host end's name.
    Veth { host_ifname: String },
    /// A macvlan interface of the network's parent: no host end.
    Macvlan,
}

/// A published port: a `-p` mapping and the sandbox address it leads to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub mapping: crate::ports::PortMapping,
    pub network: String,
    pub target: Ipv4Addr,
    /// The container runtime reserves the host port itself (podman binds
    /// the ports it hands a CNI plugin), so weft must not hold it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held_by_runtime: bool,
}

/// How a sandbox is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Attachment {
    Networks {
        endpoints: Vec<Endpoint>,
    },
    Host,
    None,
    /// Shares the namespace of sandbox `id`.
    Container {
        id: String,
        name: String,
    },
}

impl Attachment {
    pub fn endpoints(&self) -> &[Endpoint] {
        match self {
            Attachment::Networks { endpoints } => endpoints,
            _ => &[],
        }
    }

    /// Whether the sandbox has a network namespace of its own.
    pub fn owns_netns(&self) -> bool {
        matches!(self, Attachment::Networks { .. } | Attachment::None)
    }

    pub fn describe(&self) -> String {
        match self {
            Attachment::Networks { endpoints } => endpoints
                .iter()
                .map(|e| e.network.as_str())
                .collect::<Vec<_>>()
                .join(","),
            Attachment::Host => "host".into(),
            Attachment::None => "none".into(),
            Attachment::Container { name, .. } => format!("container:{name}"),
        }
    }
}

/// A process identified beyond its pid: the start time (clock ticks since
/// boot, /proc/PID/stat field 22) tells a reused pid from the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: i32,
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub attachment: Attachment,
    /// Bind-mounted namespace file, for sandboxes with a namespace of their own.
    pub netns: Option<String>,
    pub process: Option<ProcessRef>,
    /// Removed by the agent as soon as its process exits (`weft run` without -d).
    pub auto_remove: bool,
    pub command: Vec<String>,
    pub created_unix: u64,
    /// Time the agent spent setting up the network, in microseconds.
    pub network_setup_us: u64,
    #[serde(default)]
    pub ports: Vec<Published>,
    /// Set when a runtime (CNI) owns the namespace and asked for the attachment.
    #[serde(default)]
    pub external: Option<External>,
    /// `weft run --hostname`: the command has a UTS namespace with this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// An attachment made for a container runtime in a namespace weft does not own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct External {
    /// CNI: the runtime's container id. Docker: libnetwork's endpoint id.
    pub container_id: String,
    /// CNI: the interface inside the namespace. Docker: the name the
    /// container's end has in the host namespace until Docker moves it.
    pub ifname: String,
    /// Records written before Docker support have none: they are CNI's.
    #[serde(default)]
    pub runtime: Runtime,
}

/// Which runtime interface made an external attachment; each answers only
/// for its own (a CNI GC must not sweep away Docker's endpoints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Cni,
    Docker(DockerEndpoint),
}

/// What weft keeps of an endpoint that Docker's remote driver protocol made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEndpoint {
    /// libnetwork's network id.
    pub network_id: String,
    /// The address came from weft's IPAM driver, so it stays held after the
    /// endpoint goes, until Docker releases it through that driver.
    pub address_from_ipam: bool,
    /// Docker's namespace of the container, set while the endpoint is joined.
    #[serde(default)]
    pub sandbox_key: Option<String>,
    /// The container's name, read from dockerd's API after Join (Docker's
    /// driver protocol does not send it); with its Docker aliases it is
    /// among the endpoint's aliases, so weft's resolver answers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
}

impl Sandbox {
    pub fn short_id(&self) -> &str {
        &self.id[..12.min(self.id.len())]
    }
}

/// Host-side veth name, derived from the sandbox id and the interface index
/// so that it is unique, fits IFNAMSIZ and marks the link as weft's.
pub fn host_veth_name(sandbox_id: &str, index: usize) -> String {
    format!(
        "{}{}{}",
        HOST_VETH_PREFIX,
        &sandbox_id[..10.min(sandbox_id.len())],
        index
    )
}

pub const HOST_VETH_PREFIX: &str = "wv";

/// The MAC of a sandbox interface, derived from its address as Docker does
/// (locally administered, 02:77 then the four address bytes): a sandbox that
/// gets a released address also gets its MAC, so no neighbour entry goes stale.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x77, o[0], o[1], o[2], o[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_modes() {
        assert_eq!(parse_net_modes(&s(&["host"])).unwrap(), vec![NetMode::Host]);
        assert_eq!(parse_net_modes(&s(&["none"])).unwrap(), vec![NetMode::None]);
        assert_eq!(
            parse_net_modes(&s(&["container:web"])).unwrap(),
            vec![NetMode::Container("web".into())]
        );
        let req = |n: &str| {
            NetMode::Network(NetRequest {
                network: n.into(),
                ..Default::default()
            })
        };
        assert_eq!(
            parse_net_modes(&s(&["a", "b"])).unwrap(),
            vec![req("a"), req("b")]
        );
        assert_eq!(
            parse_net_modes(&s(&["a:ip=10.1.0.5,alias=web,alias=www"])).unwrap(),
            vec![NetMode::Network(NetRequest {
                network: "a".into(),
                ip: Some(Ipv4Addr::new(10, 1, 0, 5)),
                aliases: vec!["web".into(), "www".into()],
                mac: None,
                subrange: None,
            })]
        );
        assert_eq!(
            parse_net_modes(&s(&["a:subnet=10.32.2.128/25,ip=10.32.2.130"])).unwrap(),
            vec![NetMode::Network(NetRequest {
                network: "a".into(),
                ip: Some(Ipv4Addr::new(10, 32, 2, 130)),
                subrange: Some("10.32.2.128/25".parse().unwrap()),
                ..Default::default()
            })]
        );
    }

    #[test]
    fn rejects_bad_network_options() {
        for bad in [
            "a:ip=nope",
            "a:mac=1",
            "a:ip=10.0.0.1,ip=10.0.0.2",
            "a:alias=-x",
            "a:subnet=10.32.2.129/25",
            "a:subnet=nope",
            "a:subnet=10.32.2.0/25,subnet=10.32.3.0/25",
        ] {
            assert!(
                matches!(
                    parse_net_modes(&s(&[bad])),
                    Err(NetModeError::BadOption { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parse_net_modes(&s(&["a", "a:ip=10.0.0.1"])),
            Err(NetModeError::Duplicate("a".into()))
        );
    }

    #[test]
    fn rejects_bad_combinations() {
        assert_eq!(
            parse_net_modes(&s(&["container:"])),
            Err(NetModeError::EmptyContainer)
        );
        assert_eq!(
            parse_net_modes(&s(&["host", "bridge"])),
            Err(NetModeError::ModeNotAlone("host".into()))
        );
        assert_eq!(
            parse_net_modes(&s(&["bridge", "bridge"])),
            Err(NetModeError::Duplicate("bridge".into()))
        );
    }

    #[test]
    fn mac_follows_the_address() {
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 1, 2, 3)),
            [0x02, 0x77, 10, 1, 2, 3]
        );
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 1, 2, 3))[0] & 0x03,
            0x02,
            "unicast, locally administered"
        );
    }

    #[test]
    fn veth_names_fit_ifnamsiz() {
        let n = host_veth_name("0123456789abcdef0123", 0);
        assert_eq!(n, "wv01234567890");
        assert!(n.len() <= 15);
    }

    #[test]
    fn endpoint_records_read_as_before() {
        let old = r#"{"network":"bridge","ifname":"eth0","host_ifname":"wv01234567890","ip":"172.17.0.2",
            "prefix_len":16,"gateway":"172.17.0.1","aliases":[],"kind":"veth","mac":null}"#;
        let ep: Endpoint = serde_json::from_str(old).unwrap();
        assert_eq!(ep.host_ifname(), Some("wv01234567890"));
        let mac = Endpoint {
            kind: EndpointKind::Macvlan,
            ..ep.clone()
        };
        let v = serde_json::to_value(&mac).unwrap();
        assert_eq!(v["kind"], "macvlan");
        assert!(v.get("host_ifname").is_none());
        assert_eq!(serde_json::from_value::<Endpoint>(v).unwrap(), mac);
    }
}
