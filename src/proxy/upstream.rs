//! What the router does to the request it sends upstream and to the response it returns.

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, Session};

use crate::cluster::config::UpstreamProtocol;
use crate::cluster::host::Host;
use crate::cluster::Cluster;
use crate::listener::{HttpConnectionManager, ServerHeader};
use crate::route::entry::HostRewrite;
use crate::route::headers::{remove_where, FormatContext, HeaderMutations, HeaderTarget};
use crate::route::{Action, ClusterChoice, Matched, RouteTable};

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
];

/// Header mutation levels in the order Envoy applies them: most specific first (so the
/// least specific wins an overwrite) unless `most_specific_header_mutations_wins`.
fn levels<'a>(
    m: Matched<'a>,
    weighted: Option<usize>,
    table: &'a RouteTable,
    request: bool,
) -> impl Iterator<Item = &'a HeaderMutations> {
    let pick =
        |req: &'a HeaderMutations, resp: &'a HeaderMutations| if request { req } else { resp };
    let weighted = match (&m.route.action, weighted) {
        (Action::Forward(a), Some(i)) => match &a.cluster {
            ClusterChoice::Weighted(w) => w
                .clusters
                .get(i)
                .map(|c| pick(&c.request_headers, &c.response_headers)),
            _ => None,
        },
        _ => None,
    };
    let mut out = [
        weighted,
        Some(pick(&m.route.request_headers, &m.route.response_headers)),
        Some(pick(
            &m.virtual_host.request_headers,
            &m.virtual_host.response_headers,
        )),
        Some(pick(&table.request_headers, &table.response_headers)),
    ];
    if table.most_specific_header_mutations_wins {
        out.reverse();
    }
    out.into_iter().flatten()
}

/// How the downstream request is framed, which decides the hop-by-hop headers upstream.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    /// A body follows the head (chunked, content-length, or an open HTTP/2 stream):
    /// Pingora frames it upstream, and no `content-length: 0` is added.
    pub body_follows: bool,
    /// An allowed upgrade: `connection`/`upgrade` are kept for the tunnel.
    pub upgrade: bool,
    /// The client offered `te: trailers` (gRPC): it goes upstream, as Envoy sends it,
    /// though Pingora strips `te` as hop-by-hop.
    pub te_trailers: bool,
}

pub fn finalize_request(
    req: &mut RequestHeader,
    framing: Framing,
    m: Matched<'_>,
    weighted: Option<usize>,
    hcm: &HttpConnectionManager,
    host: Option<&Host>,
    fmt: &FormatContext<'_>,
) {
    remove_where(req, |n| {
        HOP_BY_HOP.contains(&n) && !(framing.upgrade && (n == "connection" || n == "upgrade"))
    });
    if !framing.body_follows && !framing.upgrade {
        add_zero_content_length(req);
    }
    if framing.te_trailers {
        let _ = req.insert_header(http::header::TE, "trailers");
    }
    for level in levels(m, weighted, &hcm.routes, true) {
        level.apply(req as &mut dyn HeaderTarget, fmt);
    }
    let Action::Forward(action) = &m.route.action else {
        return;
    };
    let suppress = hcm.filters.router.suppress_envoy_headers;

    let weighted_host = match (&action.cluster, weighted) {
        (ClusterChoice::Weighted(w), Some(i)) => w
            .clusters
            .get(i)
            .and_then(|c| c.host_rewrite_literal.clone()),
        _ => None,
    };
    let new_host = weighted_host.or_else(|| match &action.host_rewrite {
        Some(HostRewrite::Literal(v)) => Some(v.clone()),
        Some(HostRewrite::Auto) => host
            .filter(|h| !h.hostname.is_empty())
            .and_then(|h| http::HeaderValue::from_str(&h.hostname).ok()),
        Some(HostRewrite::Header(name)) => req.headers.get(name).cloned(),
        None => None,
    });
    if let Some(new_host) = new_host {
        if action.append_x_forwarded_host {
            if let Some(old) = req.headers.get(http::header::HOST).cloned() {
                let _ = req.append_header("x-forwarded-host", old);
            }
        }
        let _ = req.insert_header(http::header::HOST, new_host);
    }

    let original = req.uri.path_and_query().map(|p| p.as_str().to_string());
    if let Some(original) = original {
        if let Some(new_path) = m.route.rewritten_path(&original) {
            if let Ok(uri) = new_path.parse::<http::Uri>() {
                req.set_uri(uri);
                if !suppress {
                    let _ = req.insert_header("x-envoy-original-path", original);
                }
            }
        }
    }
}

