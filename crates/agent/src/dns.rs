//! The embedded resolver's I/O: a UDP and a TCP listener on the gateway
//! address of every user-defined network, answering from the name table
//! (weft-dns) and forwarding everything else to the host's upstream servers.
//!
//! Why the gateway and not 127.0.0.11 inside each sandbox (Docker's way):
//! one pair of sockets per network in the agent's namespace serves every
//! sandbox, needs no socket or NAT rule inside sandboxes, and the network a
//! query came in on, with its source address, tells which names it may see.

use crate::error::{AgentError, Result};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use weft_dns::{answer, answer_into, server_failure, Names, Outcome, Written};
use weft_metrics::{Counter, Histogram};
use weft_model::Sandbox;

/// How long one upstream server gets before the next one is tried.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);

/// The host's upstream servers, from its resolv.conf, reread when it changes.
pub(crate) struct Upstream {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Arc<weft_dns::ResolvConf>)>,
}

impl Upstream {
    pub fn new(path: PathBuf) -> Upstream {
        Upstream {
            path,
            cache: Mutex::new((None, Default::default())),
        }
    }

    /// The current resolv.conf (cached while the file's mtime stays the same).
    pub fn conf(&self) -> weft_dns::ResolvConf {
        (*self.shared()).clone()
    }

    /// [`Upstream::conf`] without a copy: what every forward reads.
    fn shared(&self) -> Arc<weft_dns::ResolvConf> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != mtime || mtime.is_none() {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            *cache = (mtime, Arc::new(weft_dns::parse_resolv_conf(&text)));
        }
        Arc::clone(&cache.1)
    }
}

/// A network's listening address, its TCP task and its UDP thread.
type Listener = (Ipv4Addr, Vec<JoinHandle<()>>, UdpThread);

pub(crate) struct Resolver {
    names: Arc<RwLock<Names>>,
    upstream: Arc<Upstream>,
    /// Our own listening addresses, never used as upstreams (no loops).
    own: Arc<RwLock<Vec<Ipv4Addr>>>,
    /// network -> its listening address and the tasks serving it.
    listeners: Mutex<HashMap<String, Listener>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

impl Resolver {
    pub fn new(resolv_conf: PathBuf, metrics: Arc<Metrics>) -> Resolver {
        Resolver {
            metrics,
            names: Default::default(),
            upstream: Arc::new(Upstream::new(resolv_conf)),
            own: Default::default(),
            listeners: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn add(&self, sb: &Sandbox) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add(sb);
    }

    /// The names of `network`'s sandboxes on other hosts (see [`Names::set_remote`]).
    pub fn set_remote(&self, network: &str, entries: Vec<(Ipv4Addr, Vec<String>)>) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_remote(network, entries);
    }

