//! HTTP filters: the HCM's `http_filters`, run in order before the router (which is the
//! proxy itself and must come last).
//!
//! This is also legate's public extension API. A program that embeds legate implements
//! [`HttpFilter`] and an [`HttpFilterFactory`] that builds it from its settings, registers
//! the factory on [`crate::Legate`], and configures it exactly as Envoy configures an
//! extension: an `http_filters` entry whose `typed_config` is an `xds.type.v3.TypedStruct`
//! (or `udpa.type.v1.TypedStruct`) carrying the factory's `type_url` and a JSON-like
//! `value`; per-route settings come from `typed_per_filter_config`, keyed by the filter's
//! name, in the same form.

use std::any::Any;
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any as PbAny;

use envoy_types::pb::envoy::extensions::filters::http::health_check::v3::HealthCheck as HealthCheckProto;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter::ConfigType, HttpFilter as HttpFilterProto,
};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::error::{index, join, Errors};
use crate::config::load::{type_name, unpack_any, unpack_or_report};
use crate::reject_set;
use crate::route::matcher::HeaderMatcher;
use crate::route::request::RequestView;

const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
const HEALTH_CHECK: &str = "envoy.extensions.filters.http.health_check.v3.HealthCheck";

/// Set by the admin `POST /healthcheck/fail`, cleared by `/healthcheck/ok`: process-wide,
/// as in Envoy, so load balancers in front can take this instance out before a restart.
pub static HEALTH_CHECK_FAILED: AtomicBool = AtomicBool::new(false);

/// What a filter decided about a request.
#[derive(Debug)]
pub enum FilterDecision {
    Continue,
    /// Answer locally with this status and body; later filters and the router do not run.
    Respond {
        status: u16,
        body: String,
    },
    /// Answer locally with this status, no body, and these headers.
    RespondWithHeaders {
        status: u16,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
}

/// What a filter may know about the request it is looking at.
#[derive(Debug, Clone, Copy)]
pub struct FilterContext<'a> {
    /// The matched route's `name` (None when no route matched).
    pub route_name: Option<&'a str>,
    /// The cluster the route names (None for redirects, direct responses, weighted or
    /// header-chosen clusters before the choice).
    pub cluster: Option<&'a str>,
    /// This filter's `typed_per_filter_config` on the matched route, else on its virtual
    /// host, as the filter's factory parsed it.
    pub per_route: Option<&'a (dyn Any + Send + Sync)>,
    /// The client, as the connection manager determined it (x-forwarded-for aware).
    pub client: Option<IpAddr>,
    /// This filter's state for this request (e.g. something seen in the request that the
    /// response hook needs).
    pub state: &'a FilterState,
}

impl Default for FilterContext<'_> {
    fn default() -> Self {
        static NONE: FilterState = FilterState(OnceLock::new());
        FilterContext {
            route_name: None,
            cluster: None,
            per_route: None,
            client: None,
            state: &NONE,
        }
    }
}

/// Per-request, per-filter state: set once, read by later hooks of the same request.
#[derive(Debug, Default)]
pub struct FilterState(OnceLock<Box<dyn Any + Send + Sync>>);

impl FilterState {
    /// Stores `value`; false if this request's state was already set.
    pub fn set<T: Any + Send + Sync>(&self, value: T) -> bool {
        self.0.set(Box::new(value)).is_ok()
    }

    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.get()?.downcast_ref::<T>()
    }
}

/// An HTTP filter. Filters see the request headers after routing is decided and before it
/// is acted on (so the matched route is known), body chunks as they stream, and the
/// response headers and body before they go downstream. A filter that changes a body's
/// length should remove `content-length` in the matching headers hook.
pub trait HttpFilter: Send + Sync + Debug {
    fn on_request_headers(
        &self,
        _req: &mut RequestHeader,
        _cx: &FilterContext<'_>,
    ) -> FilterDecision {
        FilterDecision::Continue
    }

    fn on_request_body(
        &self,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _cx: &FilterContext<'_>,
    ) {
    }

    fn on_response_headers(&self, _resp: &mut ResponseHeader, _cx: &FilterContext<'_>) {}

    fn on_response_body(
        &self,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _cx: &FilterContext<'_>,
    ) {
    }
}

/// Builds a filter from its configured settings.
pub trait HttpFilterFactory: Send + Sync {
    /// The settings type, as the TypedStruct's `type_url` names it without the
    /// `type.googleapis.com/` prefix (e.g. `acme.filters.ApiKey`).
    fn config_type(&self) -> &str;

