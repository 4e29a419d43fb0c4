//! Envoy's retry policy (`retry_policy` on routes and virtual hosts, and the
//! `x-envoy-retry-on` / `x-envoy-max-retries` request headers): what may be retried, how
//! often, and how long to back off. Pure decisions; the proxy hooks act on them.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::{
    retry_policy::{retry_host_predicate, RetryBackOff, RetryHostPredicate},
    RetryPolicy as RetryPolicyProto,
};

use crate::config::duration;
use crate::config::error::{index, join, Errors};
use crate::config::load::type_name;
use crate::reject_set;
use crate::route::matcher::HeaderMatcher;
use crate::route::request::RequestView;

const PREVIOUS_HOSTS_TYPE: &str =
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// The `retry_on` conditions, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

impl RetryOn {
    pub const FIVE_XX: RetryOn = RetryOn(1);
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    pub const RESET: RetryOn = RetryOn(1 << 2);
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 4);
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 5);
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 6);
    pub const RETRIABLE_HEADERS: RetryOn = RetryOn(1 << 7);

    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn from_name(name: &str) -> Option<RetryOn> {
        Some(match name {
            "5xx" => RetryOn::FIVE_XX,
            "gateway-error" => RetryOn::GATEWAY_ERROR,
            "reset" => RetryOn::RESET,
            "connect-failure" => RetryOn::CONNECT_FAILURE,
            "retriable-4xx" => RetryOn::RETRIABLE_4XX,
            "refused-stream" => RetryOn::REFUSED_STREAM,
            "retriable-status-codes" => RetryOn::RETRIABLE_STATUS_CODES,
            "retriable-headers" => RetryOn::RETRIABLE_HEADERS,
            _ => return None,
        })
    }

    /// Parses a comma-separated list; unknown names are returned as errors.
    pub fn parse(list: &str) -> (RetryOn, Vec<String>) {
        let mut on = RetryOn::default();
        let mut unknown = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match RetryOn::from_name(name) {
                Some(r) => on.0 |= r.0,
                None => unknown.push(name.to_string()),
            }
        }
        (on, unknown)
    }
}

impl std::ops::BitOr for RetryOn {
    type Output = RetryOn;
    fn bitor(self, rhs: RetryOn) -> RetryOn {
        RetryOn(self.0 | rhs.0)
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy)]
pub enum Failure<'a> {
    /// The connection to the upstream could not be made.
    ConnectFailure,
    /// The upstream reset or closed before a response, or an attempt's read timed out.
    Reset,
    /// `per_try_timeout` expired.
    PerTryTimeout,
    /// The upstream answered with this status and headers.
    Response(u16, &'a http::HeaderMap),
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub per_try_idle_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    retriable_headers: Vec<HeaderMatcher>,
    retriable_request_headers: Vec<HeaderMatcher>,
    pub previous_hosts: bool,
    pub host_selection_max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_on: RetryOn::default(),
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
            previous_hosts: false,
            host_selection_max_attempts: 1,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_BASE * 10,
        }
    }
}

