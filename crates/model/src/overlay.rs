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

/// Which of the two kinds of network that spans hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlayKind {
    /// flannel's: each host leases a subnet of the range and routes to the
    /// others' subnets. Records written before the shared kind existed
    /// have no `kind`, and are this one.
    #[default]
    PerHost,
    /// Docker overlay's and weave's: one subnet shared by every host, one
    /// LAN; each host hands out addresses of the IPAM blocks it holds.
    Shared,
}

impl OverlayKind {
    /// As `network ls` and `inspect` say it.
    pub fn describe(self) -> &'static str {
        match self {
            OverlayKind::PerHost => "subnet per host (routed)",
            OverlayKind::Shared => "one subnet shared by all hosts",
        }
    }
}

/// The cluster-wide part of an overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// The whole overlay range, e.g. 10.40.0.0/16.
    pub range: Ipv4Net,
    #[serde(default)]
    pub kind: OverlayKind,
    /// Per-host kind: prefix length of each host's subnet, e.g. 24.
    /// Shared kind: prefix length of each IPAM block a host holds.
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
    pub fn is_shared(&self) -> bool {
        self.kind == OverlayKind::Shared
    }

    /// How many host subnets (shared kind: blocks) the range holds.
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
    #[error("--subnet {0} is too small for an overlay: it must hold at least two host subnets of /30, so use /29 or larger")]
    RangeTooSmall(Ipv4Net),
    #[error("--from-flannel-config is not valid: {0}")]
    Flannel(String),
    #[error(
        "--subnet {given} disagrees with the flannel config's Network {flannel}; give one of them"
    )]
    Conflict { given: Ipv4Net, flannel: Ipv4Net },
    #[error(
        "backend {0} cannot carry a network whose one subnet is shared by all hosts: only vxlan can. \
         Leave --backend out, or add --host-subnet-len 24 for a network with a subnet per host, which {0} carries"
    )]
    SharedBackend(&'static str),
    #[error(transparent)]
    Blocks(#[from] crate::blocks::BlockError),
    #[error("no free VNI left")]
    NoVni,
    #[error(
        "VNI {vni} (Backend.VNI of the flannel config) is already used by overlay network {holder:?}; \
         give another VNI, or leave Backend.VNI out and weft picks the lowest free one"
    )]
    VniTaken { vni: u32, holder: String },
    #[error("VNI {0} is out of range: a VNI is from 1 to 16777215")]
    VniRange(u32),
    #[error(
        "UDP port {port} (Backend.Port of the flannel config) is already used by overlay network {holder:?} \
         ({backend}); give another port, or leave Backend.Port out and weft picks a free one"
    )]
    PortTaken {
        port: u16,
        holder: String,
        backend: BackendKind,
    },
    #[error(
        "no free UDP port for a {backend} network: every port from {first} to 65535 is used by another overlay network; \
         remove one, or give a port with the flannel config's Backend.Port"
    )]
    NoPort { backend: BackendKind, first: u16 },
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

