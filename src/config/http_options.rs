//! `envoy.config.core.v3.HttpProtocolOptions`, shared by listeners and clusters: the idle
//! timeout on both sides, and the connection limits a front door needs on the downstream
//! side. Fields legate does not implement are rejected.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;

use super::duration;
use super::error::{join, Errors};
use crate::reject_set;

/// Envoy's default `max_headers_count`.
pub const DEFAULT_MAX_HEADERS_COUNT: u32 = 100;

/// `headers_with_underscores_action`: what becomes of a request header whose name has `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnderscoresAction {
    #[default]
    Allow,
    /// Answered as a malformed request (400, connection closed).
    RejectRequest,
    /// The header is removed.
    DropHeader,
}

/// The downstream connection limits of `common_http_protocol_options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_headers_count: u32,
    pub headers_with_underscores: UnderscoresAction,
    /// Closed (after the request in flight) once this old.
    pub max_connection_duration: Option<Duration>,
    /// Closed after this many requests.
    pub max_requests_per_connection: Option<u32>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_headers_count: DEFAULT_MAX_HEADERS_COUNT,
            headers_with_underscores: UnderscoresAction::Allow,
            max_connection_duration: None,
            max_requests_per_connection: None,
        }
    }
}

/// The configured `idle_timeout` (validated), if any, for a cluster: the connection limits
/// are downstream settings here.
pub fn idle_timeout<'a>(
    o: &'a HttpProtocolOptions,
    at: &str,
    errs: &mut Errors,
) -> &'a Option<ProtoDuration> {
    let HttpProtocolOptions {
        max_connection_duration,
        max_headers_count,
        max_requests_per_connection,
        headers_with_underscores_action,
        ..
    } = o;
    reject_set!(
        errs,
        at,
        max_connection_duration,
        max_headers_count,
        max_requests_per_connection,
        headers_with_underscores_action,
    );
    downstream(o, at, errs).0
}

/// For a listener's HCM: the idle timeout and the connection limits.
pub fn downstream<'a>(
    o: &'a HttpProtocolOptions,
    at: &str,
    errs: &mut Errors,
) -> (&'a Option<ProtoDuration>, ConnectionLimits) {
    let HttpProtocolOptions {
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
        max_connection_duration_jitter,
        max_response_headers_kb,
        max_stream_duration,
    );
    duration::check(idle_timeout, &join(at, "idle_timeout"), errs);
    duration::check(
        max_connection_duration,
        &join(at, "max_connection_duration"),
        errs,
    );
    let mut limits = ConnectionLimits {
        // Zero or unset means no limit, as in Envoy.
        max_connection_duration: duration::optional_timeout(max_connection_duration, None),
        max_requests_per_connection: max_requests_per_connection
            .map(|v| v.value)
            .filter(|v| *v > 0),
        ..ConnectionLimits::default()
    };
    use envoy_types::pb::envoy::config::core::v3::http_protocol_options::HeadersWithUnderscoresAction as A;
    limits.headers_with_underscores = match A::try_from(*headers_with_underscores_action) {
        Ok(A::Allow) => UnderscoresAction::Allow,
        Ok(A::RejectRequest) => UnderscoresAction::RejectRequest,
        Ok(A::DropHeader) => UnderscoresAction::DropHeader,
        Err(_) => {
            errs.add(join(at, "headers_with_underscores_action"), "unknown value");
            UnderscoresAction::Allow
        }
    };
    if let Some(n) = max_headers_count {
        if n.value == 0 {
            errs.add(join(at, "max_headers_count"), "must be at least 1");
        } else {
            limits.max_headers_count = n.value;
        }
    }
    (idle_timeout, limits)
}
