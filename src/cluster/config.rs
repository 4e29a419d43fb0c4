//! Converting a cluster's Envoy config pieces: load-balancing policy, protocol options,
//! load assignment and socket addresses.

use std::net::IpAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    common_lb_config::LocalityConfigSpecifier, ring_hash_lb_config::HashFunction, CommonLbConfig,
    LbConfig, LbPolicy as LbPolicyProto, LeastRequestLbConfig, MaglevLbConfig, RingHashLbConfig,
    RoundRobinLbConfig,
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

use envoy_types::pb::google::protobuf::{UInt32Value, UInt64Value};

use super::lb::{self, LbPolicy};
use super::{Discovery, EndpointSpec};
use crate::config::duration;
use crate::config::error::{index, join, Errors};
use crate::reject_set;

pub(super) fn convert_lb_policy(
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
            Some(ring_hash(*minimum_ring_size, *maximum_ring_size, &at, errs))
        }
        (LbPolicy::Maglev { .. }, LbConfig::MaglevLbConfig(c)) => {
            let MaglevLbConfig { table_size } = c;
            Some(maglev(*table_size, &join(at, "maglev_lb_config"), errs))
        }
        (LbPolicy::LeastRequest { .. }, LbConfig::LeastRequestLbConfig(c)) => {
            let at = join(at, "least_request_lb_config");
            let LeastRequestLbConfig {
                choice_count,
                active_request_bias,
                slow_start_config,
            } = c;
            reject_set!(errs, &at, active_request_bias, slow_start_config);
            Some(least_request(*choice_count, &at, errs))
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

pub(super) fn ring_hash(
    minimum_ring_size: Option<UInt64Value>,
    maximum_ring_size: Option<UInt64Value>,
    at: &str,
    errs: &mut Errors,
) -> LbPolicy {
    let min = minimum_ring_size.map_or(1024, |v| v.value);
    let max = maximum_ring_size.map_or(8 * 1024 * 1024, |v| v.value);
    if min == 0 || min > max || max > 8 * 1024 * 1024 {
        errs.add(
            at,
            "ring sizes must satisfy 0 < minimum_ring_size <= maximum_ring_size <= 8M",
        );
    }
    LbPolicy::RingHash {
        min_ring_size: min,
        max_ring_size: max,
    }
}

pub(super) fn maglev(table_size: Option<UInt64Value>, at: &str, errs: &mut Errors) -> LbPolicy {
    let size = table_size.map_or(lb::maglev_default_table_size(), |v| v.value);
    if !is_prime(size) || size > 5_000_011 {
        errs.add(
            join(at, "table_size"),
            "must be a prime number no larger than 5000011",
        );
    }
    LbPolicy::Maglev { table_size: size }
}

pub(super) fn least_request(
    choice_count: Option<UInt32Value>,
    at: &str,
    errs: &mut Errors,
) -> LbPolicy {
    let n = choice_count.map_or(2, |v| v.value);
    if n < 2 {
        errs.add(join(at, "choice_count"), "must be at least 2");
    }
    LbPolicy::LeastRequest { choice_count: n }
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
pub(super) fn convert_common_lb(
    c: &Option<CommonLbConfig>,
    at: &str,
    errs: &mut Errors,
) -> (bool, f64) {
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

pub(super) fn convert_upstream_http_options(
    o: &envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions,
    at: &str,
    errs: &mut Errors,
) -> Option<Duration> {
    crate::config::http_options::idle_timeout(o, at, errs)
        .as_ref()
        .map(duration::to_std)
}

/// Which HTTP version a cluster's connections speak (Envoy's `HttpProtocolOptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// `explicit_http_config.http2_protocol_options`: h2 over TLS, h2c in plaintext.
    Http2,
    /// `use_downstream_protocol_config`: what the client spoke.
    MatchDownstream,
    /// `auto_config`: negotiated by ALPN (TLS clusters only).
    Alpn,
}

/// `upstream_connection_options.tcp_keepalive`: SO_KEEPALIVE on, and each value given set
/// (unset ones stay the system's), as Envoy sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Option<u32>,
    pub interval: Option<u32>,
    pub probes: Option<u32>,
}

impl Keepalive {
    /// For Pingora's connector, which takes every value: the system's where none is given.
    pub fn complete(&self) -> pingora::protocols::l4::ext::TcpKeepalive {
        let system = |name: &str, default: u64| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(default)
        };
        pingora::protocols::l4::ext::TcpKeepalive {
            idle: Duration::from_secs(
                self.time
                    .map_or_else(|| system("tcp_keepalive_time", 7200), u64::from),
            ),
            interval: Duration::from_secs(
                self.interval
                    .map_or_else(|| system("tcp_keepalive_intvl", 75), u64::from),
            ),
            count: self
                .probes
                .map_or_else(|| system("tcp_keepalive_probes", 9), u64::from)
                as usize,
            #[cfg(target_os = "linux")]
            user_timeout: Duration::ZERO,
        }
    }

    /// For a socket the native engine connects.
    pub fn socket2(&self) -> socket2::TcpKeepalive {
        let mut k = socket2::TcpKeepalive::new();
        if let Some(t) = self.time {
            k = k.with_time(Duration::from_secs(u64::from(t)));
        }
        if let Some(i) = self.interval {
            k = k.with_interval(Duration::from_secs(u64::from(i)));
        }
        if let Some(p) = self.probes {
            k = k.with_retries(p);
        }
        k
    }
}

