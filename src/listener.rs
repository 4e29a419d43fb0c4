//! Listeners and their HTTP connection manager (HCM) settings.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::{
    filter::ConfigType, Filter, FilterChain, Listener as ListenerProto,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{
        CodecType, RouteSpecifier, ServerHeaderTransformation, StripPortMode,
    },
    HttpConnectionManager as HcmProto,
};

use crate::cluster::socket_address;
use crate::config::duration;
use crate::config::error::{index, join, Errors};
use crate::config::http_options::ConnectionLimits;
use crate::config::load::{type_name, unpack_any, unpack_or_report};
use crate::filter::FilterChain as HttpFilterChain;
use crate::reject_set;
use crate::route::RouteTable;
use crate::tls::{ServerTls, TLS_TRANSPORT_SOCKET};
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds as RdsProto;

const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
/// Envoy's default `max_request_headers_kb`.
const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;
/// Envoy's default downstream connection idle timeout.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeader {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripPort {
    None,
    /// `strip_matching_host_port`: only the listener's own port.
    Matching,
    /// `strip_any_host_port`.
    Any,
}

/// Route configurations delivered over RDS, and what the listeners being compiled ask for.
pub struct Rds<'a> {
    pub lookup: &'a dyn Fn(&str) -> Option<RouteConfiguration>,
    /// Every `rds.route_config_name` seen (to subscribe to).
    pub names: Vec<String>,
    /// Set when a listener's routes have not arrived yet.
    pub missing: bool,
    /// Each route configuration's `initial_fetch_timeout` (None: wait forever).
    pub timeouts: std::collections::HashMap<String, Option<Duration>>,
    /// TLS secrets delivered over SDS (on the ADS stream).
    pub secrets: &'a dyn Fn(&str) -> Option<crate::tls::Secret>,
    /// `static_resources.secrets`, for an `SdsSecretConfig` without `sds_config`.
    pub static_secrets: &'a std::collections::HashMap<String, crate::tls::Secret>,
    /// Every SDS secret name seen (to subscribe to).
    pub secret_names: Vec<String>,
}

/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// The HCM of a listener, compiled.
#[derive(Debug)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    /// `codec_type: AUTO` on plaintext also accepts HTTP/2 with prior knowledge (h2c), as
    /// Envoy detects the connection preface; `HTTP1` does not.
    pub h2c: bool,
    /// `upgrade_configs`: (type lowercased, e.g. `websocket`; enabled). A route's own
    /// `upgrade_configs` override these per type.
    pub upgrades: Vec<(String, bool)>,
    /// `forward_client_cert_details`: what becomes of a request's `x-forwarded-client-cert`.
    pub forward_client_cert: ForwardClientCert,
    /// `http2_protocol_options`: what HTTP/2 connections advertise.
    pub h2_settings: crate::config::http2_options::H2Settings,
    /// `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`.
    pub path_normalization: crate::path_normalization::PathNormalization,
    /// `max_request_headers_kb` in bytes (Envoy counts names and values).
    pub max_request_headers_bytes: usize,
    /// `common_http_protocol_options` connection limits.
    pub limits: ConnectionLimits,
    pub routes: RouteTable,
    pub filters: HttpFilterChain,
    pub server_name: String,
    pub server_header: ServerHeader,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub via: Option<String>,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    /// None: disabled.
    pub idle_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    /// None: disabled (Envoy's default).
    pub request_headers_timeout: Option<Duration>,
    pub strip_port: StripPort,
    /// `internal_address_config.cidr_ranges`; empty means no address is internal
    /// (Envoy's default since 1.33).
    pub internal_addresses: InternalAddresses,
    /// `http.<stat_prefix>.*` counters, shared across configurations.
    pub stats: std::sync::Arc<crate::stats::HttpStats>,
    pub access_logs: std::sync::Arc<[crate::access_log::Logger]>,
}

/// Addresses whose requests count as internal (trusted with `x-envoy-*` headers).
#[derive(Debug, Default)]
pub struct InternalAddresses(Vec<ipnet::IpNet>);

impl InternalAddresses {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Envoy's `forward_client_cert_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardClientCert {
    Sanitize,
    ForwardOnly,
    AppendForward,
    SanitizeSet,
    AlwaysForwardOnly,
}

impl ForwardClientCert {
    /// Whether a request keeps the header it came with: ALWAYS_FORWARD_ONLY always,
    /// FORWARD_ONLY from a client that presented a certificate; every other case removes
    /// it (APPEND_FORWARD and SANITIZE_SET only ever meet clients without one).
    pub fn keeps_header(self, client_certificate: bool) -> bool {
        match self {
            ForwardClientCert::AlwaysForwardOnly => true,
            ForwardClientCert::ForwardOnly => client_certificate,
            _ => false,
        }
    }
}

