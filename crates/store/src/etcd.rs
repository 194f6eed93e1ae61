//! The etcd store: global state shared by every host of a cluster.
//!
//! A thin typed layer over etcd's v3 API (etcd-client, gRPC). All keys are
//! relative to a prefix (`--etcd-prefix`, default `/weft`). The primitives
//! are the ones the cluster needs and no more: list with the revision it
//! was read at, create-if-absent in one transaction (several keys at once),
//! put/delete guarded by the current value, leases, and a watch from a
//! revision that reports compaction as its own error so the caller relists.

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How the client proves itself to etcd and checks etcd: flannel's flags.
#[derive(Debug, Clone, Default)]
pub struct EtcdSecurity {
    /// The CA that signed etcd's server certificate (needed for https).
    pub ca_file: Option<PathBuf>,
    /// This host's client certificate and its key (etcd's --client-cert-auth).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd's own users (etcd's `auth enable`), with the password read from a file.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// What a connection failure means, for the caller to decide whether
/// retrying can help: a TLS or authentication failure never heals by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// etcd did not answer (down, unreachable, timed out): retry.
    Unreachable,
    /// The TLS handshake failed: wrong CA, a certificate etcd refuses.
    Tls,
    /// etcd refused the user name, password or permissions.
    Auth,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints}: {}", plain(source))]
    Rpc {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("the watch started at revision {0}, which etcd has compacted; list again")]
    Compacted(i64),
    #[error("the watch was cancelled by etcd: {0}")]
    Cancelled(String),
    #[error("lease {0} has expired")]
    LeaseGone(i64),
    /// A flag's value is wrong before anything is sent (a file missing...).
    #[error("{0}")]
    Config(String),
    /// The start-time TLS probe failed (handshake, or etcd's alert after it).
    #[error("etcd at {endpoint}: {}", tls_hint(message))]
    Tls { endpoint: String, message: String },
}

/// A TLS failure as a sentence with what to check, by which side refused.
fn tls_hint(s: &str) -> String {
    if s.contains("invalid peer certificate") {
        format!(
            "TLS with etcd failed, etcd's certificate is not trusted ({s}); --etcd-cafile must be the CA certificate that signed etcd's server certificate, and the certificate must name the endpoint's address"
        )
    } else {
        format!(
            "TLS with etcd failed ({s}); etcd refused this host's client certificate or the handshake: --etcd-certfile must be signed by the CA etcd trusts (its --trusted-ca-file), not expired, and --etcd-cafile the CA of etcd's certificate"
        )
    }
}

impl EtcdError {
    /// Whether retrying can help (see [`FailureKind`]).
    pub fn kind(&self) -> FailureKind {
        match self {
            EtcdError::Rpc { source, .. } => classify(source),
            EtcdError::Config(_) => FailureKind::Other,
            EtcdError::Tls { .. } => FailureKind::Tls,
            _ => FailureKind::Unreachable,
        }
    }
}

/// Every message in an error's source chain, outermost first (from the
/// gRPC status or transport error inside, whose sources hold the cause).
fn chain(e: &etcd_client::Error) -> Vec<String> {
    match e {
        etcd_client::Error::GRpcStatus(s) => chain_of(s),
        etcd_client::Error::TransportError(t) => chain_of(t),
        other => chain_of(other),
    }
}

fn chain_of(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out
}

fn classify(e: &etcd_client::Error) -> FailureKind {
    let all = chain(e).join(": ").to_lowercase();
    if let etcd_client::Error::GRpcStatus(s) = e {
        // gRPC's UNAUTHENTICATED (16) and PERMISSION_DENIED (7).
        let code = s.code() as i32;
        if code == 16
            || code == 7
            || all.contains("authentication failed")
            || all.contains("permission denied")
            || all.contains("user name is empty")
        {
            return FailureKind::Auth;
        }
    }
    if all.contains("certificate")
        || all.contains("tls")
        || all.contains("handshake")
        || all.contains("alert")
    {
        return FailureKind::Tls;
    }
    match e {
        etcd_client::Error::GRpcStatus(_) | etcd_client::Error::TransportError(_) => {
            FailureKind::Unreachable
        }
        _ => FailureKind::Other,
    }
}

pub type EtcdResult<T> = std::result::Result<T, EtcdError>;

