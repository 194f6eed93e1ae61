//! Docker's network plugin: the agent serves libnetwork's remote
//! `NetworkDriver` and `IpamDriver` protocols (HTTP+JSON POSTs on a unix
//! socket that dockerd finds in /run/docker/plugins), so that
//! `docker network create -d weft -o weft.network=NAME` puts containers on
//! the weft network NAME.
//!
//! - A Docker network maps to one weft network (made for it when it does not
//!   exist, from the pool and gateway Docker's IPAM chose, and removed with
//!   it then). The mapping lives in the data dir's store, like networks.
//! - A Docker endpoint is a sandbox record whose id is the endpoint id,
//!   marked external with `Runtime::Docker`: reconciliation (addresses back
//!   into the pool, the host veth kept), published ports, `weft ps` and
//!   `network rm` treat it as any other. Unlike CNI, Docker plugs the
//!   interface in itself: on Join weft makes a veth pair in the host
//!   namespace, the host end on the network's bridge, and hands Docker the
//!   other end's name; Docker moves it into the container, names it eth<N>
//!   and sets the address, MAC and gateway. The record has no namespace:
//!   Docker's namespace files are Docker's (possibly in its own mount
//!   namespace), and Docker says when an endpoint goes.
//! - The IPAM driver hands out the addresses of the weft network whose
//!   subnet is the pool, so Docker's containers and weft's sandboxes on one
//!   network never collide. An address it hands out before Docker creates
//!   the endpoint (and after Docker deletes it, until Docker releases it) is
//!   a reservation, kept in the runtime store.
//! - Names: Docker's embedded resolver (127.0.0.11) answers for containers
//!   on user-defined networks whatever their driver, so weft's resolver is
//!   not in the way; `docker run --dns <gateway>` makes Docker forward what
//!   it does not know to weft's resolver, which knows weft's sandboxes, and
//!   Docker's containers too: the driver protocol does not name the
//!   container, so the plugin reads its name and aliases from dockerd's API
//!   after Join and records them as the endpoint's aliases (auto.rs).
//! - Global networks (in a cluster) are made Docker networks by weft on
//!   every host, through dockerd's API (`--docker-host`; auto.rs), so a
//!   network created once in the cluster is usable by every host's dockerd.
//!
//! Lock order: the plugin's state, then the host. Nothing else takes the
//! plugin's lock, and Docker's requests are serialised by it.

mod auto;
mod driver;
mod engine;
mod ipam;
mod proto;

use crate::error::{AgentError, Result};
use crate::host::Host;
use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Router;
use ipnet::Ipv4Net;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{debug, info, warn};
use weft_store::{Store, StoreJson};

/// Docker networks, in the data dir's store (they outlive reboots, as Docker's do).
const NETWORKS: &str = "docker/networks/";
/// IPAM reservations, in the runtime store (no address is held after a reboot).
const ADDRESSES: &str = "docker/addresses/";

fn network_key(id: &str) -> String {
    format!("{NETWORKS}{id}")
}

fn address_key(network: &str, ip: Ipv4Addr) -> String {
    format!("{ADDRESSES}{network}/{ip}")
}

/// A Docker network and the weft network it maps to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DockerNetwork {
    /// libnetwork's network id.
    id: String,
    /// The weft network.
    network: String,
    /// weft made the network for Docker, so it goes with the Docker network.
    created: bool,
}

/// An address the IPAM driver handed out that no endpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Reservation {
    network: String,
    ip: Ipv4Addr,
}

/// A pool the IPAM driver handed out for a network Docker has not created yet.
#[derive(Debug, Default)]
struct PendingPool {
    /// `--ip-range`: becomes the weft network's dynamic range.
    sub_pool: Option<Ipv4Net>,
}

#[derive(Default)]
struct State {
    networks: BTreeMap<String, DockerNetwork>,
    reserved: BTreeSet<(String, Ipv4Addr)>,
    /// Kept in memory only: a pool is pending for the length of one `docker network create`.
    pending: BTreeMap<Ipv4Net, PendingPool>,
}

pub(crate) struct Plugin {
    host: Host,
    state: Mutex<State>,
}

