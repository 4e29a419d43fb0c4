//! Front-door limits from the HTTP connection manager: header count and size (431, as
//! Envoy answers), requests per connection, and connection age.

mod common;

use std::time::Duration;

use common::*;

fn config(port: u16, up: u16, hcm: &str) -> String {
    bootstrap(
        &[listener_yaml(
            "main",
            port,
            "virtual_hosts: [{name: all, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: up}}]}]",
            hcm,
        )],
        &[cluster_yaml("up", &[up], "")],
    )
}

fn with_headers(port: u16, count: usize, value_len: usize) -> Response {
    let mut raw = String::from("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for i in 0..count {
        raw.push_str(&format!("x-h{i}: {}\r\n", "v".repeat(value_len)));
    }
    raw.push_str("\r\n");
    send_raw(port, raw.as_bytes())
}

#[test]
fn oversized_headers_get_431_like_envoy() {
    let up = Upstream::start("up");
    let hcm = "max_request_headers_kb: 2\ncommon_http_protocol_options: {max_headers_count: 10}";
    let port = free_port();
    let _l = Legate::start(&config(port, up.port(), hcm), port);
    let envoy_port = free_port();
    let _e = Envoy::start(&config(envoy_port, up.port(), hcm), envoy_port);
    for p in [port, envoy_port] {
        assert_eq!(with_headers(p, 3, 10).status, 200, "port {p}");
        // Too many headers, then too many bytes.
        assert_eq!(with_headers(p, 12, 10).status, 431, "port {p}");
        assert_eq!(with_headers(p, 3, 1000).status, 431, "port {p}");
    }
}

#[test]
fn connections_close_after_max_requests_and_max_duration() {
    let up = Upstream::start("up");
    let port = free_port();
    let hcm = "common_http_protocol_options: {max_requests_per_connection: 2}";
    let _l = Legate::start(&config(port, up.port(), hcm), port);
    let mut c = KeepAlive::connect(port).unwrap();
    let first = c.get("/", "x").unwrap();
    assert_ne!(first.header("connection"), Some("close"));
    let second = c.get("/", "x").unwrap();
    assert_eq!(second.header("connection"), Some("close"));
    assert!(
        c.get("/", "x").is_err(),
        "a third request on the connection"
    );

    let port = free_port();
    let hcm = "common_http_protocol_options: {max_connection_duration: 1s}";
    let _l = Legate::start(&config(port, up.port(), hcm), port);
    let mut c = KeepAlive::connect(port).unwrap();
    assert_eq!(c.get("/", "x").unwrap().status, 200);
    // Idle past its age limit: the gateway closes it.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        c.get("/", "x").is_err(),
        "the connection outlived max_connection_duration"
    );
    // A fresh connection is served.
    assert_eq!(get(port, "/", "x").status, 200);
}

#[test]
fn connection_limit_closes_connections_over_the_limit() {
    let up = Upstream::start("up");
    let port = free_port();
    let limit = r#"      - name: envoy.filters.network.connection_limit
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit
          stat_prefix: front
          max_connections: 2
"#;
    let yaml = config(port, up.port(), "")
        .replace("    - filters:\n", &format!("    - filters:\n{limit}"));
    let _l = Legate::start(&yaml, port);
    let mut a = KeepAlive::connect(port).unwrap();
    let mut b = KeepAlive::connect(port).unwrap();
    assert_eq!(a.get("/", "x").unwrap().status, 200);
    assert_eq!(b.get("/", "x").unwrap().status, 200);
    // A third open connection is closed without an answer.
    let mut c = KeepAlive::connect(port).unwrap();
    assert!(c.get("/", "x").is_err());
    // Once one closes, there is room again.
    drop(a);
    eventually(5, "a slot frees up", || {
        KeepAlive::connect(port)
            .and_then(|mut d| d.get("/", "x"))
            .is_ok()
    });
    assert_eq!(b.get("/", "x").unwrap().status, 200);
}

/// `max_connections_to_accept_per_socket_event: 1` (as Envoy Gateway sets it) spreads a
/// burst of connections over the worker's turns; every one of them is still served.
#[test]
fn a_burst_of_connections_is_served_one_accept_per_turn() {
    let up = Upstream::start("up");
    let port = free_port();
    let yaml = config(port, up.port(), "").replacen(
        "  - name: main\n",
        "  - name: main\n    max_connections_to_accept_per_socket_event: 1\n",
        1,
    );
    let _l = Legate::start(&yaml, port);
    // All connected before any is used, so that they wait in the accept queue together.
    let mut clients: Vec<KeepAlive> = (0..64).map(|_| KeepAlive::connect(port).unwrap()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.get("/", "x").unwrap().status, 200, "connection {i}");
    }
    let zero = config(port, up.port(), "").replacen(
        "  - name: main\n",
        "  - name: main\n    max_connections_to_accept_per_socket_event: 0\n",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zero.yaml");
    std::fs::write(&path, zero).unwrap();
    let out = std::process::Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "static_resources.listeners[0].max_connections_to_accept_per_socket_event: must be at least 1"
        ),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Sends `parts` with a pause before each, then reads until the server closes. Send errors
