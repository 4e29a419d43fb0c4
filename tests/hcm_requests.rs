//! What the connection manager does to a request before routing, with the settings control
//! planes write on every listener (Envoy Gateway: `normalize_path`, `merge_slashes`,
//! `path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT`,
//! `headers_with_underscores_action: REJECT_REQUEST`, per-route `upgrade_configs`). Each
//! case runs through Envoy 1.40 and legate on the same bootstrap; the client's status and
//! `location` and what the upstream received must be the same. Runs through both HTTP
//! engines (`LEGATE_TEST_ENGINE`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::wire::WireUpstream;
use common::*;

/// Envoy 1.40 (the oracle) or legate on `yaml`, listening on `port`; stopped when dropped.
fn proxy(envoy: bool, yaml: &str, port: u16) -> Box<dyn std::any::Any> {
    if envoy {
        Box::new(Envoy::start(yaml, port))
    } else {
        Box::new(Legate::start(yaml, port))
    }
}

/// Sends one raw request and returns what the client and the upstream saw:
/// `status [location] -> upstream request line and the named fields`, or `-> (nothing)`.
fn exchange(port: u16, upstream: &WireUpstream, head: &str, fields: &[&str]) -> String {
    let before = upstream.requests().len();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).expect("send");
    let r = parse_response(&read_one_response(&mut s));
    let mut out = r.status.to_string();
    if let Some(l) = r.header("location") {
        out.push_str(&format!(" location={l}"));
    }
    match upstream.requests().get(before) {
        Some(req) => {
            out.push_str(&format!(" -> {}", req.line));
            for f in fields {
                out.push_str(&format!(" {f}={:?}", req.field(f)));
            }
        }
        None => out.push_str(" -> (nothing)"),
    }
    out
}

