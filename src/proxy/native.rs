//! legate's own HTTP/1.1 engine, for plaintext listeners (`--engine native`).
//!
//! Pingora's HTTP/1 proxy costs about twice a minimal Tokio proxy in CPU per request before
//! any of legate's logic runs (benches/load, `--bare`): a session object and its buffers
//! per request, a task and channels between the two halves of every exchange, a pool with
//! an idle-watch task per released connection, a case-preserving header map, and futures
//! large enough that moving them shows in profiles. This engine carries the common request
//! itself, in one task per connection, and runs the same request logic (the functions the
//! Pingora hooks call: routing, header rules, filters, retries, timeouts, stats, access
//! log) so that both engines answer alike.
//!
//! It handles what it fully implements: HTTP/1.1 requests without a body or with a
//! content-length one up to 64 KiB (`Expect: 100-continue` answered as Envoy does), no
//! upgrade, forwarded to plaintext HTTP/1.1 clusters. Anything else (a chunked or larger
//! body, an upgrade, another `Expect`, HTTP/1.0, routes that can reach a TLS or HTTP/2 cluster, a head it cannot
//! parse) hands the connection, with the bytes already read, to Pingora, which serves it
//! from then on.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method, StatusCode, Version};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType, Result, RetryType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http1::BodyFraming;

use super::{
    answer_failure, connect_failed, filter_context, finish_request, handle_request, next_attempt,
    prepare_response, prepare_upstream_request, proxy_error, upstream_response_received, Client,
    RequestCtx,
};
use crate::snapshot::Snapshot;

/// Larger request heads go to Pingora, which reads up to 1 MiB.
const MAX_HEAD: usize = 64 * 1024;
/// More headers than this go to Pingora (which takes 256; Envoy's default limit is 100).
const MAX_HEADERS: usize = 128;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// How long a connection accepted before a shutdown may take to send its first request
/// (Envoy's default `drain_timeout`).
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Pingora's read timeout for a connection's first request head.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Larger request bodies go to Pingora, which streams them. Pingora keeps this much of a
/// body for replay on a retry; a body the engine takes is read whole before it is sent, so
/// every try can replay it.
const MAX_BODY: u64 = 64 * 1024;
/// Idle connections kept per upstream address and worker (Pingora's pool holds 128).
const POOL_PER_ADDRESS: usize = 128;
/// Room in a parsed head's header map for the fields the request logic adds (forwarding,
/// `x-envoy-*`, `date`, `server`...), so that adding them does not grow the map.
const ROOM: usize = 8;
/// Response body bytes gathered before a write downstream.
const WRITE_CHUNK: usize = 64 * 1024;

/// A client connection the engine can serve: plaintext TCP, or TLS over it.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Resolves when the client closes its side of the connection; never when it sends
    /// more (a pipelined request, read after this response).
    fn gone(&self) -> impl std::future::Future<Output = ()> + Send + '_;
}

