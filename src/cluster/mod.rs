//! Upstream clusters: their endpoints (static or from DNS) and how a host is chosen.

mod background;
pub mod circuit;
pub mod config;
pub mod connect;
pub mod health;
pub mod host;
pub mod lb;
pub mod outlier;
pub mod priority;
mod typed_lb;

pub use config::socket_address;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, EdsClusterConfig},
    Cluster as ClusterProto,
};
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;

use crate::config::duration;
use crate::config::error::{join, Errors};
use crate::config::load::unpack_any;
use crate::reject_set;
use circuit::CircuitBreaker;
use config::{
    convert_common_lb, convert_http_protocol_options, convert_lb_policy, convert_load_assignment,
    convert_upstream_http_options,
};
use health::HealthCheckConfig;
use host::{flags, Host, DEFAULT_OVERPROVISIONING_FACTOR};
use lb::{LbContext, LbPolicy};
use outlier::{Outcome, OutlierConfig};
use priority::{HostSet, LocalityHosts, PrioritySet};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// Envoy's default upstream connection idle timeout.
const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// One endpoint as configured, before DNS resolution.
#[derive(Debug, Clone)]
pub(crate) struct EndpointSpec {
    host: String,
    port: u16,
    hostname: String,
    weight: u32,
    priority: u32,
    locality: usize,
    locality_weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Discovery {
    Static,
    Eds,
    StrictDns,
    LogicalDns,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    policy: LbPolicy,
    locality_weighted: bool,
    overprovisioning_factor: u32,
    discovery: Discovery,
    lookup_family: DnsLookupFamily,
    dns_refresh: Duration,
    endpoints: Vec<EndpointSpec>,
    /// The EDS resource name of an EDS cluster.
    pub eds_service: Option<String>,
    /// The HTTP version(s) its connections speak, and SNI options.
    pub protocol: config::ProtocolSettings,
    /// `upstream_connection_options.tcp_keepalive`.
    pub tcp_keepalive: Option<config::Keepalive>,
    /// `transport_socket` `envoy.transport_sockets.tls`.
    pub tls: Option<crate::tls::UpstreamTls>,
    /// Set when `connect_timeout` is under a second (see connect.rs).
    pub tokio_connect: Option<Arc<connect::TokioConnect>>,
    /// Pingora's connection-pool group: pooled connections are shared only within one
    /// cluster and one version of its definition, as Envoy keeps pools per cluster. (Pingora
    /// alone would reuse a connection verified with another cluster's CA.)
    pub pool_key: u64,
    /// `cluster.<name>.*` counters, shared across configurations.
    pub stats: Arc<crate::stats::ClusterStats>,
    pub circuit: Arc<CircuitBreaker>,
    pub health_check: Option<HealthCheckConfig>,
    pub outlier: Option<OutlierConfig>,
    /// Below this share of healthy hosts a priority ignores health (Envoy's panic mode).
    panic_threshold: f64,
    /// Every host, healthy or not, in config order.
    members: ArcSwap<Vec<Arc<Host>>>,
    /// What the balancers pick from: healthy hosts by priority and locality.
    hosts: ArcSwap<PrioritySet>,
    /// Set once the cluster routed a request (health checks then use `interval`).
    has_traffic: AtomicBool,
    /// Serialises rebuilds of the host sets (control path only).
    rebuild_lock: Mutex<()>,
    /// Where background tasks (health checks, outlier detection) run, once started.
    runtime: OnceLock<tokio::runtime::Handle>,
    /// This cluster's own weak reference, for tasks spawned from `&self`.
    self_ref: OnceLock<std::sync::Weak<Cluster>>,
}

impl Cluster {
    /// Plaintext HTTP/1.1 to every endpoint (no TLS, no h2c).
    pub fn speaks_plain_http1(&self) -> bool {
        self.tls.is_none() && self.protocol.protocol != config::UpstreamProtocol::Http2
    }

    pub fn convert(c: &ClusterProto, at: &str, errs: &mut Errors) -> Option<Self> {
        Cluster::convert_with_eds(c, at, &|_| None, errs)
    }

