//! The Store trait: a key/value store of desired state with an atomic
//! create-if-absent as its compare-and-swap primitive. Two embedded
//! implementations, chosen by how long the state must live:
//!
//! - [`DiskStore`] (redb, fsync on commit) for configuration that must
//!   survive a reboot: networks. Lives in the data dir.
//! - [`RuntimeStore`] (one file per key, replaced by rename) for state that
//!   only needs to survive the agent's death, not the machine's: sandboxes,
//!   whose namespaces vanish with a reboot anyway. No fsync, so attaching a
//!   sandbox costs no disk flush. Lives in the state dir.
//!
//! - [`Etcd`] for global state shared by the hosts of a cluster: overlay
//!   networks and per-host subnet leases. Async, with leases and watches.

mod disk;
mod etcd;
mod runtime;

pub use disk::DiskStore;
pub use etcd::{Change, Etcd, EtcdError, EtcdResult, EtcdSecurity, FailureKind, Watch};
pub use runtime::RuntimeStore;

use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} already exists")]
    Exists(String),
    #[error("store at {path}: {message}")]
    Backend { path: String, message: String },
    #[error("value of {key} is not valid: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub trait Store: Send + Sync {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    fn put(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Writes only if the key is absent; `StoreError::Exists` otherwise.
    fn create(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Returns whether the key existed.
    fn delete(&self, key: &str) -> Result<bool>;
}

/// Typed access on top of any store, as JSON.
pub trait StoreJson {
    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>>;
    fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>>;
    fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<()>;
    fn create_json<T: Serialize>(&self, key: &str, value: &T) -> Result<()>;
}

impl<S: Store + ?Sized> StoreJson for S {
    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.get(key)?
            .map(|v| {
                serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                    key: key.into(),
                    source,
                })
            })
            .transpose()
    }

    fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        self.list(prefix)?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v).map_err(|source| StoreError::Decode { key: k, source })
            })
            .collect()
    }

    fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        self.put(key, &serde_json::to_vec(value).expect("serializable"))
    }

    fn create_json<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        self.create(key, &serde_json::to_vec(value).expect("serializable"))
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every Store must have, run against each implementation.
    use super::*;

    pub fn check(store: &dyn Store) {
        assert_eq!(store.get("a/1").unwrap(), None);
        store.put("a/1", b"one").unwrap();
        store.put("a/2", b"two").unwrap();
        store.put("b/1", b"other").unwrap();
        assert_eq!(store.get("a/1").unwrap().as_deref(), Some(&b"one"[..]));
        store.put("a/1", b"uno").unwrap();
        assert_eq!(store.get("a/1").unwrap().as_deref(), Some(&b"uno"[..]));
        let listed: Vec<String> = store
            .list("a/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(listed, vec!["a/1".to_string(), "a/2".to_string()]);
        assert!(matches!(store.create("a/2", b"x"), Err(StoreError::Exists(k)) if k == "a/2"));
        store.create("a/3", b"three").unwrap();
        assert!(store.delete("a/3").unwrap());
        assert!(!store.delete("a/3").unwrap());
        assert_eq!(store.list("c/").unwrap(), vec![]);
    }
}
