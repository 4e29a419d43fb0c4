//! Request bodies reach the upstream exactly as the client framed them: chunked uploads as
//! curl sends them, 10 MB bodies chunked and with a content-length, with and without a
//! retry policy, and a body replayed on a retry. The upstream reads the raw bytes with its
//! own strict reader (tests/common/wire.rs). Runs through both HTTP engines
//! (`LEGATE_TEST_ENGINE`), and the framing is checked against Envoy's.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::wire::{WireRequest, WireUpstream};
use common::*;

/// A gateway in front of one wire upstream, with the route fields given.
fn gateway(upstream: &WireUpstream, route_extra: &str) -> (Legate, u16) {
    let port = free_port();
    let yaml = one_route_bootstrap(port, route_extra, &[upstream.port()], "");
    (Legate::start(&yaml, port), port)
}

/// Envoy 1.40 (the oracle) or legate on `yaml`, listening on `port`; stopped when dropped.
fn proxy(envoy: bool, yaml: &str, port: u16) -> Box<dyn std::any::Any> {
    if envoy {
        Box::new(Envoy::start(yaml, port))
    } else {
        Box::new(Legate::start(yaml, port))
    }
}

/// A body whose every byte position is recognisable (a shifted or cut body shows).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Writes `body` as a chunked request with chunks of irregular sizes (1 byte to 64 KiB)
/// and the given trailer lines (each ending in CRLF), then reads the whole response
/// (`connection: close`).
fn post_chunked(port: u16, body: &[u8], trailers: &str) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut wire =
        b"POST /upload HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let sizes = [1usize, 7, 4096, 65536, 333, 16384];
    let (mut at, mut i) = (0, 0);
    while at < body.len() {
        let n = sizes[i % sizes.len()].min(body.len() - at);
        wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        wire.extend_from_slice(&body[at..at + n]);
        wire.extend_from_slice(b"\r\n");
        at += n;
        i += 1;
    }
    wire.extend_from_slice(format!("0\r\n{trailers}\r\n").as_bytes());
    s.write_all(&wire).expect("send");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

fn post_with_length(port: u16, body: &[u8]) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(body).expect("send body");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

/// The one request the upstream received, with its framing as the client's was.
fn only_request(upstream: &WireUpstream) -> WireRequest {
    assert!(
        upstream.malformed().is_empty(),
        "{:?}",
        upstream.malformed()
    );
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 1, "requests upstream: {reqs:?}");
    reqs.into_iter().next().unwrap()
}

fn assert_chunked(req: &WireRequest, body: &[u8]) {
    assert_eq!(
        req.all("transfer-encoding"),
        ["chunked"],
        "{:?}",
        req.fields
    );
    assert!(req.field("content-length").is_none(), "{:?}", req.fields);
    assert_eq!(req.body.len(), body.len());
    assert!(req.body == body, "the body arrived altered");
}

/// curl's own chunked uploads: `-T -` (PUT from standard input) and a POST of
/// `--data-binary @-` with `Transfer-Encoding: chunked`, the report.
#[test]
fn curl_chunked_uploads_reach_the_upstream_whole() {
    let upstream = WireUpstream::start();
    let (_gw, port) = gateway(&upstream, "");
    let url = format!("http://127.0.0.1:{port}/up");
    let runs: [&[&str]; 2] = [
        &["-T", "-"],
        &["-H", "Transfer-Encoding: chunked", "--data-binary", "@-"],
    ];
    for (i, args) in runs.iter().enumerate() {
        let mut curl = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(*args)
            .arg(&url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        curl.stdin
            .take()
            .unwrap()
            .write_all(b"hello world")
            .unwrap();
        let out = curl.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "curl {args:?}");
        let reqs = upstream.requests();
        assert_eq!(reqs.len(), i + 1, "{reqs:?}");
        assert_chunked(&reqs[i], b"hello world");
    }
    assert!(upstream.malformed().is_empty());
}

