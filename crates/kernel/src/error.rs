use std::io;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("network namespace {path}: {what}: {source}")]
    Netns {
        path: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("nft: {0}")]
    Nft(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl KernelError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        KernelError::Io {
            what: what.into(),
            source,
        }
    }

    /// The errno behind a netlink failure, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Netlink { source, .. }
            | KernelError::Netns { source, .. }
            | KernelError::Io { source, .. } => source.raw_os_error(),
            KernelError::Nft(_) => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, KernelError>;
