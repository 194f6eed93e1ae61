//! Networks: create (validate, then act, rolling back), remove, prune, and
//! connecting and disconnecting running sandboxes.

use crate::attach::{self, Attach, DefaultRoute, EndpointRequest, Namespace};
use crate::driver;
use crate::error::{AgentError, Result};
use crate::host::{not_found, Host, NetworkState, Snapshot};
use crate::ids::random_id;
use ipnet::Ipv4Net;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tracing::{info, warn};
use weft_kernel::{Netlink, Netns};
use weft_model::api::{
    Connect, Disconnect, EndpointView, NetworkView, RemovedNetwork, SandboxView,
};
use weft_model::network::{self, Driver, DEFAULT_NETWORK};
use weft_model::sandbox::host_veth_name;
use weft_model::{keys, AddressPool, Attachment, Network, NetworkSpec};
use weft_store::{Store, StoreJson};

pub(crate) fn pool_for(net: &Network) -> Result<AddressPool> {
    AddressPool::new(net.subnet, net.gateway)
        .and_then(|p| p.with_range(net.ip_range))
        .map_err(|e| AgentError::BadRequest(e.to_string()))
}

impl Snapshot {
    pub(crate) fn network_view(&self, net: &Network) -> NetworkView {
        let endpoints = self
            .sandboxes
            .values()
            .flat_map(|s| s.attachment.endpoints().iter().map(move |e| (s, e)))
            .filter(|(_, e)| e.network == net.name)
            .map(|(s, e)| EndpointView {
                sandbox: s.name.clone(),
                sandbox_id: s.id.clone(),
                ifname: e.ifname.clone(),
                ip: e.ip,
                host_ifname: e.host_ifname().unwrap_or_default().to_string(),
                aliases: e.aliases.clone(),
            })
            .collect();
        let m = net.macvlan();
        NetworkView {
            name: net.name.clone(),
            id: net.id.clone(),
            driver: net.driver().to_string(),
            subnet: net.subnet,
            gateway: net.gateway,
            bridge: net.bridge().unwrap_or_default().to_string(),
            parent: m.map(|m| m.parent.clone()),
            host_access: m.and_then(|m| m.host_access),
            ip_range: net.ip_range,
            mtu: net.mtu,
            internal: net.internal,
            labels: net.labels.clone(),
            options: net.options.clone(),
            endpoints,
            overlay: net.overlay().cloned(),
            programmed: Vec::new(),
            blocks: Vec::new(),
            subranges: net.subranges.clone(),
            exposed: Vec::new(),
        }
    }

    /// Names of sandboxes with an endpoint on `network`.
    pub(crate) fn attached_to(&self, network: &str) -> Vec<String> {
        self.sandboxes
            .values()
            .filter(|s| {
                s.attachment
                    .endpoints()
                    .iter()
                    .any(|e| e.network == network)
            })
            .map(|s| s.name.clone())
            .collect()
    }
}

impl Host {
    /// From the latest snapshot: never waits for the lock.
    pub fn networks(&self) -> Vec<NetworkView> {
        let snap = self.snapshot();
        snap.networks
            .values()
            .map(|n| snap.network_view(n))
            .collect()
    }

    /// One network, with what its driver programmed as the kernel has it now.
    pub fn network(&self, name: &str) -> Result<NetworkView> {
        let snap = self.snapshot();
        let net = snap.networks.get(name).ok_or_else(|| not_found(name))?;
        let mut v = snap.network_view(net);
        let mut nl = weft_kernel::Netlink::open()?;
        v.programmed = driver::for_network(net).programmed(&mut nl, net);
        v.programmed.extend(crate::expose::programmed(
            &mut nl,
            net,
            snap.exposed.get(name).copied(),
        ));
        Ok(v)
    }

