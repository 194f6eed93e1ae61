//! weft's nftables table: derived whole from the networks and published
//! ports at start and when networks change; port changes are element adds
//! and deletes, one `nft` batch per sandbox.

use crate::error::Result;
use crate::host::Inner;
use weft_model::nft::{self, FirewallSpec, NetworkRule, PortRule};
use weft_model::Published;

pub(crate) fn port_rules(published: &[Published]) -> Vec<PortRule> {
    published
        .iter()
        .map(|p| PortRule {
            mapping: p.mapping,
            target: p.target,
        })
        .collect()
}

fn spec(inner: &Inner) -> FirewallSpec {
    FirewallSpec {
        networks: inner
            .networks
            .values()
            .filter(|n| n.net.uses_bridge())
            .map(|n| NetworkRule {
                bridge: n.net.bridge.clone(),
                subnet: n.net.subnet,
                internal: n.net.internal,
                overlay_range: n.net.overlay.as_ref().map(|o| o.range),
            })
            .collect(),
        ports: inner
            .sandboxes
            .values()
            .flat_map(|s| port_rules(&s.ports))
            .collect(),
    }
}

/// Replaces the whole table (one atomic batch).
pub(crate) fn apply_all(inner: &Inner) -> Result<()> {
    weft_kernel::nft::apply(&nft::render(&spec(inner)))?;
    Ok(())
}

pub(crate) fn add_ports(published: &[Published]) -> Result<()> {
    if !published.is_empty() {
        weft_kernel::nft::apply(&nft::render_add_ports(&port_rules(published)))?;
    }
    Ok(())
}

pub(crate) fn delete_ports(published: &[Published]) -> Result<()> {
    if !published.is_empty() {
        weft_kernel::nft::apply(&nft::render_delete_ports(&port_rules(published)))?;
    }
    Ok(())
}