#[test]
fn ten_megabytes_chunked_arrive_byte_identical_with_and_without_a_retry_policy() {
    let body = pattern(10 * 1024 * 1024);
    for route in ["", "retry_policy: {retry_on: 5xx, num_retries: 2}"] {
        let upstream = WireUpstream::start();
        let (_gw, port) = gateway(&upstream, route);
        let resp = post_chunked(port, &body, "");
        assert_eq!(resp.status, 200, "{route}");
        assert_chunked(&only_request(&upstream), &body);
    }
}

#[test]
fn ten_megabytes_with_a_content_length_arrive_byte_identical() {
    let body = pattern(10 * 1024 * 1024);
    for route in ["", "retry_policy: {retry_on: 5xx, num_retries: 2}"] {
        let upstream = WireUpstream::start();
        let (_gw, port) = gateway(&upstream, route);
        let resp = post_with_length(port, &body);
        assert_eq!(resp.status, 200, "{route}");
        let req = only_request(&upstream);
        assert_eq!(
            req.field("content-length"),
            Some(body.len().to_string().as_str())
        );
        assert!(req.field("transfer-encoding").is_none());
        assert!(req.body == body, "the body arrived altered");
    }
}

/// A retried request replays the chunked body it had (within the retry buffer).
#[test]
fn a_retry_replays_the_chunked_body() {
    let upstream = WireUpstream::scripted(|i| if i == 0 { 503 } else { 200 });
    let (_gw, port) = gateway(&upstream, "retry_policy: {retry_on: 5xx, num_retries: 1}");
    let body = pattern(20_000);
    let resp = post_chunked(port, &body, "");
    assert_eq!(resp.status, 200);
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for req in &reqs {
        assert_chunked(req, &body);
    }
}

/// The listener's `per_connection_buffer_limit_bytes` (32 KiB, as Envoy Gateway sets it)
/// bounds what is kept of a body for a retry: a longer body is sent once and the 503
/// answered, as Envoy gives up retrying it; bodies up to the limit are retried. Envoy and
/// legate on the same bootstrap, with content-length and chunked bodies.
#[test]
fn a_body_past_the_listener_buffer_limit_is_not_retried_as_in_envoy() {
    let sizes = [1_000usize, 32_768, 32_769, 50_000];
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let mut outcomes = Vec::new();
        for chunked in [false, true] {
            for &size in &sizes {
                let upstream = WireUpstream::scripted(|i| if i == 0 { 503 } else { 200 });
                let port = free_port();
                let yaml = one_route_bootstrap(
                    port,
                    "retry_policy: {retry_on: 5xx, num_retries: 1}",
                    &[upstream.port()],
                    "",
                )
                .replacen(
                    "  - name: main\n",
                    "  - name: main\n    per_connection_buffer_limit_bytes: 32768\n",
                    1,
                );
                let _proxy = proxy(envoy, &yaml, port);
                let body = pattern(size);
                let resp = if chunked {
                    post_chunked(port, &body, "")
                } else {
                    post_with_length(port, &body)
                };
                let reqs = upstream.requests();
                assert!(reqs.iter().all(|r| r.body == body), "a body was altered");
                outcomes.push((chunked, size, resp.status, reqs.len()));
            }
        }
        seen.push(outcomes);
    }
    assert_eq!(seen[0], seen[1], "envoy, then legate");
    assert!(seen[1].contains(&(false, 32_768, 200, 2)), "{:?}", seen[1]);
    assert!(seen[1].contains(&(false, 32_769, 503, 1)), "{:?}", seen[1]);
}

/// A chunked body that holds a whole request is data, not a second request (the bytes of a
/// dropped body used to be read as the next request on the connection).
#[test]
fn a_request_inside_a_chunked_body_stays_body() {
    let upstream = WireUpstream::start();
    let (_gw, port) = gateway(&upstream, "");
    let inner = b"GET /smuggled HTTP/1.1\r\nhost: gw\r\n\r\n";
    let resp = post_chunked(port, inner, "");
    assert_eq!(resp.status, 200);
    let req = only_request(&upstream);
    assert_eq!(req.line, "POST /upload HTTP/1.1");
    assert_chunked(&req, inner);
}

