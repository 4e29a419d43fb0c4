//! Applying a large mesh from one xDS push: 10,000 EDS clusters with 100,000 endpoints
//! and 1,000 routes. Reports the time until legate ACKed everything, its memory before
//! and after, and the latency of requests on another route while the push is applied.
//!
//! Run: `cargo bench --bench xds_apply` (needs no Envoy). Timings are printed, never
//! asserted.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/mgmt.rs"]
mod mgmt;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ConfigSource, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use prost::Message;

use common::*;

const CLUSTERS: usize = 10_000;
const ENDPOINTS_PER_CLUSTER: usize = 10;
const ROUTES: usize = 1_000;
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLA_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(
            ConfigSourceSpecifier::Ads(AggregatedConfigSource::default()),
        ),
        resource_api_version: 2,
        ..Default::default()
    }
}

fn cluster(i: usize) -> Vec<u8> {
    Cluster {
        name: format!("c{i}"),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn endpoints(i: usize) -> Vec<u8> {
    let lb_endpoints = (0..ENDPOINTS_PER_CLUSTER)
        .map(|j| LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: format!("127.0.{}.{}", (i / 250) % 250, i % 250 + 1),
                        port_specifier: Some(PortSpecifier::PortValue(10_000 + j as u32)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: format!("c{i}"),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

fn routes() -> Vec<u8> {
    let mut yaml =
        String::from("name: big\nvirtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n");
    for r in 0..ROUTES {
        yaml.push_str(&format!(
            "  - match: {{prefix: /r{r}/}}\n    route: {{cluster: c{}}}\n",
            r * (CLUSTERS / ROUTES)
        ));
    }
    let rc: envoy_types::pb::envoy::config::route::v3::RouteConfiguration =
        legate::config::load::parse_message(&yaml, "envoy.config.route.v3.RouteConfiguration")
            .unwrap();
    rc.encode_to_vec()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() {
    let probe_upstream = Upstream::start("probe");
    let server = mgmt::Server::start();
    let (probe_port, big_port) = (free_port(), free_port());
    let probe = listener_yaml(
        "probe",
        probe_port,
        "virtual_hosts: [{name: p, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: probe}}]}]",
        "",
    );
    let big = format!(
        r#"
  - name: big
    address: {{socket_address: {{address: 127.0.0.1, port_value: {big_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: big
          rds: {{route_config_name: big, config_source: {{ads: {{}}, resource_api_version: V3}}}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
"#
    );
    let xds_cluster = format!(
        "\n  - name: xds\n    connect_timeout: 1s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n    load_assignment:\n      cluster_name: xds\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]\n",
        server.port
    );
    let yaml = format!(
        "node: {{id: bench}}\ndynamic_resources:\n  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]}}\n  cds_config: {{ads: {{}}, resource_api_version: V3}}\n{}",
        bootstrap(&[probe, big], &[cluster_yaml("probe", &[probe_upstream.port()], ""), xds_cluster])
    );
    let legate = Legate::start(&yaml, probe_port);
    let pid = legate.child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.streams() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_before = rss_kib(pid);

    let build = Instant::now();
    let cds: Vec<Vec<u8>> = (0..CLUSTERS).map(cluster).collect();
    let eds: Vec<Vec<u8>> = (0..CLUSTERS).map(endpoints).collect();
    let rds = vec![routes()];
    let build_time = build.elapsed();

    // Requests on an unrelated route while the push is applied.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let prober = std::thread::spawn(move || {
        let mut latencies = Vec::new();
        let mut failures = 0;
        let mut client = KeepAlive::connect(probe_port).unwrap();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            match client.get("/", "w") {
                Ok(r) if r.status == 200 => latencies.push(t.elapsed()),
                _ => failures += 1,
            }
        }
        (latencies, failures)
    });
    std::thread::sleep(Duration::from_millis(300));

    let start = Instant::now();
    server.push(CLUSTER_TYPE, "c1", cds);
    server.push(CLA_TYPE, "e1", eds);
    server.push(ROUTE_TYPE, "r1", rds);
    let acked = |type_url: &str, version: &str| {
        server.requests().iter().any(|r| {
            r.type_url == type_url && r.version_info == version && r.error_detail.is_none()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !(acked(CLUSTER_TYPE, "c1") && acked(CLA_TYPE, "e1") && acked(ROUTE_TYPE, "r1")) {
        assert!(Instant::now() < deadline, "legate did not ACK the push");
        std::thread::sleep(Duration::from_millis(5));
    }
    let apply_time = start.elapsed();
    wait_for_port(big_port, None);
    let routed = get(big_port, &format!("/r{}/x", ROUTES - 1), "w");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut latencies, failures) = prober.join().unwrap();
    latencies.sort();
    let rss_after = rss_kib(pid);

    println!(
        "xds_apply: {CLUSTERS} clusters, {} endpoints, {ROUTES} routes in one push",
        CLUSTERS * ENDPOINTS_PER_CLUSTER
    );
    println!("  building the push (test side): {build_time:?}");
    println!("  time until CDS, EDS and RDS were ACKed: {apply_time:?}");
    println!(
        "  last route answers {} (503: its endpoints are unreachable test addresses)",
        routed.status
    );
    println!(
        "  legate RSS: {} MiB before, {} MiB after",
        rss_before / 1024,
        rss_after / 1024
    );
    println!(
        "  probe requests during the apply: {} ok, {failures} failed; p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
}
