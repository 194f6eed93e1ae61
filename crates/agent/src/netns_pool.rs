//! A small pool of namespaces made ahead of time, each with its veth pair
//! (host end parked under a `wvp…` name, `eth0` inside, both down).
//!
//! Creating a namespace and a veth pair is most of the kernel's work when a
//! sandbox attaches (~1.3 ms of ~1.6 ms here). A background thread does it
//! between requests, so an attach only renames, enslaves, addresses and
//! routes. When the pool is empty an attach prepares its own entry inline,
//! through the same code. Entries are owned by name: a restarted agent
//! removes unclaimed `wv…` links and namespace files and refills.

use crate::error::Result;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tracing::warn;
use weft_kernel::{Netlink, Netns};

/// Set in every sandbox namespace before its interfaces exist. Networks are
/// IPv4 for now, so interfaces get no IPv6 either: otherwise each new
/// interface sends router solicitations, MLD reports and DAD probes that the
/// bridge floods to every other port, which makes attaching slower the more
/// sandboxes a bridge has (measured: 0.9 ms at 100 ports, 4.5 ms at 1000).
pub(crate) const SANDBOX_SYSCTLS: &[(&str, &str)] = &[("net.ipv6.conf.default.disable_ipv6", "1")];

/// The host end of a sandbox veth: no IPv6 either (see SANDBOX_SYSCTLS).
pub(crate) fn quiet_host_end(ifname: &str) -> Result<()> {
    weft_kernel::sysctl::set(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "1")?;
    Ok(())
}

/// A namespace with `eth0` inside and its peer parked in the host namespace.
pub(crate) struct Prepared {
    pub ns: Netns,
    pub ns_nl: Netlink,
    pub host_ifname: String,
    pub host_index: u32,
    pub peer_index: u32,
}

pub(crate) struct NetnsPool {
    ready: Mutex<Vec<Prepared>>,
    wakeup: Condvar,
    want: usize,
    dir: PathBuf,
    stopping: AtomicBool,
}

fn random_hex(n: usize) -> String {
    crate::ids::random_id()[..n].to_string()
}

impl Prepared {
    /// Makes one entry; nothing is left behind on error.
    pub fn make(dir: &Path, nl: &mut Netlink) -> Result<Prepared> {
        let id = random_hex(32);
        let path = dir.join(&id);
        let (ns, mut ns_nl) = Netns::create(&path, SANDBOX_SYSCTLS)?;
        let host_ifname = format!("wvp{}", &id[..12]);
        let made = (|| {
            nl.add_veth(&host_ifname, None, "eth0", ns.fd(), None)?;
            quiet_host_end(&host_ifname)?;
            let host = nl.link_by_name(&host_ifname)?;
            let peer = ns_nl.link_by_name("eth0")?;
            match (host, peer) {
                (Some(h), Some(p)) => Ok((h.index, p.index)),
                _ => Err(crate::error::AgentError::Vanished {
                    what: format!("veth {host_ifname}"),
                    place: "this host while it was made".into(),
                }),
            }
        })();
        match made {
            Ok((host_index, peer_index)) => Ok(Prepared {
                ns,
                ns_nl,
                host_ifname,
                host_index,
                peer_index,
            }),
            Err(e) => {
                let _ = nl.delete_link(&host_ifname);
                let _ = Netns::remove(&path);
                Err(e)
            }
        }
    }

    /// Removes the entry: unpinning the namespace is enough, the kernel
    /// deletes the veth pair when it destroys it.
    pub fn discard(self) {
        let _ = Netns::remove(self.ns.path());
    }
}

impl NetnsPool {
    pub fn new(dir: PathBuf, want: usize) -> Arc<NetnsPool> {
        Arc::new(NetnsPool {
            ready: Mutex::new(Vec::with_capacity(want)),
            wakeup: Condvar::new(),
            want,
            dir,
            stopping: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many entries it keeps ready, and how many are ready now.
    pub fn fill(&self) -> (usize, usize) {
        (
            self.want,
            self.ready.lock().unwrap_or_else(|e| e.into_inner()).len(),
        )
    }

    /// A ready entry, if any; wakes the refiller.
    pub fn take(&self) -> Option<Prepared> {
        let p = self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop();
        self.wakeup.notify_one();
        p
    }

    /// Starts the refill thread; it stops with `drain`.
    pub fn start(self: &Arc<Self>) {
        if self.want == 0 {
            return;
        }
        let pool = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("weft-netns-pool".into())
            .spawn(move || {
                let mut nl = match Netlink::open() {
                    Ok(nl) => nl,
                    Err(e) => return warn!(error = %e, "namespace pool disabled"),
                };
                loop {
                    {
                        let mut ready = pool.ready.lock().unwrap_or_else(|e| e.into_inner());
                        while ready.len() >= pool.want && !pool.stopping.load(Ordering::Relaxed) {
                            ready = pool.wakeup.wait(ready).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    if pool.stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    match Prepared::make(&pool.dir, &mut nl) {
                        Ok(p) => {
                            let mut ready = pool.ready.lock().unwrap_or_else(|e| e.into_inner());
                            if pool.stopping.load(Ordering::Relaxed) {
                                drop(ready);
                                return p.discard();
                            }
                            ready.push(p);
                        }
                        Err(e) => {
                            warn!(error = %e, "could not prepare a namespace; retrying");
                            std::thread::sleep(std::time::Duration::from_secs(1));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "namespace pool disabled");
        }
    }

    /// Stops refilling and removes every ready entry from the kernel.
    pub fn drain(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.wakeup.notify_all();
        let entries: Vec<Prepared> =
            std::mem::take(&mut *self.ready.lock().unwrap_or_else(|e| e.into_inner()));
        for p in entries {
            p.discard();
        }
    }
}
