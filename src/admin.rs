//! The admin server (bootstrap `admin.address`): Envoy's read-only endpoints so far —
//! `/ready`, `/server_info`, `/config_dump` (with `?resource=`), `/clusters` (text or
//! `?format=json`). Mutating endpoints take POST only; unknown paths answer 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prost::Message;
use serde_json::{json, Value};

use crate::cluster::host::flags;
use crate::config::load::pool;
use crate::snapshot::Snapshot;
use crate::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

/// What the admin endpoints read.
pub struct AdminState {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub started: Instant,
    /// False until the initial configuration serves, and again while draining.
    pub ready: AtomicBool,
    pub command_line: Vec<String>,
    /// Stops all listeners (POST /drain_listeners).
    pub drain: Box<dyn Fn() + Send + Sync>,
}

type Resp = hyper::Response<Full<Bytes>>;

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

fn json_reply(v: &Value) -> Resp {
    reply(
        200,
        "application/json",
        serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    )
}

/// Starts the admin server on `rt`; returns once it listens.
pub fn start(
    rt: &tokio::runtime::Handle,
    addr: SocketAddr,
    state: Arc<AdminState>,
) -> std::io::Result<()> {
    let listener = {
        let _enter = rt.enter();
        // SO_REUSEPORT, like the listeners: during a SIGQUIT upgrade the old and the new
        // process both answer until the old one exits.
        crate::server::bind(addr)?
    };
    println!("legate: admin on http://{addr}");
    rt.spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else {
                continue;
            };
            let local = stream.local_addr().ok();
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let start = (std::time::SystemTime::now(), Instant::now());
                        let resp = handle(&state, req.method(), req.uri());
                        log_request(&state, &req, &resp, start, Some(remote), local);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// `admin.access_log`: one line per admin request, with the loggers' formats.
fn log_request(
    state: &AdminState,
    req: &hyper::Request<hyper::body::Incoming>,
    resp: &Resp,
    (start, clock): (std::time::SystemTime, Instant),
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
) {
    let loggers = state.snapshot.load().admin_access_logs.clone();
    if loggers.is_empty() {
        return;
    }
    use hyper::body::Body;
    let record = crate::access_log::Record {
        start: Some(start),
        request_headers: req.headers().clone(),
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string()),
        authority: req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        response_headers: resp.headers().clone(),
        status: resp.status().as_u16(),
        flags: "-",
        bytes_sent: resp.body().size_hint().exact().unwrap_or(0) as usize,
        duration: clock.elapsed(),
        remote,
        local,
        protocol: "HTTP/1.1",
        ..Default::default()
    };
    crate::access_log::log(&loggers, record);
}

