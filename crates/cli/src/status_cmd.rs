//! weft status: the agent's own view, cluster included.

use crate::output::{emit, table};
use crate::sandbox_cmds::Context;
use crate::Failure;
use weft_model::api::StatusView;

/// Exits 1 when the agent reports a problem (a kernel object weft made is
/// gone, etcd is unreachable, an overlay network or peer is not programmed).
pub fn status(ctx: &Context) -> Result<i32, Failure> {
    let v: StatusView = ctx.client.get("/v1/status")?;
    emit(ctx.format, &v, || render(&v));
    Ok(if v.healthy { 0 } else { 1 })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// "3h 5m", "42s": how long ago `since` was.
fn span(since: u64) -> String {
    let s = now_unix().saturating_sub(since);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping {
    version: String,
}

#[derive(serde::Serialize)]
struct Versions {
    client: String,
    /// None when the agent cannot be reached.
    agent: Option<String>,
    agent_error: Option<String>,
}

/// `weft version`: this binary's and the agent's; exits 1 when the agent
/// cannot be asked (the client's version is printed all the same).
pub fn version(ctx: &Context) -> Result<i32, Failure> {
    let agent = ctx.client.get::<Ping>("/v1/ping");
    let v = Versions {
        client: env!("CARGO_PKG_VERSION").into(),
        agent: agent.as_ref().ok().map(|p| p.version.clone()),
        agent_error: agent.as_ref().err().map(|e| e.to_string()),
    };
    emit(ctx.format, &v, || {
        format!(
            "client: weft {}\nagent:  {}",
            v.client,
            match (&v.agent, &v.agent_error) {
                (Some(a), _) => format!("weft {a}"),
                (None, e) => format!("not reachable ({})", e.as_deref().unwrap_or("?")),
            }
        )
    });
    Ok(if v.agent.is_some() { 0 } else { 1 })
}

/// The Docker plugin: its driver, dockerd's API and the networks weft made there.
fn docker_lines(d: &weft_model::api::DockerView) -> String {
    let api = match (&d.error, d.checked_unix) {
        (_, 0) => "not asked yet".to_string(),
        (None, t) => format!("answers (asked {} ago)", span(t)),
        (Some(e), _) if !d.reachable => format!("NOT REACHABLE: {e} (retrying)"),
        (Some(e), _) => format!("last call failed: {e} (retrying)"),
    };
    let networks = if !d.auto_networks {
        "none made (single host: only global networks are made Docker networks)".to_string()
    } else if d.networks.is_empty() {
        "none yet".to_string()
    } else {
        d.networks.join(", ")
    };
    format!(
        "docker:  driver {} on {}\ndockerd: {} {}\n         networks made by weft: {}\n\n",
        d.driver, d.plugin_socket, d.api, api, networks
    )
}

fn render(v: &StatusView) -> String {
    let mut out = format!(
        "weft {}, up {}: {} networks, {} sandboxes ({} running)\n{}\n\
         state:   {}\ndata:    {}\npool:    {} of {} namespaces ready\n",
        v.version,
        span(v.started_unix),
        v.networks,
        v.sandboxes,
        v.sandboxes_running,
        if v.healthy {
            "health:  ok".to_string()
        } else {
            format!("health:  PROBLEMS\n  - {}", v.problems.join("\n  - "))
        },
        v.state_dir,
        v.data_dir,
        v.netns_pool.1,
        v.netns_pool.0,
    );
    let rows: Vec<Vec<String>> = v
        .network_list
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.driver.clone(),
                n.subnet.to_string(),
                n.sandboxes.to_string(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["NETWORK", "DRIVER", "SUBNET", "SANDBOXES"], &rows));
    out.push_str("\n\n");
    for e in &v.exposed {
        out.push_str(&format!(
            "exposed: {} on this host as {}/{} ({} kind; `weft hide {}` takes it back)\n",
            e.network, e.ip, e.prefix_len, e.kind, e.network
        ));
    }
    if !v.exposed.is_empty() {
        out.push('\n');
    }
    if let Some(d) = &v.docker {
        out.push_str(&docker_lines(d));
    }
    let Some(c) = &v.cluster else {
        out.push_str(
            "cluster: none (single host; start the agent with --etcd-endpoints to join one)",
        );
        return out;
    };
    let health = if c.etcd_healthy {
        "healthy".to_string()
    } else {
        format!(
            "UNREACHABLE{}: {}. Sandboxes still start on the subnets this host holds and \
             programmed routes stay; network changes and new peers wait for etcd (retrying)",
            c.etcd_down_since_unix
                .map_or(String::new(), |t| format!(" for {}", span(t))),
            c.etcd_error.as_deref().unwrap_or("not contacted yet")
        )
    };
    out.push_str(&format!(
        "etcd:    {} {}\nnode:    {} ({}), public address {}\nlease:   {} (ttl {} s)\n",
        c.etcd_endpoints.join(","),
        health,
        c.node,
        c.host_id,
        c.public_ip.map_or("-".into(), |i| i.to_string()),
        c.etcd_lease.map_or("none".into(), |l| format!("{l:x}")),
        c.lease_ttl_secs
    ));
    if c.etcd_plaintext {
        out.push_str(
            "WARNING: plain http to etcd: the cluster's state travels unencrypted and etcd \
             cannot tell hosts apart; use https:// endpoints with --etcd-cafile, \
             --etcd-certfile and --etcd-keyfile\n",
        );
    }
    for n in &c.networks {
        let holds = if n.kind == weft_model::overlay::OverlayKind::Shared {
            let mine: Vec<String> = n
                .blocks
                .iter()
                .filter(|b| b.node == c.node)
                .map(|b| format!("{} ({}/{})", b.block, b.used, b.capacity))
                .collect();
            format!(
                "one subnet shared by all hosts; this host holds block{} {}, {} sandbox{} on other hosts",
                if mine.len() == 1 { "" } else { "s" },
                if mine.is_empty() { "none yet".into() } else { mine.join(", ") },
                n.remote_endpoints,
                if n.remote_endpoints == 1 { "" } else { "es" }
            )
        } else {
            format!(
                "this host {}",
                n.subnet.map_or("has no subnet".into(), |s| s.to_string())
            )
        };
        out.push_str(&format!(
            "\nnetwork {} ({}, backend {}): {holds}{}\n",
            n.name,
            n.range,
            n.backend,
            n.problem
                .as_ref()
                .map_or(String::new(), |p| format!(" -- {p}"))
        ));
        let rows: Vec<Vec<String>> = n
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.node.clone(),
                    p.subnet.to_string(),
                    p.public_ip.to_string(),
                    p.programmed
                        .clone()
                        .or_else(|| p.problem.as_ref().map(|e| format!("NOT PROGRAMMED: {e}")))
                        .unwrap_or_default()
                        + &p.key_change.as_ref().map_or(String::new(), |k| {
                            format!(
                                "; KEY CHANGED {} ago: was {}…, now {}…",
                                span(k.at_unix),
                                k.previous.get(..12).unwrap_or(&k.previous),
                                k.current.get(..12).unwrap_or(&k.current)
                            )
                        }),
                ]
            })
            .collect();
        out.push_str(&table(
            &["PEER", "SUBNET", "PUBLIC IP", "PROGRAMMED"],
            &rows,
        ));
        if !n.counters.is_empty() {
            // Userspace datapath: traffic, and every drop by its cause.
            let c = &n.counters;
            let get = |k: &str| c.get(k).copied().unwrap_or(0);
            out.push_str(&format!(
                "\ndatapath: {} packets / {} bytes out, {} packets / {} bytes in; handshakes {} done, {} rejected",
                get("tx_packets"), get("tx_bytes"), get("rx_packets"), get("rx_bytes"),
                get("handshakes_completed"), get("handshakes_rejected")
            ));
            let drops: Vec<String> = c
                .iter()
                .filter(|(k, v)| k.starts_with("dropped_") && **v > 0)
                .map(|(k, v)| format!("{}={v}", k.trim_start_matches("dropped_")))
                .collect();
            out.push_str(&format!(
                "\ndropped:  {}",
                if drops.is_empty() {
                    "none".to_string()
                } else {
                    drops.join(" ")
                }
            ));
        }
    }
    out
}