fn forward_client_cert(v: i32, at: &str, errs: &mut Errors) -> ForwardClientCert {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::ForwardClientCertDetails as F;
    match F::try_from(v) {
        Ok(F::Sanitize) => ForwardClientCert::Sanitize,
        Ok(F::ForwardOnly) => ForwardClientCert::ForwardOnly,
        Ok(F::AppendForward) => ForwardClientCert::AppendForward,
        Ok(F::SanitizeSet) => ForwardClientCert::SanitizeSet,
        Ok(F::AlwaysForwardOnly) => ForwardClientCert::AlwaysForwardOnly,
        Err(_) => {
            errs.add(at, "unknown value");
            ForwardClientCert::Sanitize
        }
    }
}

fn escaped_slashes_action(
    v: i32,
    at: &str,
    errs: &mut Errors,
) -> crate::path_normalization::EscapedSlashes {
    use crate::path_normalization::EscapedSlashes;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::PathWithEscapedSlashesAction as A;
    match A::try_from(v) {
        // IMPLEMENTATION_SPECIFIC_DEFAULT is KEEP_UNCHANGED in Envoy.
        Ok(A::ImplementationSpecificDefault) | Ok(A::KeepUnchanged) => {
            EscapedSlashes::KeepUnchanged
        }
        Ok(A::RejectRequest) => EscapedSlashes::RejectRequest,
        Ok(A::UnescapeAndRedirect) => EscapedSlashes::UnescapeAndRedirect,
        Ok(A::UnescapeAndForward) => EscapedSlashes::UnescapeAndForward,
        Err(_) => {
            errs.add(at, "unknown value");
            EscapedSlashes::KeepUnchanged
        }
    }
}

fn convert_internal_addresses(
    c: &Option<envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::InternalAddressConfig>,
    at: &str,
    errs: &mut Errors,
) -> InternalAddresses {
    let Some(c) = c else {
        return InternalAddresses::default();
    };
    let envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::InternalAddressConfig {
        unix_sockets,
        cidr_ranges,
    } = c;
    let at = join(at, "internal_address_config");
    reject_set!(errs, &at, unix_sockets);
    let mut nets = Vec::new();
    for (i, r) in cidr_ranges.iter().enumerate() {
        let rat = index(&join(&at, "cidr_ranges"), i);
        let prefix_len = r.prefix_len.map_or(0, |p| p.value);
        match r
            .address_prefix
            .parse::<std::net::IpAddr>()
            .ok()
            .and_then(|ip| ipnet::IpNet::new(ip, prefix_len.min(255) as u8).ok())
        {
            Some(n) => nets.push(n.trunc()),
            None => errs.add(
                rat,
                format!("invalid CIDR {}/{prefix_len}", r.address_prefix),
            ),
        }
    }
    InternalAddresses(nets)
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Filter chains in config order; `default_filter_chain`, if any, is last.
    pub chains: Vec<Chain>,
    pub default_chain: Option<usize>,
    /// Whether connections must be inspected (TLS detection and SNI) to pick a chain,
    /// as Envoy's `tls_inspector` listener filter does.
    pub inspect: bool,
    /// `listener_filters_timeout`: how long to wait for a TLS ClientHello (None: forever).
    pub inspect_timeout: Option<Duration>,
    /// `per_connection_buffer_limit_bytes`: the most a connection reads at a time, and the
    /// longest request body a retry may replay (Envoy: 1 MiB; Pingora keeps 64 KiB at most).
    pub buffer_limit: usize,
    /// `max_connections_to_accept_per_socket_event` (None: all that are pending).
    pub accepts_per_wakeup: Option<u32>,
    /// `ignore_global_conn_limit` or `bypass_overload_manager`: the overload manager's
    /// global connection limit neither counts nor refuses this listener's connections.
    pub outside_global_limit: bool,
}

/// Envoy's default `per_connection_buffer_limit_bytes`.
pub const DEFAULT_BUFFER_LIMIT: usize = 1024 * 1024;

/// One filter chain: what it matches, its TLS context, and its HTTP connection manager.
#[derive(Debug)]
pub struct Chain {
    pub name: String,
    /// Lowercased; `*.example.com` wildcards kept as written.
    pub server_names: Vec<String>,
    pub transport_protocol: Option<Transport>,
    pub tls: Option<ServerTls>,
    /// `transport_socket_connect_timeout`: bounds the TLS handshake.
    pub handshake_timeout: Option<Duration>,
    /// `envoy.filters.network.connection_limit` before the HCM.
    pub connection_limit: Option<ConnectionLimit>,
    /// Where the HCM sits in `filters` (for error paths).
    pub hcm_index: usize,
    pub hcm: HttpConnectionManager,
    /// Every cluster the routes can send to speaks plaintext HTTP/1.1, which legate's own
    /// HTTP/1 engine carries (`proxy::native`); otherwise the chain's requests go to
    /// Pingora. Set by the snapshot, which knows the clusters.
    pub plain_upstreams: bool,
}

