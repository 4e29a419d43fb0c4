//! Stats with Envoy's names (`cluster.<name>.upstream_rq_total`,
//! `http.<stat_prefix>.downstream_rq_2xx`, ...), lock-free on the request path: each
//! cluster and HCM holds an `Arc` to its counters, found by name in a registry when the
//! configuration compiles, so counts survive reloads and xDS updates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Envoy's default histogram bucket bounds, in milliseconds.
pub const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket (not cumulative) counts, so a sample costs one atomic add, not one per
    /// bucket at or above it; the last slot counts samples above every bound.
    buckets: [AtomicU64; 20],
    count: AtomicU64,
    /// Sum in microseconds (reported in ms).
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = BUCKETS_MS.partition_point(|b| *b < ms);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// (cumulative bucket counts for `BUCKETS_MS`, count, sum in ms).
    pub fn read(&self) -> (Vec<u64>, u64, f64) {
        let mut total = 0;
        let cumulative = self.buckets[..BUCKETS_MS.len()]
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        (
            cumulative,
            self.count.load(Ordering::Relaxed),
            self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
        )
    }
}

fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// `cluster.<name>.*`
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub upstream_rq_total: AtomicU64,
    /// 1xx..5xx.
    pub upstream_rq_class: [AtomicU64; 5],
    pub upstream_rq_retry: AtomicU64,
    pub upstream_rq_retry_overflow: AtomicU64,
    pub upstream_rq_timeout: AtomicU64,
    pub upstream_rq_per_try_timeout: AtomicU64,
    pub upstream_rq_pending_overflow: AtomicU64,
    pub upstream_cx_connect_fail: AtomicU64,
    pub upstream_rq_time: Histogram,
}

impl ClusterStats {
    pub fn response(&self, status: u16, time: Duration) {
        self.upstream_rq_class[class_index(status)].fetch_add(1, Ordering::Relaxed);
        self.upstream_rq_time.record(time);
    }
}

/// `http.<stat_prefix>.*`
#[derive(Debug, Default)]
pub struct HttpStats {
    pub downstream_rq_total: AtomicU64,
    pub downstream_rq_class: [AtomicU64; 5],
    pub downstream_cx_active: AtomicU64,
    /// Connections closed for a request their codec refused.
    pub downstream_cx_protocol_error: AtomicU64,
    /// Paths `normalize_path` or `path_with_escaped_slashes_action` refused (400).
    pub downstream_rq_failed_path_normalization: AtomicU64,
    /// Requests answered 307 by `UNESCAPE_AND_REDIRECT`.
    pub downstream_rq_redirected_with_normalized_path: AtomicU64,
    pub downstream_rq_time: Histogram,
}

impl HttpStats {
    pub fn response(&self, status: u16, time: Duration) {
        self.downstream_rq_class[class_index(status)].fetch_add(1, Ordering::Relaxed);
        self.downstream_rq_time.record(time);
    }
}

/// Process-wide counters (`server.*`, `listener_manager.*`, `cluster_manager.*`, xDS).
#[derive(Debug, Default)]
pub struct ServerStats {
    pub config_reload_success: AtomicU64,
    pub config_reload_rejected: AtomicU64,
    pub control_plane_connected: AtomicU64,
    pub cds_update_success: AtomicU64,
    pub cds_update_rejected: AtomicU64,
    pub eds_update_success: AtomicU64,
    pub eds_update_rejected: AtomicU64,
    pub lds_update_success: AtomicU64,
    pub lds_update_rejected: AtomicU64,
    pub rds_update_success: AtomicU64,
    pub rds_update_rejected: AtomicU64,
    pub cluster_added: AtomicU64,
    pub cluster_modified: AtomicU64,
    pub cluster_removed: AtomicU64,
    pub listener_added: AtomicU64,
    pub listener_modified: AtomicU64,
    pub listener_removed: AtomicU64,
}

