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
        let msg = lease.signed_bytes();
        let sig = match &self.key {
            Key::Ecdsa(k) => k.sign(&self.rng, &msg).map(|s| s.as_ref().to_vec()),
            Key::Ed25519(k) => Ok(k.sign(&msg).as_ref().to_vec()),
            Key::Rsa(k) => {
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &self.rng, &msg, &mut out)
                    .map(|_| out)
            }
        }
        // ring fails to sign only when the system's random source does.
        .expect("signing with a loaded key");
        Lease {
            signed: Some(LeaseSignature {
                cert: self.cert_pem.clone(),
                sig: B64.encode(sig),
            }),
            ..lease
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
        self.check(lease, s)
            .err()
            .map(|why| format!("refused, {why}: {} cannot have written it", lease.node))
    }

    fn check(&self, lease: &Lease, s: &LeaseSignature) -> Result<(), String> {
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
        .map_err(|e| format!("its certificate is not one of the etcd CA's ({e:?})"))?;
        let name = ServerName::try_from(lease.node.as_str())
            .map_err(|_| format!("node name {:?} is not a DNS name", lease.node))?;
        ee.verify_is_valid_for_subject_name(&name)
            .map_err(|_| format!("its certificate is not {}'s", lease.node))?;
        let sig = B64
            .decode(&s.sig)
            .map_err(|_| "its signature is not base64".to_string())?;
        let msg = lease.signed_bytes();
        webpki::ALL_VERIFICATION_ALGS
            .iter()
            .any(|alg| ee.verify_signature(*alg, &msg, &sig).is_ok())
            .then_some(())
            .ok_or_else(|| "its signature does not match its content".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real certificates and signatures are covered end to end
    /// (tests/tests/etcd_tls.rs); these are the rules checked before them.
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
