//! `weft explain --probe`: one real packet, sent from the source and
//! followed through this host's netfilter hooks with nftables tracing.
//!
//! A table of its own (`inet wftprobe<pid>` and `bridge wftprobe<pid>`,
//! owned by name, removed by a drop guard whatever happens) marks packets
//! between the two addresses with `meta nftrace set 1` at the earliest
//! priority of each hook, so every chain they then pass (weft's among them)
//! reports to `nft monitor trace`, which runs for the duration of the probe
//! and is killed and reaped by its own guard.

use crate::error::{AgentError, Result};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use weft_model::explain::Probe;

pub(crate) enum From {
    Host,
    /// A sandbox's namespace file, and its address.
    Netns(PathBuf, Ipv4Addr),
}

/// The probe's tables: removed on drop.
struct Tables(String);

impl Tables {
    /// Marks packets between `a` and `b`; with no `a` (the host sends),
    /// every packet to or from `b`.
    fn add(name: &str, a: Option<Ipv4Addr>, b: Ipv4Addr) -> Result<Tables> {
        let m = match a {
            Some(a) => {
                format!("ip saddr {{ {a}, {b} }} ip daddr {{ {a}, {b} }} meta nftrace set 1")
            }
            None => format!(
                "ip saddr . ip daddr {{ 0.0.0.0/0 . {b}, {b} . 0.0.0.0/0 }} meta nftrace set 1"
            ),
        };
        let batch = format!(
            "table inet {name} {{\n\
             \tchain pre {{ type filter hook prerouting priority -400; {m}; }}\n\
             \tchain out {{ type filter hook output priority -400; {m}; }}\n\
             }}\n\
             table bridge {name} {{\n\
             \tchain pre {{ type filter hook prerouting priority -400; {m}; }}\n\
             }}\n"
        );
        weft_kernel::nft::apply(&batch)?;
        Ok(Tables(name.to_string()))
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        let _ = weft_kernel::nft::apply(&format!(
            "delete table inet {0}\ndelete table bridge {0}\n",
            self.0
        ));
    }
}

/// `nft monitor trace`, stopped and reaped on drop.
struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn probe(from: &From, to: Ipv4Addr, proto: &str, port: Option<u16>) -> Result<Probe> {
    let src = match from {
        From::Netns(_, ip) => Some(*ip),
        From::Host => None,
    };
    let name = format!("wftprobe{}", std::process::id());
    let _tables = Tables::add(&name, src, to)?;
    let mut monitor = Monitor(
        Command::new("nft")
            .args(["monitor", "trace"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(AgentError::io("run nft monitor trace"))?,
    );
    // The monitor subscribes right after it starts; nothing says when.
    std::thread::sleep(Duration::from_millis(300));
    let (sent, outcome, delivered) = send(from, to, proto, port)?;
    std::thread::sleep(Duration::from_millis(200));
    let _ = monitor.0.kill();
    let mut text = String::new();
    if let Some(mut out) = monitor.0.stdout.take() {
        let _ = out.read_to_string(&mut text);
    }
    Ok(Probe {
        sent,
        outcome,
        delivered,
        seen: condense(&text, &name),
    })
}

fn send(
    from: &From,
    to: Ipv4Addr,
    proto: &str,
    port: Option<u16>,
) -> Result<(String, String, Option<bool>)> {
    if proto == "icmp" {
        let mut cmd = match from {
            From::Host => Command::new("ping"),
            From::Netns(path, _) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", path.display())).arg("ping");
                c
            }
        };
        let out = cmd
            .args(["-c", "1", "-W", "1", &to.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(AgentError::io("run ping"))?;
        let ok = out.success();
        return Ok((
            format!("ping -c 1 -W 1 {to}"),
            if ok {
                "answered"
            } else {
                "no answer within 1 s"
            }
            .into(),
            Some(ok),
        ));
    }
    let port = port.ok_or_else(|| {
        AgentError::BadRequest(format!("--probe with --proto {proto} needs --port"))
    })?;
    let addr = SocketAddr::from((to, port));
    let tcp = proto == "tcp";
    let attempt =
        move || -> std::result::Result<(String, Option<bool>), weft_kernel::KernelError> {
            if tcp {
                Ok(
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        Ok(_) => ("connected".into(), Some(true)),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => (
                            "refused (RST: it arrived, nothing listens)".into(),
                            Some(true),
                        ),
                        Err(e) => (format!("no connection: {e}"), Some(false)),
                    },
                )
            } else {
                let s = UdpSocket::bind("0.0.0.0:0")
                    .map_err(|e| weft_kernel::KernelError::io("bind udp", e))?;
                s.send_to(b"weft explain probe", addr)
                    .map_err(|e| weft_kernel::KernelError::io("send udp", e))?;
                Ok(("sent (UDP: no answer expected)".into(), None))
            }
        };
    let (outcome, delivered) = match from {
        From::Host => attempt()?,
        From::Netns(path, _) => weft_kernel::Netns::open(path)?.run_in(attempt)?,
    };
    Ok((format!("{proto} to {addr}"), outcome, delivered))
}

/// Keeps, per traced packet, where it was (hook chain, interfaces) and the
/// verdicts of weft's own rules; leaves out the probe's own bookkeeping.
fn condense(trace: &str, probe_table: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for line in trace.lines() {
        let Some(rest) = line.strip_prefix("trace id ") else {
            continue;
        };
        // "<id> <family> <table> <chain> <event…>"
        let mut parts = rest.splitn(5, ' ');
        let (_id, family, table, chain, event) = match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(i), Some(f), Some(t), Some(c), Some(e)) => (i, f, t, c, e),
            _ => continue,
        };
        if let Some(pkt) = event.strip_prefix("packet: ") {
            if table != probe_table {
                continue;
            }
            let hook = match (family, chain) {
                ("bridge", _) => "bridge prerouting",
                (_, "pre") => "prerouting",
                (_, "out") => "output",
                _ => chain,
            };
            seen.push(format!("{hook}: {}", packet_summary(pkt)));
        } else if table != probe_table
            && (event.starts_with("rule ") || event.starts_with("verdict "))
        {
            seen.push(format!("{family} {table} {chain}: {}", event.trim()));
        }
    }
    seen
}

