//! The test kit of weft: what the end-to-end tests (tests/), the
//! benchmarks (bench/) and the tunnel's namespace tests share.
//!
//! - [`unique`]: names that start with `wft` and are unique across
//!   parallel tests and processes.
//! - [`Netns`]: a network namespace, deleted when dropped (pass or fail),
//!   commands run inside it, and [`veth_pair`]s between two of them.
//! - [`eventually`] and [`output_within`]: waiting with a deadline.
//! - [`weft_bin`]: the weft binary of this workspace.
//! - [`host_ifname`]: the host end of an endpoint, the one place tests read it.
//!
//! Nothing here touches the machine's own network: links are made inside
//! namespaces the kit created (`ip -n NAME`), and commands enter a
//! namespace with `nsenter --net=/run/netns/NAME` (or setns(2) in the
//! child), never `ip netns exec`, which would give them a mount namespace
//! of their own where /sys and the agents' namespace files look different.

mod netns;
mod wait;

pub use netns::{command_in, list_with_prefix, outside, veth_pair, Netns, NETNS_DIR};
pub use wait::{eventually, eventually_every, output_within, run_within, Check};

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};

/// Every name the kit makes (namespaces, links, directories) starts with this.
pub const PREFIX: &str = "wft";

/// An error of a kit operation, as a message for a person.
#[derive(Clone, PartialEq, Eq)]
pub struct Error(pub String);

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `prefix` and a suffix unique across parallel tests and processes (the
/// pid and a counter, in hex), short enough for an interface name when
/// the prefix is. The prefix must start with `wft`.
pub fn unique(prefix: &str) -> String {
    assert!(
        prefix.starts_with(PREFIX),
        "test names start with {PREFIX:?}, not {prefix:?}"
    );
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id() & 0xfffff)
}

/// The weft binary built with this workspace: `$WEFT_BIN` if set, else the
/// `weft` in the target directory of the running executable
/// (target/PROFILE/deps/TEST or target/PROFILE/BIN next to target/PROFILE/weft).
/// Panics, saying how to build it, when it is missing.
pub fn weft_bin() -> PathBuf {
    find_weft_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// [`weft_bin`], as a result.
pub fn find_weft_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| Error(format!("own executable: {e}")))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| Error(format!("{} has no directory", exe.display())))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let bin = dir.join("weft");
    if !bin.exists() {
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let release = if profile == "release" {
            " --release"
        } else {
            ""
        };
        return Err(Error(format!(
            "{} is missing: build it with `cargo build{release} -p weft` (or set WEFT_BIN)",
            bin.display()
        )));
    }
    Ok(bin)
}

/// The host end of `ep` (the veth peer in the host's namespace), if it has
/// one. Tests read it only through this function: how an endpoint records
/// its kind and host interface is weft-model's business.
pub fn host_ifname(ep: &weft_model::Endpoint) -> Option<String> {
    ep.host_ifname().map(String::from)
}

/// Status, stdout and stderr of an output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory of the caller's own (`/dev/shm/wft…`), removed with
/// everything in it on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A fresh `/dev/shm/PREFIX…` (unique name; the prefix starts with `wft`).
    pub fn new(prefix: &str) -> ScratchDir {
        let path = PathBuf::from("/dev/shm").join(unique(prefix));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
