//! What the HTTP connection manager does to a request before routing, as Envoy's
//! `ConnectionManagerUtility::mutateRequestHeaders` does it: hop-by-hop removal,
//! x-forwarded-for/-proto, internal/edge classification and sanitising, via, request id.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

use crate::listener::{HttpConnectionManager, StripPort};
use crate::route::headers::remove_where;
use crate::route::table::strip_port;

use super::names;

/// Removed from every request that is not internal (the router would otherwise obey them).
const INTERNAL_CONTROL: &[&str] = &[
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Also removed from edge requests.
const EDGE_ONLY: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "upgrade",
    "x-envoy-internal",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
];

/// This host's address as Envoy's `LocalInfo` sees it: the first non-loopback IPv4
/// interface address, else IPv6, else loopback. Envoy appends it to x-forwarded-for for
/// clients that connect over loopback.
pub fn node_address() -> IpAddr {
    static ADDR: OnceLock<IpAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let ifs = if_addrs::get_if_addrs().unwrap_or_default();
        let non_loopback = |v4: bool| {
            ifs.iter()
                .map(|i| i.ip())
                .find(|ip| !ip.is_loopback() && ip.is_ipv4() == v4)
        };
        non_loopback(true)
            .or_else(|| non_loopback(false))
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    })
}

/// The client address Envoy uses (for source-IP hashing and headers) and the request id.
#[derive(Debug, Default)]
pub struct Downstream {
    pub remote: Option<IpAddr>,
    pub request_id: Option<HeaderValue>,
}

/// Applies the HCM's request header rules.
pub fn mutate_request_headers(
    hcm: &HttpConnectionManager,
    req: &mut RequestHeader,
    peer: Option<IpAddr>,
    listener_port: u16,
    scheme: &'static str,
    upgrade: bool,
    client_certificate: bool,
) -> Downstream {
    // An allowed upgrade keeps its headers: Pingora reads them to switch to a tunnel.
    remove_where(req, |n| {
        HOP_BY_HOP.contains(&n) && !(upgrade && (n == "connection" || n == "upgrade"))
    });
    if upgrade {
        let _ = req.insert_header(http::header::CONNECTION, "upgrade");
    }
    sanitize_te(req);
    if !hcm.forward_client_cert.keeps_header(client_certificate) {
        req.remove_header("x-forwarded-client-cert");
    }
    if req.headers.get_all(http::header::REFERER).iter().count() > 1 {
        req.remove_header(&http::header::REFERER);
    }

    let mut remote: Option<IpAddr> = None;
    let mut trusted_checks = false;
    if hcm.use_remote_address {
        trusted_checks = !req.headers.contains_key(&names::X_FORWARDED_FOR);
        if hcm.xff_num_trusted_hops > 0 {
            remote = xff_address(req, hcm.xff_num_trusted_hops - 1);
        }
        remote = remote.or(peer);
        if !hcm.skip_xff_append {
            if let Some(p) = peer {
                let appended = if p.is_loopback() { node_address() } else { p };
                append_list(req, &names::X_FORWARDED_FOR, ",", &appended.to_string());
            }
        }
        if hcm.xff_num_trusted_hops == 0 || !req.headers.contains_key(&names::X_FORWARDED_PROTO) {
            let _ = req.insert_header("x-forwarded-proto", scheme);
        }
    }
    if !req.headers.contains_key(&names::X_FORWARDED_PROTO) {
        let _ = req.insert_header("x-forwarded-proto", scheme);
    }

    let internal = trusted_checks && remote.is_some_and(|ip| hcm.internal_addresses.contains(ip));
    let remote = remote.or(peer);
    let edge = !internal && hcm.use_remote_address;
    if internal {
        let _ = req.insert_header("x-envoy-internal", "true");
    } else {
        let internal_only = &hcm.routes.internal_only_headers;
        remove_where(req, |n| {
            (n.starts_with("x-envoy-")
                && (INTERNAL_CONTROL.contains(&n) || edge && EDGE_ONLY.contains(&n)))
                || internal_only.iter().any(|h| h.as_str() == n)
        });
    }
    if let Some(via) = &hcm.via {
        append_list(req, &http::header::VIA, ", ", via);
    }
    if edge {
        if let Some(ip) = remote {
            let _ = req.insert_header("x-envoy-external-address", ip.to_string());
        }
    }

    strip_host_port(hcm.strip_port, req, listener_port);

    let existing = req.headers.get(&names::X_REQUEST_ID).cloned();
    let force = edge && !hcm.preserve_external_request_id;
    let request_id = match existing {
        Some(id) if !force || !hcm.generate_request_id => Some(id),
        _ if hcm.generate_request_id => {
            // A v4 UUID from the thread's userspace CSPRNG: `Uuid::new_v4` asks the kernel
            // (one getrandom syscall per request).
            let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id =
                HeaderValue::from_bytes(uuid.hyphenated().encode_lower(&mut text).as_bytes()).ok();
            if let Some(id) = &id {
                let _ = req.insert_header("x-request-id", id.clone());
            }
            id
        }
        other => other,
    };
    Downstream { remote, request_id }
}