/// An etcd client error as a sentence: a gRPC status's message and what
/// its code means, not tonic's debug dump of the status and its metadata.
fn plain(e: &etcd_client::Error) -> String {
    let s = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            let m = m.strip_prefix("tcp connect error: ").unwrap_or(m);
            let what = s.code().description().to_lowercase();
            if m.is_empty() {
                what
            } else {
                format!("{m} ({what})")
            }
        }
        other => other.to_string(),
    };
    // A transport error's cause is deep in the source chain (tonic,
    // hyper, rustls); without it the message is only "transport error".
    let s = match (e, chain(e).pop()) {
        (etcd_client::Error::TransportError(_), Some(d)) if !s.contains(&d) => format!("{s}: {d}"),
        _ => s,
    };
    // The TLS alert or certificate problem itself, when the chain has it.
    let cause = chain(e).into_iter().rev().find(|m| {
        let l = m.to_lowercase();
        (l.contains("alert") || l.contains("certificate")) && !m.contains('{')
    });
    let s = match cause {
        Some(c) if !s.contains(&c) => format!("{s}: {c}"),
        _ => s,
    };
    match classify(e) {
        FailureKind::Tls => tls_hint(&s),
        FailureKind::Auth => format!(
            "etcd refused the credentials ({s}); check --etcd-username and the password in --etcd-password-file"
        ),
        _ => s,
    }
}

/// One change seen by a watch. `value` is empty for deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub revision: i64,
}

#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: String,
    /// Kept for [`Etcd::probe`], which connects to each endpoint itself.
    opts: ConnectOptions,
    tls: Option<TlsOptions>,
    /// PEM of the CA, and of the client certificate and key if any.
    tls_files: Option<TlsFiles>,
    timeout: Duration,
}

