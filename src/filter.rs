//! HTTP filters: the HCM's `http_filters`, run in order before the router (which is the
//! proxy itself and must come last).

use std::fmt::Debug;

use std::sync::atomic::{AtomicBool, Ordering};

use envoy_types::pb::envoy::extensions::filters::http::health_check::v3::HealthCheck as HealthCheckProto;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter::ConfigType, HttpFilter as HttpFilterProto,
};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::error::{index, join, Errors};
use crate::config::load::unpack_any;
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
}

/// An HTTP filter. Filters see request headers before routing is acted on and response
/// headers before they go downstream.
pub trait HttpFilter: Send + Sync + Debug {
    fn name(&self) -> &str;

    fn on_request_headers(&self, _req: &mut RequestHeader) -> FilterDecision {
        FilterDecision::Continue
    }

    fn on_response_headers(&self, _resp: &mut ResponseHeader) {}
}

/// The router's own settings (`envoy.filters.http.router`).
#[derive(Debug, Clone, Default)]
pub struct RouterConfig {
    pub suppress_envoy_headers: bool,
}

/// The filter chain of one HCM: the filters before the router, and the router's settings.
#[derive(Debug, Default)]
pub struct FilterChain {
    pub filters: Vec<Box<dyn HttpFilter>>,
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
            let type_name = any.map(|a| a.type_url.rsplit('/').next().unwrap_or_default());
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
                                chain.filters.push(Box::new(f));
                            }
                        }
                        Err(e) => errs.extend(e),
                    }
                }
                continue;
            }
            if *is_optional {
                log::warn!(
                    "{at}: optional HTTP filter '{name}' is not available in legate; skipped"
                );
                continue;
            }
            errs.add(
                &at,
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
    fn name(&self) -> &str {
        "envoy.filters.http.health_check"
    }

    fn on_request_headers(&self, req: &mut RequestHeader) -> FilterDecision {
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
    fn on_response_headers(&self, resp: &mut ResponseHeader) {
        if HEALTH_CHECK_FAILED.load(Ordering::Relaxed) {
            let _ = resp.insert_header("x-envoy-immediate-health-check-fail", "true");
        }
    }
}
