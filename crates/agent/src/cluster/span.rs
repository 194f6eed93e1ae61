//! Networks whose one subnet is shared by all hosts, and the endpoint
//! records of every network that spans hosts.
//!
//! IPAM without a round trip: each host holds blocks of the subnet
//! (`blocks/NET/A-LEN`, created if absent, bound to its etcd lease) and
//! hands out their addresses itself. It claims its first block when it
//! joins and another while it still has room (fewer than [`low_water`]
//! free), so an attach waits for etcd only when a burst outruns that.
//! When no block is free a host borrows single addresses of other hosts'
//! blocks, from the top of the block down (their holders hand out from
//! the bottom up); a `--ip` outside its blocks is claimed the same way.
//! Every address in use has a record at `endpoints/NET/IP` (created if
//! absent, bound to the lease): that is where every host learns where a
//! sandbox is (the datapath, names) and where a second claim on one
//! address is refused, naming the holder.
//!
//! What this host publishes is computed from its sandboxes each pass and
//! compared with what etcd holds: records are put, replaced and deleted
//! to match, never replayed from events.

use super::identity::Identity;
use super::state::Global;
use super::Cluster;
use crate::error::{AgentError, Result};
use crate::overlay::{Claimed, Me};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{info, warn};
use weft_model::api::BlockView;
use weft_model::blocks::{
    block_key, blocks_of, endpoint_key, pick_free_block, usable, BlockHolder, EndpointRecord,
};
use weft_model::overlay::seed_of;
use weft_model::Network;
use weft_store::EtcdResult;

/// A host claims another block while fewer addresses than this are free:
/// a quarter of a block, from 2 to 8, so that in a small subnet (blocks of
/// 8) the first hosts do not take every block ahead of the others.
fn low_water(block_len: u8) -> usize {
    ((1usize << (32 - block_len)) / 4).clamp(2, 8)
}
/// A record written this recently and not yet seen in the watch is not
/// written again (a burst of attaches would rewrite each one per pass).
const ECHO_WAIT: Duration = Duration::from_secs(2);

/// How long after first finding every block held a host waits before it
/// borrows another host's address, so that the holders have switched to
/// claiming each address they hand out (they learn it from the watch).
const BORROW_GRACE: Duration = Duration::from_secs(1);

/// Records written and not yet seen back: key -> (record, when).
pub(super) type Written = BTreeMap<String, (EndpointRecord, Instant)>;

/// Verdicts on other hosts' records: (network, address) -> (the record
/// checked, why it is refused or None).
pub(super) type Verdicts =
    std::collections::HashMap<(String, Ipv4Addr), (EndpointRecord, Option<String>)>;

fn me_of(me: &Identity) -> Me {
    Me {
        host_id: me.host_id.clone(),
        node: me.node.clone(),
        public_ip: me.public_ip,
    }
}

impl Cluster {
    fn etcd_lease(&self) -> Option<i64> {
        let l = self.lease.load(Ordering::Relaxed);
        (l != 0).then_some(l)
    }

    /// Creates `blocks/NET/BLOCK` for this host if nobody holds it.
    async fn claim_block(&self, network: &str, block: Ipv4Net, me: &Identity) -> EtcdResult<bool> {
        let holder = BlockHolder {
            host_id: me.host_id.clone(),
            node: me.node.clone(),
        };
        let created = self
            .etcd
            .create(
                &[(
                    block_key(network, &block),
                    serde_json::to_vec(&holder).expect("serializable"),
                )],
                self.etcd_lease(),
            )
            .await?;
        let mine = created || {
            // Already there: ours when the watch has not brought it back yet.
            let raw = self.etcd.get(&block_key(network, &block)).await?;
            raw.and_then(|r| serde_json::from_slice::<BlockHolder>(&r).ok())
                .is_some_and(|h| h.host_id == me.host_id)
        };
        if created {
            info!(network, %block, "block claimed");
        }
        if mine {
            self.host.add_claim(network, Claimed::Block(block));
            self.save_identity(|me| {
                me.blocks
                    .entry(network.to_string())
                    .or_default()
                    .insert(block);
            });
        }
        Ok(mine)
    }

