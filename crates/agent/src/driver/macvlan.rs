//! macvlan: sandboxes straight on a physical LAN through macvlan interfaces
//! of a parent (made as an 802.1q sub-interface when named `IFACE.VLAN`),
//! and optionally one for the host itself (host access: the kernel does not
//! pass traffic between a parent and its macvlans).

use super::{configure_new, link_report, Found, NetworkDriver, Target};
use crate::error::{AgentError, Result};
use ipnet::Ipv4Net;
use std::collections::HashMap;
use weft_kernel::{Link, Netlink};
use weft_model::api::ProgrammedView;
use weft_model::network::{self, MacvlanSettings};
use weft_model::nft::NetworkRule;
use weft_model::sandbox::{mac_for, EndpointKind};
use weft_model::{Endpoint, Network};

/// What `setup` found on this host. A parent can vanish with hardware;
/// the network then stays, unusable, until it is back.
#[derive(Default)]
pub(crate) struct MacvlanDriver {
    parent: Option<u32>,
    /// The host's own macvlan (host access).
    shim: Option<u32>,
}

fn settings(net: &Network) -> Result<&MacvlanSettings> {
    net.macvlan().ok_or_else(|| AgentError::WrongDriver {
        network: net.name.clone(),
        driver: net.driver().to_string(),
        wanted: "macvlan",
    })
}

impl MacvlanDriver {
    fn parent_index(nl: &mut Netlink, m: &mut MacvlanSettings) -> Result<(u32, bool)> {
        let parent = m.parent.clone();
        if let Some(l) = nl.link_by_name(&parent)? {
            if !l.up {
                nl.set_up(l.index)?;
            }
            return Ok((l.index, false));
        }
        let Some((base, vid)) = network::vlan_of(&parent) else {
            return Err(AgentError::BadRequest(format!(
                "-o parent={parent}: no such interface on this host"
            )));
        };
        let base_link = nl.link_by_name(base)?.ok_or_else(|| {
            AgentError::BadRequest(format!(
                "-o parent={parent}: no interface {base} on this host"
            ))
        })?;
        nl.add_vlan(base_link.index, &parent, vid).map_err(|e| match e.errno() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => AgentError::BadRequest(format!(
                "-o parent={parent}: this kernel cannot make 802.1q sub-interfaces (CONFIG_VLAN_8021Q): {e}"
            )),
            _ => e.into(),
        })?;
        m.parent_created = true;
        let index = nl
            .link_by_name(&parent)?
            .ok_or_else(|| AgentError::Vanished {
                what: parent.clone(),
                place: "this host".into(),
            })?
            .index;
        Ok((index, true))
    }
}

impl NetworkDriver for MacvlanDriver {
    fn setup(&mut self, nl: &mut Netlink, net: &mut Network) -> Result<bool> {
        let (name, mtu) = (net.shim(), net.mtu);
        let weft_model::network::DriverSettings::Macvlan(m) = &mut net.settings else {
            return Err(AgentError::WrongDriver {
                network: net.name.clone(),
                driver: net.driver().to_string(),
                wanted: "macvlan",
            });
        };
        let (index, created) = Self::parent_index(nl, m)?;
        let undo = |nl: &mut Netlink, m: &MacvlanSettings| {
            if created {
                let _ = nl.delete_link(&m.parent);
            }
        };
        let shim = match m.host_access {
            None => None,
            Some(ip) => {
                let made = (|| {
                    let shim = match nl.link_by_name(&name)? {
                        Some(l) => l.index,
                        None => {
                            nl.add_macvlan(index, &name, None, mac_for(ip), mtu)?;
                            nl.link_by_name(&name)?
                                .ok_or_else(|| AgentError::Vanished {
                                    what: name.clone(),
                                    place: "this host".into(),
                                })?
                                .index
                        }
                    };
                    nl.set_up(shim)?;
                    nl.add_address(shim, Ipv4Net::from(ip))?;
                    Ok(shim)
                })();
                match made {
                    Ok(s) => Some(s),
                    Err(e) => {
                        let _ = nl.delete_link(&name);
                        undo(nl, m);
                        return Err(e);
                    }
                }
            }
        };
        self.parent = Some(index);
        self.shim = shim;
        Ok(created)
    }

