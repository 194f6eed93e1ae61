//! The key schema of the store. Networks are persistent configuration (the
//! data dir); sandboxes and address allocations are runtime state (the state
//! dir), because after a reboot no sandbox exists and no address is held.

pub const NETWORKS: &str = "networks/";
pub const SANDBOXES: &str = "sandboxes/";
pub const ADDRESSES: &str = "addresses/";
/// `weft expose`: the address this host has on a network (data dir, so it
/// survives a restart of the agent).
pub const EXPOSED: &str = "exposed/";

pub fn network(name: &str) -> String {
    format!("{NETWORKS}{name}")
}

pub fn exposed(network: &str) -> String {
    format!("{EXPOSED}{network}")
}

pub fn sandbox(id: &str) -> String {
    format!("{SANDBOXES}{id}")
}

/// One allocated address of a network; the value is the sandbox id holding it.
pub fn address(network: &str, ip: std::net::Ipv4Addr) -> String {
    format!("{ADDRESSES}{network}/{ip}")
}

pub fn addresses_of(network: &str) -> String {
    format!("{ADDRESSES}{network}/")
}
