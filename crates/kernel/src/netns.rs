//! Network namespaces held by bind mounts under a directory of weft's.
//!
//! Work that must happen inside a namespace runs on a short-lived thread that
//! enters it and then ends, so no thread is ever left in the wrong namespace,
//! on success or on error. Netlink sockets opened there keep talking to that
//! namespace from any thread.

use crate::error::{KernelError, Result};
use crate::netlink::Netlink;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub struct Netns {
    path: PathBuf,
    file: File,
}

fn ns_err(path: &Path, what: &'static str, source: io::Error) -> KernelError {
    KernelError::Netns {
        path: path.display().to_string(),
        what,
        source,
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes `dir` a shared mount point, as `ip netns` does for /run/netns: a
/// namespace file unmounted here is then unmounted in every mount namespace
/// that copied it, so a copy cannot keep a removed sandbox's namespace alive.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ns_err(dir, "create directory", e))?;
    let c = cstr(dir);
    let none = CString::new("none").unwrap();
    // SAFETY: every pointer is a NUL-terminated CString (`none`, `c`) that
    // outlives the closure, and data is null, which mount accepts for a
    // propagation change.
    let shared = |_: ()| unsafe {
        libc::mount(
            none.as_ptr(),
            c.as_ptr(),
            none.as_ptr(),
            libc::MS_SHARED | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if check(shared(())).is_ok() && is_mount_point(dir) {
        return Ok(());
    }
    // SAFETY: as above: live CStrings, null data (a bind mount takes none).
    check(unsafe {
        libc::mount(
            c.as_ptr(),
            c.as_ptr(),
            none.as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map_err(|e| ns_err(dir, "bind-mount directory onto itself", e))?;
    check(shared(())).map_err(|e| ns_err(dir, "make directory a shared mount", e))
}

/// Unmounts what `prepare_dir` mounted, if nothing is left in it.
pub fn release_dir(dir: &Path) -> Result<()> {
    if is_mount_point(dir) {
        let c = cstr(dir);
        // SAFETY: `c` is a NUL-terminated CString that outlives the call.
        check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) })
            .map_err(|e| ns_err(dir, "unmount", e))?;
    }
    Ok(())
}

pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

impl Netns {
    /// Creates a namespace with `lo` up and `sysctls` (dotted keys) set,
    /// pinned by a bind mount at `path`. Returns it with a netlink socket
    /// inside it. Nothing is left behind on error.
    pub fn create(path: &Path, sysctls: &[(&str, &str)]) -> Result<(Netns, Netlink)> {
        let path = path.to_path_buf();
        let sysctls: Vec<(String, String)> = sysctls
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let worker_path = path.clone();
        let result = std::thread::Builder::new()
            .name("weft-netns-create".into())
            .spawn(move || -> Result<Netlink> {
                let p = &worker_path;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(p)
                    .map_err(|e| ns_err(p, "create mount point file", e))?;
                let made = (|| {
                    // This thread alone moves into the new namespace and ends soon after.
                    // SAFETY: unshare takes a flag and touches no memory;
                    // it changes only this thread's network namespace.
                    check(unsafe { libc::unshare(libc::CLONE_NEWNET) })
                        .map_err(|e| ns_err(p, "unshare", e))?;
                    for (k, v) in &sysctls {
                        crate::sysctl::set(k, v)?;
                    }
                    let mut nl = Netlink::open()?;
                    nl.set_up(1)?; // lo is always index 1 in a new namespace
                    let src = CString::new("/proc/thread-self/ns/net").unwrap();
                    let c = cstr(p);
                    // SAFETY: `src` and `c` are NUL-terminated CStrings
                    // that outlive the call; fstype and data may be null
                    // for a bind mount.
                    check(unsafe {
                        libc::mount(
                            src.as_ptr(),
                            c.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        )
                    })
                    .map_err(|e| ns_err(p, "bind-mount namespace", e))?;
                    Ok(nl)
                })();
                if made.is_err() {
                    let _ = std::fs::remove_file(p);
                }
                made
            })
            .map_err(|e| ns_err(&path, "spawn thread", e))?
            .join()
            .map_err(|_| ns_err(&path, "thread panicked", io::Error::other("panic")))?;
        let nl = result?;
        match File::open(&path) {
            Ok(file) => Ok((Netns { path, file }, nl)),
            Err(e) => {
                let _ = Netns::remove(&path);
                Err(ns_err(&path, "open", e))
            }
        }
    }

    pub fn open(path: &Path) -> Result<Netns> {
        let file = File::open(path).map_err(|e| ns_err(path, "open", e))?;
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a thread inside this namespace; the thread ends afterwards.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| ns_err(&self.path, "dup", e))?;
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("weft-netns".into())
            .spawn(move || {
                // SAFETY: `file` is an open namespace file owned by this
                // closure for the whole call; setns changes only this
                // short-lived thread's namespace.
                check(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) })
                    .map_err(|e| ns_err(&path, "setns", e))?;
                f()
            })
            .map_err(|e| ns_err(&self.path, "spawn thread", e))?
            .join()
            .map_err(|_| ns_err(&self.path, "thread panicked", io::Error::other("panic")))?
    }

    /// A netlink socket inside this namespace.
    pub fn netlink(&self) -> Result<Netlink> {
        self.run_in(Netlink::open)
    }

    /// Unmounts and deletes the namespace file; returns false if there was none.
    /// The namespace itself goes once no process is left in it.
    pub fn remove(path: &Path) -> Result<bool> {
        let c = cstr(path);
        // SAFETY: `c` is a NUL-terminated CString that outlives the call.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let umount_err = (rc < 0).then(io::Error::last_os_error);
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ns_err(path, "remove", umount_err.unwrap_or(e))),
        }
    }
}

/// Whether `path` is a mounted network namespace (not just a leftover file).
pub fn is_netns(path: &Path) -> bool {
    // NSFS_MAGIC: a bind-mounted namespace file lives on nsfs.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let c = cstr(path);
    // SAFETY: statfs is plain old data (integers and arrays of them), for
    // which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated CString and `st` a writable statfs,
    // both live across the call.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC }
}