/// Envoy's connection_limit network filter: at most `max` open connections on the chain,
/// counted across workers; the count survives reloads (keyed by listener and stat_prefix).
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    pub max: u64,
    pub active: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ConnectionLimit {
    /// Takes a slot; None (the connection is to be closed) when the chain is full.
    pub fn acquire(&self) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering;
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot(self.active.clone()))
    }
}

/// An open connection counted against a [`ConnectionLimit`]; released when dropped.
pub struct ConnectionSlot(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn limit_counter(key: String) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    static COUNTERS: OnceLock<Mutex<HashMap<String, Weak<std::sync::atomic::AtomicU64>>>> =
        OnceLock::new();
    let mut map = COUNTERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(c) = map.get(&key).and_then(Weak::upgrade) {
        return c;
    }
    let c = Arc::new(std::sync::atomic::AtomicU64::new(0));
    map.insert(key, Arc::downgrade(&c));
    c
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tls,
    RawBuffer,
}

/// Envoy's default `listener_filters_timeout`.
const DEFAULT_INSPECT_TIMEOUT: Duration = Duration::from_secs(15);
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
const TLS_INSPECTOR_TYPE: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

impl Listener {
    /// The HCM of the first chain: what listener-level counters are kept under.
    pub fn hcm(&self) -> &HttpConnectionManager {
        &self.chains[0].hcm
    }

    /// Envoy's filter-chain match on what inspection found: the most specific server name
    /// (exact, then the longest `*.` wildcard, then chains without server names), then the
    /// transport protocol (exact, then chains without one); the default chain otherwise.
    pub fn select_chain(&self, transport: Transport, sni: Option<&str>) -> Option<usize> {
        let regular = &self.chains[..self.default_chain.unwrap_or(self.chains.len())];
        let by_name = |pattern: &str| -> Vec<usize> {
            regular
                .iter()
                .enumerate()
                .filter(|(_, c)| c.server_names.iter().any(|n| n == pattern))
                .map(|(i, _)| i)
                .collect()
        };
        let mut candidates = Vec::new();
        if let Some(sni) = sni.map(str::to_ascii_lowercase) {
            candidates = by_name(&sni);
            let mut rest = sni.as_str();
            while candidates.is_empty() {
                let Some(dot) = rest.find('.') else { break };
                rest = &rest[dot + 1..];
                candidates = by_name(&format!("*.{rest}"));
            }
        }
        if candidates.is_empty() {
            candidates = regular
                .iter()
                .enumerate()
                .filter(|(_, c)| c.server_names.is_empty())
                .map(|(i, _)| i)
                .collect();
        }
        let exact = candidates
            .iter()
            .copied()
            .find(|&i| self.chains[i].transport_protocol == Some(transport));
        exact
            .or_else(|| {
                candidates
                    .iter()
                    .copied()
                    .find(|&i| self.chains[i].transport_protocol.is_none())
            })
            .or(self.default_chain)
    }
}