    pub fn create_network(&self, spec: NetworkSpec) -> Result<NetworkView> {
        let name = spec.name.clone();
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let existing: Vec<Network> = inner.networks.values().map(|n| n.net.clone()).collect();
            let routes = if spec.subnet.is_none() {
                inner.nl.route_destinations()?
            } else {
                Vec::new()
            };
            let net = network::plan(&spec, &random_id(), &existing, &routes)
                .map_err(|e| AgentError::BadRequest(e.to_string()))?;
            if let (Some(subnet), Driver::Bridge) = (spec.subnet, net.driver()) {
                clear_of_the_host(&mut inner.nl, subnet, &existing)?;
            }
            if let Some(bridge) = net.bridge() {
                if inner.nl.link_by_name(bridge)?.is_some() {
                    return Err(AgentError::Conflict(format!(
                        "a link named {bridge} already exists on this host; choose another with -o bridge.name=NAME"
                    )));
                }
            }
            inner.add_network(net, true)?;
        }
        self.network(&name)
    }

    /// Removes a network; with `force`, disconnects its sandboxes first.
    pub fn remove_network(&self, name: &str, force: bool) -> Result<RemovedNetwork> {
        if name == DEFAULT_NETWORK {
            return Err(AgentError::BadRequest(format!(
                "{DEFAULT_NETWORK} is the default network and cannot be removed"
            )));
        }
        let snap = self.snapshot();
        if !snap.networks.contains_key(name) {
            return Err(not_found(name));
        }
        let attached = snap.attached_to(name);
        if !attached.is_empty() {
            if !force {
                return Err(AgentError::Conflict(format!(
                    "network {name} has sandboxes attached ({}); disconnect or remove them, or use `weft network rm -f {name}`",
                    attached.join(", ")
                )));
            }
            for sb in attached {
                self.disconnect(name, Disconnect { sandbox: sb })?;
            }
        }
        let mut g = self.lock();
        let net = g.drop_network(name)?;
        info!(network = %name, "network removed");
        Ok(RemovedNetwork {
            name: name.to_string(),
            id: net.id,
        })
    }

    /// Removes every user-defined network without sandboxes.
    pub fn prune_networks(&self) -> Result<Vec<RemovedNetwork>> {
        let snap = self.snapshot();
        let unused: Vec<&String> = snap
            .networks
            .keys()
            .filter(|n| n.as_str() != DEFAULT_NETWORK && snap.attached_to(n).is_empty())
            // Global networks belong to the cluster, not to one host's prune.
            .filter(|n| !snap.networks[*n].is_global())
            .collect();
        unused
            .into_iter()
            .map(|n| self.remove_network(n, false))
            .collect()
    }

    pub fn connect(&self, network: &str, req: Connect) -> Result<SandboxView> {
        let id = {
            let mut g = self.lock();
            let sb = g.find(&req.sandbox)?.clone();
            g.network(network)?;
            let (Attachment::Networks { endpoints }, Some(path)) = (&sb.attachment, &sb.netns)
            else {
                return Err(AgentError::BadRequest(format!(
                    "sandbox {} uses --net {}; only sandboxes on networks can be connected to more",
                    sb.name,
                    sb.attachment.describe()
                )));
            };
            if endpoints.iter().any(|e| e.network == network) {
                return Err(AgentError::Conflict(format!(
                    "sandbox {} is already on network {network}",
                    sb.name
                )));
            }
            for a in &req.aliases {
                weft_model::names::validate("alias", a)
                    .map_err(|e| AgentError::BadRequest(e.to_string()))?;
            }
            let index = (0..)
                .find(|i| !endpoints.iter().any(|e| e.ifname == format!("eth{i}")))
                .unwrap_or(endpoints.len());
            let a = Attach {
                endpoints: vec![EndpointRequest {
                    network: network.to_string(),
                    ip: req.ip,
                    aliases: req.aliases.clone(),
                    ifname: format!("eth{index}"),
                    host_ifname: host_veth_name(&sb.id, index),
                    mac: None,
                    reserved: false,
                    subrange: None,
                }],
                namespace: Namespace::Existing(PathBuf::from(path)),
                default_route: DefaultRoute::Recompute,
                ports: Vec::new(),
                resolv: None,
                replace: true,
                started: None,
                sandbox: sb,
            };
            let sb = attach::attach(&mut g, a)?;
            info!(sandbox = %sb.name, network, "connected");
            sb.id.clone()
        };
        self.get(&id)
    }

    pub fn disconnect(&self, network: &str, req: Disconnect) -> Result<SandboxView> {
        let id = {
            let mut g = self.lock();
            let inner = &mut *g;
            let sb = inner.find(&req.sandbox)?.clone();
            inner.network(network)?;
            let Some(ep) = sb
                .attachment
                .endpoints()
                .iter()
                .find(|e| e.network == network)
                .cloned()
            else {
                return Err(AgentError::BadRequest(format!(
                    "sandbox {} is not on network {network}",
                    sb.name
                )));
            };
            let mut updated = sb.clone();
            if let Attachment::Networks { endpoints } = &mut updated.attachment {
                endpoints.retain(|e| e.network != network);
            }
            // Ports published through this network go with it.
            let (gone, kept): (Vec<_>, Vec<_>) =
                updated.ports.drain(..).partition(|p| p.network == network);
            updated.ports = kept;
            inner.firewall.delete_ports(&gone)?;
            let mut ns_nl = match sb.netns.as_deref().map(Path::new) {
                Some(p) if weft_kernel::netns::is_netns(p) => Some(Netns::open(p)?.netlink()?),
                _ => None,
            };
            let state = inner
                .networks
                .get(network)
                .ok_or_else(|| not_found(network))?;
            state.driver.detach(&mut inner.nl, &ep, ns_nl.as_mut())?;
            if let Some(n) = inner.networks.get_mut(network) {
                n.release(ep.ip);
            }
            if let Some(nl) = ns_nl.as_mut() {
                if let Err(e) = attach::fix_default_route(inner, &updated, nl) {
                    warn!(sandbox = %sb.name, error = %e, "could not move the default route");
                }
            }
            inner
                .runtime
                .put_json(&keys::sandbox(&updated.id), &updated)?;
            inner.register(updated);
            let guarded = inner.guarded_ports([&ep]);
            if let Err(e) = inner.unguard(&guarded) {
                warn!(sandbox = %sb.name, error = %e, "the firewall still guards the disconnected port until its next rewrite");
            }
            info!(sandbox = %sb.name, network, "disconnected");
            sb.id.clone()
        };
        self.get(&id)
    }
}