/// `iif "x" oif "y" … ip saddr A ip daddr B … icmp type echo-request` →
/// `in x, out y, A > B, icmp echo-request`.
fn packet_summary(p: &str) -> String {
    let words: Vec<&str> = p.split_whitespace().collect();
    let after = |key: &[&str]| {
        words
            .windows(key.len() + 1)
            .find(|w| w[..key.len()] == *key)
            .map(|w| w[key.len()].trim_matches('"').to_string())
    };
    let mut out = Vec::new();
    if let Some(i) = after(&["iif"]) {
        out.push(format!("in {i}"));
    }
    if let Some(o) = after(&["oif"]) {
        out.push(format!("out {o}"));
    }
    if let (Some(s), Some(d)) = (after(&["ip", "saddr"]), after(&["ip", "daddr"])) {
        out.push(format!("{s} > {d}"));
    }
    if let Some(t) = after(&["icmp", "type"]) {
        out.push(format!("icmp {t}"));
    } else if let Some(p) = after(&["ip", "protocol"]) {
        let port = after(&["tcp", "dport"]).or_else(|| after(&["udp", "dport"]));
        out.push(match port {
            Some(port) => format!("{p} dport {port}"),
            None => p,
        });
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_condensed_to_hooks_and_weft_verdicts() {
        let t = "trace id 1 inet wftprobe9 pre packet: iif \"wbr-a\" ether saddr 02:77 ip saddr 10.1.0.2 ip daddr 10.2.0.2 ip protocol icmp icmp type echo-request icmp code 0\n\
                 trace id 1 inet wftprobe9 pre rule ip saddr { 10.1.0.2, 10.2.0.2 } meta nftrace set 1 (verdict continue)\n\
                 trace id 1 inet wftprobe9 pre policy accept\n\
                 trace id 1 inet weft forward rule iifname @bridges oifname @bridges drop (verdict drop)\n";
        assert_eq!(
            condense(t, "wftprobe9"),
            vec![
                "prerouting: in wbr-a, 10.1.0.2 > 10.2.0.2, icmp echo-request".to_string(),
                "inet weft forward: rule iifname @bridges oifname @bridges drop (verdict drop)"
                    .to_string(),
            ]
        );
    }
}
