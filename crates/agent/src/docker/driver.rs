//! The `NetworkDriver` side: Docker networks onto weft networks, Docker
//! endpoints as external sandbox records, Join's veth pair, published ports.

use super::proto::{self, PortBinding};
use super::{address_key, network_key, short, DockerNetwork, Empty, Plugin, Reservation};
use crate::attach::{self, Attach, DefaultRoute, EndpointRequest, Namespace};
use crate::driver;
use crate::error::{AgentError, Result};
use crate::host::Inner;
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::IpAddr;
use tracing::{debug, info, warn};
use weft_model::ports::{HostPorts, PortRange, PortRequest, EPHEMERAL};
use weft_model::sandbox::{host_veth_name, DockerEndpoint, External, Runtime};
use weft_model::{keys, subnet, Attachment, Endpoint, NetworkSpec, Protocol};
use weft_model::{Published, Sandbox};
use weft_store::{Store, StoreJson};

/// `-o weft.network=NAME` (and `--ipam-opt weft.network=NAME`): the weft network.
pub(super) const NETWORK_OPTION: &str = "weft.network";
/// Label of a weft network made for Docker: the Docker network's id.
const NETWORK_ID_LABEL: &str = "com.docker.network.id";

fn bad(m: String) -> AgentError {
    AgentError::BadRequest(m)
}

/// libnetwork's ids are 64 hex digits; weft names links after the first ten.
fn check_id(what: &str, id: &str) -> Result<()> {
    if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("{what} id {id:?} is not a Docker id")));
    }
    Ok(())
}

/// `ADDR/LEN` as Docker writes addresses.
pub(super) fn parse_cidr(what: &str, s: &str) -> Result<Ipv4Net> {
    s.parse().map_err(|_| {
        bad(format!(
            "{what} {s:?} is not an IPv4 address with a prefix length"
        ))
    })
}

/// The container's end of the veth pair while it is in the host namespace.
/// `x` is no hex digit, so it never equals a host end (`wv<hex>`).
fn container_end(endpoint_id: &str) -> String {
    format!("wvx{}", &endpoint_id[..10])
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) fn docker_of(sb: &Sandbox) -> Option<&DockerEndpoint> {
    match &sb.external.as_ref()?.runtime {
        Runtime::Docker(d) => Some(d),
        Runtime::Cni => None,
    }
}

/// A Docker endpoint's aliases: the names of its container (one endpoint per record).
fn set_aliases(sb: &mut Sandbox, aliases: Vec<String>) {
    if let Attachment::Networks { endpoints } = &mut sb.attachment {
        for ep in endpoints {
            ep.aliases = aliases.clone();
        }
    }
}

fn docker_mut(sb: &mut Sandbox) -> Option<&mut DockerEndpoint> {
    match &mut sb.external.as_mut()?.runtime {
        Runtime::Docker(d) => Some(d),
        Runtime::Cni => None,
    }
}

/// A Docker endpoint's record and its one endpoint, on Docker network `network_id`.
fn endpoint_of<'a>(
    inner: &'a Inner,
    network_id: &str,
    endpoint_id: &str,
) -> Result<(&'a Sandbox, &'a Endpoint)> {
    inner
        .sandboxes
        .get(endpoint_id)
        .map(|s| &**s)
        .filter(|s| docker_of(s).is_some_and(|d| d.network_id == network_id))
        .and_then(|s| s.attachment.endpoints().first().map(|e| (s, e)))
        .ok_or_else(|| {
            AgentError::NotFound(format!(
                "weft has no Docker endpoint {} on network {}; it was removed (weft rm?) or made with another state dir",
                short(endpoint_id),
                short(network_id)
            ))
        })
}