/// What Envoy 1.40 forwards for the same chunked upload: the same framing fields, the
/// same body, and the same trailers (a trailer field is sent, which Envoy's HTTP/1 codec
/// drops by default).
#[test]
fn chunked_upload_framing_matches_envoy() {
    let body = pattern(100_000);
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let upstream = WireUpstream::start();
        let port = free_port();
        let yaml = one_route_bootstrap(port, "", &[upstream.port()], "");
        let _proxy = proxy(envoy, &yaml, port);
        let resp = post_chunked(port, &body, "x-checksum: 1234\r\n");
        assert_eq!(resp.status, 200, "envoy: {envoy}");
        let req = only_request(&upstream);
        let framing: Vec<_> = req
            .fields
            .iter()
            .filter(|(k, _)| k == "transfer-encoding" || k == "content-length")
            .cloned()
            .collect();
        seen.push((
            req.line.clone(),
            framing,
            req.body == body,
            req.trailers.clone(),
        ));
    }
    assert_eq!(seen[0], seen[1], "envoy, then legate");
}

/// A body still arriving when the next pipelined request comes in the same write: both
/// requests reach the upstream whole and both are answered, as through Envoy. The pause
/// between writes is the input's shape (the body split across two reads), not a wait.
#[test]
fn a_body_finished_in_the_same_write_as_the_next_request_is_served_as_envoy_does() {
    let next = "GET /next HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n";
    let shapes: [(&str, &str, String); 2] = [
        (
            "content-length",
            "POST /first HTTP/1.1\r\nhost: gw\r\ncontent-length: 10\r\n\r\nhello",
            format!("world{next}"),
        ),
        (
            "chunked",
            "POST /first HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            format!("5\r\nworld\r\n0\r\n\r\n{next}"),
        ),
    ];
    for (shape, first, rest) in &shapes {
        let mut seen = Vec::new();
        for envoy in [true, false] {
            let upstream = WireUpstream::start();
            let port = free_port();
            let yaml = one_route_bootstrap(port, "", &[upstream.port()], "");
            let _proxy = proxy(envoy, &yaml, port);
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(first.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(rest.as_bytes()).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf);
            // Responses follow each other with no line between (the upstream's bodies
            // carry no status-like text).
            let statuses: Vec<&str> = text
                .match_indices("HTTP/1.1 ")
                .filter_map(|(at, _)| text.get(at + 9..at + 12))
                .collect();
            assert!(
                upstream.malformed().is_empty(),
                "{:?}",
                upstream.malformed()
            );
            let reqs: Vec<(String, Vec<u8>)> = upstream
                .requests()
                .into_iter()
                .map(|r| (r.line, r.body))
                .collect();
            seen.push((statuses.join(","), reqs));
        }
        assert_eq!(seen[0].0, "200,200", "envoy, {shape}");
        assert_eq!(seen[0], seen[1], "{shape}: envoy, then legate");
    }
}

/// The status line the client gets, whatever the upstream wrote (an HTTP/1.0 version, a
/// reason phrase of its own), as Envoy writes it.
#[test]
fn status_lines_are_written_as_envoy_writes_them() {
    let upstream = raw_upstream();
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let port = free_port();
        let yaml = one_route_bootstrap(port, "", &[upstream], "");
        let _proxy = proxy(envoy, &yaml, port);
        let mut lines = Vec::new();
        for path in ["/plain", "/reason", "/http10"] {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf).to_string();
            lines.push(text.split("\r\n").next().unwrap_or_default().to_string());
        }
        seen.push(lines);
    }
    assert_eq!(seen[0], seen[1], "envoy, then legate");
}