impl Plugin {
    /// Loads the Docker networks and reservations, and puts reservations back
    /// into their networks' address pools.
    fn load(host: Host) -> Result<Plugin> {
        let mut state = State::default();
        {
            let mut g = host.lock();
            let inner = &mut *g;
            for n in inner.networks_db.list_json::<DockerNetwork>(NETWORKS)? {
                if !inner.networks.contains_key(&n.network) {
                    warn!(docker_network = short(&n.id), network = %n.network,
                        "a Docker network maps to a weft network that does not exist; its containers cannot start until it does");
                }
                state.networks.insert(n.id.clone(), n);
            }
            for r in inner.runtime.list_json::<Reservation>(ADDRESSES)? {
                let held = inner.sandboxes.values().any(|s| {
                    s.attachment
                        .endpoints()
                        .iter()
                        .any(|e| e.network == r.network && e.ip == r.ip)
                });
                let restored = !held
                    && inner
                        .networks
                        .get_mut(&r.network)
                        .is_some_and(|n| n.pool.restore(r.ip).is_ok());
                if restored {
                    state.reserved.insert((r.network, r.ip));
                } else {
                    // An endpoint took it over before the agent stopped, or its network is gone.
                    inner.runtime.delete(&address_key(&r.network, r.ip))?;
                }
            }
        }
        info!(
            networks = state.networks.len(),
            reservations = state.reserved.len(),
            "Docker plugin state loaded"
        );
        Ok(Plugin {
            host,
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The first 12 characters of a Docker id, as Docker shows them.
fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

/// Which key a protocol's error goes under: the network driver's proxy reads
/// `Err`, the IPAM proxy `Error`.
#[derive(Clone, Copy)]
enum ErrKey {
    Driver,
    Ipam,
}

impl ErrKey {
    fn name(self) -> &'static str {
        match self {
            ErrKey::Driver => "Err",
            ErrKey::Ipam => "Error",
        }
    }
}

const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

/// Decodes the request, runs `f` off the async workers, and answers. A
/// request that cannot be decoded gets a 400; an operation that fails gets a
/// 200 with the message under the protocol's error key, which is where
/// libnetwork's proxies look for it (and what `docker` then prints).
async fn handle<Req, Resp>(
    plugin: Arc<Plugin>,
    method: &'static str,
    key: ErrKey,
    f: fn(&Plugin, Req) -> Result<Resp>,
    body: Bytes,
) -> Response
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    debug!(method, body = %String::from_utf8_lossy(&body), "Docker plugin request");
    // Requests without a payload come as an empty body or as `null`.
    let raw: &[u8] = match body.trim_ascii() {
        b"" | b"null" => b"{}",
        b => b,
    };
    let req: Req = match serde_json::from_slice(raw) {
        Ok(r) => r,
        Err(e) => {
            warn!(method, error = %e, "undecodable Docker plugin request");
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ key.name(): format!("{method}: cannot decode the request: {e}") }),
            );
        }
    };
    let done = tokio::task::spawn_blocking(move || f(&plugin, req))
        .await
        .unwrap_or_else(|e| Err(AgentError::Task(e)));
    match done {
        Ok(r) => reply(
            StatusCode::OK,
            serde_json::to_value(r).expect("replies serialise"),
        ),
        Err(e) => {
            warn!(method, error = %e, "Docker plugin request failed");
            reply(
                StatusCode::OK,
                serde_json::json!({ key.name(): e.to_string() }),
            )
        }
    }
}

fn op<Req, Resp>(
    plugin: &Arc<Plugin>,
    method: &'static str,
    key: ErrKey,
    f: fn(&Plugin, Req) -> Result<Resp>,
) -> MethodRouter
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let plugin = Arc::clone(plugin);
    post(move |body: Bytes| handle(plugin, method, key, f, body))
}

/// Nothing to do and nothing to say: `{}`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Empty {}

fn constant(body: serde_json::Value) -> MethodRouter {
    post(move || async move { reply(StatusCode::OK, body) })
}

