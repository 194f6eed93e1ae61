//! Signed leases: who may claim what (docs/ARCHITECTURE.md). A host signs
//! each lease it writes with the private key of its etcd client
//! certificate and puts the certificate next to the signature; every other
//! host accepts a lease only if the certificate chains to the etcd CA
//! (`--etcd-cafile`), is valid for client authentication, names the
//! lease's node as a DNS name, and the signature covers the lease's content.
//! So a member can write etcd with its own credentials but cannot make a
//! lease that others believe comes from another host.

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use weft_model::blocks::EndpointRecord;
use weft_model::overlay::LeaseSignature;
use weft_model::Lease;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

enum Key {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// This host's signing key and the certificate that vouches for it.
pub(crate) struct Signer {
    cert_pem: String,
    key: Key,
    rng: SystemRandom,
}

fn bad(flag: &str, path: &Path, what: impl std::fmt::Display) -> String {
    format!("{flag} {}: {what}", path.display())
}

impl Signer {
    /// Loads the client certificate and its key (PEM); the key must be
    /// PKCS#8 (`openssl pkcs8 -topk8 -nocrypt` converts others).
    pub fn load(cert: &Path, key: &Path) -> Result<Signer, String> {
        let cert_pem = std::fs::read_to_string(cert)
            .map_err(|e| bad("--etcd-certfile", cert, format!("cannot read it: {e}")))?;
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad("--etcd-certfile", cert, format!("no PEM certificate: {e}")))?;
        let key_pem = std::fs::read(key)
            .map_err(|e| bad("--etcd-keyfile", key, format!("cannot read it: {e}")))?;
        let der = match PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
            Ok(_) => {
                return Err(bad(
                    "--etcd-keyfile",
                    key,
                    "not a PKCS#8 key (BEGIN PRIVATE KEY); convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`",
                ))
            }
            Err(e) => return Err(bad("--etcd-keyfile", key, format!("no PEM key: {e}"))),
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
            .or_else(|_| {
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, &der, &rng)
            })
            .map(Key::Ecdsa)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map(Key::Ed25519))
            .or_else(|_| RsaKeyPair::from_pkcs8(&der).map(Key::Rsa).map_err(|_| ()))
            .map_err(|_| {
                bad(
                    "--etcd-keyfile",
                    key,
                    "a key type weft cannot sign with (use ECDSA P-256/P-384, Ed25519 or RSA)",
                )
            })?;
        Ok(Signer { cert_pem, key, rng })
    }

    /// The lease with this host's signature.
    pub fn sign(&self, lease: Lease) -> Lease {
        Lease {
            signed: Some(self.signature(&lease.signed_bytes())),
            ..lease
        }
    }

    /// An endpoint record with this host's signature.
    pub fn sign_record(&self, r: EndpointRecord) -> EndpointRecord {
        EndpointRecord {
            signed: Some(self.signature(&r.signed_bytes())),
            ..r
        }
    }

    fn signature(&self, msg: &[u8]) -> LeaseSignature {
        let sig = match &self.key {
            Key::Ecdsa(k) => k.sign(&self.rng, msg).map(|s| s.as_ref().to_vec()),
            Key::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
            Key::Rsa(k) => {
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &self.rng, msg, &mut out)
                    .map(|_| out)
            }
        }
        // ring fails to sign only when the system's random source does.
        .expect("signing with a loaded key");
        LeaseSignature {
            cert: self.cert_pem.clone(),
            sig: B64.encode(sig),
        }
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}

/// Checks leases against the etcd CA.
pub(crate) struct Verifier {
    ca: CertificateDer<'static>,
}

