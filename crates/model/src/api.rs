//! Requests and responses of the agent's local API (HTTP+JSON on a unix
//! socket). The CLI, and later the CNI and Docker plugins, are its clients.

use crate::sandbox::{Attachment, ProcessRef};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

pub const API_PREFIX: &str = "/v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSandbox {
    pub name: Option<String>,
    /// `--net` values as typed; empty means the default network.
    #[serde(default)]
    pub net: Vec<String>,
    pub ip: Option<Ipv4Addr>,
    pub command: Vec<String>,
    #[serde(default)]
    pub auto_remove: bool,
    /// `-p` values as typed: [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp].
    #[serde(default)]
    pub ports: Vec<String>,
    /// Name servers for the sandbox's resolv.conf instead of weft's resolver.
    #[serde(default)]
    pub dns: Vec<std::net::IpAddr>,
    #[serde(default)]
    pub dns_search: Vec<String>,
    #[serde(default)]
    pub dns_options: Vec<String>,
    /// `--hostname`: the command gets a UTS namespace of its own with this name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `--mac-address` of the interface on the only network.
    #[serde(default)]
    pub mac_address: Option<String>,
}

/// `weft network connect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connect {
    pub sandbox: String,
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `weft network disconnect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disconnect {
    pub sandbox: String,
}

/// Sent once the sandbox's process runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartedProcess {
    pub pid: i32,
    /// Its start time (/proc/PID/stat), read by its parent before it could
    /// be reaped: a command that ends at once (`run -d -- true`) is gone by
    /// the time the agent would look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Network ready, process not yet reported.
    Created,
    Running,
    Exited,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Created => "created",
            State::Running => "running",
            State::Exited => "exited",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxView {
    pub id: String,
    pub name: String,
    pub state: State,
    /// The command's exit code once it exited, when weft saw it end
    /// (`weft run -d` leaves a waiter that records it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub pid: Option<i32>,
    pub attachment: Attachment,
    /// Path of the namespace to enter (own, or the shared sandbox's); none for host mode.
    pub netns: Option<String>,
    pub command: Vec<String>,
    pub created_unix: u64,
    pub network_setup_us: u64,
    #[serde(default)]
    pub ports: Vec<crate::sandbox::Published>,
    /// The file to mount on the sandbox's /etc/resolv.conf (none: the host's).
    #[serde(default)]
    pub resolv_conf: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip)]
    pub process: Option<ProcessRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Removed {
    pub id: String,
    pub name: String,
    pub network_teardown_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    pub sandbox: String,
    pub sandbox_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkView {
    pub name: String,
    pub id: String,
    pub driver: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    /// macvlan: the parent interface and the host's own address (host access).
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub host_access: Option<Ipv4Addr>,
    pub ip_range: Option<Ipv4Net>,
    pub mtu: Option<u32>,
    pub internal: bool,
    pub labels: std::collections::BTreeMap<String, String>,
    pub options: std::collections::BTreeMap<String, String>,
    pub endpoints: Vec<EndpointView>,
    /// Overlay networks: the range across hosts, backend, VNI.
    #[serde(default)]
    pub overlay: Option<crate::overlay::Overlay>,
    /// What the network's driver programmed on this host, read back from
    /// the kernel (`network inspect` and `status` fill it; `ls` does not).
    #[serde(default)]
    pub programmed: Vec<ProgrammedView>,
    /// A shared network: every host's blocks and how full they are
    /// (`network inspect` fills it from the cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockView>,
    /// Isolated sub-ranges in use (`--net NAME:subnet=CIDR`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subranges: Vec<Ipv4Net>,
    /// Hosts that expose the network (`weft expose`), this one included
    /// (`network inspect` fills it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed: Vec<ExposedHost>,
}

/// `POST /v1/networks/{name}/expose`: the address to take, else one of
/// the network's pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeRequest {
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
}

/// This host's address on a network it exposes (`weft expose`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedView {
    pub network: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// Exposed without asking: a local bridge network (the host has its
    /// gateway), which cannot be hidden.
    pub default: bool,
    /// `shared`, `per-host` or `bridge`.
    pub kind: String,
}

/// One host that exposes a network, and its address there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExposedHost {
    pub node: String,
    pub ip: Ipv4Addr,
}

/// One kernel object a driver made for a network, as the kernel has it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgrammedView {
    /// What it is to the network: bridge, parent, vxlan device, …
    pub what: String,
    pub name: String,
    pub present: bool,
    /// State as read: up/down/missing and the settings that matter.
    pub detail: String,
    /// The standard command that shows the same thing.
    pub check: String,
}

/// The agent's view of its cluster, for `weft status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub networks: usize,
    pub sandboxes: usize,
    /// False when something is wrong: `problems` says what (`weft status`
    /// then exits 1).
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default)]
    pub problems: Vec<String>,
    #[serde(default)]
    pub sandboxes_running: usize,
    #[serde(default)]
    pub network_list: Vec<NetworkSummary>,
    #[serde(default)]
    pub state_dir: String,
    #[serde(default)]
    pub data_dir: String,
    /// When the agent started (seconds since the epoch).
    #[serde(default)]
    pub started_unix: u64,
    /// Namespaces the pool keeps ready, and how many are ready now.
    #[serde(default)]
    pub netns_pool: (usize, usize),
    /// Objects the drivers programmed that are missing from the kernel now
    /// (deleted behind weft's back): network, and what is missing.
    #[serde(default)]
    pub missing: Vec<(String, ProgrammedView)>,
    /// Networks this host exposes with `weft expose`.
    #[serde(default)]
    pub exposed: Vec<ExposedView>,
    /// Absent on a single-host agent.
    pub cluster: Option<ClusterView>,
    /// Absent without `--docker-plugin`.
    #[serde(default)]
    pub docker: Option<DockerView>,
}

