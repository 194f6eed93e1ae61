//! Small system helpers: errors, interruption, running commands, processes,
//! mounts and directories. Everything here is about cleaning up reliably.

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// An error message meant for a person; context is prepended as it travels up.
pub struct Error(String);

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(msg: impl Into<String>) -> Error {
        Error(msg.into())
    }
}

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

impl From<weft_testkit::Error> for Error {
    fn from(e: weft_testkit::Error) -> Error {
        Error(e.0)
    }
}

pub fn bail<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::new(msg))
}

pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error(format!("{what}: {e}")))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error(what.to_string()))
    }
}

// ---------------------------------------------------------------------------
// Interruption (Ctrl-C, SIGTERM, SIGHUP)

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag that the measuring loops
/// check, so that an interruption unwinds through the cleanup guards instead
/// of killing the process with namespaces and daemons left behind.
pub fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return bail(format!(
                "installing the handler of signal {sig}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail("interrupted")
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Running commands

/// Human-readable form of a command, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn output_text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stdout = stdout.trim();
    if !stdout.is_empty() {
        if !s.is_empty() {
            s.push_str(" | stdout: ");
        }
        s.push_str(stdout);
    }
    if s.len() > 2000 {
        let mut cut = 2000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" …");
    }
    s
}

/// Error for a command that ran but failed.
pub fn failed(cmd: &Command, out: &Output) -> Error {
    Error(format!(
        "`{}` failed ({}): {}",
        describe(cmd),
        out.status,
        output_text(out)
    ))
}

/// Runs a measured command: spawn, optional stdin, wait, with the wall-clock
/// time of exactly that. The child stays in our process group so that Ctrl-C
/// reaches it too and nothing can hang the run.
///
/// Its stdout and stderr go to files in `scratch` (made before the clock
/// starts), not pipes: a command that leaves a detached process behind
/// (`weft run -d`, `docker run -d`) must not be able to keep us waiting for
/// an end-of-file that never comes.
pub fn timed(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    scratch: &Path,
) -> Result<(Duration, Output)> {
    let out_path = scratch.join("timed.stdout");
    let err_path = scratch.join("timed.stderr");
    let out_file =
        fs::File::create(&out_path).context(format_args!("creating {}", out_path.display()))?;
    let err_file =
        fs::File::create(&err_path).context(format_args!("creating {}", err_path.display()))?;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(out_file)
    .stderr(err_file);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context(format_args!("starting `{}`", describe(cmd)))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A plugin that exits early closes its stdin; the exit status tells.
        let _ = pipe.write_all(input);
    }
    let status = child
        .wait()
        .context(format_args!("waiting for `{}`", describe(cmd)))?;
    let elapsed = start.elapsed();
    let out = Output {
        status,
        stdout: fs::read(&out_path).context(format_args!("reading {}", out_path.display()))?,
        stderr: fs::read(&err_path).context(format_args!("reading {}", err_path.display()))?,
    };
    Ok((elapsed, out))
}

/// Runs an unmeasured helper command with a deadline. It gets a process
/// group of its own so that a Ctrl-C during cleanup does not kill it.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .context(format_args!("starting `{}`", describe(cmd)))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return bail(format!(
                    "`{}` did not finish within {} s and was killed",
                    describe(cmd),
                    timeout.as_secs()
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => return bail(format!("waiting for `{}`: {e}", describe(cmd))),
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Like [`run`], but a non-zero exit is an error.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = run(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(failed(cmd, &out))
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

// ---------------------------------------------------------------------------
// Long-running processes we start (the weft agent, dockerd)

/// A daemon we started. Dropping it stops it: SIGTERM, then SIGKILL after a
/// grace period. It runs in a process group of its own so that Ctrl-C on the
/// terminal reaches only the benchmark, which then shuts it down in order.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    grace: Duration,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, grace: Duration) -> Result<Daemon> {
        let file = fs::File::create(log).context(format_args!("creating {}", log.display()))?;
        let file2 = file.try_clone().context("duplicating a log file handle")?;
        cmd.stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .process_group(0);
        let child = cmd
            .spawn()
            .context(format_args!("starting {name} (`{}`)", describe(&cmd)))?;
        Ok(Daemon {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            grace,
        })
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Exit status if the daemon has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        all[from..]
            .iter()
            .map(|l| {
                let mut l = l.to_string();
                if l.len() > 400 {
                    let mut cut = 400;
                    while !l.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.truncate(cut);
                }
                format!("    {l}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether an error line of its log (logrus `level=error`/`level=fatal`,
    /// or dockerd's final "failed to start daemon") mentions `needle`.
    pub fn log_error_mentions(&self, needle: &str) -> bool {
        let needle = needle.to_lowercase();
        fs::read_to_string(&self.log)
            .map(|t| {
                t.lines().any(|l| {
                    let l = l.to_lowercase();
                    (l.contains("level=error")
                        || l.contains("level=fatal")
                        || l.starts_with("failed to start daemon"))
                        && l.contains(&needle)
                })
            })
            .unwrap_or(false)
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id() as i32;
        // SAFETY: plain syscall on a pid we own and have not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + self.grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => break,
            }
        }
        eprintln!(
            "warning: {} (pid {pid}) did not exit within {} s of SIGTERM; killing it",
            self.name,
            self.grace.as_secs()
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Processes we did not start directly (containerd shims, sandbox processes)

/// A pid together with its start time (field 22 of /proc/PID/stat), so that
/// a later kill cannot hit an unrelated process that reused the pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3 (state); field 22 is 19 further.
    fields.nth(18)?.parse().ok()
}

impl ProcId {
    pub fn of(pid: i32) -> Option<ProcId> {
        proc_start_time(pid).map(|start| ProcId { pid, start })
    }

    pub fn alive(&self) -> bool {
        proc_start_time(self.pid) == Some(self.start)
    }

    /// SIGKILL, only if it is still the same process.
    pub fn kill(&self) -> bool {
        if self.alive() {
            // SAFETY: plain syscall; identity checked just above.
            unsafe { libc::kill(self.pid, libc::SIGKILL) == 0 }
        } else {
            false
        }
    }
}

/// Parent pid (field 4 of /proc/PID/stat).
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Processes whose working directory lies under `dir`: how containerd
/// shims, which run in their container's bundle directory, are found when
/// containerd is no longer there to stop them.
pub fn processes_with_cwd_under(dir: &Path) -> Vec<ProcId> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd.starts_with(dir))
                .unwrap_or(false)
        })
        .filter_map(ProcId::of)
        .collect()
}

