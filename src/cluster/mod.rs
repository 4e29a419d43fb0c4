//! Upstream clusters: their endpoints (static or from DNS) and how a host is chosen.

pub mod host;
pub mod lb;
pub mod priority;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{
        common_lb_config::LocalityConfigSpecifier, ring_hash_lb_config::HashFunction,
        ClusterDiscoveryType, CommonLbConfig, DiscoveryType, DnsLookupFamily, LbConfig,
        LbPolicy as LbPolicyProto, LeastRequestLbConfig, MaglevLbConfig, RingHashLbConfig,
        RoundRobinLbConfig,
    },
    Cluster as ClusterProto,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    cluster_load_assignment::Policy, lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint,
    LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};

use crate::config::duration;
use crate::config::error::{index, join, Errors};
use crate::config::load::unpack_any;
use crate::reject_set;
use host::{Host, DEFAULT_OVERPROVISIONING_FACTOR};
use lb::{LbContext, LbPolicy};
use priority::{HostSet, LocalityHosts, PrioritySet};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// Envoy's default upstream connection idle timeout.
const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// One endpoint as configured, before DNS resolution.
#[derive(Debug, Clone)]
struct EndpointSpec {
    host: String,
    port: u16,
    hostname: String,
    weight: u32,
    priority: u32,
    locality: usize,
    locality_weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Discovery {
    Static,
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
    hosts: ArcSwap<PrioritySet>,
}

impl Cluster {
    pub fn convert(c: &ClusterProto, at: &str, errs: &mut Errors) -> Option<Self> {
        let ClusterProto {
            transport_socket_matches,
            transport_socket_matcher,
            name,
            alt_stat_name,
            stats_matcher,
            eds_cluster_config,
            connect_timeout,
            per_connection_buffer_limit_bytes,
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
            ignore_health_on_host_removal,
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
            eds_cluster_config,
            per_connection_buffer_limit_bytes,
            per_connection_buffer_high_watermark_timeout,
            health_checks,
            max_requests_per_connection,
            circuit_breakers,
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
            outlier_detection,
            cleanup_interval,
            upstream_bind_config,
            lb_subset_config,
            transport_socket,
            protocol_selection,
            upstream_connection_options,
            close_connections_on_host_health_failure,
            ignore_health_on_host_removal,
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
                Ok(DiscoveryType::Eds) => {
                    errs.add(join(at, "type"), "EDS is not supported yet");
                    return None;
                }
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
        let lookup_family = match DnsLookupFamily::try_from(*dns_lookup_family) {
            Ok(f) => f,
            Err(_) => {
                errs.add(join(at, "dns_lookup_family"), "unknown value");
                DnsLookupFamily::Auto
            }
        };
        let policy = convert_lb_policy(*lb_policy, lb_config, at, errs)?;
        let (locality_weighted, _) =
            convert_common_lb(common_lb_config, &join(at, "common_lb_config"), errs);
        let mut idle_timeout = DEFAULT_UPSTREAM_IDLE_TIMEOUT;
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
                    if let Some(t) = convert_http_protocol_options(&o, &at, errs) {
                        idle_timeout = t;
                    }
                }
                Err(e) => errs.extend(e),
            }
        }
        let endpoints = match load_assignment {
            Some(la) => convert_load_assignment(la, &join(at, "load_assignment"), discovery, errs),
            None => Vec::new(),
        };
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
        let cluster = Cluster {
            name: name.clone(),
            connect_timeout: connect_timeout
                .as_ref()
                .map_or(DEFAULT_CONNECT_TIMEOUT, duration::to_std),
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
            hosts: ArcSwap::from_pointee(PrioritySet::empty()),
        };
        cluster.refresh_hosts();
        Some(cluster)
    }

    /// Chooses an upstream host, or None when the cluster has none.
    pub fn pick(&self, hash: Option<u64>) -> Option<Arc<Host>> {
        let ctx = LbContext {
            hash,
            random: rand::random(),
        };
        self.hosts.load().pick(&ctx)
    }

    pub fn host_count(&self) -> usize {
        self.hosts.load().host_count()
    }

    pub fn uses_dns(&self) -> bool {
        self.discovery != Discovery::Static
    }

    /// Resolves (for DNS clusters) and rebuilds the host set and its balancers.
    pub fn refresh_hosts(&self) {
        let mut resolved: Vec<(EndpointSpec, SocketAddr)> = Vec::new();
        for e in &self.endpoints {
            match self.discovery {
                Discovery::Static => {
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
        let set = build_priority_set(
            &resolved,
            &self.policy,
            self.locality_weighted,
            self.overprovisioning_factor,
        );
        self.hosts.store(Arc::new(set));
    }

    /// Re-resolves a DNS cluster every `dns_refresh_rate` until the cluster is dropped.
    pub fn start_dns_refresh(self: &Arc<Self>) {
        if !self.uses_dns() {
            return;
        }
        let weak: Weak<Cluster> = Arc::downgrade(self);
        let period = self.dns_refresh;
        let spawned = std::thread::Builder::new()
            .name(format!("dns-{}", self.name))
            .spawn(move || loop {
                std::thread::sleep(period);
                match weak.upgrade() {
                    Some(c) => c.refresh_hosts(),
                    None => return,
                }
            });
        if let Err(e) = spawned {
            log::error!("cluster {}: cannot start DNS refresh: {e}", self.name);
        }
    }
}

fn build_priority_set(
    resolved: &[(EndpointSpec, SocketAddr)],
    policy: &LbPolicy,
    locality_weighted: bool,
    overprovisioning_factor: u32,
) -> PrioritySet {
    let max_priority = resolved.iter().map(|(e, _)| e.priority).max();
    let Some(max_priority) = max_priority else {
        return PrioritySet::empty();
    };
    let mut priorities = Vec::new();
    for p in 0..=max_priority {
        let mut localities: Vec<LocalityHosts> = Vec::new();
        let mut ids: Vec<usize> = Vec::new();
        for (e, addr) in resolved.iter().filter(|(e, _)| e.priority == p) {
            let slot = match ids.iter().position(|l| *l == e.locality) {
                Some(s) => s,
                None => {
                    ids.push(e.locality);
                    localities.push(LocalityHosts {
                        weight: e.locality_weight,
                        hosts: Vec::new(),
                    });
                    localities.len() - 1
                }
            };
            localities[slot].hosts.push(Arc::new(Host::new(
                *addr,
                e.hostname.clone(),
                e.weight,
                e.locality,
            )));
        }
        priorities.push(HostSet::new(localities, policy, locality_weighted));
    }
    PrioritySet::new(priorities, overprovisioning_factor)
}

fn resolve(host: &str, port: u16, family: DnsLookupFamily) -> Vec<SocketAddr> {
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

fn convert_lb_policy(
    policy: i32,
    lb_config: &Option<LbConfig>,
    at: &str,
    errs: &mut Errors,
) -> Option<LbPolicy> {
    let kind = match LbPolicyProto::try_from(policy) {
        Ok(k) => k,
        Err(_) => {
            errs.add(join(at, "lb_policy"), "unknown value");
            return None;
        }
    };
    let out = match kind {
        LbPolicyProto::RoundRobin => LbPolicy::RoundRobin,
        LbPolicyProto::Random => LbPolicy::Random,
        LbPolicyProto::LeastRequest => LbPolicy::LeastRequest { choice_count: 2 },
        LbPolicyProto::RingHash => LbPolicy::RingHash {
            min_ring_size: 1024,
            max_ring_size: 8 * 1024 * 1024,
        },
        LbPolicyProto::Maglev => LbPolicy::Maglev {
            table_size: lb::maglev_default_table_size(),
        },
        LbPolicyProto::ClusterProvided | LbPolicyProto::LoadBalancingPolicyConfig => {
            errs.add(
                join(at, "lb_policy"),
                format!("{} is not supported", kind.as_str_name()),
            );
            return None;
        }
    };
    let Some(cfg) = lb_config else {
        return Some(out);
    };
    match (out, cfg) {
        (LbPolicy::RingHash { .. }, LbConfig::RingHashLbConfig(c)) => {
            let at = join(at, "ring_hash_lb_config");
            let RingHashLbConfig {
                minimum_ring_size,
                hash_function,
                maximum_ring_size,
            } = c;
            if *hash_function != HashFunction::XxHash as i32 {
                errs.add(join(&at, "hash_function"), "only XX_HASH is supported");
            }
            let min = minimum_ring_size.map_or(1024, |v| v.value);
            let max = maximum_ring_size.map_or(8 * 1024 * 1024, |v| v.value);
            if min == 0 || min > max || max > 8 * 1024 * 1024 {
                errs.add(
                    &at,
                    "ring sizes must satisfy 0 < minimum_ring_size <= maximum_ring_size <= 8M",
                );
            }
            Some(LbPolicy::RingHash {
                min_ring_size: min,
                max_ring_size: max,
            })
        }
        (LbPolicy::Maglev { .. }, LbConfig::MaglevLbConfig(c)) => {
            let MaglevLbConfig { table_size } = c;
            let size = table_size.map_or(lb::maglev_default_table_size(), |v| v.value);
            if !is_prime(size) || size > 5_000_011 {
                errs.add(
                    join(at, "maglev_lb_config.table_size"),
                    "must be a prime number no larger than 5000011",
                );
            }
            Some(LbPolicy::Maglev { table_size: size })
        }
        (LbPolicy::LeastRequest { .. }, LbConfig::LeastRequestLbConfig(c)) => {
            let at = join(at, "least_request_lb_config");
            let LeastRequestLbConfig {
                choice_count,
                active_request_bias,
                slow_start_config,
            } = c;
            reject_set!(errs, &at, active_request_bias, slow_start_config);
            let n = choice_count.map_or(2, |v| v.value);
            if n < 2 {
                errs.add(join(&at, "choice_count"), "must be at least 2");
            }
            Some(LbPolicy::LeastRequest { choice_count: n })
        }
        (LbPolicy::RoundRobin, LbConfig::RoundRobinLbConfig(c)) => {
            let RoundRobinLbConfig { slow_start_config } = c;
            reject_set!(errs, &join(at, "round_robin_lb_config"), slow_start_config);
            Some(LbPolicy::RoundRobin)
        }
        (p, _) => {
            errs.add(
                at,
                format!("lb_config does not match lb_policy {}", kind.as_str_name()),
            );
            Some(p)
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

/// Returns (locality_weighted, healthy_panic_threshold%).
fn convert_common_lb(c: &Option<CommonLbConfig>, at: &str, errs: &mut Errors) -> (bool, f64) {
    let Some(c) = c else { return (false, 50.0) };
    let CommonLbConfig {
        healthy_panic_threshold,
        update_merge_window,
        ignore_new_hosts_until_first_hc,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        override_host_status,
        locality_config_specifier,
    } = c;
    reject_set!(
        errs,
        at,
        update_merge_window,
        ignore_new_hosts_until_first_hc,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        override_host_status,
    );
    // Without health checking no host is ever unhealthy, so the threshold cannot trigger;
    // it is validated and kept for when health checks exist.
    let panic = healthy_panic_threshold.as_ref().map_or(50.0, |p| p.value);
    if !(0.0..=100.0).contains(&panic) {
        errs.add(join(at, "healthy_panic_threshold"), "must be in [0, 100]");
    }
    let locality_weighted = match locality_config_specifier {
        None => false,
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_)) => true,
        Some(LocalityConfigSpecifier::ZoneAwareLbConfig(_)) => {
            errs.add(join(at, "zone_aware_lb_config"), "not supported");
            false
        }
    };
    (locality_weighted, panic)
}

fn convert_upstream_http_options(
    o: &envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions,
    at: &str,
    errs: &mut Errors,
) -> Option<Duration> {
    let envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions {
        idle_timeout,
        max_connection_duration,
        max_connection_duration_jitter,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    } = o;
    reject_set!(
        errs,
        at,
        max_connection_duration,
        max_connection_duration_jitter,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    );
    duration::check(idle_timeout, &join(at, "idle_timeout"), errs);
    idle_timeout.as_ref().map(duration::to_std)
}

fn convert_http_protocol_options(
    o: &HttpProtocolOptions,
    at: &str,
    errs: &mut Errors,
) -> Option<Duration> {
    let HttpProtocolOptions {
        common_http_protocol_options,
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
        upstream_protocol_options,
    } = o;
    reject_set!(
        errs,
        at,
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
    );
    match upstream_protocol_options {
        None => {}
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match &e.protocol_config {
            Some(ProtocolConfig::HttpProtocolOptions(h1)) => {
                if *h1 != Default::default() {
                    errs.add(
                        join(at, "explicit_http_config.http_protocol_options"),
                        "HTTP/1.1 options are not supported (leave it empty)",
                    );
                }
            }
            Some(ProtocolConfig::Http2ProtocolOptions(_)) => {
                errs.add(
                    join(at, "explicit_http_config.http2_protocol_options"),
                    "upstream HTTP/2 is not supported yet",
                );
            }
            Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                errs.add(
                    join(at, "explicit_http_config.http3_protocol_options"),
                    "not supported",
                );
            }
            None => errs.add(join(at, "explicit_http_config"), "a protocol is required"),
        },
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
            errs.add(
                join(at, "use_downstream_protocol_config"),
                "not supported yet",
            );
        }
        Some(UpstreamProtocolOptions::AutoConfig(_)) => {
            errs.add(join(at, "auto_config"), "not supported yet");
        }
    }
    common_http_protocol_options.as_ref().and_then(|c| {
        convert_upstream_http_options(c, &join(at, "common_http_protocol_options"), errs)
    })
}

fn convert_load_assignment(
    la: &ClusterLoadAssignment,
    at: &str,
    discovery: Discovery,
    errs: &mut Errors,
) -> Vec<EndpointSpec> {
    let ClusterLoadAssignment {
        cluster_name: _,
        endpoints,
        named_endpoints,
        policy,
    } = la;
    reject_set!(errs, at, named_endpoints);
    if let Some(p) = policy {
        let Policy {
            drop_overloads,
            overprovisioning_factor,
            endpoint_stale_after,
            weighted_priority_health,
        } = p;
        let pat = join(at, "policy");
        reject_set!(
            errs,
            &pat,
            drop_overloads,
            endpoint_stale_after,
            weighted_priority_health
        );
        if overprovisioning_factor.is_some_and(|f| f.value == 0) {
            errs.add(
                join(&pat, "overprovisioning_factor"),
                "must be greater than 0",
            );
        }
    }
    let mut out = Vec::new();
    let mut priorities_seen = Vec::new();
    for (li, l) in endpoints.iter().enumerate() {
        let lat = index(&join(at, "endpoints"), li);
        let LocalityLbEndpoints {
            locality: _,
            metadata: _,
            lb_endpoints,
            load_balancing_weight,
            priority,
            proximity,
            lb_config,
        } = l;
        reject_set!(errs, &lat, proximity, lb_config);
        priorities_seen.push(*priority);
        let locality_weight = load_balancing_weight.map_or(1, |w| w.value);
        for (ei, e) in lb_endpoints.iter().enumerate() {
            let eat = index(&join(&lat, "lb_endpoints"), ei);
            let LbEndpoint {
                health_status,
                metadata: _,
                load_balancing_weight,
                host_identifier,
            } = e;
            reject_set!(errs, &eat, health_status);
            let weight = load_balancing_weight.map_or(1, |w| w.value);
            if weight == 0 {
                errs.add(join(&eat, "load_balancing_weight"), "must be at least 1");
            }
            let endpoint = match host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => ep,
                Some(HostIdentifier::EndpointName(_)) => {
                    errs.add(join(&eat, "endpoint_name"), "not supported");
                    continue;
                }
                None => {
                    errs.add(join(&eat, "endpoint"), "required");
                    continue;
                }
            };
            let Endpoint {
                address,
                health_check_config,
                hostname,
                additional_addresses,
                observability_name: _,
            } = endpoint;
            let eat = join(&eat, "endpoint");
            reject_set!(errs, &eat, health_check_config, additional_addresses);
            let Some((host, port)) = socket_address(address, &join(&eat, "address"), errs) else {
                continue;
            };
            if discovery == Discovery::Static && host.parse::<IpAddr>().is_err() {
                errs.add(
                    join(&eat, "address.socket_address.address"),
                    format!("'{host}' is not an IP address (STATIC clusters need IP addresses; use STRICT_DNS)"),
                );
                continue;
            }
            let hostname = if hostname.is_empty() {
                host.clone()
            } else {
                hostname.clone()
            };
            out.push(EndpointSpec {
                host,
                port,
                hostname,
                weight,
                priority: *priority,
                locality: li,
                locality_weight,
            });
        }
    }
    // Envoy requires priorities to be contiguous from 0.
    priorities_seen.sort();
    priorities_seen.dedup();
    if priorities_seen
        .iter()
        .enumerate()
        .any(|(i, p)| *p as usize != i)
    {
        errs.add(
            join(at, "endpoints"),
            "priorities must be contiguous and start at 0",
        );
    }
    out
}

/// Reads `Address.socket_address` as (host, port); other address kinds are rejected.
pub fn socket_address(a: &Option<Address>, at: &str, errs: &mut Errors) -> Option<(String, u16)> {
    let Some(Address { address }) = a else {
        errs.add(at, "required");
        return None;
    };
    let sa = match address {
        Some(address::Address::SocketAddress(sa)) => sa,
        Some(address::Address::Pipe(_)) => {
            errs.add(join(at, "pipe"), "not supported");
            return None;
        }
        Some(address::Address::EnvoyInternalAddress(_)) => {
            errs.add(join(at, "envoy_internal_address"), "not supported");
            return None;
        }
        None => {
            errs.add(join(at, "socket_address"), "required");
            return None;
        }
    };
    let at = join(at, "socket_address");
    let SocketAddress {
        protocol,
        address,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath,
        port_specifier,
    } = sa;
    reject_set!(
        errs,
        &at,
        protocol,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath
    );
    let port = match port_specifier {
        Some(PortSpecifier::PortValue(p)) if *p <= 65535 => *p as u16,
        Some(PortSpecifier::PortValue(_)) => {
            errs.add(join(&at, "port_value"), "must be at most 65535");
            return None;
        }
        Some(PortSpecifier::NamedPort(_)) => {
            errs.add(join(&at, "named_port"), "not supported");
            return None;
        }
        None => {
            errs.add(join(&at, "port_value"), "required");
            return None;
        }
    };
    if address.is_empty() {
        errs.add(join(&at, "address"), "must not be empty");
        return None;
    }
    Some((address.clone(), port))
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
        let e = cluster("name: a\noutlier_detection: {}\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "clusters[0].outlier_detection: not supported"
        );
    }

    #[test]
    fn maglev_table_size_must_be_prime() {
        let e = cluster("name: a\nlb_policy: MAGLEV\nmaglev_lb_config: {table_size: 100}\n")
            .unwrap_err();
        assert_eq!(e.0[0].path, "clusters[0].maglev_lb_config.table_size");
    }
}
