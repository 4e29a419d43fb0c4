//! Stats with Envoy's names, exact after known traffic, and Prometheus output that a real
//! parser reads.

mod common;

use common::*;

fn scrape(admin: u16) -> prometheus_parse::Scrape {
    let body = get(admin, "/stats/prometheus", "admin").body;
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {metric} {labels:?}"))
}

#[test]
fn ten_requests_three_retried_counted_exactly() {
    // The upstream fails requests 0, 2 and 4 (each retried once, to success).
    let flaky = ScriptedUpstream::start("flaky", |i| {
        Behavior::Status(if i < 6 && i % 2 == 0 { 503 } else { 200 })
    });
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\n{}",
        one_route_bootstrap(port, "retry_policy: {retry_on: 5xx}", &[flaky.port()], "")
    );
    let _l = Legate::start(&yaml, port);
    wait_for_port(admin, None);
    for _ in 0..10 {
        assert_eq!(get(port, "/", "w").status, 200);
    }
    assert_eq!(get(port, "/nothing", "other").status, 200);
    // The last response is counted, and its connection closed, just after the client has it.
    eventually(
        5,
        "the last request logged and its connection closed",
        || {
            let text = get(admin, "/stats", "admin").body;
            text.contains("http.main.downstream_rq_2xx: 11")
                && text.contains("http.main.downstream_cx_active: 0")
        },
    );
    let text = get(admin, "/stats", "admin").body;
    for line in [
        "cluster.c.upstream_rq_total: 14",
        "cluster.c.upstream_rq_retry: 3",
        "cluster.c.upstream_rq_5xx: 3",
        "cluster.c.upstream_rq_2xx: 11",
        "cluster.c.membership_total: 1",
        "cluster.c.membership_healthy: 1",
        "http.main.downstream_rq_total: 11",
        "http.main.downstream_rq_2xx: 11",
        "http.main.downstream_cx_active: 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing '{line}' in:\n{text}"
        );
    }

    let s = scrape(admin);
    assert_eq!(
        value(
            &s,
            "envoy_cluster_upstream_rq_retry",
            &[("envoy_cluster_name", "c")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "envoy_cluster_upstream_rq_total",
            &[("envoy_cluster_name", "c")]
        ),
        14.0
    );
    assert_eq!(
        value(
            &s,
            "envoy_cluster_upstream_rq_xx",
            &[
                ("envoy_cluster_name", "c"),
                ("envoy_response_code_class", "5")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "envoy_http_downstream_rq_xx",
            &[
                ("envoy_http_conn_manager_prefix", "main"),
                ("envoy_response_code_class", "2")
            ]
        ),
        11.0
    );
    let hist = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "envoy_cluster_upstream_rq_time"
                && x.labels.get("envoy_cluster_name") == Some("c")
        })
        .expect("upstream_rq_time histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map(|b| b.count);
            assert_eq!(inf, Some(14.0));
        }
        other => panic!("not a histogram: {other:?}"),
    }

    // An open keep-alive connection is an active downstream connection.
    let mut held = KeepAlive::connect(port).unwrap();
    assert_eq!(held.get("/", "w").unwrap().status, 200);
    assert!(get(admin, "/stats", "admin")
        .body
        .lines()
        .any(|l| l == "http.main.downstream_cx_active: 1"));
    drop(held);
}

#[test]
fn cluster_and_listener_changes_are_counted_across_reloads() {
    let a = Upstream::start("a");
    let (port, port2, admin) = (free_port(), free_port(), free_port());
    let admin_yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\n"
    );
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let first = format!(
        "{admin_yaml}{}",
        bootstrap(
            &[listener_yaml("main", port, route, "")],
            &[
                cluster_yaml("c", &[a.port()], ""),
                cluster_yaml("old", &[a.port()], "")
            ],
        )
    );
    let l = Legate::start(&first, port);
    wait_for_port(admin, None);
    let counts = || {
        let s = scrape(admin);
        [
            "envoy_cluster_manager_cluster_added",
            "envoy_cluster_manager_cluster_modified",
            "envoy_cluster_manager_cluster_removed",
            "envoy_listener_manager_listener_added",
            "envoy_listener_manager_listener_modified",
            "envoy_listener_manager_listener_removed",
        ]
        .map(|m| value(&s, m, &[]) as u64)
    };
    assert_eq!(counts(), [2, 0, 0, 1, 0, 0]);
    let s = scrape(admin);
    assert_eq!(value(&s, "envoy_server_live", &[]), 1.0);
    assert_eq!(value(&s, "envoy_server_state", &[]), 0.0);

    // Same file again: nothing changed.
    l.signal("HUP");
    eventually(10, "reload counted", || {
        value(&scrape(admin), "envoy_server_config_reload", &[]) == 1.0
    });
    assert_eq!(counts(), [2, 0, 0, 1, 0, 0]);

    // `c` modified, `old` removed, `new` added; `main` modified, `second` added.
    let second = format!(
        "{admin_yaml}{}",
        bootstrap(
            &[
                listener_yaml("main", port, route, "via: legate-test"),
                listener_yaml("second", port2, route, ""),
            ],
            &[
                cluster_yaml("c", &[a.port()], "lb_policy: RANDOM"),
                cluster_yaml("new", &[a.port()], ""),
            ],
        )
    );
    l.rewrite_config(&second);
    l.signal("HUP");
    eventually(10, "second reload counted", || {
        value(&scrape(admin), "envoy_server_config_reload", &[]) == 2.0
    });
    assert_eq!(counts(), [3, 1, 1, 2, 1, 0]);
    assert_eq!(get(port2, "/", "x").status, 200);
}
