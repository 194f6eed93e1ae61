//! `weft explain`: asks the agent to walk a packet's path and prints it as
//! text, JSON, or a picture (Graphviz).

use crate::sandbox_cmds::Context;
use crate::{Failure, Format};
use clap::Args;
use std::io::Write;
use std::process::{Command, Stdio};
use weft_model::explain::{ExplainRequest, Explanation};

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
        Format::Dot => crate::output::print_line(e.render_dot().trim_end()),
        Format::Svg | Format::Png => {
            let kind = if ctx.format == Format::Svg {
                "svg"
            } else {
                "png"
            };
            let picture = render(&e.render_dot(), kind)?;
            let mut out = std::io::stdout().lock();
            if let Err(err) = out.write_all(&picture).and_then(|()| out.flush()) {
                if err.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(err.into());
                }
            }
        }
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
