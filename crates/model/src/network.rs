//! Networks: named L2/L3 domains that sandboxes attach to, and the rules a
//! new one must pass before anything is made.

use crate::names;
use crate::overlay::{Overlay, OverlayError, OverlayRequest};
use crate::subnet;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Name of the network every host has, like Docker's `bridge`.
pub const DEFAULT_NETWORK: &str = "bridge";
/// Linux bridge of the default network.
pub const DEFAULT_BRIDGE: &str = "weft0";
/// Bridges of user-defined networks are `wbr-<id>`, owned by that name.
pub const BRIDGE_PREFIX: &str = "wbr-";
/// The host's own macvlan interface on a macvlan network (host access).
pub const SHIM_PREFIX: &str = "wmh-";

pub const MTU_MIN: u32 = 68;
pub const MTU_MAX: u32 = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Bridge,
    /// Sandboxes straight on a physical LAN, through macvlan interfaces of a parent.
    Macvlan,
    /// One network across hosts (global scope, kept in etcd): a bridge per
    /// host on the subnet that host leases, joined by a backend.
    Overlay,
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::Bridge => "bridge",
            Driver::Macvlan => "macvlan",
            Driver::Overlay => "overlay",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub id: String,
    /// What the driver needs, and only that: a network is exactly one kind.
    /// Flattened with the tag `driver`, so a record reads as before
    /// (`"driver": "bridge", "bridge": "weft0", …`).
    #[serde(flatten)]
    pub settings: DriverSettings,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Dynamic addresses come from here (static ones from the whole subnet).
    #[serde(default)]
    pub ip_range: Option<Ipv4Net>,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// No route out, no masquerade, nothing in or out but the host.
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Isolated sub-ranges in use (`--net NAME:subnet=CIDR`), declared by
    /// the first endpoint placed in each; kept with the network (for a
    /// global one, in etcd), so every host enforces them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subranges: Vec<Ipv4Net>,
}

/// A network's driver-specific settings: one variant per driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase")]
pub enum DriverSettings {
    Bridge(BridgeSettings),
    Macvlan(MacvlanSettings),
    Overlay(OverlaySettings),
}

/// bridge: the Linux bridge that carries the network on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeSettings {
    pub bridge: String,
}

/// macvlan: the parent interface, whether weft created it (an 802.1q
/// sub-interface), and the host's own address on the LAN (host access).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacvlanSettings {
    pub parent: String,
    #[serde(default)]
    pub parent_created: bool,
    #[serde(default)]
    pub host_access: Option<Ipv4Addr>,
}

/// overlay: a bridge per host, joined to the other hosts by a backend.
/// The network's `subnet` and `gateway` are this host's leased subnet and
/// its gateway (in etcd, where no host is meant, they are the whole range).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlaySettings {
    pub bridge: String,
    pub overlay: Overlay,
}

impl DriverSettings {
    pub fn driver(&self) -> Driver {
        match self {
            DriverSettings::Bridge(_) => Driver::Bridge,
            DriverSettings::Macvlan(_) => Driver::Macvlan,
            DriverSettings::Overlay(_) => Driver::Overlay,
        }
    }
}

impl Network {
    pub fn driver(&self) -> Driver {
        self.settings.driver()
    }

    /// The Linux bridge of weft's that endpoints attach to (bridge, overlay).
    pub fn bridge(&self) -> Option<&str> {
        match &self.settings {
            DriverSettings::Bridge(b) => Some(&b.bridge),
            DriverSettings::Overlay(o) => Some(&o.bridge),
            DriverSettings::Macvlan(_) => None,
        }
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        match &self.settings {
            DriverSettings::Overlay(o) => Some(&o.overlay),
            _ => None,
        }
    }

    pub fn macvlan(&self) -> Option<&MacvlanSettings> {
        match &self.settings {
            DriverSettings::Macvlan(m) => Some(m),
            _ => None,
        }
    }