    pub fn remove(&self, id: &str) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Starts answering on `gateway`:53 for `network`.
    pub fn serve(&self, network: &str, gateway: Ipv4Addr) -> Result<()> {
        let addr = SocketAddr::from((gateway, 53));
        let bind_err = |e: std::io::Error| AgentError::Io {
            what: format!("DNS for network {network}: listen on {addr}"),
            source: e,
        };
        // UDP stays blocking: a thread of its own serves it (see serve_udp).
        let udp = Arc::new(std::net::UdpSocket::bind(addr).map_err(bind_err)?);
        let tcp = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        tcp.set_nonblocking(true).map_err(bind_err)?;
        let _guard = self.runtime.enter();
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(bind_err)?;
        let ctx = Arc::new(Ctx {
            network: network.to_string(),
            names: Arc::clone(&self.names),
            upstream: Arc::clone(&self.upstream),
            own: Arc::clone(&self.own),
            counted: Counted::new(&self.metrics, network),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (udp, ctx, stop) = (Arc::clone(&udp), Arc::clone(&ctx), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("weft-dns-udp".into())
                .spawn(move || serve_udp(&udp, &ctx, &stop))
                .map_err(|e| AgentError::Io {
                    what: format!("DNS for network {network}: starting its UDP thread"),
                    source: e,
                })?
        };
        let udp = UdpThread {
            sock: udp,
            stop,
            thread: Some(thread),
        };
        let tasks = vec![self.runtime.spawn(serve_tcp(tcp, ctx))];
        self.own
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(gateway);
        if let Some((_, old, _old_udp)) = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(network.to_string(), (gateway, tasks, udp))
        {
            old.into_iter().for_each(|t| t.abort());
        }
        Ok(())
    }

    pub fn stop(&self, network: &str) {
        if let Some((gw, tasks, _udp)) = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(network)
        {
            tasks.into_iter().for_each(|t| t.abort());
            self.own
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|a| *a != gw);
        }
    }
}

/// A network's UDP socket and the thread serving it; dropping this stops
/// the thread and waits for it, so the address is free again (but for
/// forwards still under way, which hold the socket to send their reply).
struct UdpThread {
    sock: Arc<std::net::UdpSocket>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for UdpThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread from its receive (Linux returns at once from a
        // receive on a UDP socket shut down for reading).
        // SAFETY: the descriptor is open: `self.sock` holds it.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RD) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Ctx {
    network: String,
    names: Arc<RwLock<Names>>,
    upstream: Arc<Upstream>,
    own: Arc<RwLock<Vec<Ipv4Addr>>>,
    counted: Counted,
}

/// One network's DNS counters, found once when it starts serving (the hot
/// path bumps atomics only).
struct Counted {
    local: Arc<Counter>,
    nxdomain: Arc<Counter>,
    refused: Arc<Counter>,
    error: Arc<Counter>,
    forwarded: Arc<Counter>,
    failed: Arc<Counter>,
    local_latency: Arc<Histogram>,
    forwarded_latency: Arc<Histogram>,
}

impl Counted {
    fn new(m: &Metrics, network: &str) -> Counted {
        let q = |answer: &str| m.dns_queries.with(&[network, answer]);
        Counted {
            local: q("local"),
            nxdomain: q("nxdomain"),
            refused: q("refused"),
            error: q("error"),
            forwarded: q("forwarded"),
            failed: q("failed"),
            local_latency: m.dns_latency.with(&["local"]),
            forwarded_latency: m.dns_latency.with(&["forwarded"]),
        }
    }

    /// An answer made here, by its response code.
    fn answered(&self, reply: &[u8], began: std::time::Instant) {
        match reply.get(3).map(|b| b & 0x0f) {
            Some(0) => self.local.inc(),
            Some(3) => self.nxdomain.inc(),
            Some(5) => self.refused.inc(),
            _ => self.error.inc(),
        }
        self.local_latency.observe_duration(began.elapsed());
    }

    fn forward_done(&self, answered: bool, began: std::time::Instant) {
        if answered {
            self.forwarded.inc();
            self.forwarded_latency.observe_duration(began.elapsed());
        } else {
            self.failed.inc();
        }
    }
}

impl Ctx {
    fn decide(&self, query: &[u8], client: IpAddr) -> Outcome {
        let IpAddr::V4(client) = client else {
            return Outcome::Drop;
        };
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        answer(query, &self.network, client, &names)
    }