/// The Docker plugin's view of the local dockerd (`weft status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerView {
    /// The plugin socket dockerd finds, and the driver name it gives.
    pub plugin_socket: String,
    pub driver: String,
    /// dockerd's API socket (`--docker-host`).
    pub api: String,
    /// Whether the last look at dockerd got an answer, and if not, why.
    pub reachable: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// In a cluster: global networks are made Docker networks by weft.
    pub auto_networks: bool,
    /// The Docker networks weft made (label `weft.auto=1`) as of the last look.
    #[serde(default)]
    pub networks: Vec<String>,
    /// What the last look could not do (a name taken by a network weft did
    /// not make, a network that still has containers): `weft status` lists
    /// them as problems.
    #[serde(default)]
    pub problems: Vec<String>,
    /// When dockerd was last looked at (seconds since the epoch; 0: never).
    #[serde(default)]
    pub checked_unix: u64,
}

fn yes() -> bool {
    true
}

/// One network in `weft status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkSummary {
    pub name: String,
    pub driver: String,
    pub subnet: ipnet::Ipv4Net,
    pub sandboxes: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterView {
    pub etcd_endpoints: Vec<String>,
    /// The connection to etcd is plain http (no TLS): `weft status` warns.
    #[serde(default)]
    pub etcd_plaintext: bool,
    pub etcd_healthy: bool,
    /// The last error talking to etcd, while unhealthy.
    pub etcd_error: Option<String>,
    /// Since when etcd has been unreachable (seconds since the epoch).
    #[serde(default)]
    pub etcd_down_since_unix: Option<u64>,
    pub host_id: String,
    pub node: String,
    pub public_ip: Option<Ipv4Addr>,
    /// The etcd lease behind this host's subnet leases, and its TTL in seconds.
    pub etcd_lease: Option<i64>,
    pub lease_ttl_secs: u64,
    pub networks: Vec<OverlayStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverlayStatus {
    pub name: String,
    pub range: Ipv4Net,
    pub backend: String,
    /// This host's leased subnet, once it has one.
    pub subnet: Option<Ipv4Net>,
    pub problem: Option<String>,
    pub peers: Vec<PeerView>,
    /// Datapath counters of userspace backends (packets, drops by cause).
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Which kind: a subnet per host, or one subnet shared by all hosts.
    #[serde(default)]
    pub kind: crate::overlay::OverlayKind,
    /// A shared network: every host's blocks and how full they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockView>,
    /// How many sandboxes the network has on other hosts.
    #[serde(default)]
    pub remote_endpoints: usize,
    /// Other hosts that expose the network (their endpoint records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed: Vec<ExposedHost>,
}

/// One IPAM block of a shared network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockView {
    pub block: Ipv4Net,
    /// The host that holds it.
    pub node: String,
    pub used: usize,
    pub capacity: usize,
}

/// One other host of an overlay network and what is programmed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub node: String,
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// e.g. "route 10.40.3.0/24 via 198.51.100.12".
    pub programmed: Option<String>,
    /// Why nothing is programmed, when nothing is.
    pub problem: Option<String>,
    /// secure: the peer's public key changed while this agent ran, and
    /// since when (the key it had before, when it changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_change: Option<KeyChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    pub previous: String,
    pub current: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemovedNetwork {
    pub name: String,
    pub id: String,
}

/// CNI ADD, as the plugin passes it on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniAdd {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub network: String,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub mac: Option<String>,
    /// `-p`-style strings made from the portMappings capability.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// What ADD made, for the plugin's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniAttachment {
    pub host_ifname: String,
    pub host_mac: String,
    pub ifname: String,
    pub mac: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// weft's resolver for this network, if it has one.
    pub nameserver: Option<Ipv4Addr>,
}

/// CNI DEL and CHECK: which attachment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniRef {
    pub container_id: String,
    pub ifname: String,
    pub network: String,
}

/// CNI GC: every attachment of `network` not listed goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniGc {
    pub network: String,
    pub valid: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub message: String,
}