pub(super) fn convert_upstream_connection_options(
    o: &envoy_types::pb::envoy::config::cluster::v3::UpstreamConnectionOptions,
    at: &str,
    errs: &mut Errors,
) -> Option<Keepalive> {
    let envoy_types::pb::envoy::config::cluster::v3::UpstreamConnectionOptions {
        tcp_keepalive,
        set_local_interface_name_on_upstream_connections,
        happy_eyeballs_config,
    } = o;
    reject_set!(
        errs,
        at,
        set_local_interface_name_on_upstream_connections,
        happy_eyeballs_config,
    );
    let envoy_types::pb::envoy::config::core::v3::TcpKeepalive {
        keepalive_probes,
        keepalive_time,
        keepalive_interval,
    } = tcp_keepalive.as_ref()?;
    Some(Keepalive {
        time: keepalive_time.map(|v| v.value),
        interval: keepalive_interval.map(|v| v.value),
        probes: keepalive_probes.map(|v| v.value),
    })
}

/// The parts of `HttpProtocolOptions` that shape the upstream connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtocolSettings {
    pub protocol: UpstreamProtocol,
    /// `upstream_http_protocol_options.auto_sni`.
    pub auto_sni: bool,
    /// `upstream_http_protocol_options.auto_san_validation`.
    pub auto_san_validation: bool,
    /// `http2_protocol_options`: streams per connection and receive windows (Envoy's
    /// defaults when unset: up to 1024 streams share a connection, as the server allows).
    pub h2: crate::config::http2_options::H2Settings,
}

pub(super) fn convert_http_protocol_options(
    o: &HttpProtocolOptions,
    at: &str,
    settings: &mut ProtocolSettings,
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
    if let Some(u) = upstream_http_protocol_options {
        let envoy_types::pb::envoy::config::core::v3::UpstreamHttpProtocolOptions {
            auto_sni,
            auto_san_validation,
            override_auto_sni_header,
        } = u;
        let uat = join(at, "upstream_http_protocol_options");
        reject_set!(errs, &uat, override_auto_sni_header);
        settings.auto_sni = *auto_sni;
        settings.auto_san_validation = *auto_san_validation;
    }
    reject_set!(
        errs,
        at,
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
            Some(ProtocolConfig::Http2ProtocolOptions(h2)) => {
                settings.h2 = crate::config::http2_options::convert(
                    h2,
                    &join(at, "explicit_http_config.http2_protocol_options"),
                    errs,
                );
                settings.protocol = UpstreamProtocol::Http2;
            }
            Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                errs.add(
                    join(at, "explicit_http_config.http3_protocol_options"),
                    "not supported",
                );
            }
            None => errs.add(join(at, "explicit_http_config"), "a protocol is required"),
        },
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(d)) => {
            let dat = join(at, "use_downstream_protocol_config");
            if d.http_protocol_options
                .as_ref()
                .is_some_and(|h| *h != Default::default())
            {
                errs.add(
                    join(&dat, "http_protocol_options"),
                    "HTTP/1.1 options are not supported (leave it empty)",
                );
            }
            if let Some(h2) = &d.http2_protocol_options {
                settings.h2 = crate::config::http2_options::convert(
                    h2,
                    &join(&dat, "http2_protocol_options"),
                    errs,
                );
            }
            if d.http3_protocol_options.is_some() {
                errs.add(join(&dat, "http3_protocol_options"), "not supported");
            }
            settings.protocol = UpstreamProtocol::MatchDownstream;
        }
        Some(UpstreamProtocolOptions::AutoConfig(a)) => {
            let aat = join(at, "auto_config");
            if a.http_protocol_options
                .as_ref()
                .is_some_and(|h| *h != Default::default())
            {
                errs.add(
                    join(&aat, "http_protocol_options"),
                    "HTTP/1.1 options are not supported (leave it empty)",
                );
            }
            if let Some(h2) = &a.http2_protocol_options {
                settings.h2 = crate::config::http2_options::convert(
                    h2,
                    &join(&aat, "http2_protocol_options"),
                    errs,
                );
            }
            if a.http3_protocol_options.is_some() || a.alternate_protocols_cache_options.is_some() {
                errs.add(&aat, "HTTP/3 is not supported");
            }
            settings.protocol = UpstreamProtocol::Alpn;
        }
    }
    common_http_protocol_options.as_ref().and_then(|c| {
        convert_upstream_http_options(c, &join(at, "common_http_protocol_options"), errs)
    })
}

pub(super) fn convert_load_assignment(
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
            if matches!(discovery, Discovery::Static | Discovery::Eds)
                && host.parse::<IpAddr>().is_err()
            {
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
