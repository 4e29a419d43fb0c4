//! Snapshot compile time (validate, convert, build load balancers and route tables) for a
//! bootstrap of 10,000 static clusters with two endpoints each and a route to every one —
//! what a SIGHUP reload of a large file costs before the swap.
//!
//! `cargo bench --bench compile`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const CLUSTERS: usize = 10_000;

fn bootstrap() -> String {
    let mut y = String::from(
        "static_resources:\n  listeners:\n  - name: http\n    address: {socket_address: {address: 127.0.0.1, port_value: 18080}}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: http\n          http_filters: [{name: envoy.filters.http.router, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]\n          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n",
    );
    for i in 0..CLUSTERS {
        y.push_str(&format!(
            "              - {{match: {{prefix: \"/c{i}/\"}}, route: {{cluster: c{i}}}}}\n"
        ));
    }
    y.push_str("  clusters:\n");
    for i in 0..CLUSTERS {
        y.push_str(&format!(
            "  - {{name: c{i}, type: STATIC, load_assignment: {{cluster_name: c{i}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.{}.{}, port_value: 8000}}}}}}}}, {{endpoint: {{address: {{socket_address: {{address: 127.0.{}.{}, port_value: 8001}}}}}}}}]}}]}}}}\n",
            i / 250 % 250,
            i % 250 + 1,
            i / 250 % 250,
            i % 250 + 1
        ));
    }
    y
}

fn benches(c: &mut Criterion) {
    let bootstrap = legate::config::parse_bootstrap(&bootstrap())
        .and_then(|p| p.strict())
        .expect("bench bootstrap");
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("10k_clusters_10k_routes", |b| {
        b.iter_batched(
            || bootstrap.clone(),
            |bs| legate::snapshot::compile(bs).expect("compiles"),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(compile, benches);
criterion_main!(compile);