impl Listener {
    pub fn convert(
        l: &ListenerProto,
        at: &str,
        default_name: String,
        rds: &mut Rds<'_>,
        errs: &mut Errors,
    ) -> Option<Self> {
        let ListenerProto {
            name,
            address,
            additional_addresses,
            stat_prefix,
            stats_matcher,
            filter_chains,
            fcds_config,
            use_original_dst,
            default_filter_chain,
            per_connection_buffer_limit_bytes,
            metadata: _,
            deprecated_v1,
            drain_type,
            listener_filters,
            listener_filters_timeout,
            continue_on_listener_filters_timeout,
            transparent,
            freebind,
            socket_options,
            tcp_fast_open_queue_length,
            traffic_direction: _,
            udp_listener_config,
            api_listener,
            connection_balance_config,
            reuse_port,
            enable_reuse_port,
            access_log,
            tcp_backlog_size,
            max_connections_to_accept_per_socket_event,
            bind_to_port,
            enable_mptcp,
            ignore_global_conn_limit,
            bypass_overload_manager,
            tcp_keepalive,
            listener_specifier,
            filter_chain_matcher,
            per_connection_buffer_high_watermark_timeout,
        } = l;
        // traffic_direction is a hint for stats and tracing, with no routing effect.
        reject_set!(
            errs,
            at,
            additional_addresses,
            stat_prefix,
            stats_matcher,
            fcds_config,
            use_original_dst,
            deprecated_v1,
            drain_type,
            continue_on_listener_filters_timeout,
            transparent,
            freebind,
            socket_options,
            tcp_fast_open_queue_length,
            udp_listener_config,
            api_listener,
            connection_balance_config,
            reuse_port,
            enable_reuse_port,
            access_log,
            tcp_backlog_size,
            bind_to_port,
            enable_mptcp,
            tcp_keepalive,
            listener_specifier,
            filter_chain_matcher,
            per_connection_buffer_high_watermark_timeout,
        );
        let buffer_limit = match per_connection_buffer_limit_bytes {
            None => DEFAULT_BUFFER_LIMIT,
            Some(v) if v.value > 0 => v.value as usize,
            Some(_) => {
                // A zero limit would stop every read.
                errs.add(
                    join(at, "per_connection_buffer_limit_bytes"),
                    "must be at least 1",
                );
                DEFAULT_BUFFER_LIMIT
            }
        };
        let accepts_per_wakeup = match max_connections_to_accept_per_socket_event {
            None => None,
            Some(v) if v.value > 0 => Some(v.value),
            Some(_) => {
                // Envoy's validation: gt 0.
                errs.add(
                    join(at, "max_connections_to_accept_per_socket_event"),
                    "must be at least 1",
                );
                None
            }
        };
        let (host, port) = socket_address(address, &join(at, "address"), errs)?;
        let ip: IpAddr = match host.parse() {
            Ok(ip) => ip,
            Err(_) => {
                errs.add(
                    join(at, "address.socket_address.address"),
                    format!("'{host}' is not an IP address"),
                );
                return None;
            }
        };
        let address = SocketAddr::new(ip, port);
        for (i, f) in listener_filters.iter().enumerate() {
            listener_filter(f, &index(&join(at, "listener_filters"), i), errs);
        }
        duration::check(
            listener_filters_timeout,
            &join(at, "listener_filters_timeout"),
            errs,
        );
        // Zero disables the timeout, as in Envoy.
        let inspect_timeout =
            duration::optional_timeout(listener_filters_timeout, Some(DEFAULT_INSPECT_TIMEOUT));
        if filter_chains.is_empty() && default_filter_chain.is_none() {
            errs.add(
                join(at, "filter_chains"),
                "at least one filter chain (or default_filter_chain) is required",
            );
            return None;
        }
        let mut chains = Vec::new();
        for (i, fc) in filter_chains.iter().enumerate() {
            if let Some(c) = convert_filter_chain(
                fc,
                &index(&join(at, "filter_chains"), i),
                &address.to_string(),
                rds,
                errs,
            ) {
                chains.push(c);
            }
        }
        let default_chain = match default_filter_chain {
            Some(fc) => {
                let dat = join(at, "default_filter_chain");
                if fc.filter_chain_match.is_some() {
                    errs.add(
                        join(&dat, "filter_chain_match"),
                        "must not be set on the default chain",
                    );
                }
                let c = convert_filter_chain(fc, &dat, &address.to_string(), rds, errs)?;
                chains.push(c);
                Some(chains.len() - 1)
            }
            None => None,
        };
        if chains.len() != filter_chains.len() + usize::from(default_chain.is_some()) {
            return None;
        }
        // Envoy refuses two chains that the same connection would match equally.
        let mut seen = std::collections::HashMap::new();
        for (i, c) in chains.iter().enumerate() {
            if Some(i) == default_chain {
                continue;
            }
            let names: Vec<&str> = if c.server_names.is_empty() {
                vec![""]
            } else {
                c.server_names.iter().map(String::as_str).collect()
            };
            for n in names {
                if let Some(other) = seen.insert((n.to_string(), c.transport_protocol), i) {
                    errs.add(
                        index(&join(at, "filter_chains"), i),
                        format!("matches the same connections as filter_chains[{other}] (server name '{n}')"),
                    );
                }
            }
        }
        let inspect = chains.len() > 1
            || chains.iter().any(|c| {
                c.tls.is_some() || !c.server_names.is_empty() || c.transport_protocol.is_some()
            });
        Some(Listener {
            name: if name.is_empty() {
                default_name
            } else {
                name.clone()
            },
            address,
            chains,
            default_chain,
            inspect,
            inspect_timeout,
            buffer_limit,
            accepts_per_wakeup,
            outside_global_limit: *ignore_global_conn_limit || *bypass_overload_manager,
        })
    }
}