impl ClientStream for TcpStream {
    async fn gone(&self) {
        let mut probe = [0u8; 1];
        match self.peek(&mut probe).await {
            Ok(0) | Err(_) => {}
            Ok(_) => std::future::pending().await,
        }
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<pingora::protocols::l4::stream::Stream> {
    /// A TLS client may send a close_notify alert before its FIN, and the bytes under TLS
    /// cannot be peeked without consuming records: a TLS client leaving early is noticed
    /// when its response is written.
    async fn gone(&self) {
        std::future::pending().await
    }
}

/// Serves one HTTP/1.1 connection, request after request, until it closes (None: by
/// either side, by a limit, or at shutdown) or Pingora is to take over (the stream, and
/// the bytes read from it but not served).
pub(crate) async fn serve<S: ClientStream>(
    io: S,
    info: Option<&crate::io::ConnectionInfo>,
    local: SocketAddr,
    remote: SocketAddr,
    shared: Arc<ArcSwap<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<(S, BytesMut)> {
    let mut conn = Connection {
        io,
        input: BytesMut::with_capacity(4096),
        output: BytesMut::with_capacity(4096),
        fields: Vec::new(),
        idle: Deadline::new(),
        upstream_read: Deadline::new(),
    };
    // A larger body goes to Pingora, which streams it: a body the engine takes is held
    // whole, and may not outgrow the listener's buffer limit (nor replay past it).
    let max_body = shared
        .load()
        .listener_at(local)
        .map_or(MAX_BODY, |l| MAX_BODY.min(l.buffer_limit as u64));
    // Between requests: None before the first; then the keep-alive limit, if any.
    let mut idle: Option<Option<Duration>> = None;
    // Shutting down while waiting for the connection's first request.
    let mut draining = false;
    loop {
        // Reading a body: Pingora's read timeout applies, not the keep-alive one.
        let mut in_body = false;
        // `100 Continue` sent for this request.
        let mut continued = false;
        let head = loop {
            if !conn.input.is_empty() {
                match parse_request(&conn.input, &mut conn.fields, max_body) {
                    Parsed::Complete(head) if conn.input.len() >= head.len + head.body => {
                        break head
                    }
                    Parsed::Complete(head) => {
                        in_body = true;
                        if head.expect_continue && !continued {
                            if !serves_chain(&shared.load(), local, info) {
                                // Pingora answers it (and sends the `100` itself).
                                return Some((conn.io, conn.input));
                            }
                            // The client may hold the body back until it hears from us.
                            conn.output.put_slice(CONTINUE);
                            if conn.flush().await.is_err() {
                                return None;
                            }
                            continued = true;
                        }
                    }
                    Parsed::Partial if conn.input.len() < MAX_HEAD => {}
                    _ => return Some((conn.io, conn.input)),
                }
            }
            let limit = match idle {
                Some(keepalive) if !in_body => keepalive,
                _ if draining => Some(DRAIN_GRACE),
                _ => Some(FIRST_REQUEST_TIMEOUT),
            };
            let between_requests = conn.input.is_empty() && !draining;
            let read = conn.io.read_buf(&mut conn.input);
            let n = tokio::select! {
                biased;
                n = conn.idle.within(limit, read) => n,
                _ = shutdown.wait_for(|down| *down), if between_requests => {
                    // A kept-alive connection waiting for its next request closes when the
                    // service stops, as Pingora's do. A new connection's first request may
                    // be on its way (the client connected before the listener stopped):
                    // it is served, with `connection: close`.
                    if idle.is_some() {
                        return None;
                    }
                    draining = true;
                    continue;
                }
            };
            match n {
                Some(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        };
        let body_len = head.body;
        let snapshot = shared.load_full();
        if !serves_chain(&snapshot, local, info) {
            return Some((conn.io, conn.input));
        }
        // The head's values and target become slices of its bytes, not copies.
        let bytes = conn.input.split_to(head.len).freeze();
        let head = match head.build(bytes, &mut conn.fields) {
            Ok(head) => head,
            Err(bytes) => {
                let mut unread = BytesMut::from(&bytes[..]);
                unread.extend_from_slice(&conn.input);
                return Some((conn.io, unread));
            }
        };
        let body = conn.input.split_to(body_len).freeze();
        let keepalive = if client_wants_close(&head) {
            None
        } else {
            Some(0)
        };
        let mut client = NativeClient {
            conn: &mut conn,
            info,
            req: head,
            body,
            local,
            remote,
            client_close: keepalive.is_none(),
            keepalive,
            response: None,
            body_sent: 0,
            continued,
        };
        if *shutdown.borrow() {
            // As if the client had asked to close: the request logic's keep-alive setting
            // must not reopen it.
            client.client_close = true;
            client.keepalive = None;
        }
        let mut ctx = RequestCtx::default();
        let reusable = match handle_request(snapshot, &mut client, &mut ctx).await {
            Ok(true) => true,
            Ok(false) => proxy(&mut client, &mut ctx).await,
            Err(e) => {
                answer_failure(&mut client, &e, &mut ctx).await;
                false
            }
        };
        finish_request(&mut client, &mut ctx);
        let keepalive = client.keepalive;
        drop(ctx);
        if !reusable || conn.flush().await.is_err() {
            return None;
        }
        match keepalive {
            None => return None,
            Some(0) => idle = Some(None),
            Some(s) => idle = Some(Some(Duration::from_secs(s))),
        }
    }
}

/// Whether the connection's filter chain, in this snapshot, is the engine's to serve: its
/// routes reach only plaintext HTTP/1.1 clusters.
fn serves_chain(
    snapshot: &Snapshot,
    local: SocketAddr,
    info: Option<&crate::io::ConnectionInfo>,
) -> bool {
    snapshot
        .listener_at(local)
        .and_then(|l| l.chains.get(info.map_or(0, |i| i.chain)))
        .is_none_or(|c| c.plain_upstreams)
}

struct Connection<S> {
    io: S,
    /// Read from the client and not yet served (a pipelined request's head, say).
    input: BytesMut,
    /// To be written to the client.
    output: BytesMut,
    /// The fields of the head being parsed (kept for its capacity).
    fields: Vec<Field>,
    /// Waiting for a request, or for the rest of one.
    idle: Deadline,
    /// Waiting for the upstream (Pingora's read timeout, per read).
    upstream_read: Deadline,
}

impl<S: ClientStream> Connection<S> {
    async fn flush(&mut self) -> Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let mut r = self.io.write_all(&self.output).await;
        if r.is_ok() {
            // TLS holds records until flushed; TCP writes straight through.
            r = self.io.flush().await;
        }
        self.output.clear();
        r.map_err(|e| Error::because(ErrorType::WriteError, "writing to the client", e).into_down())
    }
}

/// One request's downstream side, as the request logic sees it.
struct NativeClient<'c, S> {
    conn: &'c mut Connection<S>,
    /// What the accept path decided (a TLS connection's chain and TLS details).
    info: Option<&'c crate::io::ConnectionInfo>,
    req: RequestHeader,
    /// The whole request body (requests with a larger one go to Pingora).
    body: Bytes,
    local: SocketAddr,
    remote: SocketAddr,
    /// The client sent `connection: close`: no keep-alive whatever the config says.
    client_close: bool,
    /// Pingora's keep-alive switch (see `Client::set_keepalive`).
    keepalive: Option<u64>,
    response: Option<ResponseHeader>,
    body_sent: usize,
    /// `100 Continue` already sent.
    continued: bool,
}

impl<S: ClientStream> NativeClient<'_, S> {
    /// What Pingora's HTTP/1 server adds to every final response (`date`, `connection`),
    /// then the head on the wire.
    fn put_head(&mut self, resp: &mut ResponseHeader) -> Result<()> {
        if !resp.status.is_informational() {
            resp.insert_header(
                header::DATE,
                pingora::protocols::http::date::get_cached_date(),
            )?;
            let connection = if self.keepalive.is_some() {
                "keep-alive"
            } else {
                "close"
            };
            resp.insert_header(header::CONNECTION, connection)?;
        }
        let out = &mut self.conn.output;
        out.put_slice(match resp.version {
            Version::HTTP_10 => b"HTTP/1.0 ",
            _ => b"HTTP/1.1 ",
        });
        out.put_slice(resp.status.as_str().as_bytes());
        out.put_u8(b' ');
        if let Some(reason) = resp.get_reason_phrase() {
            out.put_slice(reason.as_bytes());
        }
        out.put_slice(b"\r\n");
        resp.header_to_h1_wire(out);
        out.put_slice(b"\r\n");
        Ok(())
    }
}

impl<S: ClientStream> Client for NativeClient<'_, S> {
    fn local_addr(&self) -> Option<SocketAddr> {
        Some(self.local)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.remote)
    }
    fn connection(&self) -> Option<&crate::io::ConnectionInfo> {
        self.info
    }
    fn is_http2(&self) -> bool {
        false
    }
    fn body_follows(&mut self) -> bool {
        !self.body.is_empty()
    }
    fn set_keepalive(&mut self, seconds: Option<u64>) {
        self.keepalive = if self.client_close { None } else { seconds };
    }
    fn req_header(&self) -> &RequestHeader {
        &self.req
    }
    fn req_header_mut(&mut self) -> &mut RequestHeader {
        &mut self.req
    }
    fn enable_retry_buffering(&mut self) {
        // The body is read whole before the first try.
    }
    fn request_body_done(&mut self) -> bool {
        true
    }
    fn response_written(&self) -> Option<&ResponseHeader> {
        self.response.as_ref()
    }
    fn body_bytes_read(&self) -> usize {
        self.body.len()
    }
    fn body_bytes_sent(&self) -> usize {
        self.body_sent
    }
    async fn send_continue(&mut self) -> Result<()> {
        if !self.continued {
            // Goes out with the response (the body is here already).
            self.conn.output.put_slice(CONTINUE);
            self.continued = true;
        }
        Ok(())
    }
    async fn write_reply(&mut self, mut resp: ResponseHeader, body: Option<Bytes>) -> Result<()> {
        self.put_head(&mut resp)?;
        if let Some(body) = body {
            self.body_sent += body.len();
            self.conn.output.put_slice(&body);
        }
        self.response = Some(resp);
        self.conn.flush().await
    }
}

