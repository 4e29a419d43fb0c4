//! HTTP filters: the HCM's `http_filters`, run in order before the router (which is the
//! proxy itself and must come last).

use std::fmt::Debug;

use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter::ConfigType, HttpFilter as HttpFilterProto,
};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::error::{index, join, Errors};
use crate::config::load::unpack_any;
use crate::reject_set;

const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";

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