    pub fn masquerade(&self) -> bool {
        !self.internal && self.uses_bridge()
    }

    /// Whether sandboxes attach through a Linux bridge of weft's (bridge and
    /// overlay drivers; macvlan attaches to its parent).
    pub fn uses_bridge(&self) -> bool {
        self.bridge().is_some()
    }

    /// Global networks live in etcd and exist on every host.
    pub fn is_global(&self) -> bool {
        self.overlay().is_some()
    }

    /// The addresses the network spans across all hosts.
    pub fn range(&self) -> Ipv4Net {
        self.overlay().map_or(self.subnet, |o| o.range)
    }

    /// The host's macvlan interface for host access.
    pub fn shim(&self) -> String {
        format!("{SHIM_PREFIX}{}", &self.id[..10.min(self.id.len())])
    }

    /// Whether weft's resolver serves this network (bridge networks but the default).
    pub fn has_resolver(&self) -> bool {
        self.uses_bridge() && self.name != DEFAULT_NETWORK
    }
}

/// The VLAN of a parent named like `eth0.10`: the base interface and the id.
pub fn vlan_of(parent: &str) -> Option<(&str, u16)> {
    let (base, id) = parent.rsplit_once('.')?;
    let id: u16 = id.parse().ok()?;
    (!base.is_empty() && (1..=4094).contains(&id)).then_some((base, id))
}