/// Listener filters: only the TLS inspector, which legate runs whenever a chain needs it
/// (as Envoy injects it), so naming it changes nothing.
fn listener_filter(
    f: &envoy_types::pb::envoy::config::listener::v3::ListenerFilter,
    at: &str,
    errs: &mut Errors,
) {
    use envoy_types::pb::envoy::config::listener::v3::listener_filter::ConfigType as LfConfig;
    use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
    let envoy_types::pb::envoy::config::listener::v3::ListenerFilter {
        name,
        filter_disabled,
        config_type,
    } = f;
    reject_set!(errs, at, filter_disabled);
    match config_type {
        Some(LfConfig::TypedConfig(any)) => {
            match unpack_any::<TlsInspector>(any, TLS_INSPECTOR_TYPE, at) {
                Ok(t) => {
                    let TlsInspector {
                        enable_ja3_fingerprinting,
                        enable_ja4_fingerprinting,
                        initial_read_buffer_size,
                        max_client_hello_size,
                        close_connection_on_client_hello_parsing_errors,
                    } = t;
                    let at = join(at, "typed_config");
                    reject_set!(
                        errs,
                        &at,
                        enable_ja3_fingerprinting,
                        enable_ja4_fingerprinting,
                        initial_read_buffer_size,
                        max_client_hello_size,
                        close_connection_on_client_hello_parsing_errors,
                    );
                }
                Err(e) => errs.extend(e),
            }
        }
        None if name == TLS_INSPECTOR => errs.add(
            join(at, "typed_config"),
            format!("required (type.googleapis.com/{TLS_INSPECTOR_TYPE}), as in Envoy"),
        ),
        _ => errs.add(
            at,
            format!("listener filter '{name}' is not supported (only {TLS_INSPECTOR})"),
        ),
    }
}

fn convert_filter_chain(
    fc: &FilterChain,
    at: &str,
    listener_key: &str,
    rds: &mut Rds<'_>,
    errs: &mut Errors,
) -> Option<Chain> {
    let FilterChain {
        filter_chain_match,
        filters,
        use_proxy_proto,
        metadata: _,
        transport_socket,
        transport_socket_connect_timeout,
        name,
    } = fc;
    reject_set!(errs, at, use_proxy_proto);
    let (server_names, transport_protocol) = match filter_chain_match {
        Some(m) => chain_match(m, &join(at, "filter_chain_match"), errs)?,
        None => (Vec::new(), None),
    };
    let tls = match transport_socket {
        Some(ts) => Some(transport(ts, &join(at, "transport_socket"), rds, errs)?),
        None => None,
    };
    duration::check(
        transport_socket_connect_timeout,
        &join(at, "transport_socket_connect_timeout"),
        errs,
    );
    let handshake_timeout = duration::optional_timeout(transport_socket_connect_timeout, None);
    let hcm_index = filters.len().saturating_sub(1);
    let mut connection_limit = None;
    for (i, f) in filters[..hcm_index].iter().enumerate() {
        let fat = index(&join(at, "filters"), i);
        match connection_limit_filter(f, &fat, errs) {
            Some((prefix, max)) if connection_limit.is_none() => {
                connection_limit = Some(ConnectionLimit {
                    max,
                    active: limit_counter(format!("{listener_key}/{prefix}")),
                });
            }
            Some(_) => errs.add(&fat, "only one connection_limit filter per chain"),
            None => {}
        }
    }
    let hcm_at = index(&join(at, "filters"), hcm_index);
    let hcm = http_connection_manager(&filters[hcm_index..], &hcm_at, rds, errs)?;
    let mode = hcm.forward_client_cert;
    if tls.as_ref().is_some_and(|t| t.asks_client_certificate)
        && matches!(
            mode,
            ForwardClientCert::AppendForward | ForwardClientCert::SanitizeSet
        )
    {
        errs.add(
            join(&hcm_at, "typed_config.forward_client_cert_details"),
            "APPEND_FORWARD and SANITIZE_SET are not supported yet where clients present certificates",
        );
    }
    Some(Chain {
        plain_upstreams: false,
        connection_limit,
        hcm_index,
        name: name.clone(),
        server_names,
        transport_protocol,
        tls,
        handshake_timeout,
        hcm,
    })
}

type ChainMatch = (Vec<String>, Option<Transport>);

