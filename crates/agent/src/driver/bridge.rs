//! bridge: a Linux bridge per network on this host carrying the gateway
//! address; a veth pair per endpoint, the host end on the bridge.

use super::{configure_inside, configure_new, link_report, Found, NetworkDriver, Target};
use crate::error::{AgentError, Result};
use ipnet::Ipv4Net;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use weft_kernel::{sysctl, Link, Netlink};
use weft_model::api::ProgrammedView;
use weft_model::nft::NetworkRule;
use weft_model::sandbox::{mac_for, EndpointKind};
use weft_model::{Endpoint, Network};

#[derive(Default)]
pub(crate) struct BridgeDriver {
    /// The bridge's index once `setup` made sure of it.
    index: Option<u32>,
}

impl BridgeDriver {
    fn bridge(net: &Network) -> Result<&str> {
        net.bridge().ok_or_else(|| AgentError::WrongDriver {
            network: net.name.clone(),
            driver: net.driver().to_string(),
            wanted: "bridge",
        })
    }

    fn index(&self, net: &Network) -> Result<u32> {
        self.index.ok_or_else(|| AgentError::NotReady {
            network: net.name.clone(),
        })
    }
}

impl NetworkDriver for BridgeDriver {
    fn setup(&mut self, nl: &mut Netlink, net: &mut Network) -> Result<bool> {
        let bridge = Self::bridge(net)?.to_string();
        let (index, created) = nl.ensure_bridge(&bridge, mac_for(net.gateway), net.mtu)?;
        let configured = (|| {
            let gw = Ipv4Net::new(net.gateway, net.subnet.prefix_len())
                .map_err(|_| AgentError::BadRequest(format!("bad prefix of {}", net.subnet)))?;
            nl.add_address(index, gw)?;
            // Published ports answer on 127.0.0.1 too: the kernel must route
            // those (DNAT'd) packets out of the bridge.
            sysctl::set(&format!("net.ipv4.conf.{bridge}.route_localnet"), "1")?;
            Ok(())
        })();
        if let Err(e) = configured {
            if created {
                let _ = nl.delete_link(&bridge);
            }
            return Err(e);
        }
        self.index = Some(index);
        Ok(created)
    }

    fn teardown(&mut self, nl: &mut Netlink, net: &Network) -> Result<()> {
        nl.delete_link(Self::bridge(net)?)?;
        self.index = None;
        Ok(())
    }

    fn endpoint_kind(&self, host_ifname: String) -> EndpointKind {
        EndpointKind::Veth { host_ifname }
    }

    fn attach(
        &self,
        nl: &mut Netlink,
        net: &Network,
        ep: &Endpoint,
        target: Target<'_>,
    ) -> Result<()> {
        let bridge = self.index(net)?;
        let Some(host_ifname) = ep.host_ifname() else {
            return Err(AgentError::WrongDriver {
                network: net.name.clone(),
                driver: "macvlan endpoint".into(),
                wanted: "veth endpoint",
            });
        };
        match target {
            // A pair the pool made ahead: 1 request on the host side, 3 inside.
            Target::Namespace {
                nl: ns_nl,
                prepared: Some((host_index, peer_index)),
                default_route,
                ..
            } => {
                nl.enslave_up(host_index, Some(host_ifname), bridge, net.mtu)?;
                configure_inside(ns_nl, peer_index, ep, net.mtu, default_route)
            }
            Target::Namespace {
                ns,
                nl: ns_nl,
                prepared: None,
                default_route,
            } => {
                nl.add_veth(host_ifname, Some(bridge), &ep.ifname, ns.fd(), net.mtu)?;
                crate::netns_pool::quiet_host_end(host_ifname)?;
                configure_new(ns, ns_nl, ep, net.mtu, default_route)
            }
            Target::HostForRuntime => {
                // A pair left by an earlier Join of this endpoint would be in the way.
                nl.delete_link(host_ifname)?;
                nl.delete_link(&ep.ifname)?;
                let here = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| {
                    AgentError::Io {
                        what: "open the agent's network namespace".into(),
                        source: e,
                    }
                })?;
                nl.add_veth(
                    host_ifname,
                    Some(bridge),
                    &ep.ifname,
                    here.as_raw_fd(),
                    net.mtu,
                )?;
                crate::netns_pool::quiet_host_end(host_ifname)
            }
        }
    }

    fn detach(&self, nl: &mut Netlink, ep: &Endpoint, _inside: Option<&mut Netlink>) -> Result<()> {
        // The sandbox end goes with its host end.
        if let Some(h) = ep.host_ifname() {
            nl.delete_link(h)?;
        }
        Ok(())
    }

    fn repair(
        &self,
        nl: &mut Netlink,
        net: &Network,
        ep: &Endpoint,
        links: &HashMap<String, Link>,
    ) -> Result<Found> {
        let bridge = self.index(net)?;
        let Some(l) = ep.host_ifname().and_then(|h| links.get(h)) else {
            return Ok(Found::Missing);
        };
        if l.master != Some(bridge) || !l.up {
            nl.enslave_up(l.index, None, bridge, net.mtu)?;
            tracing::info!(link = %l.name, "veth put back on its bridge");
        }
        Ok(Found::Fine)
    }

    fn owned_links(&self, net: &Network) -> Vec<String> {
        net.bridge().map(String::from).into_iter().collect()
    }

    fn programmed(&self, nl: &mut Netlink, net: &Network) -> Vec<ProgrammedView> {
        let Some(bridge) = net.bridge() else {
            return Vec::new();
        };
        let mut v = link_report(nl, "bridge", bridge, &format!("ip -d link show {bridge}"));
        v.detail = format!(
            "{}, gateway {}/{}",
            v.detail,
            net.gateway,
            net.subnet.prefix_len()
        );
        vec![v]
    }

    fn firewall(&self, net: &Network) -> Option<NetworkRule> {
        Some(NetworkRule {
            bridge: net.bridge()?.to_string(),
            subnet: net.subnet,
            internal: net.internal,
            overlay_range: net.overlay().map(|o| o.range),
        })
    }
}
