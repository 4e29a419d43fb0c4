//! Raw HTTP/1.1 from the RFCs and from published request-smuggling research, sent byte
//! for byte through Envoy 1.40 and through legate (`LEGATE_TEST_ENGINE` picks the engine),
//! each in front of an upstream that logs exactly the requests it read
//! (tests/common/wire.rs).
//!
//! A case passes when legate is at least as safe as Envoy: it forwards nothing Envoy did
//! not forward, and refuses with a 4xx where Envoy does; and when Envoy forwards valid
//! traffic, legate forwards the same requests with the same bodies and answers alike.
//!
//! Classes (RFC 9112 sections, and the research they come from): CL.TE and TE.CL
//! (§6.1, §6.3; Linhart et al. 2005, Kettle 2019), TE.TE obfuscations (Kettle 2019),
//! content-length forms (§6.3, RFC 9110 §8.6), chunk syntax (§7.1; Kettle 2021, "funky
//! chunks" 2025), request line and target (§3), field syntax (§5, RFC 9110 §5.5), Host
//! (RFC 9110 §7.2), pipelining (§9.3), Expect (RFC 9110 §10.1.1).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::wire::WireUpstream;
use common::*;

/// What one case did: the statuses the client read, in order, and the requests the
/// upstream read (request line with the Host it carried, and body).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    statuses: Vec<u16>,
    upstream: Vec<(String, Vec<u8>)>,
}

const H: &str = "Host: example.com\r\n";

/// The cases RFC 9112 and RFC 9110 call valid (the rest break a MUST, or a grammar).
const VALID: &[&str] = &[
    r#"te: "Transfer-Encoding: chunked""#,
    r#"te: "Transfer-Encoding: Chunked""#,
    r#"te: "Transfer-Encoding: CHUNKED""#,
    r#"te: "Transfer-Encoding:chunked""#,
    r#"te: "Transfer-Encoding:  chunked  ""#,
    r#"te: "Transfer-Encoding:\tchunked""#,
    r#"content-length "5""#,
    r#"content-length "05""#,
    r#"content-length " 5 ""#,
    r#"content-length "0""#,
    "content-length then a pipelined request",
    "chunked: valid",
    "chunked: two chunks",
    "chunked: uppercase hex",
    "chunked: leading zeros",
    "chunked: extension",
    "chunked: quoted extension",
    "chunked: extension, BWS",
    "chunked: trailer",
    "chunked: empty body",
    "chunked: chunk then a pipelined request",
    r#"line "GET / HTTP/1.1""#,
    r#"line "GET /a/b?c=d&e HTTP/1.1""#,
    r#"line "GET /%20 HTTP/1.1""#,
    r#"line "OPTIONS * HTTP/1.1""#,
    r#"line "GET http://example.com/abs HTTP/1.1""#,
    r#"line "GET http://other.example/abs HTTP/1.1""#,
    r#"line "GET HTTP://example.com/abs HTTP/1.1""#,
    r#"host "Host: example.com:80\r\n""#,
    r#"host "Host: [::1]:80\r\n""#,
    r#"host "Host: 127.0.0.1\r\n""#,
    r#"host "Host: \r\n""#,
    r#"field "X-Ok: value""#,
    r#"field "X-Empty:""#,
    r#"field "X-Tab:\tvalue""#,
    r#"field "X-Obs: café""#,
    r#"field "X_Under: ok""#,
    "empty line before request",
    "two GETs",
    "POST then GET",
    "chunked then GET",
    "expect 100-continue",
    "expect other",
    "expect on chunked",
];

