//! Downstream TLS from Envoy's `envoy.transport_sockets.tls` (`DownstreamTlsContext`), built
//! on rustls with the ring provider (the same build Pingora uses).
//!
//! Files are read when the configuration is compiled, so a SIGHUP (or an LDS update)
//! picks up renewed certificates; connections already open keep the context they were
//! accepted with.

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, tls_parameters::TlsProtocol, CommonTlsContext,
    DownstreamTlsContext, TlsCertificate, TlsParameters,
};
use envoy_types::pb::google::protobuf::Any;
use rustls::crypto::{ring as provider, CryptoProvider, SupportedKxGroup};
use rustls::{ServerConfig, SupportedCipherSuite, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::error::{index, join, Errors};
use crate::config::load::unpack_or_report;
use crate::reject_set;
use crate::route::entry::read_data_source;

mod client_auth;
mod select;

pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
const DOWNSTREAM_TLS_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

/// A compiled server-side TLS context.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// The context asks clients for a certificate (mTLS).
    pub asks_client_certificate: bool,
}

/// The SDS resource type (`Secret`), delivered on the ADS stream.
pub use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

impl ServerTls {
    /// From a filter chain's `transport_socket` typed_config. A certificate named by SDS
    /// that has not arrived yet sets `rds.missing` (the listener warms, as in Envoy).
    pub fn convert(
        any: &Any,
        at: &str,
        rds: &mut crate::listener::Rds<'_>,
        errs: &mut Errors,
    ) -> Option<Self> {
        let ctx: DownstreamTlsContext = unpack_or_report(any, DOWNSTREAM_TLS_TYPE, at, errs)?;
        let at = join(at, "typed_config");
        let DownstreamTlsContext {
            common_tls_context,
            require_client_certificate,
            require_sni,
            disable_stateful_session_resumption,
            session_timeout,
            ocsp_staple_policy,
            full_scan_certs_on_sni_mismatch,
            prefer_client_ciphers,
            session_ticket_keys_type,
        } = &ctx;
        reject_set!(
            errs,
            &at,
            session_timeout,
            full_scan_certs_on_sni_mismatch,
            prefer_client_ciphers,
        );
        let resumption = Resumption {
            stateful: !disable_stateful_session_resumption,
            stateless: stateless_resumption(session_ticket_keys_type, &at, errs),
        };
        let require_client_certificate = require_client_certificate.is_some_and(|b| b.value);
        // LENIENT_STAPLING (0) is the default and means "staple if configured"; with no
        // staples configured every policy behaves alike except MUST_STAPLE.
        if *ocsp_staple_policy == 2 {
            errs.add(
                join(&at, "ocsp_staple_policy"),
                "MUST_STAPLE is not supported (no OCSP stapling)",
            );
        }
        let require_sni = require_sni.is_some_and(|b| b.value);
        let Some(common) = common_tls_context else {
            errs.add(
                join(&at, "common_tls_context"),
                "required (a certificate is needed)",
            );
            return None;
        };
        let asks_client_certificate = common.validation_context_type.is_some();
        let mut config = server_config(
            common,
            &join(&at, "common_tls_context"),
            require_sni,
            require_client_certificate,
            rds,
            errs,
        )?;
        resumption.apply(&mut config, &at, errs);
        Some(ServerTls {
            asks_client_certificate,
            config: Arc::new(config),
        })
    }
}

/// Session resumption as Envoy (BoringSSL) offers it: a session cache for TLS 1.2
/// (`disable_stateful_session_resumption`) and session tickets for TLS 1.2 and 1.3 (on
/// unless `disable_stateless_session_resumption`), with keys made for the context.
struct Resumption {
    stateful: bool,
    stateless: bool,
}

impl Resumption {
    fn apply(&self, config: &mut ServerConfig, at: &str, errs: &mut Errors) {
        if !self.stateful {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        }
        if self.stateless {
            match provider::Ticketer::new() {
                Ok(t) => config.ticketer = t,
                Err(e) => errs.add(at, format!("cannot make session ticket keys: {e}")),
            }
        } else {
            // rustls would resume TLS 1.3 from its session cache; BoringSSL resumes TLS 1.3
            // by tickets only, so without them Envoy does not resume it at all.
            config.send_tls13_tickets = 0;
        }
    }
}