    /// Like `convert`; an EDS cluster takes its endpoints from `eds` (by service name).
    pub fn convert_with_eds(
        c: &ClusterProto,
        at: &str,
        eds: &dyn Fn(&str) -> Option<ClusterLoadAssignment>,
        errs: &mut Errors,
    ) -> Option<Self> {
        let ClusterProto {
            transport_socket_matches,
            transport_socket_matcher,
            name,
            alt_stat_name,
            stats_matcher,
            eds_cluster_config,
            connect_timeout,
            // Envoy's soft limit on an upstream connection's buffers. legate's engines
            // read a response in chunks of at most 64 KiB, with at most four queued
            // towards the client (Pingora's channel), whatever is set here (docs/configuration.md:
            // differences).
            per_connection_buffer_limit_bytes: _,
            per_connection_buffer_high_watermark_timeout,
            lb_policy,
            load_assignment,
            health_checks,
            max_requests_per_connection,
            circuit_breakers,
            upstream_http_protocol_options,
            common_http_protocol_options,
            http_protocol_options,
            http2_protocol_options,
            typed_extension_protocol_options,
            dns_refresh_rate,
            dns_jitter,
            dns_failure_refresh_rate,
            respect_dns_ttl,
            dns_lookup_family,
            dns_resolvers,
            use_tcp_for_dns_lookups,
            dns_resolution_config,
            typed_dns_resolver_config,
            wait_for_warm_on_init,
            outlier_detection,
            cleanup_interval,
            upstream_bind_config,
            lb_subset_config,
            common_lb_config,
            transport_socket,
            metadata: _,
            protocol_selection,
            upstream_connection_options,
            close_connections_on_host_health_failure,
            // A host removed by EDS or DNS leaves at once, healthy or not: what Envoy does
            // with this set, which is how control planes set it.
            ignore_health_on_host_removal: _,
            filters,
            load_balancing_policy,
            lrs_server,
            lrs_report_endpoint_metrics,
            track_timeout_budgets,
            upstream_config,
            track_cluster_stats,
            preconnect_policy,
            connection_pool_per_downstream_connection,
            queuing_policies,
            cluster_discovery_type,
            lb_config,
        } = c;
        reject_set!(
            errs,
            at,
            transport_socket_matches,
            transport_socket_matcher,
            alt_stat_name,
            stats_matcher,
            per_connection_buffer_high_watermark_timeout,
            max_requests_per_connection,
            upstream_http_protocol_options,
            http_protocol_options,
            http2_protocol_options,
            dns_jitter,
            dns_failure_refresh_rate,
            respect_dns_ttl,
            dns_resolvers,
            use_tcp_for_dns_lookups,
            dns_resolution_config,
            typed_dns_resolver_config,
            wait_for_warm_on_init,
            cleanup_interval,
            upstream_bind_config,
            lb_subset_config,
            protocol_selection,
            close_connections_on_host_health_failure,
            filters,
            lrs_server,
            lrs_report_endpoint_metrics,
            track_timeout_budgets,
            upstream_config,
            track_cluster_stats,
            preconnect_policy,
            connection_pool_per_downstream_connection,
            queuing_policies,
        );
        if name.is_empty() {
            errs.add(join(at, "name"), "must not be empty");
        }
        duration::check(connect_timeout, &join(at, "connect_timeout"), errs);
        duration::check(dns_refresh_rate, &join(at, "dns_refresh_rate"), errs);
        let discovery = match cluster_discovery_type {
            None => Discovery::Static,
            Some(ClusterDiscoveryType::Type(t)) => match DiscoveryType::try_from(*t) {
                Ok(DiscoveryType::Static) => Discovery::Static,
                Ok(DiscoveryType::StrictDns) => Discovery::StrictDns,
                Ok(DiscoveryType::LogicalDns) => Discovery::LogicalDns,
                Ok(DiscoveryType::Eds) => Discovery::Eds,
                Ok(DiscoveryType::OriginalDst) => {
                    errs.add(join(at, "type"), "ORIGINAL_DST is not supported");
                    return None;
                }
                Err(_) => {
                    errs.add(join(at, "type"), "unknown value");
                    return None;
                }
            },
            Some(ClusterDiscoveryType::ClusterType(_)) => {
                errs.add(join(at, "cluster_type"), "not supported");
                return None;
            }
        };
        let tcp_keepalive = upstream_connection_options.as_ref().and_then(|o| {
            config::convert_upstream_connection_options(
                o,
                &join(at, "upstream_connection_options"),
                errs,
            )
        });
        let lookup_family = match DnsLookupFamily::try_from(*dns_lookup_family) {
            Ok(f) => f,
            Err(_) => {
                errs.add(join(at, "dns_lookup_family"), "unknown value");
                DnsLookupFamily::Auto
            }
        };
        let (mut locality_weighted, panic_threshold) =
            convert_common_lb(common_lb_config, &join(at, "common_lb_config"), errs);
        // Envoy: a load_balancing_policy supersedes lb_policy, and its own locality settings
        // replace common_lb_config's.
        let policy = match load_balancing_policy {
            Some(p) => {
                let (policy, weighted) =
                    typed_lb::convert(p, &join(at, "load_balancing_policy"), errs)?;
                locality_weighted = weighted;
                policy
            }
            None => convert_lb_policy(*lb_policy, lb_config, at, errs)?,
        };
        let health_check = match health_checks.as_slice() {
            [] => None,
            [hc] => HealthCheckConfig::convert(hc, &join(at, "health_checks[0]"), errs),
            _ => {
                errs.add(
                    join(at, "health_checks"),
                    "at most one health check is supported",
                );
                None
            }
        };
        let outlier = outlier_detection
            .as_ref()
            .map(|o| OutlierConfig::convert(o, &join(at, "outlier_detection"), errs));
        let circuit =
            CircuitBreaker::convert(circuit_breakers, &join(at, "circuit_breakers"), errs);
        let mut idle_timeout = DEFAULT_UPSTREAM_IDLE_TIMEOUT;
        let mut protocol = config::ProtocolSettings::default();
        if let Some(opts) = common_http_protocol_options {
            let at = join(at, "common_http_protocol_options");
            if let Some(t) = convert_upstream_http_options(opts, &at, errs) {
                idle_timeout = t;
            }
        }
        for (key, any) in typed_extension_protocol_options {
            let at = join(&join(at, "typed_extension_protocol_options"), key);
            if key != HTTP_PROTOCOL_OPTIONS {
                errs.add(&at, "not supported");
                continue;
            }
            match unpack_any::<HttpProtocolOptions>(any, HTTP_PROTOCOL_OPTIONS, &at) {
                Ok(o) => {
                    if let Some(t) = convert_http_protocol_options(&o, &at, &mut protocol, errs) {
                        idle_timeout = t;
                    }
                }
                Err(e) => errs.extend(e),
            }
        }
        let tls = transport_socket.as_ref().and_then(|ts| {
            use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
            let tat = join(at, "transport_socket");
            match &ts.config_type {
                Some(ConfigType::TypedConfig(any)) => {
                    crate::tls::UpstreamTls::convert(any, &tat, errs)
                }
                None => {
                    errs.add(&tat, "typed_config is required");
                    None
                }
            }
        });
        if let Some(t) = &tls {
            if protocol.auto_san_validation && !(protocol.auto_sni || t.auto_sni) {
                errs.add(
                    join(at, "typed_extension_protocol_options"),
                    "auto_san_validation needs auto_sni",
                );
            }
        } else {
            if protocol.protocol == config::UpstreamProtocol::Alpn {
                errs.add(
                    join(at, "typed_extension_protocol_options"),
                    "auto_config needs a TLS transport_socket (ALPN)",
                );
            }
            if protocol.auto_sni || protocol.auto_san_validation {
                errs.add(
                    join(at, "typed_extension_protocol_options"),
                    "auto_sni and auto_san_validation need a TLS transport_socket",
                );
            }
        }
        let eds_service = match (discovery, eds_cluster_config) {
            (Discovery::Eds, Some(e)) => {
                let eat = join(at, "eds_cluster_config");
                let EdsClusterConfig {
                    eds_config,
                    service_name,
                } = e;
                match eds_config
                    .as_ref()
                    .and_then(|c| c.config_source_specifier.as_ref())
                {
                    Some(ConfigSourceSpecifier::Ads(_)) => {}
                    _ => errs.add(join(&eat, "eds_config"), "only ads: {} is supported"),
                }
                Some(if service_name.is_empty() {
                    name.clone()
                } else {
                    service_name.clone()
                })
            }
            (Discovery::Eds, None) => {
                errs.add(join(at, "eds_cluster_config"), "required for EDS clusters");
                None
            }
            (_, Some(_)) => {
                errs.add(join(at, "eds_cluster_config"), "only for EDS clusters");
                None
            }
            (_, None) => None,
        };
        if discovery == Discovery::Eds && load_assignment.is_some() {
            errs.add(
                join(at, "load_assignment"),
                "EDS clusters get their endpoints over EDS",
            );
        }
        let delivered = eds_service.as_deref().and_then(eds);
        let endpoints = match (load_assignment, &delivered) {
            (Some(la), _) => {
                convert_load_assignment(la, &join(at, "load_assignment"), discovery, errs)
            }
            (None, Some(la)) => {
                convert_load_assignment(la, &format!("eds[{}]", la.cluster_name), discovery, errs)
            }
            (None, None) => Vec::new(),
        };
        let load_assignment = load_assignment.as_ref().or(delivered.as_ref());
        let overprovisioning_factor = load_assignment
            .as_ref()
            .and_then(|la| la.policy.as_ref())
            .and_then(|p| p.overprovisioning_factor)
            .map_or(DEFAULT_OVERPROVISIONING_FACTOR, |v| v.value);
        if discovery == Discovery::LogicalDns && endpoints.len() != 1 {
            errs.add(
                join(at, "load_assignment"),
                "LOGICAL_DNS clusters must have exactly one endpoint",
            );
        }
        let connect_timeout = connect_timeout
            .as_ref()
            .map_or(DEFAULT_CONNECT_TIMEOUT, duration::to_std);
        let cluster = Cluster {
            name: name.clone(),
            connect_timeout,
            tokio_connect: (connect_timeout < connect::PINGORA_TOKIO_THRESHOLD).then(|| {
                Arc::new(connect::TokioConnect {
                    timeout: connect_timeout,
                })
            }),
            idle_timeout,
            policy,
            locality_weighted,
            overprovisioning_factor,
            discovery,
            lookup_family,
            dns_refresh: dns_refresh_rate
                .as_ref()
                .map(duration::to_std)
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_DNS_REFRESH),
            endpoints,
            eds_service,
            protocol,
            tcp_keepalive,
            tls,
            pool_key: {
                use prost::Message;
                xxhash_rust::xxh64::xxh64(&c.encode_to_vec(), 0)
            },
            stats: crate::stats::cluster(name),
            circuit: Arc::new(circuit),
            health_check,
            outlier,
            panic_threshold,
            members: ArcSwap::from_pointee(Vec::new()),
            hosts: ArcSwap::from_pointee(PrioritySet::empty()),
            has_traffic: AtomicBool::new(false),
            rebuild_lock: Mutex::new(()),
            runtime: OnceLock::new(),
            self_ref: OnceLock::new(),
        };
        cluster.refresh_hosts();
        Some(cluster)
    }