/// What `weft network create` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    #[serde(default)]
    pub driver: Option<String>,
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub ip_range: Option<Ipv4Net>,
    pub mtu: Option<u32>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `-d overlay`: range, host subnet length, backend, flannel config.
    #[serde(default)]
    pub overlay: OverlayRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Name(#[from] names::NameError),
    #[error("a network named {0:?} already exists; pick another name or remove it with `weft network rm {0}`")]
    Duplicate(String),
    #[error("the name {0:?} is reserved for `--net {0}`; pick another name")]
    Reserved(String),
    #[error("unknown driver {0:?}: weft has -d bridge, -d macvlan and -d overlay")]
    UnknownDriver(String),
    #[error("--subnet {given} has host bits set; did you mean {net}?")]
    HostBits { given: Ipv4Net, net: Ipv4Net },
    #[error("--subnet {0} is too small: use a prefix of /30 or shorter")]
    TooSmall(Ipv4Net),
    #[error(
        "--subnet {subnet} overlaps {other_subnet} of network {other}; pick a subnet that does not"
    )]
    Overlap {
        subnet: Ipv4Net,
        other: String,
        other_subnet: Ipv4Net,
    },
    #[error("no free subnet left in the default pool; give one with --subnet")]
    PoolExhausted,
    #[error("--{what} needs --subnet")]
    NeedsSubnet { what: &'static str },
    #[error("--gateway {gateway} is not a host address of --subnet {subnet}")]
    GatewayOutside { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("--ip-range {range} is not inside --subnet {subnet}")]
    RangeOutside { range: Ipv4Net, subnet: Ipv4Net },
    #[error("--mtu {0} is out of range: use {MTU_MIN} to {MTU_MAX}")]
    Mtu(u32),
    #[error("-o {key}: unknown option; weft knows {known}")]
    UnknownOption { key: String, known: &'static str },
    #[error("-o {key}={value}: {why}")]
    BadOption {
        key: String,
        value: String,
        why: String,
    },
    #[error("bridge name {name:?} is already used by network {other}")]
    BridgeTaken { name: String, other: String },
    #[error("a macvlan network needs -o parent=IFACE (the host's interface on the LAN, or IFACE.VLAN for a VLAN)")]
    NoParent,
    #[error("a macvlan network needs --subnet: the LAN's subnet, as in --subnet 172.16.10.0/24 --gateway 172.16.10.1")]
    MacvlanSubnet,
    #[error(
        "parent {parent} already carries weft's macvlan network {other}; one network per parent"
    )]
    ParentTaken { parent: String, other: String },
    #[error("--{0} is not supported with -d macvlan")]
    NotForMacvlan(&'static str),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("--{0} is not supported with a subnet per host (each host's gateway is the first address of its subnet)")]
    NotForOverlay(&'static str),
    #[error("--{0} applies to -d overlay only")]
    OnlyForOverlay(&'static str),
}

const KNOWN_OPTIONS: &str = "com.docker.network.bridge.name (or bridge.name), com.docker.network.driver.mtu (or mtu); for macvlan parent, macvlan_mode=bridge and host_access=ADDR";

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Validates `spec` against the other networks and, when no subnet is
/// given, picks one clear of them and of `routes`. Makes nothing.
pub fn plan(
    spec: &NetworkSpec,
    id: &str,
    existing: &[Network],
    routes: &[Ipv4Net],
) -> Result<Network, NetworkError> {
    names::validate("network", &spec.name)?;
    if matches!(spec.name.as_str(), "host" | "none") {
        return Err(NetworkError::Reserved(spec.name.clone()));
    }
    if existing.iter().any(|n| n.name == spec.name) {
        return Err(NetworkError::Duplicate(spec.name.clone()));
    }
    let driver = match spec.driver.as_deref() {
        None | Some("bridge") => Driver::Bridge,
        Some("macvlan") => Driver::Macvlan,
        Some("overlay") => Driver::Overlay,
        Some(other) => return Err(NetworkError::UnknownDriver(other.to_string())),
    };
    let overlay = if driver == Driver::Overlay {
        if spec.ip_range.is_some() {
            return Err(NetworkError::NotForOverlay("ip-range"));
        }
        let others: Vec<(&str, &crate::overlay::Overlay)> = existing
            .iter()
            .filter_map(|n| n.overlay().map(|o| (n.name.as_str(), o)))
            .collect();
        let req = OverlayRequest {
            range: spec.subnet.or(spec.overlay.range),
            ..spec.overlay.clone()
        };
        let o = crate::overlay::plan(&req, &others)?;
        // One gateway address on every host's bridge only in the shared kind.
        if spec.gateway.is_some() && !o.is_shared() {
            return Err(NetworkError::NotForOverlay("gateway"));
        }
        Some(o)
    } else {
        let o = &spec.overlay;
        if o.host_subnet_len.is_some() {
            return Err(NetworkError::OnlyForOverlay("host-subnet-len"));
        }
        if o.backend.is_some() {
            return Err(NetworkError::OnlyForOverlay("backend"));
        }
        if o.flannel_config.is_some() {
            return Err(NetworkError::OnlyForOverlay("from-flannel-config"));
        }
        None
    };
    let spec_subnet = overlay.as_ref().map(|o| o.range).or(spec.subnet);
    let (mut parent, mut host_access) = (None, None);

    let mut bridge = format!("{BRIDGE_PREFIX}{}", &id[..10.min(id.len())]);
    let mut mtu = spec.mtu;
    for (key, value) in &spec.options {
        match key.as_str() {
            "com.docker.network.bridge.name" | "bridge.name" => {
                if !valid_ifname(value) {
                    return Err(NetworkError::BadOption {
                        key: key.clone(),
                        value: value.clone(),
                        why: "an interface name has 1 to 15 letters, digits, '-', '_' or '.'"
                            .into(),
                    });
                }
                bridge = value.clone();
            }
            "com.docker.network.driver.mtu" | "mtu" => {
                mtu = Some(value.parse().map_err(|_| NetworkError::BadOption {
                    key: key.clone(),
                    value: value.clone(),
                    why: "not a number".into(),
                })?);
            }
            "parent" if driver == Driver::Macvlan => {
                if !valid_ifname(value) {
                    return Err(NetworkError::BadOption {
                        key: key.clone(),
                        value: value.clone(),
                        why: "not an interface name".into(),
                    });
                }
                parent = Some(value.clone());
            }
            "macvlan_mode" if driver == Driver::Macvlan => {
                if value != "bridge" {
                    return Err(NetworkError::BadOption {
                        key: key.clone(),
                        value: value.clone(),
                        why: "weft supports the bridge mode only".into(),
                    });
                }
            }
            "host_access" if driver == Driver::Macvlan => {
                host_access =
                    Some(
                        value
                            .parse::<Ipv4Addr>()
                            .map_err(|_| NetworkError::BadOption {
                                key: key.clone(),
                                value: value.clone(),
                                why: "not an IPv4 address".into(),
                            })?,
                    );
            }
            _ => {
                return Err(NetworkError::UnknownOption {
                    key: key.clone(),
                    known: KNOWN_OPTIONS,
                })
            }
        }
    }
    if let Some(m) = mtu {
        if !(MTU_MIN..=MTU_MAX).contains(&m) {
            return Err(NetworkError::Mtu(m));
        }
    }
    if driver == Driver::Macvlan {
        let p = parent.as_ref().ok_or(NetworkError::NoParent)?;
        if spec.subnet.is_none() {
            return Err(NetworkError::MacvlanSubnet);
        }
        if spec.internal {
            return Err(NetworkError::NotForMacvlan("internal"));
        }
        if let Some(other) = existing
            .iter()
            .find(|n| n.macvlan().is_some_and(|m| &m.parent == p))
        {
            return Err(NetworkError::ParentTaken {
                parent: p.clone(),
                other: other.name.clone(),
            });
        }
    } else if let Some(other) = existing.iter().find(|n| n.bridge() == Some(&bridge)) {
        return Err(NetworkError::BridgeTaken {
            name: bridge,
            other: other.name.clone(),
        });
    }

    let subnet = match spec_subnet {
        Some(given) => {
            if given.addr() != given.network() {
                return Err(NetworkError::HostBits {
                    given,
                    net: given.trunc(),
                });
            }
            if given.prefix_len() > 30 {
                return Err(NetworkError::TooSmall(given));
            }
            if let Some(o) = existing
                .iter()
                .find(|n| subnet::overlaps(&n.range(), &given))
            {
                return Err(NetworkError::Overlap {
                    subnet: given,
                    other: o.name.clone(),
                    other_subnet: o.range(),
                });
            }
            given
        }
        None => {
            if spec.gateway.is_some() {
                return Err(NetworkError::NeedsSubnet { what: "gateway" });
            }
            if spec.ip_range.is_some() {
                return Err(NetworkError::NeedsSubnet { what: "ip-range" });
            }
            let taken: Vec<Ipv4Net> = existing
                .iter()
                .map(|n| n.range())
                .chain(routes.iter().copied())
                .collect();
            subnet::pick_free(subnet::default_bridge_pool(), &taken)
                .ok_or(NetworkError::PoolExhausted)?
        }
    };
    let gateway = spec.gateway.unwrap_or_else(|| subnet::first_host(&subnet));
    if !subnet.contains(&gateway) || gateway == subnet.network() || gateway == subnet.broadcast() {
        return Err(NetworkError::GatewayOutside { gateway, subnet });
    }
    if let Some(range) = spec.ip_range {
        if !(subnet.contains(&range.network()) && subnet.contains(&range.broadcast())) {
            return Err(NetworkError::RangeOutside { range, subnet });
        }
    }
    if let Some(ip) = host_access {
        if !subnet.contains(&ip)
            || ip == gateway
            || ip == subnet.network()
            || ip == subnet.broadcast()
        {
            return Err(NetworkError::BadOption {
                key: "host_access".into(),
                value: ip.to_string(),
                why: format!("must be a free host address of {subnet}, not the gateway"),
            });
        }
    }
    let settings = match (driver, overlay, parent) {
        (Driver::Macvlan, _, Some(parent)) => DriverSettings::Macvlan(MacvlanSettings {
            parent,
            parent_created: false,
            host_access,
        }),
        (Driver::Overlay, Some(overlay), _) => {
            DriverSettings::Overlay(OverlaySettings { bridge, overlay })
        }
        _ => DriverSettings::Bridge(BridgeSettings { bridge }),
    };
    Ok(Network {
        name: spec.name.clone(),
        id: id.to_string(),
        settings,
        subnet,
        gateway,
        ip_range: spec.ip_range.map(|r| r.trunc()),
        mtu,
        internal: spec.internal,
        labels: spec.labels.clone(),
        options: spec.options.clone(),
        subranges: Vec::new(),
    })
}

/// Which of a sandbox's networks carries its default route: the first
/// non-internal one in lexical order of names, as Docker chooses.
pub fn default_route_network<'a>(
    networks: impl IntoIterator<Item = &'a Network>,
) -> Option<&'a str> {
    networks
        .into_iter()
        .filter(|n| !n.internal)
        .map(|n| n.name.as_str())
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef";

    fn spec(name: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.into(),
            ..Default::default()
        }
    }

    fn net(name: &str, subnet: &str) -> Network {
        plan(
            &NetworkSpec {
                subnet: Some(subnet.parse().unwrap()),
                ..spec(name)
            },
            &format!("{name}{ID}"),
            &[],
            &[],
        )
        .unwrap()
    }

    #[test]
    fn picks_a_subnet_clear_of_networks_and_routes() {
        let existing = [net("a", "172.17.0.0/16")];
        let routes: Vec<Ipv4Net> = vec!["172.18.1.0/24".parse().unwrap()];
        let n = plan(&spec("b"), ID, &existing, &routes).unwrap();
        assert_eq!(n.subnet.to_string(), "172.19.0.0/16");
        assert_eq!(n.gateway.to_string(), "172.19.0.1");
        assert_eq!(n.bridge(), Some("wbr-0123456789"));
        assert!(n.masquerade());
    }

    #[test]
    fn refuses_each_bad_input() {
        let existing = [net("a", "10.1.0.0/16")];
        let with = |f: &dyn Fn(&mut NetworkSpec)| {
            let mut s = spec("b");
            f(&mut s);
            plan(&s, ID, &existing, &[]).unwrap_err().to_string()
        };
        assert!(with(&|s| s.name = "a".into()).contains("already exists"));
        assert!(with(&|s| s.name = "bad name".into()).contains("invalid network name"));
        assert!(with(&|s| s.name = "host".into()).contains("reserved"));
        assert!(with(&|s| s.driver = Some("overlay2".into())).contains("unknown driver"));
        assert!(with(&|s| s.subnet = Some("10.1.128.0/24".parse().unwrap()))
            .contains("overlaps 10.1.0.0/16 of network a"));
        assert!(with(&|s| s.subnet = Some("10.2.0.5/16".parse().unwrap()))
            .contains("did you mean 10.2.0.0/16"));
        assert!(with(&|s| {
            s.subnet = Some("10.2.0.0/16".parse().unwrap());
            s.gateway = Some("10.3.0.1".parse().unwrap());
        })
        .contains("not a host address"));
        assert!(with(&|s| {
            s.subnet = Some("10.2.0.0/16".parse().unwrap());
            s.ip_range = Some("10.3.0.0/24".parse().unwrap());
        })
        .contains("not inside"));
        assert!(with(&|s| s.gateway = Some("10.3.0.1".parse().unwrap())).contains("needs --subnet"));
        assert!(with(&|s| s.mtu = Some(67)).contains("out of range"));
        assert!(with(&|s| s.mtu = Some(70000)).contains("out of range"));
        assert!(with(&|s| {
            s.options.insert("foo".into(), "1".into());
        })
        .contains("unknown option"));
        assert!(with(&|s| {
            s.options
                .insert("bridge.name".into(), "this-name-is-too-long".into());
        })
        .contains("1 to 15"));
        let taken = existing[0].bridge().unwrap().to_string();
        assert!(with(&|s| {
            s.options.insert("bridge.name".into(), taken.clone());
        })
        .contains("already used by network a"));
    }

    #[test]
    fn overlay_networks_span_their_range() {
        let existing = [net("a", "10.1.0.0/16")];
        let mut s = spec("ov");
        s.driver = Some("overlay".into());
        s.subnet = Some("10.40.0.0/16".parse().unwrap());
        s.overlay.host_subnet_len = Some(24);
        let n = plan(&s, ID, &existing, &[]).unwrap();
        assert_eq!(n.range().to_string(), "10.40.0.0/16");
        assert!(n.is_global() && n.uses_bridge() && n.masquerade());
        assert_eq!(n.overlay().unwrap().vni, 1);
        // A local network may not overlap an overlay's range, nor the reverse.
        let mut b = spec("b");
        b.subnet = Some("10.40.5.0/24".parse().unwrap());
        let err = plan(&b, "fedcba9876543210", std::slice::from_ref(&n), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlaps 10.40.0.0/16 of network ov"), "{err}");
        s.subnet = Some("10.1.0.0/20".parse().unwrap());
        assert!(plan(&s, ID, &existing, &[]).is_err());
        s.subnet = Some("10.40.0.0/16".parse().unwrap());
        s.gateway = Some("10.40.0.1".parse().unwrap());
        assert!(plan(&s, ID, &[], &[])
            .unwrap_err()
            .to_string()
            .contains("not supported with a subnet per host"));
        // The shared kind: a host address is masked, --gateway is the
        // gateway on every host, and the network is the whole subnet.
        let mut sh = spec("sh");
        sh.driver = Some("overlay".into());
        sh.subnet = Some("10.0.2.1/24".parse().unwrap());
        let n = plan(&sh, ID, &[], &[]).unwrap();
        assert!(n.overlay().unwrap().is_shared());
        assert_eq!(
            (n.subnet.to_string(), n.gateway.to_string()),
            ("10.0.2.0/24".into(), "10.0.2.1".into())
        );
        sh.gateway = Some("10.0.2.254".parse().unwrap());
        assert_eq!(
            plan(&sh, ID, &[], &[]).unwrap().gateway.to_string(),
            "10.0.2.254"
        );
        let mut b = spec("b");
        b.overlay.backend = Some("host-gw".into());
        assert!(plan(&b, ID, &[], &[])
            .unwrap_err()
            .to_string()
            .contains("-d overlay only"));
    }

    #[test]
    fn options_set_bridge_and_mtu() {
        let mut s = spec("b");
        s.options
            .insert("com.docker.network.bridge.name".into(), "mybr0".into());
        s.options.insert("mtu".into(), "1400".into());
        let n = plan(&s, ID, &[], &[]).unwrap();
        assert_eq!((n.bridge(), n.mtu), (Some("mybr0"), Some(1400)));
    }

    #[test]
    fn default_route_goes_to_first_non_internal_by_name() {
        let mut a = net("alpha", "10.1.0.0/16");
        let b = net("beta", "10.2.0.0/16");
        let z = net("zulu", "10.3.0.0/16");
        assert_eq!(default_route_network([&z, &b, &a]), Some("alpha"));
        a.internal = true;
        assert_eq!(default_route_network([&z, &b, &a]), Some("beta"));
        assert_eq!(default_route_network([&a]), None);
    }

    #[test]
    fn records_read_as_before_and_hold_one_driver() {
        let old = r#"{"name":"front","id":"0123456789abcdef","driver":"bridge","subnet":"10.10.0.0/24",
            "gateway":"10.10.0.1","bridge":"wbr-0123456789","parent":null,"parent_created":false,
            "host_access":null,"ip_range":null,"mtu":null,"internal":false,"labels":{},"options":{}}"#;
        let n: Network = serde_json::from_str(old).unwrap();
        assert_eq!(n.driver(), Driver::Bridge);
        assert_eq!(n.bridge(), Some("wbr-0123456789"));
        let back = serde_json::to_value(&n).unwrap();
        assert_eq!(back["driver"], "bridge");
        assert_eq!(back["bridge"], "wbr-0123456789");
        assert!(
            back.get("parent").is_none(),
            "a bridge network has no parent field"
        );
        let mut m = spec("lan");
        m.driver = Some("macvlan".into());
        m.subnet = Some("172.16.10.0/24".parse().unwrap());
        m.options.insert("parent".into(), "eth0".into());
        let n = plan(&m, ID, &[], &[]).unwrap();
        assert_eq!(
            (n.bridge(), n.macvlan().map(|m| m.parent.as_str())),
            (None, Some("eth0"))
        );
        let again: Network = serde_json::from_value(serde_json::to_value(&n).unwrap()).unwrap();
        assert_eq!(again, n);
    }
}