fn stateless_resumption(
    keys: &Option<envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::downstream_tls_context::SessionTicketKeysType>,
    at: &str,
    errs: &mut Errors,
) -> bool {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::downstream_tls_context::SessionTicketKeysType as Keys;
    match keys {
        None => true,
        Some(Keys::DisableStatelessSessionResumption(off)) => !off,
        // rustls makes and rotates its own ticket keys; it cannot take given ones.
        Some(Keys::SessionTicketKeys(_)) => {
            errs.add(join(at, "session_ticket_keys"), "not supported");
            true
        }
        Some(Keys::SessionTicketKeysSdsSecretConfig(_)) => {
            errs.add(
                join(at, "session_ticket_keys_sds_secret_config"),
                "not supported",
            );
            true
        }
    }
}

fn server_config(
    c: &CommonTlsContext,
    at: &str,
    require_sni: bool,
    require_client_certificate: bool,
    rds: &mut crate::listener::Rds<'_>,
    errs: &mut Errors,
) -> Option<ServerConfig> {
    let CommonParts {
        tls_params,
        tls_certificates,
        alpn_protocols,
        validation_context_type,
    } = common_parts(c, at, errs);
    let sds = sds_certificates(&c.tls_certificate_sds_secret_configs, at, rds, errs);
    if sds.is_none() && !c.tls_certificate_sds_secret_configs.is_empty() {
        return None;
    }
    let client_cas = match validation_context_type {
        None => None,
        Some(ValidationContextType::ValidationContext(v)) => {
            client_auth::trusted_cas(v, &join(at, "validation_context"), errs)
        }
        Some(v) => {
            let field = match v {
                ValidationContextType::ValidationContext(_) => "validation_context",
                ValidationContextType::ValidationContextSdsSecretConfig(_) => {
                    "validation_context_sds_secret_config"
                }
                ValidationContextType::CombinedValidationContext(_) => {
                    "combined_validation_context"
                }
                ValidationContextType::ValidationContextCertificateProvider(_) => {
                    "validation_context_certificate_provider"
                }
                ValidationContextType::ValidationContextCertificateProviderInstance(_) => {
                    "validation_context_certificate_provider_instance"
                }
            };
            errs.add(
                join(at, field),
                "not supported (an inline validation_context is)",
            );
            return None;
        }
    };
    let (versions, suites, groups) = match tls_params {
        Some(p) => params(p, &join(at, "tls_params"), errs)?,
        None => (
            vec![&rustls::version::TLS13, &rustls::version::TLS12],
            provider::DEFAULT_CIPHER_SUITES.to_vec(),
            provider::DEFAULT_KX_GROUPS.to_vec(),
        ),
    };
    let pairs: Vec<Pair> = match tls_certificates {
        _ if sds.is_some() && !tls_certificates.is_empty() => {
            errs.add(
                join(at, "tls_certificates"),
                "set either tls_certificates or tls_certificate_sds_secret_configs",
            );
            return None;
        }
        [] => match sds {
            Some(pairs) => pairs,
            None => {
                errs.add(
                    join(at, "tls_certificates"),
                    "a certificate (or an SDS secret) is required",
                );
                return None;
            }
        },
        list => list
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let cat = index(&join(at, "tls_certificates"), i);
                certificate(c, &cat, errs).map(|(chain, key)| (chain, key, cat))
            })
            .collect(),
    };
    let provider = Arc::new(CryptoProvider {
        cipher_suites: suites,
        kx_groups: groups,
        ..provider::default_provider()
    });
    let suites = provider.cipher_suites.clone();
    let mut candidates = Vec::new();
    for (chain, key, cat) in pairs {
        match select::Candidate::new(chain, key, &provider) {
            Ok(c) => candidates.push(c),
            Err(e) => errs.add(
                cat,
                format!("certificate and key do not form a usable pair: {e}"),
            ),
        }
    }
    if candidates.is_empty() {
        return None;
    }
    let builder =
        match ServerConfig::builder_with_provider(provider).with_protocol_versions(&versions) {
            Ok(b) => b,
            Err(e) => {
                errs.add(join(at, "tls_params"), format!("{e}"));
                return None;
            }
        };
    let verifier = client_auth::verifier(
        client_cas,
        require_client_certificate,
        builder.crypto_provider(),
        at,
        errs,
    );
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(select::CertificateSelector::new(
        candidates, &suites,
    )));
    config.alpn_protocols = alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    if require_sni {
        config.cert_resolver = Arc::new(RequireSni(config.cert_resolver.clone()));
    }
    Some(config)
}

