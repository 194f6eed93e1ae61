//! `weft expose NET` / `weft hide NET`: this host gets an address on a
//! network, so it reaches the network's sandboxes on every host by their
//! own addresses, and machines that route the network's range via this
//! host reach them too (docs/ARCHITECTURE.md, "Exposing a network").
//!
//! - shared kind: every host's bridge has the same gateway (and MAC), so
//!   the exposed address cannot go on the bridge: it goes on `wex-<id>`,
//!   one end of a veth pair whose peer `wexb<id>` is a port of the bridge,
//!   and is published as an endpoint record, so every other host sends
//!   replies to it here. nft translates the host's own source (the
//!   gateway) and outside sources into it.
//! - per-host kind: the host's gateway is already its own address on the
//!   network; exposing adds only the translation of outside sources.
//! - local bridge networks are exposed by default (the host has the
//!   gateway, replies come back to it); macvlan ones cannot be.
//!
//! State: `exposed/NAME` in the data dir (`{ip}`), adopted at start.

use crate::error::{AgentError, Result};
use crate::host::{Host, Inner};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use tracing::{info, warn};
use weft_kernel::{sysctl, Netlink};
use weft_model::api::{ExposeRequest, ExposedView};
use weft_model::overlay::{expose_bridge_port, expose_link};
use weft_model::sandbox::mac_for;
use weft_model::{keys, Network};
use weft_store::{Store, StoreJson};

/// What the data dir keeps of an exposure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub ip: Ipv4Addr,
}

/// How a network is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One subnet across hosts: an address of the pool on `wex-<id>`.
    Shared,
    /// A subnet per host: the gateway is the host's address.
    PerHost,
    /// A local bridge: exposed by default through its gateway.
    Bridge,
}

impl Kind {
    fn of(net: &Network) -> Result<Kind> {
        if let Some(o) = net.overlay() {
            return Ok(if o.is_shared() {
                Kind::Shared
            } else {
                Kind::PerHost
            });
        }
        if net.bridge().is_some() {
            return Ok(Kind::Bridge);
        }
        Err(AgentError::BadRequest(format!(
            "network {} is a {} network: its sandboxes have addresses of the LAN, which the host reaches as any machine there does (with -o host_access=ADDR for its own sandboxes); there is nothing to expose",
            net.name,
            net.driver()
        )))
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Shared => "shared",
            Kind::PerHost => "per-host",
            Kind::Bridge => "bridge",
        }
    }
}

fn view(net: &Network, kind: Kind, ip: Ipv4Addr) -> ExposedView {
    ExposedView {
        network: net.name.clone(),
        ip,
        prefix_len: net.subnet.prefix_len(),
        default: kind == Kind::Bridge,
        kind: kind.name().into(),
    }
}