    /// Makes this host hold blocks of the shared network `net`: the ones it
    /// holds in `global`, the ones it held before (a restart after its
    /// lease expired: its sandboxes' addresses are in them) when they are
    /// still free, and a new one while room is low. Sets the host's share
    /// and returns its blocks, and problems for `weft status`.
    pub(super) async fn hold_blocks(
        &self,
        global: &Global,
        net: &Network,
        me: &Identity,
        problems: &mut Vec<String>,
    ) -> EtcdResult<BTreeSet<Ipv4Net>> {
        let name = net.name.as_str();
        let mut held: BTreeSet<Ipv4Net> = global.blocks_of(name, &me.host_id).into_iter().collect();
        let holders = global.blocks.get(name);
        if self.etcd_lease().is_some() {
            // The identity is current (a claim writes it at once), the
            // global state only once the watch brings the claim back.
            let remembered = crate::host::recover(self.me.lock())
                .blocks
                .get(name)
                .cloned()
                .unwrap_or_default();
            for b in &remembered {
                if held.contains(b) {
                    continue;
                }
                match holders.and_then(|h| h.get(b)) {
                    Some(h) => problems.push(format!(
                        "block {b}, which this host held before, is now held by host {}; sandboxes of this host in it keep their addresses as claimed ones",
                        h.node
                    )),
                    None => {
                        if self.claim_block(name, *b, me).await? {
                            held.insert(*b);
                        }
                    }
                }
            }
        }
        let foreign: BTreeMap<Ipv4Addr, String> = global
            .endpoints_of(name)
            .filter(|r| r.host_id != me.host_id)
            .map(|r| (r.ip, r.holder()))
            .collect();
        let contended = Self::all_blocks_held(global, net);
        if !contended {
            crate::host::recover(self.full_since.lock()).remove(name);
        }
        let free = self.host.set_share(name, held.clone(), foreign, contended);
        let left = self.left.load(Ordering::Relaxed);
        let low = net.overlay().map_or(8, |o| low_water(o.host_subnet_len));
        if free < low && !left && self.etcd_lease().is_some() {
            if let Some(b) = self.claim_free_block(global, net, me, None).await? {
                held.insert(b);
            }
        }
        Ok(held)
    }

    /// Whether every block of the shared network `net` is held: other
    /// hosts may then borrow addresses of this host's blocks, so this host
    /// claims each address it hands out too (create-if-absent settles who
    /// gets one), instead of handing them out unasked.
    fn all_blocks_held(global: &Global, net: &Network) -> bool {
        let Some(o) = net.overlay() else {
            return false;
        };
        let held = global.blocks.get(&net.name).map_or(0, |m| {
            m.keys().filter(|b| o.range.contains(&b.network())).count()
        });
        held >= blocks_of(o.range, o.host_subnet_len).count()
    }

    /// Claims a block nobody holds, as `global` or (when that was stale)
    /// etcd itself says; None when every block is held.
    async fn claim_free_block(
        &self,
        global: &Global,
        net: &Network,
        me: &Identity,
        within: Option<Ipv4Net>,
    ) -> EtcdResult<Option<Ipv4Net>> {
        let Some(o) = net.overlay() else {
            return Ok(None);
        };
        let mut taken: BTreeSet<Ipv4Net> = global
            .blocks
            .get(&net.name)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        let seed = seed_of(&me.host_id);
        let total = blocks_of(o.range, o.host_subnet_len).count();
        // A block with no address where the endpoint is placed (in its
        // sub-range, or outside all) is of no use to it.
        let useless: BTreeSet<Ipv4Net> = blocks_of(o.range, o.host_subnet_len)
            .filter(|b| !usable(*b, o.range, net.gateway).any(|ip| net.places(ip, within)))
            .collect();
        for attempt in 0..16u64 {
            let skip: BTreeSet<Ipv4Net> = taken.union(&useless).copied().collect();
            let Some(b) = pick_free_block(o.range, o.host_subnet_len, &skip, seed + attempt) else {
                return Ok(None);
            };
            if taken.len() + 1 >= total {
                // The last free block: others may borrow as soon as it is
                // held, so no address of this host is handed out unasked
                // from the moment it is claimed.
                self.host.set_contended(&net.name);
            }
            if self.claim_block(&net.name, b, me).await? {
                return Ok(Some(b));
            }
            // Another host was faster: read who holds what, and pick again.
            taken.insert(b);
            let (kvs, _) = self.etcd.list(&format!("blocks/{}/", net.name)).await?;
            let fresh = Global::from_list(kvs);
            if let Some(m) = fresh.blocks.get(&net.name) {
                taken.extend(m.keys().copied());
            }
        }
        Ok(None)
    }

