//! Networks: create (validate, then act, rolling back), remove, prune, and
//! connecting and disconnecting running sandboxes.

use crate::bridge;
use crate::error::{AgentError, Result};
use crate::firewall;
use crate::host::{Host, Inner, NetworkState};
use crate::sandboxes::random_id;
use std::path::Path;
use tracing::{info, warn};
use weft_kernel::Netns;
use weft_model::api::{
    Connect, Disconnect, EndpointView, NetworkView, RemovedNetwork, SandboxView,
};
use weft_model::network::{self, DEFAULT_NETWORK};
use weft_model::sandbox::{host_veth_name, EndpointKind};
use weft_model::{keys, AddressPool, Attachment, Endpoint, Network, NetworkSpec, Sandbox};
use weft_store::{Store, StoreJson};

fn not_found(name: &str) -> AgentError {
    AgentError::NotFound(format!(
        "no network named {name:?}: `weft network ls` lists the networks"
    ))
}

pub(crate) fn pool_for(net: &Network) -> Result<AddressPool> {
    AddressPool::new(net.subnet, net.gateway)
        .and_then(|p| p.with_range(net.ip_range))
        .map_err(|e| AgentError::BadRequest(e.to_string()))
}

impl Inner {
    fn network_view(&self, n: &NetworkState) -> NetworkView {
        let endpoints = self
            .sandboxes
            .values()
            .flat_map(|s| s.attachment.endpoints().iter().map(move |e| (s, e)))
            .filter(|(_, e)| e.network == n.net.name)
            .map(|(s, e)| EndpointView {
                sandbox: s.name.clone(),
                sandbox_id: s.id.clone(),
                ifname: e.ifname.clone(),
                ip: e.ip,
                host_ifname: e.host_ifname.clone(),
                aliases: e.aliases.clone(),
            })
            .collect();
        let net = &n.net;
        NetworkView {
            name: net.name.clone(),
            id: net.id.clone(),
            driver: net.driver.to_string(),
            subnet: net.subnet,
            gateway: net.gateway,
            bridge: net.bridge.clone(),
            parent: net.parent.clone(),
            host_access: net.host_access,
            ip_range: net.ip_range,
            mtu: net.mtu,
            internal: net.internal,
            labels: net.labels.clone(),
            options: net.options.clone(),
            endpoints,
            overlay: net.overlay.clone(),
        }
    }

    /// Names of sandboxes with an endpoint on `network`.
    fn attached_to(&self, network: &str) -> Vec<String> {
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

    /// Sets the sandbox's default route to the network Docker would pick.
    fn fix_default_route(&self, sb: &Sandbox, ns_nl: &mut weft_kernel::Netlink) -> Result<()> {
        let eps = sb.attachment.endpoints();
        let chosen = network::default_route_network(
            eps.iter()
                .filter_map(|e| self.networks.get(&e.network))
                .map(|n| &n.net),
        );
        match chosen.and_then(|c| eps.iter().find(|e| e.network == c)) {
            Some(ep) => {
                let link = ns_nl.link_by_name(&ep.ifname)?.ok_or_else(|| {
                    AgentError::Internal(format!("{} is missing in {}", ep.ifname, sb.name))
                })?;
                ns_nl.replace_default_route(ep.gateway, link.index)?;
            }
            None => ns_nl.delete_default_route()?,
        }
        Ok(())
    }

    fn save(&self, sb: &Sandbox) -> Result<()> {
        self.runtime.put_json(&keys::sandbox(&sb.id), sb)?;
        Ok(())
    }
}

impl Host {
    pub fn networks(&self) -> Vec<NetworkView> {
        let g = self.lock();
        g.networks.values().map(|n| g.network_view(n)).collect()
    }

    pub fn network(&self, name: &str) -> Result<NetworkView> {
        let g = self.lock();
        let n = g.networks.get(name).ok_or_else(|| not_found(name))?;
        Ok(g.network_view(n))
    }

