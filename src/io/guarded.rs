//! The downstream reading side for Pingora's HTTP/1 reader: bytes reach it only once
//! `http1::RequestStream` has judged them, request by request.
//!
//! Pingora's reader is lenient where Envoy's codec is strict (it percent-escapes a space
//! in the target, takes repeated or listed content-lengths, reads odd chunk framing), and
//! a request it takes has already gone upstream by the time a hook could look at it. So
//! a refused head never reaches it as it came: it reads a stand-in head instead, marked
//! with a field no client can name (`refused_head`), which the request logic answers as
//! Envoy answers a head its codec refuses (400, closed, access-logged as DPE, counted). A body refused part-way fails the read, which aborts
//! the upstream request before its end (the upstream never sees a complete request) and
//! answers 400 if no response has started (`is_malformed_request`).

use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::ReadBuf;

use crate::http1::{Refusal, RequestStream, Scanned};

/// The field that marks the stand-in for a refused head: `x-legate-refused-` and 128
/// random bits drawn once per process, so that no client can send it.
pub fn refused_head() -> &'static http::HeaderName {
    static NAME: std::sync::OnceLock<http::HeaderName> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let name = format!("x-legate-refused-{:032x}", rand::random::<u128>());
        http::HeaderName::from_bytes(name.as_bytes()).unwrap_or(http::header::EXPECT)
    })
}

/// What the reader reads in place of a refused head.
fn stand_in(why: Refusal) -> BytesMut {
    let mut head = BytesMut::from(&b"GET / HTTP/1.1\r\nhost: refused\r\nconnection: close\r\n"[..]);
    head.extend_from_slice(refused_head().as_str().as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(why.0.as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}
/// Bytes read at a time while a head is held back.
const READ_MORE: usize = 8 * 1024;

/// The error a body read fails with when the body's framing is refused.
#[derive(Debug)]
struct MalformedBody(Refusal);

impl std::fmt::Display for MalformedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed request body: {}", self.0)
    }
}

impl std::error::Error for MalformedBody {}

/// Whether a request failed because its body's framing was refused (answered 400).
pub fn is_malformed_request(e: &pingora::Error) -> bool {
    e.root_cause()
        .downcast_ref::<io::Error>()
        .and_then(|e| e.get_ref())
        .is_some_and(|inner| inner.is::<MalformedBody>())
}

#[derive(Debug, Default)]
pub struct Guarded {
    judge: RequestStream,
    /// Read from the connection and not yet handed on: `good` bytes judged good (a
    /// rewritten head among them), then bytes held back (a head not yet complete), not
    /// yet judged (`unjudged`: they followed a rewritten head), or refused.
    pending: BytesMut,
    good: usize,
    unjudged: bool,
    refused: Option<crate::http1::Refused>,
    /// The refusal was handed on; from now on the connection reads as ended.
    ended: bool,
    /// A read failed (a request timer ran out) while a head was held back: handed on
    /// after one byte of it, so that the reader knows a request had begun (Pingora then
    /// shuts the connection down, which sends the 408) yet cannot take a request from it.
    failed: Option<io::Error>,
}

impl Guarded {
    /// Reads into `buf` through `read` (the connection's own read), judged.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        mut read: impl FnMut(&mut Context<'_>, &mut ReadBuf<'_>) -> Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.good > 0 {
                let n = self.good.min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                self.good -= n;
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = self.failed.take() {
                return Poll::Ready(Err(e));
            }
            if let Some(refused) = self.refused {
                if std::mem::replace(&mut self.ended, true) {
                    return Poll::Ready(Ok(()));
                }
                if refused.in_body {
                    let e = io::Error::new(io::ErrorKind::InvalidData, MalformedBody(refused.why));
                    return Poll::Ready(Err(e));
                }
                log::debug!("request head refused: {}", refused.why);
                self.pending = stand_in(refused.why);
                self.good = self.pending.len();
                continue;
            }
            if std::mem::take(&mut self.unjudged) {
                self.judge_pending();
                continue;
            }
            if self.pending.is_empty() {
                // Nothing held back: straight into the reader's buffer, keeping there what
                // is judged good.
                let before = buf.filled().len();
                std::task::ready!(read(cx, buf))?;
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let judged = self.judge.scan(new);
                self.pending.extend_from_slice(&new[judged.good..]);
                buf.set_filled(before + judged.good);
                let handed = judged.good > 0;
                self.apply(judged, 0);
                if handed {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // A head held back: read more after it.
            let held = self.pending.len();
            self.pending.resize(held + READ_MORE, 0);
            let mut more = ReadBuf::new(&mut self.pending[held..]);
            let polled = read(cx, &mut more);
            let n = more.filled().len();
            self.pending.truncate(held + n);
            match std::task::ready!(polled) {
                Err(e) => {
                    self.good = 1;
                    self.failed = Some(e);
                    continue;
                }
                // The client ended mid-head: the connection ends, as Envoy ends it.
                Ok(()) if n == 0 => return Poll::Ready(Ok(())),
                Ok(()) => {}
            }
            self.judge_pending();
        }
    }

    /// Judges `pending` (all of it unjudged).
    fn judge_pending(&mut self) {
        let judged = self.judge.scan(&self.pending);
        let good = judged.good;
        self.apply(judged, good);
    }

    /// Takes in a judgement of the bytes of `pending` from `good` on (`good` bytes before
    /// them are good).
    fn apply(&mut self, judged: Scanned, good: usize) {
        self.good = good;
        self.refused = judged.refused;
        if let Some(rewrite) = judged.rewrite {
            let mut pending = BytesMut::with_capacity(self.pending.len() + rewrite.head.len());
            pending.extend_from_slice(&self.pending[..good]);
            pending.extend_from_slice(&rewrite.head);
            pending.extend_from_slice(&self.pending[good + rewrite.len..]);
            self.pending = pending;
            self.good += rewrite.head.len();
            self.unjudged = true;
        }
    }
}
