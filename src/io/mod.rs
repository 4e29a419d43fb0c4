//! The downstream connection type handed to Pingora.
//!
//! Pingora's own listeners wrap each accepted socket in a write buffer of one MSS, and its
//! HTTP/1 code relies on that: it flushes only at the end of a response whose length is
//! known, so header and body go out in one `send`. legate accepts connections itself
//! (per-worker `SO_REUSEPORT` sockets, runtime listeners) and Pingora's buffer setter is
//! crate-private, so this wrapper restores the same buffering around the raw L4 stream
//! (and around TLS, so that a response is one TLS record where it fits).
//!
//! It also carries what was decided when the connection was accepted (the filter chain,
//! TLS details) to the request hooks: Pingora copies a stream's "proxy digest" into every
//! request's digest, for HTTP/1 and HTTP/2 alike, and its `user_data` slot is free on
//! downstream connections (Pingora fills it only for upstream CONNECT proxies).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::ALPN;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};

mod guarded;
pub use guarded::{is_malformed_request, refused_head};

/// Pingora's `DEFAULT_L4_WRITE_BUFFER_SIZE`: one Ethernet MSS.
const WRITE_BUFFER: usize = 1460;

/// What the accept path learned about a connection, and its per-connection counters.
#[derive(Debug)]
pub struct ConnectionInfo {
    /// Index into the listener's filter chains.
    pub chain: usize,
    /// Set on TLS connections.
    pub tls: Option<TlsInfo>,
    pub accepted: std::time::Instant,
    /// Requests seen so far (for `max_requests_per_connection`).
    pub requests: std::sync::atomic::AtomicU32,
    /// Set when the connection manager has header or request timeouts.
    pub clock: Option<Arc<RequestClock>>,
    /// Tells Pingora to drain the connection (HTTP/2: GOAWAY, then close when the streams
    /// in flight end). Set where the connection manager limits connections by age or by
    /// requests, which HTTP/1's keep-alive switch cannot do for HTTP/2.
    pub drain: Option<Arc<tokio::sync::watch::Sender<bool>>>,
    /// HTTP/2 streams in flight, and when the last one ended (ms after `accepted`), for
    /// `idle_timeout` on HTTP/2 (HTTP/1 uses Pingora's keep-alive timeout).
    pub http2: std::sync::atomic::AtomicBool,
    pub streams: std::sync::atomic::AtomicU32,
    pub idle_since_ms: std::sync::atomic::AtomicU64,
}

impl ConnectionInfo {
    pub fn new(
        chain: usize,
        tls: Option<TlsInfo>,
        hcm: &crate::listener::HttpConnectionManager,
        drain: Option<Arc<tokio::sync::watch::Sender<bool>>>,
    ) -> Self {
        let limited = Self::drains(hcm, tls.is_some());
        ConnectionInfo {
            chain,
            tls,
            accepted: std::time::Instant::now(),
            requests: std::sync::atomic::AtomicU32::new(0),
            clock: RequestClock::for_hcm(hcm).map(Arc::new),
            drain: drain.filter(|_| limited),
            http2: false.into(),
            streams: 0.into(),
            idle_since_ms: 0.into(),
        }
    }

    fn mark_http2(&self) {
        self.http2.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the connection manager needs per-connection state.
    /// Whether the connection manager may drain a connection on its own (age, request
    /// count, or idle on a connection that may speak HTTP/2: plaintext AUTO codec or TLS).
    pub fn drains(hcm: &crate::listener::HttpConnectionManager, tls: bool) -> bool {
        hcm.limits.max_connection_duration.is_some()
            || hcm.limits.max_requests_per_connection.is_some()
            || (hcm.h2c || tls) && hcm.idle_timeout.is_some()
    }

    pub fn needed(hcm: &crate::listener::HttpConnectionManager) -> bool {
        Self::drains(hcm, false)
            || hcm.request_timeout.is_some()
            || hcm.request_headers_timeout.is_some()
    }
}

/// Envoy's `request_headers_timeout` and `request_timeout` on an HTTP/1 connection.
///
/// Envoy starts both timers when a request's first byte arrives; the headers timer stops
/// when the headers are complete, the request timer when the whole request has been read or
/// the response has started. Pingora reads request headers inside its own loop and offers
/// only a per-read timeout, so the clock runs in the connection's read path: the first
/// bytes read while idle start it, and the request hooks move it along. A read still
/// waiting at a deadline fails with `TimedOut`, which ends the request with Envoy's 408.
///
/// On HTTP/2 connections the clock is off: streams share the connection.
#[derive(Debug)]
pub struct RequestClock {
    headers: Option<Duration>,
    request: Option<Duration>,
    /// For the reply the connection writes itself.
    server: String,
    phase: std::sync::atomic::AtomicU8,
    /// Which timer fired, in which phase (`FIRED_*`); 0 while none has.
    fired: std::sync::atomic::AtomicU8,
}

const FIRED_HEADERS: u8 = 1;
const FIRED_REQUEST_IN_HEADERS: u8 = 2;
const FIRED_REQUEST_IN_BODY: u8 = 3;

/// Which timer ended a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Headers,
    Request,
}