impl RetryPolicy {
    pub fn convert(p: &RetryPolicyProto, at: &str, errs: &mut Errors) -> Self {
        let RetryPolicyProto {
            retry_on,
            num_retries,
            per_try_timeout,
            per_try_idle_timeout,
            retry_priority,
            retry_host_predicate,
            retry_options_predicates,
            host_selection_retry_max_attempts,
            retriable_status_codes,
            retry_back_off,
            rate_limited_retry_back_off,
            retriable_headers,
            retriable_request_headers,
            refresh_cluster_on_retry,
        } = p;
        reject_set!(
            errs,
            at,
            retry_priority,
            retry_options_predicates,
            rate_limited_retry_back_off,
            refresh_cluster_on_retry,
        );
        let (on, unknown) = RetryOn::parse(retry_on);
        for u in unknown {
            errs.add(join(at, "retry_on"), format!("'{u}' is not supported"));
        }
        duration::check(per_try_timeout, &join(at, "per_try_timeout"), errs);
        duration::check(
            per_try_idle_timeout,
            &join(at, "per_try_idle_timeout"),
            errs,
        );
        let mut previous_hosts = false;
        for (i, pred) in retry_host_predicate.iter().enumerate() {
            let RetryHostPredicate { name, config_type } = pred;
            let pat = index(&join(at, "retry_host_predicate"), i);
            // Envoy finds the extension by the type of its typed_config, not by its name.
            let type_name = match config_type {
                Some(retry_host_predicate::ConfigType::TypedConfig(a)) => type_name(a),
                None => "".into(),
            };
            if type_name == PREVIOUS_HOSTS_TYPE {
                previous_hosts = true;
            } else if type_name.is_empty() {
                errs.add(
                    join(&pat, "typed_config"),
                    format!("required for {name} (type.googleapis.com/{PREVIOUS_HOSTS_TYPE})"),
                );
            } else {
                errs.unsupported_extension(
                    join(&pat, "typed_config"),
                    &type_name,
                    format!("{type_name} is not supported (only {PREVIOUS_HOSTS_TYPE})"),
                );
            }
        }
        let mut codes = Vec::new();
        for (i, c) in retriable_status_codes.iter().enumerate() {
            match u16::try_from(*c) {
                Ok(c) if (100..600).contains(&c) => codes.push(c),
                _ => errs.add(
                    index(&join(at, "retriable_status_codes"), i),
                    "not an HTTP status",
                ),
            }
        }
        let matchers = |list: &[envoy_types::pb::envoy::config::route::v3::HeaderMatcher],
                        field: &str,
                        errs: &mut Errors| {
            list.iter()
                .enumerate()
                .filter_map(|(i, h)| HeaderMatcher::convert(h, &index(&join(at, field), i), errs))
                .collect::<Vec<_>>()
        };
        let mut policy = RetryPolicy {
            retry_on: on,
            num_retries: num_retries.map_or(1, |n| n.value),
            per_try_timeout: duration::optional_timeout(per_try_timeout, None),
            per_try_idle_timeout: duration::optional_timeout(per_try_idle_timeout, None),
            retriable_status_codes: codes,
            retriable_headers: matchers(retriable_headers, "retriable_headers", errs),
            retriable_request_headers: matchers(
                retriable_request_headers,
                "retriable_request_headers",
                errs,
            ),
            previous_hosts,
            host_selection_max_attempts: (*host_selection_retry_max_attempts).clamp(1, 1000) as u32,
            ..RetryPolicy::default()
        };
        if let Some(RetryBackOff {
            base_interval,
            max_interval,
        }) = retry_back_off
        {
            let bat = join(at, "retry_back_off");
            match base_interval {
                Some(b) if duration::to_std(b) >= Duration::from_millis(1) => {
                    policy.backoff_base = duration::to_std(b);
                    policy.backoff_max = policy.backoff_base * 10;
                }
                _ => errs.add(join(&bat, "base_interval"), "required, at least 1ms"),
            }
            if let Some(m) = max_interval {
                let m = duration::to_std(m);
                if m < policy.backoff_base {
                    errs.add(
                        join(&bat, "max_interval"),
                        "must not be less than base_interval",
                    );
                }
                policy.backoff_max = m;
            }
        }
        policy
    }

    /// Whether the request itself may be retried (`retriable_request_headers`).
    pub fn request_is_retriable(&self, req: &RequestView<'_>) -> bool {
        self.retriable_request_headers.is_empty()
            || self
                .retriable_request_headers
                .iter()
                .any(|m| m.matches(req))
    }

    /// Whether this failure is one the policy retries.
    pub fn retries(&self, failure: Failure<'_>) -> bool {
        let on = self.retry_on;
        match failure {
            Failure::ConnectFailure => on.contains(
                RetryOn::CONNECT_FAILURE
                    | RetryOn::FIVE_XX
                    | RetryOn::GATEWAY_ERROR
                    | RetryOn::RESET,
            ),
            Failure::Reset | Failure::PerTryTimeout => {
                on.contains(RetryOn::FIVE_XX | RetryOn::GATEWAY_ERROR | RetryOn::RESET)
            }
            Failure::Response(status, headers) => {
                // An upstream Envoy (or legate) that shed load asks not to be retried.
                if headers.contains_key("x-envoy-overloaded") {
                    return false;
                }
                (on.contains(RetryOn::FIVE_XX) && status >= 500)
                    || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (on.contains(RetryOn::RETRIABLE_4XX) && status == 409)
                    || (on.contains(RetryOn::RETRIABLE_STATUS_CODES)
                        && self.retriable_status_codes.contains(&status))
                    || (on.contains(RetryOn::RETRIABLE_HEADERS) && {
                        let view = RequestView::new("", "", "", "", headers);
                        self.retriable_headers.iter().any(|m| m.matches(&view))
                    })
            }
        }
    }

    /// Envoy's fully jittered exponential back-off before retry number `retry` (1-based):
    /// a random wait below `(2^retry - 1) × base`, capped at `max`.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let base_ms = self.backoff_base.as_millis().max(1) as u64;
        let max_ms = self.backoff_max.as_millis().max(1) as u64;
        let multiplier = (1u64 << retry.clamp(1, 62)) - 1;
        let ceiling = multiplier
            .saturating_mul(base_ms)
            .min(max_ms.saturating_add(1))
            .max(1);
        Duration::from_millis((random % ceiling).min(max_ms))
    }
}

