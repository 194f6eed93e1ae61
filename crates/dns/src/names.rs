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
    /// address -> network -> every network of the sandbox at that address
    /// on that network (keyed so that a lookup borrows, never allocates).
    member_of: HashMap<Ipv4Addr, HashMap<String, Vec<String>>>,
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
                .entry(ep.ip)
                .or_default()
                .insert(ep.network.clone(), networks.clone());
            entries.push((ep.network.clone(), ep.ip, names));
        }
        self.added.insert(sb.id.clone(), entries);
    }

    /// Replaces the names of `network`'s sandboxes on other hosts, given
    /// as (address, names; the first is the sandbox's own). Only what
    /// changed is touched, so a pass with nothing new costs one compare
    /// per entry.
    pub fn set_remote(&mut self, network: &str, entries: Vec<(Ipv4Addr, Vec<String>)>) {
        let prefix = format!("remote/{network}/");
        let want: HashMap<String, (Ipv4Addr, Vec<String>)> = entries
            .into_iter()
            .filter(|(_, names)| !names.is_empty())
            .map(|(ip, names)| {
                let names = names.iter().map(|n| n.to_ascii_lowercase()).collect();
                (format!("{prefix}{ip}"), (ip, names))
            })
            .collect();
        let stale: Vec<String> = self
            .added
            .iter()
            .filter(|(k, v)| {
                k.starts_with(&prefix)
                    && want.get(*k).is_none_or(|(ip, names)| {
                        v.first().is_none_or(|(_, a, n)| a != ip || n != names)
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.remove(&k);
        }
        for (k, (ip, names)) in want {
            if self.added.contains_key(&k) {
                continue;
            }
            let fwd = self.forward.entry(network.to_string()).or_default();
            for n in &names {
                fwd.entry(n.clone()).or_default().insert(ip);
            }
            self.reverse
                .entry(network.to_string())
                .or_default()
                .insert(ip, names[0].clone());
            self.member_of
                .entry(ip)
                .or_default()
                .insert(network.to_string(), vec![network.to_string()]);
            self.added.insert(k, vec![(network.to_string(), ip, names)]);
        }
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
            if let Some(m) = self.member_of.get_mut(&ip) {
                m.remove(&net);
                if m.is_empty() {
                    self.member_of.remove(&ip);
                }
            }
        }
    }

    /// The networks whose names a client sees: every network of its sandbox,
    /// or just the one it asked on if it is not a sandbox (the host, say).
    pub fn visible_networks(&self, network: &str, client: Ipv4Addr) -> Vec<String> {
        self.visible(network, client).map(str::to_string).collect()
    }

    /// [`Names::visible_networks`], borrowed.
    fn visible<'a>(&'a self, network: &'a str, client: Ipv4Addr) -> impl Iterator<Item = &'a str> {
        let member = self.member_of.get(&client).and_then(|m| m.get(network));
        member
            .into_iter()
            .flatten()
            .map(String::as_str)
            .chain(member.is_none().then_some(network))
    }

    /// The addresses of `name` that `client` sees on `network`, if they all
    /// come from one network (so they are sorted and distinct, as
    /// [`Names::lookup`] returns them): what the fast path answers from,
    /// without allocating. `Err(())` when several networks know the name.
    pub(crate) fn lookup_one(
        &self,
        network: &str,
        client: Ipv4Addr,
        name: &str,
    ) -> Result<Option<&BTreeSet<Ipv4Addr>>, ()> {
        let mut found = None;
        for n in self.visible(network, client) {
            if let Some(set) = self.forward.get(n).and_then(|f| f.get(name)) {
                if set.is_empty() {
                    continue;
                }
                if found.is_some() {
                    return Err(());
                }
                found = Some(set);
            }
        }
        Ok(found)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn remote_names_follow_the_records_and_touch_only_what_changed() {
        let mut n = Names::default();
        let nets = vec!["ov".to_string()];
        n.set_remote(
            "ov",
            vec![
                (ip("10.0.2.7"), vec!["Web".into(), "www".into()]),
                (ip("10.0.2.8"), vec!["db".into()]),
            ],
        );
        assert_eq!(n.lookup(&nets, "web"), vec![ip("10.0.2.7")]);
        assert_eq!(n.lookup(&nets, "www"), vec![ip("10.0.2.7")]);
        assert_eq!(n.reverse(&nets, ip("10.0.2.8")), Some("db"));
        // A remote client sees the network it asked on.
        assert_eq!(n.visible_networks("ov", ip("10.0.2.8")), nets);
        // web moved to another address, db left, cache came.
        n.set_remote(
            "ov",
            vec![
                (ip("10.0.2.9"), vec!["web".into()]),
                (ip("10.0.2.10"), vec!["cache".into()]),
            ],
        );
        assert_eq!(n.lookup(&nets, "web"), vec![ip("10.0.2.9")]);
        assert!(
            n.lookup(&nets, "www").is_empty(),
            "the alias went with the old record"
        );
        assert!(n.lookup(&nets, "db").is_empty());
        assert_eq!(n.reverse(&nets, ip("10.0.2.8")), None);
        assert_eq!(n.lookup(&nets, "cache"), vec![ip("10.0.2.10")]);
        // Another network's remote names are its own.
        n.set_remote("other", vec![(ip("10.9.0.2"), vec!["web".into()])]);
        assert_eq!(n.lookup(&nets, "web"), vec![ip("10.0.2.9")]);
        n.set_remote("ov", vec![]);
        assert!(n.lookup(&nets, "web").is_empty());
        assert_eq!(
            n.lookup(&["other".to_string()], "web"),
            vec![ip("10.9.0.2")]
        );
    }
}
