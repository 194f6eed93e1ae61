//! Overlay networks: one network across hosts, cut into per-host subnets
//! that each host leases (flannel's model), and the backends that carry
//! packets between hosts.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// How an overlay's packets cross between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// A plain route to each remote host's subnet via that host's address.
    /// Needs every host on one L2 segment.
    HostGw,
    /// Kernel VXLAN.
    Vxlan,
    /// Userspace UDP encapsulation through a TUN device.
    Udp,
    /// Userspace, authenticated and encrypted.
    Secure,
}

/// The backends this build of weft can program. A backend that is named but
/// not here is refused, never replaced by another one.
pub const IMPLEMENTED: &[BackendKind] = &[
    BackendKind::Vxlan,
    BackendKind::HostGw,
    BackendKind::Udp,
    BackendKind::Secure,
];

/// Used when `network create -d overlay` names no backend. Said in the
/// command's output and in `--help`.
pub const DEFAULT_BACKEND: BackendKind = BackendKind::Vxlan;

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::HostGw => "host-gw",
            BackendKind::Vxlan => "vxlan",
            BackendKind::Udp => "udp",
            BackendKind::Secure => "secure",
        }
    }

    /// Parses a backend name as weft or flannel spell it.
    pub fn parse(s: &str) -> Result<BackendKind, OverlayError> {
        let kind = match s.to_ascii_lowercase().as_str() {
            "host-gw" | "hostgw" => BackendKind::HostGw,
            "vxlan" => BackendKind::Vxlan,
            "udp" => BackendKind::Udp,
            "secure" => BackendKind::Secure,
            _ => return Err(OverlayError::UnknownBackend(s.to_string())),
        };
        if !IMPLEMENTED.contains(&kind) {
            return Err(OverlayError::NotImplemented(kind.name()));
        }
        Ok(kind)
    }

    /// Bytes of encapsulation each packet carries on the underlay.
    pub fn overhead(self) -> u32 {
        match self {
            BackendKind::HostGw => 0,
            // outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
            BackendKind::Vxlan => 50,
            BackendKind::Udp => 28,
            BackendKind::Secure => 60,
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn implemented_list() -> String {
    IMPLEMENTED
        .iter()
        .map(|b| b.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cluster-wide part of an overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// The whole overlay range, e.g. 10.40.0.0/16.
    pub range: Ipv4Net,
    /// Prefix length of each host's subnet, e.g. 24.
    pub host_subnet_len: u8,
    pub backend: BackendKind,
    /// VXLAN network identifier, unique per overlay network.
    pub vni: u32,
    /// UDP port of encapsulating backends.
    pub port: u16,
    /// vxlan: plain routes to peers on the same L2 segment.
    #[serde(default)]
    pub direct_routing: bool,
}

impl Overlay {
    /// How many host subnets the range holds.
    pub fn capacity(&self) -> u64 {
        1u64 << (self.host_subnet_len - self.range.prefix_len())
    }
}

/// What `network create -d overlay` asks for, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayRequest {
    pub range: Option<Ipv4Net>,
    pub host_subnet_len: Option<u8>,
    pub backend: Option<String>,
    /// flannel's net-conf.json as given to `--from-flannel-config`.
    pub flannel_config: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    #[error("unknown backend {0:?}: weft knows host-gw, vxlan, udp and secure")]
    UnknownBackend(String),
    #[error("backend {0} is not available in this build of weft; use one of: {list}", list = implemented_list())]
    NotImplemented(&'static str),
    #[error("an overlay network needs --subnet (the whole overlay range, e.g. 10.40.0.0/16) or --from-flannel-config")]
    NoRange,
    #[error("--subnet {given} has host bits set; did you mean {net}?")]
    HostBits { given: Ipv4Net, net: Ipv4Net },
    #[error(
        "--host-subnet-len {len} does not fit --subnet {range}: use a length from {min} to 30"
    )]
    HostSubnetLen { len: u8, range: Ipv4Net, min: u8 },
    #[error("--from-flannel-config is not valid: {0}")]
    Flannel(String),
    #[error(
        "--subnet {given} disagrees with the flannel config's Network {flannel}; give one of them"
    )]
    Conflict { given: Ipv4Net, flannel: Ipv4Net },
    #[error("no free VNI left")]
    NoVni,
}