#[derive(Default)]
struct Registry {
    clusters: BTreeMap<String, Arc<ClusterStats>>,
    http: BTreeMap<String, Arc<HttpStats>>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

pub fn server() -> &'static ServerStats {
    static S: OnceLock<ServerStats> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// The counters of a cluster, shared by every configuration that has it.
pub fn cluster(name: &str) -> Arc<ClusterStats> {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.clusters.entry(name.to_string()).or_default().clone()
}

/// Open downstream connections over every HCM (drain waits for this to reach 0).
pub fn active_connections() -> u64 {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.http
        .values()
        .map(|h| h.downstream_cx_active.load(Ordering::Relaxed))
        .sum()
}

pub fn http(stat_prefix: &str) -> Arc<HttpStats> {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.http.entry(stat_prefix.to_string()).or_default().clone()
}

/// One stat for output: Envoy's dotted name, its Prometheus name and tags, and a value.
pub enum Stat {
    Counter {
        name: String,
        prom: String,
        tags: Vec<(String, String)>,
        value: u64,
    },
    Gauge {
        name: String,
        prom: String,
        tags: Vec<(String, String)>,
        value: u64,
    },
    Histogram {
        name: String,
        prom: String,
        tags: Vec<(String, String)>,
        buckets: Vec<u64>,
        count: u64,
        sum: f64,
    },
}

const CLASSES: [&str; 5] = ["1", "2", "3", "4", "5"];

/// A gauge computed by the caller: (dotted name, Prometheus name, tags, value).
pub type GaugeValue = (String, String, Vec<(String, String)>, u64);

/// Every stat, with gauges computed from `gauges` (name, value) supplied by the caller.
pub fn collect(extra_gauges: Vec<GaugeValue>) -> Vec<Stat> {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, c) in &r.clusters {
        let tag = vec![("envoy_cluster_name".to_string(), name.clone())];
        let counter = |stat: &str, v: u64| Stat::Counter {
            name: format!("cluster.{name}.{stat}"),
            prom: format!("envoy_cluster_{stat}"),
            tags: tag.clone(),
            value: v,
        };
        out.push(counter("upstream_rq_total", load(&c.upstream_rq_total)));
        for (i, class) in CLASSES.iter().enumerate() {
            let mut t = tag.clone();
            t.push(("envoy_response_code_class".into(), class.to_string()));
            out.push(Stat::Counter {
                name: format!("cluster.{name}.upstream_rq_{class}xx"),
                prom: "envoy_cluster_upstream_rq_xx".into(),
                tags: t,
                value: load(&c.upstream_rq_class[i]),
            });
        }
        out.push(counter("upstream_rq_retry", load(&c.upstream_rq_retry)));
        out.push(counter(
            "upstream_rq_retry_overflow",
            load(&c.upstream_rq_retry_overflow),
        ));
        out.push(counter("upstream_rq_timeout", load(&c.upstream_rq_timeout)));
        out.push(counter(
            "upstream_rq_per_try_timeout",
            load(&c.upstream_rq_per_try_timeout),
        ));
        out.push(counter(
            "upstream_rq_pending_overflow",
            load(&c.upstream_rq_pending_overflow),
        ));
        out.push(counter(
            "upstream_cx_connect_fail",
            load(&c.upstream_cx_connect_fail),
        ));
        let (buckets, count, sum) = c.upstream_rq_time.read();
        out.push(Stat::Histogram {
            name: format!("cluster.{name}.upstream_rq_time"),
            prom: "envoy_cluster_upstream_rq_time".into(),
            tags: tag.clone(),
            buckets,
            count,
            sum,
        });
    }
    for (prefix, h) in &r.http {
        let tag = vec![("envoy_http_conn_manager_prefix".to_string(), prefix.clone())];
        out.push(Stat::Counter {
            name: format!("http.{prefix}.downstream_rq_total"),
            prom: "envoy_http_downstream_rq_total".into(),
            tags: tag.clone(),
            value: load(&h.downstream_rq_total),
        });
        for (i, class) in CLASSES.iter().enumerate() {
            let mut t = tag.clone();
            t.push(("envoy_response_code_class".into(), class.to_string()));
            out.push(Stat::Counter {
                name: format!("http.{prefix}.downstream_rq_{class}xx"),
                prom: "envoy_http_downstream_rq_xx".into(),
                tags: t,
                value: load(&h.downstream_rq_class[i]),
            });
        }
        for (name, value) in [
            (
                "downstream_cx_protocol_error",
                &h.downstream_cx_protocol_error,
            ),
            (
                "downstream_rq_failed_path_normalization",
                &h.downstream_rq_failed_path_normalization,
            ),
            (
                "downstream_rq_redirected_with_normalized_path",
                &h.downstream_rq_redirected_with_normalized_path,
            ),
        ] {
            out.push(Stat::Counter {
                name: format!("http.{prefix}.{name}"),
                prom: format!("envoy_http_{name}"),
                tags: tag.clone(),
                value: load(value),
            });
        }
        out.push(Stat::Gauge {
            name: format!("http.{prefix}.downstream_cx_active"),
            prom: "envoy_http_downstream_cx_active".into(),
            tags: tag.clone(),
            value: load(&h.downstream_cx_active),
        });
        let (buckets, count, sum) = h.downstream_rq_time.read();
        out.push(Stat::Histogram {
            name: format!("http.{prefix}.downstream_rq_time"),
            prom: "envoy_http_downstream_rq_time".into(),
            tags: tag,
            buckets,
            count,
            sum,
        });
    }
    let s = server();
    let plain = |name: &str, v: u64| Stat::Counter {
        name: name.to_string(),
        prom: format!("envoy_{}", name.replace('.', "_")),
        tags: vec![],
        value: v,
    };
    for (name, v) in [
        ("server.config_reload", &s.config_reload_success),
        ("server.config_reload_rejected", &s.config_reload_rejected),
        ("cluster_manager.cluster_added", &s.cluster_added),
        ("cluster_manager.cluster_modified", &s.cluster_modified),
        ("cluster_manager.cluster_removed", &s.cluster_removed),
        ("listener_manager.listener_added", &s.listener_added),
        ("listener_manager.listener_modified", &s.listener_modified),
        ("listener_manager.listener_removed", &s.listener_removed),
        ("cluster_manager.cds.update_success", &s.cds_update_success),
        (
            "cluster_manager.cds.update_rejected",
            &s.cds_update_rejected,
        ),
        ("cluster.eds.update_success", &s.eds_update_success),
        ("cluster.eds.update_rejected", &s.eds_update_rejected),
        ("listener_manager.lds.update_success", &s.lds_update_success),
        (
            "listener_manager.lds.update_rejected",
            &s.lds_update_rejected,
        ),
        ("http.rds.update_success", &s.rds_update_success),
        ("http.rds.update_rejected", &s.rds_update_rejected),
    ] {
        out.push(plain(name, load(v)));
    }
    out.push(Stat::Gauge {
        name: "control_plane.connected_state".into(),
        prom: "envoy_control_plane_connected_state".into(),
        tags: vec![],
        value: load(&s.control_plane_connected),
    });
    for (name, prom, tags, value) in extra_gauges {
        out.push(Stat::Gauge {
            name,
            prom,
            tags,
            value,
        });
    }
    out
}

