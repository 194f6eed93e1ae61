//! The baseline for the userspace tunnel: a flannel-style udp loop (one
//! packet per read()/sendto(), one thread, a TUN device without offloads),
//! and the machine-wide CPU counter the benchmarks divide by bytes.

use crate::sys::{self, bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

/// What flannel's udp backend does. One thread; a TUN device without
/// offloads; each packet read with one read() and sent with one sendto(),
/// each datagram received with one recvfrom() and written with one
/// write(); poll() between them. Stops and joins on drop.
pub struct Loop {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

fn open_tun(name: &str) -> std::io::Result<OwnedFd> {
    // SAFETY: open/ioctl with a zeroed, correctly sized ifreq.
    unsafe {
        let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

impl Loop {
    /// Starts the loop in `ns` with TUN device `name`, sending packets
    /// for `subnet` to `peer`, on UDP port `port` at both ends.
    pub fn start(
        ns: &Path,
        name: &'static str,
        mtu: u32,
        subnet: ipnet::Ipv4Net,
        peer: Ipv4Addr,
        port: u16,
    ) -> Result<Loop> {
        let file = std::fs::File::open(ns).context("opening a namespace")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stop.clone();
        let handle = thread::spawn(move || {
            // SAFETY: setns for this thread only; it ends with the loop.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
                return;
            }
            let tun = match open_tun(name) {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(Err(format!("TUN {name}: {e}")));
                    return;
                }
            };
            let sock =
                match std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(format!("UDP socket: {e}")));
                        return;
                    }
                };
            let _ = tx.send(Ok(()));
            run(&tun, &sock, subnet, SocketAddrV4::new(peer, port), &st);
        });
        let started = rx
            .recv()
            .map_err(|_| sys::Error::new("reference loop thread died"))?;
        let l = Loop {
            stop,
            handle: Some(handle),
        };
        started.map_err(sys::Error::new)?;
        let st = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["ip", "link", "set", name, "mtu", &mtu.to_string(), "up"])
            .status()
            .context("running ip link set")?;
        if !st.success() {
            return bail(format!("ip link set {name} up failed in {}", ns.display()));
        }
        Ok(l)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(
    tun: &OwnedFd,
    sock: &std::net::UdpSocket,
    subnet: ipnet::Ipv4Net,
    peer: SocketAddrV4,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 65536];
    let mut fds = [
        libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) } <= 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // SAFETY: reading into our buffer.
            let n = unsafe {
                libc::read(
                    tun.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n >= 20 && buf[0] >> 4 == 4 {
                let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                if subnet.contains(&dst) {
                    let _ = sock.send_to(&buf[..n as usize], peer);
                }
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                // SAFETY: writing what we just received.
                unsafe { libc::write(tun.as_raw_fd(), buf.as_ptr() as *const libc::c_void, n) };
            }
        }
    }
}

/// CPU seconds the whole machine has been busy (user, nice, system, irq,
/// softirq, steal) since boot, from /proc/stat.
pub fn machine_busy_secs() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = s.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 8 {
        return bail(format!("unexpected /proc/stat line {line:?}"));
    }
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    Ok(busy as f64 / hz)
}
