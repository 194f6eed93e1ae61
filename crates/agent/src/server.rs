//! Runs the agent: one agent per state dir (an flock), then the API on a
//! unix socket that only root can open, until SIGTERM or SIGINT.

use crate::app::App;
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use tracing::info;

pub async fn serve(cfg: AgentConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(AgentError::io(format!(
        "create {}",
        cfg.state_dir.display()
    )))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.lock_path())
        .map_err(AgentError::io(format!(
            "open {}",
            cfg.lock_path().display()
        )))?;
    // SAFETY: flock(2) on a descriptor `lock` owns and keeps open; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(AgentError::Conflict(format!(
            "another weft agent is already running with state dir {}; stop it, or give this one its own --state-dir",
            cfg.state_dir.display()
        )));
    }

    // Every option that can be checked before the first side effect (the
    // namespace mount, weft0, the nft table) is checked here.
    if let Some(cc) = cfg.cluster.clone() {
        tokio::task::spawn_blocking(move || crate::cluster::check_public_address(&cc)).await??;
    }

    // Bound now, so a taken port fails the start before any side effect.
    let metrics_listener = match &cfg.metrics_listen {
        Some(at) => Some(crate::metrics_page::bind(at).await?),
        None => None,
    };

    let start_cfg = cfg.clone();
    let host = tokio::task::spawn_blocking(move || crate::reconcile::start(start_cfg))
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;

    let cluster = match cfg.cluster.clone() {
        Some(cc) => Some(crate::cluster::Cluster::start(cc, host.clone()).await?),
        None => None,
    };
    // Before the API: dockerd may be waiting for the plugin already.
    let docker = match &cfg.docker_plugin {
        Some(path) => Some(
            crate::docker::listen(host.clone(), path, &cfg.docker_host, cluster.is_some()).await?,
        ),
        None => None,
    };
    let app = App {
        host: host.clone(),
        cluster,
        docker: docker.as_ref().map(|d| d.status()),
    };

    let metrics = metrics_listener.map(|l| crate::metrics_page::serve(l, app.clone()));

    let sock = cfg.socket_path();
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(AgentError::io(format!("listen on {}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(AgentError::io(format!("chmod {}", sock.display())))?;
    info!(socket = %sock.display(), "agent ready");

    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("signal handler");
        let mut int = signal(SignalKind::interrupt()).expect("signal handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        info!("shutting down; sandboxes keep running");
    };
    axum::serve(listener, crate::api::router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AgentError::io("serve the API"))?;
    if let Some(d) = docker {
        d.stop();
    }
    drop(metrics);
    tokio::task::spawn_blocking(move || host.shutdown())
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let _ = std::fs::remove_file(&sock);
    drop(lock);
    Ok(())
}
