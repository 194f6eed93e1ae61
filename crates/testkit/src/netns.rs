//! Network namespaces made with `ip netns add`, deleted on drop, commands
//! and threads that run inside one, and veth pairs between two of them.

use crate::wait::run_within;
use crate::{unique, Error, Result, PREFIX};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Where `ip netns add` puts the namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// How long one `ip` call may take before it is killed and reported.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// A named network namespace of our own, with lo up. Dropping it deletes
/// it (and with it every link and route in it), pass or fail.
pub struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    /// A namespace with a unique name made from `prefix` (which starts
    /// with `wft`); panics if it cannot be made.
    pub fn new(prefix: &str) -> Netns {
        Netns::add(&unique(prefix)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The namespace `name`, which must start with `wft` and not exist yet.
    pub fn add(name: &str) -> Result<Netns> {
        if !name.starts_with(PREFIX) {
            return Err(Error(format!(
                "refusing to make namespace {name:?}: names must start with {PREFIX:?}"
            )));
        }
        helper(Command::new("ip").args(["netns", "add", name]))
            .map_err(|e| Error(format!("creating network namespace {name}: {e}")))?;
        let ns = Netns {
            name: name.to_string(),
            deleted: false,
        };
        // Loopback up, so the namespace behaves like a fresh host would.
        ns.try_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, /run/netns/NAME.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// The namespace file, opened.
    pub fn file(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()))
    }

    /// A command that runs `program` inside this namespace:
    /// `nsenter --net=/run/netns/NAME -- PROGRAM` (see [`command_in`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.path(), program)
    }

    /// Makes `cmd` enter this namespace by itself: the child calls setns(2)
    /// on the namespace file between fork and exec, which is what nsenter
    /// does, without the extra exec. For commands whose time is measured,
    /// and for commands that drop privileges in a later `pre_exec` (which
    /// then runs after the setns).
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let file = File::open(self.path())
            .map_err(|e| Error(format!("opening {}: {e}", self.path().display())))?;
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

    /// A Command for `program` that enters this namespace by itself (see
    /// [`Netns::enter`]).
    pub fn entered(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd)?;
        Ok(cmd)
    }

    /// Runs a shell script inside this namespace; panics with its output
    /// unless it succeeds, else returns its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.try_sh(script);
        assert!(
            out.status.success(),
            "in {}: `{script}` failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell script inside this namespace and returns its output,
    /// whatever its status.
    pub fn try_sh(&self, script: &str) -> Output {
        self.command("sh")
            .args(["-c", script])
            .output()
            .expect("running nsenter")
    }

    /// Runs `args[0]` with the rest as its arguments inside this namespace
    /// and returns its output, whatever its status.
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("a program to run");
        self.command(program)
            .args(rest)
            .output()
            .expect("running nsenter")
    }

    /// `ip -n NAME ARGS…`; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> Output {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ip -n NAME ARGS…`; a failure (or more than 30 s) is an error.
    pub fn try_ip(&self, args: &[&str]) -> Result<Output> {
        helper(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `f` on a thread that entered this namespace, and returns what
    /// it returns: sockets it opens stay in this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = self.file();
        let name = self.name.clone();
        std::thread::spawn(move || {
            // SAFETY: setns for this short-lived thread only, on a
            // descriptor we own.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {name}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// `ip netns del`, reporting failure. Idempotent; drop calls it too.
    pub fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        match helper(Command::new("ip").args(["netns", "del", &self.name])) {
            Err(e) if self.path().exists() => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("warning: {e}");
        }
    }
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Netns({})", self.name)
    }
}

/// A command that runs `program` inside the network namespace of the file
/// `netns` (ours, or one that weft or `weft lab` made):
/// `nsenter --net=NETNS -- PROGRAM`. Only the network namespace changes
/// (mount namespace and /sys stay the machine's, so namespace files that
/// agents bind-mount stay visible), and nsenter execs the program, so the
/// child's pid is the program's.
pub fn command_in(netns: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program);
    cmd
}

/// A plumbing command (`ip`): a process group of its own, so that a Ctrl-C
/// meant for a benchmark does not kill its cleanup; non-zero is an error.
fn helper(cmd: &mut Command) -> Result<Output> {
    cmd.process_group(0);
    let out = run_within(cmd, IP_TIMEOUT)?;
    if !out.status.success() {
        return Err(Error(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// A veth pair between two of our namespaces: `a_if` in `a` and `b_if` in
/// `b`, each with its address (CIDR) if given, both up. It is made in `a`
/// directly and goes away with either namespace; nothing of it is ever in
/// the machine's own.
pub fn veth_pair(
    a: &Netns,
    a_if: &str,
    a_addr: Option<&str>,
    b: &Netns,
    b_if: &str,
    b_addr: Option<&str>,
) -> Result<()> {
    let what = |e: Error| {
        Error(format!(
            "making veth pair {a_if} ({}) - {b_if} ({}): {e}",
            a.name(),
            b.name()
        ))
    };
    a.try_ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])
    .map_err(what)?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if let Some(addr) = addr {
            ns.try_ip(&["addr", "add", addr, "dev", ifname])
                .map_err(what)?;
        }
        ns.try_ip(&["link", "set", ifname, "up"]).map_err(what)?;
    }
    Ok(())
}

/// An "outside" network behind a host: a namespace joined to the host's
/// by a veth pair, the host at 203.0.113.1/24 and the outside at
/// 203.0.113.2/24 (TEST-NET-3, never routed on real networks), with no
/// route back to anything behind the host unless the caller adds one.
pub mod outside {
    use super::{veth_pair, Netns};
    use crate::Result;
    use std::net::Ipv4Addr;

    pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    pub const PREFIX_LEN: u8 = 24;

    /// Joins `outside` to `host`: `host_if` (in `host`) at [`HOST_ADDR`],
    /// `outside_if` (in `outside`) at [`OUTSIDE_ADDR`].
    pub fn join(host: &Netns, host_if: &str, outside: &Netns, outside_if: &str) -> Result<()> {
        veth_pair(
            host,
            host_if,
            Some(&format!("{HOST_ADDR}/{PREFIX_LEN}")),
            outside,
            outside_if,
            Some(&format!("{OUTSIDE_ADDR}/{PREFIX_LEN}")),
        )
    }
}

/// Namespaces in /run/netns whose names start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}
