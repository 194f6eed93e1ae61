//! What the agent counts: the event counters and histograms the host owns
//! (`Metrics`), bumped where things happen, and where `--metrics-listen`
//! points. The page that exposes them is `metrics_page`.

use weft_metrics::{Counter, Family, Histogram};

pub(crate) struct Metrics {
    /// By network driver and result (`ok` / `error`).
    pub attach: Family<Histogram>,
    pub detach: Family<Histogram>,
    /// DNS queries answered, by network and how: `local` (a sandbox name),
    /// `forwarded` (answered by an upstream), `refused`, `nxdomain`,
    /// `failed` (no upstream answered).
    pub dns_queries: Family<Counter>,
    /// By `local` / `forwarded`.
    pub dns_latency: Family<Histogram>,
    /// By result (`ok` / `error`).
    pub lease_renewals: Family<Counter>,
    /// By pass: `startup` (the host's records against the kernel) and
    /// `cluster` (etcd's state against this host).
    pub reconcile: Family<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            attach: Family::latencies(&["driver", "result"]),
            detach: Family::latencies(&["driver", "result"]),
            dns_queries: Family::counters(&["network", "answer"]),
            dns_latency: Family::latencies(&["answer"]),
            lease_renewals: Family::counters(&["result"]),
            reconcile: Family::latencies(&["pass"]),
        }
    }
}

pub(crate) fn result_label<T, E>(r: &std::result::Result<T, E>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "error"
    }
}

/// The page: every family, then the levels read now. Blocking (netlink).
/// Where `--metrics-listen` points: a TCP address or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/weft/metrics.sock".into());
            }
            return Ok(MetricsListen::Unix(path.into()));
        }
        s.parse().map(MetricsListen::Tcp).map_err(|_| {
            format!("{s:?} is neither ADDRESS:PORT (e.g. 127.0.0.1:9178) nor unix:PATH")
        })
    }
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "{a}"),
            MetricsListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MetricsListen;

    #[test]
    fn listen_addresses_parse_or_say_what_is_expected() {
        assert_eq!(
            "127.0.0.1:9178".parse::<MetricsListen>(),
            Ok(MetricsListen::Tcp("127.0.0.1:9178".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/weft/metrics.sock".parse::<MetricsListen>(),
            Ok(MetricsListen::Unix("/run/weft/metrics.sock".into()))
        );
        let e = "9178".parse::<MetricsListen>().unwrap_err();
        assert!(
            e.contains("127.0.0.1:9178") && e.contains("unix:PATH"),
            "{e}"
        );
        assert!("unix:".parse::<MetricsListen>().is_err());
    }
}
