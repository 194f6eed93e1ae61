//! Pure types and rules of weft. Nothing here touches the kernel, the disk or
//! the network, so everything can be unit-tested in isolation.

pub mod api;
pub mod blocks;
pub mod explain;
pub mod http;
pub mod ipam;
pub mod keys;
pub mod names;
pub mod network;
pub mod nft;
pub mod overlay;
pub mod ports;
pub mod sandbox;
pub mod subnet;
pub mod topology;

pub use ipam::{AddressPool, IpamError};
pub use network::{Driver, Network, NetworkSpec};
pub use overlay::{BackendKind, Lease, Overlay};
pub use ports::{HostPorts, PortMapping, PortRequest, Protocol};
pub use sandbox::{Attachment, Endpoint, NetMode, NetRequest, ProcessRef, Published, Sandbox};