/// The parts of a `CommonTlsContext` that legate reads; the others are rejected here.
struct CommonParts<'a> {
    tls_params: &'a Option<TlsParameters>,
    tls_certificates: &'a [TlsCertificate],
    alpn_protocols: &'a [String],
    validation_context_type: &'a Option<ValidationContextType>,
}

fn common_parts<'a>(c: &'a CommonTlsContext, at: &str, errs: &mut Errors) -> CommonParts<'a> {
    let CommonTlsContext {
        tls_params,
        tls_certificates,
        // Read by the downstream side (SDS); the upstream side rejects it.
        tls_certificate_sds_secret_configs: _,
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        alpn_protocols,
        custom_handshaker,
        key_log,
        validation_context_type,
    } = c;
    reject_set!(
        errs,
        at,
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        custom_handshaker,
        key_log,
    );
    CommonParts {
        tls_params,
        tls_certificates,
        alpn_protocols,
        validation_context_type,
    }
}

/// A certificate chain and key, with the field path they came from.
type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, String);

/// The certificates the `SdsSecretConfig`s name, from the secrets delivered over ADS. None
/// without an entry, or with `rds.missing` set while a secret has not arrived.
fn sds_certificates(
    configs: &[envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig],
    at: &str,
    rds: &mut crate::listener::Rds<'_>,
    errs: &mut Errors,
) -> Option<Vec<Pair>> {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        secret::Type, SdsSecretConfig,
    };
    if configs.is_empty() {
        return None;
    }
    let list_at = join(at, "tls_certificate_sds_secret_configs");
    let mut pairs = Vec::new();
    let mut complete = true;
    for (i, config) in configs.iter().enumerate() {
        let at = index(&list_at, i);
        let SdsSecretConfig { name, sds_config } = config;
        if name.is_empty() {
            errs.add(join(&at, "name"), "must not be empty");
            complete = false;
            continue;
        }
        let (secret, sat) = match sds_config {
            // No config source: a secret of static_resources, as in Envoy.
            None => match rds.static_secrets.get(name) {
                Some(s) => (s.clone(), format!("static_resources.secrets[{name}]")),
                None => {
                    errs.add(
                        join(&at, "name"),
                        format!("no static secret named '{name}' (static_resources.secrets)"),
                    );
                    complete = false;
                    continue;
                }
            },
            Some(c) => {
                if !matches!(
                    c.config_source_specifier,
                    Some(ConfigSourceSpecifier::Ads(_))
                ) {
                    errs.add(join(&at, "sds_config"), "only ads: {} is supported");
                    complete = false;
                    continue;
                }
                rds.secret_names.push(name.clone());
                let Some(secret) = (rds.secrets)(name) else {
                    rds.missing = true;
                    complete = false;
                    continue;
                };
                (secret, format!("sds[{name}]"))
            }
        };
        match &secret.r#type {
            Some(Type::TlsCertificate(c)) => {
                let cat = join(&sat, "tls_certificate");
                match certificate(c, &cat, errs) {
                    Some((chain, key)) => pairs.push((chain, key, cat)),
                    None => complete = false,
                }
            }
            _ => {
                errs.add(sat, "must be a tls_certificate secret");
                complete = false;
            }
        }
    }
    complete.then_some(pairs)
}

