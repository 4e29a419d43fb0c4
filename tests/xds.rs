//! xDS end to end: a scripted ADS management server (tonic, envoy-types server traits)
//! pushes clusters and endpoints, a bad resource, and a disconnect.

mod common;
#[path = "common/mgmt.rs"]
mod mgmt;

use mgmt::Server;

use prost::Message;

use common::*;

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn cluster(yaml: &str) -> Vec<u8> {
    let c: envoy_types::pb::envoy::config::cluster::v3::Cluster =
        legate::config::load::parse_message(yaml, "envoy.config.cluster.v3.Cluster").unwrap();
    c.encode_to_vec()
}

fn endpoints(name: &str, port: u16) -> Vec<u8> {
    let yaml = format!(
        "cluster_name: {name}\nendpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]"
    );
    let c: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
        legate::config::load::parse_message(
            &yaml,
            "envoy.config.endpoint.v3.ClusterLoadAssignment",
        )
        .unwrap();
    c.encode_to_vec()
}

const EDS_CLUSTER: &str = "name: svc\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: {eds_config: {ads: {}, resource_api_version: V3}}";

#[test]
fn clusters_and_endpoints_arrive_over_ads_with_acks_nacks_and_reconnects() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let server = Server::start();
    let port = free_port();
    let route = "validate_clusters: false\nvirtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: svc}\n";
    let yaml = xds_bootstrap(
        server.port,
        false,
        &[listener_yaml("main", port, route, "")],
    );
    let _l = Legate::start(&yaml, port);

    // Before any push the route's cluster is unknown: 503, the static part serves.
    assert_eq!(get(port, "/", "w").status, 503);
    eventually(10, "the CDS subscription", || {
        server.requests().iter().any(|r| r.type_url == CLUSTER)
    });
    let first = server
        .requests()
        .into_iter()
        .find(|r| r.type_url == CLUSTER)
        .unwrap();
    assert_eq!(
        first.node.as_ref().map(|n| n.id.as_str()),
        Some("legate-test")
    );
    assert!(
        first.resource_names.is_empty(),
        "CDS is a wildcard subscription"
    );

    server.push(CLUSTER, "1", vec![cluster(EDS_CLUSTER)]);
    eventually(10, "CDS ACK and EDS subscription", || {
        let reqs = server.requests();
        reqs.iter().any(|r| {
            r.type_url == CLUSTER && r.version_info == "1" && r.response_nonce == "nonce-1"
        }) && reqs
            .iter()
            .any(|r| r.type_url == CLA && r.resource_names == ["svc"])
    });
    server.push(CLA, "e1", vec![endpoints("svc", a.port())]);
    eventually(10, "traffic on the EDS endpoint", || {
        get(port, "/", "w").upstream() == Some("a")
    });

    server.push(CLA, "e2", vec![endpoints("svc", b.port())]);
    eventually(10, "endpoints replaced", || {
        get(port, "/", "w").upstream() == Some("b")
    });

    // A bad cluster is NACKed with the field path; the last good config keeps serving.
    server.push(
        CLUSTER,
        "2",
        vec![cluster(&format!("{EDS_CLUSTER}\nlb_subset_config: {{}}"))],
    );
    eventually(10, "NACK", || {
        server.requests().iter().any(|r| {
            r.type_url == CLUSTER
                && r.response_nonce == "nonce-2"
                && r.version_info == "1"
                && r.error_detail.as_ref().is_some_and(|e| {
                    e.message
                        .contains("cds[svc].lb_subset_config: not supported")
                })
        })
    });
    assert_eq!(get(port, "/", "w").upstream(), Some("b"));

    // The stream breaks: traffic goes on, and the client comes back with what it has.
    server.disconnect();
    assert_eq!(get(port, "/", "w").upstream(), Some("b"));
    eventually(10, "a new stream", || server.streams() >= 2);
    eventually(10, "resubscription with the accepted versions", || {
        let reqs = server.requests();
        let n = reqs.len();
        reqs[n.saturating_sub(4)..]
            .iter()
            .any(|r| r.type_url == CLUSTER && r.version_info == "1" && r.response_nonce.is_empty())
    });
    assert_eq!(get(port, "/", "w").upstream(), Some("b"));
}

const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

fn listener(name: &str, port: u16, rds: &str) -> Vec<u8> {
    listener_with_timeout(name, port, rds, "15s")
}