    fn servers(&self) -> Vec<SocketAddr> {
        let conf = self.upstream.shared();
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        conf.nameservers
            .iter()
            .filter(|ip| !matches!(ip, IpAddr::V4(v4) if own.contains(v4)))
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    }
}

/// Queries taken (and replies sent) per system call.
const BATCH: usize = 32;
/// Room for one query; a longer one is cut, as a single receive would.
const QUERY_BUF: usize = 4096;

/// Serves one network's UDP socket on a thread of its own, without the
/// async runtime: queries come in batches (recvmmsg), names are answered
/// right there under one read lock per batch, without a copy or (for the
/// common query) an allocation, and the replies go out together
/// (sendmmsg). Forwards are sent from here too, on non-blocking upstream
/// sockets that the same poll(2) watches, so a slow upstream never holds
/// up local names or other forwards.
fn serve_udp(sock: &std::net::UdpSocket, ctx: &Ctx, stop: &AtomicBool) {
    let fd = sock.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * QUERY_BUF];
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut peers: [libc::sockaddr_in; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: Vec<libc::iovec> = bufs
        .chunks_mut(QUERY_BUF)
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut replies: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(512)).collect();
    let mut reply_to: Vec<libc::sockaddr_in> = Vec::with_capacity(BATCH);
    let mut fwd = Forwarder::new(&ctx.counted);
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        fds.clear();
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        fds.extend(fwd.pending.iter().map(|p| libc::pollfd {
            fd: p.sock.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        let timeout = fwd.next_deadline().map_or(-1, |d| {
            let left = d.saturating_duration_since(std::time::Instant::now());
            // Rounded up: waking early would only poll again.
            (left.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
        });
        // SAFETY: `fds` is a live array of that many pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!(network = %ctx.network, error = %e, "DNS poll failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // Upstream answers and timeouts first, while `fds` still matches
        // the pending list; new forwards are added after.
        fwd.progress(&fds[1..], sock);
        if fds[0].revents == 0 {
            continue;
        }
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut peers[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_len = 0;
        }
        // Whatever is queued, without waiting.
        // SAFETY: every header points at live buffers of the given sizes.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ) {
                warn!(network = %ctx.network, error = %e, "DNS receive failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let n = n as usize;
        reply_to.clear();
        {
            let names = ctx.names.read().unwrap_or_else(|e| e.into_inner());
            for i in 0..n {
                let len = (msgs[i].msg_len as usize).min(QUERY_BUF);
                let query = &bufs[i * QUERY_BUF..i * QUERY_BUF + len];
                let peer = peers[i];
                let client = Ipv4Addr::from(u32::from_be(peer.sin_addr.s_addr));
                let out = &mut replies[reply_to.len()];
                let began = std::time::Instant::now();
                match answer_into(query, &ctx.network, client, &names, out) {
                    Written::Reply => {
                        ctx.counted.answered(out, began);
                        reply_to.push(peer)
                    }
                    Written::Drop => {}
                    Written::Forward => {
                        let peer = SocketAddrV4::new(client, u16::from_be(peer.sin_port));
                        fwd.start(ctx, query, peer, sock, began);
                    }
                }
            }
        }
        send_replies(fd, &replies[..reply_to.len()], &mut reply_to);
    }
}

/// Sends `replies[i]` to `to[i]`, all in as few system calls as the kernel
/// allows; a reply that cannot be sent is skipped, as a failed send_to was.
fn send_replies(fd: i32, replies: &[Vec<u8>], to: &mut [libc::sockaddr_in]) {
    let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: all-zero is a valid mmsghdr.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, r) in replies.iter().enumerate() {
        iovs[i] = libc::iovec {
            iov_base: r.as_ptr() as *mut libc::c_void,
            iov_len: r.len(),
        };
        msgs[i].msg_hdr.msg_name = (&mut to[i] as *mut libc::sockaddr_in).cast();
        msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let mut done = 0;
    while done < replies.len() {
        // SAFETY: the headers point at the replies and addresses, alive here.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                msgs[done..].as_mut_ptr(),
                (replies.len() - done) as u32,
                0,
            )
        };
        match sent {
            s if s > 0 => done += s as usize,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            // The first of the rest failed (say, the client's address is
            // unreachable): skip it, send the others.
            _ => done += 1,
        }
    }
}

/// A query on its way to an upstream server.
struct Pending {
    /// Connected to `servers[next]`, non-blocking.
    sock: UpstreamSocket,
    query: Vec<u8>,
    client: SocketAddrV4,
    servers: Vec<SocketAddr>,
    next: usize,
    deadline: std::time::Instant,
    /// When the query came in, for its latency.
    began: std::time::Instant,
}

struct UpstreamSocket {
    sock: std::net::UdpSocket,
    uses: u32,
}

/// The forwards of one network's UDP thread. Each upstream server is asked
/// in turn, [`UPSTREAM_TIMEOUT`] each, and the first answer with the
/// query's id goes back unchanged; SERVFAIL when none answers. Sockets are
/// kept between forwards, since binding and connecting one per query costs
/// more than the forward itself: a socket goes back to the pool only after
/// its answer came (never after a timeout, when a late answer may still be
/// on its way), stale datagrams are drained before it is used again, and
/// it is retired after [`Forwarder::MAX_USES`] queries, so that source
/// ports keep changing as they did with a socket per query.
struct Forwarder<'a> {
    counted: &'a Counted,
    pending: Vec<Pending>,
    idle: HashMap<SocketAddr, Vec<UpstreamSocket>>,
    buf: Vec<u8>,
}

impl<'a> Forwarder<'a> {
    const MAX_USES: u32 = 64;

