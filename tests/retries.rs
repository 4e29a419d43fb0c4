//! Retry policy end to end, against upstreams that misbehave on purpose.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn start(route_extra: &str, ports: &[u16]) -> (Legate, u16) {
    let port = free_port();
    let l = Legate::start(&one_route_bootstrap(port, route_extra, ports, ""), port);
    (l, port)
}

#[test]
fn retries_5xx_on_another_host_and_the_client_sees_only_the_final_answer() {
    let bad = ScriptedUpstream::start("bad", |_| Behavior::Status(503));
    let good = ScriptedUpstream::start("good", |_| Behavior::Status(200));
    let (_l, port) = start(
        "retry_policy: {retry_on: 5xx, num_retries: 2, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}",
        &[bad.port(), good.port()],
    );
    for _ in 0..10 {
        let r = get(port, "/", "w");
        assert_eq!((r.status, r.upstream()), (200, Some("good")));
    }
    assert_eq!(good.count(), 10);
    assert!(
        bad.count() >= 1,
        "round robin sends some first tries to the bad host"
    );
}

#[test]
fn without_a_retry_policy_the_5xx_goes_to_the_client() {
    let bad = ScriptedUpstream::start("bad", |_| Behavior::Status(503));
    let (_l, port) = start("", &[bad.port()]);
    let r = get(port, "/", "w");
    assert_eq!((r.status, r.body.as_str()), (503, "bad\n"));
    assert_eq!(bad.count(), 1);
}

#[test]
fn exhausted_retries_return_the_last_upstream_response() {
    let bad = ScriptedUpstream::start("bad", |i| Behavior::Status(if i < 2 { 502 } else { 503 }));
    let (_l, port) = start(
        "retry_policy: {retry_on: gateway-error, num_retries: 2}",
        &[bad.port()],
    );
    let r = get(port, "/", "w");
    assert_eq!((r.status, r.body.as_str()), (503, "bad\n"));
    assert_eq!(bad.count(), 3, "one try and two retries");
}

#[test]
fn flaky_upstream_failing_every_other_request_is_hidden() {
    let flaky = ScriptedUpstream::start("flaky", |i| {
        Behavior::Status(if i % 2 == 0 { 503 } else { 200 })
    });
    let (_l, port) = start("retry_policy: {retry_on: 5xx}", &[flaky.port()]);
    for _ in 0..10 {
        assert_eq!(get(port, "/", "w").status, 200);
    }
    assert_eq!(flaky.count(), 20);
}

#[test]
fn connect_failures_are_retried_on_connect_failure() {
    let dead = free_port();
    let good = ScriptedUpstream::start("good", |_| Behavior::Status(200));
    let (_l, port) = start(
        "retry_policy: {retry_on: connect-failure, num_retries: 3, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}",
        &[dead, good.port()],
    );
    for _ in 0..6 {
        assert_eq!(get(port, "/", "w").status, 200);
    }
    // Without the policy a dead endpoint is a 503 with Envoy's message.
    let (_l2, port2) = start("", &[dead]);
    let r = get(port2, "/", "w");
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("reset reason: remote connection failure"),
        "{}",
        r.body
    );
}

#[test]
fn resets_before_headers_are_retried_on_reset_but_not_on_connect_failure() {
    let resetting = ScriptedUpstream::start("resetting", |i| {
        if i % 2 == 0 {
            Behavior::Close
        } else {
            Behavior::Status(200)
        }
    });
    let (_l, port) = start("retry_policy: {retry_on: reset}", &[resetting.port()]);
    for _ in 0..4 {
        assert_eq!(get(port, "/", "w").status, 200);
    }
    assert_eq!(resetting.count(), 8);

    let always_reset = ScriptedUpstream::start("reset", |_| Behavior::Close);
    let (_l2, port2) = start(
        "retry_policy: {retry_on: connect-failure, num_retries: 3}",
        &[always_reset.port()],
    );
    let r = get(port2, "/", "w");
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("reset reason: connection termination"),
        "{}",
        r.body
    );
    assert_eq!(always_reset.count(), 1, "a reset is not a connect failure");
}

#[test]
fn nothing_is_retried_once_the_response_has_started() {
    let partial = ScriptedUpstream::start("partial", |_| Behavior::PartialBody);
    let (_l, port) = start(
        "retry_policy: {retry_on: '5xx,reset', num_retries: 3}",
        &[partial.port()],
    );
    let r = get(port, "/", "w");
    assert_eq!(r.status, 200, "the header already went downstream");
    assert!(r.body.len() < 100, "the body is cut short: {:?}", r.body);
    assert_eq!(partial.count(), 1);
}