/// One response: the head, then as many body bytes as its content-length says (an upgrade
/// request leaves the connection open, so reading to the end would wait).
fn read_one_response(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return buf;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Runs every request head through Envoy and legate (one bootstrap built by `yaml` for a
/// listener port and an upstream port) and asserts the same outcomes.
fn same_as_envoy(
    yaml: impl Fn(u16, u16) -> String,
    heads: &[String],
    fields: &[&str],
) -> Vec<String> {
    let mut results = Vec::new();
    for envoy in [true, false] {
        let upstream = WireUpstream::start();
        let port = free_port();
        let _p = proxy(envoy, &yaml(port, upstream.port()), port);
        let outcomes: Vec<String> = heads
            .iter()
            .map(|h| exchange(port, &upstream, h, fields))
            .collect();
        results.push(outcomes);
    }
    let mut diffs = Vec::new();
    for (i, head) in heads.iter().enumerate() {
        if results[0][i] != results[1][i] {
            diffs.push(format!(
                "{:?}\n    envoy:  {}\n    legate: {}",
                head.lines().next().unwrap_or_default(),
                results[0][i],
                results[1][i]
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "differs from Envoy:\n{}",
        diffs.join("\n")
    );
    results.swap_remove(1)
}

fn get(target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nhost: gw\r\n{extra}connection: close\r\n\r\n")
}

const ENVOY_GATEWAY_HCM: &str = "normalize_path: true\nmerge_slashes: true\npath_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\ncommon_http_protocol_options: {headers_with_underscores_action: REJECT_REQUEST}\n";

/// Path confusion cases: dot segments plain and escaped, escaped slashes and backslashes,
/// runs of slashes, unreserved characters escaped, characters that need escaping, broken
/// and nested escapes, and queries that hold all of these (left alone).
const PATHS: &[&str] = &[
    "/a/b",
    "/a/../b",
    "/a/./b/.",
    "/../../a",
    "/a/%2e%2e/b",
    "/a/%2E%2e/b",
    "/a/.%2e/b",
    "/a/%2e/b",
    "/a..b/.c/",
    "/a%2Fb",
    "/a%2fb",
    "/a%5Cb",
    "/a%5c..%5cb",
    "/a/..%2f..%2fb",
    "/a%2F..%2F..%2Fetc",
    "//a//b///",
    "/a//../b",
    "/a/b/..",
    "/a?x=../y&z=%2F//",
    "/%61%62%43%7e%2D%5F%2e",
    "/a%3Bb%3bc",
    "/a;b:c@d!$&'()*+,=",
    "/%7B%7d%5E%60",
    "/a%2",
    "/a%zzb",
    "/a%%30%30",
    "/a%%3030",
    "/a%25%32%46b",
    "/a%00b",
    "/%C3%A9t%c3%a9",
    "/a/b/../../../..",
];

#[test]
fn paths_are_normalised_as_envoy_normalises_them() {
    let heads: Vec<String> = PATHS.iter().map(|p| get(p, "")).collect();
    let outcomes = same_as_envoy(
        |port, up| {
            bootstrap(
                &[listener_yaml(
                    "main",
                    port,
                    "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n",
                    ENVOY_GATEWAY_HCM,
                )],
                &[cluster_yaml("c", &[up], "")],
            )
        },
        &heads,
        &[],
    );
    // The settings did something (a test that cannot fail is worth nothing).
    assert!(
        outcomes.iter().any(|o| o.starts_with("307")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|o| o.starts_with("400")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&"200 -> GET /b HTTP/1.1".to_string()),
        "{outcomes:?}"
    );
}

#[test]
fn routing_sees_the_normalised_path() {
    // /admin is refused by a direct response; a normalised /public/../admin must meet it.
    let routes = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /admin}\n    direct_response: {status: 403}\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let heads: Vec<String> = [
        "/public/../admin",
        "/public/%2e%2e/admin/x",
        "//admin",
        "/public/..%2fadmin",
        "/public",
    ]
    .iter()
    .map(|p| get(p, ""))
    .collect();
    let outcomes = same_as_envoy(
        |port, up| {
            bootstrap(
                &[listener_yaml("main", port, routes, ENVOY_GATEWAY_HCM)],
                &[cluster_yaml("c", &[up], "")],
            )
        },
        &heads,
        &[],
    );
    assert!(outcomes[0].starts_with("403"), "{outcomes:?}");
}

#[test]
fn headers_with_underscores_by_action() {
    let heads = vec![
        get("/u", "x_custom: 1\r\n"),
        get("/u", "x-custom: 1\r\n"),
        get("/u", "a_b_c: 1\r\nx-ok: 2\r\n"),
    ];
    let routes = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    for action in ["ALLOW", "REJECT_REQUEST", "DROP_HEADER"] {
        let hcm = format!(
            "common_http_protocol_options: {{headers_with_underscores_action: {action}}}\n"
        );
        let outcomes = same_as_envoy(
            |port, up| {
                bootstrap(
                    &[listener_yaml("main", port, routes, &hcm)],
                    &[cluster_yaml("c", &[up], "")],
                )
            },
            &heads,
            &["x_custom", "a_b_c", "x-ok", "x-custom"],
        );
        match action {
            "REJECT_REQUEST" => {
                assert!(outcomes[0].starts_with("400 -> (nothing)"), "{outcomes:?}")
            }
            "DROP_HEADER" => assert!(outcomes[0].contains("x_custom=None"), "{outcomes:?}"),
            _ => assert!(outcomes[0].contains("x_custom=Some(\"1\")"), "{outcomes:?}"),
        }
    }
}

#[test]
fn upgrades_are_allowed_per_route() {
    // The connection manager allows none; one route enables websocket, and on a second
    // listener the connection manager allows it and one route turns it off.
    let ws = "upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n";
    let heads: Vec<String> = ["/ws/chat", "/plain", "/missing"]
        .iter()
        .map(|p| format!("GET {p} HTTP/1.1\r\nhost: gw\r\n{ws}\r\n"))
        .collect();
    let routes = |upgrade: &str| {
        format!("virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {{prefix: /ws}}\n    route: {{cluster: c, upgrade_configs: [{{upgrade_type: websocket{upgrade}}}]}}\n  - match: {{prefix: /plain}}\n    route: {{cluster: c}}\n")
    };
    let on_route = same_as_envoy(
        |port, up| {
            bootstrap(
                &[listener_yaml("main", port, &routes(""), "")],
                &[cluster_yaml("c", &[up], "")],
            )
        },
        &heads,
        &["upgrade"],
    );
    assert!(
        on_route[0].contains("upgrade=Some(\"websocket\")"),
        "{on_route:?}"
    );
    assert!(on_route[1].starts_with("403"), "{on_route:?}");
    let off_on_route = same_as_envoy(
        |port, up| {
            bootstrap(
                &[listener_yaml(
                    "main",
                    port,
                    &routes(", enabled: false"),
                    "upgrade_configs: [{upgrade_type: websocket}]\n",
                )],
                &[cluster_yaml("c", &[up], "")],
            )
        },
        &heads,
        &["upgrade"],
    );
    assert!(off_on_route[0].starts_with("403"), "{off_on_route:?}");
    assert!(
        off_on_route[1].contains("upgrade=Some(\"websocket\")"),
        "{off_on_route:?}"
    );
}

#[test]
fn a_client_supplied_xfcc_header_is_removed_unless_always_forwarded() {
    // Plaintext clients present no certificate: every mode but ALWAYS_FORWARD_ONLY drops
    // the header, so an upstream that trusts it cannot be fooled.
    let heads = vec![get(
        "/x",
        "x-forwarded-client-cert: By=spiffe://spoofed;Hash=00\r\n",
    )];
    let routes = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    for mode in [
        "",
        "forward_client_cert_details: SANITIZE\n",
        "forward_client_cert_details: FORWARD_ONLY\n",
        "forward_client_cert_details: APPEND_FORWARD\nset_current_client_cert_details: {subject: true, uri: true}\n",
        "forward_client_cert_details: SANITIZE_SET\nset_current_client_cert_details: {cert: true}\n",
        "forward_client_cert_details: ALWAYS_FORWARD_ONLY\n",
    ] {
        let outcomes = same_as_envoy(
            |port, up| {
                bootstrap(
                    &[listener_yaml("main", port, routes, mode)],
                    &[cluster_yaml("c", &[up], "")],
                )
            },
            &heads,
            &["x-forwarded-client-cert"],
        );
        let forwarded = mode.contains("ALWAYS_FORWARD_ONLY");
        assert_eq!(
            outcomes[0].contains("x-forwarded-client-cert=Some"),
            forwarded,
            "{mode}: {outcomes:?}"
        );
    }
}