fn query_param<'a>(uri: &'a hyper::Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Routes one admin request.
pub fn handle(state: &AdminState, method: &hyper::Method, uri: &hyper::Uri) -> Resp {
    let read_only = [
        "/ready",
        "/server_info",
        "/config_dump",
        "/clusters",
        "/stats",
        "/stats/prometheus",
    ];
    let path = uri.path();
    let post_only = matches!(
        path,
        "/drain_listeners" | "/healthcheck/fail" | "/healthcheck/ok" | "/logging"
    );
    if post_only && method != hyper::Method::POST {
        return reply(405, "text/plain", "use POST\n");
    }
    match path {
        "/healthcheck/fail" => {
            crate::filter::HEALTH_CHECK_FAILED.store(true, Ordering::Relaxed);
            return reply(200, "text/plain", "OK\n");
        }
        "/healthcheck/ok" => {
            crate::filter::HEALTH_CHECK_FAILED.store(false, Ordering::Relaxed);
            return reply(200, "text/plain", "OK\n");
        }
        "/logging" => return set_log_level(uri),
        _ => {}
    }
    if path == "/drain_listeners" {
        if method != hyper::Method::POST {
            return reply(405, "text/plain", "use POST\n");
        }
        (state.drain)();
        return reply(200, "text/plain", "OK\n");
    }
    if !read_only.contains(&path) {
        return reply(404, "text/plain", "unknown admin path\n");
    }
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        return reply(405, "text/plain", "use GET\n");
    }
    match path {
        "/ready" => match server_state(state) {
            "LIVE" => reply(200, "text/plain", "LIVE\n"),
            other => reply(503, "text/plain", format!("{other}\n")),
        },
        "/server_info" => json_reply(&server_info(state)),
        "/config_dump" => {
            let dump = config_dump(&state.snapshot.load());
            match query_param(uri, "resource") {
                None | Some("") => json_reply(&dump),
                Some(field) => {
                    let picked: Vec<Value> = dump["configs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.get(field))
                        .flat_map(|v| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]))
                        .collect();
                    json_reply(&json!({ "configs": picked }))
                }
            }
        }
        "/clusters" => {
            let snapshot = state.snapshot.load();
            if query_param(uri, "format") == Some("json") {
                json_reply(&clusters_json(&snapshot))
            } else {
                reply(200, "text/plain", clusters_text(&snapshot))
            }
        }
        "/stats" => reply(200, "text/plain", crate::stats::text(&all_stats(state))),
        "/stats/prometheus" => reply(
            200,
            "text/plain; version=0.0.4",
            crate::stats::prometheus(&all_stats(state)),
        ),
        _ => reply(404, "text/plain", "unknown admin path\n"),
    }
}

/// Counters from the registry plus gauges read from the current snapshot.
fn all_stats(state: &AdminState) -> Vec<crate::stats::Stat> {
    let s = &*state.snapshot.load();
    let mut gauges = Vec::new();
    for (name, c) in &s.clusters {
        let members = c.members();
        let tag = vec![("envoy_cluster_name".to_string(), name.clone())];
        let healthy = members.iter().filter(|h| h.is_healthy()).count() as u64;
        let ejected = members
            .iter()
            .filter(|h| h.health_flags() & flags::FAILED_OUTLIER != 0)
            .count() as u64;
        for (stat, v) in [
            ("membership_total", members.len() as u64),
            ("membership_healthy", healthy),
            ("outlier_detection.ejections_active", ejected),
        ] {
            gauges.push((
                format!("cluster.{name}.{stat}"),
                format!("envoy_cluster_{}", stat.replace('.', "_")),
                tag.clone(),
                v,
            ));
        }
    }
    gauges.push((
        "cluster_manager.active_clusters".into(),
        "envoy_cluster_manager_active_clusters".into(),
        vec![],
        s.clusters.len() as u64,
    ));
    gauges.push((
        "listener_manager.total_listeners_active".into(),
        "envoy_listener_manager_total_listeners_active".into(),
        vec![],
        s.listeners.len() as u64,
    ));
    // Envoy's server.state values: 0 LIVE, 1 DRAINING, 2 PRE_INITIALIZING.
    let server_state = server_state(state);
    let state_code = match server_state {
        "LIVE" => 0,
        "DRAINING" => 1,
        _ => 2,
    };
    for (name, v) in [
        ("server.live", u64::from(server_state == "LIVE")),
        ("server.state", state_code),
        ("server.uptime", state.started.elapsed().as_secs()),
    ] {
        gauges.push((
            name.into(),
            format!("envoy_{}", name.replace('.', "_")),
            vec![],
            v,
        ));
    }
    crate::stats::collect(gauges)
}

fn server_state(state: &AdminState) -> &'static str {
    if crate::server::DRAINING.load(Ordering::Relaxed) {
        "DRAINING"
    } else if state.ready.load(Ordering::Relaxed) {
        "LIVE"
    } else {
        "PRE_INITIALIZING"
    }
}

