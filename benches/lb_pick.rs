//! One load-balancer pick per algorithm, for clusters of 10 and 100 endpoints (weighted, so
//! the weighted schedulers are exercised). Hash-based policies are given a request hash.
//!
//! `cargo bench --bench lb_pick`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const POLICIES: [&str; 5] = [
    "ROUND_ROBIN",
    "LEAST_REQUEST",
    "RANDOM",
    "RING_HASH",
    "MAGLEV",
];

fn bootstrap(hosts: usize) -> String {
    let mut y = String::from("static_resources:\n  clusters:\n");
    for p in POLICIES {
        y.push_str(&format!(
            "  - name: {p}\n    type: STATIC\n    lb_policy: {p}\n    load_assignment:\n      cluster_name: {p}\n      endpoints:\n      - lb_endpoints:\n"
        ));
        for i in 0..hosts {
            y.push_str(&format!(
                "        - {{endpoint: {{address: {{socket_address: {{address: 127.0.{}.{}, port_value: 8000}}}}}}, load_balancing_weight: {}}}\n",
                i / 250,
                i % 250 + 1,
                i % 3 + 1
            ));
        }
    }
    y
}

fn benches(c: &mut Criterion) {
    for hosts in [10, 100] {
        let bootstrap = legate::config::parse_bootstrap(&bootstrap(hosts))
            .and_then(|p| p.strict())
            .expect("bench bootstrap");
        let snapshot = legate::snapshot::compile(bootstrap).expect("bench bootstrap compiles");
        let mut g = c.benchmark_group(format!("lb_pick_{hosts}_hosts"));
        for p in POLICIES {
            let cluster = snapshot.cluster(p).expect("cluster exists").clone();
            let mut hash = 0u64;
            g.bench_function(BenchmarkId::from_parameter(p), |b| {
                b.iter(|| {
                    hash = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    cluster.pick(Some(black_box(hash)))
                })
            });
        }
        g.finish();
    }
}

criterion_group!(name = lb_pick; config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500)); targets = benches);
criterion_main!(lb_pick);