fn listener_with_timeout(name: &str, port: u16, rds: &str, timeout: &str) -> Vec<u8> {
    let yaml = format!(
        r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      rds: {{route_config_name: {rds}, config_source: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {timeout}}}}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    );
    let l: envoy_types::pb::envoy::config::listener::v3::Listener =
        legate::config::load::parse_message(&yaml, "envoy.config.listener.v3.Listener").unwrap();
    l.encode_to_vec()
}

fn routes(name: &str, cluster: &str) -> Vec<u8> {
    let yaml = format!(
        "name: {name}\nvirtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {{prefix: /}}\n    route: {{cluster: {cluster}}}\n"
    );
    let r: envoy_types::pb::envoy::config::route::v3::RouteConfiguration =
        legate::config::load::parse_message(&yaml, "envoy.config.route.v3.RouteConfiguration")
            .unwrap();
    r.encode_to_vec()
}

/// legate on `server` with LDS, once it has asked for listeners; it also serves a static
/// listener (a direct 200) on the returned port, so a test can tell it is up.
fn legate_subscribed_to_lds(server: &Server) -> (Legate, u16) {
    let admin_port = free_port();
    let up = listener_yaml(
        "up",
        admin_port,
        "virtual_hosts: [{name: up, domains: ['*'], routes: [{match: {prefix: /}, direct_response: {status: 200}}]}]",
        "",
    );
    let legate = Legate::start(&xds_bootstrap(server.port, true, &[up]), admin_port);
    eventually(10, "LDS subscription", || {
        server.requests().iter().any(|r| r.type_url == LISTENER)
    });
    (legate, admin_port)
}

fn xds_bootstrap(server_port: u16, lds: bool, static_listeners: &[String]) -> String {
    let xds_cluster = format!(
        r#"
  - name: xds
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {server_port}}}}}}}
"#
    );
    let lds = if lds {
        "  lds_config: {ads: {}, resource_api_version: V3}\n"
    } else {
        ""
    };
    let listeners = if static_listeners.is_empty() {
        " []".to_string()
    } else {
        static_listeners.concat()
    };
    format!(
        "node: {{id: legate-test, cluster: test}}\ndynamic_resources:\n  ads_config:\n    api_type: GRPC\n    transport_api_version: V3\n    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]\n  cds_config: {{ads: {{}}, resource_api_version: V3}}\n{lds}static_resources:\n  listeners:{listeners}\n  clusters:{xds_cluster}"
    )
}