    /// The filter for one `http_filters` entry; an error is reported with the entry's path.
    fn create(&self, config: &serde_json::Value) -> Result<Box<dyn HttpFilter>, String>;

    /// Per-route settings (`typed_per_filter_config`); handed back in
    /// [`FilterContext::per_route`]. By default a filter takes none.
    fn per_route(&self, _config: &serde_json::Value) -> Result<Arc<dyn Any + Send + Sync>, String> {
        Err("this filter takes no per-route configuration".into())
    }
}

static FACTORIES: OnceLock<Vec<Arc<dyn HttpFilterFactory>>> = OnceLock::new();

/// Installs the filter factories (once per process, before any config is compiled).
pub fn register(factories: Vec<Arc<dyn HttpFilterFactory>>) -> Result<(), String> {
    FACTORIES
        .set(factories)
        .map_err(|_| "HTTP filter factories are already registered".to_string())
}

fn factory(config_type: &str) -> Option<&'static Arc<dyn HttpFilterFactory>> {
    FACTORIES
        .get()?
        .iter()
        .find(|f| f.config_type() == config_type)
}

const TYPED_STRUCT: &str = "xds.type.v3.TypedStruct";
const UDPA_TYPED_STRUCT: &str = "udpa.type.v1.TypedStruct";

/// `xds.type.v3.TypedStruct` / `udpa.type.v1.TypedStruct` (same fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypedStruct {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<envoy_types::pb::google::protobuf::Struct>,
}

/// A TypedStruct's inner type name and value as JSON, if `any` is one.
fn typed_struct(any: &PbAny, at: &str, errs: &mut Errors) -> Option<(String, serde_json::Value)> {
    let outer = type_name(any);
    if outer != TYPED_STRUCT && outer != UDPA_TYPED_STRUCT {
        return None;
    }
    let ts: TypedStruct = unpack_or_report(any, &outer, at, errs)?;
    let inner = ts
        .type_url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let value = ts
        .value
        .map_or(serde_json::Value::Object(Default::default()), |v| {
            serde_json::Value::Object(struct_to_json(v))
        });
    Some((inner, value))
}

fn struct_to_json(
    s: envoy_types::pb::google::protobuf::Struct,
) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

fn value_to_json(v: envoy_types::pb::google::protobuf::Value) -> serde_json::Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
    }
}

fn builtin_local_ratelimit(
    any: &PbAny,
    at: &str,
    errs: &mut Errors,
) -> Option<crate::filters::local_ratelimit::LocalRateLimit> {
    use crate::filters::local_ratelimit::{LocalRateLimit, TYPE};
    let p = unpack_or_report(any, TYPE, at, errs)?;
    LocalRateLimit::convert(&p, at, errs)
}

/// Parsed `typed_per_filter_config` entries: (filter name, settings).
pub type PerFilterConfigs = Vec<(String, Arc<dyn Any + Send + Sync>)>;