    fn new(counted: &'a Counted) -> Self {
        Forwarder {
            counted,
            pending: Vec::new(),
            idle: HashMap::new(),
            buf: Vec::new(),
        }
    }
    /// Idle sockets kept per server.
    const MAX_IDLE: usize = 64;

    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    fn start(
        &mut self,
        ctx: &Ctx,
        query: &[u8],
        client: SocketAddrV4,
        listen: &std::net::UdpSocket,
        began: std::time::Instant,
    ) {
        let servers = ctx.servers();
        self.ask(query.to_vec(), client, servers, 0, listen, began);
    }

    /// Sends the query to `servers[next]`, or the first after it that
    /// takes it; SERVFAIL to the client when none is left.
    fn ask(
        &mut self,
        query: Vec<u8>,
        client: SocketAddrV4,
        servers: Vec<SocketAddr>,
        mut next: usize,
        listen: &std::net::UdpSocket,
        began: std::time::Instant,
    ) {
        while let Some(&server) = servers.get(next) {
            match self.socket(server) {
                Ok(sock) => match sock.sock.send(&query) {
                    Ok(_) => {
                        self.pending.push(Pending {
                            sock,
                            query,
                            client,
                            servers,
                            next,
                            deadline: std::time::Instant::now() + UPSTREAM_TIMEOUT,
                            began,
                        });
                        return;
                    }
                    Err(e) => {
                        debug!(%server, error = %e, "upstream did not answer; trying the next")
                    }
                },
                Err(e) => debug!(%server, error = %e, "upstream did not answer; trying the next"),
            }
            next += 1;
        }
        let reply = match server_failure(&query) {
            Outcome::Reply(r) => r,
            _ => Vec::new(),
        };
        self.counted.forward_done(false, began);
        let _ = listen.send_to(&reply, client);
    }

    /// A connected, non-blocking socket to `server`: an idle one, drained,
    /// or a new one.
    fn socket(&mut self, server: SocketAddr) -> std::io::Result<UpstreamSocket> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; 65535];
        }
        if let Some(s) = self.idle.get_mut(&server).and_then(Vec::pop) {
            // A duplicate of an earlier answer must not pass for this one.
            while s.sock.recv(&mut self.buf).is_ok() {}
            return Ok(s);
        }
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("valid");
        let sock = std::net::UdpSocket::bind(local)?;
        sock.connect(server)?;
        sock.set_nonblocking(true)?;
        Ok(UpstreamSocket { sock, uses: 0 })
    }

