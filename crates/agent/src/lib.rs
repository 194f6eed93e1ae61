//! The per-host daemon. The store holds desired state; the agent makes the
//! kernel match it on start and on every change, and serves the local API on
//! a root-only unix socket.

mod api;
mod app;
mod attach;
mod backend;
mod cluster;
mod cni;
pub mod config;
mod dns;
mod docker;
mod driver;
mod error;
mod explain;
mod expose;
mod firewall;
mod host;
mod ids;
mod metrics;
mod metrics_page;
mod netns_pool;
mod networks;
mod overlay;
mod probe;
mod reconcile;
pub mod reset;
mod sandboxes;
mod server;

pub use app::App;
pub use cluster::Cluster;
pub use config::{AgentConfig, ClusterConfig};
pub use error::AgentError;
pub use host::Host;
pub use metrics::MetricsListen;
pub use reconcile::start;
pub use server::serve;
pub use weft_store::EtcdSecurity;
