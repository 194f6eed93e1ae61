//! A small synchronous HTTP/1.1 client for the agent's unix socket. The CLI
//! makes one or two calls per command, so a connection per call is plenty
//! and keeps `weft` free of an async runtime on its hot path.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use weft_model::api::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no weft agent is running at {0}: start one with `weft agent` (as root), \
         or point --state-dir / WEFT_STATE_DIR at the agent's state dir"
    )]
    NoAgent(String),
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent sent an answer weft cannot read: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, .. })
    }
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: PathBuf) -> Self {
        Client { socket }
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.socket.display().to_string(),
            source,
        }
    }

    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NoAgent(self.socket.display().to_string())
            }
            _ => self.io(e),
        })?;
        let body = body
            .map(|b| serde_json::to_vec(b).expect("serializable"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: weft\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        stream.write_all(&request).map_err(|e| self.io(e))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(|e| self.io(e))?;
        let (status, payload) = parse_response(&raw)?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&payload).map_err(|e| ClientError::Protocol(e.to_string()))
        } else {
            let message = serde_json::from_slice::<ApiError>(&payload)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&payload).into_owned());
            Err(ClientError::Api { status, message })
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.call("POST", path, Some(body))
    }

    /// A POST without a body (Content-Length: 0): the server never has unread
    /// bytes to reset the connection over.
    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("POST", path, None::<&()>)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("DELETE", path, None::<&()>)
    }
}

/// Splits a complete HTTP/1.1 response into status and body (plain or chunked).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    weft_model::http::parse_response(raw).map_err(|what| ClientError::Protocol(what.to_string()))
}