/// Option values Docker passes as strings; anything else as its JSON.
fn string_map(v: Option<&serde_json::Value>) -> Result<BTreeMap<String, String>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
        Some(serde_json::Value::Object(m)) => Ok(m
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), String::from);
                (k.clone(), v)
            })
            .collect()),
        Some(other) => Err(bad(format!(
            "{}: expected an object of options, got {other}",
            proto::GENERIC_OPTIONS
        ))),
    }
}

fn binding_of(p: &Published) -> PortBinding {
    PortBinding {
        proto: match p.mapping.protocol {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
        },
        ip: p.target.to_string(),
        port: p.mapping.container.start,
        host_ip: p.mapping.host_ip.map(|a| a.to_string()).unwrap_or_default(),
        host_port: p.mapping.host.start,
        host_port_end: p.mapping.host.end,
    }
}

impl Plugin {
    pub(super) fn create_network(&self, req: proto::CreateNetwork) -> Result<Empty> {
        let mut st = self.state();
        let nid = req.network_id;
        check_id("network", &nid)?;
        if st.networks.contains_key(&nid) {
            return Ok(Empty {});
        }
        if !req.ipv6_data.is_empty() {
            return Err(bad(
                "weft networks are IPv4 only: create the Docker network without --ipv6".into(),
            ));
        }
        let [data] = req.ipv4_data.as_slice() else {
            return Err(bad(format!(
                "a weft network has one IPv4 subnet, Docker gave {}: give one --subnet",
                req.ipv4_data.len()
            )));
        };
        if !data.aux_addresses.is_empty() {
            return Err(bad(
                "--aux-address is not supported by weft networks; leave it out".into(),
            ));
        }
        let pool: Ipv4Net = data
            .pool
            .parse()
            .map_err(|_| bad(format!("pool {:?} is not an IPv4 subnet", data.pool)))?;
        let gateway = match data.gateway.as_str() {
            "" => None,
            g => Some(parse_cidr("gateway", g)?.addr()),
        };
        let mut opts = string_map(req.options.get(proto::GENERIC_OPTIONS))?;
        let internal = req
            .options
            .get(proto::INTERNAL)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let name = opts
            .remove(NETWORK_OPTION)
            .unwrap_or_else(|| format!("docker-{}", short(&nid)));
        let existing = self.host.lock().networks.get(&name).map(|n| n.net.clone());
        let created = match existing {
            Some(net) => {
                let hint = || {
                    format!(
                        "create the Docker network with --subnet {} --gateway {}, or with \
                         --ipam-driver weft --subnet {0}",
                        net.subnet, net.gateway
                    )
                };
                if !net.uses_bridge() {
                    return Err(bad(format!(
                        "weft network {name} is a {} network; Docker's containers join weft's bridge networks",
                        net.driver()
                    )));
                }
                if pool.trunc() != net.subnet {
                    return Err(bad(format!(
                        "weft network {name} has subnet {}, not {pool}: {}",
                        net.subnet,
                        hint()
                    )));
                }
                if gateway.is_some_and(|g| g != net.gateway) {
                    return Err(bad(format!(
                        "weft network {name} has gateway {}: {}",
                        net.gateway,
                        hint()
                    )));
                }
                if !opts.is_empty() {
                    let keys: Vec<&str> = opts.keys().map(String::as_str).collect();
                    return Err(bad(format!(
                        "weft network {name} exists, so its settings are weft's: leave out -o {}",
                        keys.join(", -o ")
                    )));
                }
                if internal && !net.internal {
                    return Err(bad(format!(
                        "--internal: weft network {name} is not internal"
                    )));
                }
                false
            }
            None => {
                if let Some(o) = self
                    .host
                    .lock()
                    .networks
                    .values()
                    .find(|n| subnet::overlaps(&n.net.range(), &pool))
                {
                    return Err(bad(format!(
                        "subnet {pool} overlaps {} of weft network {}: give the Docker network another \
                         --subnet, or use --ipam-driver weft, which picks a free one",
                        o.net.range(),
                        o.net.name
                    )));
                }
                let spec = NetworkSpec {
                    name: name.clone(),
                    subnet: Some(pool),
                    gateway,
                    ip_range: st.pending.get(&pool).and_then(|p| p.sub_pool),
                    internal,
                    options: opts,
                    labels: BTreeMap::from([(NETWORK_ID_LABEL.to_string(), nid.clone())]),
                    ..Default::default()
                };
                self.host.create_network(spec)?;
                true
            }
        };
        st.pending.remove(&pool);
        let rec = DockerNetwork {
            id: nid.clone(),
            network: name.clone(),
            created,
        };
        if let Err(e) = self
            .host
            .lock()
            .networks_db
            .put_json(&network_key(&nid), &rec)
        {
            if created {
                let _ = self.host.remove_network(&name, false);
            }
            return Err(e.into());
        }
        st.networks.insert(nid.clone(), rec);
        info!(docker_network = short(&nid), network = %name, created, "Docker network mapped");
        Ok(Empty {})
    }

