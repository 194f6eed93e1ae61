//! Every change weft makes to the kernel goes through this crate: network
//! namespaces, links, addresses and routes (netlink, never `ip`), sysctls,
//! nftables (atomic `nft -f` batches of weft's own table) and processes.

pub mod connect_redirect;
pub mod error;
pub mod lookup;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod port_hold;
pub mod process;
pub mod routes;
pub mod sysctl;
pub mod vxlan;

pub use error::KernelError;
pub use netlink::{Link, LinkStats, Netlink};
pub use netns::Netns;
pub use routes::{Route, OVERLAY_ROUTE_PROTOCOL};
pub use vxlan::VxlanSpec;
