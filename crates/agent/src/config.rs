use ipnet::Ipv4Net;
use std::path::PathBuf;

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
}