enum Parsed {
    Complete(Head),
    Partial,
    /// Malformed, or something this engine leaves to Pingora.
    Elsewhere,
}

/// A request head the engine takes, as positions in the buffer it was parsed from; its
/// fields are in the connection's `fields`.
struct Head {
    method: Method,
    target: std::ops::Range<usize>,
    /// The head's length, and the length of the body that follows it.
    len: usize,
    body: usize,
    /// `Expect: 100-continue`: the client may wait for a `100 Continue` before the body.
    expect_continue: bool,
}

/// A header field: its name, and where its value is in the head's bytes.
type Field = (HeaderName, std::ops::Range<usize>);

/// Where `part` (a slice of `buf`) sits in `buf`.
fn span(buf: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

impl Head {
    /// The request header, its target and values sharing `bytes` (the head as parsed);
    /// the bytes back when the `http` types refuse the target or a value (for Pingora's
    /// 400).
    fn build(self, bytes: Bytes, fields: &mut Vec<Field>) -> Result<RequestHeader, Bytes> {
        // Visible ASCII without a fragment (`http1::check_request_head`); targets the
        // `http` types refuse (`"`, `<`, a backtick...) go to Pingora, which
        // keeps their bytes as they came, as Envoy forwards them.
        let Ok(pq) = http::uri::PathAndQuery::from_maybe_shared(bytes.slice(self.target.clone()))
        else {
            return Err(bytes);
        };
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(pq);
        let Ok(uri) = http::Uri::from_parts(parts) else {
            return Err(bytes);
        };
        let mut map = http::HeaderMap::with_capacity(fields.len() + ROOM);
        for (name, value) in fields.drain(..) {
            match HeaderValue::from_maybe_shared(bytes.slice(value)) {
                Ok(value) => map.append(name, value),
                Err(_) => return Err(bytes),
            };
        }
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = uri;
        parts.headers = map;
        // Origin-form targets serialize from the URI (`RawTarget::FromUri`), which is what
        // a header made from parts keeps.
        Ok(RequestHeader::from(parts))
    }
}

/// Request headers whose presence sends the connection to Pingora: an upgrade, `Expect`,
/// or hop-by-hop fields this engine does not interpret (the body's framing is judged by
/// `http1::check_request_head`).
fn leaves_engine(name: &HeaderName, value: &[u8]) -> bool {
    if name == header::CONNECTION {
        // Only the keep-alive switch; a connection-nominated field list goes to Pingora,
        // which strips the nominated fields.
        return !value.split(|b| *b == b',').all(|t| {
            let t = t.trim_ascii();
            t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
        });
    }
    if name == header::EXPECT {
        // `100-continue` is answered here (see `serve`); other expectations go to Pingora.
        return !value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
    }
    name == header::UPGRADE
        || name == header::TE
        || name == header::TRAILER
        || name.as_str() == "http2-settings"
}

fn parse_request(buf: &[u8], fields: &mut Vec<Field>, max_body: u64) -> Parsed {
    fields.clear();
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Elsewhere,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Elsewhere;
    };
    // One judgement of the head and its framing for both engines: a head Envoy would
    // refuse goes to Pingora's side, where the same judgement refuses it (io::guarded); a
    // chunked, large or tunnelled body is Pingora's to carry.
    let body = match crate::http1::check_request_head(&buf[..len]) {
        Ok(crate::http1::Framing {
            body: BodyFraming::None,
            tunnel: false,
            absolute: false,
        }) => 0,
        Ok(crate::http1::Framing {
            body: BodyFraming::Length(n),
            tunnel: false,
            absolute: false,
        }) if n <= max_body => n,
        _ => return Parsed::Elsewhere,
    };
    // Origin-form targets only; CONNECT and `*` go to Pingora (as absolute-form did above).
    if method == "CONNECT" || !path.starts_with('/') {
        return Parsed::Elsewhere;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Elsewhere;
    };
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::Elsewhere;
        };
        if leaves_engine(&name, h.value) {
            return Parsed::Elsewhere;
        }
        expect_continue |= name == header::EXPECT;
        fields.push((name, span(buf, h.value)));
    }
    Parsed::Complete(Head {
        method,
        target: span(buf, path.as_bytes()),
        len,
        body: body as usize,
        expect_continue,
    })
}

