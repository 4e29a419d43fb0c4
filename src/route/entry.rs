//! One route: how it matches a request and what it does with it.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::config::route::v3::{
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    route::Action as ActionProto,
    route_action::{ClusterNotFoundResponseCode, ClusterSpecifier, HostRewriteSpecifier},
    route_match::PathSpecifier,
    weighted_cluster::{cluster_weight, ClusterWeight},
    DirectResponseAction, RedirectAction, Route as RouteProto, RouteAction as RouteActionProto,
    RouteMatch as RouteMatchProto, WeightedCluster,
};
use http::{HeaderName, HeaderValue};
use regex::Regex;

use crate::config::duration;
use crate::config::error::{index, join, Errors};
use crate::reject_set;
use crate::retry::RetryPolicy;
use crate::route::hash::HashPolicy;
use crate::route::headers::HeaderMutations;
use crate::route::index::PathKey;
use crate::route::matcher::{
    full_match_regex, literal_prefix, HeaderMatcher, QueryParameterMatcher, RegexRewrite,
};
use crate::route::request::RequestView;

/// Envoy's default route timeout.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// `typed_per_filter_config`, by filter name, as each filter's factory parsed it.
    pub per_filter: crate::filter::PerFilterConfigs,
    matcher: RouteMatch,
    pub action: Action,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
}

#[derive(Debug)]
pub enum Action {
    Forward(Box<RouteAction>),
    Redirect(Redirect),
    Direct(DirectResponse),
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    /// With the literal text every match starts with, for the route index.
    Regex(Regex, String),
    SeparatedPrefix(String),
}

#[derive(Debug)]
struct RouteMatch {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatcher>,
    query_parameters: Vec<QueryParameterMatcher>,
    grpc: bool,
}

fn starts_with(s: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        s.starts_with(prefix)
    } else {
        s.len() >= prefix.len()
            && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    }
}

impl RouteMatch {
    fn convert(m: &RouteMatchProto, at: &str, errs: &mut Errors) -> Option<Self> {
        let RouteMatchProto {
            case_sensitive,
            runtime_fraction,
            headers,
            query_parameters,
            cookies,
            grpc,
            tls_context,
            dynamic_metadata,
            filter_state,
            path_specifier,
        } = m;
        reject_set!(
            errs,
            at,
            runtime_fraction,
            cookies,
            tls_context,
            dynamic_metadata,
            filter_state
        );
        let case_sensitive = case_sensitive.is_none_or(|b| b.value);
        let path = match path_specifier {
            Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
            Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
            Some(PathSpecifier::SafeRegex(r)) => {
                let regex = full_match_regex(r, &join(at, "safe_regex"), errs)?;
                PathMatch::Regex(regex, literal_prefix(&r.regex))
            }
            Some(PathSpecifier::PathSeparatedPrefix(p)) => {
                if p.contains(['?', '#']) || p.ends_with('/') {
                    errs.add(
                        join(at, "path_separated_prefix"),
                        "must not contain '?' or '#' and must not end with '/'",
                    );
                }
                PathMatch::SeparatedPrefix(p.clone())
            }
            Some(PathSpecifier::ConnectMatcher(_)) => {
                errs.add(join(at, "connect_matcher"), "not supported");
                return None;
            }
            Some(PathSpecifier::PathMatchPolicy(_)) => {
                errs.add(join(at, "path_match_policy"), "not supported");
                return None;
            }
            None => {
                errs.add(
                    at,
                    "one of prefix, path, safe_regex or path_separated_prefix is required",
                );
                return None;
            }
        };
        let headers = headers
            .iter()
            .enumerate()
            .filter_map(|(i, h)| HeaderMatcher::convert(h, &index(&join(at, "headers"), i), errs))
            .collect();
        let query_parameters = query_parameters
            .iter()
            .enumerate()
            .filter_map(|(i, q)| {
                QueryParameterMatcher::convert(q, &index(&join(at, "query_parameters"), i), errs)
            })
            .collect();
        Some(RouteMatch {
            path,
            case_sensitive,
            headers,
            query_parameters,
            grpc: grpc.is_some(),
        })
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(req.path, p, self.case_sensitive),
            PathMatch::Exact(p) => {
                let only = req.path_only();
                if self.case_sensitive {
                    only == p
                } else {
                    only.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r, _) => r.is_match(req.path_only()),
            PathMatch::SeparatedPrefix(p) => {
                let only = req.path_only();
                starts_with(only, p, self.case_sensitive)
                    && (only.len() == p.len() || only.as_bytes()[p.len()] == b'/')
            }
        };
        path_ok
            && (!self.grpc || is_grpc(req))
            && self.headers.iter().all(|h| h.matches(req))
            && self.query_parameters.iter().all(|q| q.matches(req))
    }