    pub fn create_network(&self, spec: NetworkSpec) -> Result<NetworkView> {
        let mut g = self.lock();
        let inner = &mut *g;
        let existing: Vec<Network> = inner.networks.values().map(|n| n.net.clone()).collect();
        let routes = if spec.subnet.is_none() {
            inner.nl.route_destinations()?
        } else {
            Vec::new()
        };
        let mut net = network::plan(&spec, &random_id(), &existing, &routes)
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let pool = pool_for(&net)?;
        if net.uses_bridge() && inner.nl.link_by_name(&net.bridge)?.is_some() {
            return Err(AgentError::Conflict(format!(
                "a link named {} already exists on this host; choose another with -o bridge.name=NAME",
                net.bridge
            )));
        }
        let (bridge_index, shim_index, _) = bridge::ensure(&mut inner.nl, &mut net)?;
        inner.networks.insert(
            net.name.clone(),
            NetworkState {
                net: net.clone(),
                pool,
                bridge_index,
                shim_index,
            },
        );
        let served = if net.has_resolver() {
            inner.dns.serve(&net.name, net.gateway)
        } else {
            Ok(())
        };
        let done = served
            .and_then(|_| firewall::apply_all(inner))
            .and_then(|_| {
                Ok(inner
                    .networks_db
                    .create_json(&keys::network(&net.name), &net)?)
            });
        if let Err(e) = done {
            inner.dns.stop(&net.name);
            inner.networks.remove(&net.name);
            let _ = bridge::remove(&mut inner.nl, &net);
            let _ = firewall::apply_all(inner);
            return Err(e);
        }
        info!(network = %net.name, subnet = %net.subnet, bridge = %net.bridge, "network created");
        Ok(inner.network_view(&inner.networks[&net.name]))
    }