/// `require_sni`: refuse handshakes without a server name.
#[derive(Debug)]
struct RequireSni(Arc<dyn rustls::server::ResolvesServerCert>);

impl rustls::server::ResolvesServerCert for RequireSni {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        hello.server_name()?;
        self.0.resolve(hello)
    }
}

type Params = (
    Vec<&'static SupportedProtocolVersion>,
    Vec<SupportedCipherSuite>,
    Vec<&'static dyn SupportedKxGroup>,
);

fn params(p: &TlsParameters, at: &str, errs: &mut Errors) -> Option<Params> {
    let TlsParameters {
        tls_minimum_protocol_version,
        tls_maximum_protocol_version,
        cipher_suites,
        ecdh_curves,
        signature_algorithms,
        compliance_policies,
    } = p;
    reject_set!(errs, at, signature_algorithms, compliance_policies);
    let version = |v: i32, field: &str, default: u8, errs: &mut Errors| -> Option<u8> {
        match TlsProtocol::try_from(v) {
            Ok(TlsProtocol::TlsAuto) => Some(default),
            Ok(TlsProtocol::TlSv12) => Some(2),
            Ok(TlsProtocol::TlSv13) => Some(3),
            Ok(TlsProtocol::TlSv10 | TlsProtocol::TlSv11) | Err(_) => {
                errs.add(
                    join(at, field),
                    "only TLSv1_2 and TLSv1_3 are supported (rustls)",
                );
                None
            }
        }
    };
    // Envoy's server defaults: minimum TLS 1.2, maximum TLS 1.3.
    let min = version(
        *tls_minimum_protocol_version,
        "tls_minimum_protocol_version",
        2,
        errs,
    );
    let max = version(
        *tls_maximum_protocol_version,
        "tls_maximum_protocol_version",
        3,
        errs,
    );
    // Keep going after a bad version so that every error is reported at once.
    let (min, max) = (min.unwrap_or(2), max.unwrap_or(3));
    if min > max {
        errs.add(
            join(at, "tls_minimum_protocol_version"),
            "is above tls_maximum_protocol_version",
        );
        return None;
    }
    let mut versions = Vec::new();
    if max >= 3 {
        versions.push(&rustls::version::TLS13);
    }
    if min <= 2 {
        versions.push(&rustls::version::TLS12);
    }
    // TLS 1.3 suites are not configurable in Envoy (BoringSSL); cipher_suites names the
    // TLS 1.2 ones, in OpenSSL's names, optionally in [a|b] equal-preference groups.
    let mut suites: Vec<SupportedCipherSuite> = provider::DEFAULT_CIPHER_SUITES
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .copied()
        .collect();
    if cipher_suites.is_empty() {
        suites.extend(
            provider::DEFAULT_CIPHER_SUITES
                .iter()
                .filter(|s| s.version() == &rustls::version::TLS12),
        );
    } else {
        for (i, entry) in cipher_suites.iter().enumerate() {
            let names = entry.trim_start_matches('[').trim_end_matches(']');
            for name in names.split('|') {
                match tls12_suite(name.trim()) {
                    Some(s) => suites.push(s),
                    None => errs.add(
                        index(&join(at, "cipher_suites"), i),
                        format!("'{name}' is not supported (rustls offers the ECDHE AES-GCM and CHACHA20 suites)"),
                    ),
                }
            }
        }
    }
    let groups = if ecdh_curves.is_empty() {
        provider::DEFAULT_KX_GROUPS.to_vec()
    } else {
        let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
        for (i, c) in ecdh_curves.iter().enumerate() {
            match c.as_str() {
                "X25519" => groups.push(provider::kx_group::X25519),
                "P-256" => groups.push(provider::kx_group::SECP256R1),
                "P-384" => groups.push(provider::kx_group::SECP384R1),
                _ => errs.add(
                    index(&join(at, "ecdh_curves"), i),
                    format!("'{c}' is not supported (X25519, P-256, P-384)"),
                ),
            }
        }
        groups
    };
    Some((versions, suites, groups))
}

