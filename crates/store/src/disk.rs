use crate::{Result, Store, StoreError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

/// A durable embedded store: every write is a redb transaction committed with fsync.
pub struct DiskStore {
    db: Database,
    path: PathBuf,
}

impl DiskStore {
    pub fn open(path: &Path) -> Result<Self> {
        let err = |e: String| StoreError::Backend {
            path: path.display().to_string(),
            message: e,
        };
        let db = Database::create(path).map_err(|e| err(e.to_string()))?;
        let store = DiskStore {
            db,
            path: path.to_path_buf(),
        };
        // Create the table up front so readers never see it missing.
        store.write(|t| {
            let _ = t;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn write<T>(&self, f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = {
            let mut table = txn.open_table(TABLE).map_err(|e| self.err(e))?;
            f(&mut table)?
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }
}

impl Store for DiskStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(TABLE).map_err(|e| self.err(e))?;
        Ok(table
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(TABLE).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.write(|t| {
            t.insert(key, value).map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<()> {
        self.write(|t| {
            if t.get(key).map_err(|e| self.err(e))?.is_some() {
                return Err(StoreError::Exists(key.to_string()));
            }
            t.insert(key, value).map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn delete(&self, key: &str) -> Result<bool> {
        self.write(|t| Ok(t.remove(key).map_err(|e| self.err(e))?.is_some()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn contract_and_persistence() {
        let dir = std::env::temp_dir().join(format!("wft-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.redb");
        {
            let s = super::DiskStore::open(&path).unwrap();
            crate::contract::check(&s);
        }
        let s = super::DiskStore::open(&path).unwrap();
        use crate::Store;
        assert_eq!(
            s.get("a/1").unwrap().as_deref(),
            Some(&b"uno"[..]),
            "survives reopen"
        );
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
