//! An "outside" machine for a simulated host: a namespace of its own joined
//! to the host's namespace (the weft agent's or dockerd's) by a veth pair,
//! host 203.0.113.1/24, outside 203.0.113.2/24 (TEST-NET-3, never routed on
//! real networks). Traffic from the outside reaches the host's published
//! ports at 203.0.113.1, or the sandboxes directly through routes added with
//! [`Outside::route_via_host`].

use crate::netns::{self, Netns};
use crate::sys::{Context, Result};
pub use weft_testkit::outside::{HOST_ADDR, OUTSIDE_ADDR};

/// The host's end of the pair (in the host's namespace).
pub const HOST_IF: &str = "wftbh0";
/// The outside's end.
pub const OUTSIDE_IF: &str = "wftbo0";

/// The outside namespace; dropping it deletes the namespace, and with it
/// the veth pair (both ends) and its routes.
pub struct Outside {
    ns: Netns,
}

impl Outside {
    /// Makes namespace `name` (starting with `wftb`) and the veth pair to `host`.
    pub fn attach(host: &Netns, name: &str) -> Result<Outside> {
        let ns = netns::add(name)?;
        weft_testkit::outside::join(host, HOST_IF, &ns, OUTSIDE_IF)?;
        Ok(Outside { ns })
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Route to `subnet` (CIDR) through the host's end of the pair, so the
    /// outside reaches sandboxes directly (routed by the host, no NAT).
    pub fn route_via_host(&self, subnet: &str) -> Result<()> {
        self.ns
            .try_ip(&["route", "add", subnet, "via", &HOST_ADDR.to_string()])
            .context(format_args!(
                "adding route {subnet} via {HOST_ADDR} in {}",
                self.ns.name()
            ))?;
        Ok(())
    }
}