/// Validates an overlay request against `others`, the other overlay
/// networks (name and overlay). The new one gets the flannel config's VNI
/// (an error if another network has it) or else the lowest free one from 1;
/// udp and secure networks get a UDP port no other network binds (see
/// [`pick_port`]).
pub fn plan(req: &OverlayRequest, others: &[(&str, &Overlay)]) -> Result<Overlay, OverlayError> {
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
    // Docker's and weave's meaning wins for the plain command: a range and
    // nothing that speaks of per-host subnets is one shared subnet.
    let kind = if len.is_some() || req.flannel_config.is_some() {
        OverlayKind::PerHost
    } else {
        OverlayKind::Shared
    };
    let mut range = range.ok_or(OverlayError::NoRange)?;
    if range.addr() != range.network() {
        if kind == OverlayKind::Shared {
            // As Docker does with `--subnet=10.0.2.1/24`: the network it names.
            range = range.trunc();
        } else {
            return Err(OverlayError::HostBits {
                given: range,
                net: range.trunc(),
            });
        }
    }
    let backend = match backend_name {
        Some(b) => BackendKind::parse(&b)?,
        None => DEFAULT_BACKEND,
    };
    let len = if kind == OverlayKind::Shared {
        if backend != BackendKind::Vxlan {
            return Err(OverlayError::SharedBackend(backend.name()));
        }
        crate::blocks::block_len(range)?
    } else {
        if range.prefix_len() >= 30 {
            return Err(OverlayError::RangeTooSmall(range));
        }
        let len = len.unwrap_or(DEFAULT_HOST_SUBNET_LEN.max(range.prefix_len() + 1));
        if len <= range.prefix_len() || len > 30 {
            return Err(OverlayError::HostSubnetLen {
                len,
                range,
                min: range.prefix_len() + 1,
            });
        }
        len
    };
    let vni = match vni {
        Some(v) if !(1..=MAX_VNI).contains(&v) => return Err(OverlayError::VniRange(v)),
        Some(v) => match others.iter().find(|(_, o)| o.vni == v) {
            Some((holder, _)) => {
                return Err(OverlayError::VniTaken {
                    vni: v,
                    holder: holder.to_string(),
                })
            }
            None => v,
        },
        None => (1..=MAX_VNI)
            .find(|v| !others.iter().any(|(_, o)| o.vni == *v))
            .ok_or(OverlayError::NoVni)?,
    };
    let port = match port {
        Some(p) => {
            if let Some((holder, o)) = others.iter().find(|(_, o)| ports_clash(backend, p, o)) {
                return Err(OverlayError::PortTaken {
                    port: p,
                    holder: holder.to_string(),
                    backend: o.backend,
                });
            }
            p
        }
        None => pick_port(backend, vni, others)?,
    };
    Ok(Overlay {
        range,
        kind,
        host_subnet_len: len,
        backend,
        vni,
        port,
        direct_routing,
    })
}

/// The largest VNI: VXLAN's identifier has 24 bits.
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Whether a network of `backend` on UDP port `port` cannot coexist with
/// `other` on one host. Kernel VXLAN devices share one socket per port and
/// tell networks apart by VNI, so vxlan networks may share a port; a
/// userspace tunnel (udp, secure) binds its port for itself, so it shares
/// with nobody. host-gw binds nothing.
fn ports_clash(backend: BackendKind, port: u16, other: &Overlay) -> bool {
    let binds = |b: BackendKind| b != BackendKind::HostGw;
    let userspace = |b: BackendKind| matches!(b, BackendKind::Udp | BackendKind::Secure);
    other.port == port
        && binds(backend)
        && binds(other.backend)
        && (userspace(backend) || userspace(other.backend))
}

