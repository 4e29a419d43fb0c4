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