/// after a reply are expected (the server closed), so they end the sending quietly.
fn trickle(port: u16, parts: &[(u64, &str)]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    for (pause, data) in parts {
        std::thread::sleep(Duration::from_millis(*pause));
        if s.write_all(data.as_bytes()).is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Status lines and bodies of what a client saw, without headers that differ by server.
fn outcome(raw: &str) -> Vec<(u16, String)> {
    raw.split("HTTP/1.1 ")
        .skip(1)
        .map(|r| {
            let status = r.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            (status, body.to_string())
        })
        .collect()
}

#[test]
fn slow_clients_get_408_like_envoy() {
    let up = Upstream::start("up");
    let hcm = "request_headers_timeout: 1s\nrequest_timeout: 3s";
    let port = free_port();
    let _l = Legate::start(&config(port, up.port(), hcm), port);
    let envoy_port = free_port();
    let _e = Envoy::start(&config(envoy_port, up.port(), hcm), envoy_port);
    let get = "GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let get_close = "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let post = "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\nconnection: close\r\n\r\n";
    let header_timeout = (408, "request header timeout".to_string());
    let request_timeout = (408, "request timeout".to_string());
    // (what, pauses and bytes sent, statuses and bodies seen)
    type Case<'a> = (&'a str, Vec<(u64, &'a str)>, Vec<(u16, String)>);
    let cases: Vec<Case> = vec![
        (
            "headers trickle past request_headers_timeout",
            vec![
                (0, "GET / HTTP/1.1\r\n"),
                (600, "host: x\r\n"),
                (600, "a: b\r\n"),
                (600, "\r\n"),
            ],
            vec![header_timeout.clone()],
        ),
        (
            // Neither timer runs before a request's first byte.
            "idle connection, then a request",
            vec![(1500, get_close)],
            vec![(200, "up\n".to_string())],
        ),
        (
            "body trickles past request_timeout",
            vec![
                (0, post),
                (900, "aaa"),
                (900, "aaa"),
                (900, "aaa"),
                (900, "a"),
            ],
            vec![request_timeout.clone()],
        ),
        (
            "body within request_timeout",
            vec![(0, post), (500, "aaaaa"), (500, "aaaaa")],
            vec![(200, "up\n".to_string())],
        ),
        (
            // The clock restarts per request: idle past the headers timeout between two
            // requests is fine, a trickled second request is not.
            "second request on a kept-alive connection",
            vec![
                (0, get),
                (1500, "GET / HTTP/1.1\r\n"),
                (700, "host: x\r\n"),
                (700, "\r\n"),
            ],
            vec![(200, "up\n".to_string()), header_timeout],
        ),
    ];
    std::thread::scope(|s| {
        let runs: Vec<_> = cases
            .iter()
            .flat_map(|(name, parts, want)| {
                [port, envoy_port]
                    .map(|p| (p, *name, want, s.spawn(move || outcome(&trickle(p, parts)))))
            })
            .collect();
        for (p, name, want, run) in runs {
            let got = run.join().unwrap();
            let who = if p == port { "legate" } else { "envoy" };
            assert_eq!(&got, want, "{who}: {name}");
        }
    });
}

/// The HTTP/1 request clock stays off on an HTTP/2 connection: its streams share the
/// connection, so neither an idle spell between them nor a long stream is a slow request.
/// (Pingora's HTTP/2 server has no read timeouts; a stalled stream body ends at the route
/// timeout, as docs/configuration.md says.)
#[test]
fn request_timers_leave_http2_connections_alone() {
    let up = Upstream::start("up");
    let hcm = "request_headers_timeout: 1s\nrequest_timeout: 1s";
    let port = free_port();
    let yaml = config(port, up.port(), hcm)
        .replace("route: {cluster: up}", "route: {cluster: up, timeout: 1s}");
    let _l = Legate::start(&yaml, port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut h2, _conn) = h2c_connect(port).await;
        let get = http::Request::get(format!("http://127.0.0.1:{port}/"))
            .body(())
            .unwrap();
        let (resp, _) = h2.send_request(get, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // A body sent over 2 s, each part well within the timeout.
        let mut h2 = h2.ready().await.unwrap();
        let post = http::Request::post(format!("http://127.0.0.1:{port}/"))
            .body(())
            .unwrap();
        let (resp, mut body) = h2.send_request(post, false).unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            body.send_data(bytes::Bytes::from_static(b"part"), false)
                .unwrap();
        }
        body.send_data(bytes::Bytes::new(), true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("a response")
            .expect("the connection is still open");
        assert_eq!(resp.status(), 200);

        // A body that stalls: the route timeout (1 s here) ends the stream.
        let mut h2 = h2.ready().await.unwrap();
        let post = http::Request::post(format!("http://127.0.0.1:{port}/"))
            .header("content-length", "10")
            .body(())
            .unwrap();
        let (resp, mut body) = h2.send_request(post, false).unwrap();
        body.send_data(bytes::Bytes::from_static(b"part"), false)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("an answer while the body stalls")
            .unwrap();
        assert_eq!(resp.status(), 504);
        drop(body);
    });
}

/// On HTTP/2 the connection limits drain the connection with GOAWAY (Envoy's way), since
/// there is no keep-alive to switch off: by age, after the last allowed request, and when
/// no stream has been open for `idle_timeout`.
#[test]
fn http2_connections_drain_at_their_limits() {
    let up = Upstream::start("up");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for hcm in [
        "common_http_protocol_options: {max_connection_duration: 1s}",
        "common_http_protocol_options: {max_requests_per_connection: 2}",
        "common_http_protocol_options: {idle_timeout: 1s}",
    ] {
        let port = free_port();
        let _l = Legate::start(&config(port, up.port(), hcm), port);
        rt.block_on(async {
            let (mut h2, conn) = h2c_connect(port).await;
            for i in 0..2 {
                if i > 0 {
                    h2 = h2.ready().await.unwrap();
                }
                let get = http::Request::get(format!("http://127.0.0.1:{port}/"))
                    .body(())
                    .unwrap();
                let (resp, _) = h2.send_request(get, true).unwrap();
                assert_eq!(resp.await.unwrap().status(), 200, "{hcm}");
            }
            // The gateway closes the connection: by age within the second, at once after
            // the second request, or a second or two after the streams ended.
            tokio::time::timeout(Duration::from_secs(5), conn)
                .await
                .unwrap_or_else(|_| panic!("{hcm}: the connection stayed open"))
                .unwrap()
                .unwrap_or_else(|e| panic!("{hcm}: not a graceful close: {e}"));
        });
    }
}

/// The overload manager's global connection limit (`global_downstream_max_connections`, as
/// Envoy Gateway's bootstrap sets it): past two open connections a new one is closed
/// unanswered, a listener with `bypass_overload_manager` still takes one, and a slot frees
/// when a connection closes. Envoy and legate alike.
#[test]
fn the_global_connection_limit_closes_connections_over_it_as_envoy_does() {
    for envoy in [true, false] {
        let up = Upstream::start("up");
        let (port, bypass) = (free_port(), free_port());
        let routes = "virtual_hosts: [{name: all, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: up}}]}]";
        let yaml = format!(
            "overload_manager:\n  refresh_interval: 0.25s\n  resource_monitors:\n  - name: envoy.resource_monitors.global_downstream_max_connections\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig\n      max_active_downstream_connections: 2\n{}",
            bootstrap(
                &[
                    listener_yaml("main", port, routes, ""),
                    listener_yaml("ops", bypass, routes, "").replacen(
                        "  - name: ops\n",
                        "  - name: ops\n    bypass_overload_manager: true\n",
                        1,
                    ),
                ],
                &[cluster_yaml("up", &[up.port()], "")],
            )
        );
        let _p: Box<dyn std::any::Any> = if envoy {
            Box::new(common::Envoy::start(&yaml, port))
        } else {
            Box::new(Legate::start(&yaml, port))
        };
        wait_for_port(bypass, None);
        // The gateways' readiness probes close their connections as these open: a slot
        // may take a moment to come back.
        let served = || {
            KeepAlive::connect(port)
                .and_then(|mut k| k.get("/", "x").map(|_| k))
                .ok()
        };
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut one = None;
            eventually(5, "a connection under the limit", || {
                one = served();
                one.is_some()
            });
            open.extend(one);
        }
        let a = open.remove(0);
        let mut c = KeepAlive::connect(port).unwrap();
        assert!(
            c.get("/", "x").is_err(),
            "envoy: {envoy}: a third connection is closed"
        );
        let mut ops = KeepAlive::connect(bypass).unwrap();
        assert_eq!(
            ops.get("/", "x").unwrap().status,
            200,
            "envoy: {envoy}: bypass"
        );
        drop(a);
        eventually(5, "a slot frees up", || {
            KeepAlive::connect(port)
                .and_then(|mut d| d.get("/", "x"))
                .is_ok()
        });
    }
}