impl Verifier {
    pub fn load(ca: &Path) -> Result<Verifier, String> {
        let pem = std::fs::read(ca)
            .map_err(|e| bad("--etcd-cafile", ca, format!("cannot read it: {e}")))?;
        let ca = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| bad("--etcd-cafile", ca, format!("no PEM certificate: {e}")))?;
        webpki::anchor_from_trusted_cert(&ca)
            .map_err(|e| format!("--etcd-cafile is not a usable CA certificate: {e}"))?;
        Ok(Verifier { ca })
    }

    /// Why `lease`, found at `key`, must not be believed (None: it may).
    pub fn refuse(&self, key: &str, lease: &Lease) -> Option<String> {
        let want = format!(
            "leases/{}/{}",
            lease.network,
            weft_model::overlay::subnet_key(&lease.subnet)
        );
        if key != want {
            return Some(format!(
                "the lease at {key} is for {} of network {}: a lease must sit at its own subnet's key",
                lease.subnet, lease.network
            ));
        }
        let Some(s) = &lease.signed else {
            return Some(format!(
                "not signed: {} claims it, but no certificate vouches for it",
                lease.node
            ));
        };
        self.check(&lease.node, &lease.signed_bytes(), s)
            .err()
            .map(|why| format!("refused, {why}: {} cannot have written it", lease.node))
    }

    /// Why an endpoint record must not be believed (None: it may).
    pub fn refuse_record(&self, r: &EndpointRecord) -> Option<String> {
        let Some(s) = &r.signed else {
            return Some(format!(
                "the record of {} is not signed: {} claims it, but no certificate vouches for it",
                r.ip, r.node
            ));
        };
        self.check(&r.node, &r.signed_bytes(), s).err().map(|why| {
            format!(
                "the record of {} refused, {why}: {} cannot have written it",
                r.ip, r.node
            )
        })
    }

    fn check(&self, node: &str, msg: &[u8], s: &LeaseSignature) -> Result<(), String> {
        let cert = CertificateDer::from_pem_slice(s.cert.as_bytes())
            .map_err(|e| format!("its certificate does not parse ({e})"))?;
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| format!("its certificate does not parse ({e})"))?;
        let anchor = webpki::anchor_from_trusted_cert(&self.ca).map_err(|e| e.to_string())?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => "its certificate has expired".to_string(),
            webpki::Error::UnknownIssuer => "its certificate is not one of the etcd CA's".into(),
            e => format!("its certificate is not valid for a host ({e:?})"),
        })?;
        let name = ServerName::try_from(node)
            .map_err(|_| format!("node name {node:?} is not a DNS name"))?;
        ee.verify_is_valid_for_subject_name(&name)
            .map_err(|_| format!("its certificate is not {node}'s"))?;
        let sig = B64
            .decode(&s.sig)
            .map_err(|_| "its signature is not base64".to_string())?;
        webpki::ALL_VERIFICATION_ALGS
            .iter()
            .any(|alg| ee.verify_signature(*alg, msg, &sig).is_ok())
            .then_some(())
            .ok_or_else(|| "its signature does not match its content".to_string())
    }
}