#[test]
fn listeners_and_routes_arrive_over_ads_and_warm_before_serving() {
    let a = Upstream::start("a");
    let server = Server::start();
    let (_l, admin_port) = legate_subscribed_to_lds(&server);
    server.push(CLUSTER, "c1", vec![cluster(EDS_CLUSTER)]);
    server.push(CLA, "e1", vec![endpoints("svc", a.port())]);
    let port = free_port();
    server.push(LISTENER, "l1", vec![listener("dyn", port, "routes-1")]);
    eventually(10, "RDS subscription for the listener's routes", || {
        server
            .requests()
            .iter()
            .any(|r| r.type_url == ROUTES && r.resource_names == ["routes-1"])
    });
    // Warming: no routes yet, so the listener does not accept.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    server.push(ROUTES, "r1", vec![routes("routes-1", "svc")]);
    eventually(10, "the listener serves once its routes arrived", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert_eq!(get(port, "/", "w").upstream(), Some("a"));
    // An empty LDS set removes the listener.
    server.push(LISTENER, "l2", vec![]);
    eventually(10, "listener removed", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    assert_eq!(get(admin_port, "/", "w").status, 200);
}

fn static_rds_listener(name: &str, port: u16) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          rds: {{route_config_name: shared-routes, config_source: {{ads: {{}}, resource_api_version: V3}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

/// Status and body, or None when nothing listens yet.
type Answer = Option<(u16, String)>;

/// Envoy is pointed at the same management server: after each push both must route the
/// same requests to the same upstreams.
#[test]
fn legate_and_envoy_follow_the_same_management_server() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let server = Server::start();
    let (envoy_port, legate_port) = (free_port(), free_port());
    let _envoy = Envoy::spawn(
        &xds_bootstrap(server.port, false, &[static_rds_listener("gw", envoy_port)]),
        envoy_port,
    );
    let admin_port = free_port();
    let up = listener_yaml(
        "up",
        admin_port,
        "virtual_hosts: [{name: up, domains: ['*'], routes: [{match: {prefix: /}, direct_response: {status: 200}}]}]",
        "",
    );
    let _legate = Legate::start(
        &xds_bootstrap(
            server.port,
            false,
            &[static_rds_listener("gw", legate_port), up],
        ),
        admin_port,
    );
    eventually(30, "both gateways subscribed", || server.streams() >= 2);

    let route_yaml = |v: &str| {
        format!(
            "name: shared-routes\nvirtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {{prefix: /direct}}\n    direct_response: {{status: 202, body: {{inline_string: '{v}'}}}}\n  - match: {{prefix: /}}\n    route: {{cluster: svc}}\n"
        )
    };
    let push_routes = |v: &str| {
        let r: envoy_types::pb::envoy::config::route::v3::RouteConfiguration =
            legate::config::load::parse_message(
                &route_yaml(v),
                "envoy.config.route.v3.RouteConfiguration",
            )
            .unwrap();
        server.push(ROUTES, v, vec![r.encode_to_vec()]);
    };
    let both = |path: &str| -> (Answer, Answer) {
        let one = |port| {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            let r = get(port, path, "w");
            Some((r.status, r.body))
        };
        (one(envoy_port), one(legate_port))
    };
    let same_after = |what: &str, path: &str, want: (u16, &str)| {
        eventually(30, what, || {
            let (e, l) = both(path);
            e.as_ref().map(|(s, b)| (*s, b.as_str())) == Some(want) && e == l
        });
    };

    server.push(CLUSTER, "c1", vec![cluster(EDS_CLUSTER)]);
    server.push(CLA, "e1", vec![endpoints("svc", a.port())]);
    push_routes("r1");
    same_after("routes and endpoints applied", "/x", (200, "a\n"));
    same_after("direct response", "/direct", (202, "r1"));

    server.push(CLA, "e2", vec![endpoints("svc", b.port())]);
    same_after("endpoints moved to b", "/x", (200, "b\n"));

    push_routes("r2");
    same_after("routes updated", "/direct", (202, "r2"));
}

#[test]
fn a_listener_whose_routes_never_come_starts_after_the_initial_fetch_timeout() {
    let server = Server::start();
    let (_l, _) = legate_subscribed_to_lds(&server);
    let port = free_port();
    let pushed = std::time::Instant::now();
    server.push(
        LISTENER,
        "l1",
        vec![listener_with_timeout("dyn", port, "never", "0.5s")],
    );
    eventually(10, "listener up without its routes", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        pushed.elapsed() >= std::time::Duration::from_millis(400),
        "it waited for the routes first"
    );
    assert_eq!(get(port, "/", "w").status, 404, "an empty route table");
}

#[test]
fn delta_xds_adds_updates_and_removes_resources() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let server = Server::start();
    let port = free_port();
    let route = "validate_clusters: false\nvirtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: svc}\n";
    let yaml = xds_bootstrap(
        server.port,
        false,
        &[listener_yaml("main", port, route, "")],
    )
    .replace("api_type: GRPC", "api_type: DELTA_GRPC");
    let _l = Legate::start(&yaml, port);
    eventually(10, "a delta CDS subscription", || {
        server
            .delta_requests()
            .iter()
            .any(|r| r.type_url == CLUSTER)
    });
    server.push_delta(
        CLUSTER,
        "n1",
        vec![("svc", "v1", cluster(EDS_CLUSTER))],
        vec![],
    );
    eventually(10, "CDS ACK and EDS subscription by name", || {
        let reqs = server.delta_requests();
        reqs.iter()
            .any(|r| r.type_url == CLUSTER && r.response_nonce == "n1" && r.error_detail.is_none())
            && reqs
                .iter()
                .any(|r| r.type_url == CLA && r.resource_names_subscribe == ["svc"])
    });
    server.push_delta(
        CLA,
        "n2",
        vec![("svc", "e1", endpoints("svc", a.port()))],
        vec![],
    );
    eventually(10, "traffic to a", || {
        get(port, "/", "w").upstream() == Some("a")
    });
    server.push_delta(
        CLA,
        "n3",
        vec![("svc", "e2", endpoints("svc", b.port()))],
        vec![],
    );
    eventually(10, "traffic to b", || {
        get(port, "/", "w").upstream() == Some("b")
    });

    // A bad update is NACKed; the held version keeps serving.
    server.push_delta(
        CLUSTER,
        "n4",
        vec![(
            "svc",
            "v2",
            cluster(&format!("{EDS_CLUSTER}\nlb_subset_config: {{}}")),
        )],
        vec![],
    );
    eventually(10, "delta NACK", || {
        server.delta_requests().iter().any(|r| {
            r.response_nonce == "n4"
                && r.error_detail
                    .as_ref()
                    .is_some_and(|e| e.message.contains("lb_subset_config"))
        })
    });
    assert_eq!(get(port, "/", "w").upstream(), Some("b"));

    // A reconnect announces the versions held.
    server.disconnect_delta();
    eventually(10, "initial_resource_versions on the new stream", || {
        server.delta_requests().iter().any(|r| {
            r.type_url == CLUSTER
                && r.initial_resource_versions.get("svc").map(String::as_str) == Some("v1")
        })
    });

    // Removing the cluster: its route answers 503 again.
    server.push_delta(CLUSTER, "n5", vec![], vec!["svc"]);
    eventually(10, "cluster removed", || get(port, "/", "w").status == 503);
}

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn tls_listener_with_sds(name: &str, port: u16, secret: &str) -> Vec<u8> {
    let yaml = format!(
        r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- transport_socket:
    name: envoy.transport_sockets.tls
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
      common_tls_context:
        tls_certificate_sds_secret_configs: [{{name: {secret}, sds_config: {{ads: {{}}, resource_api_version: V3}}}}]
  filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      route_config:
        virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, direct_response: {{status: 200, body: {{inline_string: tls}}}}}}]}}]
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    );
    let l: envoy_types::pb::envoy::config::listener::v3::Listener =
        legate::config::load::parse_message(&yaml, "envoy.config.listener.v3.Listener").unwrap();
    l.encode_to_vec()
}

