//! The embedded resolver's I/O: a UDP and a TCP listener on the gateway
//! address of every user-defined network, answering from the name table
//! (weft-dns) and forwarding everything else to the host's upstream servers.
//!
//! Why the gateway and not 127.0.0.11 inside each sandbox (Docker's way):
//! one pair of sockets per network in the agent's namespace serves every
//! sandbox, needs no socket or NAT rule inside sandboxes, and the network a
//! query came in on, with its source address, tells which names it may see.

use crate::error::{AgentError, Result};
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
    /// Connected sockets to upstream servers, reused across forwards.
    pool: Arc<UpstreamPool>,
    runtime: tokio::runtime::Handle,
}

impl Resolver {
    pub fn new(resolv_conf: PathBuf) -> Resolver {
        Resolver {
            names: Default::default(),
            upstream: Arc::new(Upstream::new(resolv_conf)),
            own: Default::default(),
            listeners: Mutex::new(HashMap::new()),
            pool: Default::default(),
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
            pool: Arc::clone(&self.pool),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (udp, ctx, stop) = (Arc::clone(&udp), Arc::clone(&ctx), Arc::clone(&stop));
            let runtime = self.runtime.clone();
            std::thread::Builder::new()
                .name("weft-dns-udp".into())
                .spawn(move || serve_udp(&udp, &ctx, &stop, &runtime))
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
    pool: Arc<UpstreamPool>,
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

/// Serves one network's UDP socket on a thread of its own: queries come in
/// batches (recvmmsg), names are answered right there under one read lock
/// per batch, without a task, a copy or (for the common query) an
/// allocation, and the replies go out together (sendmmsg). Only forwards
/// go to the async runtime, so a slow upstream never holds up local names.
fn serve_udp(
    sock: &Arc<std::net::UdpSocket>,
    ctx: &Arc<Ctx>,
    stop: &AtomicBool,
    runtime: &tokio::runtime::Handle,
) {
    let fd = sock.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * QUERY_BUF];
    // SAFETY (both): all-zero is a valid sockaddr_in and mmsghdr.
    let mut peers: [libc::sockaddr_in; BATCH] = unsafe { std::mem::zeroed() };
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
    while !stop.load(Ordering::SeqCst) {
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut peers[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_len = 0;
        }
        // Blocks for the first query, then takes whatever else is queued.
        // SAFETY: every header points at live buffers of the given sizes.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
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
                match answer_into(query, &ctx.network, client, &names, out) {
                    Written::Reply => reply_to.push(peer),
                    Written::Drop => {}
                    Written::Forward => {
                        let peer = SocketAddrV4::new(client, u16::from_be(peer.sin_port));
                        let (query, sock, ctx) =
                            (query.to_vec(), Arc::clone(sock), Arc::clone(ctx));
                        runtime.spawn(async move {
                            let reply = forward_udp(&ctx, &query).await;
                            let _ = sock.send_to(&reply, peer);
                        });
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

/// Asks each upstream in turn; the first answer is passed back unchanged.
async fn forward_udp(ctx: &Ctx, query: &[u8]) -> Vec<u8> {
    for server in ctx.servers() {
        match ctx.pool.ask(server, query).await {
            Ok(r) => return r,
            Err(e) => debug!(%server, error = %e, "upstream did not answer; trying the next"),
        }
    }
    match server_failure(query) {
        Outcome::Reply(r) => r,
        _ => Vec::new(),
    }
}

/// A connected socket to one upstream server, with its receive buffer.
struct UpstreamSocket {
    sock: tokio::net::UdpSocket,
    buf: Box<[u8]>,
    uses: u32,
}

/// Sockets to upstream servers kept between forwards: binding, connecting
/// and registering a socket for each query cost more than the forward's
/// own send and receive. A socket goes back only after its answer came
/// (never after a timeout, when a late answer may still be on its way),
/// and is retired after [`UpstreamPool::MAX_USES`] queries, so that the
/// source ports keep changing as they did with a socket per query.
#[derive(Default)]
struct UpstreamPool {
    idle: Mutex<HashMap<SocketAddr, Vec<UpstreamSocket>>>,
}

impl UpstreamPool {
    const MAX_USES: u32 = 64;
    /// Idle sockets kept per server.
    const MAX_IDLE: usize = 64;

    async fn ask(&self, server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&server)
            .and_then(Vec::pop);
        let mut s = match pooled {
            Some(s) => s,
            None => UpstreamSocket {
                sock: connect_udp(server).await?,
                buf: vec![0u8; 65535].into_boxed_slice(),
                uses: 0,
            },
        };
        // A duplicate of an earlier answer must not pass for this one.
        while s.sock.try_recv(&mut s.buf).is_ok() {}
        s.sock.send(query).await?;
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        loop {
            let n = tokio::time::timeout_at(deadline, s.sock.recv(&mut s.buf))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
            // Only the answer to this query (same id) counts.
            if n >= 2 && query.len() >= 2 && s.buf[..2] == query[..2] {
                let reply = s.buf[..n].to_vec();
                s.uses += 1;
                if s.uses < Self::MAX_USES {
                    let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                    let list = idle.entry(server).or_default();
                    if list.len() < Self::MAX_IDLE {
                        list.push(s);
                    }
                }
                return Ok(reply);
            }
        }
    }
}

async fn connect_udp(server: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("valid");
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    Ok(sock)
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
                let reply = match ctx.decide(&query, peer.ip()) {
                    Outcome::Reply(r) => r,
                    Outcome::Drop => return,
                    Outcome::Forward => forward_tcp(&ctx, &query).await,
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

async fn forward_tcp(ctx: &Ctx, query: &[u8]) -> Vec<u8> {
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
            return r;
        }
    }
    match server_failure(query) {
        Outcome::Reply(r) => r,
        _ => Vec::new(),
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
