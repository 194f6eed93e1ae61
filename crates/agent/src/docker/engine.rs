//! dockerd's HTTP API on its unix socket (`--docker-host`), the few calls
//! the Docker plugin makes: list, create, inspect and remove networks, and
//! inspect containers. Blocking, one connection per call (`Connection:
//! close`), as the CLI talks to the agent; only ever called from blocking
//! threads that hold no lock of weft's, since dockerd may call the plugin
//! back while it answers.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A network create makes dockerd call the plugin a few times; a minute is
/// far beyond any healthy answer.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    #[error("dockerd is not reachable on {socket}: {source} (is it running? --docker-host names its socket)")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dockerd on {socket}: {method} {path}: {status}: {message}")]
    Api {
        socket: String,
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("dockerd on {socket}: {method} {path}: {what}")]
    Protocol {
        socket: String,
        method: &'static str,
        path: String,
        what: String,
    },
}

impl EngineError {
    /// dockerd's status code, for errors it answered with.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            EngineError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn is_unreachable(&self) -> bool {
        matches!(self, EngineError::Unreachable { .. })
    }
}

fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One subnet of a Docker network's IPAM config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct IpamConfig {
    #[serde(default)]
    pub subnet: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Ipam {
    #[serde(default)]
    pub driver: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: Vec<IpamConfig>,
    #[serde(default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
}

/// A container on a network, as `GET /networks/{id}` lists it (keyed by
/// container id).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NetworkContainer {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
}

/// What dockerd says of a network (`GET /networks`, `GET /networks/{id}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NetworkResource {
    pub name: String,
    pub id: String,
    #[serde(default)]
    pub driver: String,
    #[serde(rename = "IPAM", default)]
    pub ipam: Ipam,
    #[serde(default)]
    pub internal: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub containers: BTreeMap<String, NetworkContainer>,
}

/// `POST /networks/create`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NetworkCreate {
    pub name: String,
    /// dockerd refuses a second network of the same name (dockerd 20.10
    /// would make one otherwise).
    pub check_duplicate: bool,
    pub driver: String,
    pub internal: bool,
    #[serde(rename = "IPAM")]
    pub ipam: Ipam,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Created {
    pub id: String,
}

/// A container's endpoint on one network (`GET /containers/{id}/json`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct EndpointSettings {
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NetworkSettings {
    #[serde(default, deserialize_with = "nullable")]
    pub networks: BTreeMap<String, EndpointSettings>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerJson {
    #[serde(default)]
    pub network_settings: NetworkSettings,
}

/// dockerd's error body.
#[derive(Deserialize)]
struct Message {
    message: String,
}

pub(crate) struct Engine {
    socket: PathBuf,
}

impl Engine {
    pub(crate) fn new(socket: &Path) -> Engine {
        Engine {
            socket: socket.to_path_buf(),
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, EngineError> {
        let socket = || self.socket.display().to_string();
        let unreachable = |source| EngineError::Unreachable {
            socket: socket(),
            source,
        };
        let protocol = |what: String| EngineError::Protocol {
            socket: socket(),
            method,
            path: path.to_string(),
            what,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| protocol(e.to_string()))?;
        let body = body.unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: weft-agent\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        stream
            .write_all(&request)
            .map_err(|e| protocol(format!("sending the request: {e}")))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| protocol(format!("reading the answer: {e}")))?;
        let (status, payload) = weft_model::http::parse_response(&raw)
            .map_err(|what| protocol(format!("an answer weft cannot read: {what}")))?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<Message>(&payload)
                .map(|m| m.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&payload).trim().to_string());
            return Err(EngineError::Api {
                socket: socket(),
                method,
                path: path.to_string(),
                status,
                message,
            });
        }
        // 204 No Content (DELETE) has no body to read.
        let payload = if payload.is_empty() {
            b"null".to_vec()
        } else {
            payload
        };
        serde_json::from_slice(&payload)
            .map_err(|e| protocol(format!("an answer weft cannot read: {e}")))
    }

    /// Every network dockerd has.
    pub(crate) fn networks(&self) -> Result<Vec<NetworkResource>, EngineError> {
        self.call("GET", "/networks", None)
    }

    pub(crate) fn network(&self, id: &str) -> Result<NetworkResource, EngineError> {
        self.call("GET", &format!("/networks/{}", escape_id(id)), None)
    }

    pub(crate) fn create_network(&self, req: &NetworkCreate) -> Result<Created, EngineError> {
        let body = serde_json::to_vec(req).expect("serialisable");
        self.call("POST", "/networks/create", Some(body))
    }

    pub(crate) fn remove_network(&self, id: &str) -> Result<(), EngineError> {
        let _: serde_json::Value =
            self.call("DELETE", &format!("/networks/{}", escape_id(id)), None)?;
        Ok(())
    }

    pub(crate) fn container(&self, id: &str) -> Result<ContainerJson, EngineError> {
        self.call("GET", &format!("/containers/{}/json", escape_id(id)), None)
    }
}

/// Ids and names in a path: Docker's are `[a-zA-Z0-9_.-]`, anything else escaped.
fn escape_id(id: &str) -> String {
    weft_model::http::query_escape(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dockers_network_json() {
        // As dockerd 20.10 writes it, nulls and all.
        let raw = r#"{"Name":"ov","Id":"3f2a","Driver":"weft","Internal":false,
            "IPAM":{"Driver":"weft","Options":null,"Config":[{"Subnet":"10.0.2.0/24","Gateway":"10.0.2.1"}]},
            "Labels":{"weft.auto":"1"},"Containers":{"c0ffee":{"Name":"c1","EndpointID":"e1","IPv4Address":"10.0.2.2/24"}}}"#;
        let n: NetworkResource = serde_json::from_str(raw).unwrap();
        assert_eq!(n.ipam.config[0].subnet, "10.0.2.0/24");
        assert_eq!(n.containers["c0ffee"].name, "c1");
        assert_eq!(n.containers["c0ffee"].endpoint_id, "e1");
        let bare = r#"{"Name":"none","Id":"1","Driver":"null","IPAM":{"Driver":"default","Config":null},"Labels":null,"Containers":null}"#;
        let n: NetworkResource = serde_json::from_str(bare).unwrap();
        assert!(n.ipam.config.is_empty() && n.labels.is_empty());
        let c: ContainerJson = serde_json::from_str(
            r#"{"Name":"/c1","NetworkSettings":{"Networks":{"ov":{"EndpointID":"e1","Aliases":null}}}}"#,
        )
        .unwrap();
        assert!(c.network_settings.networks["ov"].aliases.is_empty());
    }

    #[test]
    fn an_absent_dockerd_is_unreachable() {
        let e = Engine::new(Path::new("/nonexistent/docker.sock"))
            .networks()
            .unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("--docker-host"), "{e}");
    }
}
