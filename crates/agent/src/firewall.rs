//! weft's nftables table, derived from the networks and applied whole.

use crate::host::NetworkState;
use std::collections::BTreeMap;
use weft_model::nft::{render, FirewallSpec};

pub(crate) fn spec(networks: &BTreeMap<String, NetworkState>) -> FirewallSpec {
    FirewallSpec {
        masquerade: networks
            .values()
            .filter(|n| n.net.masquerade)
            .map(|n| n.net.subnet)
            .collect(),
        bridges: networks.values().map(|n| n.net.bridge.clone()).collect(),
    }
}

pub(crate) fn apply(networks: &BTreeMap<String, NetworkState>) -> crate::error::Result<()> {
    weft_kernel::nft::apply(&render(&spec(networks)))?;
    Ok(())
}
