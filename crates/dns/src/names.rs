//! The names the resolver knows: per network, each sandbox's name and
//! aliases, and the reverse for PTR.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use weft_model::Sandbox;

#[derive(Debug, Default, Clone)]
pub struct Names {
    /// network -> lowercase name -> addresses (several sandboxes may share an alias).
    forward: HashMap<String, BTreeMap<String, BTreeSet<Ipv4Addr>>>,
    /// network -> address -> sandbox name.
    reverse: HashMap<String, HashMap<Ipv4Addr, String>>,
    /// (network, address) -> every network of the sandbox at that address.
    member_of: HashMap<(String, Ipv4Addr), Vec<String>>,
    /// sandbox id -> what it added, to take it back.
    added: HashMap<String, Vec<(String, Ipv4Addr, Vec<String>)>>,
}

impl Names {
    /// Adds (or replaces) a sandbox's names on each of its networks.
    pub fn add(&mut self, sb: &Sandbox) {
        self.remove(&sb.id);
        let eps = sb.attachment.endpoints();
        let networks: Vec<String> = eps.iter().map(|e| e.network.clone()).collect();
        let mut entries = Vec::with_capacity(eps.len());
        for ep in eps {
            let names: Vec<String> = std::iter::once(&sb.name)
                .chain(ep.aliases.iter())
                .map(|n| n.to_ascii_lowercase())
                .collect();
            let fwd = self.forward.entry(ep.network.clone()).or_default();
            for n in &names {
                fwd.entry(n.clone()).or_default().insert(ep.ip);
            }
            self.reverse
                .entry(ep.network.clone())
                .or_default()
                .insert(ep.ip, sb.name.to_ascii_lowercase());
            self.member_of
                .insert((ep.network.clone(), ep.ip), networks.clone());
            entries.push((ep.network.clone(), ep.ip, names));
        }
        self.added.insert(sb.id.clone(), entries);
    }

    pub fn remove(&mut self, id: &str) {
        for (net, ip, names) in self.added.remove(id).unwrap_or_default() {
            if let Some(fwd) = self.forward.get_mut(&net) {
                for n in names {
                    if let Some(set) = fwd.get_mut(&n) {
                        set.remove(&ip);
                        if set.is_empty() {
                            fwd.remove(&n);
                        }
                    }
                }
            }
            if let Some(rev) = self.reverse.get_mut(&net) {
                rev.remove(&ip);
            }
            self.member_of.remove(&(net, ip));
        }
    }

    /// The networks whose names a client sees: every network of its sandbox,
    /// or just the one it asked on if it is not a sandbox (the host, say).
    pub fn visible_networks(&self, network: &str, client: Ipv4Addr) -> Vec<String> {
        self.member_of
            .get(&(network.to_string(), client))
            .cloned()
            .unwrap_or_else(|| vec![network.to_string()])
    }

    /// Addresses of `name` on the given networks.
    pub fn lookup(&self, networks: &[String], name: &str) -> Vec<Ipv4Addr> {
        let mut out = BTreeSet::new();
        for n in networks {
            if let Some(set) = self.forward.get(n).and_then(|f| f.get(name)) {
                out.extend(set.iter().copied());
            }
        }
        out.into_iter().collect()
    }

    /// The sandbox name at `ip` on one of the given networks.
    pub fn reverse(&self, networks: &[String], ip: Ipv4Addr) -> Option<&str> {
        networks
            .iter()
            .find_map(|n| self.reverse.get(n).and_then(|r| r.get(&ip)))
            .map(String::as_str)
    }
}
