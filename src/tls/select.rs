//! Several certificates in one TLS context (RSA and ECDSA, as control planes configure
//! them), chosen per ClientHello as Envoy's default certificate selector chooses:
//! - with SNI, among the certificates naming it (exactly, then by wildcard): an ECDSA one
//!   on a curve the client can verify, else an RSA one; no certificate naming it means the
//!   first certificate;
//! - without SNI, the same preference over all of them, else the first.
//!
//! A client is ECDSA-capable by the ECDSA signature schemes it offers (TLS 1.3) or by the
//! curves it supports (TLS 1.2), as Envoy reads it.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, NamedGroup, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
};

/// The curve of an ECDSA certificate's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
    P521,
}

/// One certificate, with what selection looks at.
#[derive(Debug)]
pub struct Candidate {
    key: Arc<CertifiedKey>,
    /// DNS names it serves, lowercased; `*.example.com` kept as `.example.com`.
    names: Vec<String>,
    /// None for RSA (and other non-ECDSA keys).
    curve: Option<Curve>,
}

impl Candidate {
    /// A chain and its key, checked to belong together. The certificate is read with
    /// x509-parser, which also takes X.509 v1 certificates (Envoy's examples ship some;
    /// rustls's own check refuses them).
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Self, String> {
        let leaf = chain.first().ok_or("no certificate in the chain")?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("the private key cannot be used: {e}"))?;
        let spki = cert.public_key();
        if let Some(public) = signing.public_key() {
            if public.as_ref() != spki.raw {
                return Err("the private key does not match the certificate".into());
            }
        }
        let curve = (spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY)
            .then(|| {
                let oid = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
                [
                    (OID_EC_P256, Curve::P256),
                    (OID_NIST_EC_P384, Curve::P384),
                    (OID_NIST_EC_P521, Curve::P521),
                ]
                .into_iter()
                .find(|(o, _)| *o == oid)
                .map(|(_, c)| c)
            })
            .flatten();
        let mut names: Vec<String> = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                    names.push(server_name_key(d));
                }
            }
        }
        if names.is_empty() {
            // Envoy falls back to the subject's common name.
            for cn in cert.subject().iter_common_name() {
                if let Ok(s) = cn.as_str() {
                    names.push(server_name_key(s));
                }
            }
        }
        Ok(Candidate {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            names,
            curve,
        })
    }
}

fn server_name_key(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    match name.strip_prefix('*') {
        Some(rest) if rest.starts_with('.') => rest.to_string(),
        _ => name,
    }
}

/// The context's certificates, in config order.
#[derive(Debug)]
pub struct CertificateSelector {
    certs: Vec<Candidate>,
    /// The context's TLS 1.2 suites that authenticate with ECDSA.
    ecdsa_suites: Vec<CipherSuite>,
}

impl CertificateSelector {
    /// `certs` must not be empty; `suites` are the context's cipher suites.
    pub fn new(certs: Vec<Candidate>, suites: &[rustls::SupportedCipherSuite]) -> Self {
        let ecdsa_suites = suites
            .iter()
            .filter_map(|s| match s {
                rustls::SupportedCipherSuite::Tls12(t)
                    if t.sign.iter().any(|s| {
                        matches!(
                            s,
                            SignatureScheme::ECDSA_NISTP256_SHA256
                                | SignatureScheme::ECDSA_NISTP384_SHA384
                                | SignatureScheme::ECDSA_NISTP521_SHA512
                        )
                    }) =>
                {
                    Some(s.suite())
                }
                _ => None,
            })
            .collect();
        CertificateSelector {
            certs,
            ecdsa_suites,
        }
    }

    /// Envoy's `DefaultTlsCertificateSelector::findTlsContext` without OCSP (legate staples
    /// nothing) and with `full_scan_certs_on_sni_mismatch: false`.
    fn select(&self, sni: Option<&str>, client_curves: &[Curve]) -> &Candidate {
        let ecdsa_capable = !client_curves.is_empty();
        // (selected, RSA fallback for an ECDSA-capable client)
        let pick = |from: &mut dyn Iterator<Item = &'_ Candidate>,
                    candidate: &mut Option<usize>|
         -> Option<usize> {
            for c in from {
                let i = self.index_of(c);
                match c.curve {
                    Some(curve) if client_curves.contains(&curve) => return Some(i),
                    None if !ecdsa_capable => return Some(i),
                    None if candidate.is_none() => *candidate = Some(i),
                    _ => {}
                }
            }
            None
        };
        let mut candidate = None;
        if let Some(sni) = sni.filter(|s| !s.is_empty()) {
            let sni = sni.to_ascii_lowercase();
            let naming = |name: &str| {
                let name = name.to_string();
                self.certs.iter().filter(move |c| c.names.contains(&name))
            };
            let mut selected = pick(&mut naming(&sni), &mut candidate);
            if selected.is_none() && candidate.is_none() {
                if let Some(pos) = sni.get(1..).and_then(|s| s.find('.')).map(|p| p + 1) {
                    if pos < sni.len() - 1 {
                        selected = pick(&mut naming(&sni[pos..]), &mut candidate);
                    }
                }
            }
            return &self.certs[selected.or(candidate).unwrap_or(0)];
        }
        let selected = pick(&mut self.certs.iter(), &mut candidate);
        &self.certs[selected.or(candidate).unwrap_or(0)]
    }

