//! A lab's certificates: a CA of its own, etcd's server certificate and
//! one client certificate per host (its CN and DNS name are the host's
//! name, which is what etcd maps to a user and what agents check leases
//! against). Made in-process with rcgen, ECDSA P-256, PEM files in
//! `<lab>/pki/`. Tests also use it for the certificates etcd must refuse:
//! one from another CA, one that has expired.

use crate::{io, LabError, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From a day ago for a year: what the lab uses.
    Current,
    /// Ended yesterday: what etcd must refuse.
    Expired,
}

/// A CA in a directory: `ca.pem` and `ca-key.pem`, and what it issued.
pub struct Pki {
    dir: PathBuf,
    name: String,
}

fn bad(what: &str) -> impl FnOnce(rcgen::Error) -> LabError + '_ {
    move |e| LabError::Failed(format!("cannot make {what}: {e}"))
}

impl Pki {
    /// The CA's subject: rebuilt from the name, so issuing later (tests)
    /// needs only the key file.
    fn ca_params(name: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, format!("weft lab {name} CA"));
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(2);
        p.not_after = now + Duration::days(366);
        p
    }

    /// Makes a new CA in `dir` (created), named `name` in its subject.
    pub fn create(dir: &Path, name: &str) -> Result<Pki> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let key = KeyPair::generate().map_err(bad("the CA's key"))?;
        let cert = Self::ca_params(name)
            .self_signed(&key)
            .map_err(bad("the CA certificate"))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        };
        write(&pki.ca_file(), cert.pem())?;
        write(&dir.join("ca-key.pem"), key.serialize_pem())?;
        Ok(pki)
    }

    /// The CA made earlier in `dir` by [`Pki::create`] with the same name.
    pub fn open(dir: &Path, name: &str) -> Pki {
        Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn files(&self, name: &str) -> CertFiles {
        CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        }
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let p = self.dir.join("ca-key.pem");
        let pem = std::fs::read_to_string(&p).map_err(io(format!("read {}", p.display())))?;
        let key = KeyPair::from_pem(&pem).map_err(bad("the CA's key"))?;
        Ok(Issuer::new(Self::ca_params(&self.name), key))
    }

    /// etcd's server certificate, for its address `ip`.
    pub fn issue_server(&self, name: &str, ip: Ipv4Addr) -> Result<CertFiles> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::IpAddress(ip.into())];
        // Client too: etcd's own gRPC gateway connects to etcd with it.
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(name, p, Validity::Current)
    }

    /// A client certificate whose CN and DNS name are `name`.
    pub fn issue_client(&self, name: &str, validity: Validity) -> Result<CertFiles> {
        let mut p = CertificateParams::new(vec![name.to_string()])
            .map_err(bad(&format!("a certificate for {name:?}")))?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(name, p, validity)
    }

    fn issue(&self, name: &str, mut p: CertificateParams, validity: Validity) -> Result<CertFiles> {
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        (p.not_before, p.not_after) = match validity {
            Validity::Current => (now - Duration::days(1), now + Duration::days(365)),
            Validity::Expired => (now - Duration::days(30), now - Duration::days(1)),
        };
        let key = KeyPair::generate().map_err(bad(&format!("{name}'s key")))?;
        let cert = p
            .signed_by(&key, &self.issuer()?)
            .map_err(bad(&format!("{name}'s certificate")))?;
        let f = self.files(name);
        write(&f.cert, cert.pem())?;
        write(&f.key, key.serialize_pem())?;
        Ok(f)
    }
}

/// Writes a file readable by root only (keys among them).
fn write(path: &Path, text: String) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io(format!("write {}", path.display())))
}
