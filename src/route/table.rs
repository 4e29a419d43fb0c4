//! A route configuration: virtual hosts chosen by Host with Envoy's domain precedence, then
//! the first matching route of that virtual host.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::route::v3::{
    RouteConfiguration, VirtualHost as VirtualHostProto,
};

use crate::config::error::{index, join, Errors};
use crate::reject_set;
use crate::retry::RetryPolicy;
use crate::route::entry::Route;
use crate::route::headers::HeaderMutations;
use crate::route::index::{RouteIndex, WildcardDomains};
use crate::route::request::RequestView;

/// Envoy's default for `max_direct_response_body_size_bytes`.
const DEFAULT_MAX_DIRECT_RESPONSE_BODY: usize = 4096;

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub retry_policy: Option<RetryPolicy>,
    pub include_request_attempt_count: bool,
    pub include_attempt_count_in_response: bool,
    /// `typed_per_filter_config`, by filter name (a route's own entry wins).
    pub per_filter: crate::filter::PerFilterConfigs,
    index: RouteIndex,
}

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `.example.com`.
    suffixes: WildcardDomains,
    /// `example.*` stored as `example.`.
    prefixes: WildcardDomains,
    default: Option<usize>,
    ignore_port_in_host_matching: bool,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub most_specific_header_mutations_wins: bool,
    /// Whether every cluster a route names must exist when the table is loaded (Envoy's
    /// default for inline route configurations).
    pub validate_clusters: bool,
    /// Removed from requests that are not internal.
    pub internal_only_headers: Vec<http::HeaderName>,
}

/// The route a request matched, with the virtual host it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    pub virtual_host: &'a VirtualHost,
    pub route: &'a Route,
}

impl VirtualHost {
    fn convert(v: &VirtualHostProto, at: &str, max_body: usize, errs: &mut Errors) -> Option<Self> {
        let VirtualHostProto {
            name,
            domains,
            routes,
            matcher,
            require_tls,
            virtual_clusters,
            rate_limits,
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
            cors,
            typed_per_filter_config,
            include_request_attempt_count,
            include_attempt_count_in_response,
            retry_policy,
            retry_policy_typed_config,
            hedge_policy,
            include_is_timeout_retry_header,
            per_request_buffer_limit_bytes,
            request_body_buffer_limit,
            request_mirror_policies,
            metadata: _,
            route_specifiers,
        } = v;
        reject_set!(
            errs,
            at,
            matcher,
            require_tls,
            virtual_clusters,
            rate_limits,
            cors,
            retry_policy_typed_config,
            hedge_policy,
            include_is_timeout_retry_header,
            per_request_buffer_limit_bytes,
            request_body_buffer_limit,
            request_mirror_policies,
            route_specifiers,
        );
        if name.is_empty() {
            errs.add(join(at, "name"), "must not be empty");
        }
        if domains.is_empty() {
            errs.add(join(at, "domains"), "at least one domain is required");
        }
        let routes: Vec<Route> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Route::convert(r, &index(&join(at, "routes"), i), max_body, errs))
            .collect();
        Some(VirtualHost {
            per_filter: crate::filter::per_filter_configs(
                typed_per_filter_config,
                &join(at, "typed_per_filter_config"),
                errs,
            ),
            index: RouteIndex::build(routes.iter().map(Route::path_key)),
            name: name.clone(),
            routes,
            retry_policy: retry_policy
                .as_ref()
                .map(|r| RetryPolicy::convert(r, &join(at, "retry_policy"), errs)),
            include_request_attempt_count: *include_request_attempt_count,
            include_attempt_count_in_response: *include_attempt_count_in_response,
            request_headers: HeaderMutations::convert(
                request_headers_to_add,
                request_headers_to_remove,
                at,
                "request_headers_to_add",
                "request_headers_to_remove",
                errs,
            ),
            response_headers: HeaderMutations::convert(
                response_headers_to_add,
                response_headers_to_remove,
                at,
                "response_headers_to_add",
                "response_headers_to_remove",
                errs,
            ),
        })
    }
}