fn server_info(state: &AdminState) -> Value {
    json!({
        "version": format!("legate/{}", env!("CARGO_PKG_VERSION")),
        "state": server_state(state),
        "uptime_current_epoch": format!("{}s", state.started.elapsed().as_secs()),
        "uptime_all_epochs": format!("{}s", state.started.elapsed().as_secs()),
        "node": proto_json(state.snapshot.load().bootstrap.node.as_ref(), "envoy.config.core.v3.Node"),
        "command_line_options": { "argv": state.command_line },
    })
}

/// A message as proto3 JSON through the descriptor pool (typed_config included).
fn proto_json<M: Message>(m: Option<&M>, full_name: &str) -> Value {
    let Some(m) = m else { return Value::Null };
    let Some(desc) = pool().get_message_by_name(full_name) else {
        return Value::Null;
    };
    match prost_reflect::DynamicMessage::decode(desc, m.encode_to_vec().as_slice()) {
        // Envoy's dumps use the proto field names (snake_case).
        Ok(d) => {
            let opts = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
            d.serialize_with_options(serde_json::value::Serializer, &opts)
                .unwrap_or(Value::Null)
        }
        Err(_) => Value::Null,
    }
}

/// `2027-01-15T08:00:00.123Z`, as Envoy's %START_TIME%.
pub fn rfc3339_millis(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = rfc3339(d.as_secs());
    format!("{}.{:03}Z", s.trim_end_matches('Z'), d.subsec_millis())
}

fn rfc3339(unix: u64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Envoy's config_dump shape: bootstrap, clusters, endpoints, listeners and routes, with
/// the version and time each dynamic type was last accepted.
pub fn config_dump(s: &Snapshot) -> Value {
    // Held for the whole dump, so the descriptor pool is decoded once, not per message.
    let _pool = pool();
    let version = |type_url: &str| s.dynamic.versions.get(type_url).cloned();
    let dynamic = |type_url: &str, field: &str, items: Vec<Value>| -> Vec<Value> {
        let (v, t) = version(type_url).unwrap_or_default();
        items
            .into_iter()
            .map(|item| json!({ "version_info": v, field: item, "last_updated": rfc3339(t) }))
            .collect()
    };
    let statics = s.bootstrap.static_resources.as_ref();
    let static_clusters: Vec<Value> = statics
        .map(|r| r.clusters.iter().map(|c| json!({ "cluster": proto_json(Some(c), "envoy.config.cluster.v3.Cluster") })).collect())
        .unwrap_or_default();
    let static_listeners: Vec<Value> = statics
        .map(|r| r.listeners.iter().map(|l| json!({ "listener": proto_json(Some(l), "envoy.config.listener.v3.Listener") })).collect())
        .unwrap_or_default();
    let clusters: Vec<Value> = s
        .dynamic
        .clusters
        .values()
        .map(|c| proto_json(Some(c), "envoy.config.cluster.v3.Cluster"))
        .collect();
    let endpoints: Vec<Value> = s
        .dynamic
        .endpoints
        .values()
        .map(|e| proto_json(Some(e), "envoy.config.endpoint.v3.ClusterLoadAssignment"))
        .collect();
    let listeners: Vec<Value> = s
        .dynamic
        .listeners
        .values()
        .map(|l| proto_json(Some(l), "envoy.config.listener.v3.Listener"))
        .collect();
    let routes: Vec<Value> = s
        .dynamic
        .routes
        .values()
        .map(|r| proto_json(Some(r), "envoy.config.route.v3.RouteConfiguration"))
        .collect();
    json!({ "configs": [
        {
            "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "bootstrap": proto_json(Some(&s.bootstrap), "envoy.config.bootstrap.v3.Bootstrap"),
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "static_clusters": static_clusters,
            "dynamic_active_clusters": dynamic(CLUSTER_TYPE, "cluster", clusters),
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
            "dynamic_endpoint_configs": dynamic(ENDPOINT_TYPE, "endpoint_config", endpoints),
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "static_listeners": static_listeners,
            "dynamic_listeners": dynamic(LISTENER_TYPE, "active_state", listeners),
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "dynamic_route_configs": dynamic(ROUTE_TYPE, "route_config", routes),
        },
    ]})
}

fn health_text(f: u32) -> String {
    let mut out = String::new();
    if f & flags::FAILED_ACTIVE_HC != 0 {
        out.push_str("/failed_active_hc");
    }
    if f & flags::FAILED_OUTLIER != 0 {
        out.push_str("/failed_outlier_check");
    }
    if out.is_empty() {
        "healthy".into()
    } else {
        out
    }
}

/// Envoy's text format: `cluster::host:port::stat::value`, one line per fact.
fn clusters_text(s: &Snapshot) -> String {
    let mut names: Vec<&String> = s.clusters.keys().collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let c = &s.clusters[name];
        for h in c.members().iter() {
            let p = format!("{name}::{}", h.address);
            out.push_str(&format!("{p}::rq_active::{}\n", h.active_requests()));
            out.push_str(&format!("{p}::rq_total::{}\n", h.total_requests()));
            out.push_str(&format!("{p}::hostname::{}\n", h.hostname));
            out.push_str(&format!(
                "{p}::health_flags::{}\n",
                health_text(h.health_flags())
            ));
            out.push_str(&format!("{p}::weight::{}\n", h.weight));
            out.push_str(&format!("{p}::priority::{}\n", h.priority));
        }
    }
    out
}

