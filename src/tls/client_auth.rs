//! Client certificates on downstream TLS (mTLS), as Envoy asks for and checks them: a
//! `validation_context` with `trusted_ca` asks for a certificate and verifies one that is
//! presented against those CAs; `require_client_certificate` makes it mandatory. Without a
//! validation context Envoy asks for none, even with `require_client_certificate` (its
//! validator only enforces the requirement when it has something to verify with), and
//! neither does legate (checked against Envoy in tests/tls.rs).

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;

use crate::config::error::{join, Errors};
use crate::reject_set;

/// The CAs of a downstream `validation_context` (the only part legate applies yet).
pub fn trusted_cas(
    v: &CertificateValidationContext,
    at: &str,
    errs: &mut Errors,
) -> Option<rustls::RootCertStore> {
    let CertificateValidationContext {
        trusted_ca,
        ca_certificate_provider_instance,
        system_root_certs,
        watched_directory,
        verify_certificate_spki,
        verify_certificate_hash,
        match_typed_subject_alt_names,
        match_subject_alt_names,
        require_signed_certificate_timestamp,
        crl,
        allow_expired_certificate,
        trust_chain_verification,
        custom_validator_config,
        only_verify_leaf_cert_crl,
        max_verify_depth,
        suppress_client_ca_list,
    } = v;
    reject_set!(
        errs,
        at,
        ca_certificate_provider_instance,
        system_root_certs,
        watched_directory,
        verify_certificate_spki,
        verify_certificate_hash,
        match_typed_subject_alt_names,
        match_subject_alt_names,
        require_signed_certificate_timestamp,
        crl,
        allow_expired_certificate,
        trust_chain_verification,
        custom_validator_config,
        only_verify_leaf_cert_crl,
        max_verify_depth,
        suppress_client_ca_list,
    );
    let cat = join(at, "trusted_ca");
    let Some(ca) = trusted_ca else {
        errs.add(&cat, "required to verify client certificates");
        return None;
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in super::pem_certificates(ca, &cat, errs)? {
        if let Err(e) = roots.add(cert) {
            errs.add(&cat, format!("a CA certificate cannot be used: {e}"));
            return None;
        }
    }
    Some(roots)
}

/// The verifier for a listener's TLS context; None asks no certificate of the client.
pub fn verifier(
    roots: Option<rustls::RootCertStore>,
    required: bool,
    provider: &Arc<CryptoProvider>,
    at: &str,
    errs: &mut Errors,
) -> Option<Arc<dyn ClientCertVerifier>> {
    match roots {
        Some(roots) => {
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if required {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            match builder.build() {
                Ok(v) => Some(v),
                Err(e) => {
                    errs.add(join(at, "validation_context"), format!("{e}"));
                    None
                }
            }
        }
        None => None,
    }
}
