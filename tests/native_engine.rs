//! `--engine native`: legate's own HTTP/1.1 engine answers as the Pingora path does, and
//! hands a connection to Pingora, mid-stream, when a request needs what it does not do.
//! (The whole suite also runs through it with LEGATE_TEST_ENGINE=native.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn config(port: u16, upstream: u16, closed: u16) -> String {
    let routes = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /direct}\n    direct_response: {status: 202, body: {inline_string: local}}\n  - match: {prefix: /retry}\n    route: {cluster: c, prefix_rewrite: /fail, retry_policy: {retry_on: 5xx, num_retries: 2}}\n  - match: {prefix: /refused}\n    route: {cluster: gone}\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    bootstrap(
        &[listener_yaml("main", port, routes, "")],
        &[
            cluster_yaml("c", &[upstream], ""),
            cluster_yaml("gone", &[closed], ""),
        ],
    )
}

fn start(engine: &str, upstream: u16, closed: u16) -> (Legate, u16) {
    let port = free_port();
    let mut l = Legate::spawn_with(&config(port, upstream, closed), &["--engine", engine]);
    wait_for_port(port, Some(&mut l.child));
    (l, port)
}

/// legate on the native engine with one route to `up` (`route_extra` in the route action),
/// serving once it returns; the gateway and its port.
fn native_one_route(up: &Upstream, route_extra: &str) -> (Legate, u16) {
    let port = free_port();
    let yaml = one_route_bootstrap(port, route_extra, &[up.port()], "");
    let mut l = Legate::spawn_with(&yaml, &["--engine", "native"]);
    wait_for_port(port, Some(&mut l.child));
    (l, port)
}

/// Sends raw bytes and returns all the client received until the gateway closed.
fn exchange(port: u16, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Reads one content-length framed response off a kept-alive connection.
fn read_one(s: &mut TcpStream) -> Response {
    let mut buf = read_head(s);
    let head = parse_response(&buf);
    let len: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    buf.extend_from_slice(&body);
    parse_response(&buf)
}

/// A response with the fields that vary between runs (date, timing) taken out and the
/// field names lowercased and sorted, for comparing engines.
fn normalized(raw: &[u8]) -> String {
    let r = parse_response(raw);
    let mut headers: Vec<String> = r
        .headers
        .iter()
        .filter(|(k, _)| k != "date" && k != "x-envoy-upstream-service-time")
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    headers.sort();
    format!("{} {:?} {:?}", r.status, headers, r.body)
}

#[test]
fn both_engines_answer_alike() {
    let upstream = raw_upstream();
    let closed = free_port();
    let (_p, pingora) = start("pingora", upstream, closed);
    let (_n, native) = start("native", upstream, closed);
    let requests: &[&str] = &[
        "GET /plain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "HEAD /plain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /close HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /empty HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /reason HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /direct HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /retry HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /refused HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /plain HTTP/1.1\r\nConnection: close\r\n\r\n",
        "POST /plain HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        "POST /retry HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        "GET /plain HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\nKeep-Alive: timeout=5\r\n\r\n",
    ];
    for raw in requests {
        let p = normalized(&exchange(pingora, raw.as_bytes()));
        let n = normalized(&exchange(native, raw.as_bytes()));
        assert_eq!(p, n, "engines differ on {raw:?}");
    }
    // An interim response the client did not ask for (no `Expect`) is dropped, as Envoy
    // 1.40 drops it; Pingora's path passes the 100 on.
    let raw = b"GET /interim HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let r = parse_response(&exchange(native, raw));
    assert_eq!((r.status, r.body.as_str()), (201, "ok"));
}

#[test]
fn the_native_engine_serves_simple_requests_itself() {
    let upstream = raw_upstream();
    let (_n, native) = start("native", upstream, free_port());
    let (_p, pingora) = start("pingora", upstream, free_port());
    assert_eq!(engine_at(native), "native");
    assert_eq!(engine_at(pingora), "pingora");
}

/// Which engine answers a plain GET on `port` (through `raw_upstream`): Pingora keeps an
/// upstream field's case; the native engine writes names lowercase, as Envoy does.
fn engine_at(port: u16) -> &'static str {
    let raw = b"GET /plain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let answer = String::from_utf8_lossy(&exchange(port, raw)).to_string();
    if answer.contains("\r\nx-case: Mixed\r\n") {
        "native"
    } else if answer.contains("\r\nX-Case: Mixed\r\n") {
        "pingora"
    } else {
        panic!("no x-case field: {answer}")
    }
}

#[test]
fn only_listeners_whose_routes_reach_http2_or_tls_clusters_go_to_pingora() {
    let upstream = raw_upstream();
    let (plain, mixed) = (free_port(), free_port());
    const H2: &str = r#"typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {http2_protocol_options: {}}"#;
    let routes = |extra: &str| {
        format!("virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n{extra}  - match: {{prefix: /}}\n    route: {{cluster: c}}\n")
    };
    let yaml = bootstrap(
        &[
            listener_yaml("plain", plain, &routes(""), ""),
            listener_yaml(
                "mixed",
                mixed,
                &routes("  - match: {prefix: /grpc}\n    route: {cluster: h2}\n"),
                "",
            ),
        ],
        &[
            cluster_yaml("c", &[upstream], ""),
            cluster_yaml("h2", &[free_port()], H2),
            // Reached by no route, as an xDS server's cluster is not.
            cluster_yaml("unused", &[free_port()], H2),
        ],
    );
    let mut l = Legate::spawn_with(&yaml, &["--engine", "native"]);
    wait_for_port(plain, Some(&mut l.child));
    wait_for_port(mixed, Some(&mut l.child));
    assert_eq!(engine_at(plain), "native");
    assert_eq!(engine_at(mixed), "pingora");
}

