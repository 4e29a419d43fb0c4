//! What stats cost per request: the counter and histogram updates one proxied request makes
//! (downstream and upstream totals, status classes, two latency histograms), timed on one
//! thread and on two threads sharing the same counters (workers share them, so the cache
//! line ping-pong is part of the real cost).
//!
//! `cargo bench --bench stats_cost`

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use legate::stats::{ClusterStats, HttpStats};

const N: u64 = 5_000_000;

fn one_request(h: &HttpStats, c: &ClusterStats, i: u64) {
    h.downstream_rq_total.fetch_add(1, Ordering::Relaxed);
    c.upstream_rq_total.fetch_add(1, Ordering::Relaxed);
    // Latencies spread over the sub-millisecond to 10 ms buckets, as on a busy gateway.
    let t = Duration::from_micros(100 + (i % 64) * 150);
    c.response(200, t);
    h.response(200, t);
}

fn run(threads: usize) -> f64 {
    let h = Arc::new(HttpStats::default());
    let c = Arc::new(ClusterStats::default());
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (h, c) = (h.clone(), c.clone());
            std::thread::spawn(move || {
                for i in 0..N {
                    one_request(&h, &c, std::hint::black_box(i));
                }
            })
        })
        .collect();
    for t in handles {
        let _ = t.join();
    }
    let ns = start.elapsed().as_nanos() as f64 / N as f64;
    assert_eq!(
        h.downstream_rq_total.load(Ordering::Relaxed),
        N * threads as u64
    );
    ns
}

fn main() {
    for threads in [1, 2] {
        let ns = run(threads);
        println!("stats per request, {threads} thread(s) sharing counters: {ns:.1} ns");
    }
}