#[derive(Clone)]
struct TlsFiles {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Etcd {
    /// Makes the client; connecting happens in the background, so this
    /// succeeds while etcd is down and each call then fails after `timeout`.
    /// With a user name, the password is checked here (etcd hands out a
    /// token), so that call needs etcd up.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
        security: &EtcdSecurity,
    ) -> EtcdResult<Etcd> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        let (tls, tls_files) = match tls_options(endpoints, security)? {
            Some((t, f)) => (Some(t), Some(f)),
            None => (None, None),
        };
        if let Some(tls) = &tls {
            opts = opts.with_tls(tls.clone());
        }
        if let Some(user) = &security.username {
            let Some(pf) = &security.password_file else {
                return Err(EtcdError::Config(
                    "--etcd-username needs --etcd-password-file (a file holding the password)"
                        .into(),
                ));
            };
            let pw = read(pf, "--etcd-password-file")?;
            let pw = String::from_utf8(pw).map_err(|_| {
                EtcdError::Config(format!(
                    "--etcd-password-file {}: not UTF-8 text",
                    pf.display()
                ))
            })?;
            // A trailing newline is the file's, not the password's.
            opts = opts.with_user(user.clone(), pw.trim_end_matches(['\r', '\n']));
        } else if security.password_file.is_some() {
            return Err(EtcdError::Config(
                "--etcd-password-file needs --etcd-username".into(),
            ));
        }
        let joined = endpoints.join(",");
        let client = Client::connect(endpoints, Some(opts.clone()))
            .await
            .map_err(|source| EtcdError::Rpc {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(Etcd {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: joined,
            opts,
            tls,
            tls_files,
            timeout,
        })
    }

    /// One cheap request to each endpoint until one answers, to learn at
    /// start whether TLS and credentials work. The client's balanced channel
    /// retries a refused handshake until its timeout and reports only
    /// "cancelled"; a direct connection reports why, naming the endpoint.
    /// A TLS or authentication failure is returned at once.
    pub async fn probe(&self) -> EtcdResult<()> {
        let mut last = None;
        for ep in self.endpoints.split(',') {
            match self.probe_one(ep).await {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.kind(), FailureKind::Tls | FailureKind::Auth) => {
                    return Err(e)
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Config("no etcd endpoints".into())))
    }

    async fn probe_one(&self, ep: &str) -> EtcdResult<()> {
        let err = |source| EtcdError::Rpc {
            endpoints: ep.to_string(),
            source,
        };
        let transport = |e| err(etcd_client::Error::TransportError(e));
        if let Some(files) = &self.tls_files {
            tls_probe(ep, files, self.timeout)
                .await
                .map_err(|message| EtcdError::Tls {
                    endpoint: ep.to_string(),
                    message,
                })?;
        }
        let mut endpoint = tonic::transport::Endpoint::from_shared(ep.to_string())
            .map_err(transport)?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(transport)?;
        }
        let channel = endpoint.connect().await.map_err(transport)?;
        // With a user, this authenticates: a bad password fails here.
        let client = Client::from_channel(
            etcd_client::Channel::Tonic(channel),
            Some(self.opts.clone()),
        )
        .await
        .map_err(err)?;
        client
            .kv_client()
            .get(
                self.full("networks/"),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Whether the connection is plain text (http:// endpoints).
    pub fn is_plaintext(&self) -> bool {
        !self.endpoints.split(',').all(|e| e.starts_with("https://"))
    }

    fn rpc(&self, source: etcd_client::Error) -> EtcdError {
        EtcdError::Rpc {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    fn relative(&self, key: &[u8]) -> String {
        let k = String::from_utf8_lossy(key);
        k.strip_prefix(&self.prefix)
            .map(|r| r.trim_start_matches('/').to_string())
            .unwrap_or_else(|| k.into_owned())
    }

    /// Every key under `dir` and the revision the list was read at.
    pub async fn list(&self, dir: &str) -> EtcdResult<(Vec<(String, Vec<u8>)>, i64)> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(dir), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.rpc(e))?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| (self.relative(kv.key()), kv.value().to_vec()))
            .collect();
        Ok((kvs, rev))
    }

    pub async fn get(&self, key: &str) -> EtcdResult<Option<Vec<u8>>> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(key), None)
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes every key only if none of them exists yet, atomically; returns
    /// whether it wrote. `lease` binds the keys to an etcd lease.
    pub async fn create(&self, kvs: &[(String, Vec<u8>)], lease: Option<i64>) -> EtcdResult<bool> {
        let compares: Vec<Compare> = kvs
            .iter()
            .map(|(k, _)| Compare::create_revision(self.full(k), CompareOp::Equal, 0))
            .collect();
        let puts: Vec<TxnOp> = kvs
            .iter()
            .map(|(k, v)| TxnOp::put(self.full(k), v.clone(), put_opts(lease)))
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when(compares).and_then(puts))
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.succeeded())
    }

    /// Replaces `key` only if its value is still `expected`.
    pub async fn replace(
        &self,
        key: &str,
        expected: &[u8],
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> EtcdResult<bool> {
        let resp = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::value(self.full(key), CompareOp::Equal, expected)])
                    .and_then([TxnOp::put(self.full(key), value, put_opts(lease))]),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.succeeded())
    }

    /// Deletes `key` only if its value is still `expected`.
    pub async fn delete_if(&self, key: &str, expected: &[u8]) -> EtcdResult<bool> {
        let resp = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::value(self.full(key), CompareOp::Equal, expected)])
                    .and_then([TxnOp::delete(self.full(key), None)]),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.succeeded())
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> EtcdResult<()> {
        self.client
            .kv_client()
            .put(self.full(key), value, put_opts(lease))
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(())
    }

    /// Deletes one key; returns whether it existed.
    pub async fn delete(&self, key: &str) -> EtcdResult<bool> {
        let resp = self
            .client
            .kv_client()
            .delete(self.full(key), None)
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.deleted() > 0)
    }

    /// Deletes every key under `dir`; returns how many.
    pub async fn delete_prefix(&self, dir: &str) -> EtcdResult<i64> {
        let resp = self
            .client
            .kv_client()
            .delete(
                self.full(dir),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.deleted())
    }

    pub async fn grant(&self, ttl: i64) -> EtcdResult<i64> {
        let resp = self
            .client
            .lease_client()
            .grant(ttl, None)
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(resp.id())
    }

    /// Renews a lease once; `LeaseGone` if it has expired.
    pub async fn keep_alive(&self, lease: i64) -> EtcdResult<i64> {
        let mut lc = self.client.lease_client();
        let (mut keeper, mut stream) = lc.keep_alive(lease).await.map_err(|e| self.rpc(e))?;
        keeper.keep_alive().await.map_err(|e| self.rpc(e))?;
        match stream.message().await.map_err(|e| self.rpc(e))? {
            Some(r) if r.ttl() > 0 => Ok(r.ttl()),
            _ => Err(EtcdError::LeaseGone(lease)),
        }
    }

    pub async fn revoke(&self, lease: i64) -> EtcdResult<()> {
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            // Already expired: what the caller wanted.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
            Err(e) => Err(self.rpc(e)),
        }
    }

    /// Watches every key under `dir` from `revision` (inclusive).
    pub async fn watch(&self, dir: &str, revision: i64) -> EtcdResult<Watch> {
        let stream = self
            .client
            .watch_client()
            .watch(
                self.full(dir),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision)
                        .with_progress_notify(),
                ),
            )
            .await
            .map_err(|e| self.rpc(e))?;
        Ok(Watch {
            stream,
            etcd: self.clone(),
        })
    }
}

