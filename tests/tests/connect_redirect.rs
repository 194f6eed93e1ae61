//! Published ports for the host's own connections, translated at connect()
//! by weft's cgroup BPF programs (weft_kernel::connect_redirect): the
//! programs alone in namespaces of the test's own, then through the agent:
//! the BPF path is the one taken from localhost, agents in two namespaces
//! never see each other's ports, and nothing stays attached after an agent
//! stops, is killed or restarts.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use weft_e2e::{TestHost, TestNs};
use weft_kernel::connect_redirect::{
    attached_programs, cgroup2_root, program_exists, AttachPoint, ConnectRedirect,
};
use weft_model::ports::{PortMapping, PortRange, Protocol};

/// Runs `f` on a new thread inside `ns` (only that thread enters it).
fn in_ns<T: Send + 'static>(ns: &TestNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(ns.path()).expect("open netns");
    std::thread::spawn(move || {
        // SAFETY: setns for this thread only, on a descriptor we own.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}

fn v4(a: &str) -> SocketAddr {
    a.parse().unwrap()
}

fn mapping(
    host_ip: Option<Ipv4Addr>,
    host: (u16, u16),
    container: (u16, u16),
    p: Protocol,
) -> PortMapping {
    PortMapping {
        host_ip,
        host: PortRange {
            start: host.0,
            end: host.1,
        },
        container: PortRange {
            start: container.0,
            end: container.1,
        },
        protocol: p,
    }
}

/// A TCP server that answers every connection with `reply`, until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(listener: TcpListener, reply: &'static str) -> Server {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.write_all(reply.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects, reads the whole answer; returns (answer, local, peer) or the error.
fn fetch(to: SocketAddr) -> std::io::Result<(String, SocketAddr, SocketAddr)> {
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let (local, peer) = (c.local_addr()?, c.peer_addr()?);
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    Ok((s, local, peer))
}

fn attached_everywhere() -> Vec<u32> {
    let cg = cgroup2_root().expect("cgroup2");
    AttachPoint::ALL
        .iter()
        .flat_map(|h| attached_programs(&cg, *h).expect("query"))
        .collect()
}

#[test]
fn programs_translate_connections_of_their_own_namespace_only() {
    let a = TestNs::new("wftr");
    let b = TestNs::new("wftr");
    for ns in [&a, &b] {
        // A "sandbox" address: local to the namespace, so no routes needed.
        ns.sh("ip addr add 10.201.7.1/32 dev lo");
    }
    let target = Ipv4Addr::new(10, 201, 7, 1);

    // Namespace A: servers and its redirect.
    let (mut ra, servers_a, tcp_port, udp_a) = in_ns(&a, move || {
        let l = TcpListener::bind((target, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let range = TcpListener::bind((target, 9001)).unwrap();
        let udp = UdpSocket::bind((target, 0)).unwrap();
        let servers = vec![Server::start(l, "A"), Server::start(range, "A-range")];
        // The cgroup2 mount is visible here: the scratch dir is not used.
        let r = ConnectRedirect::load(Path::new("/nonexistent")).expect("load in A");
        (r, servers, port, udp)
    });
    let udp_port = udp_a.local_addr().unwrap().port();
    ra.add(
        &mapping(None, (18080, 18080), (tcp_port, tcp_port), Protocol::Tcp),
        target,
    )
    .unwrap();
    ra.add(
        &mapping(None, (15353, 15353), (udp_port, udp_port), Protocol::Udp),
        target,
    )
    .unwrap();
    ra.add(
        &mapping(None, (9000, 9002), (9000, 9002), Protocol::Tcp),
        target,
    )
    .unwrap();
    // Bound to an address A does not have yet.
    let later = Ipv4Addr::new(10, 201, 8, 1);
    ra.add(
        &mapping(
            Some(later),
            (18081, 18081),
            (tcp_port, tcp_port),
            Protocol::Tcp,
        ),
        target,
    )
    .unwrap();
    let ids_a = ra.program_ids().to_vec();
    assert_eq!(ids_a.len(), 4);
    let attached = attached_everywhere();
    assert!(
        ids_a.iter().all(|i| attached.contains(i)),
        "{ids_a:?} in {attached:?}"
    );

    // Namespace B: the same port leads to B's own server. B loads as under
    // `ip netns exec`, which hides the cgroup mounts: in a mount namespace
    // of this thread's own without them.
    let scratch = ScratchDir::new(&b.name);
    let scratch_path = scratch.0.clone();
    let (mut rb, servers_b, tcp_b) = in_ns(&b, move || {
        private_mounts_without_cgroup2();
        assert!(cgroup2_root().is_err(), "cgroup2 still visible");
        let l = TcpListener::bind((target, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        (
            ConnectRedirect::load(&scratch_path).expect("load in B"),
            vec![Server::start(l, "B")],
            port,
        )
    });
    assert!(
        !scratch.0.join("cgroup2").exists(),
        "the private mount point is gone"
    );
    rb.add(
        &mapping(None, (18080, 18080), (tcp_b, tcp_b), Protocol::Tcp),
        target,
    )
    .unwrap();

    in_ns(&a, move || {
        let (got, local, peer) = fetch(v4("127.0.0.1:18080")).expect("A -> 127.0.0.1:18080");
        assert_eq!(got, "A");
        // Connected straight to the target: the source is chosen for it…
        assert_eq!(local.ip(), target, "local address");
        // …and getpeername still says what was asked for.
        assert_eq!(peer, v4("127.0.0.1:18080"));
        // A range keeps its port numbers.
        let (got, _, peer) = fetch(v4("127.0.0.1:9001")).expect("A -> 127.0.0.1:9001");
        assert_eq!((got.as_str(), peer), ("A-range", v4("127.0.0.1:9001")));
        // UDP without connect(): sendto translated, recvfrom shows the asked address.
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.send_to(b"ping", "127.0.0.1:15353").unwrap();
        let mut buf = [0u8; 16];
        udp_a
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let (n, from) = udp_a.recv_from(&mut buf).expect("server got the datagram");
        assert_eq!(&buf[..n], b"ping");
        udp_a.send_to(b"pong", from).unwrap();
        let (n, from) = c.recv_from(&mut buf).expect("reply");
        assert_eq!((&buf[..n], from), (&b"pong"[..], v4("127.0.0.1:15353")));
        // Connected UDP: connect() translated, getpeername as asked.
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.connect("127.0.0.1:15353").unwrap();
        assert_eq!(c.peer_addr().unwrap(), v4("127.0.0.1:15353"));
        assert_eq!(c.local_addr().unwrap().ip(), target);
        // A socket bound to a loopback address is left alone (nothing to
        // reach it here without nftables: refused).
        let s = socket_bound_to_loopback();
        assert!(s.is_err(), "loopback-bound socket was redirected");
    });
    in_ns(&b, move || {
        let (got, _, _) = fetch(v4("127.0.0.1:18080")).expect("B -> 127.0.0.1:18080");
        assert_eq!(got, "B", "B's own mapping, never A's");
        // A's range and UDP port mean nothing here.
        let e = fetch(v4("127.0.0.1:9001")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    });

    // Not local yet: not translated. Once the address appears, the watcher
    // sees it and connections to it are.
    in_ns(&a, move || {
        assert!(fetch(SocketAddr::from((later, 18081))).is_err())
    });
    a.sh("ip addr add 10.201.8.1/32 dev lo");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = in_ns(&a, move || {
            fetch(SocketAddr::from((later, 18081))).map(|r| r.0)
        });
        if r.as_deref().ok() == Some("A") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10.201.8.1:18081 never redirected: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And gone with the address.
    a.sh("ip addr del 10.201.8.1/32 dev lo");
    let deadline = Instant::now() + Duration::from_secs(3);
    while in_ns(&a, move || fetch(SocketAddr::from((later, 18081))).is_ok()) {
        assert!(
            Instant::now() < deadline,
            "still redirected after the address went"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Removing a mapping stops the redirect.
    ra.remove(&mapping(
        None,
        (18080, 18080),
        (tcp_port, tcp_port),
        Protocol::Tcp,
    ))
    .unwrap();
    in_ns(&a, || {
        let e = fetch(v4("127.0.0.1:18080")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    });
    // replace_all keeps exactly what it is given.
    ra.replace_all([(
        &mapping(None, (18080, 18080), (tcp_port, tcp_port), Protocol::Tcp),
        target,
    )])
    .unwrap();
    assert_eq!(ra.entries(), 1);
    in_ns(&a, || {
        assert_eq!(fetch(v4("127.0.0.1:18080")).unwrap().0, "A");
        assert!(fetch(v4("127.0.0.1:9001")).is_err(), "the range went");
    });

    // Dropped: detached and freed.
    let ids_b = rb.program_ids().to_vec();
    drop(ra);
    drop(rb);
    let attached = attached_everywhere();
    for id in ids_a.iter().chain(&ids_b) {
        assert!(!attached.contains(id), "program {id} still attached");
        assert!(!program_exists(*id), "program {id} still exists");
    }
    drop(servers_a);
    drop(servers_b);
}

/// A directory under /dev/shm, removed on drop.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(name: &str) -> ScratchDir {
        let p = std::path::PathBuf::from(format!("/dev/shm/{name}"));
        std::fs::create_dir_all(&p).unwrap();
        ScratchDir(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Moves the calling thread into a mount namespace of its own, where every
/// cgroup2 mount is detached (what `ip netns exec` does to /sys).
fn private_mounts_without_cgroup2() {
    // SAFETY: unshare/mount/umount2 for this thread only, with C strings.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
        let root = std::ffi::CString::new("/").unwrap();
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0
        );
        while let Ok(p) = cgroup2_root() {
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            assert_eq!(
                libc::umount2(c.as_ptr(), libc::MNT_DETACH),
                0,
                "umount {p:?}"
            );
        }
    }
}

/// connect() from a socket bound to 127.0.0.1 first; Ok if it connected.
fn socket_bound_to_loopback() -> std::io::Result<()> {
    // SAFETY: plain socket calls on a descriptor closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sa = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let src = sa(Ipv4Addr::LOCALHOST, 0);
        assert_eq!(
            libc::bind(fd, &src as *const _ as *const libc::sockaddr, len),
            0
        );
        let dst = sa(Ipv4Addr::LOCALHOST, 18080);
        let r = libc::connect(fd, &dst as *const _ as *const libc::sockaddr, len);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r == 0 {
            Ok(())
        } else {
            Err(err)
        }
    }
}

// ---------------------------------------------------------------------------
// Through the agent.

/// The programs the agent holds: the prog_id of each cgroup link among its
/// descriptors (/proc/PID/fdinfo), so the check is about this agent's
/// programs and no one else's (other agents may be running meanwhile).
fn agent_programs(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        if info.contains("link_type:\tcgroup") {
            if let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:\t"))
                .and_then(|v| v.trim().parse().ok())
            {
                ids.push(id);
            }
        }
    }
    ids.sort();
    ids
}

fn wait_gone(ids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attached = attached_everywhere();
        let left: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|i| attached.contains(i) || program_exists(*i))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "programs {left:?} left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asks until the answer comes (the sandbox's server may still be starting).
fn fetch_retry(ns: &TestNs, to: &str) -> (String, SocketAddr, SocketAddr) {
    let to = v4(to);
    let mut last = None;
    for _ in 0..50 {
        match in_ns(ns, move || fetch(to)) {
            Ok(r) if !r.0.is_empty() => return r,
            other => last = Some(other),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{to}: {last:?}");
}

fn conntrack(ns: &TestNs) -> String {
    ns.sh("cat /proc/net/nf_conntrack")
}

const WEB: &str = "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo web-tcp' & \
                   socat UDP-RECVFROM:53,fork SYSTEM:'echo web-udp' & wait";

#[test]
fn localhost_goes_through_the_bpf_path_and_no_nat() {
    let h = TestHost::new(Some("10.154.0.0/16"));
    h.run_detached(
        "web",
        &["-p", "8080:80", "-p", "5353:53/udp"],
        &["sh", "-c", WEB],
    );
    let gateway: Ipv4Addr = "10.154.0.1".parse().unwrap();

    let (got, local, peer) = fetch_retry(&h.ns, "127.0.0.1:8080");
    assert_eq!(got.trim(), "web-tcp");
    // The socket was connected straight to the sandbox: its source is the
    // bridge address (via nft it would be 127.0.0.1, masqueraded later).
    assert_eq!(local.ip(), gateway, "local address");
    assert_eq!(
        peer,
        v4("127.0.0.1:8080"),
        "getpeername shows what was asked"
    );
    // Conntrack saw a plain connection to the sandbox, no DNAT of 8080.
    let ct = conntrack(&h.ns);
    assert!(!ct.contains("dport=8080 "), "a NAT'd connection:\n{ct}");
    assert!(ct.contains(&format!("src={gateway} ")), "{ct}");

    // UDP, connected and not (retried: socat's UDP side may start later).
    let (reply, local, from) = in_ns(&h.ns, || {
        let mut buf = [0u8; 64];
        for _ in 0..20 {
            let c = UdpSocket::bind("0.0.0.0:0").unwrap();
            c.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            c.connect("127.0.0.1:5353").unwrap();
            let local = c.local_addr().unwrap();
            c.send(b"hi\n").unwrap();
            let Ok(n) = c.recv(&mut buf) else { continue };
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            u.send_to(b"hi\n", "127.0.0.1:5353").unwrap();
            let Ok((_, from)) = u.recv_from(&mut buf) else {
                continue;
            };
            return (reply, local, from);
        }
        panic!("no UDP reply from 127.0.0.1:5353");
    });
    assert_eq!(reply.trim(), "web-udp");
    assert_eq!(local.ip(), gateway);
    assert_eq!(from, v4("127.0.0.1:5353"), "recvfrom shows what was asked");

    // The control: an agent with the redirect off goes through nft DNAT,
    // which the same checks see.
    let off = TestHost::with_agent_env(
        Some("10.155.0.0/16"),
        &[],
        &[("WEFT_CONNECT_REDIRECT", "off")],
    );
    assert!(agent_programs(off.agent_pid().unwrap()).is_empty());
    off.run_detached("web", &["-p", "8080:80"], &["sh", "-c", WEB]);
    let (got, local, _) = fetch_retry(&off.ns, "127.0.0.1:8080");
    assert_eq!(got.trim(), "web-tcp");
    assert_eq!(local.ip(), Ipv4Addr::LOCALHOST);
    let ct = conntrack(&off.ns);
    assert!(ct.contains("dport=8080 "), "{ct}");
}

#[test]
fn two_agents_publishing_the_same_port_do_not_interfere() {
    let a = TestHost::new(Some("10.156.0.0/16"));
    let b = TestHost::new(Some("10.157.0.0/16"));
    a.run_detached(
        "web",
        &["-p", "8080:80"],
        &[
            "sh",
            "-c",
            "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo from-a'",
        ],
    );
    b.run_detached(
        "web",
        &["-p", "8080:80"],
        &[
            "sh",
            "-c",
            "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo from-b'",
        ],
    );
    let (pa, pb) = (
        agent_programs(a.agent_pid().unwrap()),
        agent_programs(b.agent_pid().unwrap()),
    );
    assert_eq!((pa.len(), pb.len()), (4, 4), "{pa:?} {pb:?}");
    let attached = attached_everywhere();
    assert!(
        pa.iter().chain(&pb).all(|i| attached.contains(i)),
        "both attached side by side"
    );

    for _ in 0..3 {
        let (got, local, _) = fetch_retry(&a.ns, "127.0.0.1:8080");
        assert_eq!(
            (got.trim(), local.ip().to_string().as_str()),
            ("from-a", "10.156.0.1")
        );
        let (got, local, _) = fetch_retry(&b.ns, "127.0.0.1:8080");
        assert_eq!(
            (got.trim(), local.ip().to_string().as_str()),
            ("from-b", "10.157.0.1")
        );
    }
    // A namespace without an agent keeps its own 127.0.0.1:8080.
    let plain = TestNs::new("wftr");
    let got = in_ns(&plain, || {
        let l = TcpListener::bind("127.0.0.1:8080").unwrap();
        let s = Server::start(l, "mine");
        let r = fetch(v4("127.0.0.1:8080")).map(|r| r.0);
        drop(s);
        r
    });
    assert_eq!(got.unwrap(), "mine");
    // Removing A's sandbox leaves B's port alone.
    a.weft_ok(&["rm", "-f", "web"]);
    assert_eq!(fetch_retry(&b.ns, "127.0.0.1:8080").0.trim(), "from-b");
}

#[test]
fn nothing_stays_attached_after_stop_kill_or_restart() {
    let mut h = TestHost::new(Some("10.158.0.0/16"));
    h.run_detached("web", &["-p", "8080:80"], &["sh", "-c", WEB]);
    let first = agent_programs(h.agent_pid().unwrap());
    assert_eq!(first.len(), 4, "{first:?}");
    assert_eq!(
        fetch_retry(&h.ns, "127.0.0.1:8080").1.ip().to_string(),
        "10.158.0.1"
    );

    // Stopped: detached; localhost still works, through nft.
    h.kill_agent(libc::SIGTERM);
    wait_gone(&first);
    let (got, local, _) = fetch_retry(&h.ns, "127.0.0.1:8080");
    assert_eq!(
        (got.trim(), local.ip()),
        ("web-tcp", std::net::IpAddr::V4(Ipv4Addr::LOCALHOST))
    );

    // Started again: a fresh set, filled from the agent's state.
    h.start_agent();
    let second = agent_programs(h.agent_pid().unwrap());
    assert_eq!(second.len(), 4, "{second:?}");
    assert!(second.iter().all(|i| !first.contains(i)));
    let (got, local, _) = fetch_retry(&h.ns, "127.0.0.1:8080");
    assert_eq!(
        (got.trim(), local.ip().to_string().as_str()),
        ("web-tcp", "10.158.0.1")
    );

    // SIGKILL: the kernel detaches them with the agent's descriptors.
    h.kill_agent(libc::SIGKILL);
    wait_gone(&second);
    h.start_agent();
    let third = agent_programs(h.agent_pid().unwrap());
    assert_eq!(third.len(), 4, "{third:?}");
    let (got, local, _) = fetch_retry(&h.ns, "127.0.0.1:8080");
    assert_eq!(
        (got.trim(), local.ip().to_string().as_str()),
        ("web-tcp", "10.158.0.1")
    );
    let attached = attached_everywhere();
    assert!(third.iter().all(|i| attached.contains(i)));
    assert!(first.iter().chain(&second).all(|i| !attached.contains(i)));

    h.weft_ok(&["rm", "-f", "web"]);
    let pid = h.agent_pid().unwrap();
    h.kill_agent(libc::SIGTERM);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || agent_programs(pid).is_empty()
    );
    wait_gone(&third);
}