impl RequestClock {
    /// Between requests: the next bytes read start the clock.
    const IDLE: u8 = 0;
    const HEADERS: u8 = 1;
    /// Headers done; only the request timer runs.
    const BODY: u8 = 2;
    /// Request read or response started: no timer until the next request.
    const DONE: u8 = 3;
    /// An HTTP/2 connection.
    const OFF: u8 = 4;

    fn for_hcm(hcm: &crate::listener::HttpConnectionManager) -> Option<Self> {
        if hcm.request_headers_timeout.is_none() && hcm.request_timeout.is_none() {
            return None;
        }
        Some(RequestClock {
            headers: hcm.request_headers_timeout,
            request: hcm.request_timeout,
            server: hcm.server_name.clone(),
            phase: Self::IDLE.into(),
            fired: 0.into(),
        })
    }

    fn set(&self, phase: u8) {
        use std::sync::atomic::Ordering::Relaxed;
        // An HTTP/2 connection stays off whatever its streams' hooks do.
        let _ = self
            .phase
            .fetch_update(Relaxed, Relaxed, |p| (p != Self::OFF).then_some(phase));
    }

    /// The request's headers are parsed.
    pub fn headers_done(&self) {
        self.set(Self::BODY);
    }

    /// The request is read in full, or the response has started.
    pub fn request_done(&self) {
        self.set(Self::DONE);
    }

    /// The request has ended; the next bytes belong to the next request.
    pub fn next_request(&self) {
        self.set(Self::IDLE);
    }

    /// The timer that ended the current request, if one did.
    pub fn expired(&self) -> Option<Expired> {
        match self.fired.load(std::sync::atomic::Ordering::Relaxed) {
            FIRED_HEADERS => Some(Expired::Headers),
            FIRED_REQUEST_IN_HEADERS | FIRED_REQUEST_IN_BODY => Some(Expired::Request),
            _ => None,
        }
    }

    /// When a timer stops the read of the current request, and which.
    fn deadline(&self, started: tokio::time::Instant) -> Option<(tokio::time::Instant, u8)> {
        let at = |d: Option<Duration>| d.map(|d| started + d);
        match self.phase.load(std::sync::atomic::Ordering::Relaxed) {
            Self::HEADERS => match (at(self.headers), at(self.request)) {
                (Some(h), Some(r)) if r < h => Some((r, FIRED_REQUEST_IN_HEADERS)),
                (Some(h), _) => Some((h, FIRED_HEADERS)),
                (None, Some(r)) => Some((r, FIRED_REQUEST_IN_HEADERS)),
                (None, None) => None,
            },
            Self::BODY => at(self.request).map(|r| (r, FIRED_REQUEST_IN_BODY)),
            _ => None,
        }
    }

    /// Envoy's local reply for a request whose headers never completed, written by the
    /// connection itself because Pingora has no request to answer yet. (A request timed
    /// out in its body is answered by the proxy's failure hook.)
    fn header_phase_reply(&self) -> Option<Vec<u8>> {
        let body = match self.fired.load(std::sync::atomic::Ordering::Relaxed) {
            FIRED_HEADERS => "request header timeout",
            FIRED_REQUEST_IN_HEADERS => "request timeout",
            _ => return None,
        };
        let server = &self.server;
        let date = pingora::protocols::http::date::get_cached_date();
        Some(
            format!(
                "HTTP/1.1 408 Request Timeout\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\
                 date: {}\r\nserver: {server}\r\nconnection: close\r\n\r\n{body}",
                body.len(),
                date.to_str().unwrap_or_default(),
            )
            .into_bytes(),
        )
    }
}

#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub sni: Option<String>,
    pub version: &'static str,
    pub cipher: &'static str,
    /// The client presented a certificate (and it passed the context's checks).
    pub peer_certificate: bool,
}

/// The transport under the HTTP codec: a TCP stream, or TLS over one.
pub trait Transport:
    AsyncRead + AsyncWrite + Unpin + Send + Sync + std::fmt::Debug + 'static
{
    fn l4(&self) -> &L4Stream;
    fn l4_mut(&mut self) -> &mut L4Stream;
    fn alpn(&self) -> Option<ALPN> {
        None
    }
}

impl Transport for L4Stream {
    fn l4(&self) -> &L4Stream {
        self
    }
    fn l4_mut(&mut self) -> &mut L4Stream {
        self
    }
}