/// Waits until none of `procs` is alive, up to `timeout`.
pub fn wait_gone(procs: &[ProcId], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if procs.iter().all(|p| !p.alive()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Mounts and directories

fn unescape_mountinfo(s: &str) -> String {
    // Octal escapes: \040 (space), \011 (tab), \012 (newline), \134 (\).
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or below `dir`, deepest (latest) first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.reverse();
    found
}

/// Lazily unmounts everything at or below `dir` (overlay and nsfs mounts a
/// daemon left behind), so that removing the directory cannot descend into
/// a mounted file system.
pub fn unmount_under(dir: &Path) {
    for _ in 0..4 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            if let Ok(c) = CString::new(m.as_os_str().as_bytes()) {
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!("warning: could not unmount {left:?}");
    }
}

/// Unmounts, then removes `dir` with everything in it.
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    unmount_under(dir);
    if !mounts_under(dir).is_empty() {
        eprintln!(
            "warning: not removing {} because mounts remain below it",
            dir.display()
        );
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        eprintln!("warning: removing {}: {e}", dir.display());
    }
}

/// Creates `dir` (and parents) fresh: it must not exist yet.
pub fn create_fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        return bail(format!(
            "{} already exists; is another benchmark running, or was one killed? Remove it first",
            dir.display()
        ));
    }
    fs::create_dir_all(dir).context(format_args!("creating {}", dir.display()))
}

/// A directory of our own, removed (after unmounting) when dropped.
pub struct TempTree {
    path: PathBuf,
}

impl TempTree {
    pub fn create(path: &Path) -> Result<TempTree> {
        create_fresh_dir(path)?;
        Ok(TempTree {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Directories that some daemon creates in a fixed place (e.g. /run/docker),
/// removed again at the end if they did not exist before and are empty.
pub struct CreatedDirs {
    absent: Vec<PathBuf>,
}

impl CreatedDirs {
    /// Records which of `dirs` (parents before children) do not exist now.
    pub fn record(dirs: &[&str]) -> CreatedDirs {
        CreatedDirs {
            absent: dirs
                .iter()
                .map(PathBuf::from)
                .filter(|d| !d.exists())
                .collect(),
        }
    }

    pub fn was_absent(&self, dir: &Path) -> bool {
        self.absent.iter().any(|d| d == dir)
    }

    /// Removes those that appeared in the meantime, if empty (children first).
    pub fn remove(&mut self) {
        for d in self.absent.drain(..).rev() {
            if d.is_dir() {
                let _ = fs::remove_dir(&d);
            }
        }
    }
}

/// Cgroup hierarchies mounted on this machine (v1 controllers and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            if fstype == "cgroup" || fstype == "cgroup2" {
                pre.split(' ')
                    .nth(4)
                    .map(|m| PathBuf::from(unescape_mountinfo(m)))
            } else {
                None
            }
        })
        .collect()
}

/// Removes the cgroup directory `name` (relative to each hierarchy's root)
/// and the empty cgroups below it, in every hierarchy.
pub fn remove_cgroup(name: &str) {
    for root in cgroup_mounts() {
        let top = root.join(name);
        if top.is_dir() {
            rmdir_cgroup(&top);
        }
    }
}

fn rmdir_cgroup(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_cgroup(&e.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("warning: removing cgroup {}: {e}", dir.display());
    }
}

/// Polls `f` every `step` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, step: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline || interrupted() {
            return false;
        }
        thread::sleep(step);
    }
}

pub fn is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}

/// Checks that `path` is an executable file.
pub fn require_exe(path: &Path, hint: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => bail(format!(
            "{} is not an executable file; {hint}",
            path.display()
        )),
        Err(e) => bail(format!("{}: {e}; {hint}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn own_start_time() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
    }
}