impl RouteTable {
    pub fn convert(rc: &RouteConfiguration, at: &str, errs: &mut Errors) -> Option<Self> {
        let RouteConfiguration {
            name,
            virtual_hosts,
            vhds,
            internal_only_headers,
            response_headers_to_add,
            response_headers_to_remove,
            request_headers_to_add,
            request_headers_to_remove,
            most_specific_header_mutations_wins,
            validate_clusters,
            max_direct_response_body_size_bytes,
            cluster_specifier_plugins,
            request_mirror_policies,
            ignore_port_in_host_matching,
            vhost_header,
            ignore_path_parameters_in_path_matching,
            typed_per_filter_config,
            metadata: _,
            route_specifiers,
        } = rc;
        reject_set!(
            errs,
            at,
            vhds,
            cluster_specifier_plugins,
            request_mirror_policies,
            vhost_header,
            ignore_path_parameters_in_path_matching,
            typed_per_filter_config,
            route_specifiers,
        );
        let max_body = max_direct_response_body_size_bytes
            .map_or(DEFAULT_MAX_DIRECT_RESPONSE_BODY, |v| v.value as usize);
        let mut table = RouteTable {
            name: name.clone(),
            virtual_hosts: Vec::new(),
            exact: HashMap::new(),
            suffixes: WildcardDomains::default(),
            prefixes: WildcardDomains::default(),
            default: None,
            ignore_port_in_host_matching: *ignore_port_in_host_matching,
            request_headers: HeaderMutations::convert(
                request_headers_to_add,
                request_headers_to_remove,
                at,
                "request_headers_to_add",
                "request_headers_to_remove",
                errs,
            ),
            response_headers: HeaderMutations::convert(
                response_headers_to_add,
                response_headers_to_remove,
                at,
                "response_headers_to_add",
                "response_headers_to_remove",
                errs,
            ),
            most_specific_header_mutations_wins: *most_specific_header_mutations_wins,
            validate_clusters: validate_clusters.is_none_or(|b| b.value),
            internal_only_headers: internal_only_headers
                .iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    match http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                        Ok(n) => Some(n),
                        Err(_) => {
                            errs.add(
                                index(&join(at, "internal_only_headers"), i),
                                "invalid header name",
                            );
                            None
                        }
                    }
                })
                .collect(),
        };
        let mut seen: HashMap<String, String> = HashMap::new();
        for (i, vp) in virtual_hosts.iter().enumerate() {
            let vat = index(&join(at, "virtual_hosts"), i);
            let Some(vh) = VirtualHost::convert(vp, &vat, max_body, errs) else {
                continue;
            };
            let idx = table.virtual_hosts.len();
            for (j, d) in vp.domains.iter().enumerate() {
                let domain = d.to_ascii_lowercase();
                if let Some(other) = seen.insert(domain.clone(), vp.name.clone()) {
                    errs.add(
                        index(&join(&vat, "domains"), j),
                        format!("duplicate domain '{d}' (also in virtual host '{other}')"),
                    );
                    continue;
                }
                if domain == "*" {
                    table.default = Some(idx);
                } else if let Some(suffix) = domain.strip_prefix('*') {
                    table.suffixes.insert(suffix, idx);
                } else if let Some(prefix) = domain.strip_suffix('*') {
                    table.prefixes.insert(prefix, idx);
                } else if domain.contains('*') {
                    errs.add(
                        index(&join(&vat, "domains"), j),
                        "a wildcard may only be the first or last character",
                    );
                } else {
                    table.exact.insert(domain, idx);
                }
            }
            table.virtual_hosts.push(vh);
        }
        Some(table)
    }

    /// The virtual host for a Host header value: exact, longest `*suffix`, longest
    /// `prefix*`, then `*`.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        self.virtual_hosts.get(self.virtual_host_index(host)?)
    }

    fn virtual_host_index(&self, host: &str) -> Option<usize> {
        let lowered;
        let mut host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if self.ignore_port_in_host_matching {
            host = strip_port(host).unwrap_or(host);
        }
        self.exact
            .get(host)
            .copied()
            .or_else(|| self.suffixes.longest_suffix(host))
            .or_else(|| self.prefixes.longest_prefix(host))
            .or(self.default)
    }

    pub fn route<'a>(&'a self, req: &RequestView<'_>) -> Option<Matched<'a>> {
        let (v, r) = self.route_index(req)?;
        self.matched(v, r)
    }

    /// (virtual host, route) indices of the first route that matches.
    pub fn route_index(&self, req: &RequestView<'_>) -> Option<(usize, usize)> {
        let v = self.virtual_host_index(req.host)?;
        let vh = &self.virtual_hosts[v];
        let r = vh.index.first_match(req.path, req.path_only().len(), |i| {
            vh.routes[i].matches(req)
        })?;
        Some((v, r))
    }

    pub fn matched(&self, v: usize, r: usize) -> Option<Matched<'_>> {
        let virtual_host = self.virtual_hosts.get(v)?;
        Some(Matched {
            virtual_host,
            route: virtual_host.routes.get(r)?,
        })
    }
}

