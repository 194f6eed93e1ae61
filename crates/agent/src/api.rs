//! The local API: HTTP+JSON routes over the agent's unix socket.

use crate::error::AgentError;
use crate::host::Host;
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
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("task failed: {e}")))?
        .map(Json)
}

pub(crate) fn router(host: Host) -> Router {
    Router::new()
        .route(
            "/v1/ping",
            get(|| async { Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") })) }),
        )
        .route("/v1/status", get(status))
        .route("/v1/cluster/leave", post(leave))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/prune", post(prune_networks))
        .route(
            "/v1/networks/{name}",
            get(get_network).delete(remove_network),
        )
        .route("/v1/networks/{name}/connect", post(connect))
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
        .with_state(host)
}

async fn list_networks(State(h): State<Host>) -> Reply<Vec<weft_model::api::NetworkView>> {
    blocking(move || Ok(h.networks())).await
}

async fn get_network(
    State(h): State<Host>,
    Path(name): Path<String>,
) -> Reply<weft_model::api::NetworkView> {
    blocking(move || h.network(&name)).await
}

fn no_cluster() -> AgentError {
    AgentError::BadRequest(
        "overlay networks span hosts and live in etcd: start the agent with --etcd-endpoints URL (see `weft agent --help`)".into(),
    )
}

async fn create_network(
    State(h): State<Host>,
    Json(spec): Json<NetworkSpec>,
) -> Reply<NetworkView> {
    if spec.driver.as_deref() == Some("overlay") {
        let c = h.cluster.get().cloned().ok_or_else(no_cluster)?;
        return c.create_network(spec).await.map(Json);
    }
    blocking(move || h.create_network(spec)).await
}

async fn remove_network(
    State(h): State<Host>,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Reply<RemovedNetwork> {
    let local = h.network(&name).ok();
    if let Some(c) = h.cluster.get().cloned() {
        // Global, or not joined here (yet): the cluster's to remove.
        if local.as_ref().is_none_or(|n| n.overlay.is_some()) {
            return c.remove_network(&name, q.force).await.map(Json);
        }
    }
    blocking(move || h.remove_network(&name, q.force)).await
}

async fn status(State(h): State<Host>) -> Reply<StatusView> {
    blocking(move || Ok(h.status())).await
}

async fn leave(State(h): State<Host>) -> Reply<()> {
    let c = h.cluster.get().cloned().ok_or_else(no_cluster)?;
    c.leave().await.map(Json)
}

async fn prune_networks(State(h): State<Host>) -> Reply<Vec<RemovedNetwork>> {
    blocking(move || h.prune_networks()).await
}

async fn connect(
    State(h): State<Host>,
    Path(name): Path<String>,
    Json(req): Json<Connect>,
) -> Reply<SandboxView> {
    blocking(move || h.connect(&name, req)).await
}

async fn disconnect(
    State(h): State<Host>,
    Path(name): Path<String>,
    Json(req): Json<Disconnect>,
) -> Reply<SandboxView> {
    blocking(move || h.disconnect(&name, req)).await
}

async fn cni_add(State(h): State<Host>, Json(req): Json<CniAdd>) -> Reply<CniAttachment> {
    blocking(move || h.cni_add(req)).await
}

async fn cni_del(State(h): State<Host>, Json(req): Json<CniRef>) -> Reply<()> {
    blocking(move || h.cni_del(req)).await
}

async fn cni_check(State(h): State<Host>, Json(req): Json<CniRef>) -> Reply<CniAttachment> {
    blocking(move || h.cni_check(req)).await
}

async fn cni_gc(State(h): State<Host>, Json(req): Json<CniGc>) -> Reply<Vec<String>> {
    blocking(move || h.cni_gc(req)).await
}

async fn list_sandboxes(State(h): State<Host>) -> Reply<Vec<weft_model::api::SandboxView>> {
    blocking(move || Ok(h.list())).await
}

async fn create_sandbox(
    State(h): State<Host>,
    Json(req): Json<CreateSandbox>,
) -> Reply<weft_model::api::SandboxView> {
    blocking(move || h.create_sandbox(req)).await
}

async fn get_sandbox(
    State(h): State<Host>,
    Path(key): Path<String>,
) -> Reply<weft_model::api::SandboxView> {
    blocking(move || h.get(&key)).await
}

async fn started(
    State(h): State<Host>,
    Path(key): Path<String>,
    Json(req): Json<StartedProcess>,
) -> Reply<weft_model::api::SandboxView> {
    blocking(move || h.started(&key, req.pid)).await
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
    State(h): State<Host>,
    Path(key): Path<String>,
    Query(q): Query<StopQuery>,
) -> Reply<weft_model::api::SandboxView> {
    blocking(move || h.stop(&key, Duration::from_secs(q.timeout))).await
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove_sandbox(
    State(h): State<Host>,
    Path(key): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Reply<weft_model::api::Removed> {
    blocking(move || h.remove(&key, q.force)).await
}