/// The policy a request runs under: the route's (or virtual host's) policy with the
/// `x-envoy-retry-on`, `x-envoy-retriable-status-codes` and `x-envoy-max-retries` request
/// headers applied, as Envoy applies them. None when nothing is to be retried.
pub fn effective_policy(
    configured: Option<&RetryPolicy>,
    headers: &http::HeaderMap,
) -> Option<RetryPolicy> {
    use crate::proxy::names;
    // Most requests carry no `x-envoy-*` field (edge requests lose these before routing):
    // one pass over the few names spares three hashed lookups of long ones.
    let any = headers.keys().any(|n| n.as_str().starts_with("x-envoy-"));
    let header = |n: &http::HeaderName| {
        any.then(|| headers.get(n))
            .flatten()
            .and_then(|v| v.to_str().ok())
    };
    let mut policy = configured.cloned();
    if let Some(on) = header(&names::X_ENVOY_RETRY_ON) {
        let (extra, _unknown) = RetryOn::parse(on);
        if !extra.is_empty() {
            let p = policy.get_or_insert_with(RetryPolicy::default);
            p.retry_on = p.retry_on | extra;
        }
    }
    let mut policy = policy?;
    if let Some(codes) = header(&names::X_ENVOY_RETRIABLE_STATUS_CODES) {
        policy.retriable_status_codes.extend(
            codes
                .split(',')
                .filter_map(|c| c.trim().parse::<u16>().ok()),
        );
    }
    if let Some(n) = header(&names::X_ENVOY_MAX_RETRIES).and_then(|v| v.trim().parse::<u32>().ok())
    {
        policy.num_retries = n;
    }
    if policy.retry_on.is_empty() || policy.num_retries == 0 {
        return None;
    }
    Some(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_message;

    fn policy(yaml: &str) -> RetryPolicy {
        let p: RetryPolicyProto = parse_message(yaml, "envoy.config.route.v3.RetryPolicy").unwrap();
        let mut errs = Errors::default();
        let out = RetryPolicy::convert(&p, "retry_policy", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        out
    }

    #[test]
    fn retry_on_conditions_follow_envoy() {
        let h = http::HeaderMap::new();
        let p = policy("retry_on: 5xx");
        assert!(p.retries(Failure::Response(500, &h)));
        assert!(p.retries(Failure::Response(503, &h)));
        assert!(!p.retries(Failure::Response(409, &h)));
        assert!(p.retries(Failure::ConnectFailure));
        assert!(p.retries(Failure::Reset));
        assert!(p.retries(Failure::PerTryTimeout));

        let p = policy("retry_on: gateway-error");
        assert!(p.retries(Failure::Response(502, &h)));
        assert!(!p.retries(Failure::Response(500, &h)));

        let p = policy("retry_on: connect-failure");
        assert!(p.retries(Failure::ConnectFailure));
        assert!(!p.retries(Failure::Reset));
        assert!(!p.retries(Failure::Response(503, &h)));

        let p = policy("retry_on: reset");
        assert!(p.retries(Failure::Reset));
        assert!(!p.retries(Failure::Response(503, &h)));

        let p = policy("retry_on: retriable-4xx");
        assert!(p.retries(Failure::Response(409, &h)));
        assert!(!p.retries(Failure::Response(404, &h)));

        let p = policy("retry_on: retriable-status-codes\nretriable_status_codes: [418]");
        assert!(p.retries(Failure::Response(418, &h)));
        assert!(!p.retries(Failure::Response(500, &h)));
    }

    #[test]
    fn overloaded_responses_are_not_retried() {
        let mut h = http::HeaderMap::new();
        h.insert("x-envoy-overloaded", http::HeaderValue::from_static("true"));
        assert!(!policy("retry_on: 5xx").retries(Failure::Response(503, &h)));
    }

    #[test]
    fn retriable_headers_match_the_response() {
        let p = policy("retry_on: retriable-headers\nretriable_headers: [{name: x-retry-me, present_match: true}]");
        let mut h = http::HeaderMap::new();
        assert!(!p.retries(Failure::Response(200, &h)));
        h.insert("x-retry-me", http::HeaderValue::from_static("1"));
        assert!(p.retries(Failure::Response(200, &h)));
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        let p = policy("retry_on: 5xx\nretry_back_off: {base_interval: 0.1s, max_interval: 0.5s}");
        for r in 0..1000u64 {
            assert!(p.backoff(1, r * 7919) < Duration::from_millis(100));
            assert!(p.backoff(2, r * 7919) < Duration::from_millis(300));
            assert!(p.backoff(10, r * 7919) <= Duration::from_millis(500));
        }
        let d = policy("retry_on: 5xx");
        assert_eq!(
            (d.backoff_base, d.backoff_max),
            (Duration::from_millis(25), Duration::from_millis(250))
        );
    }

    #[test]
    fn request_headers_extend_the_policy() {
        let mut h = http::HeaderMap::new();
        assert!(effective_policy(None, &h).is_none());
        h.insert(
            "x-envoy-retry-on",
            http::HeaderValue::from_static("5xx,bogus"),
        );
        h.insert("x-envoy-max-retries", http::HeaderValue::from_static("3"));
        let p = effective_policy(None, &h).unwrap();
        assert!(p.retry_on.contains(RetryOn::FIVE_XX));
        assert_eq!(p.num_retries, 3);
    }

    #[test]
    fn unknown_retry_on_is_rejected() {
        let p: RetryPolicyProto = parse_message(
            "retry_on: 5xx,sometimes",
            "envoy.config.route.v3.RetryPolicy",
        )
        .unwrap();
        let mut errs = Errors::default();
        RetryPolicy::convert(&p, "r", &mut errs);
        assert_eq!(
            errs.into_result(()).unwrap_err().to_string(),
            "r.retry_on: 'sometimes' is not supported"
        );
    }
}
