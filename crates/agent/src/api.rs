//! The local API: HTTP+JSON routes over the agent's unix socket.

use crate::app::App;
use crate::error::AgentError;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::time::Duration;
use weft_model::api::{
    ApiError, CniAdd, CniAttachment, CniGc, CniRef, Connect, CreateSandbox, Disconnect,
    NetworkView, RemovedNetwork, SandboxView, StartedProcess, StatusView,
};
use weft_model::NetworkSpec;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (
            status,
            Json(ApiError {
                message: self.to_string(),
            }),
        )
            .into_response()
    }
}

type Reply<T> = Result<Json<T>, AgentError>;

/// Runs blocking agent work (netlink, files) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Reply<T> {
    tokio::task::spawn_blocking(f).await?.map(Json)
}

pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route(
            "/v1/ping",
            get(|| async { Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") })) }),
        )
        .route("/v1/status", get(status))
        .route("/v1/explain", post(explain))
        .route("/v1/topology", get(topology))
        .route("/v1/cluster/leave", post(leave))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/prune", post(prune_networks))
        .route(
            "/v1/networks/{name}",
            get(get_network).delete(remove_network),
        )
        .route("/v1/networks/{name}/connect", post(connect))
        .route("/v1/networks/{name}/expose", post(expose))
        .route("/v1/networks/{name}/hide", post(hide))
        .route("/v1/networks/{name}/disconnect", post(disconnect))
        .route("/v1/cni/add", post(cni_add))
        .route("/v1/cni/del", post(cni_del))
        .route("/v1/cni/check", post(cni_check))
        .route("/v1/cni/gc", post(cni_gc))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route(
            "/v1/sandboxes/{key}",
            get(get_sandbox).delete(remove_sandbox),
        )
        .route("/v1/sandboxes/{key}/started", post(started))
        .route("/v1/sandboxes/{key}/stop", post(stop))
        .with_state(app)
}

// Reads of the snapshot (`ps`, `network ls`, `inspect SANDBOX`) take no
// lock and make no kernel request (a sandbox's state is one read of
// /proc/PID/stat), so they are answered on the async worker: handing them
// to the blocking pool would queue them behind a burst of writes' threads.
async fn list_networks(State(app): State<App>) -> Reply<Vec<weft_model::api::NetworkView>> {
    Ok(Json(app.host.networks()))
}

async fn get_network(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Reply<weft_model::api::NetworkView> {
    let status = app.cluster.as_ref().map(|c| c.status());
    let node = status.as_ref().map(|s| s.node.clone());
    let (blocks, mut exposed) = status
        .and_then(|s| s.networks.into_iter().find(|n| n.name == name))
        .map(|n| (n.blocks, n.exposed))
        .unwrap_or_default();
    let here = app.host.snapshot();
    let mut v = blocking(move || app.host.network(&name)).await?;
    v.0.blocks = blocks;
    // This host from its own state; the others from their records.
    let mine = here
        .exposed
        .get(&v.0.name)
        .copied()
        .or_else(|| (v.0.overlay.is_none() && !v.0.bridge.is_empty()).then_some(v.0.gateway));
    if let Some(ip) = mine {
        exposed.push(weft_model::api::ExposedHost {
            node: node.unwrap_or_else(crate::expose::hostname),
            ip,
        });
    }
    exposed.sort();
    v.0.exposed = exposed;
    Ok(v)
}

async fn expose(
    State(app): State<App>,
    Path(name): Path<String>,
    Json(req): Json<weft_model::api::ExposeRequest>,
) -> Reply<weft_model::api::ExposedView> {
    let n = name.clone();
    with_room(&app, None, move |app| {
        let (name, req) = (name.clone(), req.clone());
        move || app.host.expose(&name, &req)
    })
    .await
    // The cluster's claim speaks of a sandbox's `--net`.
    .map_err(|e| match e {
        AgentError::Conflict(m) => AgentError::Conflict(m.replacen(
            &format!("--net {n}: "),
            &format!("weft expose {n} --ip: "),
            1,
        )),
        e => e,
    })
    .map(Json)
}

async fn hide(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Reply<weft_model::api::ExposedView> {
    blocking(move || app.host.hide(&name)).await
}

fn no_cluster() -> AgentError {
    AgentError::BadRequest(
        "overlay networks span hosts and live in etcd: start the agent with --etcd-endpoints URL (see `weft agent --help`)".into(),
    )
}

async fn create_network(
    State(app): State<App>,
    Json(spec): Json<NetworkSpec>,
) -> Reply<NetworkView> {
    if spec.driver.as_deref() == Some("overlay") {
        let c = app.cluster.clone().ok_or_else(no_cluster)?;
        return c.create_network(spec).await.map(Json);
    }
    blocking(move || app.host.create_network(spec)).await
}

async fn remove_network(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Reply<RemovedNetwork> {
    let local = app.host.network(&name).ok();
    if let Some(c) = app.cluster.clone() {
        // Global, or not joined here (yet): the cluster's to remove.
        if local.as_ref().is_none_or(|n| n.overlay.is_some()) {
            return c.remove_network(&name, q.force).await.map(Json);
        }
    }
    blocking(move || app.host.remove_network(&name, q.force)).await
}

async fn explain(
    State(app): State<App>,
    Json(req): Json<weft_model::explain::ExplainRequest>,
) -> Reply<weft_model::explain::Explanation> {
    let cluster = app.cluster.as_ref().map(|c| c.status());
    blocking(move || crate::explain::explain(&app.host, cluster.as_ref(), &req)).await
}

async fn topology(State(app): State<App>) -> Reply<weft_model::topology::Topology> {
    let cluster = app.cluster.as_ref().map(|c| c.status());
    blocking(move || crate::explain::topology(&app.host, cluster.as_ref())).await
}

async fn status(State(app): State<App>) -> Reply<StatusView> {
    let cluster = app.cluster.clone();
    let docker = app.docker.clone();
    let mut v = blocking(move || Ok(app.host.status())).await?;
    v.cluster = cluster.map(|c| c.status());
    v.docker = docker.map(|d| crate::host::recover(d.lock()).clone());
    let mut problems = std::mem::take(&mut v.problems);
    if let Some(d) = &v.docker {
        problems.extend(d.problems.iter().map(|p| format!("docker: {p}")));
    }
    if let Some(c) = &v.cluster {
        if !c.etcd_healthy {
            problems.push(format!(
                "etcd unreachable: {}",
                c.etcd_error.as_deref().unwrap_or("not contacted yet")
            ));
        }
        for n in &c.networks {
            if let Some(p) = &n.problem {
                problems.push(format!("overlay network {}: {p}", n.name));
            }
            for peer in n.peers.iter().filter(|p| p.problem.is_some()) {
                problems.push(format!(
                    "overlay network {}: peer {} not programmed: {}",
                    n.name,
                    peer.node,
                    peer.problem.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    v.healthy = problems.is_empty();
    v.problems = problems;
    Ok(v)
}

async fn leave(State(app): State<App>) -> Reply<()> {
    let c = app.cluster.clone().ok_or_else(no_cluster)?;
    c.leave().await.map(Json)
}

async fn prune_networks(State(app): State<App>) -> Reply<Vec<RemovedNetwork>> {
    blocking(move || app.host.prune_networks()).await
}

async fn connect(
    State(app): State<App>,
    Path(name): Path<String>,
    Json(req): Json<Connect>,
) -> Reply<SandboxView> {
    let sandbox = req.sandbox.clone();
    with_room(&app, Some(sandbox), move |app| {
        let (name, req) = (name.clone(), req.clone());
        move || app.host.connect(&name, req)
    })
    .await
    .map(Json)
}

/// Runs an attach; on a shared network where this host holds no room (or
/// no claim on the `--ip` asked for) it claims more from the cluster and
/// tries again. Validation refuses before anything is made, so a retry
/// starts clean. Without a cluster the first error stands.
async fn with_room<T, F, G>(
    app: &App,
    sandbox: Option<String>,
    attempt: G,
) -> crate::error::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> crate::error::Result<T> + Send + 'static,
    G: Fn(App) -> F,
{
    let mut tries = 0;
    loop {
        let r = tokio::task::spawn_blocking(attempt(app.clone())).await?;
        let Some(c) = app.cluster.as_ref() else {
            return r;
        };
        tries += 1;
        match r {
            Err(AgentError::NoRoom { network, within }) if tries < 4 => {
                c.grow(&network, within).await?
            }
            Err(AgentError::NeedsClaim { network, ip }) if tries < 4 => {
                c.claim_address(&network, ip, sandbox.as_deref()).await?
            }
            r => return r,
        }
    }
}

async fn disconnect(
    State(app): State<App>,
    Path(name): Path<String>,
    Json(req): Json<Disconnect>,
) -> Reply<SandboxView> {
    blocking(move || app.host.disconnect(&name, req)).await
}

async fn cni_add(State(app): State<App>, Json(req): Json<CniAdd>) -> Reply<CniAttachment> {
    with_room(&app, None, move |app| {
        let req = req.clone();
        move || app.host.cni_add(req)
    })
    .await
    .map(Json)
}

async fn cni_del(State(app): State<App>, Json(req): Json<CniRef>) -> Reply<()> {
    blocking(move || app.host.cni_del(req)).await
}

async fn cni_check(State(app): State<App>, Json(req): Json<CniRef>) -> Reply<CniAttachment> {
    blocking(move || app.host.cni_check(req)).await
}

async fn cni_gc(State(app): State<App>, Json(req): Json<CniGc>) -> Reply<Vec<String>> {
    blocking(move || app.host.cni_gc(req)).await
}

async fn list_sandboxes(State(app): State<App>) -> Reply<Vec<weft_model::api::SandboxView>> {
    Ok(Json(app.host.list()))
}

/// Declares the sub-ranges that `--net NAME:subnet=CIDR` values name and
/// the networks do not have yet (a global network's in etcd), after
/// checking them; before the attach, whose validation then finds them.
async fn declare_subranges(app: &App, values: &[String]) -> crate::error::Result<()> {
    use weft_model::sandbox::{parse_net_modes, NetMode};
    // Malformed values are the attach's validation's to report.
    let Ok(modes) = parse_net_modes(values) else {
        return Ok(());
    };
    for m in modes {
        let NetMode::Network(r) = m else { continue };
        let Some(sub) = r.subrange else { continue };
        let (host, name) = (app.host.clone(), r.network.clone());
        let Some(net) =
            tokio::task::spawn_blocking(move || host.check_subrange(&name, sub)).await??
        else {
            continue;
        };
        match &app.cluster {
            Some(c) if net.is_global() => c.declare_subrange(&r.network, sub).await?,
            _ => {
                let (host, name) = (app.host.clone(), r.network.clone());
                tokio::task::spawn_blocking(move || host.declare_subrange(&name, sub)).await??
            }
        }
    }
    Ok(())
}

async fn create_sandbox(
    State(app): State<App>,
    Json(req): Json<CreateSandbox>,
) -> Reply<weft_model::api::SandboxView> {
    declare_subranges(&app, &req.net).await?;
    with_room(&app, req.name.clone(), move |app| {
        let req = req.clone();
        move || app.host.create_sandbox(req)
    })
    .await
    .map(Json)
}

async fn get_sandbox(
    State(app): State<App>,
    Path(key): Path<String>,
) -> Reply<weft_model::api::SandboxView> {
    app.host.get(&key).map(Json)
}

async fn started(
    State(app): State<App>,
    Path(key): Path<String>,
    Json(req): Json<StartedProcess>,
) -> Reply<weft_model::api::SandboxView> {
    blocking(move || app.host.started(&key, req.pid, req.start_time)).await
}

#[derive(Deserialize)]
struct StopQuery {
    #[serde(default = "default_timeout")]
    timeout: u64,
}

fn default_timeout() -> u64 {
    10
}

async fn stop(
    State(app): State<App>,
    Path(key): Path<String>,
    Query(q): Query<StopQuery>,
) -> Reply<weft_model::api::SandboxView> {
    blocking(move || app.host.stop(&key, Duration::from_secs(q.timeout))).await
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove_sandbox(
    State(app): State<App>,
    Path(key): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Reply<weft_model::api::Removed> {
    blocking(move || app.host.remove(&key, q.force)).await
}
