//! Health checks, outlier detection and circuit breakers, end to end.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const HC: &str = "health_checks:\n- timeout: 0.5s\n  interval: 0.1s\n  no_traffic_interval: 0.1s\n  unhealthy_threshold: 2\n  healthy_threshold: 1\n  http_health_check: {path: /healthz}";

fn counts(port: u16, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let r = get(port, "/", "w");
        let who = if r.status == 200 {
            r.upstream().unwrap_or("?").to_string()
        } else {
            format!("status {}", r.status)
        };
        *m.entry(who).or_default() += 1;
    }
    m
}

#[test]
fn failing_health_checks_take_a_host_out_and_passing_ones_bring_it_back() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    b.set_health(503);
    let port = free_port();
    let _l = Legate::start(
        &one_route_bootstrap(port, "", &[a.port(), b.port()], HC),
        port,
    );
    // b never passed a check, so it never gets traffic.
    assert_eq!(counts(port, 20).get("a"), Some(&20));

    b.set_health(200);
    eventually(5, "b back in rotation", || {
        counts(port, 4).contains_key("b")
    });
    b.set_health(500);
    eventually(5, "b out again", || counts(port, 10).get("a") == Some(&10));
}

#[test]
fn panic_threshold_spreads_over_all_hosts_when_too_few_are_healthy() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    a.set_health(503);
    b.set_health(503);
    let port = free_port();
    let _l = Legate::start(
        &one_route_bootstrap(port, "", &[a.port(), b.port()], HC),
        port,
    );
    // 0% healthy is below the default 50% panic threshold: Envoy ignores health.
    let c = counts(port, 10);
    assert_eq!(
        c.get("a").unwrap_or(&0) + c.get("b").unwrap_or(&0),
        10,
        "{c:?}"
    );

    let port2 = free_port();
    let no_panic = format!("{HC}\ncommon_lb_config: {{healthy_panic_threshold: {{value: 0}}}}");
    let _l2 = Legate::start(
        &one_route_bootstrap(port2, "", &[a.port(), b.port()], &no_panic),
        port2,
    );
    let r = get(port2, "/", "w");
    assert_eq!((r.status, r.body.as_str()), (503, "no healthy upstream"));
}

#[test]
fn priorities_fail_over_by_health() {
    let primary = Upstream::start("primary");
    let backup = Upstream::start("backup");
    let port = free_port();
    let cluster = format!(
        r#"
  - name: c
    connect_timeout: 1s
{}
    load_assignment:
      cluster_name: c
      endpoints:
      - priority: 0
        lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}
      - priority: 1
        lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}
"#,
        indent(HC, 4),
        primary.port(),
        backup.port()
    );
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let _l = Legate::start(
        &bootstrap(&[listener_yaml("main", port, route, "")], &[cluster]),
        port,
    );
    assert_eq!(counts(port, 5).get("primary"), Some(&5));
    primary.set_health(503);
    eventually(5, "traffic on the backup priority", || {
        counts(port, 5).get("backup") == Some(&5)
    });
    primary.set_health(200);
    eventually(5, "back on the primary", || {
        counts(port, 5).get("primary") == Some(&5)
    });
}

#[test]
fn tcp_health_check_finds_a_dead_port() {
    let a = Upstream::start("a");
    let dead = free_port();
    let port = free_port();
    let tcp = "health_checks:\n- timeout: 0.3s\n  interval: 0.1s\n  no_traffic_interval: 0.1s\n  unhealthy_threshold: 1\n  healthy_threshold: 1\n  tcp_health_check: {}";
    let _l = Legate::start(&one_route_bootstrap(port, "", &[a.port(), dead], tcp), port);
    assert_eq!(
        counts(port, 10).get("a"),
        Some(&10),
        "no request goes to the dead port"
    );
}