#[test]
fn a_chunked_request_hands_the_connection_to_pingora_mid_stream() {
    let up = Upstream::start("up");
    let (_l, port) = native_one_route(&up, "");
    // Two requests in turn on one connection: the engine serves the first, meets a
    // chunked body in the second and hands the connection, with the bytes it read, to
    // Pingora. (Pingora then closes the connection after a chunked request, on either
    // engine.)
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let requests = [
        "GET /one HTTP/1.1\r\nhost: a\r\n\r\n",
        "POST /two HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    for raw in requests {
        s.write_all(raw.as_bytes()).unwrap();
        let r = read_one(&mut s);
        assert_eq!((r.status, r.body.trim()), (200, "up"), "{raw:?}");
    }
    let seen = up.seen();
    let paths: Vec<_> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/one", "/two"]);
    assert_eq!(seen[1].method, "POST");
}

#[test]
fn keep_alive_and_upstream_pooling_work_on_the_native_engine() {
    let up = Upstream::start("up");
    let (_l, port) = native_one_route(&up, "");
    let mut c = KeepAlive::connect(port).unwrap();
    for i in 0..20 {
        let r = c.get(&format!("/{i}"), "a").unwrap();
        assert_eq!((r.status, r.body.trim()), (200, "up"));
    }
    let ports: std::collections::BTreeSet<u16> = up.seen().iter().map(|s| s.peer_port).collect();
    assert_eq!(ports.len(), 1, "one pooled upstream connection: {ports:?}");
}

#[test]
fn request_bodies_reach_the_upstream_on_every_try() {
    let up = Upstream::start("up");
    let (_l, port) = native_one_route(&up, "retry_policy: {retry_on: 5xx, num_retries: 2}");
    let r = request_with_body(
        port,
        "POST",
        "/form",
        "a",
        &[("x-test-status", "503")],
        "a=1&b=2",
    );
    assert_eq!(r.status, 503);
    let seen = up.seen();
    assert_eq!(seen.len(), 3, "the first try and two retries");
    for s in &seen {
        assert_eq!((s.method.as_str(), s.body.as_str()), ("POST", "a=1&b=2"));
        assert_eq!(s.header("content-length"), Some("7"));
    }
}

/// The client leaves before the upstream answers: the request ends at once, as in Envoy
/// (access log `0 DC`), instead of when the upstream's answer arrives.
#[test]
fn a_client_that_leaves_early_ends_the_request_like_envoy() {
    let up = Upstream::start("slow");
    let dir = tempfile::tempdir().unwrap();
    let run = |envoy: bool| {
        let log = dir
            .path()
            .join(if envoy { "envoy.log" } else { "legate.log" });
        let port = free_port();
        let access_log = format!(
            "access_log:\n- name: envoy.access_loggers.file\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {}\n    log_format: {{text_format_source: {{inline_string: \"%RESPONSE_CODE% %RESPONSE_FLAGS%\\n\"}}}}\n",
            log.display()
        );
        let routes = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
        let yaml = bootstrap(
            &[listener_yaml("main", port, routes, &access_log)],
            &[cluster_yaml("c", &[up.port()], "")],
        );
        let _gateway: Box<dyn std::any::Any> = if envoy {
            Box::new(Envoy::start(&yaml, port))
        } else {
            let mut l = Legate::spawn_with(&yaml, &["--engine", "native"]);
            wait_for_port(port, Some(&mut l.child));
            Box::new(l)
        };
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-test-delay-ms: 4000\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
        let left = std::time::Instant::now();
        let mut line = String::new();
        while left.elapsed() < Duration::from_secs(3) && line.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            line = std::fs::read_to_string(&log).unwrap_or_default();
        }
        line.trim().to_string()
    };
    let envoy = run(true);
    let legate = run(false);
    assert_eq!(envoy, "0 DC", "Envoy's own line");
    assert_eq!(legate, envoy);
}

/// Sub-second route and per-try timeouts run on the worker's own timer here: a timed-out
/// request still gets Envoy's 504, and the gateway sleeps afterwards. (Through Pingora's
/// proxy they start Pingora's 100 Hz timer thread.)
#[test]
fn sub_second_timeouts_keep_the_gateway_asleep() {
    let up = Upstream::start("up");
    let (l, port) = native_one_route(
        &up,
        "timeout: 0.3s, retry_policy: {retry_on: 5xx, per_try_timeout: 0.1s}",
    );
    let mut c = KeepAlive::connect(port).unwrap();
    for i in 0..10 {
        let r = c.get(&format!("/{i}"), "a").unwrap();
        assert_eq!(r.status, 200);
    }
    let slow = request(port, "GET", "/slow", "a", &[("x-test-delay-ms", "1000")]);
    assert_eq!(
        (slow.status, slow.body.as_str()),
        (504, "upstream request timeout")
    );
    drop(c);
    std::thread::sleep(Duration::from_millis(1200));
    assert_idle(l.child.id());
}
