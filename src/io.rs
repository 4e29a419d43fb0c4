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
}

impl ConnectionInfo {
    pub fn new(chain: usize, tls: Option<TlsInfo>) -> Self {
        ConnectionInfo {
            chain,
            tls,
            accepted: std::time::Instant::now(),
            requests: std::sync::atomic::AtomicU32::new(0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub sni: Option<String>,
    pub version: &'static str,
    pub cipher: &'static str,
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

#[derive(Debug)]
pub struct Downstream<T: Transport> {
    io: BufWriter<T>,
    /// Pingora peeks for the HTTP/2 preface before every request on a connection; only the
    /// first can carry it, and only where the codec allows h2c.
    peek_h2c: bool,
    info: Option<Arc<ProxyDigest>>,
    ssl: Option<Arc<SslDigest>>,
}

impl<T: Transport> Downstream<T> {
    pub fn new(stream: T, info: Option<ConnectionInfo>, h2c: bool) -> Self {
        let ssl = info
            .as_ref()
            .and_then(|i| i.tls.as_ref())
            .map(|t| Arc::new(SslDigest::new(t.cipher, t.version, None, None, Vec::new())));
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
        }
    }
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
        Pin::new(&mut self.io).poll_read(cx, buf)
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
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[async_trait]
impl<T: Transport> Shutdown for Downstream<T> {
    async fn shutdown(&mut self) {
        // Flushes what is buffered (it belongs to the client), sends TLS close_notify on
        // TLS connections, then shuts the socket's write side.
        let _ = AsyncWriteExt::shutdown(&mut self.io).await;
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
