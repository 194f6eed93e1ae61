//! The etcd store: global state shared by every host of a cluster.
//!
//! A thin typed layer over etcd's v3 API (etcd-client, gRPC). All keys are
//! relative to a prefix (`--etcd-prefix`, default `/weft`). The primitives
//! are the ones the cluster needs and no more: list with the revision it
//! was read at, create-if-absent in one transaction (several keys at once),
//! put/delete guarded by the current value, leases, and a watch from a
//! revision that reports compaction as its own error so the caller relists.

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints}: {}", plain(source))]
    Rpc {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("the watch started at revision {0}, which etcd has compacted; list again")]
    Compacted(i64),
    #[error("the watch was cancelled by etcd: {0}")]
    Cancelled(String),
    #[error("lease {0} has expired")]
    LeaseGone(i64),
}

pub type EtcdResult<T> = std::result::Result<T, EtcdError>;

/// An etcd client error as a sentence: a gRPC status's message and what
/// its code means, not tonic's debug dump of the status and its metadata.
fn plain(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            let m = m.strip_prefix("tcp connect error: ").unwrap_or(m);
            let what = s.code().description().to_lowercase();
            if m.is_empty() {
                what
            } else {
                format!("{m} ({what})")
            }
        }
        other => other.to_string(),
    }
}

/// One change seen by a watch. `value` is empty for deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub revision: i64,
}

#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: String,
}

impl Etcd {
    /// Makes the client; connecting happens in the background, so this
    /// succeeds while etcd is down and each call then fails after `timeout`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> EtcdResult<Etcd> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        let joined = endpoints.join(",");
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|source| EtcdError::Rpc {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(Etcd {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: joined,
        })
    }

    fn rpc(&self, source: etcd_client::Error) -> EtcdError {
        EtcdError::Rpc {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    fn relative(&self, key: &[u8]) -> String {
        let k = String::from_utf8_lossy(key);
        k.strip_prefix(&self.prefix)
            .map(|r| r.trim_start_matches('/').to_string())
            .unwrap_or_else(|| k.into_owned())
    }

    /// Every key under `dir` and the revision the list was read at.
    pub async fn list(&self, dir: &str) -> EtcdResult<(Vec<(String, Vec<u8>)>, i64)> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(dir), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.rpc(e))?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| (self.relative(kv.key()), kv.value().to_vec()))
            .collect();
        Ok((kvs, rev))
    }

    pub async fn get(&self, key: &str) -> EtcdResult<Option<Vec<u8>>> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(key), None)
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes every key only if none of them exists yet, atomically; returns
    /// whether it wrote. `lease` binds the keys to an etcd lease.
    pub async fn create(&self, kvs: &[(String, Vec<u8>)], lease: Option<i64>) -> EtcdResult<bool> {
        let compares: Vec<Compare> = kvs
            .iter()
            .map(|(k, _)| Compare::create_revision(self.full(k), CompareOp::Equal, 0))
            .collect();
        let puts: Vec<TxnOp> = kvs
            .iter()
            .map(|(k, v)| TxnOp::put(self.full(k), v.clone(), put_opts(lease)))
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when(compares).and_then(puts))
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.succeeded())
    }

    /// Replaces `key` only if its value is still `expected`.
    pub async fn replace(
        &self,
        key: &str,
        expected: &[u8],
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> EtcdResult<bool> {
        let resp = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::value(self.full(key), CompareOp::Equal, expected)])
                    .and_then([TxnOp::put(self.full(key), value, put_opts(lease))]),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.succeeded())
    }

    /// Deletes `key` only if its value is still `expected`.
    pub async fn delete_if(&self, key: &str, expected: &[u8]) -> EtcdResult<bool> {
        let resp = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::value(self.full(key), CompareOp::Equal, expected)])
                    .and_then([TxnOp::delete(self.full(key), None)]),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.succeeded())
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> EtcdResult<()> {
        self.client
            .kv_client()
            .put(self.full(key), value, put_opts(lease))
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(())
    }

    /// Deletes one key; returns whether it existed.
    pub async fn delete(&self, key: &str) -> EtcdResult<bool> {
        let resp = self
            .client
            .kv_client()
            .delete(self.full(key), None)
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.deleted() > 0)
    }

    /// Deletes every key under `dir`; returns how many.
    pub async fn delete_prefix(&self, dir: &str) -> EtcdResult<i64> {
        let resp = self
            .client
            .kv_client()
            .delete(
                self.full(dir),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.deleted())
    }

    pub async fn grant(&self, ttl: i64) -> EtcdResult<i64> {
        let resp = self
            .client
            .lease_client()
            .grant(ttl, None)
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.id())
    }

    /// Renews a lease once; `LeaseGone` if it has expired.
    pub async fn keep_alive(&self, lease: i64) -> EtcdResult<i64> {
        let mut lc = self.client.lease_client();
        let (mut keeper, mut stream) = lc.keep_alive(lease).await.map_err(|e| self.rpc(e))?;
        keeper.keep_alive().await.map_err(|e| self.rpc(e))?;
        match stream.message().await.map_err(|e| self.rpc(e))? {
            Some(r) if r.ttl() > 0 => Ok(r.ttl()),
            _ => Err(EtcdError::LeaseGone(lease)),
        }
    }

    pub async fn revoke(&self, lease: i64) -> EtcdResult<()> {
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            // Already expired: what the caller wanted.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
            Err(e) => Err(self.rpc(e)),
        }
    }

    /// Watches every key under `dir` from `revision` (inclusive).
    pub async fn watch(&self, dir: &str, revision: i64) -> EtcdResult<Watch> {
        let stream = self
            .client
            .watch_client()
            .watch(
                self.full(dir),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision)
                        .with_progress_notify(),
                ),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(Watch {
            stream,
            etcd: self.clone(),
        })
    }
}

fn put_opts(lease: Option<i64>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l))
}

pub struct Watch {
    stream: etcd_client::WatchStream,
    etcd: Etcd,
}

impl Watch {
    /// The next batch of changes (possibly empty, a progress notice);
    /// `None` when the stream ended. Compaction and cancellation are errors:
    /// the caller lists again and watches from the new revision.
    pub async fn next(&mut self) -> EtcdResult<Option<Vec<Change>>> {
        let Some(resp) = self.stream.message().await.map_err(|e| self.etcd.rpc(e))? else {
            return Ok(None);
        };
        if resp.compact_revision() > 0 {
            return Err(EtcdError::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(EtcdError::Cancelled(resp.cancel_reason().to_string()));
        }
        Ok(Some(
            resp.events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    Some(Change {
                        key: self.etcd.relative(kv.key()),
                        value: (ev.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                        revision: kv.mod_revision(),
                    })
                })
                .collect(),
        ))
    }
}
