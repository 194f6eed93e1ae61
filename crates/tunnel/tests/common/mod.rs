//! Two throwaway "hosts" (network namespaces named wft…) joined by a veth
//! pair on 198.51.100.0/24, each with a subnet of its own (10.50.1.0/24,
//! 10.50.2.0/24; the host's address in it on lo), routed through a weft tunnel. Nothing
//! is made in the machine's own namespace; everything is removed on drop,
//! also when a test fails.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use weft_tunnel::{Keys, Peer, RekeyPolicy, Tunnel, TunnelConfig};

pub const PORT: u16 = 8285;
pub const VETH_MTU: u32 = 1500;

static SEQ: AtomicUsize = AtomicUsize::new(0);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A network namespace `wft<pid>x<n><tag>`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "wft{}x{}{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn file(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("opening the namespace file")
    }

    /// `ip -n NAME ARGS…`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// Runs `f` on a thread that entered this namespace (sockets it opens
    /// stay in it).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = self.file();
        thread::spawn(move || {
            // SAFETY: `file` is an open namespace file this closure owns;
            // setns changes this short-lived thread's namespace only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawning a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub struct Host {
    pub ns: Netns,
    pub tunnel: Option<Tunnel>,
    pub keys: Option<Keys>,
    pub underlay: Ipv4Addr,
    pub subnet: &'static str,
    pub addr: Ipv4Addr,
}

impl Host {
    pub fn tunnel(&self) -> &Tunnel {
        self.tunnel.as_ref().expect("tunnel running")
    }
}

/// Two hosts A and B with tunnels to each other.
pub struct Lab {
    // Tunnels go before namespaces (field order is drop order).
    pub a: Host,
    pub b: Host,
}

pub struct Opts {
    pub secure: bool,
    pub queues: usize,
    pub rekey: RekeyPolicy,
    /// B is told a wrong public key for A.
    pub wrong_key_at_b: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            secure: false,
            queues: 2,
            rekey: RekeyPolicy::default(),
            wrong_key_at_b: false,
        }
    }
}

impl Lab {
    pub fn new(o: Opts) -> Lab {
        init_tracing();
        let na = Netns::new("a");
        let nb = Netns::new("b");
        na.ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", &nb.name,
        ]);
        let mut hosts = Vec::new();
        for (ns, under, subnet, addr) in [
            (na, "198.51.100.1", "10.50.1.0/24", "10.50.1.1"),
            (nb, "198.51.100.2", "10.50.2.0/24", "10.50.2.1"),
        ] {
            ns.ip(&["addr", "add", &format!("{under}/24"), "dev", "veth0"]);
            ns.ip(&["link", "set", "veth0", "up"]);
            // The host's own address in its subnet (this kernel has no
            // dummy driver, so on lo).
            ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
            let keys = o.secure.then(|| Keys::generate().unwrap());
            let mut cfg = TunnelConfig::new(
                "wtun0",
                TunnelConfig::mtu_for(VETH_MTU, o.secure),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
            );
            cfg.queues = o.queues;
            cfg.crypto = keys.clone();
            cfg.rekey = o.rekey;
            let tunnel = Tunnel::start_in(cfg, ns.file().as_fd()).expect("starting the tunnel");
            hosts.push(Host {
                ns,
                tunnel: Some(tunnel),
                keys,
                underlay: under.parse().unwrap(),
                subnet,
                addr: addr.parse().unwrap(),
            });
        }
        let b = hosts.pop().unwrap();
        let a = hosts.pop().unwrap();
        // Routes to the other host's subnet into the TUN device, from our
        // own subnet's address (what the agent will do).
        a.ns.ip(&[
            "route",
            "add",
            b.subnet,
            "dev",
            "wtun0",
            "src",
            &a.addr.to_string(),
        ]);
        b.ns.ip(&[
            "route",
            "add",
            a.subnet,
            "dev",
            "wtun0",
            "src",
            &b.addr.to_string(),
        ]);
        let peer = |h: &Host| Peer {
            subnet: h.subnet.parse().unwrap(),
            endpoint: SocketAddrV4::new(h.underlay, PORT),
            public_key: h.keys.as_ref().map(Keys::public_key),
        };
        a.tunnel().set_peers(vec![peer(&b)]).unwrap();
        let mut pa = peer(&a);
        if o.wrong_key_at_b {
            pa.public_key = Some(Keys::generate().unwrap().public_key());
        }
        b.tunnel().set_peers(vec![pa]).unwrap();
        Lab { a, b }
    }

    /// `ping` from A's subnet address to B's; whether all replies came.
    pub fn ping(&self, count: u32) -> bool {
        let out = self.a.ns.exec(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            "-I",
            &self.a.addr.to_string(),
            &self.b.addr.to_string(),
        ]);
        out.status.success()
    }
}

