//! `envoy.filters.http.local_ratelimit` through legate and Envoy 1.40 on the same bootstrap:
//! the same statuses, bodies and headers as the bucket empties, per-route buckets, and a
//! bucket that refills.

mod common;

use std::time::Duration;

use common::*;

const FILTER: &str = r#"name: envoy.filters.http.local_ratelimit
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
  stat_prefix: rl
  token_bucket: {max_tokens: 3, tokens_per_fill: 3, fill_interval: 3600s}
  filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
  filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}"#;

const PER_ROUTE: &str = r#"envoy.filters.http.local_ratelimit:
  "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
  stat_prefix: strict
  token_bucket: {max_tokens: 1, tokens_per_fill: 1, fill_interval: FILL}
  filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
  filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}"#;

fn config(port: u16, up: u16) -> String {
    let routes = format!(
        "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {{prefix: /strict}}\n    route: {{cluster: up}}\n    typed_per_filter_config:\n{}\n  - match: {{prefix: /fast}}\n    route: {{cluster: up}}\n    typed_per_filter_config:\n{}\n  - match: {{prefix: /}}\n    route: {{cluster: up}}\n",
        indent(&PER_ROUTE.replace("FILL", "3600s"), 6),
        indent(&PER_ROUTE.replace("FILL", "0.5s"), 6),
    );
    let listener = listener_yaml("main", port, &routes, "").replace(
        "          http_filters:\n",
        &format!(
            "          http_filters:\n{}\n",
            indent(&format!("- {}", FILTER.replace('\n', "\n  ")), 10)
        ),
    );
    bootstrap(&[listener], &[cluster_yaml("up", &[up], "")])
}

fn run(port: u16) -> Vec<(u16, String, Option<String>)> {
    let mut out = Vec::new();
    let mut send = |path: &str| {
        let r = get(port, path, "x");
        out.push((
            r.status,
            r.body.clone(),
            r.header("x-envoy-ratelimited").map(String::from),
        ));
    };
    // /strict and /fast have their own buckets of one; the rest share the filter's three.
    for path in [
        "/strict", "/strict", "/a", "/b", "/c", "/d", "/e", "/fast", "/fast",
    ] {
        send(path);
    }
    // /fast refills every 0.5 s; /strict never within the test.
    std::thread::sleep(Duration::from_millis(1200));
    send("/fast");
    send("/strict");
    out
}

#[test]
fn local_rate_limit_matches_envoy() {
    let up = Upstream::start("up");
    let port = free_port();
    let _l = Legate::start(&config(port, up.port()), port);
    let envoy_port = free_port();
    let _e = Envoy::start(&config(envoy_port, up.port()), envoy_port);
    let ours = run(port);
    let envoys = run(envoy_port);
    assert_eq!(ours, envoys);
    let statuses: Vec<u16> = ours.iter().map(|r| r.0).collect();
    assert_eq!(
        statuses,
        [200, 429, 200, 200, 200, 429, 429, 200, 429, 200, 429]
    );
    assert_eq!(ours[1].1, "local_rate_limited");
}
