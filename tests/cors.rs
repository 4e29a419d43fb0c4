//! `envoy.filters.http.cors` through legate and Envoy 1.40 on the same bootstrap: preflights
//! and simple requests from allowed and other origins, virtual-host and route policies.

mod common;

use common::*;

const FILTER: &str = r#"- name: envoy.filters.http.cors
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"#;

fn policy(origin: &str) -> String {
    format!(
        r#"envoy.filters.http.cors:
  "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
  allow_origin_string_match: [{{exact: "{origin}"}}]
  allow_methods: "GET, POST"
  allow_headers: x-token
  expose_headers: x-resp
  max_age: "600"
  allow_credentials: true"#
    )
}

fn config(port: u16, up: u16) -> String {
    let routes = format!(
        "virtual_hosts:\n- name: all\n  domains: ['*']\n  typed_per_filter_config:\n{}\n  routes:\n  - match: {{prefix: /partner}}\n    route: {{cluster: up}}\n    typed_per_filter_config:\n{}\n  - match: {{prefix: /}}\n    route: {{cluster: up}}\n",
        indent(&policy("https://app.example.com"), 4),
        indent(&policy("https://partner.example.com"), 6),
    );
    let listener = listener_yaml("main", port, &routes, "").replace(
        "          http_filters:\n",
        &format!("          http_filters:\n{}\n", indent(FILTER, 10)),
    );
    bootstrap(&[listener], &[cluster_yaml("up", &[up], "")])
}

/// Method, path and request headers of one case.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

fn observe(port: u16) -> Vec<(u16, Vec<(String, String)>)> {
    let cases: Vec<Case> = vec![
        (
            "OPTIONS",
            "/",
            vec![
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
            ],
        ),
        (
            "OPTIONS",
            "/",
            vec![
                ("origin", "https://evil.example.com"),
                ("access-control-request-method", "POST"),
            ],
        ),
        ("GET", "/", vec![("origin", "https://app.example.com")]),
        ("GET", "/", vec![("origin", "https://evil.example.com")]),
        ("GET", "/", vec![]),
        ("OPTIONS", "/", vec![("origin", "https://app.example.com")]),
        (
            "GET",
            "/partner",
            vec![("origin", "https://partner.example.com")],
        ),
        (
            "GET",
            "/partner",
            vec![("origin", "https://app.example.com")],
        ),
        (
            "OPTIONS",
            "/partner",
            vec![
                ("origin", "https://partner.example.com"),
                ("access-control-request-method", "GET"),
            ],
        ),
    ];
    cases
        .into_iter()
        .map(|(method, path, headers)| {
            let r = request(port, method, path, "x", &headers);
            let mut cors: Vec<(String, String)> = r
                .headers
                .iter()
                .filter(|(k, _)| k.starts_with("access-control-"))
                .cloned()
                .collect();
            cors.sort();
            (r.status, cors)
        })
        .collect()
}

#[test]
fn cors_matches_envoy() {
    let up = Upstream::start("up");
    let port = free_port();
    let _l = Legate::start(&config(port, up.port()), port);
    let envoy_port = free_port();
    let _e = Envoy::start(&config(envoy_port, up.port()), envoy_port);
    let ours = observe(port);
    let envoys = observe(envoy_port);
    for (i, (o, e)) in ours.iter().zip(&envoys).enumerate() {
        assert_eq!(o, e, "case {i}");
    }
    // The preflight was answered by the gateway, with the policy's headers.
    assert_eq!(ours[0].0, 200);
    assert!(ours[0]
        .1
        .iter()
        .any(|(k, v)| k == "access-control-max-age" && v == "600"));
}
