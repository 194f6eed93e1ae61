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
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use weft_dns::{answer, server_failure, Names, Outcome};
use weft_model::Sandbox;

/// How long one upstream server gets before the next one is tried.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);

/// The host's upstream servers, from its resolv.conf, reread when it changes.
pub(crate) struct Upstream {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, weft_dns::ResolvConf)>,
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
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != mtime || mtime.is_none() {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            *cache = (mtime, weft_dns::parse_resolv_conf(&text));
        }
        cache.1.clone()
    }
}

type Listener = (Ipv4Addr, Vec<JoinHandle<()>>);

pub(crate) struct Resolver {
    names: Arc<RwLock<Names>>,
    upstream: Arc<Upstream>,
    /// Our own listening addresses, never used as upstreams (no loops).
    own: Arc<RwLock<Vec<Ipv4Addr>>>,
    /// network -> its listening address and the tasks serving it.
    listeners: Mutex<HashMap<String, Listener>>,
    runtime: tokio::runtime::Handle,
}

impl Resolver {
    pub fn new(resolv_conf: PathBuf) -> Resolver {
        Resolver {
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
        let udp = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
        udp.set_nonblocking(true).map_err(bind_err)?;
        let tcp = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        tcp.set_nonblocking(true).map_err(bind_err)?;
        let _guard = self.runtime.enter();
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(bind_err)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(bind_err)?;
        let ctx = Ctx {
            network: network.to_string(),
            names: Arc::clone(&self.names),
            upstream: Arc::clone(&self.upstream),
            own: Arc::clone(&self.own),
        };
        let tasks = vec![
            self.runtime.spawn(serve_udp(Arc::new(udp), ctx.clone())),
            self.runtime.spawn(serve_tcp(tcp, ctx)),
        ];
        self.own
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(gateway);
        if let Some((_, old)) = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(network.to_string(), (gateway, tasks))
        {
            old.into_iter().for_each(|t| t.abort());
        }
        Ok(())
    }

    pub fn stop(&self, network: &str) {
        if let Some((gw, tasks)) = self
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

#[derive(Clone)]
struct Ctx {
    network: String,
    names: Arc<RwLock<Names>>,
    upstream: Arc<Upstream>,
    own: Arc<RwLock<Vec<Ipv4Addr>>>,
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
        let own = self.own.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.upstream
            .conf()
            .nameservers
            .into_iter()
            .filter(|ip| !matches!(ip, IpAddr::V4(v4) if own.contains(v4)))
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }
}

async fn serve_udp(sock: Arc<tokio::net::UdpSocket>, ctx: Ctx) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!(network = %ctx.network, error = %e, "DNS receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (sock, ctx) = (Arc::clone(&sock), ctx.clone());
        // One task per query: a slow upstream never holds up local names.
        tokio::spawn(async move {
            let reply = match ctx.decide(&query, peer.ip()) {
                Outcome::Reply(r) => Some(r),
                Outcome::Drop => None,
                Outcome::Forward => Some(forward_udp(&ctx, &query).await),
            };
            if let Some(r) = reply {
                let _ = sock.send_to(&r, peer).await;
            }
        });
    }
}

/// Asks each upstream in turn; the first answer is passed back unchanged.
async fn forward_udp(ctx: &Ctx, query: &[u8]) -> Vec<u8> {
    for server in ctx.servers() {
        match ask_udp(server, query).await {
            Ok(r) => return r,
            Err(e) => debug!(%server, error = %e, "upstream did not answer; trying the next"),
        }
    }
    match server_failure(query) {
        Outcome::Reply(r) => r,
        _ => Vec::new(),
    }
}

async fn ask_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("valid");
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
        // Only the answer to this query (same id) counts.
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, ctx: Ctx) {
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