fn client_wants_close(req: &RequestHeader) -> bool {
    req.headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// A connection's timer for one kind of limit, kept from request to request. Moving a
/// Tokio timer's deadline later only records it (the timer re-arms itself when the old
/// deadline comes), where a `timeout` per read enters and leaves the timer wheel each time.
struct Deadline(std::pin::Pin<Box<tokio::time::Sleep>>);

impl Deadline {
    fn new() -> Self {
        // Not in the timer wheel until first used.
        Deadline(Box::pin(tokio::time::sleep(Duration::from_secs(86_400))))
    }

    /// Runs `f` under an optional time limit; None when it ran out.
    async fn within<T>(
        &mut self,
        limit: Option<Duration>,
        f: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let Some(limit) = limit else {
            return Some(f.await);
        };
        self.0.as_mut().reset(tokio::time::Instant::now() + limit);
        tokio::select! {
            biased;
            v = f => Some(v),
            _ = self.0.as_mut() => None,
        }
    }
}

/// Forwards the routed request, with retries; whether the client connection can carry
/// another request afterwards.
async fn proxy<S: ClientStream>(client: &mut NativeClient<'_, S>, ctx: &mut RequestCtx) -> bool {
    // Filters see the body, whole, as its last chunk.
    if let Some(hcm) = ctx.hcm() {
        let mut body = (!client.body.is_empty()).then(|| client.body.clone());
        for (i, f) in hcm.filters.filters.iter().enumerate() {
            f.filter
                .on_request_body(&mut body, true, &filter_context(ctx, i, &f.name));
        }
        client.body = body.unwrap_or_default();
    }
    loop {
        let next = match next_attempt(ctx).await {
            Ok(next) => next,
            Err(e) => return failed(client, ctx, e).await,
        };
        let key = (next.cluster.pool_key, next.host.address);
        let (mut upstream, reused) = match pool_take(key) {
            Some(s) => (s, true),
            None => match connect(
                next.host.address,
                next.cluster.connect_timeout,
                next.cluster.tcp_keepalive.as_ref(),
            )
            .await
            {
                Ok(s) => (s, false),
                Err(mut e) => {
                    let retry = connect_failed(ctx, e.etype(), true);
                    e.set_retry(retry);
                    if retry {
                        continue;
                    }
                    return failed(client, ctx, e).await;
                }
            },
        };
        match exchange(client, ctx, &mut upstream, next.read_timeout).await {
            Ok(keep) => {
                if keep {
                    pool_put(key, upstream, next.cluster.idle_timeout);
                }
                return true;
            }
            Err(e) if e.esource() == &pingora::ErrorSource::Downstream => {
                // The client went away or stopped reading: nobody to retry for.
                return failed(client, ctx, e).await;
            }
            Err(e) => {
                let e = e.more_context(format!("peer: {}", next.host.address));
                let e = proxy_error(ctx, e, true, reused);
                if matches!(e.retry, RetryType::Decided(true)) {
                    continue;
                }
                return failed(client, ctx, e).await;
            }
        }
    }
}

/// Answers a failed request as the Pingora path does; the connection then closes.
async fn failed<S: ClientStream>(
    client: &mut NativeClient<'_, S>,
    ctx: &mut RequestCtx,
    e: Box<Error>,
) -> bool {
    answer_failure(client, &e, ctx).await;
    false
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<&crate::cluster::config::Keepalive>,
) -> Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            if let Some(k) = keepalive {
                let _ = socket2::SockRef::from(&s).set_tcp_keepalive(&k.socket2());
            }
            Ok(s)
        }
        Ok(Err(e)) => Err(Error::because(
            crate::cluster::connect::connect_error_type(&e),
            format!("Fail to connect to {addr}"),
            e,
        )),
        Err(_) => Error::e_explain(
            ErrorType::ConnectTimedout,
            format!("timeout {timeout:?} connecting to server {addr}"),
        ),
    }
}

