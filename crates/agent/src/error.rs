use weft_kernel::KernelError;
use weft_store::StoreError;

/// An error with the HTTP status the API answers it with.
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
    #[error("{0}")]
    Internal(String),
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
            AgentError::Unavailable(_) => 503,
            _ => 500,
        }
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;