fn chain_match(
    m: &envoy_types::pb::envoy::config::listener::v3::FilterChainMatch,
    at: &str,
    errs: &mut Errors,
) -> Option<ChainMatch> {
    let envoy_types::pb::envoy::config::listener::v3::FilterChainMatch {
        destination_port,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        server_names,
        transport_protocol,
        application_protocols,
    } = m;
    reject_set!(
        errs,
        at,
        destination_port,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        application_protocols,
    );
    let mut names = Vec::new();
    for (i, n) in server_names.iter().enumerate() {
        let n = n.to_ascii_lowercase();
        let body = n.strip_prefix("*.").unwrap_or(&n);
        if body.is_empty() || body.contains('*') {
            errs.add(
                index(&join(at, "server_names"), i),
                "a wildcard is only allowed as a leading '*.'",
            );
            continue;
        }
        names.push(n);
    }
    let transport = match transport_protocol.as_str() {
        "" => None,
        "tls" => Some(Transport::Tls),
        "raw_buffer" => Some(Transport::RawBuffer),
        other => {
            errs.add(
                join(at, "transport_protocol"),
                format!("'{other}' is not supported (tls or raw_buffer)"),
            );
            return None;
        }
    };
    Some((names, transport))
}

fn transport(
    ts: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    at: &str,
    rds: &mut Rds<'_>,
    errs: &mut Errors,
) -> Option<ServerTls> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as TsConfig;
    let envoy_types::pb::envoy::config::core::v3::TransportSocket { name, config_type } = ts;
    match config_type {
        Some(TsConfig::TypedConfig(any))
            if name == TLS_TRANSPORT_SOCKET || any.type_url.ends_with("DownstreamTlsContext") =>
        {
            ServerTls::convert(any, at, rds, errs)
        }
        _ => {
            errs.add(
                at,
                format!("transport socket '{name}' is not supported (only {TLS_TRANSPORT_SOCKET} with a typed_config)"),
            );
            None
        }
    }
}

const CONNECTION_LIMIT_TYPE: &str =
    "envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit";

/// A connection_limit network filter: (stat_prefix, max_connections); anything else before
/// the HCM is an error.
fn connection_limit_filter(f: &Filter, at: &str, errs: &mut Errors) -> Option<(String, u64)> {
    use envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit as Proto;
    let Filter { name, config_type } = f;
    let Some(ConfigType::TypedConfig(any)) = config_type else {
        errs.add(join(at, "typed_config"), format!("required for {name}"));
        return None;
    };
    let type_name = type_name(any);
    if type_name != CONNECTION_LIMIT_TYPE {
        errs.unsupported_extension(
            at,
            &type_name,
            format!("network filter '{name}' ({type_name}) is not supported before the HTTP connection manager (only envoy.filters.network.connection_limit)"),
        );
        return None;
    }
    let p: Proto = unpack_or_report(any, CONNECTION_LIMIT_TYPE, at, errs)?;
    let at = join(at, "typed_config");
    let Proto {
        stat_prefix,
        max_connections,
        delay,
        runtime_enabled,
    } = &p;
    reject_set!(errs, &at, delay, runtime_enabled);
    if stat_prefix.is_empty() {
        errs.add(join(&at, "stat_prefix"), "must not be empty");
    }
    match max_connections {
        Some(m) if m.value >= 1 => Some((stat_prefix.clone(), m.value)),
        _ => {
            errs.add(join(&at, "max_connections"), "required, at least 1");
            None
        }
    }
}

/// The last network filter of a chain: the HTTP connection manager.
fn http_connection_manager(
    filters: &[Filter],
    at: &str,
    rds: &mut Rds<'_>,
    errs: &mut Errors,
) -> Option<HttpConnectionManager> {
    let Some(first) = filters.first() else {
        errs.add(
            at.rsplit_once(".filters").map_or(at, |(a, _)| a),
            "the last network filter must be envoy.filters.network.http_connection_manager",
        );
        return None;
    };
    let at = at.to_string();
    let Filter { name, config_type } = first;
    let any = match config_type {
        Some(ConfigType::TypedConfig(a)) => a,
        _ => {
            errs.add(join(&at, "typed_config"), format!("required for {name}"));
            return None;
        }
    };
    let type_name = type_name(any);
    if type_name != HCM_TYPE {
        errs.unsupported_extension(
            &at,
            &type_name,
            format!("network filter '{name}' ({type_name}) is not supported; use {HCM_NAME}"),
        );
        return None;
    }
    let hcm = match unpack_any::<HcmProto>(any, HCM_TYPE, &at) {
        Ok(h) => h,
        Err(e) => {
            errs.extend(e);
            return None;
        }
    };
    convert_hcm(&hcm, &join(&at, "typed_config"), rds, errs)
}