/// The port of a new network that names none. VXLAN devices share
/// [`VXLAN_PORT`] and differ by VNI. A userspace tunnel binds a port of its
/// own, so a udp or secure network gets `UDP_PORT + VNI - 1` (8285 for VNI
/// 1, as before) when that port exists and no other network binds it, else
/// the lowest port from [`UDP_PORT`] that no other network binds; and an
/// error when there is none. The port is stored with the network, so every
/// host uses the one picked here.
pub fn pick_port(
    backend: BackendKind,
    vni: u32,
    others: &[(&str, &Overlay)],
) -> Result<u16, OverlayError> {
    if !matches!(backend, BackendKind::Udp | BackendKind::Secure) {
        return Ok(VXLAN_PORT);
    }
    let taken: BTreeSet<u16> = others
        .iter()
        .filter(|(_, o)| ports_clash(backend, o.port, o))
        .map(|(_, o)| o.port)
        .collect();
    let free = |p: u16| !taken.contains(&p);
    let derived = u16::try_from(u32::from(UDP_PORT) + vni.saturating_sub(1)).ok();
    derived
        .filter(|&p| free(p))
        .or_else(|| (UDP_PORT..=u16::MAX).find(|&p| free(p)))
        .ok_or(OverlayError::NoPort {
            backend,
            first: UDP_PORT,
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
    /// secure: the host's public key, 64 lowercase hex digits
    /// (`weft_tunnel::encode_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The host's signature over the rest of the lease, made with the key
    /// of its etcd client certificate (docs/ARCHITECTURE.md, "Who may
    /// claim what"). None when the host has no client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<LeaseSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSignature {
    /// The signer's certificate (PEM): its DNS name must be the lease's node.
    pub cert: String,
    /// Base64 of the signature over [`Lease::signed_bytes`].
    pub sig: String,
}

impl Lease {
    /// The lease without its signature: what is signed, and what two
    /// leases are compared by (a new signature of the same content differs).
    pub fn body(&self) -> Lease {
        Lease {
            signed: None,
            ..self.clone()
        }
    }

    /// The bytes a signature covers: the body as JSON.
    pub fn signed_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).expect("serializable")
    }
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
/// `weft expose` on a shared network: the host's end of a veth pair that
/// carries the exposed address (`wex-<id>`), and its peer on the bridge
/// (`wexb<id>`). One prefix owns both.
pub const EXPOSE_PREFIX: &str = "wex";

/// The host end of the exposed address's veth pair.
pub fn expose_link(network_id: &str) -> String {
    format!(
        "{EXPOSE_PREFIX}-{}",
        &network_id[..10.min(network_id.len())]
    )
}

/// The bridge end of the exposed address's veth pair.
pub fn expose_bridge_port(network_id: &str) -> String {
    format!(
        "{EXPOSE_PREFIX}b{}",
        &network_id[..10.min(network_id.len())]
    )
}

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

    /// The per-host kind with the default host subnet length.
    fn per_host(range: &str) -> OverlayRequest {
        OverlayRequest {
            host_subnet_len: Some(24),
            ..req(range)
        }
    }

    #[test]
    fn a_plain_range_is_one_shared_subnet_as_docker_and_weave_mean_it() {
        let o = plan(&req("10.0.2.0/24"), &[]).unwrap();
        assert_eq!(o.kind, OverlayKind::Shared);
        assert_eq!((o.host_subnet_len, o.backend), (28, BackendKind::Vxlan));
        // seed 000 gives a host address: masked, as Docker does.
        let o = plan(&req("10.0.2.1/24"), &[]).unwrap();
        assert_eq!(o.range.to_string(), "10.0.2.0/24");
        // weave's default range: Calico-sized blocks.
        assert_eq!(plan(&req("10.32.0.0/12"), &[]).unwrap().host_subnet_len, 26);
        let e = plan(&req("10.0.2.0/29"), &[]).unwrap_err().to_string();
        assert!(e.contains("use /28 or larger"), "{e}");
        for b in ["udp", "secure", "host-gw"] {
            let e = plan(
                &OverlayRequest {
                    backend: Some(b.into()),
                    ..req("10.0.2.0/24")
                },
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("only vxlan can") && e.contains("--host-subnet-len 24"),
                "{e}"
            );
        }
        // Asking for per-host subnets, or flannel's config, is the other kind.
        assert_eq!(
            plan(&per_host("10.40.0.0/16"), &[]).unwrap().kind,
            OverlayKind::PerHost
        );
        // A record written before the kinds existed reads as per-host.
        let mut v = serde_json::to_value(plan(&per_host("10.40.0.0/16"), &[]).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("kind");
        let old: Overlay = serde_json::from_value(v).unwrap();
        assert_eq!(old.kind, OverlayKind::PerHost);
    }

    #[test]
    fn defaults_and_vni() {
        let o = plan(&per_host("10.40.0.0/16"), &[]).unwrap();
        assert_eq!(o.host_subnet_len, 24);
        assert_eq!(o.backend, DEFAULT_BACKEND);
        assert_eq!(o.port, VXLAN_PORT);
        assert_eq!(o.vni, 1);
        let o1 = o.clone();
        let o2 = Overlay {
            vni: 2,
            ..o.clone()
        };
        let o = plan(&req("10.40.0.0/16"), &[("a", &o1), ("b", &o2)]).unwrap();
        assert_eq!(o.vni, 3);
    }

    #[test]
    fn flannel_config_is_accepted() {
        let r = OverlayRequest {
            flannel_config: Some(
                r#"{"Network":"10.50.0.0/16","SubnetLen":26,"Backend":{"Type":"host-gw"}}"#.into(),
            ),
            ..Default::default()
        };
        let o = plan(&r, &[]).unwrap();
        assert_eq!(o.range.to_string(), "10.50.0.0/16");
        assert_eq!(o.host_subnet_len, 26);
        assert_eq!(o.backend, BackendKind::HostGw);
    }

    #[test]
    fn bad_requests_are_refused_with_reasons() {
        let err = |r: OverlayRequest| plan(&r, &[]).unwrap_err().to_string();
        assert!(err(OverlayRequest::default()).contains("needs --subnet"));
        assert!(err(per_host("10.40.0.1/16")).contains("did you mean 10.40.0.0/16"));
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
            host_subnet_len: Some(30),
            ..req("10.40.0.0/30")
        })
        .contains("use /29 or larger"));
        assert!(plan(
            &OverlayRequest {
                host_subnet_len: Some(30),
                ..req("10.40.0.0/29")
            },
            &[]
        )
        .is_ok());
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

    fn flannel(backend: &str, extra: &str) -> OverlayRequest {
        OverlayRequest {
            flannel_config: Some(format!(
                r#"{{"Network":"10.60.0.0/16","Backend":{{"Type":"{backend}"{extra}}}}}"#
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_taken_vni_is_an_error_naming_it() {
        let blue = plan(&flannel("vxlan", r#","VNI":7"#), &[]).unwrap();
        assert_eq!(blue.vni, 7);
        let e = plan(&flannel("vxlan", r#","VNI":7"#), &[("blue", &blue)]).unwrap_err();
        assert_eq!(
            e,
            OverlayError::VniTaken {
                vni: 7,
                holder: "blue".into()
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("VNI 7") && msg.contains("\"blue\""), "{msg}");
        assert!(msg.contains("leave Backend.VNI out"), "{msg}");
        // A free one is kept; none given: the lowest free one.
        assert_eq!(
            plan(&flannel("vxlan", r#","VNI":8"#), &[("blue", &blue)])
                .unwrap()
                .vni,
            8
        );
        assert_eq!(
            plan(&flannel("vxlan", ""), &[("blue", &blue)]).unwrap().vni,
            1
        );
        for bad in [0, MAX_VNI + 1] {
            let e = plan(&flannel("vxlan", &format!(r#","VNI":{bad}"#)), &[]).unwrap_err();
            assert_eq!(e, OverlayError::VniRange(bad));
        }
    }

    #[test]
    fn userspace_networks_get_distinct_ports() {
        // VNI 1 keeps 8285, VNI n gets 8285 + n - 1 while that is free.
        let first = plan(&flannel("udp", r#","VNI":1"#), &[]).unwrap();
        assert_eq!(first.port, UDP_PORT);
        // VNIs from 1000 on all used to get 9284.
        let mut made: Vec<(String, Overlay)> = Vec::new();
        for vni in [1000, 1001, 5000, 60000, MAX_VNI] {
            let others: Vec<(&str, &Overlay)> = made.iter().map(|(n, o)| (n.as_str(), o)).collect();
            let o = plan(&flannel("secure", &format!(r#","VNI":{vni}"#)), &others).unwrap();
            made.push((format!("n{vni}"), o));
        }
        let ports: BTreeSet<u16> = made.iter().map(|(_, o)| o.port).collect();
        assert_eq!(ports.len(), made.len(), "{made:?}");
        assert_eq!(made[0].1.port, UDP_PORT + 999);
        assert_eq!(made[1].1.port, UDP_PORT + 1000);
        assert_eq!(made[2].1.port, UDP_PORT + 4999);
        // 60000 and 2^24-1 have no port of their own: the lowest free one.
        assert_eq!(made[3].1.port, UDP_PORT);
        assert_eq!(made[4].1.port, UDP_PORT + 1);

        // The derived port taken by another network: the lowest free one.
        let taker = Overlay {
            port: UDP_PORT + 4,
            ..first.clone()
        };
        let o = plan(
            &flannel("udp", r#","VNI":5"#),
            &[("a", &first), ("taker", &taker)],
        )
        .unwrap();
        assert_eq!(o.port, UDP_PORT + 1);

        // VXLAN networks share 8472 among themselves, but no userspace
        // tunnel may take it, nor they a tunnel's port.
        let vx = plan(&flannel("vxlan", ""), &[]).unwrap();
        let vx2 = plan(&flannel("vxlan", ""), &[("vx", &vx)]).unwrap();
        assert_eq!((vx.port, vx2.port), (VXLAN_PORT, VXLAN_PORT));
        let e = plan(
            &flannel("udp", &format!(r#","Port":{VXLAN_PORT}"#)),
            &[("vx", &vx)],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("already used by overlay network \"vx\""),
            "{e}"
        );
        let e = plan(
            &flannel("vxlan", &format!(r#","Port":{UDP_PORT}"#)),
            &[("first", &first)],
        )
        .unwrap_err();
        assert!(
            matches!(e, OverlayError::PortTaken { port: UDP_PORT, .. }),
            "{e}"
        );
        // host-gw binds nothing: it clashes with nobody.
        let hg = plan(
            &flannel("host-gw", &format!(r#","Port":{UDP_PORT}"#)),
            &[("first", &first)],
        );
        assert!(hg.is_ok());
    }

    #[test]
    fn no_free_port_is_a_clear_error() {
        let base = plan(&flannel("udp", ""), &[]).unwrap();
        let all: Vec<Overlay> = (UDP_PORT..=u16::MAX)
            .map(|port| Overlay {
                port,
                ..base.clone()
            })
            .collect();
        let others: Vec<(&str, &Overlay)> = all.iter().map(|o| ("x", o)).collect();
        let e = pick_port(BackendKind::Secure, 3, &others).unwrap_err();
        assert_eq!(
            e,
            OverlayError::NoPort {
                backend: BackendKind::Secure,
                first: UDP_PORT
            }
        );
        assert!(e.to_string().contains("Backend.Port"), "{e}");
        // vxlan still gets its shared port.
        assert_eq!(pick_port(BackendKind::Vxlan, 3, &others), Ok(VXLAN_PORT));
    }

    #[test]
    fn picks_preferred_then_free_subnets() {
        let o = plan(&per_host("10.40.0.0/16"), &[]).unwrap();
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
            &[],
        )
        .unwrap();
        let all: BTreeSet<Ipv4Net> = ["10.41.0.0/25", "10.41.0.128/25"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(pick_host_subnet(&small, &all, None, 3), None);
    }

    #[test]
    fn lease_keys_are_hex_as_documented() {
        // What weft_tunnel::encode_key makes: 64 lowercase hex digits.
        let key: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
        let lease = Lease {
            signed: None,
            network: "n".into(),
            subnet: "10.40.3.0/24".parse().unwrap(),
            host_id: "h".into(),
            node: "node".into(),
            public_ip: "198.51.100.11".parse().unwrap(),
            vtep_mac: None,
            public_key: Some(key.clone()),
        };
        let back: Lease = serde_json::from_str(&serde_json::to_string(&lease).unwrap()).unwrap();
        assert_eq!(back.public_key.as_deref(), Some(key.as_str()));
        assert!(key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()));
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
        let o = plan(&per_host("10.40.0.0/16"), &[]).unwrap();
        let s: Ipv4Net = "10.40.3.0/24".parse().unwrap();
        let text = subnet_file(&o, &s, "10.40.3.1".parse().unwrap(), 1500, true);
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.40.0.0/16\nFLANNEL_SUBNET=10.40.3.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(subnet_key(&s), "10.40.3.0-24");
    }
}
