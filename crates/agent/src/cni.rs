//! Attachments for container runtimes through the CNI plugin (`weft cni`):
//! the runtime owns the namespace, weft plugs an interface into it. Each
//! attachment is a sandbox record marked `external`, so the same reconciler,
//! DNS, ports and cleanup apply; only the namespace is never weft's to make
//! or remove.

use crate::bridge;
use crate::error::{AgentError, Result};
use crate::firewall;
use crate::host::{Host, Inner};
use crate::sandboxes::{random_id, teardown_network, Links};
use std::path::Path;
use tracing::info;
use weft_kernel::{netns, Netns};
use weft_model::api::{CniAdd, CniAttachment, CniGc, CniRef};
use weft_model::sandbox::{host_veth_name, EndpointKind, External, Runtime};
use weft_model::{keys, ports, Attachment, Endpoint, PortMapping, Published, Sandbox};
use weft_store::{Store, StoreJson};

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Inner {
    fn find_external(&self, container_id: &str, ifname: &str) -> Option<&Sandbox> {
        self.sandboxes.values().find(|s| {
            s.external.as_ref().is_some_and(|e| {
                e.runtime == Runtime::Cni && e.container_id == container_id && e.ifname == ifname
            })
        })
    }

    fn attachment_of(&self, sb: &Sandbox) -> Result<CniAttachment> {
        let ep = sb.attachment.endpoints().first().ok_or_else(|| {
            AgentError::Internal(format!("attachment {} has no endpoint", sb.name))
        })?;
        let nameserver = self
            .networks
            .get(&ep.network)
            .filter(|n| n.net.has_resolver())
            .map(|n| n.net.gateway);
        Ok(CniAttachment {
            host_ifname: if ep.kind == EndpointKind::Veth {
                ep.host_ifname.clone()
            } else {
                String::new()
            },
            host_mac: String::new(),
            ifname: ep.ifname.clone(),
            mac: mac_string(bridge::endpoint_mac(ep)?),
            netns: sb.netns.clone().unwrap_or_default(),
            ip: ep.ip,
            prefix_len: ep.prefix_len,
            gateway: ep.gateway,
            nameserver,
        })
    }

    /// Removes an external attachment: ports, interface, address, record, names.
    fn drop_external(&mut self, id: &str) -> Result<()> {
        let Some(sb) = self.sandboxes.remove(id) else {
            return Ok(());
        };
        self.names.remove(&sb.name);
        firewall::delete_ports(&sb.ports)?;
        teardown_network(
            &mut self.nl,
            &mut self.networks,
            &sb.attachment,
            None,
            Links::Delete,
        )?;
        // A macvlan interface lives only inside the runtime's namespace.
        if let Some(path) = sb
            .netns
            .as_deref()
            .filter(|p| netns::is_netns(Path::new(p)))
        {
            for ep in sb
                .attachment
                .endpoints()
                .iter()
                .filter(|e| e.kind == EndpointKind::Macvlan)
            {
                Netns::open(Path::new(path))?
                    .netlink()?
                    .delete_link(&ep.ifname)?;
            }
        }
        self.runtime.delete(&keys::sandbox(id))?;
        self.dns.remove(id);
        info!(attachment = %sb.name, "CNI attachment removed");
        Ok(())
    }
}

