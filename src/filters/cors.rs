//! `envoy.filters.http.cors`: answers CORS preflights and adds the CORS response headers,
//! by the `CorsPolicy` in the route's (else the virtual host's) `typed_per_filter_config`.

use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy as Proto;
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::error::{index, join, Errors};
use crate::filter::{FilterContext, FilterDecision, HttpFilter};
use crate::reject_set;
use crate::route::matcher::StringMatcher;

pub const TYPE: &str = "envoy.extensions.filters.http.cors.v3.Cors";
pub const POLICY_TYPE: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// The filter itself has no settings; the policies are per route.
#[derive(Debug)]
pub struct Cors;

#[derive(Debug)]
pub struct CorsPolicy {
    origins: Vec<StringMatcher>,
    allow_methods: String,
    allow_headers: String,
    expose_headers: String,
    max_age: String,
    allow_credentials: bool,
    forward_not_matching_preflights: bool,
}

impl CorsPolicy {
    pub fn convert(p: &Proto, at: &str, errs: &mut Errors) -> Self {
        let Proto {
            allow_origin_string_match,
            allow_methods,
            allow_headers,
            expose_headers,
            max_age,
            allow_credentials,
            filter_enabled,
            shadow_enabled,
            allow_private_network_access,
            forward_not_matching_preflights,
        } = p;
        reject_set!(
            errs,
            at,
            filter_enabled,
            shadow_enabled,
            allow_private_network_access,
        );
        CorsPolicy {
            origins: allow_origin_string_match
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    StringMatcher::convert(
                        m,
                        &index(&join(at, "allow_origin_string_match"), i),
                        errs,
                    )
                })
                .collect(),
            allow_methods: allow_methods.clone(),
            allow_headers: allow_headers.clone(),
            expose_headers: expose_headers.clone(),
            max_age: max_age.clone(),
            allow_credentials: allow_credentials.is_some_and(|b| b.value),
            forward_not_matching_preflights: forward_not_matching_preflights
                .is_none_or(|b| b.value),
        }
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|m| m.matches(origin))
    }
}

/// What the request hook found: the allowed origin of a (non-preflight) CORS request.
struct AllowedOrigin(http::HeaderValue);

impl HttpFilter for Cors {
    fn on_request_headers(
        &self,
        req: &mut RequestHeader,
        cx: &FilterContext<'_>,
    ) -> FilterDecision {
        let Some(policy) = cx.per_route.and_then(|c| c.downcast_ref::<CorsPolicy>()) else {
            return FilterDecision::Continue;
        };
        let Some(origin) = req.headers.get(http::header::ORIGIN).cloned() else {
            return FilterDecision::Continue;
        };
        let allowed = origin.to_str().is_ok_and(|o| policy.allows(o));
        let preflight = req.method == http::Method::OPTIONS
            && req
                .headers
                .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        if !preflight {
            if allowed {
                cx.state.set(AllowedOrigin(origin));
            }
            return FilterDecision::Continue;
        }
        if !allowed {
            return if policy.forward_not_matching_preflights {
                FilterDecision::Continue
            } else {
                FilterDecision::Respond {
                    status: 403,
                    body: String::new(),
                }
            };
        }
        let mut headers = vec![(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)];
        if policy.allow_credentials {
            headers.push((
                http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                http::HeaderValue::from_static("true"),
            ));
        }
        for (name, value) in [
            (
                http::header::ACCESS_CONTROL_ALLOW_METHODS,
                &policy.allow_methods,
            ),
            (
                http::header::ACCESS_CONTROL_ALLOW_HEADERS,
                &policy.allow_headers,
            ),
            (
                http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
                &policy.expose_headers,
            ),
            (http::header::ACCESS_CONTROL_MAX_AGE, &policy.max_age),
        ] {
            if let Ok(v) = http::HeaderValue::from_str(value) {
                if !value.is_empty() {
                    headers.push((name, v));
                }
            }
        }
        FilterDecision::RespondWithHeaders {
            status: 200,
            headers,
        }
    }

    fn on_response_headers(&self, resp: &mut ResponseHeader, cx: &FilterContext<'_>) {
        let Some(AllowedOrigin(origin)) = cx.state.get::<AllowedOrigin>() else {
            return;
        };
        let Some(policy) = cx.per_route.and_then(|c| c.downcast_ref::<CorsPolicy>()) else {
            return;
        };
        let _ = resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if policy.allow_credentials {
            let _ = resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        if !policy.expose_headers.is_empty() {
            let _ = resp.insert_header(
                http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
                policy.expose_headers.as_str(),
            );
        }
    }
}
