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
use tracing::{info, warn};
use weft_kernel::connect_redirect::ConnectRedirect;
use weft_model::nft::{self, FirewallSpec, NetworkRule, PortRule};
use weft_model::Published;

/// Set to `off` to publish through nftables alone (for comparisons).
pub(crate) const REDIRECT_ENV: &str = "WEFT_CONNECT_REDIRECT";

/// The host's firewall: the nft table and the connect redirect. A value
/// the host state owns; the redirect's BPF links die with it.
#[derive(Default)]
pub(crate) struct Firewall {
    redirect: Option<ConnectRedirect>,
}

fn port_rules(published: &[Published]) -> Vec<PortRule> {
    published
        .iter()
        .map(|p| PortRule {
            mapping: p.mapping,
            target: p.target,
        })
        .collect()
}

impl Firewall {
    /// Loads the connect redirect for the calling thread's namespace (the
    /// agent's). Failure is one warning: nftables then serves localhost too.
    pub(crate) fn start(state_dir: &std::path::Path) -> Firewall {
        if std::env::var(REDIRECT_ENV).is_ok_and(|v| v == "off") {
            info!("{REDIRECT_ENV}=off: published ports from the host go through nft DNAT");
            return Firewall::default();
        }
        match ConnectRedirect::load(state_dir) {
            Ok(r) => Firewall { redirect: Some(r) },
            Err(e) => {
                warn!(
                    error = %e,
                    "connect redirect unavailable; published ports from the host go through nft DNAT (slower)"
                );
                Firewall::default()
            }
        }
    }

    fn with_redirect(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut ConnectRedirect) -> weft_kernel::connect_redirect::Result<()>,
    ) {
        if let Some(r) = self.redirect.as_mut() {
            if let Err(e) = f(r) {
                warn!(error = %e, "connect redirect: {what} failed; those connections from the host go through nft DNAT");
            }
        }
    }

    /// Replaces the whole table (one atomic batch).
    pub(crate) fn apply_all<'a>(
        &mut self,
        networks: Vec<NetworkRule>,
        ports: impl Iterator<Item = &'a Published> + Clone,
    ) -> Result<()> {
        let spec = FirewallSpec {
            networks,
            ports: ports
                .clone()
                .map(|p| PortRule {
                    mapping: p.mapping,
                    target: p.target,
                })
                .collect(),
        };
        weft_kernel::nft::apply(&nft::render(&spec))?;
        self.with_redirect("sync of all ports", |r| {
            r.replace_all(ports.map(|p| (&p.mapping, p.target)))
        });
        Ok(())
    }

    pub(crate) fn add_ports(&mut self, published: &[Published]) -> Result<()> {
        if !published.is_empty() {
            weft_kernel::nft::apply(&nft::render_add_ports(&port_rules(published)))?;
            // After nft: a port is never redirected without its DNAT fallback.
            self.with_redirect("add", |r| {
                published
                    .iter()
                    .try_for_each(|p| r.add(&p.mapping, p.target))
            });
        }
        Ok(())
    }

    pub(crate) fn delete_ports(&mut self, published: &[Published]) -> Result<()> {
        if !published.is_empty() {
            self.with_redirect("delete", |r| {
                published.iter().try_for_each(|p| r.remove(&p.mapping))
            });
            weft_kernel::nft::apply(&nft::render_delete_ports(&port_rules(published)))?;
        }
        Ok(())
    }
}