fn tls12_suite(name: &str) -> Option<SupportedCipherSuite> {
    use provider::cipher_suite as cs;
    Some(match name {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-ECDSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-ECDSA-CHACHA20-POLY1305" => cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-RSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-RSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-RSA-CHACHA20-POLY1305" => cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        _ => return None,
    })
}

fn certificate(
    c: &TlsCertificate,
    at: &str,
    errs: &mut Errors,
) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let TlsCertificate {
        certificate_chain,
        private_key,
        watched_directory,
        private_key_provider,
        password,
        ocsp_staple,
        signed_certificate_timestamp,
        pkcs12,
        tls_params,
    } = c;
    reject_set!(
        errs,
        at,
        watched_directory,
        private_key_provider,
        password,
        ocsp_staple,
        signed_certificate_timestamp,
        pkcs12,
        tls_params,
    );
    let chain_at = join(at, "certificate_chain");
    let key_at = join(at, "private_key");
    let Some(chain) = certificate_chain else {
        errs.add(chain_at, "required");
        return None;
    };
    let Some(key) = private_key else {
        errs.add(key_at, "required");
        return None;
    };
    let chain_pem = read_data_source(chain, &chain_at, errs)?;
    let key_pem = read_data_source(key, &key_at, errs)?;
    let chain: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_slice_iter(&chain_pem).collect::<Result<_, _>>() {
            Ok(c) => c,
            Err(e) => {
                errs.add(chain_at, format!("not a PEM certificate chain: {e}"));
                return None;
            }
        };
    if chain.is_empty() {
        errs.add(chain_at, "no PEM certificate found");
        return None;
    }
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(e) => {
            errs.add(key_at, format!("not a PEM private key: {e}"));
            return None;
        }
    };
    Some((chain, key))
}

const UPSTREAM_TLS_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// A cluster's `UpstreamTlsContext`, in the form Pingora's peer options take.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Fixed SNI; empty sends none.
    pub sni: String,
    /// `auto_host_sni` (or the cluster's `auto_sni`): SNI from the request's host.
    pub auto_sni: bool,
    /// Check the certificate's names against the SNI (`auto_sni_san_validation`, or a
    /// `match_typed_subject_alt_names` entry equal to the SNI).
    pub verify_hostname: bool,
    /// `validation_context.trusted_ca`; without it, as in Envoy, the server certificate is
    /// not verified.
    pub ca: Option<Arc<[pingora::utils::tls::WrappedX509]>>,
    pub client_cert: Option<Arc<pingora::utils::tls::CertKey>>,
    pub alpn_h2: bool,
}

impl UpstreamTls {
    pub fn convert(any: &Any, at: &str, errs: &mut Errors) -> Option<Self> {
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
        let ctx: UpstreamTlsContext = unpack_or_report(any, UPSTREAM_TLS_TYPE, at, errs)?;
        let at = join(at, "typed_config");
        let UpstreamTlsContext {
            common_tls_context,
            sni,
            auto_host_sni,
            auto_sni_san_validation,
            allow_renegotiation,
            max_session_keys,
            enforce_rsa_key_usage,
        } = &ctx;
        reject_set!(
            errs,
            &at,
            allow_renegotiation,
            max_session_keys,
            enforce_rsa_key_usage
        );
        let mut tls = UpstreamTls {
            sni: sni.clone(),
            auto_sni: *auto_host_sni,
            verify_hostname: *auto_sni_san_validation,
            ca: None,
            client_cert: None,
            alpn_h2: false,
        };
        if let Some(c) = common_tls_context {
            upstream_common(c, &join(&at, "common_tls_context"), &mut tls, errs);
        }
        if tls.ca.is_some() && tls.sni.is_empty() && !tls.auto_sni {
            // Pingora skips all verification without an SNI; refuse rather than not verify.
            errs.add(
                join(&at, "sni"),
                "required with validation_context.trusted_ca (or set auto_host_sni)",
            );
        }
        Some(tls)
    }
}