/// Why a sub-range cannot be used on a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubrangeError {
    #[error("--net {network}:subnet={sub}: the sub-range is outside the network's subnet {subnet}; pick a range inside it, such as {example}")]
    Outside {
        network: String,
        sub: Ipv4Net,
        subnet: Ipv4Net,
        example: Ipv4Net,
    },
    #[error("--net {network}:subnet={sub}: that is the whole network; leave subnet= out, or pick a smaller range inside it")]
    Whole { network: String, sub: Ipv4Net },
    #[error("--net {network}:subnet={sub}: too small, a sub-range needs room for sandboxes: use /{max} or larger")]
    TooSmall {
        network: String,
        sub: Ipv4Net,
        max: u8,
    },
    #[error("--net {network}:subnet={sub}: overlaps the sub-range {other} in use on {network}; use {other} itself or a range clear of it")]
    Overlaps {
        network: String,
        sub: Ipv4Net,
        other: Ipv4Net,
    },
    #[error("--net {network}:subnet={sub}: {ip} of it is in use outside any sub-range ({holder}); pick a range clear of the network's other addresses")]
    HoldsOthers {
        network: String,
        sub: Ipv4Net,
        ip: Ipv4Addr,
        holder: String,
    },
    #[error("--net {network}:subnet={sub}: {why}")]
    NotHere {
        network: String,
        sub: Ipv4Net,
        why: String,
    },
}