/// Splits believed leases of one network into those kept and those
/// refused (with why) because their node signed more than one: a host
/// holds one subnet per network, so a second is someone else's subnet
/// taken or a stale copy, and which one is genuine cannot be told.
pub(crate) fn one_subnet_per_node(leases: Vec<Lease>) -> (Vec<Lease>, Vec<(Lease, String)>) {
    let mut per_node: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for l in &leases {
        per_node
            .entry(l.node.clone())
            .or_default()
            .push(l.subnet.to_string());
    }
    let (keep, grab): (Vec<Lease>, Vec<Lease>) = leases
        .into_iter()
        .partition(|l| per_node[&l.node].len() == 1);
    let refused = grab
        .into_iter()
        .map(|l| {
            let subnets = &per_node[&l.node];
            let why = format!(
                "refused: {} signed leases on {} subnets of this network ({}); a host holds one, so none of them is believed",
                l.node,
                subnets.len(),
                subnets.join(", ")
            );
            (l, why)
        })
        .collect();
    (keep, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real certificates and signatures are covered end to end
    /// (tests/tests/etcd_tls.rs); these are the rules checked before them.
    fn lease(node: &str, subnet: &str) -> Lease {
        Lease {
            network: "ov".into(),
            subnet: subnet.parse().unwrap(),
            host_id: format!("id-{node}"),
            node: node.into(),
            public_ip: "198.51.100.1".parse().unwrap(),
            vtep_mac: None,
            public_key: Some("ab".repeat(32)),
            signed: None,
        }
    }

    /// A directory removed on drop, pass or fail.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA of the lab's kind named `name`, in a scratch dir.
    fn scratch_ca(name: &str) -> (weft_lab::pki::Pki, Scratch) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wft-signing-{}-{n}", std::process::id()));
        let pki = weft_lab::pki::Pki::create(&dir, name).unwrap();
        (pki, Scratch(dir))
    }

    #[test]
    fn a_signed_lease_verifies_and_any_change_or_other_signer_does_not() {
        let (pki, _dir) = scratch_ca("unit");
        let h1 = pki
            .issue_client("h1", weft_lab::pki::Validity::Current)
            .unwrap();
        let h2 = pki
            .issue_client("h2", weft_lab::pki::Validity::Current)
            .unwrap();
        let s1 = Signer::load(&h1.cert, &h1.key).unwrap();
        let s2 = Signer::load(&h2.cert, &h2.key).unwrap();
        let v = Verifier::load(&pki.ca_file()).unwrap();
        let key = "leases/ov/10.40.3.0-24";
        let good = s1.sign(lease("h1", "10.40.3.0/24"));
        assert_eq!(v.refuse(key, &good), None);
        // The same content signed again: a different signature, same body.
        assert_eq!(s1.sign(lease("h1", "10.40.3.0/24")).body(), good.body());
        // Another address under h1's signature.
        let moved = Lease {
            public_ip: "198.51.100.9".parse().unwrap(),
            ..good.clone()
        };
        assert!(v.refuse(key, &moved).unwrap().contains("does not match"));
        // h2 signing a lease in h1's name.
        let posing = s2.sign(lease("h1", "10.40.3.0/24"));
        assert!(v.refuse(key, &posing).unwrap().contains("not h1's"));
        // A certificate of another CA.
        let (other, _other_dir) = scratch_ca("other");
        let o = other
            .issue_client("h1", weft_lab::pki::Validity::Current)
            .unwrap();
        let stranger = Signer::load(&o.cert, &o.key)
            .unwrap()
            .sign(lease("h1", "10.40.3.0/24"));
        let why = v.refuse(key, &stranger).unwrap();
        assert!(why.contains("not one of the etcd CA's"), "{why}");
        // An expired certificate of the right CA.
        let e = pki
            .issue_client("h1-old", weft_lab::pki::Validity::Expired)
            .unwrap();
        let expired = Signer::load(&e.cert, &e.key)
            .unwrap()
            .sign(lease("h1-old", "10.40.3.0/24"));
        assert!(v.refuse(key, &expired).unwrap().contains("has expired"));
    }

    #[test]
    fn a_node_signing_two_subnets_has_neither_believed() {
        let (keep, refused) = one_subnet_per_node(vec![
            lease("h1", "10.40.1.0/24"),
            lease("h2", "10.40.2.0/24"),
            lease("h1", "10.40.3.0/24"),
        ]);
        assert_eq!(keep.len(), 1);
        assert_eq!(keep[0].node, "h2");
        assert_eq!(refused.len(), 2);
        assert!(
            refused[0].1.contains("10.40.1.0/24, 10.40.3.0/24"),
            "{}",
            refused[0].1
        );
    }

    #[test]
    fn a_lease_must_sit_at_its_own_subnets_key() {
        let lease = Lease {
            network: "ov".into(),
            subnet: "10.40.3.0/24".parse().unwrap(),
            host_id: "a".into(),
            node: "a".into(),
            public_ip: "198.51.100.1".parse().unwrap(),
            vtep_mac: None,
            public_key: None,
            signed: None,
        };
        // Any CA will do for rules checked before the signature.
        let v = Verifier {
            ca: CertificateDer::from(Vec::new()),
        };
        assert!(v
            .refuse("leases/ov/10.40.4.0-24", &lease)
            .unwrap()
            .contains("its own subnet's key"));
        assert!(v
            .refuse("leases/ov/10.40.3.0-24", &lease)
            .unwrap()
            .contains("not signed"));
    }
}
