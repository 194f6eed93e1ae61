//! The cluster's global state as read from etcd: networks and leases, kept
//! current by applying watch changes. Values that fail to parse are logged
//! and skipped, never fatal: one bad key must not stop the cluster.

use std::collections::BTreeMap;
use tracing::warn;
use weft_model::{Lease, Network};
use weft_store::Change;

#[derive(Default)]
pub(crate) struct Global {
    pub networks: BTreeMap<String, Network>,
    /// network -> lease key -> (lease, raw value as stored).
    leases: BTreeMap<String, BTreeMap<String, (Lease, Vec<u8>)>>,
}

enum Key<'a> {
    Network(&'a str),
    Lease(&'a str),
    Other,
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
}
