//! The agent as the API sees it: the host, and the cluster when the agent
//! is part of one. The cluster points at the host (it makes the host match
//! etcd); the host knows nothing of the cluster.

use crate::cluster::Cluster;
use crate::host::Host;
use std::sync::Arc;

#[derive(Clone)]
pub struct App {
    pub host: Host,
    pub cluster: Option<Arc<Cluster>>,
    /// With `--docker-plugin`: what the plugin knows of the local dockerd.
    pub(crate) docker: Option<crate::docker::DockerStatus>,
}