    pub(super) fn delete_network(&self, req: proto::NetworkRef) -> Result<Empty> {
        let mut st = self.state();
        let Some(rec) = st.networks.get(&req.network_id).cloned() else {
            return Ok(Empty {});
        };
        let shared = st
            .networks
            .values()
            .any(|n| n.id != rec.id && n.network == rec.network);
        if rec.created && !shared {
            match self.host.remove_network(&rec.network, false) {
                Ok(_) | Err(AgentError::NotFound(_)) => {
                    // Its addresses went with it.
                    let gone: Vec<_> = st
                        .reserved
                        .iter()
                        .filter(|(n, _)| *n == rec.network)
                        .cloned()
                        .collect();
                    let g = self.host.lock();
                    for (n, ip) in gone {
                        g.runtime.delete(&address_key(&n, ip))?;
                        st.reserved.remove(&(n, ip));
                    }
                }
                // weft's own sandboxes joined it meanwhile: they keep it.
                Err(AgentError::Conflict(m)) => {
                    warn!(network = %rec.network, reason = %m, "kept the weft network of a removed Docker network")
                }
                Err(e) => return Err(e),
            }
        }
        self.host.lock().networks_db.delete(&network_key(&rec.id))?;
        st.networks.remove(&rec.id);
        info!(docker_network = short(&rec.id), network = %rec.network, "Docker network removed");
        Ok(Empty {})
    }

