//! Starting a process inside a sandbox's network namespace. The namespace is
//! entered between fork and exec, in the child only: the CLI itself never
//! changes namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Finds `program` as the shell would: a path as given, else in PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
}

pub struct Spec<'a> {
    pub argv: &'a [String],
    pub netns: Option<&'a File>,
    /// Mounted over /etc/resolv.conf in a mount namespace of the command's own.
    pub resolv_conf: Option<&'a str>,
    /// Start a new session, detached from the terminal, output to this file.
    pub detach_log: Option<File>,
    /// `-e KEY=VALUE`, added to the environment the command inherits.
    pub env: &'a [(String, String)],
    /// A UTS namespace of the command's own, with this host name (`--hostname`).
    pub hostname: Option<&'a str>,
    /// A UTS namespace to join (`exec` into a sandbox with a host name).
    pub uts: Option<&'a File>,
    /// Keep stdin (`-i`); otherwise the command reads /dev/null, as Docker's.
    pub interactive: bool,
}

pub fn spawn(spec: Spec) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..]);
    let ns_fd = spec.netns.map(|f| f.as_raw_fd());
    let uts_fd = spec.uts.map(|f| f.as_raw_fd());
    let detach = spec.detach_log.is_some();
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if !spec.interactive {
        cmd.stdin(Stdio::null());
    }
    let hostname = spec.hostname.map(|h| h.as_bytes().to_vec());
    // Everything the child needs is allocated here, before fork.
    let resolv = spec
        .resolv_conf
        .map(|p| std::ffi::CString::new(p).map_err(|_| std::io::Error::other("NUL in path")))
        .transpose()?;
    let (root, target) = (c"/", c"/etc/resolv.conf");
    if let Some(log) = spec.detach_log {
        cmd.stdin(Stdio::null());
        cmd.stdout(log.try_clone()?);
        cmd.stderr(log);
    }
    // SAFETY: only async-signal-safe calls (setns, setsid, unshare,
    // sethostname, mount, signal) between fork and exec, on memory
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = uts_fd {
                if libc::setns(fd, libc::CLONE_NEWUTS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(h) = &hostname {
                if libc::unshare(libc::CLONE_NEWUTS) != 0
                    || libc::sethostname(h.as_ptr().cast(), h.len()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if detach && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(src) = &resolv {
                // A private view of /etc/resolv.conf: a mount namespace of the
                // command's own, where mounts no longer propagate back.
                let none = std::ptr::null();
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        none,
                        root.as_ptr(),
                        none,
                        libc::MS_SLAVE | libc::MS_REC,
                        none.cast(),
                    ) != 0
                    || libc::mount(
                        src.as_ptr(),
                        target.as_ptr(),
                        none,
                        libc::MS_BIND,
                        none.cast(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Exit code as a shell reports it: the code, or 128 + the signal.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// While the CLI waits for a foreground command, Ctrl-C and Ctrl-\ go to the
/// command (same process group); the CLI stays to clean up after it.
pub fn ignore_terminal_signals() {
    // SAFETY: SIG_IGN installs no handler, so no code of ours runs in
    // signal context; signal() touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}

/// `weft run -d`: starts the command under a waiter, so that whoever is its
/// parent reaps it and records how it ended (for `ps -a`). A forked copy of
/// the CLI makes a session of its own, puts its stdio on /dev/null (so
/// nobody reading the CLI's output waits for the command), starts the
/// command as its child, sends the pid back through a pipe, and then execs
/// `weft reap-child`, which keeps the child (exec keeps children), waits
/// for it and writes its exit code to `exit_file`. The waiter is owned by
/// the command: it ends when the command does. Returns the command's pid.
pub fn spawn_with_waiter(spec: Spec, exit_file: &Path) -> std::io::Result<(u32, Option<u64>)> {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    let exe = std::env::current_exe()?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made by pipe2 and are ours alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: `weft run` starts no threads (no runtime, blocking client),
    // so the forked child is a whole copy and may allocate and spawn.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(r);
            let mut w = File::from(w);
            // SAFETY: setsid and dup2 take plain integers; the fds are valid.
            unsafe {
                libc::setsid();
                if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
                    for fd in 0..3 {
                        libc::dup2(null.as_raw_fd(), fd);
                    }
                }
            }
            let code = match spawn(spec) {
                Ok(child) => {
                    // Read before anything can reap it: the command is ours
                    // until we wait, even if it has already ended.
                    let start = weft_kernel::process::identify(child.id() as i32)
                        .map_or(0, |p| p.start_time);
                    let _ = write!(w, "ok {} {start}", child.id());
                    drop(w);
                    let err = Command::new(&exe)
                        .arg("reap-child")
                        .arg(child.id().to_string())
                        .arg(exit_file)
                        .exec();
                    // Only reached when exec failed: wait here instead.
                    let _ = err;
                    let mut child = child;
                    match child.wait() {
                        Ok(st) => {
                            let _ = std::fs::write(exit_file, format!("{}\n", exit_code(st)));
                            0
                        }
                        Err(_) => 1,
                    }
                }
                Err(e) => {
                    let _ = write!(w, "err {e}");
                    1
                }
            };
            // SAFETY: ends the forked copy without running the parent's
            // destructors or atexit handlers a second time.
            unsafe { libc::_exit(code) }
        }
        _ => {
            drop(w);
            let mut said = String::new();
            File::from(r).read_to_string(&mut said)?;
            match said.split_once(' ') {
                Some(("ok", rest)) => {
                    let mut it = rest.split(' ');
                    let pid = it.next().and_then(|p| p.parse().ok());
                    let start = it
                        .next()
                        .and_then(|s| s.parse::<u64>().ok())
                        .filter(|s| *s > 0);
                    pid.map(|p| (p, start))
                        .ok_or_else(|| std::io::Error::other(format!("the waiter said {said:?}")))
                }
                Some(("err", e)) => Err(std::io::Error::other(e.to_string())),
                _ => Err(std::io::Error::other(
                    "the waiter ended before starting the command",
                )),
            }
        }
    }
}

/// `weft reap-child PID FILE` (what the waiter execs): waits for its child
/// PID and writes its exit code, as a shell reports it, to FILE.
pub fn reap_child(pid: i32, exit_file: &Path) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid writes the status into the integer it is given.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid {
        return 1;
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    match std::fs::write(exit_file, format!("{code}\n")) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}
