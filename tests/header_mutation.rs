//! `envoy.filters.http.header_mutation` through legate and Envoy 1.40 on the same bootstrap:
//! the upstream sees the same request headers and the client the same response headers,
//! with and without per-route mutations.

mod common;

use common::*;

const FILTER: &str = r#"- name: envoy.filters.http.header_mutation
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
    mutations:
      request_mutations:
      - remove: x-secret
      - append: {header: {key: x-added, value: filter}, append_action: APPEND_IF_EXISTS_OR_ADD}
      - append: {header: {key: x-set, value: filter}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
      response_mutations:
      - append: {header: {key: x-resp, value: filter}}
      - remove: x-upstream-private"#;

const PER_ROUTE: &str = r#"envoy.filters.http.header_mutation:
  "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute
  mutations:
    request_mutations:
    - append: {header: {key: x-set, value: route}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
    - append: {header: {key: x-route, value: "yes"}}
    response_mutations:
    - append: {header: {key: x-resp, value: route}}"#;

fn config(port: u16, up: u16, most_specific_wins: bool) -> String {
    let routes = format!(
        "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {{prefix: /route}}\n    route: {{cluster: up}}\n    typed_per_filter_config:\n{}\n  - match: {{prefix: /}}\n    route: {{cluster: up}}\n",
        indent(PER_ROUTE, 6)
    );
    let listener = listener_yaml("main", port, &routes, "").replace(
        "          http_filters:\n",
        &format!(
            "          http_filters:\n{}\n",
            indent(
                &FILTER.replace(
                    "    mutations:\n",
                    &format!("    most_specific_header_mutations_wins: {most_specific_wins}\n    mutations:\n")
                ),
                10
            )
        ),
    );
    bootstrap(&[listener], &[cluster_yaml("up", &[up], "")])
}

/// What the upstream saw and what the client got, for the headers the filter touches.
fn observe(port: u16, up: &Upstream, path: &str) -> Vec<(String, Vec<String>)> {
    let r = request(
        port,
        "GET",
        path,
        "x",
        &[
            ("x-secret", "s"),
            ("x-added", "client"),
            ("x-set", "client"),
        ],
    );
    let seen = up.last();
    let mut out = Vec::new();
    for h in ["x-secret", "x-added", "x-set", "x-route"] {
        out.push((
            format!("upstream {h}"),
            seen.headers.get(h).cloned().unwrap_or_default(),
        ));
    }
    for h in ["x-resp", "x-upstream-private"] {
        let values = r
            .headers
            .iter()
            .filter(|(k, _)| k == h)
            .map(|(_, v)| v.clone())
            .collect();
        out.push((format!("client {h}"), values));
    }
    out
}

#[test]
fn header_mutation_matches_envoy() {
    let up = Upstream::start("up");
    for wins in [false, true] {
        let port = free_port();
        let _l = Legate::start(&config(port, up.port(), wins), port);
        let envoy_port = free_port();
        let _e = Envoy::start(&config(envoy_port, up.port(), wins), envoy_port);
        for path in ["/plain", "/route"] {
            let ours = observe(port, &up, path);
            let envoys = observe(envoy_port, &up, path);
            assert_eq!(
                ours, envoys,
                "{path}, most_specific_header_mutations_wins: {wins}"
            );
        }
    }
    let port = free_port();
    let _l = Legate::start(&config(port, up.port(), false), port);
    let ours = observe(port, &up, "/plain");
    assert_eq!(ours[0].1, Vec::<String>::new(), "x-secret removed");
    assert_eq!(ours[2].1, ["filter"]);
}