#[test]
fn per_try_timeout_moves_on_to_another_try() {
    let slow_then_fast = ScriptedUpstream::start("s", |i| {
        if i == 0 {
            Behavior::Sleep(3000)
        } else {
            Behavior::Status(200)
        }
    });
    let (_l, port) = start(
        "timeout: 5s, retry_policy: {retry_on: 5xx, per_try_timeout: 0.2s}",
        &[slow_then_fast.port()],
    );
    let t = Instant::now();
    let r = get(port, "/", "w");
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(slow_then_fast.count(), 2);
}

#[test]
fn the_route_timeout_bounds_all_tries() {
    let slow = ScriptedUpstream::start("slow", |_| Behavior::Sleep(3000));
    let (_l, port) = start(
        "timeout: 0.5s, retry_policy: {retry_on: 5xx, num_retries: 20, per_try_timeout: 0.2s}",
        &[slow.port()],
    );
    let t = Instant::now();
    let r = get(port, "/", "w");
    assert_eq!(
        (r.status, r.body.as_str()),
        (504, "upstream request timeout")
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        slow.count() <= 3,
        "{} tries in 0.5s of 0.2s tries",
        slow.count()
    );
}

#[test]
fn back_off_spacing_is_jittered_and_bounded() {
    let bad = ScriptedUpstream::start("bad", |_| Behavior::Status(503));
    let (_l, port) = start(
        "retry_policy: {retry_on: 5xx, num_retries: 3, retry_back_off: {base_interval: 0.1s, max_interval: 0.3s}}",
        &[bad.port()],
    );
    let mut gaps = Vec::new();
    for _ in 0..4 {
        let before = bad.count();
        assert_eq!(get(port, "/", "w").status, 503);
        let times = bad.times();
        assert_eq!(times.len() - before, 4);
        for (i, w) in times[before..].windows(2).enumerate() {
            let gap = w[1] - w[0];
            // Retry k waits below (2^k - 1) × 100ms, capped at 300ms.
            let ceiling = [100u64, 300, 300][i];
            assert!(
                gap < Duration::from_millis(ceiling + 60),
                "retry {} waited {gap:?}",
                i + 1
            );
            gaps.push(gap);
        }
    }
    let total: Duration = gaps.iter().sum();
    assert!(
        total > Duration::from_millis(100),
        "12 jittered waits should not all be ~0: {gaps:?}"
    );
}

#[test]
fn request_headers_shape_retries_only_for_internal_clients() {
    let bad = ScriptedUpstream::start("bad", |_| Behavior::Status(500));
    let headers = [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")];
    // By default no client is internal (as in Envoy >= 1.33): the headers are dropped.
    let (_l, port) = start("", &[bad.port()]);
    assert_eq!(request(port, "GET", "/", "w", &headers).status, 500);
    assert_eq!(bad.count(), 1);

    let port = free_port();
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let hcm = "use_remote_address: true\ninternal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.0, prefix_len: 8}]}";
    let yaml = bootstrap(
        &[listener_yaml("main", port, route, hcm)],
        &[cluster_yaml("c", &[bad.port()], "")],
    );
    let _l2 = Legate::start(&yaml, port);
    assert_eq!(request(port, "GET", "/", "w", &headers).status, 500);
    assert_eq!(
        bad.count(),
        4,
        "an internal client's x-envoy-retry-on is obeyed: 1 + 2 retries"
    );
    let seen = bad.seen();
    assert!(
        seen.iter().all(|s| s.header("x-envoy-retry-on").is_none()),
        "consumed, not forwarded"
    );
    assert_eq!(seen[3].header("x-envoy-internal"), Some("true"));
}

#[test]
fn attempt_counts_and_replayed_bodies() {
    let flaky = ScriptedUpstream::start("flaky", |i| {
        Behavior::Status(if i == 0 { 503 } else { 200 })
    });
    let port = free_port();
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  include_request_attempt_count: true\n  include_attempt_count_in_response: true\n  retry_policy: {retry_on: 5xx}\n  request_headers_to_add: [{header: {key: x-once, value: v}}]\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let yaml = bootstrap(
        &[listener_yaml("main", port, route, "")],
        &[cluster_yaml("c", &[flaky.port()], "")],
    );
    let _l = Legate::start(&yaml, port);
    let r = request_with_body(port, "POST", "/upload", "w", &[], "the request body");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-envoy-attempt-count"), Some("2"));
    let seen = flaky.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-envoy-attempt-count"), Some("1"));
    assert_eq!(seen[1].header("x-envoy-attempt-count"), Some("2"));
    assert_eq!(
        seen[1].body, "the request body",
        "the body is replayed on the retry"
    );
    assert_eq!(
        seen[1].headers["x-once"],
        ["v"],
        "header edits are not applied twice"
    );
}