    /// The part of the path a `prefix_rewrite` replaces.
    fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) | PathMatch::Exact(p) => Some(p),
            PathMatch::Regex(..) => None,
        }
    }
}

fn is_grpc(req: &RequestView<'_>) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Which cluster(s) a forwarding route sends to.
#[derive(Debug)]
pub enum ClusterChoice {
    Named(String),
    FromHeader(HeaderName),
    Weighted(WeightedClusters),
}

#[derive(Debug)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedClusterEntry>,
    total: u64,
}

#[derive(Debug)]
pub struct WeightedClusterEntry {
    pub name: String,
    pub weight: u64,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub host_rewrite_literal: Option<HeaderValue>,
}

impl WeightedClusters {
    fn convert(w: &WeightedCluster, at: &str, errs: &mut Errors) -> Option<Self> {
        let WeightedCluster {
            clusters,
            total_weight,
            runtime_key_prefix,
            random_value_specifier,
        } = w;
        reject_set!(errs, at, runtime_key_prefix, random_value_specifier);
        let mut out = Vec::new();
        for (i, c) in clusters.iter().enumerate() {
            let at = index(&join(at, "clusters"), i);
            let ClusterWeight {
                name,
                cluster_header,
                weight,
                metadata_match,
                request_headers_to_add,
                request_headers_to_remove,
                response_headers_to_add,
                response_headers_to_remove,
                typed_per_filter_config,
                host_rewrite_specifier,
            } = c;
            reject_set!(
                errs,
                &at,
                cluster_header,
                metadata_match,
                typed_per_filter_config
            );
            if name.is_empty() {
                errs.add(join(&at, "name"), "must not be empty");
            }
            let host_rewrite_literal = match host_rewrite_specifier {
                Some(cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h)) => {
                    match HeaderValue::from_str(h) {
                        Ok(v) => Some(v),
                        Err(_) => {
                            errs.add(join(&at, "host_rewrite_literal"), "invalid host");
                            None
                        }
                    }
                }
                None => None,
            };
            out.push(WeightedClusterEntry {
                name: name.clone(),
                weight: weight.map_or(0, |w| u64::from(w.value)),
                request_headers: HeaderMutations::convert(
                    request_headers_to_add,
                    request_headers_to_remove,
                    &at,
                    "request_headers_to_add",
                    "request_headers_to_remove",
                    errs,
                ),
                response_headers: HeaderMutations::convert(
                    response_headers_to_add,
                    response_headers_to_remove,
                    &at,
                    "response_headers_to_add",
                    "response_headers_to_remove",
                    errs,
                ),
                host_rewrite_literal,
            });
        }
        if out.is_empty() {
            errs.add(join(at, "clusters"), "at least one cluster is required");
            return None;
        }
        let total: u64 = out.iter().map(|c| c.weight).sum();
        if let Some(t) = total_weight {
            if u64::from(t.value) != total {
                errs.add(
                    join(at, "total_weight"),
                    format!("is {} but the cluster weights add up to {total}", t.value),
                );
            }
        }
        if total == 0 {
            errs.add(
                join(at, "clusters"),
                "the sum of weights must be greater than 0",
            );
            return None;
        }
        Some(WeightedClusters {
            clusters: out,
            total,
        })
    }

    /// Picks a cluster with a value in `[0, total)`, as Envoy walks the list.
    pub fn pick(&self, random: u64) -> &WeightedClusterEntry {
        &self.clusters[self.pick_index(random)]
    }

    pub fn pick_index(&self, random: u64) -> usize {
        let mut point = random % self.total;
        for (i, c) in self.clusters.iter().enumerate() {
            if point < c.weight {
                return i;
            }
            point -= c.weight;
        }
        // Unreachable while weights add up to `total`; the last entry is the safe answer.
        self.clusters.len() - 1
    }
}

#[derive(Debug)]
pub enum HostRewrite {
    Literal(HeaderValue),
    /// Use the chosen endpoint's hostname (its address for STATIC clusters).
    Auto,
    Header(HeaderName),
}