    pub(super) fn create_endpoint(
        &self,
        req: proto::CreateEndpoint,
    ) -> Result<proto::CreateEndpointReply> {
        let mut st = self.state();
        let eid = req.endpoint_id;
        check_id("endpoint", &eid)?;
        let network = st
            .networks
            .get(&req.network_id)
            .map(|n| n.network.clone())
            .ok_or_else(|| {
                AgentError::NotFound(format!(
                    "Docker network {} is not known to this weft agent (was it made with another state \
                     or data dir?); remove it with `docker network rm` and create it again",
                    short(&req.network_id)
                ))
            })?;
        let iface = req.interface.unwrap_or_default();
        if !iface.address_ipv6.is_empty() {
            return Err(bad(format!(
                "weft network {network} is IPv4 only; Docker asked for {}",
                iface.address_ipv6
            )));
        }
        let mut g = self.host.lock();
        let inner = &mut *g;
        if inner.sandboxes.contains_key(&eid) {
            return Err(AgentError::Conflict(format!(
                "Docker endpoint {} exists already",
                short(&eid)
            )));
        }
        let name = format!("docker-{}", short(&eid));
        if let Some(other) = inner.names.get(&name) {
            return Err(AgentError::Conflict(format!(
                "the name {name} is taken by sandbox {}",
                short(other)
            )));
        }
        let state = inner.networks.get(&network).ok_or_else(|| {
            AgentError::NotFound(format!(
                "weft network {network} of Docker network {} does not exist (removed with `weft network rm`?); \
                 create it again with `weft network create`",
                short(&req.network_id)
            ))
        })?;
        if !state.net.uses_bridge() {
            return Err(bad(format!(
                "weft network {network} is a {} network; Docker's containers join weft's bridge networks",
                state.net.driver()
            )));
        }
        let requested = match iface.address.as_str() {
            "" => None,
            a => {
                let a = parse_cidr("address", a)?;
                if a.trunc() != state.net.subnet {
                    return Err(bad(format!(
                        "Docker's address {a} is not in subnet {} of weft network {network}",
                        state.net.subnet
                    )));
                }
                Some(a.addr())
            }
        };
        // An address weft's IPAM reserved for this endpoint is in the pool already.
        let from_ipam = requested.is_some_and(|ip| st.reserved.contains(&(network.clone(), ip)));
        let sb = Sandbox {
            id: eid.clone(),
            name: name.clone(),
            attachment: Attachment::Networks {
                endpoints: Vec::new(),
            },
            netns: None,
            process: None,
            auto_remove: false,
            command: vec!["docker".into(), eid.clone()],
            created_unix: crate::ids::now_unix(),
            network_setup_us: 0,
            ports: Vec::new(),
            hostname: None,
            external: Some(External {
                container_id: eid.clone(),
                ifname: container_end(&eid),
                runtime: Runtime::Docker(DockerEndpoint {
                    network_id: req.network_id.clone(),
                    address_from_ipam: from_ipam,
                    sandbox_key: None,
                    container_name: None,
                }),
            }),
        };
        // Join plugs it in; until then it holds its address and names.
        let a = Attach {
            sandbox: sb,
            endpoints: vec![EndpointRequest {
                network: network.clone(),
                ip: requested,
                aliases: Vec::new(),
                ifname: container_end(&eid),
                host_ifname: host_veth_name(&eid, 0),
                mac: (!iface.mac_address.is_empty()).then(|| iface.mac_address.clone()),
                reserved: from_ipam,
                subrange: None,
            }],
            namespace: Namespace::Later,
            default_route: DefaultRoute::On(None),
            ports: Vec::new(),
            resolv: None,
            replace: false,
            started: None,
        };
        let sb = attach::attach(inner, a).map_err(|e| match e {
            AgentError::BadRequest(m) => bad(format!(
                "{m} (weft network {network}; Docker's default IPAM does not see weft's own \
                 sandboxes: --ipam-driver weft does)"
            )),
            e => e,
        })?;
        let ep = sb.attachment.endpoints()[0].clone();
        let (ip, mac) = (ep.ip, driver::endpoint_mac(&ep)?);
        if from_ipam {
            // The endpoint holds the address now; the reservation is done.
            st.reserved.remove(&(network.clone(), ip));
            inner.runtime.delete(&address_key(&network, ip))?;
        }
        info!(endpoint = short(&eid), %network, %ip, "Docker endpoint created");
        // Only what Docker did not choose itself.
        let chosen = proto::Interface {
            address: if requested.is_none() {
                format!("{ip}/{}", ep.prefix_len)
            } else {
                String::new()
            },
            address_ipv6: String::new(),
            mac_address: if iface.mac_address.is_empty() {
                mac_string(mac)
            } else {
                String::new()
            },
        };
        Ok(proto::CreateEndpointReply {
            interface: (!chosen.address.is_empty() || !chosen.mac_address.is_empty())
                .then_some(chosen),
        })
    }