    /// Chooses an upstream host, or None when the cluster has none.
    pub fn pick(&self, hash: Option<u64>) -> Option<Arc<Host>> {
        if !self.has_traffic.load(Ordering::Relaxed) {
            self.has_traffic.store(true, Ordering::Relaxed);
        }
        let ctx = LbContext {
            hash,
            random: rand::random(),
        };
        self.hosts.load().pick(&ctx)
    }

    pub fn host_count(&self) -> usize {
        self.hosts.load().host_count()
    }

    /// Every host of the cluster, healthy or not.
    pub fn members(&self) -> Arc<Vec<Arc<Host>>> {
        self.members.load_full()
    }

    pub fn has_traffic(&self) -> bool {
        self.has_traffic.load(Ordering::Relaxed)
    }

    pub fn uses_dns(&self) -> bool {
        matches!(self.discovery, Discovery::StrictDns | Discovery::LogicalDns)
    }

    /// Resolves (for DNS clusters) the endpoints and rebuilds the host sets. A host that
    /// was already a member keeps its state; a new one starts unhealthy when the cluster
    /// is health checked, as in Envoy, until its first check passes.
    pub fn refresh_hosts(&self) {
        let mut resolved: Vec<(EndpointSpec, SocketAddr)> = Vec::new();
        for e in &self.endpoints {
            match self.discovery {
                Discovery::Static | Discovery::Eds => {
                    if let Ok(ip) = e.host.parse::<IpAddr>() {
                        resolved.push((e.clone(), SocketAddr::new(ip, e.port)));
                    }
                }
                Discovery::StrictDns => {
                    for a in resolve(&e.host, e.port, self.lookup_family) {
                        resolved.push((e.clone(), a));
                    }
                }
                Discovery::LogicalDns => {
                    if let Some(a) = resolve(&e.host, e.port, self.lookup_family)
                        .into_iter()
                        .next()
                    {
                        resolved.push((e.clone(), a));
                    }
                }
            }
        }
        let old = self.members.load_full();
        let mut added = Vec::new();
        let members: Vec<Arc<Host>> = resolved
            .into_iter()
            .map(|(e, addr)| {
                let same = old.iter().find(|h| {
                    h.address == addr && h.priority == e.priority && h.locality == e.locality
                });
                match same {
                    Some(h) if h.weight == e.weight.max(1) && h.hostname == e.hostname => h.clone(),
                    _ => {
                        let mut h = Host::new(addr, e.hostname.clone(), e.weight, e.locality);
                        h.priority = e.priority;
                        h.locality_weight = e.locality_weight;
                        if let Some(prev) = same {
                            h.adopt_state(prev);
                        } else if self.health_check.is_some() {
                            h.set_flag(flags::FAILED_ACTIVE_HC, true);
                        }
                        let h = Arc::new(h);
                        added.push(h.clone());
                        h
                    }
                }
            })
            .collect();
        self.members.store(Arc::new(members));
        self.rebuild();
        if let Some(rt) = self.runtime.get() {
            background::spawn_health_checks(self, rt, &added);
        }
    }

