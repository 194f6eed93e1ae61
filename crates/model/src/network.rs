//! Networks: named L2/L3 domains that sandboxes attach to.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Name of the network every host has, like Docker's `bridge`.
pub const DEFAULT_NETWORK: &str = "bridge";
/// Linux bridge of the default network.
pub const DEFAULT_BRIDGE: &str = "weft0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Bridge,
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::Bridge => "bridge",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub id: String,
    pub driver: Driver,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The Linux bridge that carries this network on this host.
    pub bridge: String,
    /// Whether traffic from the subnet leaving through other interfaces is masqueraded.
    pub masquerade: bool,
}
