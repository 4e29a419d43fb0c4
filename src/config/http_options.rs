//! `envoy.config.core.v3.HttpProtocolOptions`, shared by listeners and clusters: legate
//! reads `idle_timeout` and rejects the fields it does not implement.

use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;

use super::duration;
use super::error::{join, Errors};
use crate::reject_set;

/// The configured `idle_timeout` (validated), if any.
pub fn idle_timeout<'a>(
    o: &'a HttpProtocolOptions,
    at: &str,
    errs: &mut Errors,
) -> &'a Option<ProtoDuration> {
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
        max_connection_duration,
        max_connection_duration_jitter,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    );
    duration::check(idle_timeout, &join(at, "idle_timeout"), errs);
    idle_timeout
}