/// A Secret resource carrying a new self-signed certificate; its DER, for the client.
fn secret(name: &str) -> (Vec<u8>, Vec<u8>) {
    use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        secret::Type, Secret, TlsCertificate,
    };
    let c = rcgen::generate_simple_self_signed(vec!["gw.example.com".to_string()]).unwrap();
    let inline = |s: String| DataSource {
        specifier: Some(Specifier::InlineString(s)),
        ..Default::default()
    };
    let s = Secret {
        name: name.to_string(),
        r#type: Some(Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(c.cert.pem())),
            private_key: Some(inline(c.signing_key.serialize_pem())),
            ..Default::default()
        })),
    };
    (s.encode_to_vec(), c.cert.der().to_vec())
}

/// Whether a TLS handshake to `port` succeeds when trusting only `der`.
fn served_by(port: u16, der: &[u8]) -> bool {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("gw.example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            return false;
        }
    }
    true
}

#[test]
fn listener_certificates_arrive_over_sds_and_rotate() {
    let server = Server::start();
    let (_l, _) = legate_subscribed_to_lds(&server);
    server.push(CLUSTER, "c1", vec![]);
    let port = free_port();
    server.push(
        LISTENER,
        "l1",
        vec![tls_listener_with_sds("tls", port, "gw-cert")],
    );
    eventually(
        10,
        "SDS subscription for the listener's certificate",
        || {
            server
                .requests()
                .iter()
                .any(|r| r.type_url == SECRET && r.resource_names == ["gw-cert"])
        },
    );
    // Warming: no certificate yet, so the listener does not accept.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let (first, first_der) = secret("gw-cert");
    server.push(SECRET, "s1", vec![first]);
    eventually(10, "the listener serves the SDS certificate", || {
        served_by(port, &first_der)
    });
    // Rotation: a new version of the secret is served to new connections.
    let (second, second_der) = secret("gw-cert");
    server.push(SECRET, "s2", vec![second]);
    eventually(10, "the rotated certificate is served", || {
        served_by(port, &second_der)
    });
    assert!(!served_by(port, &first_der));
    let acks = server
        .requests()
        .iter()
        .filter(|r| r.type_url == SECRET && r.version_info == "s2" && r.error_detail.is_none())
        .count();
    assert!(acks >= 1, "the second secret version is ACKed");
}

/// A message of the pool from YAML, encoded as a management server sends it.
fn encoded<M: Message + Default>(yaml: &str, full_name: &str) -> Vec<u8> {
    legate::config::load::parse_message::<M>(yaml, full_name)
        .unwrap()
        .encode_to_vec()
}