    /// Carries health and outlier state over from the same cluster in the previous
    /// configuration, so a reload neither resets checks nor forgets ejections.
    pub fn adopt_state(&self, old: &Cluster) {
        let old_members = old.members();
        for h in self.members().iter() {
            if let Some(prev) = old_members.iter().find(|o| o.address == h.address) {
                h.adopt_state(prev);
            }
        }
        if old.has_traffic() {
            self.has_traffic.store(true, Ordering::Relaxed);
        }
        self.rebuild();
    }

    /// Rebuilds the balancers from the members' current health.
    pub fn rebuild(&self) {
        let _guard = self.rebuild_lock.lock().unwrap_or_else(|e| e.into_inner());
        let members = self.members.load();
        let set = build_priority_set(
            &members,
            &self.policy,
            self.locality_weighted,
            self.overprovisioning_factor,
            self.panic_threshold,
        );
        self.hosts.store(Arc::new(set));
    }

    /// Records a request's outcome for outlier detection; ejects the host when a
    /// consecutive-failure threshold is reached and the limits allow it.
    pub fn record_outcome(&self, host: &Arc<Host>, outcome: Outcome) {
        let Some(cfg) = &self.outlier else { return };
        if let Some(reason) = host.outlier.record(outcome, cfg) {
            if background::eject(self, host, reason, cfg) {
                self.rebuild();
            }
        }
    }