/// Router headers: the time the upstream has, the attempt count, and removal of the
/// `x-envoy-*` control headers the router consumed.
pub fn set_router_headers(
    req: &mut RequestHeader,
    m: Matched<'_>,
    hcm: &HttpConnectionManager,
    attempt: u32,
    expected_timeout: Option<std::time::Duration>,
) {
    remove_where(req, |n| super::attempt::CONSUMED_HEADERS.contains(&n));
    if !hcm.filters.router.suppress_envoy_headers {
        if let Some(t) = expected_timeout {
            let _ = req.insert_header("x-envoy-expected-rq-timeout-ms", t.as_millis().to_string());
        }
    }
    if m.virtual_host.include_request_attempt_count {
        let _ = req.insert_header("x-envoy-attempt-count", attempt.max(1).to_string());
    }
}

/// Envoy's HTTP/1 codec sends `content-length: 0` for a bodiless request whose method
/// normally carries a body (POST, PUT, ...), so upstreams never wait for one.
fn add_zero_content_length(req: &mut RequestHeader) {
    use http::Method;
    let has_framing = req.headers.contains_key(http::header::CONTENT_LENGTH)
        || req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let no_body_method = matches!(
        req.method,
        Method::GET | Method::HEAD | Method::DELETE | Method::TRACE | Method::CONNECT
    );
    if !has_framing && !no_body_method {
        let _ = req.insert_header(http::header::CONTENT_LENGTH, "0");
    }
}

pub fn apply_response_mutations(
    resp: &mut ResponseHeader,
    m: Matched<'_>,
    weighted: Option<usize>,
    table: &RouteTable,
    fmt: &FormatContext<'_>,
) {
    for level in levels(m, weighted, table, false) {
        level.apply(resp as &mut dyn HeaderTarget, fmt);
    }
}

pub fn strip_hop_by_hop_response(resp: &mut ResponseHeader) {
    remove_where(resp, |n| {
        matches!(n, "connection" | "keep-alive" | "proxy-connection")
    });
}

pub fn set_server_header(resp: &mut ResponseHeader, hcm: &HttpConnectionManager) {
    let present = resp.headers.contains_key(http::header::SERVER);
    match hcm.server_header {
        ServerHeader::Overwrite => {
            let _ = resp.insert_header(http::header::SERVER, hcm.server_name.as_str());
        }
        ServerHeader::AppendIfAbsent if !present => {
            let _ = resp.insert_header(http::header::SERVER, hcm.server_name.as_str());
        }
        _ => {}
    }
}

/// The Pingora peer for one try: TLS (SNI, CA, client certificate) and HTTP version from the
/// cluster's transport socket and protocol options.
pub fn peer(cluster: &Cluster, host: &Host, session: &Session) -> HttpPeer {
    let mut peer = tls_or_plain_peer(cluster, host, session);
    let h2 = &cluster.protocol.h2;
    peer.options.max_h2_streams = h2.max_concurrent_streams as usize;
    peer.options.h2_stream_window_size = Some(h2.initial_stream_window_size);
    peer.options.h2_connection_window_size = Some(h2.initial_connection_window_size);
    peer.options.tcp_keepalive = cluster.tcp_keepalive.as_ref().map(|k| k.complete());
    peer
}

fn tls_or_plain_peer(cluster: &Cluster, host: &Host, session: &Session) -> HttpPeer {
    let Some(tls) = &cluster.tls else {
        let mut peer = HttpPeer::new(host.address, false, String::new());
        peer.group_key = cluster.pool_key;
        match cluster.protocol.protocol {
            UpstreamProtocol::Http2 => peer.options.set_http_version(2, 2),
            UpstreamProtocol::MatchDownstream if session.is_http2() => {
                peer.options.set_http_version(2, 2)
            }
            _ => {}
        }
        return peer;
    };
    let sni = if tls.auto_sni || cluster.protocol.auto_sni {
        let req = session.req_header();
        let host_header = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        crate::route::table::strip_port(host_header)
            .unwrap_or(host_header)
            .to_string()
    } else {
        tls.sni.clone()
    };
    let mut peer = HttpPeer::new(host.address, true, sni);
    peer.group_key = cluster.pool_key;
    peer.options.verify_cert = tls.ca.is_some();
    peer.options.verify_hostname = tls.verify_hostname || cluster.protocol.auto_san_validation;
    peer.options.ca = tls.ca.clone();
    peer.client_cert_key = tls.client_cert.clone();
    match cluster.protocol.protocol {
        UpstreamProtocol::Http1 => peer.options.set_http_version(1, 1),
        UpstreamProtocol::Http2 => peer.options.set_http_version(2, 2),
        UpstreamProtocol::MatchDownstream if session.is_http2() => {
            peer.options.set_http_version(2, 2)
        }
        UpstreamProtocol::MatchDownstream => peer.options.set_http_version(1, 1),
        UpstreamProtocol::Alpn => peer.options.set_http_version(2, 1),
    }
    peer
}