    fn teardown(&mut self, nl: &mut Netlink, net: &Network) -> Result<()> {
        let m = settings(net)?;
        let mut errors = Vec::new();
        if let Err(e) = nl.delete_link(&net.shim()) {
            errors.push(e.into());
        }
        if m.parent_created {
            if let Err(e) = nl.delete_link(&m.parent) {
                errors.push(e.into());
            }
        }
        self.parent = None;
        self.shim = None;
        AgentError::all(errors)
    }

    fn endpoint_kind(&self, _host_ifname: String) -> EndpointKind {
        EndpointKind::Macvlan
    }

    fn attach(
        &self,
        nl: &mut Netlink,
        net: &Network,
        ep: &Endpoint,
        target: Target<'_>,
    ) -> Result<()> {
        let m = settings(net)?;
        let parent = self.parent.ok_or_else(|| {
            AgentError::Conflict(format!(
                "network {}: its parent {} is missing on this host; bring it back and restart the agent",
                net.name, m.parent
            ))
        })?;
        let Target::Namespace {
            ns,
            nl: ns_nl,
            default_route,
            ..
        } = target
        else {
            return Err(AgentError::BadRequest(format!(
                "network {} is a macvlan network: Docker's containers join weft's bridge networks",
                net.name
            )));
        };
        nl.add_macvlan(
            parent,
            &ep.ifname,
            Some(ns.fd()),
            super::endpoint_mac(ep)?,
            net.mtu,
        )?;
        configure_new(ns, ns_nl, ep, net.mtu, default_route)?;
        if let Some(shim) = self.shim {
            nl.add_host_route(ep.ip, shim)?;
        }
        Ok(())
    }

    fn detach(&self, nl: &mut Netlink, ep: &Endpoint, inside: Option<&mut Netlink>) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(shim) = self.shim {
            if let Err(e) = nl.delete_host_route(ep.ip, shim) {
                errors.push(e.into());
            }
        }
        // The interface lives only inside the sandbox's namespace.
        if let Some(ns_nl) = inside {
            if let Err(e) = ns_nl.delete_link(&ep.ifname) {
                errors.push(e.into());
            }
        }
        AgentError::all(errors)
    }

    fn detach_outlives_namespace(&self) -> bool {
        true
    }

    fn repair(
        &self,
        _nl: &mut Netlink,
        _net: &Network,
        _ep: &Endpoint,
        _links: &HashMap<String, Link>,
    ) -> Result<Found> {
        // Nothing on the host to check; the interface is inside.
        Ok(Found::Fine)
    }

    fn owned_links(&self, net: &Network) -> Vec<String> {
        net.macvlan()
            .filter(|m| m.host_access.is_some())
            .map(|_| net.shim())
            .into_iter()
            .collect()
    }

    fn programmed(&self, nl: &mut Netlink, net: &Network) -> Vec<ProgrammedView> {
        let Some(m) = net.macvlan() else {
            return Vec::new();
        };
        let mut v = vec![link_report(
            nl,
            "parent",
            &m.parent,
            &format!("ip -d link show {}", m.parent),
        )];
        if let Some(ip) = m.host_access {
            let shim = net.shim();
            let mut s = link_report(nl, "host access", &shim, &format!("ip addr show {shim}"));
            s.detail = format!("{}, {ip}", s.detail);
            v.push(s);
        }
        v
    }

    fn firewall(&self, _net: &Network) -> Option<NetworkRule> {
        None
    }

    fn refuses_ports(&self, net: &Network) -> Option<String> {
        Some(format!(
            "network {} is a macvlan network: its sandboxes are on the LAN with their own addresses; reach them there",
            net.name
        ))
    }
}
