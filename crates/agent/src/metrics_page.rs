//! The `/metrics` page and its listener.
//!
//! Two kinds of figures. Events (attaches, DNS queries, lease renewals,
//! reconcile passes) are counted where they happen, into `metrics::Metrics`, which
//! the host owns and hands out by `Arc`. Levels (sandboxes per network,
//! peers programmed, a backend device's packets and drops) already live in
//! the host's snapshot, the cluster's status and the kernel: they are read
//! when Prometheus scrapes, so they are never stale and never counted twice.
//!
//! The listener is opt-in (`weft agent --metrics-listen`), serves only
//! `GET /metrics`, and changes nothing: a scrape takes no lock a change
//! holds (it reads the published snapshot and the cluster's last status).

use crate::app::App;
use crate::error::{AgentError, Result};
use crate::metrics::MetricsListen;
use std::collections::BTreeMap;
use tracing::{info, warn};
use weft_metrics::{Kind, Text};
use weft_model::{Driver, Network};

pub(crate) fn render(app: &App) -> String {
    let m = &app.host.metrics;
    let mut t = Text::new();
    t.histograms(
        "weft_attach_duration_seconds",
        "Time to attach a sandbox (validate, allocate, driver, names, record), by network driver and result.",
        &m.attach,
    );
    t.histograms(
        "weft_detach_duration_seconds",
        "Time to remove a sandbox's network side and record, by network driver and result.",
        &m.detach,
    );
    t.counters(
        "weft_dns_queries_total",
        "DNS queries the embedded resolver handled, by network and answer (local, forwarded, nxdomain, refused, failed).",
        &m.dns_queries,
    );
    t.histograms(
        "weft_dns_duration_seconds",
        "Time to answer a DNS query: a local answer from the name table, or a forward from the query's arrival to the upstream's answer.",
        &m.dns_latency,
    );
    t.counters(
        "weft_etcd_lease_renewals_total",
        "Renewals of the etcd lease behind this host's subnet leases, by result.",
        &m.lease_renewals,
    );
    t.histograms(
        "weft_reconcile_duration_seconds",
        "Time of a reconcile pass: startup (records against the kernel) or cluster (etcd against this host).",
        &m.reconcile,
    );
    levels(app, &mut t);
    t.finish()
}