impl Transport for tokio_rustls::server::TlsStream<L4Stream> {
    fn l4(&self) -> &L4Stream {
        self.get_ref().0
    }
    fn l4_mut(&mut self) -> &mut L4Stream {
        self.get_mut().0
    }
    fn alpn(&self) -> Option<ALPN> {
        match self.get_ref().1.alpn_protocol()? {
            b"h2" => Some(ALPN::H2),
            b"http/1.1" => Some(ALPN::H1),
            _ => None,
        }
    }
}

/// A transport with bytes already read from it in front: what legate's HTTP/1 engine read
/// (decrypted, on TLS) before handing the connection to Pingora.
#[derive(Debug)]
pub struct Replayed<T> {
    unread: bytes::BytesMut,
    inner: T,
}

impl<T> Replayed<T> {
    pub fn new(inner: T, unread: bytes::BytesMut) -> Self {
        Replayed { unread, inner }
    }
}

impl<T: Transport> AsyncRead for Replayed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: Transport> AsyncWrite for Replayed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Transport> Transport for Replayed<T> {
    fn l4(&self) -> &L4Stream {
        self.inner.l4()
    }
    fn l4_mut(&mut self) -> &mut L4Stream {
        self.inner.l4_mut()
    }
    fn alpn(&self) -> Option<ALPN> {
        self.inner.alpn()
    }
}

#[derive(Debug)]
pub struct Downstream<T: Transport> {
    io: BufWriter<T>,
    /// Pingora peeks for the HTTP/2 preface before every request on a connection; only the
    /// first can carry it, and only where the codec allows h2c.
    peek_h2c: bool,
    info: Option<Arc<ProxyDigest>>,
    ssl: Option<Arc<SslDigest>>,
    clock: Option<Arc<RequestClock>>,
    /// Allocated at the first wait that has a deadline, then reset per request.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the current request's first byte arrived.
    started: tokio::time::Instant,
    /// The 408 being written at shutdown, and how much of it went out.
    timeout_reply: Option<(Vec<u8>, usize)>,
    /// HTTP/1 request bytes are judged before Pingora reads them (None under TLS's h2).
    guard: Option<Box<guarded::Guarded>>,
    /// The most read from the connection at a time: the listener's
    /// `per_connection_buffer_limit_bytes`. A read is passed on before much more is read
    /// (Pingora queues at most four reads towards the upstream), so what a connection
    /// holds unsent stays within a few times this.
    read_limit: usize,
}

impl<T: Transport> Downstream<T> {
    pub fn new(stream: T, info: Option<ConnectionInfo>, h2c: bool, read_limit: usize) -> Self {
        let ssl = info
            .as_ref()
            .and_then(|i| i.tls.as_ref())
            .map(|t| Arc::new(SslDigest::new(t.cipher, t.version, None, None, Vec::new())));
        let clock = info.as_ref().and_then(|i| i.clock.clone());
        let h2 = matches!(stream.alpn(), Some(ALPN::H2));
        if h2 {
            if let Some(c) = &clock {
                c.phase
                    .store(RequestClock::OFF, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(i) = &info {
                i.mark_http2();
            }
        }
        let info = info.and_then(|i| {
            // The response header is required by the type and never read.
            let unused = pingora::http::ResponseHeader::build(200, Some(0)).ok()?;
            Some(Arc::new(ProxyDigest::new(
                Box::new(unused),
                Some(Box::new(i)),
            )))
        });
        Downstream {
            io: BufWriter::with_capacity(WRITE_BUFFER, stream),
            peek_h2c: h2c,
            info,
            ssl,
            clock,
            timer: None,
            started: tokio::time::Instant::now(),
            timeout_reply: None,
            guard: (!h2).then(Default::default),
            read_limit: read_limit.max(1),
        }
    }
}

impl<T: Transport> Downstream<T> {
    fn connection_info(&self) -> Option<&ConnectionInfo> {
        self.info.as_ref()?.user_data.as_ref()?.downcast_ref()
    }
}

/// The connection's info behind a stream's proxy digest.
pub fn info_of(digest: &ProxyDigest) -> Option<&ConnectionInfo> {
    digest.user_data.as_ref()?.downcast_ref()
}

/// The connection's info as recorded at accept (None on plain single-chain listeners).
pub fn connection_info(session: &pingora::proxy::Session) -> Option<&ConnectionInfo> {
    session
        .digest()?
        .proxy_digest
        .as_ref()?
        .user_data
        .as_ref()?
        .downcast_ref::<ConnectionInfo>()
}

/// The connection's header/request timers, where the connection manager sets any.
pub fn request_clock(session: &pingora::proxy::Session) -> Option<&RequestClock> {
    connection_info(session)?.clock.as_deref()
}

/// The filter chain the connection was matched to (0 when there was nothing to choose).
pub fn connection_chain(session: &pingora::proxy::Session) -> usize {
    connection_info(session).map_or(0, |i| i.chain)
}

impl<T: Transport> AsyncRead for Downstream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() > this.read_limit {
            let mut limited = buf.take(this.read_limit);
            let r = this.poll_read_judged(cx, &mut limited);
            let n = limited.filled().len();
            // SAFETY: `limited` is the start of `buf`'s unfilled part, and its first `n`
            // bytes were filled by the read.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            return r;
        }
        this.poll_read_judged(cx, buf)
    }
}