    /// Starts health checks, outlier detection and DNS refresh on `rt`. Tasks stop when
    /// the cluster is dropped.
    pub fn start_background(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let _ = self.self_ref.set(Arc::downgrade(self));
        if self.runtime.set(rt.clone()).is_err() {
            return;
        }
        let members = self.members();
        background::spawn_health_checks(self, rt, &members);
        background::spawn_outlier_detection(self, rt);
        background::spawn_dns_refresh(self, rt, self.dns_refresh);
    }
}

fn build_priority_set(
    members: &[Arc<Host>],
    policy: &LbPolicy,
    locality_weighted: bool,
    overprovisioning_factor: u32,
    panic_threshold: f64,
) -> PrioritySet {
    let Some(max_priority) = members.iter().map(|h| h.priority).max() else {
        return PrioritySet::empty();
    };
    let by_priority: Vec<Vec<&Arc<Host>>> = (0..=max_priority)
        .map(|p| members.iter().filter(|h| h.priority == p).collect())
        .collect();
    let health: Vec<(usize, usize)> = by_priority
        .iter()
        .map(|hs| (hs.iter().filter(|h| h.is_healthy()).count(), hs.len()))
        .collect();
    // Envoy panics only when the whole cluster's (overprovisioned) availability is below
    // the threshold; then each priority that is itself below it ignores health.
    let availability: f64 = health
        .iter()
        .map(|&(h, t)| {
            if t == 0 {
                0.0
            } else {
                (h as f64 * f64::from(overprovisioning_factor) / t as f64).min(100.0)
            }
        })
        .sum::<f64>()
        .min(100.0);
    let mut priorities = Vec::new();
    for (hosts, &(healthy, total)) in by_priority.iter().zip(&health) {
        let panic = availability < panic_threshold
            && total > 0
            && (healthy as f64) * 100.0 < panic_threshold * total as f64;
        let mut localities: Vec<LocalityHosts> = Vec::new();
        let mut ids: Vec<usize> = Vec::new();
        for h in hosts.iter().filter(|h| panic || h.is_healthy()) {
            let slot = match ids.iter().position(|l| *l == h.locality) {
                Some(s) => s,
                None => {
                    ids.push(h.locality);
                    localities.push(LocalityHosts {
                        weight: h.locality_weight,
                        hosts: Vec::new(),
                    });
                    localities.len() - 1
                }
            };
            localities[slot].hosts.push((*h).clone());
        }
        priorities.push(HostSet::new(localities, policy, locality_weighted));
    }
    PrioritySet::new(priorities, &health, overprovisioning_factor)
}