/// Each case: its name, its bytes, and whether RFC 9112 calls them valid (a valid case
/// Envoy accepts must be forwarded identically; an invalid one may be refused even where
/// Envoy tolerates it).
fn cases() -> Vec<(String, Vec<u8>, bool)> {
    let mut c: Vec<(String, Vec<u8>, bool)> = Vec::new();
    let mut add = |name: &str, raw: String| {
        let valid = VALID.contains(&name);
        c.push((name.to_string(), raw.into_bytes(), valid))
    };
    let post = |fields: &str, body: &str| format!("POST /p HTTP/1.1\r\n{H}{fields}\r\n{body}");
    let next = format!("GET /next HTTP/1.1\r\n{H}\r\n");

    // CL.TE and TE.CL: both framings at once (RFC 9112 §6.1: a smuggling attempt).
    add(
        "cl.te",
        post(
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\nG",
        ),
    );
    add(
        "te.cl",
        post(
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            "8\r\nSMUGGLED\r\n0\r\n\r\n",
        ),
    );
    add(
        "cl.te with a smuggled request",
        post(
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
            &format!("0\r\n\r\n{next}"),
        ),
    );
    add(
        "te.cl zero length",
        post(
            "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
            "0\r\n\r\n",
        ),
    );

    // TE.TE: obfuscated transfer-encoding values and names.
    for te in [
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: Chunked",
        "Transfer-Encoding: CHUNKED",
        "Transfer-Encoding:chunked",
        "Transfer-Encoding:  chunked  ",
        "Transfer-Encoding: identity, chunked",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: chunked, chunked",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: identity",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding: chunk",
        "Transfer-Encoding: \"chunked\"",
        "Transfer-Encoding: chunked;q=1",
        "Transfer-Encoding:\tchunked",
        "Transfer-Encoding: \x0bchunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding\t: chunked",
        " Transfer-Encoding: chunked",
        "X: y\r\n Transfer-Encoding: chunked",
        "Transfer-Encoding:\r\n chunked",
        "Transfer-Encoding: ",
        "Transfer_Encoding: chunked",
        "Transfer-Encoding: chunked\u{0}",
        "Transfer-Encoding: ch\u{fc}nked",
    ] {
        add(
            &format!("te: {te:?}"),
            post(&format!("{te}\r\n"), "5\r\nhello\r\n0\r\n\r\n"),
        );
    }

    // Content-Length forms.
    for (cl, body) in [
        ("5", "hello"),
        ("05", "hello"),
        (" 5 ", "hello"),
        ("0", ""),
        ("5, 5", "hello"),
        ("5,5", "hello"),
        ("5\r\nContent-Length: 5", "hello"),
        ("5\r\nContent-Length: 6", "hello!"),
        ("6\r\nContent-Length: 5", "hello!"),
        ("+5", "hello"),
        ("-5", "hello"),
        ("0x5", "hello"),
        ("5a", "hello"),
        ("5.0", "hello"),
        ("1e1", "helloworld"),
        ("", "hello"),
        ("99999999999999999999", "hello"),
        ("18446744073709551616", "hello"),
        ("\"5\"", "hello"),
    ] {
        add(
            &format!("content-length {cl:?}"),
            post(&format!("Content-Length: {cl}\r\n"), body),
        );
    }
    add(
        "content-length space before colon",
        post("Content-Length : 5\r\n", "hello"),
    );
    add(
        "content-length then a pipelined request",
        post("Content-Length: 5\r\n", &format!("hello{next}")),
    );

    // Chunk syntax.
    let chunked = |body: &str| post("Transfer-Encoding: chunked\r\n", body);
    for (name, body) in [
        ("valid", "5\r\nhello\r\n0\r\n\r\n"),
        ("two chunks", "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        ("uppercase hex", "A\r\n0123456789\r\n0\r\n\r\n"),
        ("leading zeros", "0005\r\nhello\r\n0000\r\n\r\n"),
        ("extension", "5;name=value\r\nhello\r\n0\r\n\r\n"),
        ("quoted extension", "5;name=\"a b\"\r\nhello\r\n0\r\n\r\n"),
        ("extension, BWS", "5 ;name\r\nhello\r\n0\r\n\r\n"),
        ("trailer", "5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        ("empty body", "0\r\n\r\n"),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n"),
        ("plus sign", "+5\r\nhello\r\n0\r\n\r\n"),
        ("0x prefix", "0x5\r\nhello\r\n0\r\n\r\n"),
        ("space before size", " 5\r\nhello\r\n0\r\n\r\n"),
        ("size not hex", "g\r\nhello\r\n0\r\n\r\n"),
        ("empty size", "\r\nhello\r\n0\r\n\r\n"),
        (
            "overflowing size",
            "10000000000000005\r\nhello\r\n0\r\n\r\n",
        ),
        ("huge size", "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("bare LF after size", "5\nhello\r\n0\r\n\r\n"),
        ("bare CR after size", "5\rhello\r\n0\r\n\r\n"),
        ("bare LF after data", "5\r\nhello\n0\r\n\r\n"),
        ("no CRLF after data", "5\r\nhello0\r\n\r\n"),
        ("data longer than size", "3\r\nhello\r\n0\r\n\r\n"),
        (
            "data shorter than size (smuggles)",
            &format!("5\r\nhi\r\n0\r\n\r\n{next}"),
        ),
        ("bare LF at the end", "5\r\nhello\r\n0\r\n\n"),
        ("bare LF in last chunk", "5\r\nhello\r\n0\n\r\n"),
        (
            "trailer without colon",
            "5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        ),
        ("trailer bare CR", "5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n"),
        ("trailer folded", "5\r\nhello\r\n0\r\nX: a\r\n b\r\n\r\n"),
        ("control byte in extension", "5;\u{1}\r\nhello\r\n0\r\n\r\n"),
        ("LF in extension", "5;a\nb\r\nhello\r\n0\r\n\r\n"),
        (
            "chunk then a pipelined request",
            &format!("5\r\nhello\r\n0\r\n\r\n{next}"),
        ),
    ] {
        add(&format!("chunked: {name}"), chunked(body));
    }

    // Request line and target.
    for line in [
        "GET / HTTP/1.1",
        "GET /a/b?c=d&e HTTP/1.1",
        "GET /%20 HTTP/1.1",
        "GET /a b HTTP/1.1",
        "GET /a\tb HTTP/1.1",
        "GET /a\u{1}b HTTP/1.1",
        "GET /a\u{7f}b HTTP/1.1",
        "GET /caf\u{e9} HTTP/1.1",
        "GET /a#frag HTTP/1.1",
        "GET /a?b#frag HTTP/1.1",
        "GET  / HTTP/1.1",
        "GET / HTTP/1.1 ",
        "GET\t/ HTTP/1.1",
        " GET / HTTP/1.1",
        "GET / http/1.1",
        "GET / HTTP/1.2",
        "GET / HTTP/2.0",
        "GET / HTTP/1",
        "GET / HTTP/1.10",
        "GET /",
        "GET / HTTP/1.1 extra",
        "G@T / HTTP/1.1",
        "get / HTTP/1.1",
        "GET a HTTP/1.1",
        "GET * HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "GET example.com:80 HTTP/1.1",
        "GET http://example.com/abs HTTP/1.1",
        "GET http://other.example/abs HTTP/1.1",
        "GET HTTP://example.com/abs HTTP/1.1",
        "GET ftp://example.com/abs HTTP/1.1",
        "GET /a\\b HTTP/1.1",
        "GET /a|b{c}^ HTTP/1.1",
        "GET /a\"b<c> HTTP/1.1",
        "GET /a`b HTTP/1.1",
        "GET /a%zz HTTP/1.1",
    ] {
        add(&format!("line {line:?}"), format!("{line}\r\n{H}\r\n"));
    }

    // Host (RFC 9110 §7.2).
    for host in [
        "",
        "Host: a.example\r\nHost: b.example\r\n",
        "Host: example.com\r\nHost: example.com\r\n",
        "Host: exa mple.com\r\n",
        "Host: example.com:80\r\n",
        "Host: [::1]:80\r\n",
        "Host: 127.0.0.1\r\n",
        "Host: user@example.com\r\n",
        "Host: \r\n",
        "Host : example.com\r\n",
        "Host: example.com/path\r\n",
        "Host: example.com\u{0}\r\n",
        "Host: ex\u{e4}mple.com\r\n",
    ] {
        add(
            &format!("host {host:?}"),
            format!("GET /h HTTP/1.1\r\n{host}\r\n"),
        );
    }

    // Field syntax.
    for field in [
        "X-Ok: value",
        "X-Empty:",
        "X-Tab:\tvalue",
        "X-Obs: caf\u{e9}",
        "X-Space : value",
        "X-Fold: a\r\n b",
        "X-Nul: a\u{0}b",
        "X-Cr: a\rb",
        "X-Lf: a\nb",
        "X-Del: a\u{7f}b",
        "No colon",
        ": empty name",
        "X Y: bad name",
        "X\"Y: bad name",
        "X_Under: ok",
    ] {
        add(
            &format!("field {field:?}"),
            format!("GET /f HTTP/1.1\r\n{H}{field}\r\n\r\n"),
        );
    }
    add(
        "bare LF line endings",
        format!("GET /lf HTTP/1.1\n{H}\n").replace("\r\n", "\n"),
    );
    add("bare CR line ending", format!("GET /cr HTTP/1.1\r{H}\r\n"));
    add(
        "empty line before request",
        format!("\r\nGET /lead HTTP/1.1\r\n{H}\r\n"),
    );
    add(
        "whitespace line before headers",
        format!("GET /ws HTTP/1.1\r\n \r\n{H}\r\n"),
    );

    // Pipelining (RFC 9112 §9.3).
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\n{H}\r\n");
    add("two GETs", format!("{}{}", get("/one"), get("/two")));
    add(
        "POST then GET",
        format!("{}{}", post("Content-Length: 5\r\n", "hello"), get("/two")),
    );
    add(
        "chunked then GET",
        format!("{}{}", chunked("5\r\nhello\r\n0\r\n\r\n"), get("/two")),
    );
    add(
        "three, the last one bad",
        format!(
            "{}{}GET /bad HTTP/1.1\r\n{H}Content-Length: 1, 1\r\n\r\nx",
            get("/one"),
            get("/two")
        ),
    );

    // Expect (RFC 9110 §10.1.1).
    add(
        "expect 100-continue",
        post("Expect: 100-continue\r\nContent-Length: 5\r\n", "hello"),
    );
    add(
        "expect other",
        post("Expect: something\r\nContent-Length: 5\r\n", "hello"),
    );
    add(
        "expect on chunked",
        post(
            "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
        ),
    );

    // HTTP/1.0 framing (refused with 426 by default, in both).
    add(
        "HTTP/1.0 with TE",
        format!(
            "POST /old HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
    );
    c
}

/// The statuses of the responses in `buf`, in order (bodies skipped by their framing).
fn statuses(mut buf: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf = &buf[end + 4..];
        let Some(code) = head.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()) else {
            break;
        };
        out.push(code);
        let field = |n: &str| {
            head.split("\r\n").find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(n).then(|| v.trim().to_string())
            })
        };
        if code == 100 || code == 204 || code == 304 {
            continue;
        }
        if field("transfer-encoding").is_some() {
            let Some(at) = buf.windows(5).position(|w| w == b"0\r\n\r\n") else {
                break;
            };
            buf = &buf[at + 5..];
        } else {
            let n: usize = field("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            buf = &buf[n.min(buf.len())..];
        }
    }
    out
}

/// Sends `raw` on a new connection and reads until the proxy closes it or goes quiet.
fn run(port: u16, upstream: &WireUpstream, raw: &[u8]) -> Outcome {
    let before = upstream.requests().len();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = s.write_all(raw);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let upstream = upstream.requests()[before..]
        .iter()
        .map(|r| {
            let host = r.all("host").join(",");
            (format!("{} host={host}", r.line), r.body.clone())
        })
        .collect();
    Outcome {
        statuses: statuses(&buf),
        upstream,
    }
}

/// Legate is at least as safe as Envoy, and alike on valid traffic Envoy accepts.
fn verdict(valid: bool, envoy: &Outcome, legate: &Outcome) -> Result<(), String> {
    if !envoy.upstream.starts_with(&legate.upstream) {
        return Err("forwarded what Envoy did not".into());
    }
    if legate == envoy {
        return Ok(());
    }
    let refused = |o: &Outcome| o.statuses.iter().any(|s| (400..600).contains(s));
    if valid && !refused(envoy) {
        return Err("valid traffic answered or forwarded differently".into());
    }
    // Where it differs from Envoy on input Envoy refuses or the RFC calls invalid, it
    // refuses (a connection closed without an answer is not a refusal).
    if !refused(legate) {
        return Err("neither as Envoy nor refused".into());
    }
    Ok(())
}

#[test]
fn raw_http1_cases_are_refused_or_forwarded_as_envoy_does() {
    let cases = cases();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let (envoy_up, legate_up) = (WireUpstream::start(), WireUpstream::start());
    let (envoy_port, legate_port) = (free_port(), free_port());
    let _envoy = Envoy::start(
        &one_route_bootstrap(envoy_port, "", &[envoy_up.port()], ""),
        envoy_port,
    );
    let _legate = Legate::start(
        &one_route_bootstrap(legate_port, "", &[legate_up.port()], ""),
        legate_port,
    );
    let results: Vec<(String, bool, Outcome, Outcome)> = std::thread::scope(|s| {
        let envoy = s.spawn(|| {
            cases
                .iter()
                .map(|(_, raw, _)| run(envoy_port, &envoy_up, raw))
                .collect::<Vec<_>>()
        });
        let legate: Vec<_> = cases
            .iter()
            .map(|(_, raw, _)| run(legate_port, &legate_up, raw))
            .collect();
        let envoy = envoy.join().unwrap();
        cases
            .iter()
            .zip(envoy.into_iter().zip(legate))
            .map(|((name, _, valid), (e, l))| (name.clone(), *valid, e, l))
            .collect()
    });
    let mut failed = Vec::new();
    for (name, valid, envoy, legate) in &results {
        if let Err(why) = verdict(*valid, envoy, legate) {
            failed.push(format!(
                "{name}: {why}\n    envoy:  {:?} upstream {:?}\n    legate: {:?} upstream {:?}",
                envoy.statuses,
                envoy.upstream.iter().map(|u| &u.0).collect::<Vec<_>>(),
                legate.statuses,
                legate.upstream.iter().map(|u| &u.0).collect::<Vec<_>>()
            ));
        }
    }
    println!(
        "{} of {} raw cases at least as safe as Envoy",
        results.len() - failed.len(),
        results.len()
    );
    assert!(
        envoy_up.malformed().is_empty(),
        "{:?}",
        envoy_up.malformed()
    );
    assert!(
        legate_up.malformed().is_empty(),
        "{:?}",
        legate_up.malformed()
    );
    assert!(
        failed.is_empty(),
        "{} cases:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// A refused request as Envoy answers, logs and counts it: the response (date left out),
/// the access-log line, and the connection manager's `downstream_rq_4xx` and
/// `downstream_cx_protocol_error`. Refused at the head (a space in the target, both
/// framings) and inside a chunked body.
#[test]
fn refused_requests_are_answered_logged_and_counted_as_envoy_does() {
    let refused: [&[u8]; 3] = [
        b"GET /a b HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n-1\r\n",
    ];
    let format = "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% \\\"%REQ(:AUTHORITY)%\\\" \\\"%REQ(USER-AGENT)%\\\"\\n";
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let upstream = WireUpstream::start();
        let (port, admin) = (free_port(), free_port());
        let hcm = format!(
            "access_log:\n- name: envoy.access_loggers.file\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {}\n    log_format: {{text_format_source: {{inline_string: \"{format}\"}}}}",
            log.display()
        );
        let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
        let yaml = format!(
            "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\n{}",
            bootstrap(
                &[listener_yaml("main", port, route, &hcm)],
                &[cluster_yaml("c", &[upstream.port()], "")]
            )
        );
        let _proc: Box<dyn std::any::Any> = if envoy {
            Box::new(Envoy::start(&yaml, port))
        } else {
            Box::new(Legate::start(&yaml, port))
        };
        let mut answers = Vec::new();
        for raw in refused {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(raw);
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf).to_string();
            // Fields in a fixed order, without the date and the server name.
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let mut lines: Vec<String> = head
                .split("\r\n")
                .map(str::to_ascii_lowercase)
                .filter(|l| !l.starts_with("date:") && !l.starts_with("server:"))
                .collect();
            lines.sort();
            answers.push((lines, body.to_string()));
        }
        let mut lines = Vec::new();
        eventually(10, "access log lines", || {
            lines = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            lines.len() >= refused.len()
        });
        let stats = get(admin, "/stats", "admin").body;
        let counters: Vec<String> = stats
            .lines()
            .filter(|l| {
                l.starts_with("http.main.downstream_rq_4xx:")
                    || l.starts_with("http.main.downstream_cx_protocol_error:")
            })
            .map(str::to_string)
            .collect();
        assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
        seen.push((answers, lines, counters));
    }
    assert_eq!(seen[0].1.len(), 3, "envoy's log: {:?}", seen[0].1);
    assert_eq!(seen[0], seen[1], "envoy, then legate");
}