/// Resources in the shape Envoy Gateway's xDS translator writes for an HTTPRoute (camelCase
/// JSON names, the fields it sets on every listener, cluster and route): each is ACKed and
/// the route serves, with the listener's path normalisation applied.
#[test]
fn resources_shaped_as_envoy_gateway_writes_them_are_acked_and_served() {
    let a = Upstream::start("a");
    let server = Server::start();
    let (_l, _) = legate_subscribed_to_lds(&server);
    let acked = |type_url: &str, version: &str| {
        server.requests().iter().any(|r| {
            r.type_url == type_url
                && r.version_info == version
                && r.response_nonce == format!("nonce-{version}")
                && r.error_detail.is_none()
        })
    };
    let cluster_yaml = r#"
name: httproute/default/backend/rule/0
type: EDS
connectTimeout: 10s
commonLbConfig: {}
dnsLookupFamily: V4_PREFERRED
circuitBreakers: {thresholds: [{maxRetries: 1024}]}
edsClusterConfig:
  edsConfig: {ads: {}, resourceApiVersion: V3}
  serviceName: httproute/default/backend/rule/0
ignoreHealthOnHostRemoval: true
perConnectionBufferLimitBytes: 32768
loadBalancingPolicy:
  policies:
  - typedExtensionConfig:
      name: envoy.load_balancing_policies.least_request
      typedConfig:
        '@type': type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest
        localityLbConfig: {localityWeightedLbConfig: {}}
"#;
    server.push(
        CLUSTER,
        "c1",
        vec![encoded::<
            envoy_types::pb::envoy::config::cluster::v3::Cluster,
        >(cluster_yaml, "envoy.config.cluster.v3.Cluster")],
    );
    eventually(10, "cluster ACKed", || acked(CLUSTER, "c1"));
    let cla = format!(
        "clusterName: httproute/default/backend/rule/0\nendpoints:\n- loadBalancingWeight: 1\n  locality: {{region: httproute/default/backend/rule/0/backend/0}}\n  lbEndpoints:\n  - endpoint: {{address: {{socketAddress: {{address: 127.0.0.1, portValue: {}}}}}}}\n    loadBalancingWeight: 1\n",
        a.port()
    );
    server.push(
        CLA,
        "e1",
        vec![encoded::<
            envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
        >(
            &cla, "envoy.config.endpoint.v3.ClusterLoadAssignment"
        )],
    );
    let port = free_port();
    let listener_yaml = format!(
        r#"
name: default/eg/http
address: {{socketAddress: {{address: 127.0.0.1, portValue: {port}}}}}
maxConnectionsToAcceptPerSocketEvent: 1
perConnectionBufferLimitBytes: 32768
defaultFilterChain:
  name: default/eg/http
  filters:
  - name: envoy.filters.network.http_connection_manager
    typedConfig:
      '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      commonHttpProtocolOptions: {{headersWithUnderscoresAction: REJECT_REQUEST}}
      http2ProtocolOptions: {{initialConnectionWindowSize: 1048576, initialStreamWindowSize: 65536, maxConcurrentStreams: 100}}
      httpFilters:
      - name: envoy.filters.http.router
        typedConfig: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, suppressEnvoyHeaders: true}}
      mergeSlashes: true
      normalizePath: true
      pathWithEscapedSlashesAction: UNESCAPE_AND_REDIRECT
      rds:
        configSource: {{ads: {{}}, initialFetchTimeout: 0s, resourceApiVersion: V3}}
        routeConfigName: default/eg/http
      serverHeaderTransformation: PASS_THROUGH
      statPrefix: http-10080
      useRemoteAddress: true
"#
    );
    server.push(
        LISTENER,
        "l1",
        vec![encoded::<
            envoy_types::pb::envoy::config::listener::v3::Listener,
        >(
            &listener_yaml, "envoy.config.listener.v3.Listener"
        )],
    );
    let routes_yaml = r#"
name: default/eg/http
ignorePortInHostMatching: true
virtualHosts:
- name: default/eg/http/www_example_com
  domains: ['*']
  routes:
  - name: httproute/default/backend/rule/0/match/0/www_example_com
    match: {prefix: /app}
    route:
      cluster: httproute/default/backend/rule/0
      upgradeConfigs: [{upgradeType: websocket}]
    decorator: {operation: backend}
"#;
    server.push(
        ROUTES,
        "r1",
        vec![encoded::<
            envoy_types::pb::envoy::config::route::v3::RouteConfiguration,
        >(
            routes_yaml, "envoy.config.route.v3.RouteConfiguration"
        )],
    );
    eventually(10, "every resource ACKed", || {
        acked(CLA, "e1") && acked(LISTENER, "l1") && acked(ROUTES, "r1")
    });
    eventually(10, "the listener serves", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let r = get(port, "/static/..//app/x", "w");
    assert_eq!(r.upstream(), Some("a"));
    assert_eq!(
        a.last().path,
        "/app/x",
        "normalised before routing and forwarding"
    );
}