#[derive(Debug)]
pub struct RouteAction {
    pub cluster: ClusterChoice,
    pub cluster_not_found_status: u16,
    prefix_rewrite: Option<String>,
    regex_rewrite: Option<RegexRewrite>,
    pub host_rewrite: Option<HostRewrite>,
    pub append_x_forwarded_host: bool,
    /// None: no route timeout (`0s` in the config).
    pub timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub hash_policy: HashPolicy,
    pub retry_policy: Option<RetryPolicy>,
    /// Set when the route honours the `grpc-timeout` request header.
    pub grpc_timeout: Option<GrpcTimeout>,
    /// `upgrade_configs`: (type lowercased, enabled), overriding the connection manager's.
    pub upgrades: Vec<(String, bool)>,
}

/// A route's `upgrade_configs`. CONNECT (with `connect_config`) is not supported, as on the
/// connection manager.
fn route_upgrades(
    configs: &[envoy_types::pb::envoy::config::route::v3::route_action::UpgradeConfig],
    at: &str,
    errs: &mut Errors,
) -> Vec<(String, bool)> {
    use envoy_types::pb::envoy::config::route::v3::route_action::UpgradeConfig;
    let mut out: Vec<(String, bool)> = Vec::new();
    for (i, u) in configs.iter().enumerate() {
        let UpgradeConfig {
            upgrade_type,
            enabled,
            connect_config,
        } = u;
        let uat = index(at, i);
        reject_set!(errs, &uat, connect_config);
        let kind = upgrade_type.to_ascii_lowercase();
        if kind == "connect" {
            errs.add(join(&uat, "upgrade_type"), "CONNECT is not supported");
        } else if kind.is_empty() {
            errs.add(join(&uat, "upgrade_type"), "must not be empty");
        } else if out.iter().any(|(k, _)| *k == kind) {
            // Envoy: "Duplicate upgrade <type>".
            errs.add(
                join(&uat, "upgrade_type"),
                format!("duplicate upgrade {upgrade_type}"),
            );
        } else {
            out.push((kind, enabled.is_none_or(|b| b.value)));
        }
    }
    out
}

/// Envoy's `max_stream_duration.grpc_timeout_header_max` / `_offset` (or the deprecated
/// `max_grpc_timeout` / `grpc_timeout_offset`): a request's `grpc-timeout` replaces the
/// route timeout, capped by `max` (unless zero) and less `offset`.
#[derive(Debug, Clone, Copy)]
pub struct GrpcTimeout {
    pub max: Option<Duration>,
    pub offset: Duration,
}

impl GrpcTimeout {
    /// The timeout for a request with this `grpc-timeout` value; None when the header does
    /// not parse (the route timeout then applies, as in Envoy), Some(None) for no limit.
    pub fn for_header(&self, value: &str) -> Option<Option<Duration>> {
        let value = value.trim();
        let split = value.len().checked_sub(1)?;
        let (digits, unit) = value.split_at(split);
        if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        let t = match unit {
            "H" => Duration::from_secs(n * 3600),
            "M" => Duration::from_secs(n * 60),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        };
        let t = match self.max {
            Some(max) if t > max => max,
            _ => t,
        };
        if t.is_zero() {
            return Some(None);
        }
        Some(Some(if t > self.offset { t - self.offset } else { t }))
    }
}

fn grpc_timeout(
    msd: Option<&envoy_types::pb::envoy::config::route::v3::route_action::MaxStreamDuration>,
    legacy_max: Option<&envoy_types::pb::google::protobuf::Duration>,
    legacy_offset: Option<&envoy_types::pb::google::protobuf::Duration>,
    at: &str,
    errs: &mut Errors,
) -> Option<GrpcTimeout> {
    let make = |max: &envoy_types::pb::google::protobuf::Duration,
                offset: Option<&envoy_types::pb::google::protobuf::Duration>| {
        let max = duration::to_std(max);
        GrpcTimeout {
            max: (!max.is_zero()).then_some(max),
            offset: offset.map(duration::to_std).unwrap_or_default(),
        }
    };
    if let Some(m) = msd {
        let envoy_types::pb::envoy::config::route::v3::route_action::MaxStreamDuration {
            max_stream_duration,
            grpc_timeout_header_max,
            grpc_timeout_header_offset,
        } = m;
        let mat = join(at, "max_stream_duration");
        reject_set!(errs, &mat, max_stream_duration);
        if legacy_max.is_some() || legacy_offset.is_some() {
            errs.add(
                join(at, "max_grpc_timeout"),
                "use max_stream_duration.grpc_timeout_header_max instead, not both",
            );
        }
        return grpc_timeout_header_max
            .as_ref()
            .map(|max| make(max, grpc_timeout_header_offset.as_ref()));
    }
    legacy_max.map(|max| make(max, legacy_offset))
}