fn read(path: &Path, flag: &str) -> EtcdResult<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| EtcdError::Config(format!("{flag} {}: cannot read it: {e}", path.display())))
}

/// The TLS settings for `endpoints`, refusing a mix that cannot work.
fn tls_options(
    endpoints: &[String],
    s: &EtcdSecurity,
) -> EtcdResult<Option<(TlsOptions, TlsFiles)>> {
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    let files = s.ca_file.is_some() || s.cert_file.is_some() || s.key_file.is_some();
    if https == 0 {
        if files {
            return Err(EtcdError::Config(format!(
                "--etcd-cafile/--etcd-certfile/--etcd-keyfile are for https:// endpoints, but --etcd-endpoints is {}; use https:// URLs",
                endpoints.join(",")
            )));
        }
        return Ok(None);
    }
    if https != endpoints.len() {
        return Err(EtcdError::Config(format!(
            "--etcd-endpoints {} mixes http:// and https://; use https:// for every endpoint",
            endpoints.join(",")
        )));
    }
    let Some(ca) = &s.ca_file else {
        return Err(EtcdError::Config(
            "https:// endpoints need --etcd-cafile: the CA certificate (PEM) that signed etcd's server certificate".into(),
        ));
    };
    let ca = read(ca, "--etcd-cafile")?;
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(&ca));
    let mut files = TlsFiles { ca, identity: None };
    match (&s.cert_file, &s.key_file) {
        (Some(c), Some(k)) => {
            let (c, k) = (read(c, "--etcd-certfile")?, read(k, "--etcd-keyfile")?);
            tls = tls.identity(Identity::from_pem(&c, &k));
            files.identity = Some((c, k));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Config(
                "--etcd-certfile and --etcd-keyfile go together: the client certificate and its private key".into(),
            ))
        }
    }
    Ok(Some((tls, files)))
}

/// A TLS handshake with `ep` as the client would make it, then the
/// HTTP/2 preface: etcd answers with its settings, or with an alert when
/// it refuses the client certificate (TLS 1.3 sends that after the
/// handshake, which is why the handshake alone cannot tell). An endpoint
/// that does not answer at all is not this probe's business (Ok).
async fn tls_probe(ep: &str, files: &TlsFiles, timeout: Duration) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let hostport = ep
        .strip_prefix("https://")
        .unwrap_or(ep)
        .trim_end_matches('/');
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport, |(h, _)| h)
        .trim_matches(['[', ']']);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&files.ca) {
        let c = c.map_err(|e| format!("--etcd-cafile does not parse: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("--etcd-cafile is not a usable CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match &files.identity {
        Some((c, k)) => {
            let certs = CertificateDer::pem_slice_iter(c)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--etcd-certfile does not parse: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(k)
                .map_err(|e| format!("--etcd-keyfile does not parse: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("--etcd-certfile/--etcd-keyfile: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let Ok(Ok(tcp)) = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(hostport)).await
    else {
        return Ok(());
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut tls = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Ok(()),
    };
    // The HTTP/2 connection preface and an empty SETTINGS frame.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    if let Err(e) = tls.write_all(preface).await {
        return Err(e.to_string());
    }
    let mut buf = [0u8; 9];
    match tokio::time::timeout(timeout, tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("etcd closed the connection right after the handshake".into()),
        Ok(Ok(_)) | Err(_) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

fn put_opts(lease: Option<i64>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l))
}

pub struct Watch {
    stream: etcd_client::WatchStream,
    etcd: Etcd,
}

impl Watch {
    /// The next batch of changes (possibly empty, a progress notice);
    /// `None` when the stream ended. Compaction and cancellation are errors:
    /// the caller lists again and watches from the new revision.
    pub async fn next(&mut self) -> EtcdResult<Option<Vec<Change>>> {
        let Some(resp) = self.stream.message().await.map_err(|e| self.etcd.rpc(e))? else {
            return Ok(None);
        };
        if resp.compact_revision() > 0 {
            return Err(EtcdError::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(EtcdError::Cancelled(resp.cancel_reason().to_string()));
        }
        Ok(Some(
            resp.events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    Some(Change {
                        key: self.etcd.relative(kv.key()),
                        value: (ev.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                        revision: kv.mod_revision(),
                    })
                })
                .collect(),
        ))
    }
}
