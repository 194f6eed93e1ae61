//! Attachments for container runtimes through the CNI plugin (`weft cni`):
//! the runtime owns the namespace, weft plugs an interface into it. Each
//! attachment is a sandbox record marked `external`, so the same reconciler,
//! DNS, ports and cleanup apply; only the namespace is never weft's to make
//! or remove.

use crate::attach::{self, Attach, DefaultRoute, EndpointRequest, Links, Namespace};
use crate::driver;
use crate::error::{AgentError, Result};
use crate::host::{Host, Inner};
use crate::ids::random_id;
use std::path::{Path, PathBuf};
use tracing::info;
use weft_kernel::{netns, Netns};
use weft_model::api::{CniAdd, CniAttachment, CniGc, CniRef};
use weft_model::sandbox::{host_veth_name, External, Runtime};
use weft_model::{ports, Attachment, PortMapping, Sandbox};

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Inner {
    fn find_external(&self, container_id: &str, ifname: &str) -> Option<&Sandbox> {
        self.sandboxes.values().map(|s| &**s).find(|s| {
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
            host_ifname: ep.host_ifname().unwrap_or_default().to_string(),
            host_mac: String::new(),
            ifname: ep.ifname.clone(),
            mac: mac_string(driver::endpoint_mac(ep)?),
            netns: sb.netns.clone().unwrap_or_default(),
            ip: ep.ip,
            prefix_len: ep.prefix_len,
            gateway: ep.gateway,
            nameserver,
        })
    }

    /// Removes an external attachment: ports, interface, address, record, names.
    fn drop_external(&mut self, id: &str) -> Result<()> {
        let Some(sb) = self.sandboxes.get(id).cloned() else {
            return Ok(());
        };
        attach::remove(self, &sb, Links::Delete)?;
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
        if !inner.networks.contains_key(&req.network) {
            return Err(AgentError::NotFound(format!(
                "no weft network named {:?}: create it with `weft network create {0}`, or set \"network\" in the CNI config",
                req.network
            )));
        }
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

        let id = random_id();
        let short = &req.container_id[..12.min(req.container_id.len())];
        let sb = Sandbox {
            id: id.clone(),
            name: format!("cni-{short}-{}", req.ifname),
            attachment: Attachment::Networks {
                endpoints: Vec::new(),
            },
            netns: Some(req.netns.clone()),
            process: None,
            auto_remove: false,
            command: vec!["cni".into(), req.container_id.clone()],
            created_unix: 0,
            network_setup_us: 0,
            ports: Vec::new(),
            hostname: None,
            external: Some(External {
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
                runtime: Runtime::Cni,
            }),
        };
        let a = Attach {
            sandbox: sb,
            endpoints: vec![EndpointRequest {
                network: req.network.clone(),
                ip: req.ip,
                aliases: req.aliases.clone(),
                ifname: req.ifname.clone(),
                host_ifname: host_veth_name(&id, 0),
                mac: req.mac.clone(),
                reserved: false,
                subrange: None,
            }],
            namespace: Namespace::Existing(PathBuf::from(&req.netns)),
            default_route: DefaultRoute::On(Some(req.network.clone())),
            ports: mappings,
            resolv: None,
            replace: false,
            started: None,
        };
        let sb = attach::attach(inner, a).map_err(|e| match e {
            // CNI's words for the request's fields.
            AgentError::BadRequest(m) if m.starts_with("-p: ") => {
                bad(format!("portMappings: {}", &m[4..]))
            }
            AgentError::BadRequest(m) if m.starts_with("--net ") => bad(format!(
                "ips: {}",
                m.split_once(": ").map_or(m.as_str(), |x| x.1)
            )),
            e => e,
        })?;
        info!(attachment = %sb.name, network = %req.network, "CNI attachment added");
        inner.attachment_of(&sb)
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
        if let Some(h) = ep.host_ifname() {
            if inner.nl.link_by_name(h)?.is_none() {
                return Err(AgentError::Conflict(format!(
                    "host end {h} of the attachment is missing"
                )));
            }
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