impl RouteAction {
    fn convert(a: &RouteActionProto, at: &str, errs: &mut Errors) -> Option<Self> {
        let RouteActionProto {
            cluster_not_found_response_code,
            metadata_match,
            prefix_rewrite,
            regex_rewrite,
            path_rewrite_policy,
            path_rewrite,
            append_x_forwarded_host,
            timeout,
            idle_timeout,
            flush_timeout,
            early_data_policy,
            retry_policy,
            retry_policy_typed_config,
            request_mirror_policies,
            priority,
            rate_limits,
            include_vh_rate_limits,
            hash_policy,
            cors,
            max_grpc_timeout,
            grpc_timeout_offset,
            upgrade_configs,
            internal_redirect_policy,
            internal_redirect_action,
            max_internal_redirects,
            hedge_policy,
            max_stream_duration,
            cluster_specifier,
            host_rewrite_specifier,
        } = a;
        reject_set!(
            errs,
            at,
            metadata_match,
            path_rewrite_policy,
            path_rewrite,
            flush_timeout,
            early_data_policy,
            retry_policy_typed_config,
            request_mirror_policies,
            priority,
            rate_limits,
            include_vh_rate_limits,
            cors,
            internal_redirect_policy,
            internal_redirect_action,
            max_internal_redirects,
            hedge_policy,
        );
        duration::check(timeout, &join(at, "timeout"), errs);
        duration::check(idle_timeout, &join(at, "idle_timeout"), errs);
        let grpc_timeout = grpc_timeout(
            max_stream_duration.as_ref(),
            max_grpc_timeout.as_ref(),
            grpc_timeout_offset.as_ref(),
            at,
            errs,
        );
        let upgrades = route_upgrades(upgrade_configs, &join(at, "upgrade_configs"), errs);
        let cluster = match cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => ClusterChoice::Named(c.clone()),
            Some(ClusterSpecifier::Cluster(_)) => {
                errs.add(join(at, "cluster"), "must not be empty");
                return None;
            }
            Some(ClusterSpecifier::ClusterHeader(h)) => {
                match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                    Ok(n) if !h.starts_with(':') => ClusterChoice::FromHeader(n),
                    _ => {
                        errs.add(
                            join(at, "cluster_header"),
                            format!("invalid header name '{h}'"),
                        );
                        return None;
                    }
                }
            }
            Some(ClusterSpecifier::WeightedClusters(w)) => ClusterChoice::Weighted(
                WeightedClusters::convert(w, &join(at, "weighted_clusters"), errs)?,
            ),
            Some(ClusterSpecifier::ClusterSpecifierPlugin(_)) => {
                errs.add(join(at, "cluster_specifier_plugin"), "not supported");
                return None;
            }
            Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => {
                errs.add(join(at, "inline_cluster_specifier_plugin"), "not supported");
                return None;
            }
            None => {
                errs.add(
                    at,
                    "one of cluster, cluster_header or weighted_clusters is required",
                );
                return None;
            }
        };
        let cluster_not_found_status =
            match ClusterNotFoundResponseCode::try_from(*cluster_not_found_response_code) {
                Ok(ClusterNotFoundResponseCode::ServiceUnavailable) => 503,
                Ok(ClusterNotFoundResponseCode::NotFound) => 404,
                Ok(ClusterNotFoundResponseCode::InternalServerError) => 500,
                Err(_) => {
                    errs.add(join(at, "cluster_not_found_response_code"), "unknown value");
                    503
                }
            };
        if !prefix_rewrite.is_empty() && regex_rewrite.is_some() {
            errs.add(
                at,
                "prefix_rewrite and regex_rewrite are mutually exclusive",
            );
        }
        let regex_rewrite = regex_rewrite
            .as_ref()
            .and_then(|r| RegexRewrite::convert(r, &join(at, "regex_rewrite"), errs));
        let host_rewrite = match host_rewrite_specifier {
            None => None,
            Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => match HeaderValue::from_str(h) {
                Ok(v) => Some(HostRewrite::Literal(v)),
                Err(_) => {
                    errs.add(join(at, "host_rewrite_literal"), "invalid host");
                    None
                }
            },
            Some(HostRewriteSpecifier::AutoHostRewrite(b)) => b.value.then_some(HostRewrite::Auto),
            Some(HostRewriteSpecifier::HostRewriteHeader(h)) => {
                match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                    Ok(n) => Some(HostRewrite::Header(n)),
                    Err(_) => {
                        errs.add(join(at, "host_rewrite_header"), "invalid header name");
                        None
                    }
                }
            }
            Some(HostRewriteSpecifier::HostRewritePathRegex(_)) => {
                errs.add(join(at, "host_rewrite_path_regex"), "not supported");
                None
            }
            Some(HostRewriteSpecifier::HostRewrite(_)) => {
                errs.add(join(at, "host_rewrite"), "not supported");
                None
            }
        };
        Some(RouteAction {
            grpc_timeout,
            upgrades,
            cluster,
            cluster_not_found_status,
            prefix_rewrite: (!prefix_rewrite.is_empty()).then(|| prefix_rewrite.clone()),
            regex_rewrite,
            host_rewrite,
            append_x_forwarded_host: *append_x_forwarded_host,
            timeout: duration::optional_timeout(timeout, Some(DEFAULT_ROUTE_TIMEOUT)),
            idle_timeout: duration::optional_timeout(idle_timeout, None),
            hash_policy: HashPolicy::convert(hash_policy, &join(at, "hash_policy"), errs),
            retry_policy: retry_policy
                .as_ref()
                .map(|r| RetryPolicy::convert(r, &join(at, "retry_policy"), errs)),
        })
    }
}

