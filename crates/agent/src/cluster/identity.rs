//! Who this host is in the cluster, kept in the data dir so a restarted
//! agent is the same host: a random id, its node name and public address,
//! the etcd lease it last held and the subnet it last leased per network.

use crate::config::ClusterConfig;
use crate::error::{AgentError, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use weft_kernel::Netlink;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub host_id: String,
    #[serde(skip)]
    pub node: String,
    #[serde(skip, default = "unspecified")]
    pub public_ip: Ipv4Addr,
    #[serde(default)]
    pub etcd_lease: i64,
    #[serde(default)]
    pub leases: BTreeMap<String, Ipv4Net>,
    /// Shared networks: the blocks this host held, so it claims them back
    /// (and attaches from them while etcd is unreachable) after a restart.
    #[serde(default)]
    pub blocks: BTreeMap<String, std::collections::BTreeSet<Ipv4Net>>,
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

impl Identity {
    pub fn load_or_create(path: &Path, cfg: &ClusterConfig, nl: &mut Netlink) -> Result<Identity> {
        let mut me = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                AgentError::Internal(format!(
                    "{} is damaged ({e}); remove it to make this host a new member",
                    path.display()
                ))
            })?,
            Err(_) => Identity {
                host_id: crate::ids::random_id(),
                node: String::new(),
                public_ip: Ipv4Addr::UNSPECIFIED,
                etcd_lease: 0,
                leases: BTreeMap::new(),
                blocks: BTreeMap::new(),
            },
        };
        me.node = cfg.node_name.clone();
        me.public_ip = public_ip(cfg, nl)?;
        me.save(path)?;
        Ok(me)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializable"))
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| AgentError::Internal(format!("write {}: {e}", path.display())))
    }
}

/// Checks `--public-ip` / `--iface` (or that a default route tells the
/// address) before the agent makes anything, so that a bad option fails a
/// start that has left nothing behind.
pub(crate) fn check_public_address(cfg: &ClusterConfig) -> Result<()> {
    public_ip(cfg, &mut Netlink::open()?).map(drop)
}

/// `--public-ip`, else the first address of `--iface`, else the address of
/// the interface that carries the default route.
fn public_ip(cfg: &ClusterConfig, nl: &mut Netlink) -> Result<Ipv4Addr> {
    let addrs = nl.ipv4_addresses()?;
    if let Some(ip) = cfg.public_ip {
        if !addrs.iter().any(|(_, a)| a.addr() == ip) {
            return Err(AgentError::BadRequest(format!(
                "--public-ip {ip} is not an address of this host; give one of its addresses"
            )));
        }
        return Ok(ip);
    }
    let index = match &cfg.iface {
        Some(name) => {
            nl.link_by_name(name)?
                .ok_or_else(|| {
                    AgentError::BadRequest(format!("--iface {name}: no such interface on this host"))
                })?
                .index
        }
        None => nl.default_route_oif()?.ok_or_else(|| {
            AgentError::BadRequest(
                "cannot tell this host's public address (no default route); give --public-ip or --iface".into(),
            )
        })?,
    };
    addrs
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, a)| a.addr())
        .ok_or_else(|| {
            AgentError::BadRequest(
                "the chosen interface has no IPv4 address; give --public-ip".into(),
            )
        })
}
