use weft_kernel::KernelError;
use weft_store::StoreError;

/// An error with the HTTP status the API answers it with. Wrapped errors
/// keep their cause as `source()`, so a log shows the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request was wrong; the message says how to fix it.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Something weft just made or relies on is not there.
    #[error("{what} vanished from {place}")]
    Vanished { what: String, place: String },
    /// A driver was handed a network of another driver (a bug, not a request).
    #[error("network {network} is a {driver} network, not {wanted}")]
    WrongDriver {
        network: String,
        driver: String,
        wanted: &'static str,
    },
    /// The network's host side has not been set up (yet).
    #[error("network {network} is not set up on this host; see `weft status`")]
    NotReady { network: String },
    /// A backend could not program the kernel.
    #[error("backend: {0}")]
    Backend(#[from] crate::backend::BackendError),
    /// Every failure of a teardown, not only the first.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several(Vec<AgentError>),
    /// What was being done when `source` happened.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<AgentError>,
    },
    /// A blocking task of the agent's panicked or was cancelled.
    #[error("agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Internal(String),
    /// A shared network: every address this host may hand out is in use;
    /// the API claims more from the cluster and tries again.
    #[error("network {network}: every address of this host's blocks is in use, and no more could be claimed from the cluster; see `weft status`")]
    NoRoom {
        network: String,
        /// The sub-range the endpoint is placed in, if any.
        within: Option<ipnet::Ipv4Net>,
    },
    /// A shared network: `--ip` names an address this host holds no claim
    /// on; the API claims it in the cluster and tries again.
    #[error("--net {network}: {ip} is in a block of another host or of none, and could not be claimed in the cluster now (is etcd reachable? see `weft status`)")]
    NeedsClaim {
        network: String,
        ip: std::net::Ipv4Addr,
    },
    /// A dependency (etcd) cannot be reached now; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
}

impl AgentError {
    pub fn status(&self) -> u16 {
        match self {
            AgentError::BadRequest(_) => 400,
            AgentError::NotFound(_) => 404,
            AgentError::Conflict(_) => 409,
            AgentError::Unavailable(_) | AgentError::NoRoom { .. } => 503,
            AgentError::NeedsClaim { .. } => 503,
            AgentError::Context { source, .. } => source.status(),
            AgentError::Several(all) => all.first().map_or(500, |e| e.status()),
            _ => 500,
        }
    }

    /// Ok when `errors` is empty; else the one error, or all of them.
    pub(crate) fn all(mut errors: Vec<AgentError>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(AgentError::Several(errors)),
        }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }
}

/// Adds what was being done to an error, keeping it as the source
/// (netavark's `.wrap()`).
pub(crate) trait Wrap<T> {
    fn wrap(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<AgentError>> Wrap<T> for std::result::Result<T, E> {
    fn wrap(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| AgentError::Context {
            context: context(),
            source: Box::new(e.into()),
        })
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn wrapped_errors_keep_their_cause_and_status() {
        let e: Result<()> = Err(AgentError::NotFound("no network x".into()));
        let e = e.wrap(|| "connect web".into()).unwrap_err();
        assert_eq!(e.to_string(), "connect web: no network x");
        assert_eq!(e.status(), 404);
        assert_eq!(e.source().unwrap().to_string(), "no network x");
    }

    #[test]
    fn a_teardown_reports_every_failure() {
        assert!(AgentError::all(Vec::new()).is_ok());
        let e = AgentError::all(vec![
            AgentError::Conflict("a".into()),
            AgentError::Internal("b".into()),
        ])
        .unwrap_err();
        assert_eq!(e.to_string(), "a; b");
        let one = AgentError::all(vec![AgentError::NotFound("c".into())]).unwrap_err();
        assert_eq!(one.status(), 404);
    }
}