/// The smallest sub-range: 8 addresses.
pub const SUBRANGE_MAX_PREFIX: u8 = 29;

impl Network {
    /// Whether `ip` may be given to an endpoint placed in the sub-range
    /// `within` (never its own network or broadcast address), or (None)
    /// in no sub-range of the network.
    pub fn places(&self, ip: Ipv4Addr, within: Option<Ipv4Net>) -> bool {
        match within {
            Some(s) => s.contains(&ip) && ip != s.network() && ip != s.broadcast(),
            None => self.subrange_of(ip).is_none(),
        }
    }

    /// The declared sub-range `ip` is in, if any.
    pub fn subrange_of(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.subranges.iter().copied().find(|s| s.contains(&ip))
    }

    /// Whether `sub` may be used on this network: inside it, not all of
    /// it, not tiny, and either declared already or overlapping none that
    /// is. `in_use` is every address given out on the network with who has
    /// it and the sub-range it was given in (None: the rest of the
    /// network). Returns whether it is new (must be declared first).
    pub fn check_subrange<'a>(
        &self,
        sub: Ipv4Net,
        in_use: impl IntoIterator<Item = (Ipv4Addr, Option<Ipv4Net>, &'a str)>,
    ) -> Result<bool, SubrangeError> {
        let network = self.name.clone();
        match &self.settings {
            DriverSettings::Bridge(_) => {}
            DriverSettings::Overlay(o) if o.overlay.is_shared() => {}
            DriverSettings::Overlay(_) => {
                return Err(SubrangeError::NotHere {
                    network,
                    sub,
                    why: "this network has a subnet per host (flannel's kind), so a sub-range would be one host's; isolated sub-ranges across hosts need a shared network (`weft network create -d overlay --subnet CIDR NAME`)".into(),
                })
            }
            DriverSettings::Macvlan(_) => {
                return Err(SubrangeError::NotHere {
                    network,
                    sub,
                    why: "a macvlan network's sandboxes are on the LAN, where weft does not filter; sub-ranges are for bridge and overlay networks".into(),
                })
            }
        }
        let range = self.overlay().map_or(self.subnet, |o| o.range);
        if !(range.contains(&sub.network()) && range.contains(&sub.broadcast())) {
            let example = range
                .subnets((range.prefix_len() + 1).min(32))
                .ok()
                .and_then(|mut s| s.nth(1))
                .unwrap_or(range);
            return Err(SubrangeError::Outside {
                network,
                sub,
                subnet: range,
                example,
            });
        }
        if sub == range {
            return Err(SubrangeError::Whole { network, sub });
        }
        if sub.prefix_len() > SUBRANGE_MAX_PREFIX {
            return Err(SubrangeError::TooSmall {
                network,
                sub,
                max: SUBRANGE_MAX_PREFIX,
            });
        }
        if self.subranges.contains(&sub) {
            return Ok(false);
        }
        if let Some(other) = self
            .subranges
            .iter()
            .find(|o| o.contains(&sub.network()) || sub.contains(&o.network()))
        {
            return Err(SubrangeError::Overlaps {
                network,
                sub,
                other: *other,
            });
        }
        for (ip, given_in, holder) in in_use {
            if sub.contains(&ip) && given_in != Some(sub) && ip != self.gateway {
                return Err(SubrangeError::HoldsOthers {
                    network,
                    sub,
                    ip,
                    holder: holder.to_string(),
                });
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod subrange_tests {
    use super::*;

    fn bridge(subranges: &[&str]) -> Network {
        Network {
            name: "w".into(),
            id: "0123456789abcdef".into(),
            settings: DriverSettings::Bridge(BridgeSettings {
                bridge: "wbr-0123456789".into(),
            }),
            subnet: "10.32.0.0/16".parse().unwrap(),
            gateway: "10.32.0.1".parse().unwrap(),
            ip_range: None,
            mtu: None,
            internal: false,
            labels: Default::default(),
            options: Default::default(),
            subranges: subranges.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_sub_range_is_inside_clear_and_not_tiny() {
        let n = bridge(&["10.32.2.128/25"]);
        let none = std::iter::empty();
        assert_eq!(
            n.check_subrange(net("10.32.2.128/25"), none.clone()),
            Ok(false)
        );
        assert_eq!(
            n.check_subrange(net("10.32.3.0/25"), none.clone()),
            Ok(true)
        );
        let e = n
            .check_subrange(net("10.33.0.0/24"), none.clone())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("outside the network's subnet 10.32.0.0/16"),
            "{e}"
        );
        assert!(
            e.to_string().contains("10.32.128.0/17"),
            "an example inside: {e}"
        );
        for overlapping in ["10.32.2.0/24", "10.32.2.192/26", "10.32.0.0/16"] {
            let e = n
                .check_subrange(net(overlapping), none.clone())
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    SubrangeError::Overlaps { .. } | SubrangeError::Whole { .. }
                ),
                "{overlapping}: {e}"
            );
        }
        assert!(matches!(
            n.check_subrange(net("10.32.9.0/30"), none.clone()),
            Err(SubrangeError::TooSmall { .. })
        ));
        let used = [(
            "10.32.9.20".parse::<Ipv4Addr>().unwrap(),
            None,
            "sandbox r on h2",
        )];
        let e = n.check_subrange(net("10.32.9.0/24"), used).unwrap_err();
        assert!(
            e.to_string()
                .contains("10.32.9.20 of it is in use outside any sub-range (sandbox r on h2)"),
            "{e}"
        );
        assert_eq!(
            n.subrange_of("10.32.2.200".parse().unwrap()),
            Some(net("10.32.2.128/25"))
        );
        assert_eq!(n.subrange_of("10.32.2.100".parse().unwrap()), None);
    }
}