fn upstream_common(c: &CommonTlsContext, at: &str, tls: &mut UpstreamTls, errs: &mut Errors) {
    let CommonParts {
        tls_params,
        tls_certificates,
        alpn_protocols,
        validation_context_type,
    } = common_parts(c, at, errs);
    if tls_params.is_some() {
        errs.add(
            join(at, "tls_params"),
            "not supported for upstream connections yet",
        );
    }
    // ALPN for upstreams follows the cluster's HTTP protocol options (as Envoy sets it).
    if !alpn_protocols.is_empty() {
        errs.add(
            join(at, "alpn_protocols"),
            "set the protocol with the cluster's typed_extension_protocol_options instead",
        );
    }
    match tls_certificates {
        [] => {}
        [one] => {
            let cat = index(&join(at, "tls_certificates"), 0);
            if let Some((chain, key)) = certificate(one, &cat, errs) {
                if chain
                    .iter()
                    .all(|c| x509_parser::parse_x509_certificate(c).is_ok())
                    && PrivateKeyDer::try_from(key.secret_der().to_vec()).is_ok()
                {
                    let certs = chain.iter().map(|c| c.to_vec()).collect();
                    tls.client_cert = Some(Arc::new(pingora::utils::tls::CertKey::new(
                        certs,
                        key.secret_der().to_vec(),
                    )));
                } else {
                    errs.add(cat, "certificate or key cannot be parsed");
                }
            }
        }
        _ => errs.add(
            join(at, "tls_certificates"),
            "only one client certificate is supported",
        ),
    }
    match validation_context_type {
        None => {}
        Some(ValidationContextType::ValidationContext(v)) => {
            validation(v, &join(at, "validation_context"), tls, errs)
        }
        Some(_) => errs.add(
            at,
            "only an inline validation_context is supported (no SDS or certificate providers)",
        ),
    }
}

fn validation(
    v: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext,
    at: &str,
    tls: &mut UpstreamTls,
    errs: &mut Errors,
) {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext;
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
    // A SAN matcher equal to the SNI is what Pingora's hostname check verifies; anything
    // else would be accepted and not enforced, so it is refused.
    for (i, m) in match_typed_subject_alt_names.iter().enumerate() {
        use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
        let exact = m.matcher.as_ref().and_then(|s| match &s.match_pattern {
            Some(MatchPattern::Exact(e)) if !s.ignore_case => Some(e.as_str()),
            _ => None,
        });
        if m.san_type == 2 && exact.is_some_and(|e| e == tls.sni) && !tls.sni.is_empty() {
            tls.verify_hostname = true;
        } else {
            errs.add(
                index(&join(at, "match_typed_subject_alt_names"), i),
                "only a DNS exact match equal to the cluster's sni is supported",
            );
        }
    }
    let Some(ca) = trusted_ca else {
        if !match_typed_subject_alt_names.is_empty() {
            errs.add(
                join(at, "trusted_ca"),
                "required to check subject alt names",
            );
        }
        return;
    };
    let cat = join(at, "trusted_ca");
    let Some(certs) = pem_certificates(ca, &cat, errs) else {
        return;
    };
    if certs
        .iter()
        .any(|c| x509_parser::parse_x509_certificate(c).is_err())
    {
        errs.add(cat, "a CA certificate cannot be parsed");
        return;
    }
    let wrapped: Vec<pingora::utils::tls::WrappedX509> = certs
        .iter()
        .map(|c| pingora::utils::tls::WrappedX509::new(c.to_vec(), pingora::utils::tls::parse_x509))
        .collect();
    tls.ca = Some(Arc::from(wrapped));
}

/// The certificates of a `trusted_ca`: at least one, PEM; None (with an error) otherwise.
pub(crate) fn pem_certificates(
    source: &envoy_types::pb::envoy::config::core::v3::DataSource,
    at: &str,
    errs: &mut Errors,
) -> Option<Vec<CertificateDer<'static>>> {
    let pem = read_data_source(source, at, errs)?;
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            errs.add(at, "no PEM certificate found");
            None
        }
        Err(e) => {
            errs.add(at, format!("not PEM certificates: {e}"));
            None
        }
    }
}