type PoolKey = (u64, SocketAddr);

/// An idle upstream connection and when it became idle.
struct Idle {
    stream: TcpStream,
    since: Instant,
    /// Its cluster's `idle_timeout`.
    timeout: Duration,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < self.timeout && still_open(&self.stream)
    }
}

/// A worker's idle upstream connections, per cluster version and address. Each worker is
/// one thread with its own runtime, so connections never cross threads.
#[derive(Default)]
struct Pool {
    idle: foldhash::HashMap<PoolKey, Vec<Idle>>,
    swept: Option<Instant>,
}

/// How often a busy worker drops the idle connections that upstreams closed or that timed
/// out, in every pool, including those of cluster versions a reload replaced (which are
/// never taken from again).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

fn pool_take(key: PoolKey) -> Option<TcpStream> {
    let now = Instant::now();
    POOL.with_borrow_mut(|pool| {
        pool.sweep(now);
        let idle = pool.idle.get_mut(&key)?;
        while let Some(conn) = idle.pop() {
            if conn.usable(now) {
                return Some(conn.stream);
            }
        }
        None
    })
}

fn pool_put(key: PoolKey, stream: TcpStream, timeout: Duration) {
    POOL.with_borrow_mut(|pool| {
        let idle = pool.idle.entry(key).or_default();
        if idle.len() < POOL_PER_ADDRESS {
            idle.push(Idle {
                stream,
                since: Instant::now(),
                timeout,
            });
        }
    })
}

impl Pool {
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.idle.retain(|_, conns| {
            conns.retain(|c| c.usable(now));
            !conns.is_empty()
        });
    }
}

