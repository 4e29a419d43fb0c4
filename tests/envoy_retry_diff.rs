//! Retry scenarios through Envoy 1.40 and through legate: fresh scripted upstreams for
//! each gateway, the same requests, and the same outcome required (statuses, bodies and
//! how many tries each upstream got).

mod common;

use common::*;

type Script = fn(usize) -> Behavior;

struct Scenario {
    name: &'static str,
    route: &'static str,
    upstreams: Vec<Script>,
    /// Extra request headers.
    headers: Vec<(&'static str, &'static str)>,
    requests: usize,
    /// Compare only statuses (for bodies carrying OS error text).
    status_only: bool,
    /// Compare how many tries each upstream got (not where round robin starts).
    compare_tries: bool,
}

#[derive(Debug, PartialEq)]
struct Outcome {
    answers: Vec<(u16, Option<String>)>,
    tries: Vec<usize>,
}

fn run(s: &Scenario, envoy: bool) -> Outcome {
    let ups: Vec<ScriptedUpstream> = s
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, f)| ScriptedUpstream::start(&format!("u{i}"), *f))
        .collect();
    let mut ports: Vec<u16> = ups.iter().map(|u| u.port()).collect();
    if s.name.contains("dead") {
        ports.insert(0, free_port());
    }
    let port = free_port();
    let yaml = one_route_bootstrap(port, s.route, &ports, "");
    let _guard: Box<dyn std::any::Any> = if envoy {
        Box::new(Envoy::start(&yaml, port))
    } else {
        Box::new(Legate::start(&yaml, port))
    };
    let mut answers = Vec::new();
    for _ in 0..s.requests {
        let r = request(port, "GET", "/", "w", &s.headers);
        answers.push((r.status, (!s.status_only).then_some(r.body)));
    }
    Outcome {
        answers,
        tries: ups.iter().map(|u| u.count()).collect(),
    }
}

fn scenarios() -> Vec<Scenario> {
    let sc = |name, route, upstreams: Vec<Script>, requests| Scenario {
        name,
        route,
        upstreams,
        headers: vec![],
        requests,
        status_only: false,
        compare_tries: true,
    };
    vec![
        sc("flaky every other, 5xx", "retry_policy: {retry_on: 5xx}", vec![|i| Behavior::Status(if i % 2 == 0 { 503 } else { 200 })], 6),
        sc("no policy", "", vec![|_| Behavior::Status(503)], 2),
        sc("exhausted gateway-error", "retry_policy: {retry_on: gateway-error, num_retries: 2}", vec![|i| Behavior::Status(502 + (i % 3) as u16)], 2),
        sc("gateway-error ignores 500", "retry_policy: {retry_on: gateway-error, num_retries: 2}", vec![|_| Behavior::Status(500)], 2),
        sc("retriable-4xx", "retry_policy: {retry_on: retriable-4xx, num_retries: 1}", vec![|i| Behavior::Status(if i == 0 { 409 } else { 200 })], 2),
        sc("retriable-status-codes", "retry_policy: {retry_on: retriable-status-codes, retriable_status_codes: [418], num_retries: 3}", vec![|i| Behavior::Status(if i < 2 { 418 } else { 200 })], 2),
        sc("reset retried on reset", "retry_policy: {retry_on: reset}", vec![|i| if i % 2 == 0 { Behavior::Close } else { Behavior::Status(200) }], 4),
        sc("reset not a connect failure", "retry_policy: {retry_on: connect-failure, num_retries: 3}", vec![|_| Behavior::Close], 1),
        sc("reset retried on 5xx", "retry_policy: {retry_on: 5xx, num_retries: 1}", vec![|_| Behavior::Close], 1),
        sc("partial body not retried", "retry_policy: {retry_on: '5xx,reset', num_retries: 2}", vec![|_| Behavior::PartialBody], 1),
        sc("per-try timeout", "timeout: 5s, retry_policy: {retry_on: 5xx, per_try_timeout: 0.3s}", vec![|i| if i == 0 { Behavior::Sleep(2000) } else { Behavior::Status(200) }], 1),
        sc("route timeout over retries", "timeout: 0.5s, retry_policy: {retry_on: 5xx, num_retries: 5, per_try_timeout: 0.3s}", vec![|_| Behavior::Sleep(2000)], 1),
        Scenario {
            compare_tries: false,
            ..sc("previous hosts", "retry_policy: {retry_on: 5xx, num_retries: 1, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}", vec![|_| Behavior::Status(503), |_| Behavior::Status(200)], 4)
        },
        Scenario {
            headers: vec![("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")],
            ..sc("retry headers", "", vec![|_| Behavior::Status(500)], 1)
        },
        Scenario {
            headers: vec![("x-envoy-max-retries", "2"), ("x-forwarded-for", "10.0.0.1")],
            ..sc("max-retries header", "retry_policy: {retry_on: 5xx}", vec![|_| Behavior::Status(500)], 1)
        },
        Scenario {
            headers: vec![("x-envoy-retry-on", "retriable-4xx"), ("x-envoy-internal", "true")],
            ..sc("retry-on header adds to policy", "retry_policy: {retry_on: 5xx}", vec![|i| Behavior::Status(if i == 0 { 409 } else { 200 })], 1)
        },
        Scenario {
            status_only: true,
            compare_tries: false,
            ..sc("dead endpoint, connect-failure", "retry_policy: {retry_on: connect-failure, num_retries: 2, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}", vec![|_| Behavior::Status(200)], 4)
        },
    ]
}

#[test]
fn legate_retries_like_envoy() {
    let mut differences = Vec::new();
    for s in scenarios() {
        let mut e = run(&s, true);
        let mut l = run(&s, false);
        if !s.compare_tries {
            e.tries.clear();
            l.tries.clear();
        }
        if e != l {
            differences.push(format!("{}:\n  envoy:  {e:?}\n  legate: {l:?}", s.name));
        }
    }
    assert!(
        differences.is_empty(),
        "retry outcomes differ from Envoy:\n{}",
        differences.join("\n")
    );
}
