//! What the HTTP connection manager does to a request before routing: x-forwarded-*,
//! x-request-id, internal-header sanitising and host port stripping, as Envoy does them.

use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

use crate::listener::{HttpConnectionManager, StripPort};
use crate::route::table::strip_port;

/// `x-envoy-*` request headers that only trusted (internal) clients may set.
const INTERNAL_ONLY: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
];

/// Envoy's notion of an internal address: RFC 1918, loopback, link-local-free private v6.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The client address Envoy would use: the connection's peer with `use_remote_address`,
/// otherwise taken from x-forwarded-for, trusting `xff_num_trusted_hops` hops.
pub fn effective_remote(
    hcm: &HttpConnectionManager,
    req: &RequestHeader,
    peer: Option<IpAddr>,
) -> Option<IpAddr> {
    if hcm.use_remote_address && hcm.xff_num_trusted_hops == 0 {
        return peer;
    }
    let xff = req.headers.get("x-forwarded-for")?.to_str().ok()?;
    let parts: Vec<&str> = xff.split(',').map(str::trim).collect();
    let skip = if hcm.use_remote_address {
        hcm.xff_num_trusted_hops.saturating_sub(1)
    } else {
        hcm.xff_num_trusted_hops
    } as usize;
    parts.iter().rev().nth(skip).and_then(|s| s.parse().ok())
}

/// Applies the HCM's request header rules; returns the request id, if there is one.
pub fn mutate_request_headers(
    hcm: &HttpConnectionManager,
    req: &mut RequestHeader,
    peer: Option<IpAddr>,
    listener_port: u16,
) -> Option<HeaderValue> {
    let remote = effective_remote(hcm, req, peer);
    let internal = remote.is_some_and(is_internal);
    let external = hcm.use_remote_address && !internal;

    if hcm.use_remote_address && !hcm.skip_xff_append {
        if let Some(ip) = peer {
            append_comma(req, "x-forwarded-for", &ip.to_string());
        }
    }
    if external {
        for h in INTERNAL_ONLY {
            req.remove_header(*h);
        }
        if let Some(ip) = remote {
            let _ = req.insert_header("x-envoy-external-address", ip.to_string());
        }
    } else if hcm.use_remote_address && internal {
        let _ = req.insert_header("x-envoy-internal", "true");
    }
    if external || !req.headers.contains_key("x-forwarded-proto") {
        let _ = req.insert_header("x-forwarded-proto", "http");
    }
    if let Some(via) = &hcm.via {
        append_comma(req, "via", via);
    }

    match hcm.strip_port {
        StripPort::None => {}
        StripPort::Matching | StripPort::Any => {
            let host = req
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok());
            if let Some(host) = host {
                if let Some(stripped) = strip_port(host) {
                    let port_ok = hcm.strip_port == StripPort::Any
                        || host[stripped.len() + 1..].parse::<u16>().ok() == Some(listener_port);
                    if port_ok {
                        let stripped = stripped.to_string();
                        let _ = req.insert_header(http::header::HOST, stripped);
                    }
                }
            }
        }
    }

    let existing = req.headers.get("x-request-id").cloned();
    let regenerate = external && !hcm.preserve_external_request_id;
    match existing {
        Some(id) if !regenerate => Some(id),
        _ if hcm.generate_request_id => {
            let id = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).ok()?;
            let _ = req.insert_header("x-request-id", id.clone());
            Some(id)
        }
        Some(id) => Some(id),
        None => None,
    }
}

/// Envoy appends to a list header with `,` and no space.
fn append_comma(req: &mut RequestHeader, name: &'static str, value: &str) {
    let joined = match req.headers.get(name).and_then(|v| v.to_str().ok()) {
        Some(old) if !old.is_empty() => format!("{old},{value}"),
        _ => value.to_string(),
    };
    let _ = req.insert_header(HeaderName::from_static(name), joined);
}