impl Host {
    pub fn cni_add(&self, req: CniAdd) -> Result<CniAttachment> {
        let mut g = self.lock();
        let inner = &mut *g;
        let bad = |m: String| AgentError::BadRequest(m);
        if let Some(sb) = inner.find_external(&req.container_id, &req.ifname) {
            // A repeated ADD of the same attachment (a runtime retrying) gets the same answer.
            if sb
                .attachment
                .endpoints()
                .first()
                .map(|e| e.network.as_str())
                == Some(req.network.as_str())
            {
                return inner.attachment_of(sb);
            }
            return Err(AgentError::Conflict(format!(
                "container {} already has an interface {} on another network",
                req.container_id, req.ifname
            )));
        }
        let state = inner.networks.get(&req.network).ok_or_else(|| {
            AgentError::NotFound(format!(
                "no weft network named {:?}: create it with `weft network create {0}`, or set \"network\" in the CNI config",
                req.network
            ))
        })?;
        if !netns::is_netns(Path::new(&req.netns)) {
            return Err(bad(format!(
                "CNI_NETNS {} is not a network namespace",
                req.netns
            )));
        }
        if req.ifname.is_empty() || req.ifname.len() > 15 || req.ifname.contains(['/', ' ', ':']) {
            return Err(bad(format!(
                "CNI_IFNAME {:?} is not a valid interface name",
                req.ifname
            )));
        }
        let mut mappings = Vec::new();
        for p in &req.ports {
            mappings.push(p.parse::<PortMapping>().map_err(|e| bad(e.to_string()))?);
        }
        ports::check_own(&mappings).map_err(|e| bad(e.to_string()))?;
        if !mappings.is_empty() && (!state.net.uses_bridge() || state.net.internal) {
            return Err(bad(format!(
                "portMappings: network {} cannot publish ports",
                req.network
            )));
        }
        inner.check_ports_free(&mappings)?;
        if let Some(ip) = req.ip {
            state
                .pool
                .check_free(ip)
                .map_err(|e| bad(format!("ips: {e}")))?;
        }

        let id = random_id();
        let state = inner.networks.get_mut(&req.network).expect("checked");
        let ip = state
            .pool
            .allocate(req.ip)
            .map_err(|e| bad(e.to_string()))?;
        let ep = Endpoint {
            network: req.network.clone(),
            ifname: req.ifname.clone(),
            host_ifname: host_veth_name(&id, 0),
            ip,
            prefix_len: state.net.subnet.prefix_len(),
            gateway: state.net.gateway,
            aliases: req.aliases.clone(),
            kind: EndpointKind::of(state.net.driver),
            mac: req.mac.clone(),
        };
        let (index, shim, mtu) = (state.bridge_index, state.shim_index, state.net.mtu);
        let short = &req.container_id[..12.min(req.container_id.len())];
        let sb = Sandbox {
            id: id.clone(),
            name: format!("cni-{short}-{}", req.ifname),
            attachment: Attachment::Networks {
                endpoints: vec![ep.clone()],
            },
            netns: Some(req.netns.clone()),
            process: None,
            auto_remove: false,
            command: vec!["cni".into(), req.container_id.clone()],
            created_unix: 0,
            network_setup_us: 0,
            ports: mappings
                .iter()
                .map(|m| Published {
                    mapping: *m,
                    network: req.network.clone(),
                    target: ip,
                })
                .collect(),
            external: Some(External {
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
                runtime: Runtime::Cni,
            }),
        };
        let made = (|| {
            bridge::endpoint_mac(&ep)?;
            let ns = Netns::open(Path::new(&req.netns))?;
            let mut ns_nl = ns.netlink()?;
            match ep.kind {
                EndpointKind::Veth => {
                    bridge::attach(&mut inner.nl, &ns, &mut ns_nl, index, &ep, mtu, true)?;
                }
                EndpointKind::Macvlan => {
                    bridge::attach_macvlan(
                        &mut inner.nl,
                        &ns,
                        &mut ns_nl,
                        index,
                        shim,
                        &ep,
                        mtu,
                        true,
                    )?;
                }
            }
            firewall::add_ports(&sb.ports)?;
            inner.runtime.create_json(&keys::sandbox(&id), &sb)?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = firewall::delete_ports(&sb.ports);
            let _ = teardown_network(
                &mut inner.nl,
                &mut inner.networks,
                &sb.attachment,
                None,
                Links::Delete,
            );
            if ep.kind == EndpointKind::Macvlan {
                let _ = Netns::open(Path::new(&req.netns))
                    .and_then(|ns| ns.netlink())
                    .and_then(|mut nl| nl.delete_link(&ep.ifname));
            }
            return Err(e);
        }
        inner.dns.add(&sb);
        info!(attachment = %sb.name, network = %req.network, ip = %ip, "CNI attachment added");
        let out = inner.attachment_of(&sb)?;
        inner.names.insert(sb.name.clone(), id.clone());
        inner.sandboxes.insert(id, sb);
        Ok(out)
    }

    /// Idempotent: an attachment that is not there is already deleted.
    pub fn cni_del(&self, r: CniRef) -> Result<()> {
        let mut g = self.lock();
        let Some(id) = g
            .find_external(&r.container_id, &r.ifname)
            .map(|s| s.id.clone())
        else {
            return Ok(());
        };
        g.drop_external(&id)
    }

    pub fn cni_check(&self, r: CniRef) -> Result<CniAttachment> {
        let mut g = self.lock();
        let inner = &mut *g;
        let sb = inner
            .find_external(&r.container_id, &r.ifname)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!(
                    "no attachment of container {} as {}",
                    r.container_id, r.ifname
                ))
            })?;
        let ep = sb.attachment.endpoints()[0].clone();
        if ep.network != r.network {
            return Err(AgentError::BadRequest(format!(
                "the attachment is on network {}, not {}",
                ep.network, r.network
            )));
        }
        if ep.kind == EndpointKind::Veth && inner.nl.link_by_name(&ep.host_ifname)?.is_none() {
            return Err(AgentError::Conflict(format!(
                "host end {} of the attachment is missing",
                ep.host_ifname
            )));
        }
        let path = sb.netns.clone().unwrap_or_default();
        let ns = Netns::open(Path::new(&path))?;
        if ns.netlink()?.link_by_name(&ep.ifname)?.is_none() {
            return Err(AgentError::Conflict(format!(
                "{} is missing in {path}",
                ep.ifname
            )));
        }
        inner.attachment_of(&sb)
    }

    /// Removes every attachment on `network` that the runtime no longer lists.
    pub fn cni_gc(&self, gc: CniGc) -> Result<Vec<String>> {
        let mut g = self.lock();
        let stale: Vec<(String, String)> = g
            .sandboxes
            .values()
            .filter(|s| {
                s.attachment
                    .endpoints()
                    .iter()
                    .any(|e| e.network == gc.network)
            })
            .filter_map(|s| s.external.as_ref().map(|e| (s.id.clone(), e)))
            // Docker's endpoints are Docker's to remove.
            .filter(|(_, e)| e.runtime == Runtime::Cni)
            .filter(|(_, e)| {
                !gc.valid
                    .iter()
                    .any(|(c, i)| *c == e.container_id && *i == e.ifname)
            })
            .map(|(id, e)| (id, format!("{}/{}", e.container_id, e.ifname)))
            .collect();
        for (id, _) in &stale {
            g.drop_external(id)?;
        }
        Ok(stale.into_iter().map(|(_, n)| n).collect())
    }
}