/// Envoy keeps `te` only as `trailers`, and only when the client offered it: gRPC servers
/// on the C core (grpcio) reset a stream that lacks it, and other transfer codings are
/// this hop's business alone.
fn sanitize_te(req: &mut RequestHeader) {
    let Some(te) = req.headers.get(http::header::TE) else {
        return;
    };
    let trailers = te.as_bytes().split(|b| *b == b',').any(|t| {
        t.split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii()
            .eq_ignore_ascii_case(b"trailers")
    });
    if trailers {
        let _ = req.insert_header(http::header::TE, "trailers");
    } else {
        req.remove_header(&http::header::TE);
    }
}

/// The address `skip` entries from the right of x-forwarded-for.
fn xff_address(req: &RequestHeader, skip: u32) -> Option<IpAddr> {
    let xff = req.headers.get(&names::X_FORWARDED_FOR)?.to_str().ok()?;
    xff.split(',')
        .map(str::trim)
        .rev()
        .nth(skip as usize)
        .and_then(|s| s.parse().ok())
}

fn strip_host_port(mode: StripPort, req: &mut RequestHeader, listener_port: u16) {
    if mode == StripPort::None {
        return;
    }
    let Some(host) = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return;
    };
    let Some(stripped) = strip_port(host) else {
        return;
    };
    let port_matches = host[stripped.len() + 1..].parse::<u16>().ok() == Some(listener_port);
    if mode == StripPort::Any || port_matches {
        let stripped = stripped.to_string();
        let _ = req.insert_header(http::header::HOST, stripped);
    }
}

/// Appends to a list header the way Envoy does (`,` for x-forwarded-for, `, ` for via).
/// Pingora keeps a `&'static str` name as the name's case on the wire without copying it
/// (Envoy sends lowercase names).
fn append_list(req: &mut RequestHeader, name: &'static HeaderName, sep: &str, value: &str) {
    let joined = match req.headers.get(name).and_then(|v| v.to_str().ok()) {
        Some(old) if !old.is_empty() => format!("{old}{sep}{value}"),
        _ => value.to_string(),
    };
    let _ = req.insert_header(name.as_str(), joined);
}

/// The upgrade a request asks for (`Upgrade` with `Connection: upgrade`), lowercased.
pub fn requested_upgrade(req: &RequestHeader) -> Option<String> {
    let wants = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    let t = req.headers.get(http::header::UPGRADE)?.to_str().ok()?;
    Some(t.trim().to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn te_is_kept_only_as_trailers() {
        for (sent, kept) in [
            ("trailers", Some("trailers")),
            ("deflate, Trailers;q=0.5", Some("trailers")),
            ("gzip", None),
            ("trailersx", None),
        ] {
            let mut req = RequestHeader::build("POST", b"/", None).unwrap();
            req.insert_header("te", sent).unwrap();
            sanitize_te(&mut req);
            let got = req.headers.get("te").map(|v| v.to_str().unwrap());
            assert_eq!(got, kept, "{sent}");
        }
    }
}