/// Deterministic bytes (xorshift) so that the receiver can check every one.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Sends `total` bytes over TCP from `from` to `to` (port `port`, server
/// in `to`'s namespace) and checks every byte arrived intact. `marker`, if
/// given, is written at the start of every 64 KB. Returns the rate in
/// Gbit/s.
pub fn tcp_transfer(
    from: &Host,
    to: &Host,
    port: u16,
    total: usize,
    marker: Option<&'static [u8]>,
) -> f64 {
    let bind = SocketAddrV4::new(to.addr, port);
    let listener: TcpListener = to.ns.run(move || TcpListener::bind(bind).expect("bind"));
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut want = Pattern::new(42);
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let mut expect = vec![0u8; 1 << 16];
        let mut pos_in_block = 0usize;
        while got < total {
            let n = s.read(&mut buf).expect("reading the transfer");
            assert!(n > 0, "connection closed after {got} of {total} bytes");
            // Regenerate the sender's stream block by block.
            let mut i = 0;
            while i < n {
                if pos_in_block == 0 {
                    want.fill(&mut expect);
                    if let Some(m) = marker {
                        expect[..m.len()].copy_from_slice(m);
                    }
                }
                let k = (n - i).min(expect.len() - pos_in_block);
                assert!(
                    buf[i..i + k] == expect[pos_in_block..pos_in_block + k],
                    "corrupted data at byte {}",
                    got + i
                );
                i += k;
                pos_in_block = (pos_in_block + k) % expect.len();
            }
            got += n;
        }
        got
    });
    let dst = bind;
    let src = SocketAddrV4::new(from.addr, 0);
    let mut client: TcpStream = from.ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Bind to our subnet address so the packets take the tunnel.
            let s = socket_bound(src);
            match s.connect_timeout(&dst.into(), Duration::from_secs(3)) {
                Ok(()) => return TcpStream::from(s),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("connect to {dst}: {e}; retrying");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("connect to {dst}: {e}"),
            }
        }
    });
    client
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t = Instant::now();
    let mut p = Pattern::new(42);
    let mut block = vec![0u8; 1 << 16];
    let mut sent = 0;
    while sent < total {
        p.fill(&mut block);
        if let Some(m) = marker {
            block[..m.len()].copy_from_slice(m);
        }
        let k = block.len().min(total - sent);
        client.write_all(&block[..k]).expect("writing the transfer");
        sent += k;
    }
    let got = server.join().expect("server thread");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, total);
    total as f64 * 8.0 / secs / 1e9
}

/// A TCP socket bound to `addr` (std has no bind-before-connect).
fn socket_bound(addr: SocketAddrV4) -> Socket {
    Socket::bound(addr)
}

pub struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn bound(addr: SocketAddrV4) -> Socket {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket/bind calls with checked results.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let s = Socket(std::os::fd::OwnedFd::from_raw_fd(fd));
            let sa = sockaddr(addr);
            assert_eq!(
                libc::bind(
                    fd,
                    &sa as *const _ as *const libc::sockaddr,
                    std::mem::size_of_val(&sa) as u32
                ),
                0,
                "bind {addr}: {}",
                std::io::Error::last_os_error()
            );
            s
        }
    }

    fn connect_timeout(&self, dst: &std::net::SocketAddr, _t: Duration) -> std::io::Result<()> {
        let std::net::SocketAddr::V4(d) = dst else {
            unreachable!()
        };
        let sa = sockaddr(*d);
        // SAFETY: valid sockaddr.
        let rc = unsafe {
            libc::connect(
                self.0.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&sa) as u32,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl From<Socket> for TcpStream {
    fn from(s: Socket) -> TcpStream {
        TcpStream::from(s.0)
    }
}

pub fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Frames seen on one interface of a namespace (AF_PACKET, both
/// directions), collected until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    pub fn start(ns: &Netns, ifname: &'static str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let file = ns.file();
        let st = stop.clone();
        let handle = thread::spawn(move || {
            // SAFETY: setns for this thread; socket calls checked.
            unsafe {
                assert_eq!(libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET), 0);
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    proto as i32,
                );
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let name = std::ffi::CString::new(ifname).unwrap();
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                assert_eq!(
                    libc::bind(
                        fd,
                        &sll as *const _ as *const libc::sockaddr,
                        std::mem::size_of_val(&sll) as u32
                    ),
                    0
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of_val(&tv) as u32,
                );
                tx.send(()).unwrap();
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 1 << 17];
                while !st.load(Ordering::Relaxed) {
                    let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                    if n > 0 {
                        frames.push(buf[..n as usize].to_vec());
                    }
                }
                libc::close(fd);
                frames
            }
        });
        rx.recv().expect("capture started");
        Capture {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("capture thread")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The UDP payload of an Ethernet/IPv4/UDP frame to `dport`.
pub fn udp_payload(frame: &[u8], dport: u16) -> Option<&[u8]> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = &frame[14 + ihl..];
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != dport {
        return None;
    }
    Some(&udp[8..])
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends UDP datagrams carrying `payload` from A's subnet to B's.
pub fn send_udp(from: &Host, to: &Host, port: u16, payload: &'static [u8], count: usize) {
    let src = SocketAddrV4::new(from.addr, 0);
    let dst = SocketAddrV4::new(to.addr, port);
    from.ns.run(move || {
        let s = std::net::UdpSocket::bind(src).unwrap();
        for _ in 0..count {
            s.send_to(payload, dst).unwrap();
            thread::sleep(Duration::from_millis(5));
        }
    });
}

/// Sends raw `datagram` to the host's tunnel port from its peer's namespace.
pub fn inject(from: &Host, to: &Host, datagram: Vec<u8>) {
    let src = SocketAddrV4::new(from.underlay, 0);
    let dst = SocketAddrV4::new(to.underlay, PORT);
    from.ns.run(move || {
        let s = std::net::UdpSocket::bind(src).unwrap();
        s.send_to(&datagram, dst).unwrap();
    });
}

/// Waits until `f` holds, up to `timeout`.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