/// flannel's network config (net-conf.json), the fields weft honours.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FlannelConfig {
    network: String,
    #[serde(default)]
    subnet_len: Option<u8>,
    #[serde(default)]
    backend: Option<FlannelBackend>,
}

#[derive(Debug, Deserialize)]
struct FlannelBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    #[serde(rename = "Port")]
    port: Option<u16>,
    #[serde(rename = "DirectRouting", default)]
    direct_routing: bool,
}

pub const DEFAULT_HOST_SUBNET_LEN: u8 = 24;
pub const VXLAN_PORT: u16 = 8472;
pub const UDP_PORT: u16 = 8285;

/// Validates an overlay request. `used_vnis` are the VNIs of the other
/// overlay networks; the new one gets the lowest free one from 1 (or the
/// flannel config's VNI if free).
pub fn plan(req: &OverlayRequest, used_vnis: &BTreeSet<u32>) -> Result<Overlay, OverlayError> {
    let mut range = req.range;
    let mut len = req.host_subnet_len;
    let mut backend_name = req.backend.clone();
    let (mut vni, mut port, mut direct_routing) = (None, None, false);
    if let Some(text) = &req.flannel_config {
        let cfg: FlannelConfig =
            serde_json::from_str(text).map_err(|e| OverlayError::Flannel(e.to_string()))?;
        let net: Ipv4Net = cfg.network.parse().map_err(|_| {
            OverlayError::Flannel(format!("Network {:?} is not an IPv4 CIDR", cfg.network))
        })?;
        if let Some(given) = range {
            if given != net {
                return Err(OverlayError::Conflict {
                    given,
                    flannel: net,
                });
            }
        }
        range = Some(net);
        len = len.or(cfg.subnet_len);
        if let Some(b) = cfg.backend {
            backend_name = backend_name.or(b.kind);
            vni = b.vni;
            port = b.port;
            direct_routing = b.direct_routing;
        }
    }
    let range = range.ok_or(OverlayError::NoRange)?;
    if range.addr() != range.network() {
        return Err(OverlayError::HostBits {
            given: range,
            net: range.trunc(),
        });
    }
    let backend = match backend_name {
        Some(b) => BackendKind::parse(&b)?,
        None => DEFAULT_BACKEND,
    };
    let len = len.unwrap_or(DEFAULT_HOST_SUBNET_LEN.max(range.prefix_len() + 1));
    if len <= range.prefix_len() || len > 30 {
        return Err(OverlayError::HostSubnetLen {
            len,
            range,
            min: range.prefix_len() + 1,
        });
    }
    let vni = match vni {
        Some(v) if !used_vnis.contains(&v) => v,
        _ => (1..(1 << 24))
            .find(|v| !used_vnis.contains(v))
            .ok_or(OverlayError::NoVni)?,
    };
    // A userspace tunnel binds its own port, so each such network gets one
    // (8285 for the first); VXLAN devices share 8472 and differ by VNI.
    let port = port.unwrap_or(match backend {
        BackendKind::Udp | BackendKind::Secure => UDP_PORT + (vni.min(1000) as u16 - 1),
        _ => VXLAN_PORT,
    });
    Ok(Overlay {
        range,
        host_subnet_len: len,
        backend,
        vni,
        port,
        direct_routing,
    })
}