    /// Idempotent: an endpoint weft does not have is already deleted.
    pub(super) fn delete_endpoint(&self, req: proto::EndpointRef) -> Result<Empty> {
        let mut st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        // Even a record `weft network rm -f` left without its endpoint goes.
        let Some(sb) = inner
            .sandboxes
            .get(&req.endpoint_id)
            .filter(|s| docker_of(s).is_some_and(|d| d.network_id == req.network_id))
            .cloned()
        else {
            return Ok(Empty {});
        };
        if let Err(e) = inner.firewall.delete_ports(&sb.ports) {
            warn!(endpoint = short(&sb.id), error = %e, "deleting published ports failed; rewriting the table");
            let kept = inner.sandboxes.remove(&sb.id);
            let rewritten = inner.apply_firewall();
            if let Some(k) = kept {
                inner.sandboxes.insert(sb.id.clone(), k);
            }
            rewritten?;
        }
        let from_ipam = docker_of(&sb).is_some_and(|d| d.address_from_ipam);
        for ep in sb.attachment.endpoints() {
            // Docker has moved the container's end back out by now; the pair goes as one.
            if let Some(n) = inner.networks.get(&ep.network) {
                n.driver.detach(&mut inner.nl, ep, None)?;
            }
            inner.nl.delete_link(&ep.ifname)?;
            if from_ipam && inner.networks.contains_key(&ep.network) {
                // Still Docker's until it releases it through the IPAM driver.
                inner.runtime.put_json(
                    &address_key(&ep.network, ep.ip),
                    &Reservation {
                        network: ep.network.clone(),
                        ip: ep.ip,
                    },
                )?;
                st.reserved.insert((ep.network.clone(), ep.ip));
            } else if let Some(n) = inner.networks.get_mut(&ep.network) {
                n.release(ep.ip);
            }
        }
        inner.runtime.delete(&keys::sandbox(&sb.id))?;
        inner.unregister(&sb.id);
        info!(endpoint = short(&sb.id), "Docker endpoint deleted");
        Ok(Empty {})
    }

    pub(super) fn endpoint_info(&self, req: proto::EndpointRef) -> Result<proto::EndpointInfo> {
        let g = self.host.lock();
        let mut value = BTreeMap::new();
        if let Ok((sb, ep)) = endpoint_of(&g, &req.network_id, &req.endpoint_id) {
            let bindings: Vec<PortBinding> = sb.ports.iter().map(binding_of).collect();
            value.insert(
                proto::PORT_MAP.to_string(),
                serde_json::to_value(bindings).expect("serialisable"),
            );
            if let Ok(mac) = driver::endpoint_mac(ep) {
                value.insert(proto::MAC_ADDRESS.to_string(), mac_string(mac).into());
            }
        }
        Ok(proto::EndpointInfo { value })
    }

    /// Makes the veth pair: the host end on the network's bridge, the
    /// container's end in the host namespace for Docker to move.
    pub(super) fn join(&self, req: proto::Join) -> Result<proto::JoinReply> {
        let _st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let (sb, ep) = endpoint_of(inner, &req.network_id, &req.endpoint_id)?;
        let (mut sb, ep) = (sb.clone(), ep.clone());
        let internal = inner
            .networks
            .get(&ep.network)
            .ok_or_else(|| {
                AgentError::NotFound(format!(
                    "weft network {} does not exist (removed with `weft network rm`?)",
                    ep.network
                ))
            })?
            .net
            .internal;
        attach::plug_for_runtime(inner, &ep)?;
        if let Some(d) = docker_mut(&mut sb) {
            d.sandbox_key = Some(req.sandbox_key.clone());
        }
        if let Err(e) = inner.runtime.put_json(&keys::sandbox(&sb.id), &sb) {
            if let Some(n) = inner.networks.get(&ep.network) {
                let _ = n.driver.detach(&mut inner.nl, &ep, None);
            }
            return Err(e.into());
        }
        inner.register(sb);
        info!(endpoint = short(&req.endpoint_id), sandbox = %req.sandbox_key, "Docker endpoint joined");
        Ok(proto::JoinReply {
            interface_name: proto::InterfaceName {
                src_name: ep.ifname.clone(),
                dst_prefix: "eth".into(),
            },
            gateway: if internal {
                String::new()
            } else {
                ep.gateway.to_string()
            },
            disable_gateway_service: internal,
        })
    }