/// Rewrites the path per `prefix_rewrite` or `regex_rewrite`; None if neither applies.
fn rewrite_path(
    path: &str,
    matched_prefix: Option<&str>,
    prefix_rewrite: Option<&str>,
    regex_rewrite: Option<&RegexRewrite>,
) -> Option<String> {
    if let (Some(rewrite), Some(prefix)) = (prefix_rewrite, matched_prefix) {
        // The route matched, so the path starts with the prefix (ignoring case if configured).
        let rest = path.get(prefix.len()..).unwrap_or("");
        return Some(format!("{rewrite}{rest}"));
    }
    if let Some(r) = regex_rewrite {
        let end = path.find(['?', '#']).unwrap_or(path.len());
        let (only, rest) = path.split_at(end);
        return Some(format!("{}{rest}", r.replace_all(only)));
    }
    None
}

#[derive(Debug)]
pub struct Redirect {
    scheme: Option<String>,
    host: Option<String>,
    /// `:port`, as Envoy keeps it.
    port: Option<String>,
    path: Option<RedirectPath>,
    pub status: u16,
    strip_query: bool,
}

#[derive(Debug)]
enum RedirectPath {
    Path { path: String, has_query: bool },
    Prefix(String),
    Regex(RegexRewrite),
}

impl Redirect {
    fn convert(r: &RedirectAction, at: &str, errs: &mut Errors) -> Option<Self> {
        let RedirectAction {
            host_redirect,
            port_redirect,
            response_code,
            strip_query,
            scheme_rewrite_specifier,
            path_rewrite_specifier,
        } = r;
        let status = match RedirectResponseCode::try_from(*response_code) {
            Ok(RedirectResponseCode::MovedPermanently) => 301,
            Ok(RedirectResponseCode::Found) => 302,
            Ok(RedirectResponseCode::SeeOther) => 303,
            Ok(RedirectResponseCode::TemporaryRedirect) => 307,
            Ok(RedirectResponseCode::PermanentRedirect) => 308,
            Err(_) => {
                errs.add(join(at, "response_code"), "unknown value");
                return None;
            }
        };
        let scheme = match scheme_rewrite_specifier {
            Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
            Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
            Some(SchemeRewriteSpecifier::SchemeRedirect(s)) if !s.is_empty() => {
                Some(s.to_ascii_lowercase())
            }
            Some(SchemeRewriteSpecifier::SchemeRedirect(_)) => None,
            None => None,
        };
        let path = match path_rewrite_specifier {
            None => None,
            Some(PathRewriteSpecifier::PathRedirect(p)) => Some(RedirectPath::Path {
                has_query: p.contains('?'),
                path: p.clone(),
            }),
            Some(PathRewriteSpecifier::PrefixRewrite(p)) => Some(RedirectPath::Prefix(p.clone())),
            Some(PathRewriteSpecifier::RegexRewrite(r)) => Some(RedirectPath::Regex(
                RegexRewrite::convert(r, &join(at, "regex_rewrite"), errs)?,
            )),
            Some(PathRewriteSpecifier::PathRewrite(_)) => {
                errs.add(join(at, "path_rewrite"), "not supported");
                return None;
            }
        };
        if *port_redirect > 65535 {
            errs.add(join(at, "port_redirect"), "must be at most 65535");
        }
        Some(Redirect {
            scheme,
            host: (!host_redirect.is_empty()).then(|| host_redirect.clone()),
            port: (*port_redirect != 0).then(|| format!(":{port_redirect}")),
            path,
            status,
            strip_query: *strip_query,
        })
    }