/// An idle connection the upstream has not closed: nothing to read on it (a read would
/// block). Closed or sending unasked bytes, it is dropped.
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The hop-by-hop fields Pingora strips from every request it sends upstream (the
/// others never reach here: requests carrying them go to Pingora), in one pass over the
/// few names the request has.
fn strip_hop_by_hop(req: &mut RequestHeader) {
    crate::route::headers::remove_where(req, |n| {
        matches!(
            n,
            "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "connection"
        )
    });
}

/// An I/O failure talking to the upstream; worth a transparent retry when the connection
/// came from the pool (it may have been closed while idle).
fn upstream_io(etype: ErrorType, context: &'static str, e: std::io::Error) -> Box<Error> {
    let mut e = Error::because(etype, context, e).into_up();
    e.retry = RetryType::ReusedOnly;
    e
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

fn response_framing(
    method: &Method,
    status: StatusCode,
    headers: &http::HeaderMap,
) -> Result<Framing> {
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::None);
    }
    if let Some(te) = headers.get(header::TRANSFER_ENCODING) {
        let chunked = te
            .as_bytes()
            .rsplit(|b| *b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    match headers.get(header::CONTENT_LENGTH) {
        Some(v) => match std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(n) => Ok(Framing::Length(n)),
            None => Error::e_explain(ErrorType::InvalidHTTPHeader, "invalid content-length")
                .map_err(|e| e.into_up()),
        },
        None => Ok(Framing::UntilClose),
    }
}

/// One try: the request head upstream, the response head back, then the body streamed
/// to the client. Ok(true) when the upstream connection can be pooled again.
async fn exchange<S: ClientStream>(
    client: &mut NativeClient<'_, S>,
    ctx: &mut RequestCtx,
    upstream: &mut TcpStream,
    read_timeout: Option<Duration>,
) -> Result<bool> {
    // A copy for this try (retries start from the client's request again), made from the
    // parts: Pingora's clone goes through a request builder.
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = client.req.method.clone();
    parts.uri = client.req.uri.clone();
    parts.headers = client.req.headers.clone();
    let mut req = RequestHeader::from(parts);
    strip_hop_by_hop(&mut req);
    prepare_upstream_request(ctx, &client.req, &mut req);
    let Some(mut wire) = pingora::protocols::http::v1::client::http_req_header_to_wire(&req) else {
        return Error::e_explain(ErrorType::InvalidHTTPHeader, "request head")
            .map_err(|e| e.into_in());
    };
    drop(req);
    // Head and body in one write.
    wire.extend_from_slice(&client.body);
    upstream
        .write_all(&wire)
        .await
        .map_err(|e| upstream_io(ErrorType::WriteError, "writing request header", e))?;

    let mut buf = BytesMut::with_capacity(4096);
    let (mut resp, upstream_keepalive) = loop {
        let parsed = if buf.is_empty() {
            None
        } else {
            parse_response(&mut buf, &mut client.conn.fields)?
        };
        let Some((resp, keepalive)) = parsed else {
            if buf.len() > MAX_HEAD {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "response head too large")
                    .map_err(|e| e.into_up());
            }
            let read = read_upstream(
                upstream,
                &mut client.conn.upstream_read,
                &mut buf,
                read_timeout,
                "while reading response headers",
            );
            tokio::select! {
                biased;
                r = read => r?,
                // As Envoy resets the upstream request when the client goes away first.
                _ = client.conn.io.gone() => {
                    return Error::e_explain(ErrorType::ConnectionClosed, "client closed before the response")
                        .map_err(|e| e.into_down());
                }
            }
            continue;
        };
        if resp.status.is_informational() {
            if resp.status == StatusCode::SWITCHING_PROTOCOLS {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "101 without an upgrade")
                    .map_err(|e| e.into_up());
            }
            // Interim responses nobody asked for (no `Expect` here) are dropped, as Envoy
            // drops them (Pingora's path passes them on).
            continue;
        }
        break (resp, keepalive);
    };
    let from_upstream = response_framing(&client.req.method, resp.status, &resp.headers)?;
    upstream_response_received(ctx, &mut resp, true)?;
    if from_upstream == Framing::UntilClose {
        // As Pingora does: chunked, so that the client connection can be kept.
        resp.set_version(Version::HTTP_11);
        resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    prepare_response(ctx, None, &mut resp)?;
    let to_client = response_framing(&client.req.method, resp.status, &resp.headers)?;
    if to_client == Framing::UntilClose {
        client.keepalive = None;
    }
    client.put_head(&mut resp)?;
    client.response = Some(resp);

    let body_filters = ctx.hcm().is_some_and(|h| !h.filters.filters.is_empty());
    let mut reader = BodyReader::new(from_upstream);
    let mut writer = BodyWriter::new(to_client);
    loop {
        let mut data = reader.decode(&mut buf)?;
        let done = reader.done();
        if body_filters {
            let mut chunk = (!data.is_empty()).then(|| Bytes::copy_from_slice(&data));
            if let Some(hcm) = ctx.hcm() {
                for (i, f) in hcm.filters.filters.iter().enumerate() {
                    f.filter
                        .on_response_body(&mut chunk, done, &filter_context(ctx, i, &f.name));
                }
            }
            data = chunk.map(|c| BytesMut::from(&c[..])).unwrap_or_default();
        }
        client.body_sent += data.len();
        writer.write(&mut client.conn.output, &data, done);
        if done || client.conn.output.len() >= WRITE_CHUNK {
            client.conn.flush().await?;
        }
        if done {
            break;
        }
        if !client.conn.output.is_empty() {
            // Stream what has arrived before waiting for more.
            client.conn.flush().await?;
        }
        match read_upstream(
            upstream,
            &mut client.conn.upstream_read,
            &mut buf,
            read_timeout,
            "while reading response body",
        )
        .await
        {
            Ok(()) => {}
            Err(e) if e.etype() == &ErrorType::ConnectionClosed => {
                if reader.framing == Framing::UntilClose {
                    reader.closed = true;
                    continue;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(upstream_keepalive && reader.framing != Framing::UntilClose && buf.is_empty())
}

/// Reads more of the upstream's response into `buf`.
async fn read_upstream(
    upstream: &mut TcpStream,
    timer: &mut Deadline,
    buf: &mut BytesMut,
    timeout: Option<Duration>,
    context: &'static str,
) -> Result<()> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(16 * 1024);
    }
    match timer.within(timeout, upstream.read_buf(buf)).await {
        None => Error::e_explain(ErrorType::ReadTimedout, context).map_err(|e| e.into_up()),
        Some(Ok(0)) => {
            let mut e = Error::explain(ErrorType::ConnectionClosed, context).into_up();
            e.retry = RetryType::ReusedOnly;
            Err(e)
        }
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(upstream_io(ErrorType::ReadError, context, e)),
    }
}

/// A complete response head taken off the front of `buf`: the header (its values slices of
/// the head's bytes), and whether the upstream keeps the connection open afterwards.
fn parse_response(
    buf: &mut BytesMut,
    fields: &mut Vec<Field>,
) -> Result<Option<(ResponseHeader, bool)>> {
    let bad = |what: &str| {
        Error::explain(
            ErrorType::InvalidHTTPHeader,
            format!("response head: {what}"),
        )
        .into_up()
    };
    fields.clear();
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(&e.to_string())),
    };
    let code = resp.code.ok_or_else(|| bad("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| bad("status"))?;
    let http10 = resp.version == Some(0);
    let mut keepalive = !http10;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("header name"))?;
        if name == header::CONNECTION {
            for t in h.value.split(|b| *b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    keepalive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    keepalive = true;
                }
            }
        }
        fields.push((name, span(buf, h.value)));
    }
    let bytes = buf.split_to(len).freeze();
    let mut map = http::HeaderMap::with_capacity(fields.len() + ROOM);
    for (name, value) in fields.drain(..) {
        let value =
            HeaderValue::from_maybe_shared(bytes.slice(value)).map_err(|_| bad("header value"))?;
        map.append(name, value);
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    parts.headers = map;
    let head = ResponseHeader::from(parts);
    Ok(Some((head, keepalive)))
}

