//! Static X25519 keys of a host: generation, the key file, and the text
//! form the agent publishes in leases.

use crate::error::{Error, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A host's static key pair for the secure backend. The private half never
/// leaves the host: `Debug` shows only the public key.
#[derive(Clone)]
pub struct Keys {
    private: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("public", &encode_key(&self.public))
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// A fresh key pair from the kernel's random source.
    pub fn generate() -> Result<Keys> {
        let mut private = [0u8; 32];
        crate::random_bytes(&mut private)?;
        Ok(Keys::from_private(private))
    }

    /// The pair of a known private key (clamped as X25519 does, so any 32
    /// bytes are a valid key).
    pub fn from_private(private: [u8; 32]) -> Keys {
        let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(private).to_bytes();
        Keys { private, public }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    pub(crate) fn private_key(&self) -> &[u8; 32] {
        &self.private
    }

    /// Reads the private key at `path`, or creates it (mode 0600) if there
    /// is none. The file holds the key in hex and a newline. A file that
    /// others can read is refused rather than used: a leaked key lets anyone
    /// impersonate this host, so the operator must see it.
    pub fn load_or_create(path: &Path) -> Result<Keys> {
        let err = |reason: String| Error::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        match fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(err(format!(
                        "mode is {mode:04o}; a private key must not be readable by group or others (chmod 600)"
                    )));
                }
                let text = fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
                let private = decode_key(text.trim()).map_err(|e| err(e.to_string()))?;
                tracing::debug!(path = %path.display(), "loaded the tunnel's private key");
                Ok(Keys::from_private(private))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = Keys::generate()?;
                // Write a temporary file with the final mode from the start
                // (never a moment with a wider mode), then link it into
                // place: link fails if another process created the key
                // meanwhile, and then that key wins, so both agree.
                let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
                let write = || -> std::io::Result<()> {
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    f.write_all(format!("{}\n", encode_key(&keys.private)).as_bytes())?;
                    f.sync_all()
                };
                let _ = fs::remove_file(&tmp);
                if let Err(e) = write() {
                    let _ = fs::remove_file(&tmp);
                    return Err(err(format!("creating: {e}")));
                }
                let linked = fs::hard_link(&tmp, path);
                let _ = fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), public = %encode_key(&keys.public), "created a new tunnel key pair");
                        Ok(keys)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Keys::load_or_create(path)
                    }
                    Err(e) => Err(err(format!("creating: {e}"))),
                }
            }
            Err(e) => Err(err(e.to_string())),
        }
    }
}

/// A key as 64 lowercase hex digits (how the agent publishes public keys).
pub fn encode_key(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The inverse of [`encode_key`].
pub fn decode_key(text: &str) -> Result<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return Err(Error::Key(format!(
            "expected 64 hex digits, got {} characters",
            text.len()
        )));
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| Error::Key(format!("not hex: {:?}", &text[2 * i..2 * i + 2])))?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let k = Keys::generate().unwrap();
        assert_eq!(
            decode_key(&encode_key(&k.public_key())).unwrap(),
            k.public_key()
        );
        assert!(decode_key("zz").is_err());
        assert!(decode_key(&"g".repeat(64)).is_err());
    }

    #[test]
    fn debug_hides_private_key() {
        let k = Keys::from_private([7; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.contains(&encode_key(&[7; 32])), "{shown}");
        assert!(shown.contains(&encode_key(&k.public_key())));
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("wft-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tunnel.key");
        let a = Keys::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Keys::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Keys::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("0644"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
