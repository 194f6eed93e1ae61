use crate::{Result, Store, StoreError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Runtime state as one file per key in a directory, each replaced whole by
/// rename: a reader sees the old or the new value, never half of one, and a
/// killed agent loses nothing it had written. There is no fsync, on purpose:
/// this state describes namespaces that a reboot destroys anyway.
pub struct RuntimeStore {
    dir: PathBuf,
    // Serialises create-if-absent against other writers of this process.
    lock: Mutex<()>,
}

/// Keys may hold '/', which is kept as '%2F' in file names (and '%' as '%25').
fn encode(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

fn decode(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

impl RuntimeStore {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(RuntimeStore {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    fn err(&self, e: std::io::Error) -> StoreError {
        StoreError::Backend {
            path: self.dir.display().to_string(),
            message: e.to_string(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(encode(key))
    }
}

impl Store for RuntimeStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(key)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut keys: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| self.err(e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(decode))
            .filter(|k| k.starts_with(prefix) && !k.starts_with('.'))
            .collect();
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            // A key deleted between the listing and the read is simply gone.
            if let Some(v) = self.get(&k)? {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(
            ".tmp-{}-{:?}",
            encode(key),
            std::thread::current().id()
        ));
        let mut f = std::fs::File::create(&tmp).map_err(|e| self.err(e))?;
        f.write_all(value).map_err(|e| self.err(e))?;
        drop(f);
        std::fs::rename(&tmp, self.path(key)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.err(e)
        })
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.path(key).exists() {
            return Err(StoreError::Exists(key.to_string()));
        }
        self.put(key, value)
    }

    fn delete(&self, key: &str) -> Result<bool> {
        match std::fs::remove_file(self.path(key)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn contract() {
        let dir = std::env::temp_dir().join(format!("wft-rt-{}", std::process::id()));
        let s = super::RuntimeStore::open(&dir).unwrap();
        crate::contract::check(&s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_encoding_round_trips() {
        for k in ["a/b", "a%2Fb", "x%y/z"] {
            assert_eq!(super::decode(&super::encode(k)), k);
        }
    }
}