    /// Removes a network; with `force`, disconnects its sandboxes first.
    pub fn remove_network(&self, name: &str, force: bool) -> Result<RemovedNetwork> {
        if name == DEFAULT_NETWORK {
            return Err(AgentError::BadRequest(format!(
                "{DEFAULT_NETWORK} is the default network and cannot be removed"
            )));
        }
        let attached = {
            let g = self.lock();
            if !g.networks.contains_key(name) {
                return Err(not_found(name));
            }
            g.attached_to(name)
        };
        if !attached.is_empty() {
            if !force {
                return Err(AgentError::Conflict(format!(
                    "network {name} has sandboxes attached ({}); disconnect or remove them, or use `weft network rm -f {name}`",
                    attached.join(", ")
                )));
            }
            for sb in attached {
                self.disconnect(
                    name,
                    Disconnect {
                        sandbox: sb.clone(),
                    },
                )?;
            }
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(state) = inner.networks.remove(name) else {
            return Err(not_found(name));
        };
        inner.dns.stop(name);
        bridge::remove(&mut inner.nl, &state.net)?;
        inner.networks_db.delete(&keys::network(name))?;
        firewall::apply_all(inner)?;
        info!(network = %name, "network removed");
        Ok(RemovedNetwork {
            name: name.to_string(),
            id: state.net.id,
        })
    }

    /// Removes every user-defined network without sandboxes.
    pub fn prune_networks(&self) -> Result<Vec<RemovedNetwork>> {
        let unused: Vec<String> = {
            let g = self.lock();
            g.networks
                .keys()
                .filter(|n| n.as_str() != DEFAULT_NETWORK && g.attached_to(n).is_empty())
                // Global networks belong to the cluster, not to one host's prune.
                .filter(|n| !g.networks[*n].net.is_global())
                .cloned()
                .collect()
        };
        unused
            .iter()
            .map(|n| self.remove_network(n, false))
            .collect()
    }

    pub fn connect(&self, network: &str, req: Connect) -> Result<SandboxView> {
        let mut g = self.lock();
        let inner = &mut *g;
        let sb = inner.find(&req.sandbox)?.clone();
        let state = inner
            .networks
            .get(network)
            .ok_or_else(|| not_found(network))?;
        let (Attachment::Networks { endpoints }, Some(path)) = (&sb.attachment, &sb.netns) else {
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
        if let Some(ip) = req.ip {
            state
                .pool
                .check_free(ip)
                .map_err(|e| AgentError::BadRequest(format!("--ip: {e}")))?;
        }
        let index = (0..)
            .find(|i| !endpoints.iter().any(|e| e.ifname == format!("eth{i}")))
            .expect("a free index");
        let state = inner.networks.get_mut(network).expect("checked");
        let ip = state
            .pool
            .allocate(req.ip)
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let ep = Endpoint {
            network: network.to_string(),
            ifname: format!("eth{index}"),
            host_ifname: host_veth_name(&sb.id, index),
            ip,
            prefix_len: state.net.subnet.prefix_len(),
            gateway: state.net.gateway,
            aliases: req.aliases.clone(),
            kind: EndpointKind::of(state.net.driver),
            mac: None,
        };
        let (bridge_index, shim, mtu) = (state.bridge_index, state.shim_index, state.net.mtu);
        let mut updated = sb.clone();
        if let Attachment::Networks { endpoints } = &mut updated.attachment {
            endpoints.push(ep.clone());
        }
        let made = (|| {
            let ns = Netns::open(Path::new(path))?;
            let mut ns_nl = ns.netlink()?;
            match ep.kind {
                EndpointKind::Veth => {
                    bridge::attach(
                        &mut inner.nl,
                        &ns,
                        &mut ns_nl,
                        bridge_index,
                        &ep,
                        mtu,
                        false,
                    )?;
                }
                EndpointKind::Macvlan => {
                    bridge::attach_macvlan(
                        &mut inner.nl,
                        &ns,
                        &mut ns_nl,
                        bridge_index,
                        shim,
                        &ep,
                        mtu,
                        false,
                    )?;
                }
            }
            inner.fix_default_route(&updated, &mut ns_nl)?;
            inner.save(&updated)
        })();
        if let Err(e) = made {
            let _ = bridge::detach(&mut inner.nl, &ep, shim);
            if ep.kind == EndpointKind::Macvlan {
                let _ = Netns::open(Path::new(path))
                    .and_then(|ns| ns.netlink())
                    .and_then(|mut ns_nl| ns_nl.delete_link(&ep.ifname));
            }
            inner
                .networks
                .get_mut(network)
                .expect("checked")
                .pool
                .release(ip);
            return Err(e);
        }
        inner.dns.add(&updated);
        info!(sandbox = %sb.name, network, ip = %ip, "connected");
        let view = inner.view(&updated);
        inner.sandboxes.insert(updated.id.clone(), updated);
        Ok(view)
    }

    pub fn disconnect(&self, network: &str, req: Disconnect) -> Result<SandboxView> {
        let mut g = self.lock();
        let inner = &mut *g;
        let sb = inner.find(&req.sandbox)?.clone();
        if !inner.networks.contains_key(network) {
            return Err(not_found(network));
        }
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
        firewall::delete_ports(&gone)?;
        let shim = inner.networks[network].shim_index;
        bridge::detach(&mut inner.nl, &ep, shim)?;
        if ep.kind == EndpointKind::Macvlan {
            if let Some(path) = &sb.netns {
                Netns::open(Path::new(path))?
                    .netlink()?
                    .delete_link(&ep.ifname)?;
            }
        }
        inner
            .networks
            .get_mut(network)
            .expect("checked")
            .pool
            .release(ep.ip);
        if let Some(path) = &sb.netns {
            let fixed = Netns::open(Path::new(path))
                .and_then(|ns| ns.netlink())
                .map_err(AgentError::from)
                .and_then(|mut ns_nl| inner.fix_default_route(&updated, &mut ns_nl));
            if let Err(e) = fixed {
                warn!(sandbox = %sb.name, error = %e, "could not move the default route");
            }
        }
        inner.save(&updated)?;
        inner.dns.add(&updated);
        info!(sandbox = %sb.name, network, "disconnected");
        let view = inner.view(&updated);
        inner.sandboxes.insert(updated.id.clone(), updated);
        Ok(view)
    }
}