    /// The `location` Envoy would send for this request.
    pub fn location(&self, req: &RequestView<'_>, matched_prefix: Option<&str>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let port = self.port.as_deref().unwrap_or("");
        let host = match &self.host {
            Some(h) => h.as_str(),
            None => request_host_for_redirect(req.host, req.scheme, scheme, port),
        };
        let mut path_has_query = false;
        let mut path = match &self.path {
            Some(RedirectPath::Path { path, has_query }) => {
                path_has_query = *has_query;
                if *has_query {
                    path.clone()
                } else {
                    match req.path.find('?') {
                        Some(q) => format!("{path}{}", &req.path[q..]),
                        None => path.clone(),
                    }
                }
            }
            Some(RedirectPath::Prefix(p)) => rewrite_path(req.path, matched_prefix, Some(p), None)
                .unwrap_or_else(|| req.path.to_string()),
            Some(RedirectPath::Regex(r)) => {
                rewrite_path(req.path, None, None, Some(r)).unwrap_or_else(|| req.path.to_string())
            }
            None => req.path.to_string(),
        };
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        if !path_has_query && self.strip_query {
            if let Some(q) = path.find('?') {
                path.truncate(q);
            }
        }
        format!("{scheme}://{host}{port}{path}")
    }
}

/// Envoy drops the request's port when a new port is set, or when the scheme changes and the
/// port was the old scheme's default.
fn request_host_for_redirect<'a>(
    host: &'a str,
    old_scheme: &str,
    new_scheme: &str,
    new_port: &str,
) -> &'a str {
    if host.is_empty() {
        return host;
    }
    let port_start = if host.starts_with('[') {
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    let Some(i) = port_start else { return host };
    let port = &host[i..];
    let mut remove = !new_port.is_empty();
    if new_scheme != old_scheme {
        remove |= old_scheme.eq_ignore_ascii_case("https") && port == ":443";
        remove |= old_scheme.eq_ignore_ascii_case("http") && port == ":80";
    }
    if remove {
        &host[..i]
    } else {
        host
    }
}

#[derive(Debug)]
pub struct DirectResponse {
    pub status: u16,
    pub body: Option<bytes::Bytes>,
}

/// Reads an Envoy `DataSource` (inline, file or environment variable).
pub fn read_data_source(d: &DataSource, at: &str, errs: &mut Errors) -> Option<Vec<u8>> {
    let DataSource {
        watched_directory,
        specifier,
    } = d;
    reject_set!(errs, at, watched_directory);
    match specifier {
        Some(Specifier::InlineString(s)) => Some(s.clone().into_bytes()),
        Some(Specifier::InlineBytes(b)) => Some(b.clone()),
        Some(Specifier::Filename(f)) => match std::fs::read(f) {
            Ok(b) => Some(b),
            Err(e) => {
                errs.add(join(at, "filename"), format!("cannot read {f}: {e}"));
                None
            }
        },
        Some(Specifier::EnvironmentVariable(v)) => match std::env::var(v) {
            Ok(s) => Some(s.into_bytes()),
            Err(_) => {
                errs.add(join(at, "environment_variable"), format!("{v} is not set"));
                None
            }
        },
        None => Some(Vec::new()),
    }
}

impl DirectResponse {
    fn convert(
        d: &DirectResponseAction,
        at: &str,
        max_body: usize,
        errs: &mut Errors,
    ) -> Option<Self> {
        let DirectResponseAction {
            status,
            body,
            body_format,
        } = d;
        reject_set!(errs, at, body_format);
        if !(200..600).contains(status) {
            errs.add(join(at, "status"), "must be in [200, 600)");
            return None;
        }
        let body = match body {
            None => None,
            Some(b) => {
                let bytes = read_data_source(b, &join(at, "body"), errs)?;
                if bytes.len() > max_body {
                    errs.add(
                        join(at, "body"),
                        format!(
                            "is {} bytes, over max_direct_response_body_size_bytes {max_body}",
                            bytes.len()
                        ),
                    );
                    return None;
                }
                Some(bytes::Bytes::from(bytes))
            }
        };
        Some(DirectResponse {
            status: *status as u16,
            body,
        })
    }
}