/// Envoy's `/stats` text: `name: value`, sorted; histograms as `P50`-free summaries of
/// count and sum.
pub fn text(stats: &[Stat]) -> String {
    let mut lines: Vec<String> = stats
        .iter()
        .map(|s| match s {
            Stat::Counter { name, value, .. } | Stat::Gauge { name, value, .. } => {
                format!("{name}: {value}")
            }
            Stat::Histogram {
                name, count, sum, ..
            } => format!("{name}: count={count} sum={sum}"),
        })
        .collect();
    lines.sort();
    lines.join("\n") + "\n"
}

fn labels(tags: &[(String, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = tags
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Prometheus text exposition with Envoy's `envoy_` names and tags.
pub fn prometheus(stats: &[Stat]) -> String {
    let mut by_name: BTreeMap<&str, (&'static str, Vec<String>)> = BTreeMap::new();
    for s in stats {
        match s {
            Stat::Counter {
                prom, tags, value, ..
            } => {
                by_name
                    .entry(prom)
                    .or_insert(("counter", vec![]))
                    .1
                    .push(format!("{prom}{} {value}", labels(tags, None)));
            }
            Stat::Gauge {
                prom, tags, value, ..
            } => {
                by_name
                    .entry(prom)
                    .or_insert(("gauge", vec![]))
                    .1
                    .push(format!("{prom}{} {value}", labels(tags, None)));
            }
            Stat::Histogram {
                prom,
                tags,
                buckets,
                count,
                sum,
                ..
            } => {
                let e = by_name.entry(prom).or_insert(("histogram", vec![]));
                for (b, c) in BUCKETS_MS.iter().zip(buckets) {
                    e.1.push(format!(
                        "{prom}_bucket{} {c}",
                        labels(tags, Some(("le", b.to_string())))
                    ));
                }
                e.1.push(format!(
                    "{prom}_bucket{} {count}",
                    labels(tags, Some(("le", "+Inf".into())))
                ));
                e.1.push(format!("{prom}_sum{} {sum}", labels(tags, None)));
                e.1.push(format!("{prom}_count{} {count}", labels(tags, None)));
            }
        }
    }
    let mut out = String::new();
    for (name, (kind, lines)) in by_name {
        out.push_str(&format!("# TYPE {name} {kind}\n"));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_reads_cumulative_buckets_like_envoy() {
        let h = Histogram::default();
        for us in [300, 500, 900, 4_000, 7_200_000_000] {
            h.record(Duration::from_micros(us));
        }
        let (buckets, count, sum_ms) = h.read();
        // 0.5 ms holds 300 µs and 500 µs (bounds are inclusive); 1 ms adds 900 µs; 5 ms
        // adds 4 ms; the two-hour sample is above every bound and only in the count.
        assert_eq!(&buckets[..4], &[2, 3, 4, 4]);
        assert_eq!(buckets[BUCKETS_MS.len() - 1], 4);
        assert_eq!(count, 5);
        assert!((sum_ms - 7_200_005.7).abs() < 1e-6, "{sum_ms}");
    }
}
