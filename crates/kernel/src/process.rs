//! Processes that sandboxes run: identity that survives pid reuse, signals
//! through pidfds, and waiting for a process that is not our child.

use crate::error::{KernelError, Result};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use weft_model::ProcessRef;

/// Start time of `pid` in clock ticks since boot, and whether it is a zombie.
fn stat(pid: i32) -> Option<(u64, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, *state == "Z" || *state == "X"))
}

/// Identifies a running process by pid and start time.
pub fn identify(pid: i32) -> Option<ProcessRef> {
    stat(pid).map(|(start_time, _)| ProcessRef { pid, start_time })
}

/// Whether the very process `p` still runs (not exited, not a reused pid).
pub fn is_alive(p: &ProcessRef) -> bool {
    matches!(stat(p.pid), Some((start, zombie)) if start == p.start_time && !zombie)
}

/// A pidfd for `p`, if that process still runs.
pub fn pidfd(p: &ProcessRef) -> Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open takes two integers and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(None)
        } else {
            Err(KernelError::io(format!("pidfd_open {}", p.pid), e))
        };
    }
    // SAFETY: fd >= 0 is a descriptor pidfd_open just returned: open, and
    // owned by nothing else, so the OwnedFd is its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Checked after opening: the fd now pins this pid, so a match is the same process.
    Ok(is_alive(p).then_some(fd))
}

/// Sends `signal` through a pidfd (no risk of hitting a reused pid).
pub fn signal(fd: &OwnedFd, signal: i32) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: integers only (the info pointer is null, passed as 0); the
    // descriptor is borrowed from `fd`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            0usize,
            0u32,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(KernelError::io("pidfd_send_signal", e));
    }
    Ok(())
}

/// Signals the process and, if it leads its own process group (as `weft run
/// -d` makes it), every process of that group: the shell's background jobs
/// go with the shell, as a container's processes go with the container.
pub fn signal_group(p: &ProcessRef, fd: &OwnedFd, sig: i32) -> Result<()> {
    // The group first: once the leader is signalled its parent may reap it
    // at once, and asking for its group afterwards would find nothing,
    // leaving the rest of the group running. While the leader exists (not
    // yet reaped: `fd` still reaches it), its pid is not free, so a group
    // with this id is the one it leads.
    // SAFETY: getpgid and kill take integers and touch no memory of ours.
    if reaches(fd) && unsafe { libc::getpgid(p.pid) } == p.pid {
        // SAFETY: as above; -pid names the process group checked just now.
        unsafe { libc::kill(-p.pid, sig) };
    }
    signal(fd, sig)
}

/// Whether the process behind `fd` still exists (running or a zombie).
fn reaches(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: integers only (signal 0 checks, sends nothing; the info
    // pointer is null); the descriptor is borrowed from `fd`.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), 0, 0usize, 0u32) };
    rc == 0
}

/// Waits until the process behind `fd` exits or `timeout_ms` passes; true if it exited.
pub fn wait_exit(fd: &OwnedFd, timeout_ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid, initialised pollfd that lives across
        // the call, and nfds is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return rc > 0;
    }
}