/// A route's or virtual host's `typed_per_filter_config`.
pub fn per_filter_configs(
    map: &std::collections::HashMap<String, PbAny>,
    at: &str,
    errs: &mut Errors,
) -> PerFilterConfigs {
    let mut out: PerFilterConfigs = map
        .iter()
        .filter_map(|(name, any)| per_route_config(name, any, &join(at, name), errs))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Per-route settings for the filter named `name`, from a `typed_per_filter_config` entry:
/// a TypedStruct for a registered factory. None (with an error) otherwise.
pub fn per_route_config(
    name: &str,
    any: &PbAny,
    at: &str,
    errs: &mut Errors,
) -> Option<(String, Arc<dyn Any + Send + Sync>)> {
    let type_name = type_name(any);
    if type_name == crate::filters::local_ratelimit::TYPE {
        let f = builtin_local_ratelimit(any, at, errs)?;
        return Some((name.to_string(), Arc::new(f)));
    }
    if type_name == crate::filters::cors::POLICY_TYPE {
        use crate::filters::cors::{CorsPolicy, POLICY_TYPE};
        let p = unpack_or_report(any, POLICY_TYPE, at, errs)?;
        return Some((
            name.to_string(),
            Arc::new(CorsPolicy::convert(&p, at, errs)),
        ));
    }
    if type_name == crate::filters::header_mutation::PER_ROUTE_TYPE {
        use crate::filters::header_mutation::{per_route, PER_ROUTE_TYPE};
        let p = unpack_or_report(any, PER_ROUTE_TYPE, at, errs)?;
        return Some((name.to_string(), Arc::new(per_route(&p, at, errs))));
    }
    let Some((config_type, value)) = typed_struct(any, at, errs) else {
        errs.unsupported_extension(
            at,
            &type_name,
            format!(
                "per-route settings of type {type_name} are not supported (use a TypedStruct for a registered filter)"
            ),
        );
        return None;
    };
    let Some(f) = factory(&config_type) else {
        errs.add(
            join(at, "type_url"),
            format!("no registered filter takes {config_type}"),
        );
        return None;
    };
    match f.per_route(&value) {
        Ok(c) => Some((name.to_string(), c)),
        Err(e) => {
            errs.add(join(at, "value"), e);
            None
        }
    }
}

/// The router's own settings (`envoy.filters.http.router`).
#[derive(Debug, Clone, Default)]
pub struct RouterConfig {
    pub suppress_envoy_headers: bool,
}

/// One configured filter: its `http_filters` name (what per-route settings are keyed by).
#[derive(Debug)]
pub struct NamedFilter {
    pub name: String,
    pub filter: Box<dyn HttpFilter>,
}

/// The filter chain of one HCM: the filters before the router, and the router's settings.
#[derive(Debug, Default)]
pub struct FilterChain {
    pub filters: Vec<NamedFilter>,
    pub router: RouterConfig,
}

impl FilterChain {
    pub fn convert(list: &[HttpFilterProto], at: &str, errs: &mut Errors) -> Option<Self> {
        let mut chain = FilterChain::default();
        let mut router_seen = false;
        for (i, f) in list.iter().enumerate() {
            let at = index(at, i);
            let HttpFilterProto {
                name,
                is_optional,
                disabled,
                config_type,
            } = f;
            if router_seen {
                errs.add(&at, "the router must be the last filter");
                continue;
            }
            let any = match config_type {
                Some(ConfigType::TypedConfig(a)) => Some(a),
                Some(ConfigType::ConfigDiscovery(_)) => {
                    errs.add(join(&at, "config_discovery"), "not supported");
                    continue;
                }
                None => None,
            };
            let type_name = any.map(type_name);
            let type_name = type_name.as_deref();
            let is_router = type_name == Some(ROUTER)
                || (type_name.is_none() && name == "envoy.filters.http.router");
            if is_router {
                router_seen = true;
                if *disabled {
                    errs.add(join(&at, "disabled"), "the router cannot be disabled");
                }
                let router = match any {
                    Some(a) => match unpack_any::<Router>(a, ROUTER, &at) {
                        Ok(r) => r,
                        Err(e) => {
                            errs.extend(e);
                            continue;
                        }
                    },
                    None => Router::default(),
                };
                chain.router = convert_router(&router, &join(&at, "typed_config"), errs);
                continue;
            }
            if type_name == Some(HEALTH_CHECK) {
                if *disabled {
                    errs.add(join(&at, "disabled"), "not supported");
                }
                if let Some(a) = any {
                    match unpack_any::<HealthCheckProto>(a, HEALTH_CHECK, &at) {
                        Ok(hc) => {
                            if let Some(f) =
                                HealthCheckFilter::convert(&hc, &join(&at, "typed_config"), errs)
                            {
                                chain.filters.push(NamedFilter {
                                    name: name.clone(),
                                    filter: Box::new(f),
                                });
                            }
                        }
                        Err(e) => errs.extend(e),
                    }
                }
                continue;
            }
            if type_name == Some(crate::filters::cors::TYPE) {
                if *disabled {
                    errs.add(join(&at, "disabled"), "not supported");
                }
                chain.filters.push(NamedFilter {
                    name: name.clone(),
                    filter: Box::new(crate::filters::cors::Cors),
                });
                continue;
            }
            if let Some(a) =
                any.filter(|_| type_name == Some(crate::filters::header_mutation::TYPE))
            {
                use crate::filters::header_mutation::{HeaderMutation, TYPE};
                if *disabled {
                    errs.add(join(&at, "disabled"), "not supported");
                }
                if let Some(p) = unpack_or_report(a, TYPE, &at, errs) {
                    chain.filters.push(NamedFilter {
                        name: name.clone(),
                        filter: Box::new(HeaderMutation::convert(
                            &p,
                            &join(&at, "typed_config"),
                            errs,
                        )),
                    });
                }
                continue;
            }
            if let Some(a) =
                any.filter(|_| type_name == Some(crate::filters::local_ratelimit::TYPE))
            {
                if *disabled {
                    errs.add(join(&at, "disabled"), "not supported");
                }
                if let Some(f) = builtin_local_ratelimit(a, &join(&at, "typed_config"), errs) {
                    chain.filters.push(NamedFilter {
                        name: name.clone(),
                        filter: Box::new(f),
                    });
                }
                continue;
            }
            if let Some((config_type, value)) = any.and_then(|a| typed_struct(a, &at, errs)) {
                if *disabled {
                    errs.add(join(&at, "disabled"), "not supported");
                }
                match factory(&config_type) {
                    Some(f) => match f.create(&value) {
                        Ok(filter) => chain.filters.push(NamedFilter {
                            name: name.clone(),
                            filter,
                        }),
                        Err(e) => errs.add(join(&at, "typed_config.value"), e),
                    },
                    None if *is_optional => {
                        log::warn!("{at}: optional HTTP filter '{name}' ({config_type}) is not registered; skipped");
                    }
                    None => errs.add(
                        join(&at, "typed_config.type_url"),
                        format!("no registered filter takes {config_type} (set is_optional: true to skip it)"),
                    ),
                }
                continue;
            }
            if *is_optional {
                log::warn!(
                    "{at}: optional HTTP filter '{name}' is not available in legate; skipped"
                );
                continue;
            }
            errs.unsupported_extension(
                &at,
                type_name.unwrap_or(name),
                format!(
                    "unknown HTTP filter '{name}'{} (set is_optional: true to skip it)",
                    type_name
                        .map(|t| format!(" of type {t}"))
                        .unwrap_or_default()
                ),
            );
        }
        if !router_seen {
            errs.add(at, "the last HTTP filter must be envoy.filters.http.router");
        }
        Some(chain)
    }
}

fn convert_router(r: &Router, at: &str, errs: &mut Errors) -> RouterConfig {
    let Router {
        dynamic_stats: _,
        start_child_span,
        upstream_log,
        upstream_log_options,
        suppress_envoy_headers,
        strict_check_headers,
        respect_expected_rq_timeout,
        suppress_grpc_request_failure_code_stats: _,
        upstream_http_filters,
        reject_connect_request_early_data,
    } = r;
    // dynamic_stats and suppress_grpc_request_failure_code_stats only shape stats names.
    reject_set!(
        errs,
        at,
        start_child_span,
        upstream_log,
        upstream_log_options,
        strict_check_headers,
        respect_expected_rq_timeout,
        upstream_http_filters,
        reject_connect_request_early_data,
    );
    RouterConfig {
        suppress_envoy_headers: *suppress_envoy_headers,
    }
}

/// `envoy.filters.http.health_check` without pass-through: requests matching `headers` are
/// answered here, 200 normally and 503 after `POST /healthcheck/fail`.
#[derive(Debug)]
pub struct HealthCheckFilter {
    headers: Vec<HeaderMatcher>,
}

impl HealthCheckFilter {
    fn convert(h: &HealthCheckProto, at: &str, errs: &mut Errors) -> Option<Self> {
        let HealthCheckProto {
            pass_through_mode,
            cache_time,
            cluster_min_healthy_percentages,
            headers,
        } = h;
        reject_set!(errs, at, cache_time, cluster_min_healthy_percentages);
        match pass_through_mode {
            None => errs.add(join(at, "pass_through_mode"), "required"),
            Some(b) if b.value => errs.add(
                join(at, "pass_through_mode"),
                "pass-through health checking is not supported; set false",
            ),
            Some(_) => {}
        }
        let headers = headers
            .iter()
            .enumerate()
            .filter_map(|(i, m)| HeaderMatcher::convert(m, &index(&join(at, "headers"), i), errs))
            .collect();
        Some(HealthCheckFilter { headers })
    }
}

impl HttpFilter for HealthCheckFilter {
    fn on_request_headers(
        &self,
        req: &mut RequestHeader,
        _cx: &FilterContext<'_>,
    ) -> FilterDecision {
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let view = RequestView::new(req.method.as_str(), path, host, "http", &req.headers);
        if !self.headers.iter().all(|m| m.matches(&view)) {
            return FilterDecision::Continue;
        }
        let status = if HEALTH_CHECK_FAILED.load(Ordering::Relaxed) {
            503
        } else {
            200
        };
        FilterDecision::Respond {
            status,
            body: String::new(),
        }
    }

    /// Envoy marks every response of a failing server so upstream Envoys eject it at once.
    fn on_response_headers(&self, resp: &mut ResponseHeader, _cx: &FilterContext<'_>) {
        if HEALTH_CHECK_FAILED.load(Ordering::Relaxed) {
            let _ = resp.insert_header("x-envoy-immediate-health-check-fail", "true");
        }
    }
}