impl Route {
    pub fn convert(
        r: &RouteProto,
        at: &str,
        max_direct_body: usize,
        errs: &mut Errors,
    ) -> Option<Self> {
        let RouteProto {
            name,
            r#match,
            metadata: _,
            decorator,
            typed_per_filter_config,
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
            tracing,
            per_request_buffer_limit_bytes,
            stat_prefix,
            request_body_buffer_limit,
            route_specifiers,
            action,
        } = r;
        // `metadata` is opaque to the router; Envoy itself ignores what no filter reads.
        // A decorator names the route's tracing span and, with tracing, travels in
        // `x-envoy-decorator-operation`; Envoy applies it only when the connection manager
        // traces, which legate's do not (`tracing` is refused there), so it changes nothing
        // in either. Checked as Envoy checks it.
        if let Some(d) = decorator {
            if d.operation.is_empty() {
                errs.add(join(at, "decorator.operation"), "must not be empty");
            }
        }
        reject_set!(
            errs,
            at,
            tracing,
            per_request_buffer_limit_bytes,
            stat_prefix,
            request_body_buffer_limit,
            route_specifiers,
        );
        let Some(m) = r#match else {
            errs.add(join(at, "match"), "required");
            return None;
        };
        let matcher = RouteMatch::convert(m, &join(at, "match"), errs);
        let per_filter = crate::filter::per_filter_configs(
            typed_per_filter_config,
            &join(at, "typed_per_filter_config"),
            errs,
        );
        let action = match action {
            Some(ActionProto::Route(a)) => RouteAction::convert(a, &join(at, "route"), errs)
                .map(|a| Action::Forward(Box::new(a))),
            Some(ActionProto::Redirect(r)) => {
                Redirect::convert(r, &join(at, "redirect"), errs).map(Action::Redirect)
            }
            Some(ActionProto::DirectResponse(d)) => {
                DirectResponse::convert(d, &join(at, "direct_response"), max_direct_body, errs)
                    .map(Action::Direct)
            }
            Some(ActionProto::FilterAction(_)) => {
                errs.add(join(at, "filter_action"), "not supported");
                None
            }
            Some(ActionProto::NonForwardingAction(_)) => {
                errs.add(join(at, "non_forwarding_action"), "not supported");
                None
            }
            None => {
                errs.add(at, "one of route, redirect or direct_response is required");
                None
            }
        };
        let request_headers = HeaderMutations::convert(
            request_headers_to_add,
            request_headers_to_remove,
            at,
            "request_headers_to_add",
            "request_headers_to_remove",
            errs,
        );
        let response_headers = HeaderMutations::convert(
            response_headers_to_add,
            response_headers_to_remove,
            at,
            "response_headers_to_add",
            "response_headers_to_remove",
            errs,
        );
        Some(Route {
            per_filter,
            name: name.clone(),
            matcher: matcher?,
            action: action?,
            request_headers,
            response_headers,
        })
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matcher.matches(req)
    }

    pub fn matched_prefix(&self) -> Option<&str> {
        self.matcher.matched_prefix()
    }

    pub fn path_key(&self) -> PathKey<'_> {
        match &self.matcher.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => PathKey::Prefix(p),
            PathMatch::Exact(p) => PathKey::Exact(p),
            // Matched against the path without query, which starts with the literal too.
            PathMatch::Regex(_, literal) if !literal.is_empty() => PathKey::Prefix(literal),
            PathMatch::Regex(..) => PathKey::Other,
        }
    }

    /// The upstream path after this route's rewrites; None when the path is unchanged.
    pub fn rewritten_path(&self, path: &str) -> Option<String> {
        let Action::Forward(a) = &self.action else {
            return None;
        };
        rewrite_path(
            path,
            self.matcher.matched_prefix(),
            a.prefix_rewrite.as_deref(),
            a.regex_rewrite.as_ref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_message;

    fn route(yaml: &str) -> Route {
        let proto: RouteProto = parse_message(yaml, "envoy.config.route.v3.Route").unwrap();
        let mut errs = Errors::default();
        let r = Route::convert(&proto, "r", 4096, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        r.unwrap()
    }

    fn req<'a>(path: &'a str, headers: &'a http::HeaderMap) -> RequestView<'a> {
        RequestView::new("GET", path, "example.com:8080", "http", headers)
    }

    #[test]
    fn prefix_and_case_sensitivity() {
        let h = http::HeaderMap::new();
        let r = route("match: {prefix: /api}\ndirect_response: {status: 200}");
        assert!(r.matches(&req("/api/x", &h)));
        assert!(r.matches(&req("/apix", &h)));
        assert!(!r.matches(&req("/API", &h)));
        let r =
            route("match: {prefix: /api, case_sensitive: false}\ndirect_response: {status: 200}");
        assert!(r.matches(&req("/API/x", &h)));
    }

    #[test]
    fn exact_path_ignores_query() {
        let h = http::HeaderMap::new();
        let r = route("match: {path: /a}\ndirect_response: {status: 200}");
        assert!(r.matches(&req("/a?x=1", &h)));
        assert!(!r.matches(&req("/a/b", &h)));
    }

    #[test]
    fn separated_prefix_needs_segment_boundary() {
        let h = http::HeaderMap::new();
        let r = route("match: {path_separated_prefix: /api}\ndirect_response: {status: 200}");
        assert!(r.matches(&req("/api", &h)));
        assert!(r.matches(&req("/api/v1", &h)));
        assert!(r.matches(&req("/api?q", &h)));
        assert!(!r.matches(&req("/apix", &h)));
    }

    #[test]
    fn safe_regex_matches_whole_path() {
        let h = http::HeaderMap::new();
        let r =
            route("match: {safe_regex: {regex: '/v[0-9]+/.*'}}\ndirect_response: {status: 200}");
        assert!(r.matches(&req("/v1/users?x", &h)));
        assert!(!r.matches(&req("/x/v1/users", &h)));
    }

    #[test]
    fn rewrites_keep_query() {
        let r = route("match: {prefix: /old}\nroute: {cluster: c, prefix_rewrite: /new}");
        assert_eq!(
            r.rewritten_path("/old/a?q=1").as_deref(),
            Some("/new/a?q=1")
        );
        let r = route(
            "match: {prefix: /}\nroute: {cluster: c, regex_rewrite: {pattern: {regex: '^/svc/([^/]+)/(.*)$'}, substitution: '/\\2/\\1'}}",
        );
        assert_eq!(
            r.rewritten_path("/svc/a/b/c?q").as_deref(),
            Some("/b/c/a?q")
        );
    }

    #[test]
    fn redirect_location_follows_envoy() {
        let h = http::HeaderMap::new();
        let r = route("match: {prefix: /}\nredirect: {https_redirect: true}");
        let Action::Redirect(rd) = &r.action else {
            panic!()
        };
        assert_eq!(
            rd.location(&req("/a?b", &h), Some("/")),
            "https://example.com:8080/a?b"
        );
        let v = RequestView::new("GET", "/a", "example.com:80", "http", &h);
        assert_eq!(rd.location(&v, Some("/")), "https://example.com/a");
        assert_eq!(rd.status, 301);

        let r = route("match: {prefix: /old}\nredirect: {prefix_rewrite: /new, strip_query: true, response_code: TEMPORARY_REDIRECT, port_redirect: 9000}");
        let Action::Redirect(rd) = &r.action else {
            panic!()
        };
        assert_eq!(
            rd.location(&req("/old/x?y", &h), Some("/old")),
            "http://example.com:9000/new/x"
        );
        assert_eq!(rd.status, 307);

        let r =
            route("match: {prefix: /}\nredirect: {host_redirect: other.com, path_redirect: /p}");
        let Action::Redirect(rd) = &r.action else {
            panic!()
        };
        assert_eq!(
            rd.location(&req("/x?y", &h), Some("/")),
            "http://other.com/p?y"
        );
    }

    #[test]
    fn weighted_pick_walks_weights() {
        let r = route("match: {prefix: /}\nroute: {weighted_clusters: {clusters: [{name: a, weight: 1}, {name: b, weight: 3}]}}");
        let Action::Forward(a) = &r.action else {
            panic!()
        };
        let ClusterChoice::Weighted(w) = &a.cluster else {
            panic!()
        };
        let picks: Vec<_> = (0..4).map(|i| w.pick(i).name.as_str()).collect();
        assert_eq!(picks, ["a", "b", "b", "b"]);
    }

    #[test]
    fn a_decorator_is_checked_as_envoy_checks_it() {
        route("match: {prefix: /}\ndecorator: {operation: checkout, propagate: false}\ndirect_response: {status: 200}");
        let proto: RouteProto = parse_message(
            "match: {prefix: /}\ndecorator: {propagate: true}\ndirect_response: {status: 200}",
            "envoy.config.route.v3.Route",
        )
        .unwrap();
        let mut errs = Errors::default();
        Route::convert(&proto, "r", 4096, &mut errs);
        let e = errs.into_result(()).unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "r.decorator.operation: must not be empty"
        );
    }

    #[test]
    fn unsupported_fields_are_rejected_with_path() {
        let proto: RouteProto = parse_message(
            "match: {prefix: /}\nroute: {cluster: c, hedge_policy: {}}",
            "envoy.config.route.v3.Route",
        )
        .unwrap();
        let mut errs = Errors::default();
        Route::convert(&proto, "vh.routes[0]", 4096, &mut errs);
        let e = errs.into_result(()).unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "vh.routes[0].route.hedge_policy: not supported"
        );
    }
}