impl crate::host::Inner {
    /// Makes a network exist on this host: its driver's host side, the
    /// address pool, the resolver, the firewall and (with `create`) its
    /// record; all rolled back on error.
    pub(crate) fn add_network(&mut self, mut net: Network, create: bool) -> Result<()> {
        let pool = pool_for(&net)?;
        let mut driver = driver::for_network(&net);
        let created = driver.setup(&mut self.nl, &mut net)?;
        let name = net.name.clone();
        let resolver = net.has_resolver().then_some(net.gateway);
        self.networks
            .insert(name.clone(), NetworkState::new(net.clone(), pool, driver));
        let done = resolver
            .map_or(Ok(()), |gw| self.dns.serve(&name, gw))
            .and_then(|_| self.apply_firewall())
            .and_then(|_| {
                let key = keys::network(&name);
                if create {
                    self.networks_db.create_json(&key, &net)?;
                } else {
                    self.networks_db.put_json(&key, &net)?;
                }
                Ok(())
            });
        if let Err(e) = done {
            self.dns.stop(&name);
            if let Some(mut n) = self.networks.remove(&name) {
                if created {
                    let _ = n.driver.teardown(&mut self.nl, &net);
                }
            }
            let _ = self.apply_firewall();
            return Err(e);
        }
        info!(network = %name, subnet = %net.subnet, driver = %net.driver(), "network ready");
        Ok(())
    }

    /// Removes a network without endpoints from this host: resolver, host
    /// side, record, firewall. Reports every failure.
    pub(crate) fn drop_network(&mut self, name: &str) -> Result<Network> {
        let Some(mut state) = self.networks.remove(name) else {
            return Err(not_found(name));
        };
        self.dns.stop(name);
        let mut errors = self.drop_exposure(&state.net, state.exposed);
        if let Err(e) = state.driver.teardown(&mut self.nl, &state.net) {
            errors.push(e);
        }
        if let Err(e) = self.networks_db.delete(&keys::network(name)) {
            errors.push(e.into());
        }
        if let Err(e) = self.apply_firewall() {
            errors.push(e);
        }
        AgentError::all(errors)?;
        Ok(state.net)
    }
}

/// Refuses an explicit bridge subnet that holds one of the host's own
/// addresses or overlaps one of its routes: the bridge's connected route
/// would take that traffic and cut the host off the network it is on
/// (macvlan networks are on the LAN's subnet by nature and are not
/// checked). weft's own networks are left to `plan`'s overlap check.
fn clear_of_the_host(nl: &mut Netlink, subnet: Ipv4Net, existing: &[Network]) -> Result<()> {
    let names: HashMap<u32, String> = nl.links()?.into_iter().map(|l| (l.index, l.name)).collect();
    let theirs = |index: Option<u32>| -> Option<String> {
        let name = names.get(&index?)?;
        // A bridge of one of weft's networks is weft's, not the host's.
        let weft = existing.iter().any(|n| n.bridge() == Some(name.as_str()));
        (!weft).then(|| name.clone())
    };
    let hint = "choose a subnet that no interface or route of this host uses, or leave out --subnet and weft picks a free one";
    for (index, addr) in nl.ipv4_addresses()? {
        if subnet.contains(&addr.addr()) && !addr.addr().is_loopback() {
            if let Some(dev) = theirs(Some(index)) {
                return Err(AgentError::Conflict(format!(
                    "--subnet {subnet} contains {}, an address of this host's interface {dev}: the host would lose that network; {hint}",
                    addr.addr()
                )));
            }
        }
    }
    for r in nl.foreign_routes()? {
        if r.dst.contains(&subnet.network()) || subnet.contains(&r.dst.network()) {
            let Some(dev) = theirs(r.oif) else { continue };
            let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(AgentError::Conflict(format!(
                "--subnet {subnet} overlaps this host's route {}{via} dev {dev}: that traffic would go to the bridge instead; {hint}",
                r.dst
            )));
        }
    }
    Ok(())
}
