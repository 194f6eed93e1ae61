//! Named network namespaces made with `ip netns add`, deleted on drop, and
//! commands that run inside one.

use crate::sys::{bail, run, run_ok, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Every namespace the benchmark makes has a name with this prefix.
pub const PREFIX: &str = "wftb";

const IP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    /// `ip netns add NAME`; the name must start with [`PREFIX`].
    pub fn add(name: &str) -> Result<Netns> {
        if !name.starts_with(PREFIX) {
            return bail(format!(
                "refusing to make namespace {name:?}: names must start with {PREFIX:?}"
            ));
        }
        run_ok(Command::new("ip").args(["netns", "add", name]), IP_TIMEOUT)
            .context(format_args!("creating network namespace {name}"))?;
        let ns = Netns {
            name: name.to_string(),
            deleted: false,
        };
        // Loopback up, so the namespace behaves like a fresh host would.
        let mut lo = ns.command("ip")?;
        lo.args(["link", "set", "lo", "up"]);
        run_ok(&mut lo, IP_TIMEOUT).context(format_args!("bringing lo up in {name}"))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Makes `cmd` run inside this namespace: the child calls setns(2) on
    /// the namespace file between fork and exec. This is what
    /// `nsenter --net=/run/netns/NAME` does (only the network namespace
    /// changes; mount namespace and /sys stay the host's), without an extra
    /// exec that would be counted in the measured times.
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let file =
            File::open(self.path()).context(format_args!("opening {}", self.path().display()))?;
        // The closure owns the file, so the descriptor stays open as long as
        // the Command lives; O_CLOEXEC closes it in the child at exec.
        // SAFETY: setns is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// A Command for `program` that will run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd)?;
        Ok(cmd)
    }

    /// `ip netns del`, reporting failure. Idempotent.
    pub fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        let out = run(
            Command::new("ip").args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        )?;
        if !out.status.success() && self.path().exists() {
            return bail(format!(
                "`ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("warning: {e}");
        }
    }
}

/// Namespaces in /run/netns whose names start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

impl Netns {
    /// `ip ARGS…` inside this namespace (unmeasured); failure is an error.
    pub fn ip(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run_ok(&mut cmd, IP_TIMEOUT)
    }
}

/// A veth pair between two of our namespaces, `a_if` in `a` with address
/// `a_addr` (CIDR) and `b_if` in `b` with `b_addr`, both up. It goes away
/// with either namespace; nothing of it is ever in the machine's own.
pub fn veth_pair(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    let what = || {
        format!(
            "making veth pair {a_if} ({}) - {b_if} ({})",
            a.name(),
            b.name()
        )
    };
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
    .context(what())?;
    a.ip(&["addr", "add", a_addr, "dev", a_if])
        .context(what())?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])
        .context(what())?;
    a.ip(&["link", "set", a_if, "up"]).context(what())?;
    b.ip(&["link", "set", b_if, "up"]).context(what())?;
    Ok(())
}