    /// The attach path found no room on `network`: claims a block, or
    /// else (every block held) claims one free address, of this host's
    /// blocks first, then borrowed from another host's. Serialised; a
    /// block claimed by an earlier call is room for every waiting attach,
    /// a single address only for one, so while every block is held each
    /// call claims one.
    pub async fn grow(&self, network: &str, within: Option<Ipv4Net>) -> Result<()> {
        let _one = self.growing.lock().await;
        if !self.host.is_contended(network) && self.host.has_room(network, within) {
            return Ok(());
        }
        if self.left.load(Ordering::Relaxed) {
            return Err(AgentError::Conflict(format!(
                "--net {network}: this host left the cluster (`weft leave`); restart `weft agent` to rejoin"
            )));
        }
        let me = crate::host::recover(self.me.lock()).clone();
        let unavailable = |e| Self::unavailable_for(network, e);
        let global = self.read_network(network).await.map_err(unavailable)?;
        let Some(net) = global.networks.get(network).cloned() else {
            return Err(AgentError::NotFound(format!(
                "no network {network} in the cluster"
            )));
        };
        if self.etcd_lease().is_none() {
            return Err(AgentError::Unavailable(format!(
                "--net {network}: every address this host holds is in use, and it has no etcd lease yet to claim more; see `weft status`"
            )));
        }
        if let Some(b) = self
            .claim_free_block(&global, &net, &me, within)
            .await
            .map_err(unavailable)?
        {
            info!(network, block = %b, "claimed a block for an attach");
            return Ok(());
        }
        // Every block is held: from now on each address is claimed.
        self.host.set_contended(network);
        // Other hosts may still hand out addresses of their blocks unasked
        // until their watch shows every block held (milliseconds): the
        // first borrow waits that out, then reads who holds what afresh.
        let first = *crate::host::recover(self.full_since.lock())
            .entry(network.to_string())
            .or_insert_with(Instant::now);
        let wait = BORROW_GRACE.saturating_sub(first.elapsed());
        let global = if wait.is_zero() {
            global
        } else {
            tokio::time::sleep(wait).await;
            self.read_network(network).await.map_err(unavailable)?
        };
        // One of this host's blocks from the bottom up, else one of
        // another host's from the top down (its holder claims from the
        // bottom: the two rarely try the same address).
        let taken: BTreeSet<Ipv4Addr> = global.endpoints_of(network).map(|r| r.ip).collect();
        let o = net.overlay().expect("a shared network");
        let mine: BTreeSet<Ipv4Net> = global.blocks_of(network, &me.host_id).into_iter().collect();
        let own = blocks_of(o.range, o.host_subnet_len)
            .filter(|b| mine.contains(b))
            .flat_map(|b| usable(b, o.range, net.gateway));
        let others = blocks_of(o.range, o.host_subnet_len)
            .filter(|b| !mine.contains(b))
            .flat_map(|b| {
                usable(b, o.range, net.gateway)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
            });
        let mut candidates: Vec<Ipv4Addr> = own
            .chain(others)
            .filter(|ip| {
                net.places(*ip, within) && !taken.contains(ip) && !self.host.in_use(network, *ip)
            })
            .collect();
        candidates.truncate(64);
        for ip in candidates {
            match self.claim_address(network, ip, None).await {
                Ok(()) => {
                    if mine.iter().any(|b| b.contains(&ip)) {
                        info!(network, %ip, "claimed an address of this host's block (every block is held)");
                    } else {
                        info!(network, %ip, "borrowed an address of another host's block");
                    }
                    return Ok(());
                }
                Err(AgentError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        let used = global.endpoints_of(network).count();
        Err(AgentError::Conflict(format!(
            "--net {network}: the subnet {} has no free address on any host ({used} in use); remove sandboxes, or use a larger subnet",
            net.subnet
        )))
    }

    /// Declares `sub` an isolated sub-range of the global `network`: in
    /// its record in etcd (a value-guarded replace, so two hosts
    /// declaring overlapping ranges at once cannot both win), then here.
    pub async fn declare_subrange(&self, network: &str, sub: Ipv4Net) -> Result<()> {
        let key = super::network_key(network);
        let unavailable = |e| Self::unavailable_for(network, e);
        for _ in 0..8 {
            let Some(raw) = self.etcd.get(&key).await.map_err(unavailable)? else {
                return Err(crate::host::not_found(network));
            };
            let mut net: Network = serde_json::from_slice(&raw).map_err(|e| {
                AgentError::Internal(format!("the record of network {network} in etcd: {e}"))
            })?;
            if net.subranges.contains(&sub) {
                break;
            }
            net.check_subrange(sub, std::iter::empty())
                .map_err(|e| AgentError::BadRequest(e.to_string()))?;
            net.subranges.push(sub);
            net.subranges.sort();
            let value = serde_json::to_vec(&net).expect("serializable");
            if self
                .etcd
                .replace(&key, &raw, value, None)
                .await
                .map_err(unavailable)?
            {
                info!(network, subrange = %sub, "declared an isolated sub-range in the cluster");
                break;
            }
        }
        let host = self.host.clone();
        let network = network.to_string();
        tokio::task::spawn_blocking(move || host.declare_subrange(&network, sub)).await?
    }

    /// What etcd holds of one network now: its record, blocks and
    /// endpoint records (not the whole cluster's).
    async fn read_network(&self, network: &str) -> EtcdResult<Global> {
        let mut kvs = Vec::new();
        let key = super::network_key(network);
        if let Some(v) = self.etcd.get(&key).await? {
            kvs.push((key, v));
        }
        for dir in [
            format!("blocks/{network}/"),
            format!("endpoints/{network}/"),
        ] {
            kvs.extend(self.etcd.list(&dir).await?.0);
        }
        Ok(Global::from_list(kvs))
    }

    /// Claims `ip` on `network` for this host (a `--ip` outside its blocks,
    /// or a borrowed address); a Conflict names who holds it.
    pub async fn claim_address(
        &self,
        network: &str,
        ip: Ipv4Addr,
        sandbox: Option<&str>,
    ) -> Result<()> {
        let me = me_of(&crate::host::recover(self.me.lock()).clone());
        let record = EndpointRecord {
            ip,
            mac: weft_model::overlay::format_mac(&weft_model::sandbox::mac_for(ip)),
            host_id: me.host_id.clone(),
            node: me.node.clone(),
            public_ip: me.public_ip,
            sandbox: sandbox.map(str::to_string),
            names: Vec::new(),
            exposed: false,
            signed: None,
        };
        let record = self.signed(record);
        let key = endpoint_key(network, ip);
        let unavailable = |e| Self::unavailable_for(network, e);
        let created = self
            .etcd
            .create(
                &[(
                    key.clone(),
                    serde_json::to_vec(&record).expect("serializable"),
                )],
                self.etcd_lease(),
            )
            .await
            .map_err(unavailable)?;
        if !created {
            let raw = self.etcd.get(&key).await.map_err(unavailable)?;
            let holder: Option<EndpointRecord> = raw.and_then(|r| serde_json::from_slice(&r).ok());
            match holder {
                Some(h) if h.host_id == me.host_id => {}
                Some(h) => {
                    return Err(AgentError::Conflict(format!(
                    "--net {network}: {ip} is taken by {}; pick another address or leave --ip out",
                    h.holder()
                )))
                }
                None => {
                    return Err(AgentError::Conflict(format!(
                        "--net {network}: {ip} was just taken on another host; try again"
                    )))
                }
            }
        }
        self.host.add_claim(network, Claimed::Address(ip));
        Ok(())
    }

    /// The record signed with this host's client certificate, if it has one.
    fn signed(&self, r: EndpointRecord) -> EndpointRecord {
        match &self.signer {
            Some(s) => s.sign_record(r),
            None => r,
        }
    }

    /// The other hosts' records of `network` this host believes (with a CA
    /// to check against: signed by their node), and why each other one is
    /// refused. A verdict is kept while its record stays the same, so a
    /// pass checks only what changed.
    pub(super) fn believed_endpoints<'g>(
        &self,
        global: &'g Global,
        network: &str,
        me: &str,
    ) -> (Vec<&'g EndpointRecord>, Vec<String>) {
        let others = global
            .endpoints_of(network)
            .filter(|r| r.host_id != me && (r.sandbox.is_some() || r.exposed));
        let Some(v) = &self.verifier else {
            return (others.collect(), Vec::new());
        };
        let mut cache = crate::host::recover(self.verdicts.lock());
        cache.retain(|(n, ip), _| {
            n != network
                || global
                    .endpoints
                    .get(network)
                    .is_some_and(|m| m.contains_key(ip))
        });
        let (mut ok, mut refused) = (Vec::new(), Vec::new());
        for r in others {
            let slot = (network.to_string(), r.ip);
            let verdict = match cache.get(&slot) {
                Some((seen, why)) if seen == r => why.clone(),
                _ => {
                    let why = v.refuse_record(r);
                    if let Some(w) = &why {
                        warn!(network, ip = %r.ip, node = %r.node, reason = %w, "refusing an endpoint record");
                    }
                    cache.insert(slot, (r.clone(), why.clone()));
                    why
                }
            };
            match verdict {
                None => ok.push(r),
                Some(why) => refused.push(why),
            }
        }
        (ok, refused)
    }

    fn unavailable_for(network: &str, e: weft_store::EtcdError) -> AgentError {
        AgentError::Unavailable(format!(
            "--net {network}: this host must claim addresses in the cluster, and cannot reach etcd ({e}); sandboxes can start with the addresses it holds, see `weft status`"
        ))
    }

    /// Makes etcd hold exactly this host's endpoint records of `net`.
    /// Returns problems for `weft status` (an address another host claims too).
    pub(super) async fn publish(
        &self,
        global: &Global,
        net: &Network,
        me: &Identity,
        written: &mut Written,
    ) -> EtcdResult<Vec<String>> {
        let name = net.name.as_str();
        let mut problems = Vec::new();
        if self.etcd_lease().is_none() {
            return Ok(problems);
        }
        let want = self.host.endpoint_records(name, &me_of(me));
        let have = global.endpoints.get(name);
        let mut wanted = BTreeSet::new();
        let cert = self.signer.as_ref().map(|s| s.cert_pem());
        // Equal but for the signature (a new one differs each time), by
        // the same certificate: nothing to write.
        let same = |a: &EndpointRecord, b: &EndpointRecord| {
            a.body() == b.body() && a.signed.as_ref().map(|s| s.cert.as_str()) == cert
        };
        for r in want {
            let key = endpoint_key(name, r.ip);
            wanted.insert(r.ip);
            let current = have.and_then(|m| m.get(&r.ip));
            if current.is_some_and(|c| same(c, &r)) {
                written.remove(&key);
                continue;
            }
            if written
                .get(&key)
                .is_some_and(|(w, at)| w.body() == r && at.elapsed() < ECHO_WAIT)
            {
                continue;
            }
            let r = self.signed(r);
            let value = serde_json::to_vec(&r).expect("serializable");
            match current {
                Some(c) if c.host_id != me.host_id => {
                    problems.push(format!(
                        "{} of sandbox {} is claimed by {} as well; one of them must go",
                        r.ip,
                        r.sandbox.as_deref().unwrap_or("(being attached)"),
                        c.holder()
                    ));
                    continue;
                }
                Some(_) => self.etcd.put(&key, value, self.etcd_lease()).await?,
                None => {
                    if !self
                        .etcd
                        .create(&[(key.clone(), value.clone())], self.etcd_lease())
                        .await?
                    {
                        // There already: this host's own claim of the
                        // address the watch has not brought back yet, or
                        // another host's.
                        let raw = self.etcd.get(&key).await?;
                        let holder: Option<EndpointRecord> =
                            raw.and_then(|v| serde_json::from_slice(&v).ok());
                        match holder {
                            Some(h) if h.host_id == me.host_id => {
                                self.etcd.put(&key, value, self.etcd_lease()).await?
                            }
                            Some(h) => {
                                warn!(network = name, ip = %r.ip, holder = %h.holder(), "an address of this host was claimed by another host at the same time");
                                problems.push(format!(
                                    "{} of sandbox {} is claimed by {} as well; one of them must go",
                                    r.ip,
                                    r.sandbox.as_deref().unwrap_or("(being attached)"),
                                    h.holder()
                                ));
                                continue;
                            }
                            None => continue,
                        }
                    }
                }
            }
            written.insert(key, (r, Instant::now()));
        }
        let stale: Vec<Ipv4Addr> = have
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|r| r.host_id == me.host_id && !wanted.contains(&r.ip))
            .map(|r| r.ip)
            .collect();
        for ip in stale {
            let key = endpoint_key(name, ip);
            self.etcd.delete(&key).await?;
            written.remove(&key);
        }
        Ok(problems)
    }

    /// Every block of a shared network with its holder and how full it is
    /// (as the endpoint records say), for `network inspect`.
    pub(super) fn blocks_view(global: &Global, net: &Network) -> Vec<BlockView> {
        let used: BTreeSet<Ipv4Addr> = global.endpoints_of(&net.name).map(|r| r.ip).collect();
        global
            .blocks
            .get(&net.name)
            .into_iter()
            .flat_map(|m| m.iter())
            .map(|(b, h)| {
                let all: Vec<Ipv4Addr> = usable(*b, net.subnet, net.gateway).collect();
                BlockView {
                    block: *b,
                    node: h.node.clone(),
                    used: all.iter().filter(|ip| used.contains(ip)).count(),
                    capacity: all.len(),
                }
            })
            .collect()
    }
}