    /// Docker still has the interface in the container now; it moves it back
    /// after Leave, and DeleteEndpoint deletes the pair.
    pub(super) fn leave(&self, req: proto::EndpointRef) -> Result<Empty> {
        let _st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let Ok((sb, _)) = endpoint_of(inner, &req.network_id, &req.endpoint_id) else {
            return Ok(Empty {});
        };
        let mut sb = sb.clone();
        inner.firewall.delete_ports(&sb.ports)?;
        sb.ports.clear();
        if let Some(d) = docker_mut(&mut sb) {
            d.sandbox_key = None;
            d.container_name = None;
        }
        // The container's names were all the endpoint's aliases (see record_names).
        set_aliases(&mut sb, Vec::new());
        inner.runtime.put_json(&keys::sandbox(&sb.id), &sb)?;
        inner.register(sb);
        Ok(Empty {})
    }

    /// Records the name (and Docker aliases) of the container joined to a
    /// Docker endpoint, as dockerd's API tells them: they become the
    /// endpoint's aliases, so weft's resolver answers them (Docker's own
    /// answers only for containers of the same dockerd). Returns whether
    /// the endpoint was still joined and got them. Names that are not DNS
    /// names (a container `my_app`, say) are left out.
    pub(super) fn record_names(
        &self,
        endpoint_id: &str,
        container: &str,
        names: &[String],
    ) -> Result<bool> {
        let _st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let Some(sb) = inner.sandboxes.get(endpoint_id) else {
            return Ok(false);
        };
        let mut sb = (**sb).clone();
        match docker_mut(&mut sb) {
            Some(d) if d.sandbox_key.is_some() => d.container_name = Some(container.to_string()),
            // Left (or never joined) meanwhile.
            _ => return Ok(false),
        }
        let mut aliases: Vec<String> = Vec::new();
        for n in names {
            if *n == sb.name || aliases.contains(n) {
                continue;
            }
            match weft_model::names::validate("name", n) {
                Ok(()) => aliases.push(n.clone()),
                Err(e) => {
                    debug!(endpoint = short(endpoint_id), error = %e, "a Docker name weft's resolver cannot answer")
                }
            }
        }
        set_aliases(&mut sb, aliases.clone());
        inner.runtime.put_json(&keys::sandbox(&sb.id), &sb)?;
        inner.register(sb);
        info!(endpoint = short(endpoint_id), container, names = %aliases.join(","), "Docker container's names recorded");
        Ok(true)
    }

