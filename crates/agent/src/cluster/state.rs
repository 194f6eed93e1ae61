//! The cluster's global state as read from etcd: networks, leases, the
//! blocks of shared networks and the endpoints of every network, kept
//! current by applying watch changes. Values that fail to parse are logged
//! and skipped, never fatal: one bad key must not stop the cluster.

use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use tracing::warn;
use weft_model::blocks::{BlockHolder, EndpointRecord};
use weft_model::{Lease, Network};
use weft_store::Change;

#[derive(Default)]
pub(crate) struct Global {
    pub networks: BTreeMap<String, Network>,
    /// network -> lease key -> (lease, raw value as stored).
    leases: BTreeMap<String, BTreeMap<String, (Lease, Vec<u8>)>>,
    /// network -> block -> who holds it (shared networks).
    pub blocks: BTreeMap<String, BTreeMap<Ipv4Net, BlockHolder>>,
    /// network -> address -> the endpoint there (every network that spans hosts).
    pub endpoints: BTreeMap<String, BTreeMap<Ipv4Addr, EndpointRecord>>,
}

enum Key<'a> {
    Network(&'a str),
    Lease(&'a str),
    Block(&'a str, Ipv4Net),
    Endpoint(&'a str, Ipv4Addr),
    Other,
}

/// `10.0.2.16-28` back into a subnet.
fn parse_subnet_key(s: &str) -> Option<Ipv4Net> {
    let (a, len) = s.split_once('-')?;
    Ipv4Net::new(a.parse().ok()?, len.parse().ok()?).ok()
}

fn parse_key(key: &str) -> Key<'_> {
    if let Some(name) = key.strip_prefix("networks/") {
        return Key::Network(name);
    }
    if let Some(rest) = key.strip_prefix("leases/") {
        if let Some((net, _)) = rest.split_once('/') {
            return Key::Lease(net);
        }
    }
    if let Some((net, b)) = key.strip_prefix("blocks/").and_then(|r| r.split_once('/')) {
        if let Some(b) = parse_subnet_key(b) {
            return Key::Block(net, b);
        }
    }
    if let Some((net, ip)) = key
        .strip_prefix("endpoints/")
        .and_then(|r| r.split_once('/'))
    {
        if let Ok(ip) = ip.parse() {
            return Key::Endpoint(net, ip);
        }
    }
    Key::Other
}

impl Global {
    pub fn from_list(kvs: Vec<(String, Vec<u8>)>) -> Global {
        let mut g = Global::default();
        for (k, v) in kvs {
            g.put_raw(&k, v);
        }
        g
    }

    pub fn put_raw(&mut self, key: &str, value: Vec<u8>) {
        match parse_key(key) {
            Key::Network(name) => match serde_json::from_slice::<Network>(&value) {
                Ok(n) => {
                    self.networks.insert(name.to_string(), n);
                }
                Err(e) => warn!(key, error = %e, "skipping a network that does not parse"),
            },
            Key::Lease(net) => match serde_json::from_slice::<Lease>(&value) {
                Ok(l) => {
                    self.leases
                        .entry(net.to_string())
                        .or_default()
                        .insert(key.to_string(), (l, value));
                }
                Err(e) => warn!(key, error = %e, "skipping a lease that does not parse"),
            },
            Key::Block(net, b) => match serde_json::from_slice::<BlockHolder>(&value) {
                Ok(h) => {
                    self.blocks.entry(net.to_string()).or_default().insert(b, h);
                }
                Err(e) => warn!(key, error = %e, "skipping a block that does not parse"),
            },
            Key::Endpoint(net, ip) => match serde_json::from_slice::<EndpointRecord>(&value) {
                Ok(r) if r.ip == ip => {
                    self.endpoints
                        .entry(net.to_string())
                        .or_default()
                        .insert(ip, r);
                }
                Ok(r) => {
                    warn!(key, ip = %r.ip, "skipping an endpoint whose address is not its key's")
                }
                Err(e) => warn!(key, error = %e, "skipping an endpoint that does not parse"),
            },
            Key::Other => {}
        }
    }

    pub fn delete(&mut self, key: &str) {
        match parse_key(key) {
            Key::Network(name) => {
                self.networks.remove(name);
            }
            Key::Lease(net) => {
                if let Some(m) = self.leases.get_mut(net) {
                    m.remove(key);
                }
            }
            Key::Block(net, b) => {
                if let Some(m) = self.blocks.get_mut(net) {
                    m.remove(&b);
                }
            }
            Key::Endpoint(net, ip) => {
                if let Some(m) = self.endpoints.get_mut(net) {
                    m.remove(&ip);
                }
            }
            Key::Other => {}
        }
    }

    pub fn apply(&mut self, c: &Change) {
        match &c.value {
            Some(v) => self.put_raw(&c.key, v.clone()),
            None => self.delete(&c.key),
        }
    }

    pub fn leases_of<'a>(&'a self, network: &str) -> impl Iterator<Item = &'a Lease> + 'a {
        self.leases
            .get(network)
            .into_iter()
            .flat_map(|m| m.values().map(|(l, _)| l))
    }

    /// Every lease of `network` with the key it was found at.
    pub fn leases_keyed<'a>(
        &'a self,
        network: &str,
    ) -> impl Iterator<Item = (&'a str, &'a Lease)> + 'a {
        self.leases
            .get(network)
            .into_iter()
            .flat_map(|m| m.iter().map(|(k, (l, _))| (k.as_str(), l)))
    }

    /// This host's lease on `network`: key, raw value, lease.
    pub fn own(&self, network: &str, host_id: &str) -> Option<(String, Vec<u8>, Lease)> {
        self.leases
            .get(network)?
            .iter()
            .find(|(_, (l, _))| l.host_id == host_id)
            .map(|(k, (l, raw))| (k.clone(), raw.clone(), l.clone()))
    }

    /// The blocks of `network` that `host_id` holds.
    pub fn blocks_of(&self, network: &str, host_id: &str) -> Vec<Ipv4Net> {
        self.blocks
            .get(network)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, h)| h.host_id == host_id)
            .map(|(b, _)| *b)
            .collect()
    }

    /// The endpoints of `network` (empty when it has none).
    pub fn endpoints_of(&self, network: &str) -> impl Iterator<Item = &EndpointRecord> {
        self.endpoints
            .get(network)
            .into_iter()
            .flat_map(|m| m.values())
    }

    #[cfg(test)]
    pub fn subnets_of(&self, network: &str) -> Vec<ipnet::Ipv4Net> {
        self.leases_of(network).map(|l| l.subnet).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(net: &str, subnet: &str, host: &str) -> Vec<u8> {
        serde_json::to_vec(&Lease {
            signed: None,
            network: net.into(),
            subnet: subnet.parse().unwrap(),
            host_id: host.into(),
            node: host.into(),
            public_ip: "198.51.100.1".parse().unwrap(),
            vtep_mac: None,
            public_key: None,
        })
        .unwrap()
    }

    #[test]
    fn watch_changes_keep_the_state_current() {
        let mut g = Global::from_list(vec![
            (
                "leases/ov/10.40.1.0-24".into(),
                lease("ov", "10.40.1.0/24", "a"),
            ),
            (
                "leases/ov/10.40.2.0-24".into(),
                lease("ov", "10.40.2.0/24", "b"),
            ),
            ("leases/ov/bad".into(), b"not json".to_vec()),
            ("vnis/1".into(), b"ov".to_vec()),
        ]);
        assert_eq!(g.leases_of("ov").count(), 2);
        assert_eq!(
            g.own("ov", "b").unwrap().2.subnet.to_string(),
            "10.40.2.0/24"
        );
        g.apply(&Change {
            key: "leases/ov/10.40.2.0-24".into(),
            value: None,
            revision: 9,
        });
        assert!(g.own("ov", "b").is_none());
        g.apply(&Change {
            key: "leases/ov/10.40.3.0-24".into(),
            value: Some(lease("ov", "10.40.3.0/24", "c")),
            revision: 10,
        });
        assert_eq!(g.subnets_of("ov").len(), 2);
    }

    #[test]
    fn blocks_and_endpoints_are_kept_by_key() {
        let holder = |h: &str| {
            serde_json::to_vec(&BlockHolder {
                host_id: h.into(),
                node: h.into(),
            })
            .unwrap()
        };
        let ep = |ip: &str, h: &str| {
            serde_json::to_vec(&EndpointRecord {
                ip: ip.parse().unwrap(),
                mac: "02:42:0a:00:02:07".into(),
                host_id: h.into(),
                node: h.into(),
                public_ip: "198.51.100.1".parse().unwrap(),
                sandbox: Some("web".into()),
                names: vec!["web".into()],
                exposed: false,
                signed: None,
            })
            .unwrap()
        };
        let mut g = Global::from_list(vec![
            ("blocks/sh/10.0.2.0-28".into(), holder("a")),
            ("blocks/sh/10.0.2.16-28".into(), holder("b")),
            ("blocks/sh/junk".into(), holder("b")),
            ("endpoints/sh/10.0.2.7".into(), ep("10.0.2.7", "a")),
            // Its key and its address disagree: skipped.
            ("endpoints/sh/10.0.2.8".into(), ep("10.0.2.9", "a")),
        ]);
        assert_eq!(
            g.blocks_of("sh", "b"),
            vec!["10.0.2.16/28".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(g.endpoints_of("sh").count(), 1);
        g.apply(&Change {
            key: "endpoints/sh/10.0.2.7".into(),
            value: None,
            revision: 3,
        });
        g.apply(&Change {
            key: "blocks/sh/10.0.2.0-28".into(),
            value: None,
            revision: 4,
        });
        assert_eq!(g.endpoints_of("sh").count(), 0);
        assert!(g.blocks_of("sh", "a").is_empty());
    }
}
