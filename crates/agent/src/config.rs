use ipnet::Ipv4Net;
use std::path::PathBuf;

/// Where dockerd looks for plugin sockets; `weft` is the driver's name.
pub const DOCKER_PLUGIN_SOCKET: &str = "/run/docker/plugins/weft.sock";
/// dockerd's API socket, where the Docker plugin asks dockerd about its
/// networks and containers.
pub const DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// `--docker-host`: dockerd's API on a unix socket (`unix:///PATH`, as
/// Docker writes it), and nothing else: TCP would need TLS and
/// credentials, and the plugin runs beside dockerd anyway.
pub fn parse_docker_host(s: &str) -> Result<PathBuf, String> {
    let path = s
        .strip_prefix("unix://")
        .ok_or_else(|| {
            format!("{s:?}: weft talks to dockerd on its unix socket only; give unix:///PATH, e.g. {DOCKER_HOST}")
        })?;
    if !path.starts_with('/') {
        return Err(format!(
            "{s:?}: the socket's path must be absolute, as in {DOCKER_HOST}"
        ));
    }
    Ok(PathBuf::from(path))
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Runtime state: socket, namespace files, sandbox records, logs.
    pub state_dir: PathBuf,
    /// Persistent data: the network store.
    pub data_dir: PathBuf,
    /// Subnet of the default `bridge` network; picked from a pool when absent.
    pub bridge_subnet: Option<Ipv4Net>,
    /// Namespaces (with a veth pair each) kept ready for the next attaches.
    pub netns_pool: usize,
    /// The host's resolver configuration: upstream servers, search domains.
    pub resolv_conf: PathBuf,
    /// Set when the host is part of a cluster (etcd); single-host otherwise.
    pub cluster: Option<ClusterConfig>,
    /// Where to serve Docker's network and IPAM plugin protocols (the
    /// socket's name is the driver's name); not served when absent.
    pub docker_plugin: Option<PathBuf>,
    /// dockerd's API socket (used only with `docker_plugin`): global
    /// networks are made Docker networks there, and containers' names read.
    pub docker_host: PathBuf,
    /// Where to serve Prometheus metrics (read-only); not served when absent.
    pub metrics_listen: Option<crate::metrics::MetricsListen>,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub etcd_endpoints: Vec<String>,
    /// Every key weft writes lives under this prefix.
    pub etcd_prefix: String,
    /// TLS files and etcd user for the connection (all empty: plain http).
    pub etcd_security: weft_store::EtcdSecurity,
    /// Where other hosts reach this one; found from `iface` or the default
    /// route when absent.
    pub public_ip: Option<std::net::Ipv4Addr>,
    pub iface: Option<String>,
    /// This host's name in leases and `weft status` (default: hostname).
    pub node_name: String,
    /// TTL of the etcd lease behind this host's subnet leases; renewed every third of it.
    pub lease_ttl: std::time::Duration,
}

impl AgentConfig {
    pub fn socket_path(&self) -> PathBuf {
        self.state_dir.join("weft.sock")
    }
    pub fn netns_dir(&self) -> PathBuf {
        self.state_dir.join("netns")
    }
    pub fn runtime_store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }
    pub fn resolv_dir(&self) -> PathBuf {
        self.state_dir.join("resolv")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join("agent.lock")
    }
    pub fn network_db(&self) -> PathBuf {
        self.data_dir.join("networks.redb")
    }
    /// The host's identity and its last leases, kept across restarts.
    pub fn cluster_file(&self) -> PathBuf {
        self.data_dir.join("cluster.json")
    }
    /// flannel's subnet file for an overlay network.
    pub fn subnet_file(&self, network: &str) -> PathBuf {
        self.state_dir.join(format!("{network}.env"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_is_a_unix_socket() {
        assert_eq!(
            parse_docker_host(DOCKER_HOST).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert!(parse_docker_host("tcp://127.0.0.1:2375")
            .unwrap_err()
            .contains("unix socket only"));
        assert!(parse_docker_host("unix://docker.sock")
            .unwrap_err()
            .contains("absolute"));
        assert!(parse_docker_host("/var/run/docker.sock").is_err());
    }
}
