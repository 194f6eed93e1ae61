//! `weft explain`: asks the agent to walk a packet's path and prints it as
//! text, JSON, or a picture (Graphviz).

use crate::sandbox_cmds::Context;
use crate::{Failure, Format};
use clap::Args;
use std::io::Write;
use std::process::{Command, Stdio};
use weft_model::explain::{ExplainRequest, Explanation};
use weft_model::topology::{render_dot, Topology};

#[derive(Args)]
pub struct ExplainArgs {
    /// Where the packet starts: a sandbox (name or id), an address, or `host`
    src: String,
    /// Where it goes: a sandbox, an address (of this host's sandboxes, of
    /// another host's, or outside), or `host`
    dst: String,
    /// tcp, udp or icmp
    #[arg(long, default_value = "icmp", value_parser = ["tcp", "udp", "icmp"])]
    proto: String,
    /// Destination port (tcp/udp); needed for a published port
    #[arg(long)]
    port: Option<u16>,
    /// Also send one real packet (ping, a TCP connect or a UDP datagram)
    /// and show where this host's netfilter saw it (nftables tracing),
    /// beside the prediction
    #[arg(long)]
    probe: bool,
}

pub fn explain(ctx: &Context, a: ExplainArgs) -> Result<i32, Failure> {
    let req = ExplainRequest {
        src: a.src,
        dst: a.dst,
        proto: a.proto,
        port: a.port,
        probe: a.probe,
    };
    let e: Explanation = ctx.client.post("/v1/explain", &req)?;
    match ctx.format {
        Format::Table => crate::output::print_line(e.render_text().trim_end()),
        Format::Json => crate::output::emit(Format::Json, &e, String::new),
        Format::Dot | Format::Svg | Format::Png => picture(ctx.format, &e.render_dot())?,
    }
    Ok(0)
}

/// Graphviz's `dot -T<kind>` over the DOT text.
pub fn render(dot: &str, kind: &str) -> Result<Vec<u8>, Failure> {
    let mut child = Command::new("dot")
        .arg(format!("-T{kind}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure {
            code: 1,
            message: format!(
                "cannot run Graphviz's dot ({e}): apt-get install graphviz, or use --format dot and render it elsewhere"
            ),
        })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(dot.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(Failure {
            code: 1,
            message: format!(
                "dot -T{kind} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

#[derive(Args)]
pub struct TopologyArgs {
    /// Highlight the path of `weft explain SRC DST`
    #[arg(long, num_args = 2, value_names = ["SRC", "DST"])]
    path: Option<Vec<String>>,
}

/// `weft topology`: this host's bridges, sandboxes and tunnels; as text,
/// JSON or a picture.
pub fn topology(ctx: &Context, a: TopologyArgs) -> Result<i32, Failure> {
    let t: Topology = ctx.client.get("/v1/topology")?;
    let path: Option<Explanation> = match &a.path {
        Some(p) => Some(ctx.client.post(
            "/v1/explain",
            &ExplainRequest {
                src: p[0].clone(),
                dst: p[1].clone(),
                proto: "icmp".into(),
                port: None,
                probe: false,
            },
        )?),
        None => None,
    };
    let hosts = [t];
    match ctx.format {
        Format::Table => crate::output::print_line(&describe(&hosts[0])),
        Format::Json => crate::output::emit(Format::Json, &hosts[0], String::new),
        _ => picture(ctx.format, &render_dot(&hosts, path.as_ref()))?,
    }
    Ok(0)
}

/// Prints DOT as it is, or rendered by Graphviz as SVG or PNG.
pub fn picture(format: Format, dot: &str) -> Result<(), Failure> {
    let kind = match format {
        Format::Svg => "svg",
        Format::Png => "png",
        _ => {
            crate::output::print_line(dot.trim_end());
            return Ok(());
        }
    };
    let bytes = render(dot, kind)?;
    let mut out = std::io::stdout().lock();
    if let Err(err) = out.write_all(&bytes).and_then(|()| out.flush()) {
        if err.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(err.into());
        }
    }
    Ok(())
}

fn describe(t: &Topology) -> String {
    let mut out = match t.public_ip {
        Some(ip) => format!("{} ({ip})", t.host),
        None => t.host.clone(),
    };
    for b in &t.bridges {
        out.push_str(&format!(
            "\n  bridge {} (network {}, {} gw {}){}",
            b.name,
            b.network,
            b.subnet,
            b.gateway,
            if b.present { "" } else { "  MISSING" }
        ));
        for s in t.sandboxes.iter().filter(|s| s.network == b.network) {
            out.push_str(&format!(
                "\n    {} {} via {}{}",
                s.name,
                s.ip,
                s.host_end.as_deref().unwrap_or("macvlan"),
                if s.plugged { "" } else { "  NOT ON THE BRIDGE" }
            ));
        }
        for tu in t.tunnels.iter().filter(|x| x.network == b.network) {
            let peers: Vec<String> = tu
                .peers
                .iter()
                .map(|p| {
                    format!(
                        "{} {} ({}){}",
                        p.node,
                        p.public_ip,
                        p.subnet,
                        if p.programmed { "" } else { " NOT PROGRAMMED" }
                    )
                })
                .collect();
            out.push_str(&format!(
                "\n    {} {} -> {}",
                tu.backend,
                tu.device.as_deref().unwrap_or("routes"),
                if peers.is_empty() {
                    "no peers".into()
                } else {
                    peers.join(", ")
                }
            ));
        }
    }
    out
}
