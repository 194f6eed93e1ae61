//! Errors of the tunnel crate.

use std::path::PathBuf;

/// What can go wrong when starting a tunnel or handling its keys. Failures
/// inside the datapath after start are counted in [`crate::Stats`] and
/// logged, never returned: a bad packet must not stop the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid tunnel configuration: {0}")]
    Config(String),

    #[error("creating TUN device {ifname:?}: {source}")]
    Tun {
        ifname: String,
        #[source]
        source: std::io::Error,
    },

    #[error("opening UDP socket on {addr}: {what}: {source}")]
    Socket {
        addr: std::net::SocketAddrV4,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },

    #[error("invalid key: {0}")]
    Key(String),

    #[error("noise protocol: {0}")]
    Noise(#[from] snow::Error),

    #[error("random numbers unavailable: {0}")]
    Random(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