impl RouteTable {
    /// Whether every cluster a route can send to passes `ok`; false when a route picks its
    /// cluster from a request header.
    pub fn clusters_all(&self, ok: impl Fn(&str) -> bool) -> bool {
        self.virtual_hosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .all(|route| match &route.action {
                crate::route::Action::Forward(a) => match &a.cluster {
                    crate::route::ClusterChoice::Named(n) => ok(n),
                    crate::route::ClusterChoice::Weighted(w) => {
                        w.clusters.iter().all(|c| ok(&c.name))
                    }
                    crate::route::ClusterChoice::FromHeader(_) => false,
                },
                _ => true,
            })
    }

    /// Every cluster a route names, with the path of the field that names it.
    fn named_clusters(&self, at: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (v, vh) in self.virtual_hosts.iter().enumerate() {
            for (r, route) in vh.routes.iter().enumerate() {
                let crate::route::Action::Forward(a) = &route.action else {
                    continue;
                };
                let rat = join(
                    &index(&join(&index(&join(at, "virtual_hosts"), v), "routes"), r),
                    "route",
                );
                match &a.cluster {
                    crate::route::ClusterChoice::Named(n) => {
                        out.push((n.clone(), join(&rat, "cluster")))
                    }
                    crate::route::ClusterChoice::Weighted(w) => {
                        for (i, c) in w.clusters.iter().enumerate() {
                            out.push((
                                c.name.clone(),
                                join(&index(&join(&rat, "weighted_clusters.clusters"), i), "name"),
                            ));
                        }
                    }
                    crate::route::ClusterChoice::FromHeader(_) => {}
                }
            }
        }
        out
    }

    /// Reports each route whose named cluster is not in `known`, as Envoy does for
    /// `validate_clusters`.
    pub fn check_clusters(&self, at: &str, known: &dyn Fn(&str) -> bool, errs: &mut Errors) {
        if !self.validate_clusters {
            return;
        }
        for (name, path) in self.named_clusters(at) {
            if !known(&name) {
                errs.add(
                    path,
                    format!("unknown cluster '{name}' (set validate_clusters: false to allow it)"),
                );
            }
        }
    }
}

/// `host:port` → `host` (IPv6 literals keep their brackets); None when there is no port.
pub fn strip_port(host: &str) -> Option<&str> {
    let colon = host.rfind(':')?;
    if let Some(bracket) = host.rfind(']') {
        if bracket > colon {
            return None;
        }
    }
    host[colon + 1..]
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| &host[..colon])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_message;

    fn table(yaml: &str) -> Result<RouteTable, crate::config::ConfigErrors> {
        let proto: RouteConfiguration =
            parse_message(yaml, "envoy.config.route.v3.RouteConfiguration")?;
        let mut errs = Errors::default();
        let t = RouteTable::convert(&proto, "route_config", &mut errs);
        errs.into_result(t.unwrap())
    }

    const DOMAINS: &str = r#"
