//! The benchmark's network namespaces: weft-testkit's [`Netns`] (deleted
//! on drop, commands inside), with names that start with [`PREFIX`] so
//! that a stale one is recognised as the benchmark's (bench/src/hostcheck.rs).
//!
//! Measured commands enter a namespace with [`Netns::entered`] (setns(2)
//! in the child, what `nsenter --net` does, without an extra exec that
//! would be counted in the measured times).

use crate::sys::{bail, Result};
pub use weft_testkit::{list_with_prefix, veth_pair, Netns};

/// Every namespace the benchmark makes has a name with this prefix.
pub const PREFIX: &str = "wftb";

/// `ip netns add NAME` (lo up); the name must start with [`PREFIX`].
pub fn add(name: &str) -> Result<Netns> {
    if !name.starts_with(PREFIX) {
        return bail(format!(
            "refusing to make namespace {name:?}: names must start with {PREFIX:?}"
        ));
    }
    Ok(Netns::add(name)?)
}