/// Set by `--validate`: DNS clusters' names are not looked up, as Envoy's validate mode
/// does not (a config naming hosts of another network still validates, and fast).
pub static SKIP_DNS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn resolve(host: &str, port: u16, family: DnsLookupFamily) -> Vec<SocketAddr> {
    if SKIP_DNS.load(std::sync::atomic::Ordering::Relaxed) {
        return Vec::new();
    }
    let addrs: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            log::warn!("DNS resolution of {host} failed: {e}");
            return Vec::new();
        }
    };
    let v4: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv4()).collect();
    let v6: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv6()).collect();
    let mut out = match family {
        DnsLookupFamily::V4Only => v4,
        DnsLookupFamily::V6Only => v6,
        DnsLookupFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsLookupFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsLookupFamily::All => addrs,
    };
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_message;

    fn cluster(yaml: &str) -> Result<Cluster, crate::config::ConfigErrors> {
        let proto: ClusterProto = parse_message(yaml, "envoy.config.cluster.v3.Cluster")?;
        let mut errs = Errors::default();
        let c = Cluster::convert(&proto, "clusters[0]", &mut errs);
        errs.into_result(c.expect("converted"))
    }

    const TWO_HOSTS: &str = r#"
name: svc
load_assignment:
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1001}}}
    - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1002}}}
      load_balancing_weight: 3
"#;

    #[test]
    fn weighted_round_robin_distribution() {
        let c = cluster(TWO_HOSTS).unwrap();
        let mut counts = [0u32; 2];
        for _ in 0..400 {
            let h = c.pick(None).unwrap();
            counts[(h.address.port() - 1001) as usize] += 1;
        }
        assert_eq!(counts, [100, 300]);
    }

    #[test]
    fn ring_hash_is_consistent_per_key() {
        let c = cluster(&format!("{TWO_HOSTS}lb_policy: RING_HASH\n")).unwrap();
        for k in 0..50u64 {
            let a = c.pick(Some(k * 7919)).unwrap().address;
            for _ in 0..3 {
                assert_eq!(c.pick(Some(k * 7919)).unwrap().address, a);
            }
        }
    }

    #[test]
    fn strict_dns_resolves_localhost() {
        let c = cluster(
            r#"
name: dns
type: STRICT_DNS
dns_lookup_family: V4_ONLY
load_assignment:
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: localhost, port_value: 1001}}}
"#,
        )
        .unwrap();
        let h = c.pick(None).unwrap();
        assert_eq!(h.address, "127.0.0.1:1001".parse().unwrap());
        assert_eq!(h.hostname, "localhost");
    }

    #[test]
    fn logical_dns_takes_one_address_and_needs_one_endpoint() {
        let c = cluster(
            r#"
name: dns
type: LOGICAL_DNS
dns_lookup_family: V4_ONLY
load_assignment:
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: localhost, port_value: 1001}}}
"#,
        )
        .unwrap();
        assert_eq!(c.host_count(), 1);
        let e = cluster(
            r#"
name: dns
type: LOGICAL_DNS
load_assignment:
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: localhost, port_value: 1001}}}
    - endpoint: {address: {socket_address: {address: localhost, port_value: 1002}}}
"#,
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "clusters[0].load_assignment");
    }

    #[test]
    fn static_cluster_needs_ip_addresses() {
        let e = cluster(
            r#"
name: s
load_assignment:
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: localhost, port_value: 1}}}
"#,
        )
        .unwrap_err();
        assert_eq!(
            e.0[0].path,
            "clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
        );
    }

    #[test]
    fn unsupported_cluster_fields_are_named() {
        let e = cluster("name: a\nlb_subset_config: {}\n").unwrap_err();
        assert_eq!(e.to_string(), "clusters[0].lb_subset_config: not supported");
    }

    #[test]
    fn maglev_table_size_must_be_prime() {
        let e = cluster("name: a\nlb_policy: MAGLEV\nmaglev_lb_config: {table_size: 100}\n")
            .unwrap_err();
        assert_eq!(e.0[0].path, "clusters[0].maglev_lb_config.table_size");
    }
}