#[test]
fn outlier_detection_ejects_a_failing_host_and_lets_it_back() {
    let good = ScriptedUpstream::start("good", |_| Behavior::Status(200));
    let bad = ScriptedUpstream::start("bad", |_| Behavior::Status(500));
    let port = free_port();
    let od = "outlier_detection: {consecutive_5xx: 3, interval: 0.2s, base_ejection_time: 0.6s, max_ejection_percent: 50}";
    let _l = Legate::start(
        &one_route_bootstrap(port, "", &[good.port(), bad.port()], od),
        port,
    );
    // Round robin: the bad host answers every other request until its third 500.
    for _ in 0..6 {
        get(port, "/", "w");
    }
    assert_eq!(bad.count(), 3);
    let before = bad.count();
    for _ in 0..10 {
        assert_eq!(
            get(port, "/", "w").status,
            200,
            "ejected host gets no traffic"
        );
    }
    assert_eq!(bad.count(), before);
    // After base_ejection_time (and the next interval) it is back.
    eventually(5, "bad host unejected", || {
        get(port, "/", "w");
        bad.count() > before
    });
}

#[test]
fn max_requests_circuit_breaker_answers_503_overloaded() {
    let slow = ScriptedUpstream::start("slow", |_| Behavior::Sleep(800));
    let port = free_port();
    let cb = "circuit_breakers: {thresholds: [{max_requests: 1}]}";
    let _l = Legate::start(&one_route_bootstrap(port, "", &[slow.port()], cb), port);
    let first = std::thread::spawn(move || get(port, "/", "w"));
    eventually(5, "first request in flight", || slow.count() == 1);
    let r = get(port, "/", "w");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
    assert!(r.body.contains("overflow"), "{}", r.body);
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(get(port, "/", "w").status, 200, "the slot is free again");
}

#[test]
fn health_survives_a_reload() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let port = free_port();
    let yaml = one_route_bootstrap(port, "", &[a.port(), b.port()], HC);
    let legate = Legate::start(&yaml, port);
    b.set_health(503);
    eventually(5, "b unhealthy", || counts(port, 6).get("a") == Some(&6));
    // Same cluster, new route timeout: reload must not make b healthy again, even briefly.
    legate.rewrite_config(&one_route_bootstrap(
        port,
        "timeout: 7s",
        &[a.port(), b.port()],
        HC,
    ));
    let before = b.count();
    legate.signal("HUP");
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline {
        assert_eq!(get(port, "/", "w").upstream(), Some("a"));
    }
    assert_eq!(b.count(), before);
    assert_eq!(
        a.last().header("x-envoy-expected-rq-timeout-ms"),
        Some("7000"),
        "the new config is in use"
    );
}

/// The issue's proof: one of three endpoints dies under steady load, with retries and
/// health checks on, and no request is lost.
#[test]
fn no_request_is_lost_when_an_endpoint_dies_under_load() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let c = Upstream::start("c");
    let port = free_port();
    // host_selection_retry_max_attempts: with few reselections, four clients advancing the
    // shared round robin can land a request's retries on the dead endpoint again before
    // health checking removes it (seen once in ~20,000 requests with a single pick).
    let route = "retry_policy: {retry_on: '5xx,reset,connect-failure', num_retries: 3, host_selection_retry_max_attempts: 3, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}";
    // Envoy's default allows 3 retries in flight per cluster; 4 clients may need 4.
    let cluster_extra = format!("{HC}\ncircuit_breakers: {{thresholds: [{{max_retries: 16}}]}}");
    let _l = Legate::start(
        &one_route_bootstrap(port, route, &[a.port(), b.port(), c.port()], &cluster_extra),
        port,
    );
    let failures = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let stop_at = Instant::now() + Duration::from_secs(3);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (failures, total) = (failures.clone(), total.clone());
            std::thread::spawn(move || {
                while Instant::now() < stop_at {
                    let r = get(port, "/", "w");
                    total.fetch_add(1, Ordering::Relaxed);
                    if r.status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {} {}", r.status, r.body);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    drop(c);
    for w in workers {
        w.join().unwrap();
    }
    let total = total.load(Ordering::Relaxed);
    eprintln!(
        "requests: {total}, failed: {}",
        failures.load(Ordering::Relaxed)
    );
    assert!(total > 100, "the load ran: {total} requests");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests lost out of {total}"
    );
}