fn clusters_json(s: &Snapshot) -> Value {
    let mut names: Vec<&String> = s.clusters.keys().collect();
    names.sort();
    let statuses: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let c = &s.clusters[name];
            let hosts: Vec<Value> = c
                .members()
                .iter()
                .map(|h| {
                    json!({
                        "address": { "socket_address": { "address": h.address.ip().to_string(), "port_value": h.address.port() } },
                        "hostname": h.hostname,
                        "weight": h.weight,
                        "priority": h.priority,
                        "health_status": {
                            "failed_active_health_check": h.health_flags() & flags::FAILED_ACTIVE_HC != 0,
                            "failed_outlier_check": h.health_flags() & flags::FAILED_OUTLIER != 0,
                            "eds_health_status": if h.is_healthy() { "HEALTHY" } else { "UNHEALTHY" },
                        },
                        "stats": [
                            { "name": "rq_active", "value": h.active_requests(), "type": "GAUGE" },
                            { "name": "rq_total", "value": h.total_requests() },
                        ],
                    })
                })
                .collect();
            json!({ "name": name, "added_via_api": s.dynamic.clusters.contains_key(name.as_str()), "host_statuses": hosts })
        })
        .collect();
    json!({ "cluster_statuses": statuses })
}

/// `POST /logging?level=<level>`: legate has one logger, so Envoy's per-logger form
/// (`?<name>=<level>`) is refused rather than half-applied.
fn set_log_level(uri: &hyper::Uri) -> Resp {
    let level =
        match uri.query() {
            None | Some("") => None,
            Some(q) => match q.strip_prefix("level=") {
                Some(l) if !l.contains('&') => match l {
                    "trace" => Some(log::LevelFilter::Trace),
                    "debug" => Some(log::LevelFilter::Debug),
                    "info" => Some(log::LevelFilter::Info),
                    "warning" | "warn" => Some(log::LevelFilter::Warn),
                    "error" | "critical" => Some(log::LevelFilter::Error),
                    "off" => Some(log::LevelFilter::Off),
                    _ => return reply(400, "text/plain", format!("unknown level '{l}'\n")),
                },
                _ => return reply(
                    400,
                    "text/plain",
                    "usage: POST /logging?level=<trace|debug|info|warning|error|critical|off>\n",
                ),
            },
        };
    if let Some(l) = level {
        log::set_max_level(l);
    }
    let current = log::max_level().to_string().to_ascii_lowercase();
    reply(
        200,
        "text/plain",
        format!("active loggers:\n  legate: {current}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