    /// Published ports (`docker run -p`) as weft's nft port maps to the
    /// endpoint's address.
    pub(super) fn program_external(&self, req: proto::ExternalConnectivity) -> Result<Empty> {
        let bindings: Vec<PortBinding> = match req.options.get(proto::PORT_MAP) {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| bad(format!("{}: {e}", proto::PORT_MAP)))?,
        };
        let _st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let (sb, ep) = endpoint_of(inner, &req.network_id, &req.endpoint_id)?;
        let (mut sb, ep) = (sb.clone(), ep.clone());
        if bindings.is_empty() && sb.ports.is_empty() {
            return Ok(Empty {});
        }
        if !bindings.is_empty() {
            let net = inner.networks.get(&ep.network).map(|n| &n.net);
            if net.is_some_and(|n| n.internal) {
                return Err(bad(format!(
                    "-p: weft network {} is internal, so nothing outside may reach it",
                    ep.network
                )));
            }
        }
        let mut requests: Vec<PortRequest> = Vec::new();
        for b in &bindings {
            let protocol = match b.proto {
                proto::TCP => Protocol::Tcp,
                proto::UDP => Protocol::Udp,
                p => {
                    return Err(bad(format!(
                        "-p …/{}: weft publishes tcp and udp ports only",
                        if p == 132 {
                            "sctp".into()
                        } else {
                            p.to_string()
                        }
                    )))
                }
            };
            let host_ip = match b.host_ip.as_str() {
                "" => None,
                s => match s.parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) if a.is_unspecified() => None,
                    Ok(IpAddr::V4(a)) => Some(a),
                    // Docker's IPv6 twin of a port on every address; weft's networks are IPv4.
                    Ok(IpAddr::V6(a)) if a.is_unspecified() => continue,
                    _ => {
                        return Err(bad(format!(
                            "-p {s}:…: weft publishes on IPv4 host addresses only"
                        )))
                    }
                },
            };
            let container = PortRange {
                start: b.port,
                end: b.port,
            };
            // Docker's meaning: no host port is any free one; a range, any one of it.
            let host = match (b.host_port, b.host_port_end) {
                (0, _) => HostPorts::AnyOf(EPHEMERAL),
                (p, end) if end > p => HostPorts::AnyOf(PortRange { start: p, end }),
                (p, _) => HostPorts::Exactly(PortRange { start: p, end: p }),
            };
            requests.push(PortRequest {
                host_ip,
                host,
                container,
                protocol,
            });
        }
        let mappings = crate::attach::resolve_ports(inner, &requests, &sb.id)?;
        crate::attach::check_ports_free(inner, &mappings, &sb.id)?;
        let published: Vec<Published> = mappings
            .into_iter()
            .map(|mapping| Published {
                mapping,
                network: ep.network.clone(),
                target: ep.ip,
                held_by_runtime: false,
            })
            .collect();
        inner.firewall.delete_ports(&sb.ports)?;
        let old = std::mem::replace(&mut sb.ports, published);
        let applied = inner
            .firewall
            .add_ports(&sb.ports)
            .and_then(|_| Ok(inner.runtime.put_json(&keys::sandbox(&sb.id), &sb)?));
        if let Err(e) = applied {
            let _ = inner.firewall.delete_ports(&sb.ports);
            let _ = inner.firewall.add_ports(&old);
            return Err(e);
        }
        let shown: Vec<String> = sb.ports.iter().map(|p| p.mapping.to_string()).collect();
        info!(endpoint = short(&sb.id), ports = %shown.join(" "), "Docker ports published");
        inner.register(sb);
        Ok(Empty {})
    }

    pub(super) fn revoke_external(&self, req: proto::EndpointRef) -> Result<Empty> {
        let _st = self.state();
        let mut g = self.host.lock();
        let inner = &mut *g;
        let Ok((sb, _)) = endpoint_of(inner, &req.network_id, &req.endpoint_id) else {
            return Ok(Empty {});
        };
        if sb.ports.is_empty() {
            return Ok(Empty {});
        }
        let mut sb = sb.clone();
        inner.firewall.delete_ports(&sb.ports)?;
        sb.ports.clear();
        inner.runtime.put_json(&keys::sandbox(&sb.id), &sb)?;
        inner.register(sb);
        Ok(Empty {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn container_end_never_looks_like_a_host_end() {
        let id = "c0123456789abcdef";
        assert_eq!(container_end(id), "wvxc012345678");
        assert_ne!(container_end(id), host_veth_name(id, 0));
        assert!(container_end(id).len() <= 15);
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("endpoint", &"ab".repeat(32)).is_ok());
        assert!(check_id("endpoint", "short").is_err());
        assert!(check_id("endpoint", "zz0123456789abcdef").is_err());
    }

    #[test]
    fn bindings_show_the_chosen_port() {
        let p = Published {
            mapping: "8080:80".parse().unwrap(),
            network: "n".into(),
            target: Ipv4Addr::new(10, 0, 0, 2),
            held_by_runtime: false,
        };
        let b = binding_of(&p);
        assert_eq!(
            (b.proto, b.port, b.host_port, b.host_port_end),
            (6, 80, 8080, 8080)
        );
        assert_eq!(b.ip, "10.0.0.2");
        assert_eq!(b.host_ip, "");
    }
}
