//! Route lookup cost by table size and shape: prefix, exact and regex routes in one virtual
//! host, and many virtual hosts with exact and wildcard domains. Each request targets the
//! last route (or domain) of the table, the worst case for a scan. `linear` is the same
//! table searched route by route, as before the index, for comparison.
//!
//! `cargo bench --bench route_lookup`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use legate::config::error::Errors;
use legate::route::{RequestView, RouteTable};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn table(yaml: &str) -> RouteTable {
    let proto: RouteConfiguration =
        legate::config::load::parse_message(yaml, "envoy.config.route.v3.RouteConfiguration")
            .expect("bench route config parses");
    let mut errs = Errors::default();
    let t = RouteTable::convert(&proto, "route_config", &mut errs).expect("bench table");
    errs.into_result(t).expect("bench table is valid")
}

fn one_host(n: usize, route: impl Fn(usize) -> String) -> RouteTable {
    let mut y = String::from("virtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - {{match: {}, direct_response: {{status: 200}}}}\n",
            route(i)
        ));
    }
    table(&y)
}

fn many_hosts(n: usize) -> RouteTable {
    let mut y = String::from("virtual_hosts:\n");
    for i in 0..n {
        // Exact, suffix-wildcard and prefix-wildcard domains, as on a shared front door.
        y.push_str(&format!(
            "- {{name: vh{i}, domains: [\"svc{i}.example.com\", \"*.svc{i}.example.com\", \"svc{i}.*\"], routes: [{{match: {{prefix: \"/\"}}, direct_response: {{status: 200}}}}]}}\n"
        ));
    }
    table(&y)
}

fn lookup(
    c: &mut Criterion,
    group: &str,
    build: impl Fn(usize) -> RouteTable,
    host: impl Fn(usize) -> String,
    path: impl Fn(usize) -> String,
) {
    let headers = http::HeaderMap::new();
    let mut g = c.benchmark_group(group);
    for n in SIZES {
        let t = build(n);
        let (host, path) = (host(n - 1), path(n - 1));
        let req = RequestView::new("GET", &path, &host, "http", &headers);
        assert!(t.route_index(&req).is_some(), "{group}: request must match");
        g.bench_with_input(BenchmarkId::new("indexed", n), &req, |b, req| {
            b.iter(|| t.route_index(black_box(req)))
        });
        if group != "many_domains" {
            g.bench_with_input(BenchmarkId::new("linear", n), &req, |b, req| {
                b.iter(|| {
                    t.virtual_hosts[0]
                        .routes
                        .iter()
                        .position(|r| r.matches(black_box(req)))
                })
            });
        }
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let any_host = |_| "gateway.local".to_string();
    lookup(
        c,
        "prefix",
        |n| one_host(n, |i| format!("{{prefix: \"/svc{i}/\"}}")),
        any_host,
        |i| format!("/svc{i}/items/42?page=2"),
    );
    lookup(
        c,
        "exact",
        |n| one_host(n, |i| format!("{{path: \"/svc{i}/items\"}}")),
        any_host,
        |i| format!("/svc{i}/items?page=2"),
    );
    lookup(
        c,
        "regex",
        |n| {
            one_host(n, |i| {
                format!("{{safe_regex: {{regex: \"/svc{i}/[0-9]+\"}}}}")
            })
        },
        any_host,
        |i| format!("/svc{i}/42"),
    );
    lookup(
        c,
        "many_domains",
        many_hosts,
        |i| format!("api.svc{i}.example.com"),
        |_| "/".to_string(),
    );
}

criterion_group!(name = route_lookup; config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500)); targets = benches);
criterion_main!(route_lookup);
