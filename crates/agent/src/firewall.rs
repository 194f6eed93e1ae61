//! weft's nftables table: derived whole from the networks and published
//! ports at start and when networks change; port changes are element adds
//! and deletes, one `nft` batch per sandbox.
//!
//! Published ports are also handed to the connect-time redirect
//! (weft_kernel::connect_redirect), which serves the host's own connections
//! without per-packet NAT. nftables stays the complete implementation: the
//! redirect only takes over connections it can, so any failure of it is
//! logged and costs speed, never reachability.

use crate::error::Result;
use crate::host::Inner;
use std::sync::Mutex;
use tracing::{info, warn};
use weft_kernel::connect_redirect::ConnectRedirect;
use weft_model::nft::{self, FirewallSpec, NetworkRule, PortRule};
use weft_model::Published;

/// The agent's connect redirect, if it could be loaded. Global because the
/// port functions below are called from everywhere without the `Inner`, and
/// there is one agent per process (its state-dir lock).
static REDIRECT: Mutex<Option<ConnectRedirect>> = Mutex::new(None);

/// Set to `off` to publish through nftables alone (for comparisons).
pub(crate) const REDIRECT_ENV: &str = "WEFT_CONNECT_REDIRECT";

fn with_redirect(
    what: &str,
    f: impl FnOnce(&mut ConnectRedirect) -> weft_kernel::connect_redirect::Result<()>,
) {
    let mut guard = REDIRECT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = guard.as_mut() {
        if let Err(e) = f(r) {
            warn!(error = %e, "connect redirect: {what} failed; those connections from the host go through nft DNAT");
        }
    }
}

/// Loads the connect redirect for the calling thread's namespace (the
/// agent's). Failure is one warning: nftables then serves localhost too.
pub(crate) fn start_redirect(state_dir: &std::path::Path) {
    if std::env::var(REDIRECT_ENV).is_ok_and(|v| v == "off") {
        info!("{REDIRECT_ENV}=off: published ports from the host go through nft DNAT");
        return;
    }
    match ConnectRedirect::load(state_dir) {
        Ok(r) => *REDIRECT.lock().unwrap_or_else(|p| p.into_inner()) = Some(r),
        Err(e) => warn!(
            error = %e,
            "connect redirect unavailable; published ports from the host go through nft DNAT (slower)"
        ),
    }
}

/// Detaches the redirect (the kernel would on exit anyway; this says so in the log).
pub(crate) fn stop_redirect() {
    REDIRECT.lock().unwrap_or_else(|p| p.into_inner()).take();
}

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
    with_redirect("sync of all ports", |r| {
        r.replace_all(
            inner
                .sandboxes
                .values()
                .flat_map(|s| &s.ports)
                .map(|p| (&p.mapping, p.target)),
        )
    });
    Ok(())
}

pub(crate) fn add_ports(published: &[Published]) -> Result<()> {
    if !published.is_empty() {
        weft_kernel::nft::apply(&nft::render_add_ports(&port_rules(published)))?;
        // After nft: a port is never redirected without its DNAT fallback.
        with_redirect("add", |r| {
            published
                .iter()
                .try_for_each(|p| r.add(&p.mapping, p.target))
        });
    }
    Ok(())
}

pub(crate) fn delete_ports(published: &[Published]) -> Result<()> {
    if !published.is_empty() {
        with_redirect("delete", |r| {
            published.iter().try_for_each(|p| r.remove(&p.mapping))
        });
        weft_kernel::nft::apply(&nft::render_delete_ports(&port_rules(published)))?;
    }
    Ok(())
}