    /// Takes the answers that came (`ready[i]` is the poll entry of
    /// `pending[i]`) and moves on the forwards whose time is up.
    fn progress(&mut self, ready: &[libc::pollfd], listen: &std::net::UdpSocket) {
        let now = std::time::Instant::now();
        // Backwards, so that swap_remove only moves entries already seen.
        for i in (0..ready.len().min(self.pending.len())).rev() {
            let p = &self.pending[i];
            let mut answered = None;
            let mut failed = false;
            if ready[i].revents != 0 {
                loop {
                    match p.sock.sock.recv(&mut self.buf) {
                        // Only the answer to this query (same id) counts.
                        Ok(n) if n >= 2 && p.query.len() >= 2 && self.buf[..2] == p.query[..2] => {
                            answered = Some(n);
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            debug!(server = %p.servers[p.next], error = %e, "upstream did not answer; trying the next");
                            failed = true;
                            break;
                        }
                    }
                }
            }
            if let Some(n) = answered {
                let mut p = self.pending.swap_remove(i);
                let _ = listen.send_to(&self.buf[..n], p.client);
                self.counted.forward_done(true, p.began);
                p.sock.uses += 1;
                let idle = self.idle.entry(p.servers[p.next]).or_default();
                if p.sock.uses < Self::MAX_USES && idle.len() < Self::MAX_IDLE {
                    idle.push(p.sock);
                }
            } else if failed || p.deadline <= now {
                if !failed {
                    debug!(server = %p.servers[p.next], "upstream did not answer in time; trying the next");
                }
                // The socket goes: an answer may still come to it.
                let p = self.pending.swap_remove(i);
                self.ask(p.query, p.client, p.servers, p.next + 1, listen, p.began);
            }
        }
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                warn!(network = %ctx.network, error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Messages are length-prefixed; a connection may carry several.
            loop {
                let read = tokio::time::timeout(Duration::from_secs(10), async {
                    let len = stream.read_u16().await? as usize;
                    let mut q = vec![0u8; len];
                    stream.read_exact(&mut q).await?;
                    Ok::<_, std::io::Error>(q)
                })
                .await;
                let Ok(Ok(query)) = read else { return };
                let began = std::time::Instant::now();
                let reply = match ctx.decide(&query, peer.ip()) {
                    Outcome::Reply(r) => {
                        ctx.counted.answered(&r, began);
                        r
                    }
                    Outcome::Drop => return,
                    Outcome::Forward => {
                        let (r, answered) = forward_tcp(&ctx, &query).await;
                        ctx.counted.forward_done(answered, began);
                        r
                    }
                };
                if reply.is_empty() || reply.len() > usize::from(u16::MAX) {
                    return;
                }
                let mut out = (reply.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&reply);
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The upstream's answer (true) or a SERVFAIL (false).
async fn forward_tcp(ctx: &Ctx, query: &[u8]) -> (Vec<u8>, bool) {
    for server in ctx.servers() {
        let asked = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            let mut s = tokio::net::TcpStream::connect(server).await?;
            let mut out = (query.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(query);
            s.write_all(&out).await?;
            let len = s.read_u16().await? as usize;
            let mut r = vec![0u8; len];
            s.read_exact(&mut r).await?;
            Ok::<_, std::io::Error>(r)
        })
        .await;
        if let Ok(Ok(r)) = asked {
            return (r, true);
        }
    }
    match server_failure(query) {
        Outcome::Reply(r) => (r, false),
        _ => (Vec::new(), false),
    }
}

/// What a sandbox's /etc/resolv.conf says. On a user-defined bridge network:
/// weft's resolver (`embedded`: the first such network's gateway). On the default bridge only,
/// as with Docker: the host's servers, without the loopback ones a sandbox
/// cannot reach (then Docker's public fallback). `--dns`, `--dns-search` and
/// `--dns-option` replace the respective parts.
pub(crate) fn resolv_for(
    host: &weft_dns::ResolvConf,
    embedded: Option<Ipv4Addr>,
    dns: &[IpAddr],
    dns_search: &[String],
    dns_options: &[String],
) -> weft_dns::ResolvConf {
    let nameservers = if !dns.is_empty() {
        dns.to_vec()
    } else if let Some(gw) = embedded {
        vec![IpAddr::V4(gw)]
    } else {
        let usable: Vec<IpAddr> = host
            .nameservers
            .iter()
            .copied()
            .filter(|ip| !ip.is_loopback())
            .collect();
        if usable.is_empty() {
            vec![
                IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
                IpAddr::V4(Ipv4Addr::new(8, 8, 4, 4)),
            ]
        } else {
            usable
        }
    };
    let pick = |given: &[String], hosts: &[String]| {
        if given.is_empty() {
            hosts.to_vec()
        } else {
            given.to_vec()
        }
    };
    weft_dns::ResolvConf {
        nameservers,
        search: pick(dns_search, &host.search),
        options: pick(dns_options, &host.options),
    }
}