fn convert_hcm(
    h: &HcmProto,
    at: &str,
    rds: &mut Rds<'_>,
    errs: &mut Errors,
) -> Option<HttpConnectionManager> {
    let HcmProto {
        codec_type,
        stat_prefix,
        http_filters,
        add_user_agent,
        tracing,
        common_http_protocol_options,
        http1_safe_max_connection_duration,
        http_protocol_options,
        http2_protocol_options,
        http3_protocol_options,
        server_name,
        server_header_transformation,
        scheme_header_transformation,
        max_request_headers_kb,
        stream_idle_timeout,
        stream_flush_timeout,
        request_timeout,
        request_headers_timeout,
        drain_timeout,
        drain_timeout_jitter,
        delayed_close_timeout,
        access_log,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options,
        use_remote_address,
        xff_num_trusted_hops,
        original_ip_detection_extensions,
        early_header_mutation_extensions,
        internal_address_config,
        skip_xff_append,
        via,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        forward_client_cert_details,
        set_current_client_cert_details,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        upgrade_configs,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        request_id_extension,
        local_reply_config,
        strip_matching_host_port,
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
        route_specifier,
        strip_port_mode,
    } = h;
    reject_set!(
        errs,
        at,
        add_user_agent,
        tracing,
        http1_safe_max_connection_duration,
        http_protocol_options,
        http3_protocol_options,
        scheme_header_transformation,
        stream_idle_timeout,
        stream_flush_timeout,
        drain_timeout,
        drain_timeout_jitter,
        delayed_close_timeout,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options,
        original_ip_detection_extensions,
        early_header_mutation_extensions,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        request_id_extension,
        local_reply_config,
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
    );
    let access_logs = crate::access_log::convert(access_log, &join(at, "access_log"), errs).into();
    let forward_client_cert = forward_client_cert(
        *forward_client_cert_details,
        &join(at, "forward_client_cert_details"),
        errs,
    );
    // What APPEND_FORWARD and SANITIZE_SET would put in the header for a client
    // certificate; those modes are refused where clients present one (see `Chain`), so
    // there is never one to describe, in Envoy too.
    let _ = set_current_client_cert_details;
    let h2_settings = http2_protocol_options
        .as_ref()
        .map(|o| {
            crate::config::http2_options::convert(o, &join(at, "http2_protocol_options"), errs)
        })
        .unwrap_or_default();
    let path_normalization = crate::path_normalization::PathNormalization {
        // Envoy's default without the field is its runtime key's, false.
        normalize: normalize_path.is_some_and(|b| b.value),
        merge_slashes: *merge_slashes,
        escaped_slashes: escaped_slashes_action(
            *path_with_escaped_slashes_action,
            &join(at, "path_with_escaped_slashes_action"),
            errs,
        ),
    };
    match CodecType::try_from(*codec_type) {
        Ok(CodecType::Auto) | Ok(CodecType::Http1) => {}
        // Handled below: HTTP2 (h2 only) is not offered yet.
        Ok(other) => errs.add(
            join(at, "codec_type"),
            format!("{} is not supported yet", other.as_str_name()),
        ),
        Err(_) => errs.add(join(at, "codec_type"), "unknown value"),
    }
    if stat_prefix.is_empty() {
        errs.add(join(at, "stat_prefix"), "must not be empty");
    }
    let mut upgrades = Vec::new();
    for (i, u) in upgrade_configs.iter().enumerate() {
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::UpgradeConfig;
        let UpgradeConfig {
            upgrade_type,
            filters,
            enabled,
        } = u;
        let uat = index(&join(at, "upgrade_configs"), i);
        reject_set!(errs, &uat, filters);
        if upgrade_type.eq_ignore_ascii_case("connect") {
            errs.add(join(&uat, "upgrade_type"), "CONNECT is not supported");
        } else {
            upgrades.push((
                upgrade_type.to_ascii_lowercase(),
                enabled.is_none_or(|b| b.value),
            ));
        }
    }
    let server_header = match ServerHeaderTransformation::try_from(*server_header_transformation) {
        Ok(ServerHeaderTransformation::Overwrite) => ServerHeader::Overwrite,
        Ok(ServerHeaderTransformation::AppendIfAbsent) => ServerHeader::AppendIfAbsent,
        Ok(ServerHeaderTransformation::PassThrough) => ServerHeader::PassThrough,
        Err(_) => {
            errs.add(join(at, "server_header_transformation"), "unknown value");
            ServerHeader::Overwrite
        }
    };
    let mut idle_timeout = Some(DEFAULT_IDLE_TIMEOUT);
    let mut limits = ConnectionLimits::default();
    if let Some(opts) = common_http_protocol_options {
        let (idle, l) = crate::config::http_options::downstream(
            opts,
            &join(at, "common_http_protocol_options"),
            errs,
        );
        idle_timeout = duration::optional_timeout(idle, Some(DEFAULT_IDLE_TIMEOUT));
        limits = l;
    }
    let max_request_headers_kb =
        max_request_headers_kb.map_or(DEFAULT_MAX_REQUEST_HEADERS_KB, |v| v.value);
    if !(1..=8192).contains(&max_request_headers_kb) {
        errs.add(join(at, "max_request_headers_kb"), "must be in [1, 8192]");
    }
    duration::check(request_timeout, &join(at, "request_timeout"), errs);
    duration::check(
        request_headers_timeout,
        &join(at, "request_headers_timeout"),
        errs,
    );
    let strip_port = match (strip_matching_host_port, strip_port_mode) {
        (true, Some(_)) => {
            errs.add(
                at,
                "strip_matching_host_port and strip_any_host_port are mutually exclusive",
            );
            StripPort::None
        }
        (true, None) => StripPort::Matching,
        (false, Some(StripPortMode::StripAnyHostPort(true))) => StripPort::Any,
        (false, _) => StripPort::None,
    };
    let routes = match route_specifier {
        Some(RouteSpecifier::RouteConfig(rc)) => {
            RouteTable::convert(rc, &join(at, "route_config"), errs)
        }
        Some(RouteSpecifier::Rds(r)) => {
            let rat = join(at, "rds");
            let RdsProto {
                config_source,
                route_config_name,
            } = r;
            match config_source
                .as_ref()
                .and_then(|c| c.config_source_specifier.as_ref())
            {
                Some(ConfigSourceSpecifier::Ads(_)) => {}
                _ => errs.add(join(&rat, "config_source"), "only ads: {} is supported"),
            }
            let fetch_timeout = config_source
                .as_ref()
                .map_or(Some(DEFAULT_FETCH_TIMEOUT), |c| {
                    duration::check(
                        &c.initial_fetch_timeout,
                        &join(&rat, "config_source.initial_fetch_timeout"),
                        errs,
                    );
                    match &c.initial_fetch_timeout {
                        None => Some(DEFAULT_FETCH_TIMEOUT),
                        Some(d) => Some(duration::to_std(d)).filter(|d| !d.is_zero()),
                    }
                });
            if route_config_name.is_empty() {
                errs.add(join(&rat, "route_config_name"), "required");
                None
            } else {
                rds.names.push(route_config_name.clone());
                rds.timeouts
                    .insert(route_config_name.clone(), fetch_timeout);
                match (rds.lookup)(route_config_name) {
                    // RDS tables name clusters that may arrive later, as in Envoy.
                    Some(rc) => {
                        RouteTable::convert(&rc, &format!("rds[{route_config_name}]"), errs).map(
                            |mut t| {
                                if rc.validate_clusters.is_none() {
                                    t.validate_clusters = false;
                                }
                                t
                            },
                        )
                    }
                    None => {
                        // Warming: the listener waits for its routes before it serves.
                        rds.missing = true;
                        None
                    }
                }
            }
        }
        Some(RouteSpecifier::ScopedRoutes(_)) => {
            errs.add(join(at, "scoped_routes"), "not supported");
            None
        }
        None => {
            errs.add(at, "route_config is required");
            None
        }
    };
    let filters = HttpFilterChain::convert(http_filters, &join(at, "http_filters"), errs);
    let request_timeout = duration::optional_timeout(request_timeout, None);
    let request_headers_timeout = duration::optional_timeout(request_headers_timeout, None);
    if (request_timeout.is_some() || request_headers_timeout.is_some())
        && *codec_type == CodecType::Auto as i32
    {
        // Accepted because HTTP/1 is what slow clients use, but said out loud: Pingora's
        // HTTP/2 server has no read timeouts for legate to drive.
        log::warn!(
            "{at}: request_timeout and request_headers_timeout bound HTTP/1 requests only; \
             HTTP/2 streams on this listener are bounded by the route timeout instead"
        );
    }
    Some(HttpConnectionManager {
        upgrades,
        forward_client_cert,
        h2_settings,
        path_normalization,
        max_request_headers_bytes: max_request_headers_kb as usize * 1024,
        limits,
        h2c: *codec_type == CodecType::Auto as i32,
        access_logs,
        stat_prefix: stat_prefix.clone(),
        routes: routes?,
        filters: filters?,
        server_name: if server_name.is_empty() {
            "legate".to_string()
        } else {
            server_name.clone()
        },
        server_header,
        use_remote_address: use_remote_address.is_some_and(|b| b.value),
        xff_num_trusted_hops: *xff_num_trusted_hops,
        skip_xff_append: *skip_xff_append,
        via: (!via.is_empty()).then(|| via.clone()),
        generate_request_id: generate_request_id.is_none_or(|b| b.value),
        preserve_external_request_id: *preserve_external_request_id,
        always_set_request_id_in_response: *always_set_request_id_in_response,
        idle_timeout,
        request_timeout,
        request_headers_timeout,
        strip_port,
        internal_addresses: convert_internal_addresses(internal_address_config, at, errs),
        stats: crate::stats::http(stat_prefix),
    })
}
