//! This host's subnet lease on an overlay network: find it in the global
//! state, rebind it to the current etcd lease, or pick a free subnet and
//! create it with create-if-absent (relisting and picking again when
//! another host was faster). Written against [`LeaseStore`], the few etcd
//! calls it makes, so it runs against an in-memory fake in unit tests.

use super::identity::Identity;
use super::state::Global;
use super::{lease_dir, lease_key};
use ipnet::Ipv4Net;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use tracing::info;
use weft_model::overlay::{format_mac, pick_host_subnet, seed_of, vtep_mac};
use weft_model::{BackendKind, Lease, Network};
use weft_store::{Etcd, EtcdError, EtcdResult};

/// How many times a lost create-if-absent race is retried in one call.
const ATTEMPTS: u64 = 16;

/// Keys under a directory with their values, and the revision read at.
pub(crate) type Listing = (Vec<(String, Vec<u8>)>, i64);

/// The etcd calls the lease logic makes; keys are relative to the prefix.
pub(crate) trait LeaseStore: Sync {
    /// Every key under `dir`, and the revision read at.
    fn list(&self, dir: &str) -> impl Future<Output = EtcdResult<Listing>> + Send;
    /// Writes every key only if none exists yet; whether it wrote.
    fn create(
        &self,
        kvs: &[(String, Vec<u8>)],
        lease: Option<i64>,
    ) -> impl Future<Output = EtcdResult<bool>> + Send;
    /// Replaces `key` only if its value is still `expected`; whether it did.
    fn replace(
        &self,
        key: &str,
        expected: &[u8],
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> impl Future<Output = EtcdResult<bool>> + Send;
}

impl LeaseStore for Etcd {
    fn list(&self, dir: &str) -> impl Future<Output = EtcdResult<Listing>> + Send {
        Etcd::list(self, dir)
    }
    fn create(
        &self,
        kvs: &[(String, Vec<u8>)],
        lease: Option<i64>,
    ) -> impl Future<Output = EtcdResult<bool>> + Send {
        Etcd::create(self, kvs, lease)
    }
    fn replace(
        &self,
        key: &str,
        expected: &[u8],
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> impl Future<Output = EtcdResult<bool>> + Send {
        Etcd::replace(self, key, expected, value, lease)
    }
}

#[derive(Debug)]
pub(crate) enum LeaseError {
    Etcd(EtcdError),
    /// No free subnet of the range is left for this host.
    Full,
    /// A network in etcd under networks/ that is not an overlay network.
    NotOverlay,
}

impl From<EtcdError> for LeaseError {
    fn from(e: EtcdError) -> Self {
        LeaseError::Etcd(e)
    }
}

/// What the lease logic needs to know besides the global state.
pub(crate) struct Claim<'a> {
    pub net: &'a Network,
    pub me: &'a Identity,
    /// The etcd lease this host's keys are bound to now (0: none yet).
    pub etcd_lease: i64,
    /// secure: this host's public key, published in the lease.
    pub public_key: Option<String>,
    /// Signs the leases this host writes (it has a client certificate).
    pub signer: Option<&'a super::signing::Signer>,
}

/// This host's lease on `c.net`: the one in `global` (rebound to the
/// current etcd lease once per process, or after the etcd lease changed:
/// `bound` remembers which etcd lease each network's key was last bound
/// to), or a new one, preferring the subnet recorded in the identity.
/// `global` is updated with what was written.
pub(crate) async fn own_lease<S: LeaseStore>(
    store: &S,
    c: &Claim<'_>,
    global: &mut Global,
    bound: &mut HashMap<String, i64>,
) -> Result<Lease, LeaseError> {
    let lease_id = c.etcd_lease;
    if lease_id == 0 {
        // The lease task has not got one yet; it wakes the sync task when it has.
        return Err(LeaseError::Etcd(EtcdError::LeaseGone(0)));
    }
    let (net, me) = (c.net, c.me);
    let name = &net.name;
    let Some(overlay) = net.overlay() else {
        return Err(LeaseError::NotOverlay);
    };
    let vtep = (overlay.backend == BackendKind::Vxlan)
        .then(|| format_mac(&vtep_mac(&me.host_id, overlay.vni)));
    let wanted = |subnet: Ipv4Net| Lease {
        network: name.clone(),
        subnet,
        host_id: me.host_id.clone(),
        node: me.node.clone(),
        public_ip: me.public_ip,
        vtep_mac: vtep.clone(),
        public_key: c.public_key.clone(),
        signed: None,
    };
    let sign = |l: Lease| match c.signer {
        Some(s) => s.sign(l),
        None => l,
    };
    if let Some((key, raw, have)) = global.own(name, &me.host_id) {
        let want = wanted(have.subnet);
        // Compared without signatures (a new one of the same content differs).
        let same = have.body() == want
            && have.signed.as_ref().map(|s| s.cert.as_str()) == c.signer.map(|s| s.cert_pem());
        if bound.get(name) == Some(&lease_id) && same {
            return Ok(have);
        }
        let (want, bytes) = if same {
            (have, raw.clone())
        } else {
            let w = sign(want);
            let b = serde_json::to_vec(&w).expect("serializable");
            (w, b)
        };
        if store
            .replace(&key, &raw, bytes.clone(), Some(lease_id))
            .await?
        {
            bound.insert(name.clone(), lease_id);
            global.put_raw(&key, bytes);
            return Ok(want);
        }
        // Changed under us: the next list sorts it out.
        return Err(LeaseError::Etcd(EtcdError::Cancelled(format!(
            "lease {key} changed while rebinding"
        ))));
    }
    let mut prefer = me.leases.get(name).copied();
    for attempt in 0..ATTEMPTS {
        let taken: BTreeSet<Ipv4Net> = global.leases_of(name).map(|l| l.subnet).collect();
        let Some(subnet) = pick_host_subnet(
            overlay,
            &taken,
            prefer,
            seed_of(&me.host_id) + attempt * 7919,
        ) else {
            return Err(LeaseError::Full);
        };
        let key = lease_key(name, &subnet);
        let lease = sign(wanted(subnet));
        let bytes = serde_json::to_vec(&lease).expect("serializable");
        if store
            .create(&[(key.clone(), bytes.clone())], Some(lease_id))
            .await?
        {
            info!(network = %name, subnet = %subnet, "leased a subnet");
            bound.insert(name.clone(), lease_id);
            global.put_raw(&key, bytes);
            return Ok(lease);
        }
        // Someone was faster: read the leases again and pick another.
        prefer = None;
        let (kvs, _) = store.list(&lease_dir(name)).await?;
        for (k, v) in kvs {
            global.put_raw(&k, v);
        }
    }
    Err(LeaseError::Full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use weft_model::network::{BridgeSettings, DriverSettings, OverlaySettings};
    use weft_model::overlay::Overlay;

    /// key -> (value, etcd lease).
    type Kv = BTreeMap<String, (Vec<u8>, Option<i64>)>;

    /// etcd in memory: keys with their value and the etcd lease they are
    /// bound to. `rivals` are keys another host creates just before this
    /// host's next create, as if it had been faster.
    #[derive(Default)]
    struct FakeStore {
        kv: Mutex<Kv>,
        rivals: Mutex<Vec<(String, Vec<u8>)>>,
        creates: Mutex<usize>,
    }

    impl FakeStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, Option<i64>)> {
            crate::host::recover(self.kv.lock()).get(key).cloned()
        }
        fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) {
            crate::host::recover(self.kv.lock()).insert(key.to_string(), (value, lease));
        }
        fn all(&self) -> Vec<(String, Vec<u8>)> {
            crate::host::recover(self.kv.lock())
                .iter()
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect()
        }
    }

    impl LeaseStore for FakeStore {
        async fn list(&self, dir: &str) -> EtcdResult<Listing> {
            let kv = crate::host::recover(self.kv.lock());
            let found = kv
                .iter()
                .filter(|(k, _)| k.starts_with(dir))
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect();
            Ok((found, 1))
        }

        async fn create(&self, kvs: &[(String, Vec<u8>)], lease: Option<i64>) -> EtcdResult<bool> {
            *crate::host::recover(self.creates.lock()) += 1;
            let rivals = std::mem::take(&mut *crate::host::recover(self.rivals.lock()));
            let mut kv = crate::host::recover(self.kv.lock());
            for (k, v) in rivals {
                kv.insert(k, (v, Some(999)));
            }
            if kvs.iter().any(|(k, _)| kv.contains_key(k)) {
                return Ok(false);
            }
            for (k, v) in kvs {
                kv.insert(k.clone(), (v.clone(), lease));
            }
            Ok(true)
        }

        async fn replace(
            &self,
            key: &str,
            expected: &[u8],
            value: Vec<u8>,
            lease: Option<i64>,
        ) -> EtcdResult<bool> {
            let mut kv = crate::host::recover(self.kv.lock());
            match kv.get(key) {
                Some((v, _)) if v == expected => {
                    kv.insert(key.to_string(), (value, lease));
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
    }

    fn network(range: &str, len: u8) -> Network {
        let range: Ipv4Net = range.parse().unwrap();
        Network {
            name: "ov".into(),
            id: "0123456789abcdef".into(),
            settings: DriverSettings::Overlay(OverlaySettings {
                bridge: "wbr-0123456789".into(),
                overlay: Overlay {
                    range,
                    kind: Default::default(),
                    host_subnet_len: len,
                    backend: BackendKind::HostGw,
                    vni: 1,
                    port: 8472,
                    direct_routing: false,
                },
            }),
            subnet: range,
            gateway: range.hosts().next().unwrap(),
            ip_range: None,
            mtu: None,
            internal: false,
            labels: Default::default(),
            options: Default::default(),
            subranges: Vec::new(),
        }
    }

    fn me(host: &str) -> Identity {
        Identity {
            host_id: host.into(),
            node: format!("node-{host}"),
            public_ip: "198.51.100.11".parse().unwrap(),
            etcd_lease: 0,
            leases: BTreeMap::new(),
            blocks: BTreeMap::new(),
        }
    }

    fn other(subnet: &str, host: &str) -> (String, Vec<u8>) {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        let l = Lease {
            signed: None,
            network: "ov".into(),
            subnet,
            host_id: host.into(),
            node: host.into(),
            public_ip: "198.51.100.12".parse().unwrap(),
            vtep_mac: None,
            public_key: None,
        };
        (lease_key("ov", &subnet), serde_json::to_vec(&l).unwrap())
    }

    async fn claim(
        store: &FakeStore,
        net: &Network,
        me: &Identity,
        etcd_lease: i64,
        bound: &mut HashMap<String, i64>,
    ) -> (Result<Lease, LeaseError>, Global) {
        let (kvs, _) = store.list("").await.unwrap();
        let mut global = Global::from_list(kvs);
        let c = Claim {
            net,
            me,
            etcd_lease,
            public_key: None,
            signer: None,
        };
        let r = own_lease(store, &c, &mut global, bound).await;
        (r, global)
    }

    fn lease_of(store: &FakeStore, subnet: Ipv4Net) -> (Lease, Option<i64>) {
        let (v, l) = store.get(&lease_key("ov", &subnet)).expect("the lease key");
        (serde_json::from_slice(&v).unwrap(), l)
    }

    #[tokio::test]
    async fn takes_a_free_subnet_and_creates_its_key() {
        let store = FakeStore::default();
        let (k, v) = other("10.40.1.0/24", "b");
        store.put(&k, v, Some(5));
        let net = network("10.40.0.0/16", 24);
        let mut bound = HashMap::new();
        let (r, global) = claim(&store, &net, &me("a"), 7, &mut bound).await;
        let l = r.unwrap();
        assert_ne!(l.subnet, "10.40.1.0/24".parse::<Ipv4Net>().unwrap());
        assert!("10.40.0.0/16"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(&l.subnet));
        assert_eq!(l.subnet.prefix_len(), 24);
        let (stored, etcd_lease) = lease_of(&store, l.subnet);
        assert_eq!(stored, l);
        assert_eq!(etcd_lease, Some(7), "bound to the current etcd lease");
        assert_eq!(bound.get("ov"), Some(&7));
        assert_eq!(global.own("ov", "a").unwrap().2, l, "global knows it");
    }

    #[tokio::test]
    async fn a_new_lease_prefers_the_subnet_recorded_locally() {
        let store = FakeStore::default();
        let net = network("10.40.0.0/16", 24);
        let mut a = me("a");
        a.leases
            .insert("ov".into(), "10.40.77.0/24".parse().unwrap());
        let (r, _) = claim(&store, &net, &a, 7, &mut HashMap::new()).await;
        assert_eq!(r.unwrap().subnet.to_string(), "10.40.77.0/24");
    }

    #[tokio::test]
    async fn keeps_its_subnet_in_etcd_and_writes_nothing_when_bound() {
        let store = FakeStore::default();
        let net = network("10.40.0.0/16", 24);
        let a = me("a");
        let mut bound = HashMap::new();
        let first = claim(&store, &net, &a, 7, &mut bound).await.0.unwrap();
        let before = store.all();
        let again = claim(&store, &net, &a, 7, &mut bound).await.0.unwrap();
        assert_eq!(again, first);
        assert_eq!(store.all(), before, "nothing rewritten");
        assert_eq!(*crate::host::recover(store.creates.lock()), 1);
        // A restarted agent (nothing bound yet) finds its key by host id,
        // even if its identity file recorded another subnet.
        let mut restarted = a.clone();
        restarted
            .leases
            .insert("ov".into(), "10.40.99.0/24".parse().unwrap());
        let mut fresh = HashMap::new();
        let l = claim(&store, &net, &restarted, 7, &mut fresh)
            .await
            .0
            .unwrap();
        assert_eq!(l.subnet, first.subnet);
        assert_eq!(store.all().len(), 1, "no second key");
        assert_eq!(fresh.get("ov"), Some(&7));
    }

    #[tokio::test]
    async fn rebinds_its_key_when_the_etcd_lease_changed() {
        let store = FakeStore::default();
        let net = network("10.40.0.0/16", 24);
        let a = me("a");
        let mut bound = HashMap::new();
        let first = claim(&store, &net, &a, 7, &mut bound).await.0.unwrap();
        assert_eq!(lease_of(&store, first.subnet).1, Some(7));
        // The etcd lease expired and the lease task took lease 8.
        let l = claim(&store, &net, &a, 8, &mut bound).await.0.unwrap();
        assert_eq!(l.subnet, first.subnet, "same subnet");
        assert_eq!(lease_of(&store, first.subnet).1, Some(8), "rebound");
        assert_eq!(bound.get("ov"), Some(&8));
        assert_eq!(*crate::host::recover(store.creates.lock()), 1);
        // A changed public address is rewritten in the same way.
        let mut moved = a.clone();
        moved.public_ip = "198.51.100.99".parse().unwrap();
        let l = claim(&store, &net, &moved, 8, &mut bound).await.0.unwrap();
        assert_eq!(lease_of(&store, l.subnet).0.public_ip, moved.public_ip);
    }

    #[tokio::test]
    async fn retries_with_another_subnet_after_losing_a_race() {
        let store = FakeStore::default();
        let net = network("10.40.0.0/16", 24);
        let mut a = me("a");
        let wanted: Ipv4Net = "10.40.5.0/24".parse().unwrap();
        a.leases.insert("ov".into(), wanted);
        // Host b takes 10.40.5.0/24 between this host's list and create.
        let (k, v) = other("10.40.5.0/24", "b");
        crate::host::recover(store.rivals.lock()).push((k, v));
        let (r, global) = claim(&store, &net, &a, 7, &mut HashMap::new()).await;
        let l = r.unwrap();
        assert_ne!(l.subnet, wanted, "b's subnet is b's");
        assert_eq!(lease_of(&store, wanted).0.host_id, "b", "b's key untouched");
        assert_eq!(lease_of(&store, l.subnet).0.host_id, "a");
        assert_eq!(*crate::host::recover(store.creates.lock()), 2);
        assert_eq!(global.leases_of("ov").count(), 2, "relisted b's lease");
    }

    #[tokio::test]
    async fn says_full_when_the_range_is_used_up() {
        // A /22 of /24s: four subnets, the first and last are skipped, so
        // two are usable.
        let store = FakeStore::default();
        let net = network("10.40.0.0/22", 24);
        for (i, s) in ["10.40.1.0/24", "10.40.2.0/24"].iter().enumerate() {
            let (k, v) = other(s, &format!("h{i}"));
            store.put(&k, v, Some(5));
        }
        let (r, _) = claim(&store, &net, &me("a"), 7, &mut HashMap::new()).await;
        assert!(matches!(r, Err(LeaseError::Full)), "{r:?}");
        assert_eq!(*crate::host::recover(store.creates.lock()), 0);
        assert_eq!(store.all().len(), 2, "nothing written");
    }

    #[tokio::test]
    async fn says_full_when_every_race_is_lost() {
        // Every create loses to a rival that takes the same subnet, until
        // no subnet is left.
        let store = FakeStore::default();
        let net = network("10.40.0.0/22", 24);
        for (i, s) in ["10.40.1.0/24", "10.40.2.0/24"].iter().enumerate() {
            let (k, v) = other(s, &format!("h{i}"));
            crate::host::recover(store.rivals.lock()).push((k, v));
        }
        let (r, _) = claim(&store, &net, &me("a"), 7, &mut HashMap::new()).await;
        assert!(matches!(r, Err(LeaseError::Full)), "{r:?}");
        assert_eq!(*crate::host::recover(store.creates.lock()), 1);
    }

    #[tokio::test]
    async fn waits_for_an_etcd_lease_and_skips_other_drivers() {
        let store = FakeStore::default();
        let net = network("10.40.0.0/16", 24);
        let (r, _) = claim(&store, &net, &me("a"), 0, &mut HashMap::new()).await;
        assert!(matches!(r, Err(LeaseError::Etcd(EtcdError::LeaseGone(0)))));
        let mut bridge = net.clone();
        bridge.settings = DriverSettings::Bridge(BridgeSettings {
            bridge: "wbr-x".into(),
        });
        let (r, _) = claim(&store, &bridge, &me("a"), 7, &mut HashMap::new()).await;
        assert!(matches!(r, Err(LeaseError::NotOverlay)));
        assert!(store.all().is_empty());
    }
}