/// Makes (or puts right) the veth pair that carries `ip` on a shared
/// network: `wexb<id>` on the bridge, `wex-<id>` with `ip`/32 and its MAC.
fn ensure_link(nl: &mut Netlink, net: &Network, ip: Ipv4Addr) -> Result<()> {
    let (host, port) = (expose_link(&net.id), expose_bridge_port(&net.id));
    let bridge_name = net.bridge().unwrap_or_default();
    let bridge = nl
        .link_by_name(bridge_name)?
        .ok_or_else(|| AgentError::NotReady {
            network: net.name.clone(),
        })?;
    let (h, p) = (nl.link_by_name(&host)?, nl.link_by_name(&port)?);
    if h.is_none() || p.is_none() {
        // Half a pair (one end deleted by hand) cannot be mended: anew.
        nl.delete_link(&host)?;
        nl.delete_link(&port)?;
        let here = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(AgentError::io("open the agent's network namespace"))?;
        nl.add_veth(&port, Some(bridge.index), &host, here.as_raw_fd(), net.mtu)?;
    }
    // Before it is up: no IPv6 (no router solicitations onto the bridge).
    for dev in [&host, &port] {
        sysctl::set(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1")?;
    }
    // It must not answer ARP for the gateway (the bridge's address), only
    // for its own; and replies from remote sandboxes arrive on it while
    // the route back to them is the bridge's: no reverse-path filter.
    sysctl::set(&format!("net.ipv4.conf.{host}.arp_ignore"), "1")?;
    sysctl::set(&format!("net.ipv4.conf.{host}.rp_filter"), "0")?;
    let h = nl
        .link_by_name(&host)?
        .ok_or_else(|| AgentError::Vanished {
            what: host.clone(),
            place: "the agent's namespace".into(),
        })?;
    nl.set_mac_up(h.index, mac_for(ip), net.mtu)?;
    let addr = Ipv4Net::new(ip, 32).expect("/32 is a prefix length");
    nl.add_address(h.index, addr)?;
    if let Some(p) = nl.link_by_name(&port)? {
        if p.master != Some(bridge.index) || !p.up {
            nl.enslave_up(p.index, None, bridge.index, net.mtu)?;
        }
    }
    Ok(())
}

/// Deletes the pair (deleting one end deletes both); absent is fine.
fn delete_link(nl: &mut Netlink, net: &Network) -> Result<()> {
    nl.delete_link(&expose_link(&net.id))?;
    nl.delete_link(&expose_bridge_port(&net.id))?;
    Ok(())
}

/// Whether `all` is set such that the kernel's reverse-path filter drops
/// what arrives on `wex-` whatever its own setting (the effective value is
/// the larger of the two).
fn rp_filter_warning() -> Option<String> {
    let all = sysctl::get("net.ipv4.conf.all.rp_filter").ok()?;
    (all.trim() != "0").then(|| {
        format!(
            "net.ipv4.conf.all.rp_filter is {}: replies from other hosts' sandboxes to the exposed address may be dropped; set it to 0 or 2",
            all.trim()
        )
    })
}

/// The exposed address's link as the kernel has it now (`network
/// inspect`; `status` lists it when missing). Shared kind only.
pub(crate) fn programmed(
    nl: &mut Netlink,
    net: &Network,
    exposed: Option<Ipv4Addr>,
) -> Option<weft_model::api::ProgrammedView> {
    let ip = exposed.filter(|_| net.overlay().is_some_and(|o| o.is_shared()))?;
    let name = expose_link(&net.id);
    let addresses = nl.ipv4_addresses().unwrap_or_default();
    let has = |index: u32| addresses.iter().any(|(i, n)| *i == index && n.addr() == ip);
    let found = nl.link_by_name(&name);
    let detail = match found {
        Ok(Some(l)) if !has(l.index) => format!("WITHOUT {ip}/32"),
        Ok(Some(l)) if l.up => format!("up, {ip}/32, `weft expose` address"),
        Ok(Some(_)) => format!("down, {ip}/32"),
        Ok(None) => "missing".into(),
        Err(e) => format!("cannot read: {e}"),
    };
    Some(weft_model::api::ProgrammedView {
        what: "exposed address".into(),
        present: detail.starts_with("up") || detail.starts_with("down"),
        name: name.clone(),
        detail,
        check: format!("ip -d addr show {name}"),
    })
}

impl Host {
    /// `weft expose NAME [--ip ADDR]`. Validates everything first; a shared
    /// network's address comes from this host's share like a sandbox's
    /// (`NoRoom` / `NeedsClaim` send the API to the cluster, then again).
    pub(crate) fn expose(&self, name: &str, req: &ExposeRequest) -> Result<ExposedView> {
        let mut g = self.lock();
        let inner = &mut *g;
        let n = inner.network(name)?;
        let net = n.net.clone();
        let kind = Kind::of(&net)?;
        match kind {
            Kind::Bridge => {
                if let Some(ip) = req.ip.filter(|ip| *ip != net.gateway) {
                    return Err(AgentError::BadRequest(format!(
                        "network {name} is a local bridge network: it is exposed by default through its gateway {}, the host's address on it; --ip {ip} cannot choose another (leave --ip out)",
                        net.gateway
                    )));
                }
                return Ok(view(&net, kind, net.gateway));
            }
            _ if n.exposed.is_some() => {
                return Err(AgentError::Conflict(format!(
                    "network {name} is already exposed on this host as {}/{}; `weft hide {name}` first to expose it with another address",
                    n.exposed.unwrap_or(net.gateway),
                    net.subnet.prefix_len()
                )))
            }
            _ => {}
        }
        if inner.left_cluster {
            return Err(AgentError::Conflict(format!(
                "this host left the cluster (`weft leave`), so its addresses on {name} may be another host's now; restart the agent to rejoin, then expose"
            )));
        }
        let ip = match kind {
            Kind::PerHost => {
                if let Some(ip) = req.ip.filter(|ip| *ip != net.gateway) {
                    return Err(AgentError::BadRequest(format!(
                        "network {name} has a subnet per host: this host's address on it is its gateway {} (the first address of its lease {}), which it already has; --ip {ip} cannot choose another (leave --ip out)",
                        net.gateway, net.subnet
                    )));
                }
                net.gateway
            }
            _ => {
                if let Some(ip) = req.ip {
                    self.check_static(inner, &net, ip)?;
                }
                let n = inner
                    .networks
                    .get_mut(name)
                    .ok_or_else(|| crate::host::not_found(name))?;
                let ip = n.allocate(req.ip, None)?;
                if let Err(e) = ensure_link(&mut inner.nl, &net, ip) {
                    let _ = delete_link(&mut inner.nl, &net);
                    if let Some(n) = inner.networks.get_mut(name) {
                        n.release(ip);
                    }
                    return Err(e);
                }
                ip
            }
        };
        if let Some(n) = inner.networks.get_mut(name) {
            n.exposed = Some(ip);
        }
        let done = inner
            .networks_db
            .put_json(&keys::exposed(name), &Stored { ip })
            .map_err(AgentError::from)
            .and_then(|_| inner.apply_firewall());
        if let Err(e) = done {
            undo(inner, &net, kind, ip);
            return Err(e);
        }
        if kind == Kind::Shared {
            if let Some(w) = rp_filter_warning() {
                warn!(network = %name, "{w}");
            }
        }
        info!(network = %name, %ip, kind = kind.name(), "network exposed on this host");
        Ok(view(&net, kind, ip))
    }

    /// `--ip` of a shared network: inside the subnet, not the gateway, not
    /// a sandbox's here (named). Another host's is refused by `allocate`
    /// (its records) or by the cluster's claim, naming the holder.
    fn check_static(&self, inner: &Inner, net: &Network, ip: Ipv4Addr) -> Result<()> {
        let name = &net.name;
        if !net.subnet.contains(&ip) || ip == net.subnet.network() || ip == net.subnet.broadcast() {
            return Err(AgentError::BadRequest(format!(
                "--ip {ip} is not a host address of {name}'s subnet {}; pick one inside it or leave --ip out",
                net.subnet
            )));
        }
        if ip == net.gateway {
            return Err(AgentError::BadRequest(format!(
                "--ip {ip} is {name}'s gateway, which every host has on its bridge; pick another address or leave --ip out"
            )));
        }
        let holder = inner.sandboxes.values().find(|s| {
            s.attachment
                .endpoints()
                .iter()
                .any(|e| e.network == *name && e.ip == ip)
        });
        if let Some(s) = holder {
            return Err(AgentError::Conflict(format!(
                "--ip {ip} is taken by sandbox {} on this host; pick another address or leave --ip out",
                s.name
            )));
        }
        let n = inner.network(name)?;
        n.pool
            .check_free(ip)
            .map_err(|e| AgentError::Conflict(e.to_string()))
    }

    /// `weft hide NAME`: the translation goes first (nothing is sent from
    /// the address any more), then the link, the address, the record.
    /// Every failure is reported.
    pub(crate) fn hide(&self, name: &str) -> Result<ExposedView> {
        let mut g = self.lock();
        let inner = &mut *g;
        let n = inner.network(name)?;
        let net = n.net.clone();
        let kind = Kind::of(&net)?;
        if kind == Kind::Bridge {
            return Err(AgentError::BadRequest(format!(
                "network {name} is a local bridge network: the host has its gateway {} and so always reaches its sandboxes; it cannot be hidden (use an --internal network to keep the world out, or remove the route to it on other machines)",
                net.gateway
            )));
        }
        let Some(ip) = n.exposed else {
            return Err(AgentError::BadRequest(format!(
                "network {name} is not exposed on this host; `weft expose {name}` exposes it"
            )));
        };
        if let Some(n) = inner.networks.get_mut(name) {
            n.exposed = None;
        }
        if let Err(e) = inner.apply_firewall() {
            if let Some(n) = inner.networks.get_mut(name) {
                n.exposed = Some(ip);
            }
            return Err(e);
        }
        let errors = forget(inner, &net, kind, ip);
        AgentError::all(errors)?;
        info!(network = %name, %ip, "network hidden on this host");
        Ok(view(&net, kind, ip))
    }
}

/// Takes an exposure back after a failed step of `expose`.
fn undo(inner: &mut Inner, net: &Network, kind: Kind, ip: Ipv4Addr) {
    if let Some(n) = inner.networks.get_mut(&net.name) {
        n.exposed = None;
    }
    let _ = forget(inner, net, kind, ip);
    let _ = inner.apply_firewall();
}

/// The link, the address and the record of an exposure (the nft part is
/// the caller's: the table is rendered from `exposed`).
fn forget(inner: &mut Inner, net: &Network, kind: Kind, ip: Ipv4Addr) -> Vec<AgentError> {
    let mut errors = Vec::new();
    if kind == Kind::Shared {
        if let Err(e) = delete_link(&mut inner.nl, net) {
            errors.push(e);
        }
        if let Some(n) = inner.networks.get_mut(&net.name) {
            n.release(ip);
        }
    }
    if let Err(e) = inner.networks_db.delete(&keys::exposed(&net.name)) {
        errors.push(e.into());
    }
    errors
}

impl Inner {
    /// At start: every stored exposure taken back (the address in the
    /// pool, the link made or mended); the table is applied after.
    pub(crate) fn adopt_exposures(&mut self) -> Result<()> {
        let stored: Vec<(String, Stored)> = self
            .networks_db
            .list(keys::EXPOSED)?
            .into_iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(keys::EXPOSED)?.to_string();
                Some((name, serde_json::from_slice(&v).ok()?))
            })
            .collect();
        for (name, s) in stored {
            let Some(n) = self.networks.get_mut(&name) else {
                warn!(network = %name, "exposure of a network this host does not have; forgetting it");
                let _ = self.networks_db.delete(&keys::exposed(&name));
                continue;
            };
            let net = n.net.clone();
            let ip = match Kind::of(&net) {
                Ok(Kind::Shared) => {
                    if let Err(e) = n.pool.restore(s.ip) {
                        warn!(network = %name, ip = %s.ip, error = %e, "exposed address conflict on adoption");
                    }
                    if let Err(e) = ensure_link(&mut self.nl, &net, s.ip) {
                        warn!(network = %name, error = %e, "could not restore the exposed address's link");
                    }
                    s.ip
                }
                Ok(Kind::PerHost) => net.gateway,
                _ => {
                    let _ = self.networks_db.delete(&keys::exposed(&name));
                    continue;
                }
            };
            if let Some(n) = self.networks.get_mut(&name) {
                n.exposed = Some(ip);
            }
            info!(network = %name, %ip, "exposure adopted");
        }
        Ok(())
    }

    /// The network leaves the host: its exposure goes with it.
    pub(crate) fn drop_exposure(
        &mut self,
        net: &Network,
        exposed: Option<Ipv4Addr>,
    ) -> Vec<AgentError> {
        let mut errors = Vec::new();
        if exposed.is_some() && net.overlay().is_some_and(|o| o.is_shared()) {
            if let Err(e) = delete_link(&mut self.nl, net) {
                errors.push(e);
            }
        }
        if let Err(e) = self.networks_db.delete(&keys::exposed(&net.name)) {
            errors.push(e.into());
        }
        errors
    }

    /// Links exposures own (garbage collection keeps them).
    pub(crate) fn exposure_links(&self) -> Vec<String> {
        self.networks
            .values()
            .filter(|n| n.exposed.is_some() && n.net.overlay().is_some_and(|o| o.is_shared()))
            .flat_map(|n| [expose_link(&n.net.id), expose_bridge_port(&n.net.id)])
            .collect()
    }
}

/// This host's name where it has no cluster name.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