/// One host's claim on a subnet of an overlay network, as stored in etcd
/// under a key bound to the host's etcd lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub network: String,
    pub subnet: Ipv4Net,
    /// Stable id of the host (kept in its data dir).
    pub host_id: String,
    /// Human name of the host (`--node-name`, default the hostname).
    pub node: String,
    /// Where other hosts send this subnet's traffic.
    pub public_ip: Ipv4Addr,
    /// vxlan: the MAC of this host's VTEP, stable across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    /// secure: the host's public key (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// The key part that names a subnet: `10.40.3.0-24`, as flannel spells it.
pub fn subnet_key(subnet: &Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// Picks a host subnet of `overlay` that nobody holds. `prefer` (the one
/// this host held before) wins when free; otherwise the search starts at a
/// place derived from `seed`, so hosts joining at once rarely race for the
/// same subnet (the etcd transaction settles the races that remain). The
/// first and last subnets are skipped when there are more than two, as
/// flannel does, so no host's gateway is the range's network address.
pub fn pick_host_subnet(
    overlay: &Overlay,
    taken: &BTreeSet<Ipv4Net>,
    prefer: Option<Ipv4Net>,
    seed: u64,
) -> Option<Ipv4Net> {
    let len = overlay.host_subnet_len;
    if let Some(p) = prefer {
        if p.prefix_len() == len && overlay.range.contains(&p) && !taken.contains(&p) {
            return Some(p);
        }
    }
    let count = overlay.capacity();
    let (first, usable) = if count > 2 {
        (1, count - 2)
    } else {
        (0, count)
    };
    let base = u32::from(overlay.range.network()) as u64;
    let size = 1u64 << (32 - len);
    (0..usable)
        .map(|i| first + (seed.wrapping_add(i)) % usable)
        .map(|n| Ipv4Net::new(Ipv4Addr::from((base + n * size) as u32), len).expect("valid prefix"))
        .find(|s| !taken.contains(s))
}

/// Linux's VXLAN devices of overlay networks are `wvx-<id>`, owned by that name.
pub const VXLAN_PREFIX: &str = "wvx-";

/// The VXLAN device of an overlay network on every host.
pub fn vxlan_device(network_id: &str) -> String {
    format!("{VXLAN_PREFIX}{}", &network_id[..10.min(network_id.len())])
}

/// The MAC of a host's VTEP on an overlay network: derived from the host's
/// id and the VNI, so it is the same after every restart and peers never
/// need reprogramming. Locally administered (0x06), unlike sandbox MACs (0x02).
pub fn vtep_mac(host_id: &str, vni: u32) -> [u8; 6] {
    let h = seed_of(&format!("{host_id}/{vni}"));
    let b = h.to_be_bytes();
    [0x06, 0x77, b[0], b[1], b[2], b[3]]
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// A simple stable hash of a host id, to seed [`pick_host_subnet`].
pub fn seed_of(host_id: &str) -> u64 {
    // FNV-1a: stable across builds, unlike std's RandomState.
    host_id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The flannel-compatible subnet file (`<state-dir>/<network>.env`).
pub fn subnet_file(
    overlay: &Overlay,
    subnet: &Ipv4Net,
    gateway: Ipv4Addr,
    mtu: u32,
    ipmasq: bool,
) -> String {
    format!(
        "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
        overlay.range,
        gateway,
        subnet.prefix_len(),
        mtu,
        ipmasq
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(range: &str) -> OverlayRequest {
        OverlayRequest {
            range: Some(range.parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_vni() {
        let o = plan(&req("10.40.0.0/16"), &BTreeSet::new()).unwrap();
        assert_eq!(o.host_subnet_len, 24);
        assert_eq!(o.backend, DEFAULT_BACKEND);
        assert_eq!(o.port, VXLAN_PORT);
        assert_eq!(o.vni, 1);
        let o = plan(&req("10.40.0.0/16"), &[1, 2].into_iter().collect()).unwrap();
        assert_eq!(o.vni, 3);
        // A /24 range gets /25 host subnets rather than an error.
        let o = plan(&req("10.41.0.0/24"), &BTreeSet::new()).unwrap();
        assert_eq!(o.host_subnet_len, 25);
    }

    #[test]
    fn flannel_config_is_accepted() {
        let r = OverlayRequest {
            flannel_config: Some(
                r#"{"Network":"10.50.0.0/16","SubnetLen":26,"Backend":{"Type":"host-gw"}}"#.into(),
            ),
            ..Default::default()
        };
        let o = plan(&r, &BTreeSet::new()).unwrap();
        assert_eq!(o.range.to_string(), "10.50.0.0/16");
        assert_eq!(o.host_subnet_len, 26);
        assert_eq!(o.backend, BackendKind::HostGw);
    }

    #[test]
    fn bad_requests_are_refused_with_reasons() {
        let err = |r: OverlayRequest| plan(&r, &BTreeSet::new()).unwrap_err().to_string();
        assert!(err(OverlayRequest::default()).contains("needs --subnet"));
        assert!(err(req("10.40.0.1/16")).contains("did you mean 10.40.0.0/16"));
        assert!(err(OverlayRequest {
            backend: Some("carrier-pigeon".into()),
            ..req("10.40.0.0/16")
        })
        .contains("unknown backend"));
        assert!(err(OverlayRequest {
            host_subnet_len: Some(16),
            ..req("10.40.0.0/16")
        })
        .contains("from 17 to 30"));
        assert!(err(OverlayRequest {
            flannel_config: Some("{".into()),
            ..Default::default()
        })
        .contains("not valid"));
        assert!(err(OverlayRequest {
            flannel_config: Some(r#"{"Network":"10.9.0.0/16"}"#.into()),
            ..req("10.40.0.0/16")
        })
        .contains("disagrees"));
    }

    #[test]
    fn picks_preferred_then_free_subnets() {
        let o = plan(&req("10.40.0.0/16"), &BTreeSet::new()).unwrap();
        let mut taken = BTreeSet::new();
        let want: Ipv4Net = "10.40.7.0/24".parse().unwrap();
        assert_eq!(pick_host_subnet(&o, &taken, Some(want), 0), Some(want));
        taken.insert(want);
        let got = pick_host_subnet(&o, &taken, Some(want), 6).unwrap();
        assert_ne!(got, want);
        assert!(o.range.contains(&got) && got.prefix_len() == 24);
        // Never the first or last subnet of the range.
        for seed in 0..600 {
            let s = pick_host_subnet(&o, &taken, None, seed).unwrap();
            assert_ne!(s.network(), o.range.network());
            assert_ne!(s.broadcast(), o.range.broadcast());
        }
        // Full: None.
        let small = plan(
            &OverlayRequest {
                host_subnet_len: Some(25),
                ..req("10.41.0.0/24")
            },
            &BTreeSet::new(),
        )
        .unwrap();
        let all: BTreeSet<Ipv4Net> = ["10.41.0.0/25", "10.41.0.128/25"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(pick_host_subnet(&small, &all, None, 3), None);
    }

    #[test]
    fn vtep_macs_are_stable_and_distinct() {
        let a = vtep_mac("host-a", 1);
        assert_eq!(a, vtep_mac("host-a", 1));
        assert_ne!(a, vtep_mac("host-b", 1));
        assert_ne!(a, vtep_mac("host-a", 2));
        assert_eq!(parse_mac(&format_mac(&a)), Some(a));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(parse_mac("zz:00"), None);
        assert_eq!(vxlan_device("0123456789abcdef"), "wvx-0123456789");
    }

    #[test]
    fn subnet_file_is_flannels() {
        let o = plan(&req("10.40.0.0/16"), &BTreeSet::new()).unwrap();
        let s: Ipv4Net = "10.40.3.0/24".parse().unwrap();
        let text = subnet_file(&o, &s, "10.40.3.1".parse().unwrap(), 1500, true);
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.40.0.0/16\nFLANNEL_SUBNET=10.40.3.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(subnet_key(&s), "10.40.3.0-24");
    }
}