impl<T: Transport> Downstream<T> {
    fn poll_read_judged(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(mut guard) = self.guard.take() else {
            return self.poll_read_timed(cx, buf);
        };
        let r = guard.poll_read(cx, buf, |cx, buf| self.poll_read_timed(cx, buf));
        self.guard = Some(guard);
        r
    }
}

impl<T: Transport> Downstream<T> {
    /// Reads from the connection, failing with a timeout once the connection manager's
    /// request or header timer runs out.
    fn poll_read_timed(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        let Some(clock) = &this.clock else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let idle =
                    clock.phase.load(std::sync::atomic::Ordering::Relaxed) == RequestClock::IDLE;
                if idle && buf.filled().len() > before {
                    clock.set(RequestClock::HEADERS);
                    this.started = tokio::time::Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some((at, fired)) = clock.deadline(this.started) else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                clock
                    .fired
                    .store(fired, std::sync::atomic::Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request timeout",
                )))
            }
            failed => failed,
        }
    }
}

impl<T: Transport> AsyncWrite for Downstream<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Pingora closes a connection whose request headers could not be read without
        // answering; a timed-out request gets Envoy's 408 first.
        let this = &mut *self;
        if let Some(clock) = this.clock.take() {
            this.timeout_reply = clock.header_phase_reply().map(|r| (r, 0));
        }
        while let Some((reply, sent)) = &mut this.timeout_reply {
            match Pin::new(&mut this.io).poll_write(cx, &reply[*sent..]) {
                Poll::Ready(Ok(n)) if n > 0 && *sent + n < reply.len() => *sent += n,
                Poll::Ready(_) => this.timeout_reply = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[async_trait]
impl<T: Transport> Shutdown for Downstream<T> {
    async fn shutdown(&mut self) {
        // Flushes what is buffered (it belongs to the client), sends TLS close_notify on
        // TLS connections, then shuts the socket's write side.
        let _ = AsyncWriteExt::shutdown(self).await;
    }
}

impl<T: Transport> UniqueID for Downstream<T> {
    fn id(&self) -> UniqueIDType {
        self.io.get_ref().l4().id()
    }
}

impl<T: Transport> Ssl for Downstream<T> {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.ssl.clone()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.io.get_ref().alpn()
    }
}

#[async_trait]
impl<T: Transport> Peek for Downstream<T> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        // "Cannot peek" makes Pingora read HTTP/1 without waiting for preface-sized input.
        if !std::mem::take(&mut self.peek_h2c) {
            return Ok(false);
        }
        // Pingora's own peek waits for the full preface length, which hangs a short HTTP/1
        // request (`GET / HTTP/1.0` with no headers is 18 bytes); stop reading as soon as
        // the bytes cannot be the preface. What was read is put back for the codec.
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let l4 = self.io.get_mut().l4_mut();
        let want = buf.len().min(PREFACE.len());
        let mut filled = 0;
        while filled < want {
            let n = l4.read(&mut buf[filled..want]).await?;
            if n == 0 {
                break;
            }
            filled += n;
            if buf[..filled] != PREFACE[..filled] {
                break;
            }
        }
        l4.rewind(&buf[..filled]);
        if buf[..filled] == PREFACE[..] {
            if let Some(c) = &self.clock {
                c.phase
                    .store(RequestClock::OFF, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(i) = self.connection_info() {
                i.mark_http2();
            }
        }
        // Leftover bytes of `buf` must not complete a preface by accident.
        buf[filled..].fill(0);
        Ok(true)
    }
}

impl<T: Transport> GetTimingDigest for Downstream<T> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.io.get_ref().l4().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.io.get_ref().l4().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.io.get_ref().l4().get_write_pending_time()
    }
}

impl<T: Transport> GetProxyDigest for Downstream<T> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.info.clone()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.info = Some(Arc::new(digest));
    }
}

impl<T: Transport> GetSocketDigest for Downstream<T> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.io.get_ref().l4().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.io.get_mut().l4_mut().set_socket_digest(digest)
    }
}

impl<T: Transport> Drop for Downstream<T> {
    fn drop(&mut self) {
        // As Pingora's own stream does: a response written just before the connection is
        // closed (not kept alive) may still sit in the buffer. The socket is writable in
        // practice, so one non-blocking attempt delivers it.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = Pin::new(&mut self.io).poll_flush(&mut cx);
    }
}