fn levels(app: &App, t: &mut Text) {
    let snap = app.host.snapshot();
    let mut sandboxes: BTreeMap<&str, u64> =
        snap.networks.keys().map(|n| (n.as_str(), 0)).collect();
    let mut endpoints: BTreeMap<(&str, &'static str), u64> = BTreeMap::new();
    for sb in snap.sandboxes.values() {
        for ep in sb.attachment.endpoints() {
            *sandboxes.entry(ep.network.as_str()).or_default() += 1;
            let kind = if ep.kind.is_veth() { "veth" } else { "macvlan" };
            *endpoints.entry((ep.network.as_str(), kind)).or_default() += 1;
        }
    }
    t.metric(
        "weft_sandboxes",
        "Sandboxes attached to each network on this host.",
        Kind::Gauge,
    );
    for (net, n) in &sandboxes {
        t.sample("weft_sandboxes", &[("network", net)], *n as f64);
    }
    t.metric(
        "weft_endpoints",
        "Endpoints on each network on this host, by kind (veth, macvlan).",
        Kind::Gauge,
    );
    for ((net, kind), n) in &endpoints {
        t.sample(
            "weft_endpoints",
            &[("network", net), ("kind", kind)],
            *n as f64,
        );
    }

    let Some(cluster) = &app.cluster else {
        return;
    };
    let view = cluster.status();
    t.metric(
        "weft_etcd_up",
        "1 when the last request to etcd succeeded, 0 while etcd is unreachable.",
        Kind::Gauge,
    );
    t.sample(
        "weft_etcd_up",
        &[],
        if view.etcd_healthy { 1.0 } else { 0.0 },
    );
    t.metric(
        "weft_peers",
        "Other hosts of each overlay network, by state: programmed (traffic can flow) or failed (see weft status for why).",
        Kind::Gauge,
    );
    for o in &view.networks {
        let ok = o.peers.iter().filter(|p| p.problem.is_none()).count();
        let failed = o.peers.len() - ok;
        for (state, n) in [("programmed", ok), ("failed", failed)] {
            t.sample(
                "weft_peers",
                &[
                    ("network", &o.name),
                    ("backend", &o.backend),
                    ("state", state),
                ],
                n as f64,
            );
        }
    }
    backend_devices(&snap.networks, &view.networks, t);
}

/// Per overlay network, its backend device's counters as the kernel keeps
/// them (vxlan: the VXLAN device; udp and secure: the TUN device), plus
/// the userspace tunnel's own drops by cause. host-gw has no device of its
/// own: its packets go out of the underlay interface, routed.
fn backend_devices(
    networks: &BTreeMap<String, Network>,
    status: &[weft_model::api::OverlayStatus],
    t: &mut Text,
) {
    let mut nl = match weft_kernel::Netlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            warn!(error = %e, "metrics: cannot open netlink; backend counters left out");
            return;
        }
    };
    let mut rows = Vec::new();
    for o in status {
        let Some(net) = networks
            .get(&o.name)
            .filter(|n| n.driver() == Driver::Overlay)
        else {
            continue;
        };
        let Some(device) = crate::backend::device_of(net) else {
            continue;
        };
        match nl.link_stats(&device) {
            Ok(Some(s)) => rows.push((o, device, s)),
            Ok(None) => {}
            Err(e) => warn!(device, error = %e, "metrics: cannot read the device's counters"),
        }
    }
    type Pick = fn(&weft_kernel::LinkStats) -> u64;
    let per_direction: [(&str, &str, Pick, Pick); 3] = [
        (
            "weft_backend_packets_total",
            "Packets through each overlay network's backend device, by direction (tx: to other hosts).",
            |s| s.tx_packets,
            |s| s.rx_packets,
        ),
        (
            "weft_backend_bytes_total",
            "Bytes through each overlay network's backend device, by direction (tx: to other hosts).",
            |s| s.tx_bytes,
            |s| s.rx_bytes,
        ),
        (
            "weft_backend_device_drops_total",
            "Packets the kernel dropped or failed on each overlay network's backend device, by direction.",
            |s| s.tx_dropped + s.tx_errors,
            |s| s.rx_dropped + s.rx_errors,
        ),
    ];
    for (name, help, tx, rx) in per_direction {
        t.metric(name, help, Kind::Counter);
        for (o, device, s) in &rows {
            for (dir, v) in [("tx", tx(s)), ("rx", rx(s))] {
                t.sample(
                    name,
                    &[
                        ("network", &o.name),
                        ("backend", &o.backend),
                        ("device", device),
                        ("direction", dir),
                    ],
                    v as f64,
                );
            }
        }
    }
    t.metric(
        "weft_tunnel_drops_total",
        "Packets the userspace tunnel (udp, secure) dropped, by cause (no_peer, no_session, bad_auth, replayed, unknown_sender, bad_source, malformed); as of the last reconcile.",
        Kind::Counter,
    );
    for o in status {
        for (k, v) in &o.counters {
            if let Some(cause) = k.strip_prefix("dropped_") {
                t.sample(
                    "weft_tunnel_drops_total",
                    &[
                        ("network", &o.name),
                        ("backend", &o.backend),
                        ("cause", cause),
                    ],
                    *v as f64,
                );
            }
        }
    }
}

fn router(app: App) -> axum::Router {
    use axum::http::header::CONTENT_TYPE;
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let app = app.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || render(&app))
                    .await
                    .unwrap_or_else(|e| format!("# rendering failed: {e}\n"));
                ([(CONTENT_TYPE, weft_metrics::CONTENT_TYPE)], body)
            }
        }),
    )
}

/// A started listener; stops when dropped.
pub(crate) struct MetricsServer {
    task: tokio::task::JoinHandle<()>,
    unix_path: Option<std::path::PathBuf>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds before anything else starts, so a taken port fails the start.
pub(crate) async fn bind(at: &MetricsListen) -> Result<Listener> {
    match at {
        MetricsListen::Tcp(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Listener::Tcp)
            .map_err(AgentError::io(format!(
                "listen for metrics on {addr} (--metrics-listen): is another process on that port?"
            ))),
        MetricsListen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path).map_err(AgentError::io(format!(
                "listen for metrics on {} (--metrics-listen)",
                path.display()
            )))?;
            Ok(Listener::Unix(l, path.clone()))
        }
    }
}

pub(crate) enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

pub(crate) fn serve(listener: Listener, app: App) -> MetricsServer {
    let router = router(app);
    match listener {
        Listener::Tcp(l) => {
            info!(address = ?l.local_addr().ok(), "serving metrics at /metrics");
            MetricsServer {
                task: tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, router).await {
                        warn!(error = %e, "the metrics listener stopped");
                    }
                }),
                unix_path: None,
            }
        }
        Listener::Unix(l, path) => {
            info!(socket = %path.display(), "serving metrics at /metrics");
            MetricsServer {
                task: tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, router).await {
                        warn!(error = %e, "the metrics listener stopped");
                    }
                }),
                unix_path: Some(path),
            }
        }
    }
}