    fn index_of(&self, c: &Candidate) -> usize {
        self.certs
            .iter()
            .position(|x| std::ptr::eq(x, c))
            .unwrap_or(0)
    }
}

/// The curves an ECDSA certificate may use for this client; empty when it cannot take one.
/// TLS 1.3: its ECDSA signature schemes. TLS 1.2: its supported curves, if it offers an
/// ECDSA suite the context has (as Envoy's `getClientEcdsaCapabilities`).
fn client_curves(hello: &ClientHello<'_>, ecdsa_suites: &[CipherSuite]) -> Vec<Curve> {
    let tls13 = hello.cipher_suites().iter().any(|s| {
        matches!(
            s,
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        )
    });
    if tls13 {
        return hello
            .signature_schemes()
            .iter()
            .filter_map(|s| match s {
                SignatureScheme::ECDSA_NISTP256_SHA256 => Some(Curve::P256),
                SignatureScheme::ECDSA_NISTP384_SHA384 => Some(Curve::P384),
                SignatureScheme::ECDSA_NISTP521_SHA512 => Some(Curve::P521),
                _ => None,
            })
            .collect();
    }
    if !hello
        .cipher_suites()
        .iter()
        .any(|s| ecdsa_suites.contains(s))
    {
        return Vec::new();
    }
    hello
        .named_groups()
        .unwrap_or_default()
        .iter()
        .filter_map(|g| match g {
            NamedGroup::secp256r1 => Some(Curve::P256),
            NamedGroup::secp384r1 => Some(Curve::P384),
            NamedGroup::secp521r1 => Some(Curve::P521),
            _ => None,
        })
        .collect()
}

impl ResolvesServerCert for CertificateSelector {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let curves = client_curves(&hello, &self.ecdsa_suites);
        Some(self.select(hello.server_name(), &curves).key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Selection reads only names and curves: every candidate carries the same P-256 key
    /// and says which kind it stands for (ring, rcgen's backend here, cannot make RSA keys).
    fn candidate(names: &[&str], curve: Option<Curve>) -> Candidate {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let mut c = Candidate::new(
            vec![cert.der().clone()],
            der,
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap();
        assert_eq!(c.curve, Some(Curve::P256));
        c.curve = curve;
        c
    }

    const RSA: Option<Curve> = None;
    const P256: Option<Curve> = Some(Curve::P256);

    fn chosen(s: &CertificateSelector, sni: Option<&str>, curves: &[Curve]) -> usize {
        s.index_of(s.select(sni, curves))
    }

    #[test]
    fn ecdsa_for_clients_that_take_it_rsa_for_the_others() {
        let s = CertificateSelector::new(
            vec![
                candidate(&["a.example.com"], RSA),
                candidate(&["a.example.com"], P256),
            ],
            &[],
        );
        assert_eq!(chosen(&s, Some("a.example.com"), &[Curve::P256]), 1);
        assert_eq!(chosen(&s, Some("a.example.com"), &[]), 0);
        assert_eq!(chosen(&s, None, &[Curve::P256]), 1);
        assert_eq!(chosen(&s, None, &[]), 0);
        // A client on P-384 only cannot verify the P-256 certificate: RSA.
        assert_eq!(chosen(&s, Some("a.example.com"), &[Curve::P384]), 0);
    }

    #[test]
    fn the_name_comes_first_then_wildcards_then_the_first_certificate() {
        let s = CertificateSelector::new(
            vec![
                candidate(&["other.test"], P256),
                candidate(&["*.example.com"], RSA),
                candidate(&["www.example.com"], RSA),
            ],
            &[],
        );
        assert_eq!(chosen(&s, Some("www.example.com"), &[Curve::P256]), 2);
        assert_eq!(chosen(&s, Some("api.example.com"), &[Curve::P256]), 1);
        // No certificate names it: the first, whatever the client takes.
        assert_eq!(chosen(&s, Some("nothing.test"), &[]), 0);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let a = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let b = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&a)
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::try_from(b.serialize_der()).unwrap();
        let err = Candidate::new(
            vec![cert.der().clone()],
            key,
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap_err();
        assert!(err.contains("does not match"), "{err}");
    }
}