virtual_hosts:
- {name: exact, domains: ["www.example.com"], routes: []}
- {name: suffix_long, domains: ["*.api.example.com"], routes: []}
- {name: suffix, domains: ["*.example.com"], routes: []}
- {name: dash, domains: ["*-bar.example.org"], routes: []}
- {name: prefix, domains: ["www.*"], routes: []}
- {name: prefix_long, domains: ["www.example.*"], routes: []}
- {name: port, domains: ["ported.com:8080"], routes: []}
- {name: any, domains: ["*"], routes: []}
"#;

    fn vh<'a>(t: &'a RouteTable, host: &str) -> &'a str {
        &t.virtual_host(host).unwrap().name
    }

    #[test]
    fn domain_precedence_follows_envoy() {
        let t = table(DOMAINS).unwrap();
        assert_eq!(vh(&t, "www.example.com"), "exact");
        assert_eq!(vh(&t, "WWW.Example.COM"), "exact");
        assert_eq!(vh(&t, "v1.api.example.com"), "suffix_long");
        assert_eq!(vh(&t, "a.example.com"), "suffix");
        assert_eq!(vh(&t, "foo-bar.example.org"), "dash");
        assert_eq!(vh(&t, "www.example.net"), "prefix_long");
        assert_eq!(vh(&t, "www.other.net"), "prefix");
        // The wildcard must match at least one character.
        assert_eq!(vh(&t, ".example.com"), "any");
        assert_eq!(vh(&t, "nothing.net"), "any");
    }

    #[test]
    fn ports_are_part_of_the_host_unless_ignored() {
        let t = table(DOMAINS).unwrap();
        assert_eq!(vh(&t, "ported.com:8080"), "port");
        assert_eq!(vh(&t, "a.example.com:8080"), "any");
        let t = table(&format!("ignore_port_in_host_matching: true\n{DOMAINS}")).unwrap();
        assert_eq!(vh(&t, "a.example.com:8080"), "suffix");
    }

    #[test]
    fn no_default_means_no_virtual_host() {
        let t = table("virtual_hosts: [{name: a, domains: [a.com]}]").unwrap();
        assert!(t.virtual_host("b.com").is_none());
    }

    #[test]
    fn duplicate_domains_are_rejected() {
        let e = table("virtual_hosts: [{name: a, domains: [a.com]}, {name: b, domains: [A.com]}]")
            .unwrap_err();
        assert_eq!(e.0[0].path, "route_config.virtual_hosts[1].domains[0]");
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("a.com:80"), Some("a.com"));
        assert_eq!(strip_port("[::1]:80"), Some("[::1]"));
        assert_eq!(strip_port("[::1]"), None);
        assert_eq!(strip_port("a.com"), None);
    }

    /// The index must choose exactly what testing every route in order chooses.
    #[test]
    fn indexed_lookup_equals_linear_scan() {
        let routes = r#"
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - {match: {prefix: "/api/v2", headers: [{name: x-v, string_match: {exact: "2"}}]}, direct_response: {status: 200}}
  - {match: {safe_regex: {regex: "/api/[0-9]+"}}, direct_response: {status: 200}}
  - {match: {path: "/api"}, direct_response: {status: 200}}
  - {match: {path: "/API/x", case_sensitive: false}, direct_response: {status: 200}}
  - {match: {prefix: "/Api", case_sensitive: false}, direct_response: {status: 200}}
  - {match: {path_separated_prefix: "/api/v1"}, direct_response: {status: 200}}
  - {match: {prefix: "/api", query_parameters: [{name: q, present_match: true}]}, direct_response: {status: 200}}
  - {match: {prefix: "/a"}, direct_response: {status: 200}}
  - {match: {path: "/"}, direct_response: {status: 200}}
  - {match: {safe_regex: {regex: ".*"}}, direct_response: {status: 200}}
"#;
        let t = table(routes).unwrap();
        let vh = &t.virtual_hosts[0];
        let mut with_header = http::HeaderMap::new();
        with_header.insert("x-v", http::HeaderValue::from_static("2"));
        let empty = http::HeaderMap::new();
        let paths = [
            "/",
            "/?q",
            "/api",
            "/api?q=1",
            "/API",
            "/api/x",
            "/Api/X",
            "/api/X?q",
            "/api/v1",
            "/api/v1/",
            "/api/v10",
            "/api/v2",
            "/api/v2/z",
            "/api/12",
            "/apix",
            "/a",
            "/b",
            "",
            "/api/v1#frag",
            "/api#x",
        ];
        for path in paths {
            for headers in [&empty, &with_header] {
                let req = RequestView::new("GET", path, "h", "http", headers);
                let linear = vh.routes.iter().position(|r| r.matches(&req));
                let indexed = t.route_index(&req).map(|(_, r)| r);
                assert_eq!(indexed, linear, "path {path:?} headers {headers:?}");
            }
        }
    }
}