/// Takes body bytes off the front of the upstream buffer as the framing delimits them.
struct BodyReader {
    framing: Framing,
    /// Bytes left in a length-delimited body, or in the current chunk.
    left: u64,
    state: ChunkState,
    /// The upstream closed (ends an until-close body).
    closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data,
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl BodyReader {
    fn new(framing: Framing) -> Self {
        BodyReader {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            state: ChunkState::Size,
            closed: false,
        }
    }

    fn done(&self) -> bool {
        match self.framing {
            Framing::None => true,
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.state == ChunkState::Done,
            Framing::UntilClose => self.closed,
        }
    }

    /// The body bytes now available; consumes them (and chunk framing) from `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<BytesMut> {
        match self.framing {
            Framing::None => Ok(BytesMut::new()),
            Framing::Length(_) => {
                let n = (self.left.min(buf.len() as u64)) as usize;
                self.left -= n as u64;
                Ok(buf.split_to(n))
            }
            Framing::UntilClose => Ok(buf.split()),
            Framing::Chunked => self.decode_chunked(buf),
        }
    }

    fn decode_chunked(&mut self, buf: &mut BytesMut) -> Result<BytesMut> {
        let bad = || Error::explain(ErrorType::InvalidHTTPHeader, "chunked body").into_up();
        let mut out = BytesMut::new();
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > 4096 {
                            return Err(bad());
                        }
                        return Ok(out);
                    };
                    let line = &buf[..end];
                    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                        .ok_or_else(bad)?;
                    buf.advance(end + 2);
                    self.left = size;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    if buf.is_empty() {
                        return Ok(out);
                    }
                    let n = (self.left.min(buf.len() as u64)) as usize;
                    out.extend_from_slice(&buf.split_to(n));
                    self.left -= n as u64;
                    if self.left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(out);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad());
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    // Trailers are dropped, as Pingora does on HTTP/1.
                    let Some(end) = find_crlf(buf) else {
                        return Ok(out);
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(out),
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Frames body bytes for the client.
struct BodyWriter {
    framing: Framing,
    /// Bytes still allowed in a length-delimited body (Pingora drops any excess).
    left: u64,
}

impl BodyWriter {
    fn new(framing: Framing) -> Self {
        BodyWriter {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
        }
    }

    fn write(&mut self, out: &mut BytesMut, data: &[u8], end: bool) {
        match self.framing {
            Framing::None => {}
            Framing::Length(_) => {
                let n = (self.left.min(data.len() as u64)) as usize;
                out.put_slice(&data[..n]);
                self.left -= n as u64;
            }
            Framing::UntilClose => out.put_slice(data),
            Framing::Chunked => {
                if !data.is_empty() {
                    use std::fmt::Write;
                    let _ = write!(out, "{:X}\r\n", data.len());
                    out.put_slice(data);
                    out.put_slice(b"\r\n");
                }
                if end {
                    out.put_slice(b"0\r\n\r\n");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Parsed {
        parse_request(raw.as_bytes(), &mut Vec::new(), MAX_BODY)
    }

    #[test]
    fn simple_requests_stay_and_the_rest_go_to_pingora() {
        assert!(matches!(
            head("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"),
            Parsed::Complete(Head { body: 0, .. })
        ));
        assert!(matches!(
            head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab"),
            Parsed::Complete(Head { body: 3, .. })
        ));
        assert!(matches!(
            head("GET /a HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(
            head("POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n"),
            Parsed::Complete(Head {
                body: 3,
                expect_continue: true,
                ..
            })
        ));
        for raw in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nExpect: x-other\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(matches!(head(raw), Parsed::Elsewhere), "{raw:?}");
        }
    }

    /// What `serve` does with a complete head: the header, built over the head's bytes.
    fn built(raw: &str) -> RequestHeader {
        let mut fields = Vec::new();
        let Parsed::Complete(head) = parse_request(raw.as_bytes(), &mut fields, MAX_BODY) else {
            panic!("not taken: {raw:?}");
        };
        let bytes = Bytes::copy_from_slice(&raw.as_bytes()[..head.len]);
        head.build(bytes, &mut fields)
            .unwrap_or_else(|_| panic!("refused: {raw:?}"))
    }

    #[test]
    fn heads_build_as_pingora_reads_them() {
        let req = built("GET /a/b?c=1&d HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(req.method, Method::GET);
        assert_eq!(req.uri.path_and_query().unwrap().as_str(), "/a/b?c=1&d");
        assert_eq!(req.version, Version::HTTP_11);
        let a: Vec<_> = req.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(req.headers.get("host").unwrap(), "x");
        // Targets Envoy refuses (a fragment, non-ASCII bytes, a space) are not taken: they
        // go to Pingora's side, where the same judgement refuses them.
        for target in ["/a#frag", "/caf\u{e9}?x=\u{e9}", "/a b"] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(matches!(head(&raw), Parsed::Elsewhere), "{target}");
        }
    }

    #[tokio::test]
    async fn the_sweep_drops_idle_connections_that_closed_or_timed_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut pool = Pool::default();
        let mut servers = Vec::new();
        for (key, timeout) in [
            (1, Duration::from_secs(60)),
            (2, Duration::from_secs(60)),
            (3, Duration::ZERO),
        ] {
            let stream = TcpStream::connect(addr).await.unwrap();
            servers.push(listener.accept().await.unwrap().0);
            pool.idle.entry((key, addr)).or_default().push(Idle {
                stream,
                since: Instant::now(),
                timeout,
            });
        }
        // The upstream of key 2 closes its end; key 3's connection has outlived its timeout.
        drop(servers.remove(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.sweep(Instant::now());
        let left: Vec<u64> = pool.idle.keys().map(|(k, _)| *k).collect();
        assert_eq!(left, [1]);
        // Within SWEEP_EVERY of the last sweep nothing is walked again.
        drop(servers.remove(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.sweep(Instant::now());
        assert_eq!(pool.idle.len(), 1);
    }

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let mut r = BodyReader::new(Framing::Chunked);
        let mut got = Vec::new();
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        let mut buf = BytesMut::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            got.extend_from_slice(&r.decode(&mut buf).expect("valid chunked body"));
        }
        assert_eq!(got, b"hello world");
        assert!(r.done());
        assert!(buf.is_empty());
        let mut bad = BytesMut::from(&b"zz\r\n"[..]);
        assert!(BodyReader::new(Framing::Chunked).decode(&mut bad).is_err());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let mut h = http::HeaderMap::new();
        let get = Method::GET;
        assert_eq!(
            response_framing(&get, StatusCode::OK, &h).ok(),
            Some(Framing::UntilClose)
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(
            response_framing(&get, StatusCode::OK, &h).ok(),
            Some(Framing::Length(12))
        );
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        assert_eq!(
            response_framing(&get, StatusCode::OK, &h).ok(),
            Some(Framing::Chunked)
        );
        assert_eq!(
            response_framing(&Method::HEAD, StatusCode::OK, &h).ok(),
            Some(Framing::None)
        );
        assert_eq!(
            response_framing(&get, StatusCode::NOT_MODIFIED, &h).ok(),
            Some(Framing::None)
        );
    }
}
