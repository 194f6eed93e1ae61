//! weft's nftables table: derived whole from the networks and published
//! ports at start and when networks change; port changes are element adds
//! and deletes, one `nft` batch per sandbox.
//!
//! Published ports are also handed to the connect-time redirect
//! (weft_kernel::connect_redirect), which serves the host's own connections
//! without per-packet NAT. nftables stays the complete implementation: the
//! redirect only takes over connections it can, so any failure of it is
//! logged and costs speed, never reachability.
//!
//! Every published host port is also held: a socket bound to it
//! (weft_kernel::port_hold), kept in step with the port rules, so a host
//! process that has the port makes the publish fail, and one that comes
//! later cannot bind it and lose its traffic without noticing. Ports a CNI
//! runtime hands weft are the runtime's to hold: podman binds them itself.

use crate::error::{AgentError, Result};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use tracing::{info, warn};
use weft_kernel::connect_redirect::ConnectRedirect;
use weft_kernel::port_hold::{self, HoldError, PortHold};
use weft_model::nft::{self, ExposeRule, FirewallSpec, IsolationRule, NetworkRule, PortRule};
use weft_model::ports::Protocol;
use weft_model::Published;

/// One held host port: protocol, host address (every one when `None`), port.
type HoldKey = (Protocol, Option<Ipv4Addr>, u16);

/// Every host port weft holds for a set of published ports, with the `-p`
/// it comes from. Ports the runtime reserves itself are left to it.
fn hold_keys(published: &[Published]) -> impl Iterator<Item = (HoldKey, &Published)> {
    published
        .iter()
        .filter(|p| !p.held_by_runtime)
        .flat_map(|p| {
            let m = &p.mapping;
            (m.host.start..=m.host.end).map(move |port| ((m.protocol, m.host_ip, port), p))
        })
}

fn take(key: HoldKey, p: &Published) -> Result<PortHold> {
    let (protocol, ip, port) = key;
    port_hold::hold(protocol, ip, port).map_err(|e| match e {
        HoldError::InUse { .. } => AgentError::Conflict(format!(
            "-p {}: host port {port}/{protocol} on {}: {e}; stop that process or publish on another host port",
            p.mapping,
            ip.map_or("this host".to_string(), |ip| ip.to_string()),
        )),
        HoldError::Io { source, .. } => {
            AgentError::io(format!("-p {}: holding host port {port}/{protocol}", p.mapping))(source)
        }
    })
}

/// Set to `off` to publish through nftables alone (for comparisons).
pub(crate) const REDIRECT_ENV: &str = "WEFT_CONNECT_REDIRECT";

/// The host's firewall: the nft table and the connect redirect. A value
/// the host state owns; the redirect's BPF links die with it.
#[derive(Default)]
pub(crate) struct Firewall {
    redirect: Option<ConnectRedirect>,
    holds: BTreeMap<HoldKey, PortHold>,
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
            Ok(r) => Firewall {
                redirect: Some(r),
                ..Firewall::default()
            },
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
        isolation: Vec<IsolationRule>,
        ports: impl Iterator<Item = &'a Published> + Clone,
        exposed: Vec<ExposeRule>,
    ) -> Result<()> {
        let spec = FirewallSpec {
            networks,
            isolation,
            exposed,
            ports: ports
                .clone()
                .map(|p| PortRule {
                    mapping: p.mapping,
                    target: p.target,
                })
                .collect(),
        };
        weft_kernel::nft::apply(&nft::render(&spec))?;
        let all: Vec<Published> = ports.clone().cloned().collect();
        self.with_redirect("sync of all ports", |r| {
            r.replace_all(ports.map(|p| (&p.mapping, p.target)))
        });
        // The rules are already there (they were before a restart, too): a
        // port a host process took meanwhile is reported, not fatal.
        let wanted: BTreeMap<HoldKey, &Published> = hold_keys(&all).collect();
        self.holds.retain(|k, _| wanted.contains_key(k));
        for (key, p) in wanted {
            if self.holds.contains_key(&key) {
                continue;
            }
            match take(key, p) {
                Ok(h) => {
                    self.holds.insert(key, h);
                }
                Err(e) => {
                    warn!(error = %e, "published port not held; a host process that binds it gets no traffic")
                }
            }
        }
        Ok(())
    }

    /// Guards bridge ports of networks with sub-ranges (their table
    /// exists: declaring a sub-range rewrote the whole table).
    pub(crate) fn guard(&mut self, ports: &[(String, Ipv4Addr)]) -> Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        Ok(weft_kernel::nft::apply(&nft::render_add_guards(ports))?)
    }

    pub(crate) fn unguard(&mut self, ports: &[(String, Ipv4Addr)]) -> Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        Ok(weft_kernel::nft::apply(&nft::render_delete_guards(ports))?)
    }

    pub(crate) fn add_ports(&mut self, published: &[Published]) -> Result<()> {
        if !published.is_empty() {
            // Held first: a port in use is refused before any rule exists
            // (what was taken is released by drop on every error).
            let mut taken = Vec::new();
            for (key, p) in hold_keys(published) {
                taken.push((key, take(key, p)?));
            }
            weft_kernel::nft::apply(&nft::render_add_ports(&port_rules(published)))?;
            self.holds.extend(taken);
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
            for (key, _) in hold_keys(published) {
                self.holds.remove(&key);
            }
        }
        Ok(())
    }
}