/// Unknown methods get libnetwork's "not implemented": a 404.
fn router(p: Arc<Plugin>) -> Router {
    use ErrKey::{Driver, Ipam};
    Router::new()
        .route(
            "/Plugin.Activate",
            constant(serde_json::json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
        )
        // Docker refuses global-scope drivers without swarm; an overlay
        // network is global inside weft, and each host maps it locally.
        .route(
            "/NetworkDriver.GetCapabilities",
            constant(serde_json::json!({ "Scope": "local", "ConnectivityScope": "local" })),
        )
        .route(
            "/NetworkDriver.CreateNetwork",
            op(&p, "CreateNetwork", Driver, Plugin::create_network),
        )
        .route(
            "/NetworkDriver.DeleteNetwork",
            op(&p, "DeleteNetwork", Driver, Plugin::delete_network),
        )
        .route(
            "/NetworkDriver.CreateEndpoint",
            op(&p, "CreateEndpoint", Driver, Plugin::create_endpoint),
        )
        .route(
            "/NetworkDriver.DeleteEndpoint",
            op(&p, "DeleteEndpoint", Driver, Plugin::delete_endpoint),
        )
        .route(
            "/NetworkDriver.EndpointOperInfo",
            op(&p, "EndpointOperInfo", Driver, Plugin::endpoint_info),
        )
        .route("/NetworkDriver.Join", op(&p, "Join", Driver, Plugin::join))
        .route(
            "/NetworkDriver.Leave",
            op(&p, "Leave", Driver, Plugin::leave),
        )
        .route(
            "/NetworkDriver.ProgramExternalConnectivity",
            op(
                &p,
                "ProgramExternalConnectivity",
                Driver,
                Plugin::program_external,
            ),
        )
        .route(
            "/NetworkDriver.RevokeExternalConnectivity",
            op(
                &p,
                "RevokeExternalConnectivity",
                Driver,
                Plugin::revoke_external,
            ),
        )
        // Node discovery is swarm's; a local-scope driver has nothing to do.
        .route(
            "/NetworkDriver.DiscoverNew",
            constant(serde_json::json!({})),
        )
        .route(
            "/NetworkDriver.DiscoverDelete",
            constant(serde_json::json!({})),
        )
        .route(
            "/IpamDriver.GetCapabilities",
            constant(serde_json::json!({
                "RequiresMACAddress": false,
                "RequiresRequestReplay": false,
            })),
        )
        .route(
            "/IpamDriver.GetDefaultAddressSpaces",
            constant(serde_json::json!({
                "LocalDefaultAddressSpace": ipam::LOCAL_SPACE,
                "GlobalDefaultAddressSpace": ipam::GLOBAL_SPACE,
            })),
        )
        .route(
            "/IpamDriver.RequestPool",
            op(&p, "RequestPool", Ipam, Plugin::request_pool),
        )
        .route(
            "/IpamDriver.ReleasePool",
            op(&p, "ReleasePool", Ipam, Plugin::release_pool),
        )
        .route(
            "/IpamDriver.RequestAddress",
            op(&p, "RequestAddress", Ipam, Plugin::request_address),
        )
        .route(
            "/IpamDriver.ReleaseAddress",
            op(&p, "ReleaseAddress", Ipam, Plugin::release_address),
        )
}

/// What the plugin knows of the local dockerd, for `weft status`.
pub(crate) type DockerStatus = Arc<Mutex<weft_model::api::DockerView>>;

/// The plugin socket being served, and the task that keeps dockerd's
/// networks and names in step (auto.rs).
pub(crate) struct Served {
    task: tokio::task::JoinHandle<()>,
    auto: tokio::task::JoinHandle<()>,
    path: PathBuf,
    status: DockerStatus,
}

impl Served {
    pub(crate) fn status(&self) -> DockerStatus {
        Arc::clone(&self.status)
    }

    /// Stops serving and removes the socket (graceful shutdown). The Docker
    /// networks weft made stay: they are dockerd's record of the host's
    /// global networks, which outlive the agent.
    pub(crate) fn stop(self) {
        self.auto.abort();
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes room for the socket: a leftover of a stopped agent goes, a socket
/// something still answers on is refused.
fn clear_socket(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(AgentError::BadRequest(format!(
            "--docker-plugin-socket {}: a file that is not a socket is in the way",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::Conflict(format!(
            "--docker-plugin-socket {}: another process (another weft agent?) serves it; \
             give this agent its own with --docker-plugin-socket PATH",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(AgentError::io(format!("remove {}", path.display())))
}

/// Loads the plugin's state and serves it on `path` until stopped; talks to
/// dockerd on `docker_host` (its API socket) for containers' names and, with
/// `auto_networks` (in a cluster), to make the global networks Docker's.
pub(crate) async fn listen(
    host: Host,
    path: &Path,
    docker_host: &Path,
    auto_networks: bool,
) -> Result<Served> {
    let plugin = tokio::task::spawn_blocking(move || Plugin::load(host))
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(AgentError::io(format!("create {}", dir.display())))?;
    }
    clear_socket(path)?;
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(AgentError::io(format!("listen on {}", path.display())))?;
    // dockerd runs as root; nobody else may drive the host's networking.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(AgentError::io(format!("chmod {}", path.display())))?;
    let plugin = Arc::new(plugin);
    let app = router(Arc::clone(&plugin));
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "Docker plugin socket failed");
        }
    });
    let driver = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    info!(socket = %path.display(), driver = %driver, "serving Docker's network and IPAM driver");
    let status: DockerStatus = Arc::new(Mutex::new(weft_model::api::DockerView {
        plugin_socket: path.display().to_string(),
        driver: driver.clone(),
        api: docker_host.display().to_string(),
        auto_networks,
        ..Default::default()
    }));
    let auto = Arc::new(auto::Auto::new(
        plugin,
        engine::Engine::new(docker_host),
        driver,
        auto_networks,
        Arc::clone(&status),
    ));
    let auto = tokio::spawn(auto.run());
    Ok(Served {
        task,
        auto,
        path: path.to_path_buf(),
        status,
    })
}
