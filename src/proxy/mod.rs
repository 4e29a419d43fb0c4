//! The request path: Pingora's `ProxyHttp` hooks, in the order a request meets them. Each
//! hook is short; decisions live in `route`, `cluster`, `retry` and this module's helpers.

mod attempt;
mod downstream;
mod local_reply;
pub(crate) mod names;
mod native;
mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};

use crate::cluster::circuit::Slot;
use crate::cluster::host::{ActiveRequest, Host};
use crate::cluster::outlier::Outcome;
use crate::cluster::Cluster;
use crate::filter::{FilterContext, FilterDecision};
use crate::listener::{HttpConnectionManager, Listener};
use crate::retry::{effective_policy, Failure};
use crate::route::headers::FormatContext;
use crate::route::{Action, ClusterChoice, Matched, RequestView};
use crate::snapshot::Snapshot;
use attempt::Attempts;
pub use downstream::node_address;
pub use local_reply::LocalReply;
use local_reply::{NO_HEALTHY_UPSTREAM, UPSTREAM_TIMEOUT};

/// The error `upstream_response_filter` returns to make Pingora try again after a response
/// the retry policy covers; that response never reaches the client.
const RETRY_ON_RESPONSE: ErrorType = ErrorType::Custom("retry on upstream response");
/// Envoy's default `stream_idle_timeout`, applied to upgraded (tunnelled) requests.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// No endpoint left to try.
const NO_HOST: ErrorType = ErrorType::Custom("no healthy upstream");

/// Whether legate's own HTTP/1 engine can serve this listener's connections without
/// looking at them first: plaintext, one filter chain that it can serve.
pub(crate) fn native_serves(listener: &Listener) -> bool {
    !listener.inspect
        && listener.chains.len() == 1
        && listener
            .chains
            .first()
            .is_some_and(|c| c.tls.is_none() && native_serves_chain(c))
}

/// Whether the engine can serve a filter chain's HTTP/1.1 connections: no per-connection
/// state (request timers, connection age or request-count limits), which only the
/// Pingora path keeps so far. (The HTTP/2 idle drain does not matter: an h2c or h2
/// connection goes to Pingora.)
pub(crate) fn native_serves_chain(chain: &crate::listener::Chain) -> bool {
    let hcm = &chain.hcm;
    hcm.request_timeout.is_none()
        && hcm.request_headers_timeout.is_none()
        && hcm.limits.max_connection_duration.is_none()
        && hcm.limits.max_requests_per_connection.is_none()
}

pub(crate) use native::serve as serve_native;

/// The proxy behind every listener; a connection's local address tells which listener's
/// HCM applies.
pub struct LegateProxy {
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl LegateProxy {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>) -> Self {
        LegateProxy { snapshot }
    }
}

/// Per-request state. The snapshot loaded in the first hook is kept to the end, so a config
/// change never alters a request in flight.
#[derive(Default)]
pub struct RequestCtx {
    listener: Option<Arc<Listener>>,
    /// Counted in the connection's HTTP/2 streams in flight (for its idle timeout).
    counted_stream: bool,
    /// The listener's filter chain this connection was matched to.
    chain: usize,
    /// Envoy's `%PROTOCOL%`: HTTP/1.1 or HTTP/2.
    protocol: &'static str,
    /// An allowed upgrade (WebSocket): the connection becomes a tunnel after 101.
    upgrade: bool,
    /// A body follows the request head, as the client framed it (decided before any
    /// header edit).
    body_follows: bool,
    /// The stand-in for a head the HTTP/1 judge refused (`io::refused_head`).
    refused_head: bool,
    /// One state slot per HTTP filter (empty when the HCM has none).
    filter_state: Vec<crate::filter::FilterState>,
    snapshot: Option<Arc<Snapshot>>,
    route: Option<(usize, usize)>,
    weighted: Option<usize>,
    cluster: Option<Arc<Cluster>>,
    host: Option<Arc<Host>>,
    active: Option<ActiveRequest>,
    request_id: Option<HeaderValue>,
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
    /// The client as the HCM determined it (x-forwarded-for aware).
    client_ip: Option<std::net::IpAddr>,
    hash: Option<u64>,
    /// When the request arrived (downstream_rq_time).
    started: Option<Instant>,
    attempts: Attempts,
    /// Counts this request against the cluster's `max_requests`.
    request_slot: Option<Slot>,
    upstream_started: Option<Instant>,
    /// Envoy's `%RESPONSE_FLAGS%` for the access log ("-" when none).
    flags: &'static str,
    /// Wall-clock start, for `%START_TIME%`.
    start_time: Option<std::time::SystemTime>,
}

impl RequestCtx {
    fn matched(&self) -> Option<Matched<'_>> {
        let listener = self.listener.as_deref()?;
        let (v, r) = self.route?;
        listener.chains.get(self.chain)?.hcm.routes.matched(v, r)
    }

    fn hcm(&self) -> Option<&HttpConnectionManager> {
        Some(&self.listener.as_deref()?.chains.get(self.chain)?.hcm)
    }
}

/// What routing decided for a request.
enum Decision {
    Reply(LocalReply),
    Forward {
        cluster: Arc<Cluster>,
        host: Arc<Host>,
        weighted: Option<usize>,
        timeout: Option<Duration>,
        hash: Option<u64>,
    },
}

#[async_trait]
impl ProxyHttp for LegateProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::default()
    }

    /// None: Pingora's default adds a response-compression module that stays disabled
    /// (legate has no compressor filter) yet is built and consulted on every request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// Loads the snapshot, applies the HCM's header rules and filters, routes the request,
    /// and answers locally (direct response, redirect, 404, 503) when it does not forward.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // Pipelined requests are served in turn, as Envoy serves them (Pingora closes the
        // connection after the first unless told).
        session.as_downstream_mut().set_pipelining_enabled(true);
        // Only Pingora's reader gets stand-ins; the native engine never serves them.
        ctx.refused_head = session
            .req_header()
            .headers
            .contains_key(crate::io::refused_head());
        handle_request(self.snapshot.load_full(), session, ctx).await
    }

    /// Filters' request body hook, chunk by chunk as the body streams upstream.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if end_of_stream {
            if let Some(clock) = crate::io::request_clock(session) {
                clock.request_done();
            }
        }
        if let Some(hcm) = ctx.hcm() {
            for (i, f) in hcm.filters.filters.iter().enumerate() {
                f.filter
                    .on_request_body(body, end_of_stream, &filter_context(ctx, i, &f.name));
            }
        }
        Ok(())
    }

    /// Filters' response body hook, chunk by chunk as the body streams downstream.
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<Duration>> {
        if let Some(hcm) = ctx.hcm() {
            for (i, f) in hcm.filters.filters.iter().enumerate() {
                f.filter
                    .on_response_body(body, end_of_stream, &filter_context(ctx, i, &f.name));
            }
        }
        Ok(None)
    }

    /// The endpoint for this try: the one routing chose, or after a failure another one,
    /// after the retry back-off. Connect timeout from the cluster; read timeout from the
    /// route and the retry policy.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let next = next_attempt(ctx).await?;
        let mut peer = upstream::peer(&next.cluster, &next.host, session);
        match &next.cluster.tokio_connect {
            Some(connect) => peer.options.custom_l4 = Some(connect.clone()),
            None => peer.options.connection_timeout = Some(next.cluster.connect_timeout),
        }
        peer.options.idle_timeout = Some(next.cluster.idle_timeout);
        peer.options.read_timeout = next.read_timeout;
        Ok(Box::new(peer))
    }

    /// A failed connect is retried when the retry policy covers it, and never otherwise,
    /// as in Envoy.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let replayable = body_replayable(session, ctx);
        let retry = connect_failed(ctx, e.etype(), replayable);
        e.set_retry(retry);
        e
    }

    /// Rewrites and header edits the route asks for, and Envoy's router headers.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        prepare_upstream_request(ctx, session.req_header(), upstream_request);
        Ok(())
    }

    /// A response the retry policy covers is held back: the error makes Pingora try again
    /// (through `error_while_proxy` and `upstream_peer`), so the client sees only the
    /// final attempt.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let replayable = body_replayable(session, ctx);
        upstream_response_received(ctx, upstream_response, replayable)
    }

    /// Response header edits, `server`, and `x-envoy-upstream-service-time`. From here on
    /// the response belongs to the client and nothing is retried.
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        prepare_response(ctx, request_clock(session), upstream_response)
    }

    /// A failure after connecting: retried when the policy covers it and nothing has gone
    /// downstream; a pooled connection found closed is retried transparently.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let e = e.more_context(format!("peer: {peer}"));
        let replayable = body_replayable(session, ctx);
        proxy_error(ctx, e, replayable, client_reused)
    }

    /// Upstream failures as Envoy reports them: 503 on connect failure or reset, 504 on
    /// the route (or last per-try) timeout.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        FailToProxy {
            error_code: answer_failure(session, e, ctx).await,
            can_reuse_downstream: false,
        }
    }

    /// Failures are answered (and, later, counted and access-logged); Envoy does not log each
    /// one either, so Pingora's per-request error and retry lines go to debug.
    fn suppress_error_log(&self, session: &Session, _ctx: &Self::CTX, e: &Error) -> bool {
        log::debug!("request failed: {e} ({})", session.request_summary());
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Self::CTX,
        e: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        log::debug!("retrying after: {e}");
        true
    }

    /// Stats, the access log, and the host's active-request count.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        finish_request(session, ctx);
    }
}

/// The downstream half of a request as legate's request logic sees it, whichever HTTP
/// engine carries it: Pingora's session, or legate's own HTTP/1 connection (`native`).
#[allow(async_fn_in_trait)]
pub(crate) trait Client {
    /// The listener's address the connection came in on.
    fn local_addr(&self) -> Option<SocketAddr>;
    fn remote_addr(&self) -> Option<SocketAddr>;
    /// What the accept path decided (filter chain, TLS, limits), where it kept anything.
    fn connection(&self) -> Option<&crate::io::ConnectionInfo>;
    fn is_http2(&self) -> bool;
    /// Whether a body follows the request head, as the client framed it (content-length,
    /// chunked, or an HTTP/2 stream left open). Called once, before any header edit:
    /// Pingora's HTTP/1 session fixes how it reads the body on the first such question, and
    /// removing `transfer-encoding` (hop-by-hop) later must not change that.
    fn body_follows(&mut self) -> bool;
    /// Pingora's keep-alive switch: None closes after this response, `Some(0)` keeps the
    /// connection without a time limit, `Some(s)` for `s` idle seconds.
    fn set_keepalive(&mut self, seconds: Option<u64>);
    fn req_header(&self) -> &pingora::http::RequestHeader;
    fn req_header_mut(&mut self) -> &mut pingora::http::RequestHeader;
    /// Keep the request body so that a retry can replay it.
    fn enable_retry_buffering(&mut self);
    /// Whether the request body has been read in full.
    fn request_body_done(&mut self) -> bool;
    fn response_written(&self) -> Option<&ResponseHeader>;
    fn body_bytes_read(&self) -> usize;
    fn body_bytes_sent(&self) -> usize;
    async fn write_reply(&mut self, resp: ResponseHeader, body: Option<Bytes>) -> Result<()>;
    /// `100 Continue` to the client (once).
    async fn send_continue(&mut self) -> Result<()>;
}

impl Client for Session {
    fn local_addr(&self) -> Option<SocketAddr> {
        self.server_addr().and_then(|a| a.as_inet()).copied()
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        self.client_addr().and_then(|a| a.as_inet()).copied()
    }
    fn connection(&self) -> Option<&crate::io::ConnectionInfo> {
        crate::io::connection_info(self)
    }
    fn is_http2(&self) -> bool {
        self.as_downstream().is_http2()
    }
    fn body_follows(&mut self) -> bool {
        !self.as_downstream_mut().is_body_empty()
    }
    fn set_keepalive(&mut self, seconds: Option<u64>) {
        self.as_downstream_mut().set_keepalive(seconds)
    }
    fn req_header(&self) -> &pingora::http::RequestHeader {
        self.as_downstream().req_header()
    }
    fn req_header_mut(&mut self) -> &mut pingora::http::RequestHeader {
        self.as_downstream_mut().req_header_mut()
    }
    fn enable_retry_buffering(&mut self) {
        self.as_downstream_mut().enable_retry_buffering()
    }
    fn request_body_done(&mut self) -> bool {
        self.as_downstream_mut().is_body_done()
    }
    fn response_written(&self) -> Option<&ResponseHeader> {
        self.as_downstream().response_written()
    }
    fn body_bytes_read(&self) -> usize {
        self.as_downstream().body_bytes_read()
    }
    fn body_bytes_sent(&self) -> usize {
        self.as_downstream().body_bytes_sent()
    }
    async fn write_reply(&mut self, resp: ResponseHeader, body: Option<Bytes>) -> Result<()> {
        let end = body.is_none();
        self.write_response_header(Box::new(resp), end).await?;
        if let Some(body) = body {
            self.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }
    async fn send_continue(&mut self) -> Result<()> {
        self.write_continue_response().await
    }
}

fn request_clock<C: Client>(client: &C) -> Option<&crate::io::RequestClock> {
    client.connection()?.clock.as_deref()
}

/// Where and how long the next try goes.
pub(crate) struct NextAttempt {
    pub cluster: Arc<Cluster>,
    pub host: Arc<Host>,
    /// The upstream read timeout for this try.
    pub read_timeout: Option<Duration>,
}

/// The endpoint for this try: the one routing chose, or after a failure another one,
/// after the retry back-off. The read timeout comes from the route and the retry policy.
pub(crate) async fn next_attempt(ctx: &mut RequestCtx) -> Result<NextAttempt> {
    let Some(cluster) = ctx.cluster.clone() else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "no upstream chosen",
        ));
    };
    // A transparent retry repeats the same host on a fresh connection.
    if !std::mem::take(&mut ctx.attempts.transparent) {
        ctx.attempts.count += 1;
        if ctx.attempts.count > 1 {
            tokio::time::sleep(ctx.attempts.backoff(Instant::now())).await;
            let Some(host) = ctx.attempts.pick_for_retry(&cluster, ctx.hash) else {
                return Err(Error::explain(NO_HOST, "no host for the retry"));
            };
            ctx.active = Some(host.start_request());
            ctx.host = Some(host);
        }
    }
    let Some(host) = ctx.host.clone() else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "no upstream chosen",
        ));
    };
    let now = Instant::now();
    if ctx.attempts.avoids_previous_hosts() {
        ctx.attempts.tried.push(host.address);
    }
    ctx.attempts.try_deadline = ctx.attempts.per_try_timeout().map(|t| now + t);
    let route_idle = ctx.matched().and_then(|m| match &m.route.action {
        Action::Forward(a) => a.idle_timeout,
        _ => None,
    });
    let read_timeout = if ctx.upgrade {
        // The route timeout starts when the request ends, which an upgraded one never
        // does (Envoy); the stream idle timeout bounds a silent tunnel instead.
        Some(STREAM_IDLE_TIMEOUT)
    } else {
        ctx.attempts.read_timeout(now, route_idle)
    };
    Ok(NextAttempt {
        cluster,
        host,
        read_timeout,
    })
}

/// A failed connect: counted, and retried when the retry policy covers it (never
/// otherwise, as in Envoy). True to retry.
pub(crate) fn connect_failed(ctx: &mut RequestCtx, etype: &ErrorType, replayable: bool) -> bool {
    ctx.attempts.last_failure = Some(match etype {
        ErrorType::ConnectTimedout => "connection timeout",
        ErrorType::ConnectRefused => "remote connection failure, transport failure reason: delayed connect error: Connection refused",
        _ => "remote connection failure",
    });
    if let (Some(c), Some(h)) = (&ctx.cluster, &ctx.host) {
        c.record_outcome(h, Outcome::LocalFailure);
        c.stats
            .upstream_cx_connect_fail
            .fetch_add(1, Ordering::Relaxed);
    }
    let breaker = ctx.cluster.as_ref().map(|c| c.circuit.clone());
    let retry = ctx.attempts.take_retry(
        Failure::ConnectFailure,
        replayable,
        Instant::now(),
        breaker.as_ref(),
    );
    count_retry(ctx, retry);
    retry
}

/// Rewrites and header edits the route asks for, and Envoy's router headers, on the
/// request about to go upstream (a copy of the downstream one).
pub(crate) fn prepare_upstream_request(
    ctx: &mut RequestCtx,
    downstream: &pingora::http::RequestHeader,
    upstream_request: &mut pingora::http::RequestHeader,
) {
    let (Some(m), Some(hcm)) = (ctx.matched(), ctx.hcm()) else {
        return;
    };
    let fmt = FormatContext {
        remote: ctx.remote,
        local: ctx.local,
        protocol: ctx.protocol,
        request_headers: Some(&downstream.headers),
    };
    let now = Instant::now();
    // Envoy tells the upstream the time it has: the per-try timeout, else what is left
    // of the route timeout.
    let expected = ctx.attempts.expected_timeout(now);
    upstream::finalize_request(
        upstream_request,
        upstream::Framing {
            body_follows: ctx.body_follows,
            upgrade: ctx.upgrade,
            // Sanitized to `trailers` or removed by the connection manager.
            te_trailers: downstream.headers.contains_key(http::header::TE),
        },
        m,
        ctx.weighted,
        hcm,
        ctx.host.as_deref(),
        &fmt,
    );
    upstream::set_router_headers(upstream_request, m, hcm, ctx.attempts.count, expected);
    ctx.upstream_started = Some(now);
    if let Some(c) = &ctx.cluster {
        c.stats.upstream_rq_total.fetch_add(1, Ordering::Relaxed);
    }
}

/// An upstream response's head: counted, and turned into a retry (an error whose retry
/// flag is set) when the retry policy covers it; that response never reaches the client.
pub(crate) fn upstream_response_received(
    ctx: &mut RequestCtx,
    upstream_response: &mut ResponseHeader,
    replayable: bool,
) -> Result<()> {
    let status = upstream_response.status.as_u16();
    if status >= 200 {
        if let (Some(c), Some(h)) = (&ctx.cluster, &ctx.host) {
            c.record_outcome(h, Outcome::Status(status));
            let took = ctx.upstream_started.map_or(Duration::ZERO, |t| t.elapsed());
            c.stats.response(status, took);
        }
        let breaker = ctx.cluster.as_ref().map(|c| c.circuit.clone());
        let failure = Failure::Response(status, &upstream_response.headers);
        let retry = ctx
            .attempts
            .take_retry(failure, replayable, Instant::now(), breaker.as_ref());
        count_retry(ctx, retry);
        if retry {
            let mut e = Error::explain(RETRY_ON_RESPONSE, format!("upstream answered {status}"));
            e.set_retry(true);
            return Err(e);
        }
    }
    if ctx
        .matched()
        .is_some_and(|m| m.virtual_host.include_attempt_count_in_response)
    {
        upstream_response.insert_header("x-envoy-attempt-count", ctx.attempts.count.to_string())?;
    }
    Ok(())
}

/// Response header edits, `server`, and `x-envoy-upstream-service-time`. From here on the
/// response belongs to the client and nothing is retried.
pub(crate) fn prepare_response(
    ctx: &mut RequestCtx,
    clock: Option<&crate::io::RequestClock>,
    upstream_response: &mut ResponseHeader,
) -> Result<()> {
    ctx.attempts.response_started = true;
    if let Some(clock) = clock {
        clock.request_done();
    }
    if ctx.protocol == "HTTP/1.1" {
        // Envoy's codec writes its own status line: HTTP/1.1 and the standard reason
        // phrase, whatever version and reason the upstream wrote.
        upstream_response.set_version(http::Version::HTTP_11);
        upstream_response.set_reason_phrase(None)?;
    }
    let Some(hcm) = ctx.hcm() else { return Ok(()) };
    upstream::strip_hop_by_hop_response(upstream_response);
    if !hcm.filters.router.suppress_envoy_headers {
        if let Some(start) = ctx.upstream_started {
            let ms = start.elapsed().as_millis().to_string();
            upstream_response.insert_header("x-envoy-upstream-service-time", ms)?;
        }
    }
    finish_response_headers(upstream_response, ctx);
    Ok(())
}

/// A failure after connecting: retried when the policy covers it and nothing has gone
/// downstream; a pooled connection found closed is retried transparently.
pub(crate) fn proxy_error(
    ctx: &mut RequestCtx,
    mut e: Box<Error>,
    replayable: bool,
    client_reused: bool,
) -> Box<Error> {
    if e.etype() == &RETRY_ON_RESPONSE {
        return e;
    }
    let now = Instant::now();
    let failure = if e.etype() == &ErrorType::ReadTimedout {
        if ctx.attempts.global_expired(now) || !ctx.attempts.try_expired(now) {
            e.set_retry(false);
            return e;
        }
        ctx.attempts.last_failure = Some("per-try timeout");
        if let Some(c) = &ctx.cluster {
            c.stats
                .upstream_rq_per_try_timeout
                .fetch_add(1, Ordering::Relaxed);
        }
        Failure::PerTryTimeout
    } else {
        ctx.attempts.last_failure = Some("connection termination");
        Failure::Reset
    };
    let stale_pooled = matches!(e.retry, RetryType::ReusedOnly) && client_reused;
    if !stale_pooled && e.esource() == &ErrorSource::Upstream {
        if let (Some(c), Some(h)) = (&ctx.cluster, &ctx.host) {
            c.record_outcome(h, Outcome::LocalFailure);
        }
    }
    let breaker = ctx.cluster.as_ref().map(|c| c.circuit.clone());
    let taken = ctx
        .attempts
        .take_retry(failure, replayable, now, breaker.as_ref());
    count_retry(ctx, taken);
    let retry = if taken {
        true
    } else if stale_pooled && replayable && !ctx.attempts.response_started {
        ctx.attempts.transparent = true;
        true
    } else {
        false
    };
    e.set_retry(retry);
    e
}

/// Answers a request that failed upstream as Envoy does (503 on connect failure or reset,
/// 504 on the route or last per-try timeout) unless a response has started; the status
/// sent, or 0.
pub(crate) async fn answer_failure<C: Client>(
    session: &mut C,
    e: &Error,
    ctx: &mut RequestCtx,
) -> u16 {
    let timed_out =
        request_clock(session).is_some_and(|c| c.expired() == Some(crate::io::Expired::Request));
    let reply = if timed_out {
        Some(LocalReply::new(408, "request timeout"))
    } else {
        error_reply(e, &ctx.attempts)
    };
    let code = reply.as_ref().map_or(0, |r| r.status);
    ctx.flags = response_flag(e, code);
    if crate::io::is_malformed_request(e) {
        if let Some(hcm) = ctx.hcm() {
            hcm.stats
                .downstream_cx_protocol_error
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    if code == 504 {
        if let Some(c) = &ctx.cluster {
            c.stats.upstream_rq_timeout.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(reply) = reply {
        if session.response_written().is_none() {
            if let Err(err) = send_local_reply(session, ctx, reply).await {
                log::debug!("cannot send error response downstream: {err}");
            }
        }
    }
    code
}

/// The end of a request: stats, the access log, and the host's active-request count.
pub(crate) fn finish_request<C: Client>(session: &mut C, ctx: &mut RequestCtx) {
    if ctx.counted_stream {
        if let Some(info) = session.connection() {
            let ms = info.accepted.elapsed().as_millis() as u64;
            info.idle_since_ms.store(ms, Ordering::Relaxed);
            info.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
    if let Some(clock) = request_clock(session) {
        clock.next_request();
        // The clock cannot tell a drained body's bytes from the next request's; Envoy
        // closes an HTTP/1 connection whose request was not read in full anyway.
        if !session.is_http2() && !session.request_body_done() {
            session.set_keepalive(None);
        }
    }
    if let (Some(hcm), Some(started)) = (ctx.hcm(), ctx.started) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if status > 0 {
            hcm.stats.response(status, started.elapsed());
        }
        if !hcm.access_logs.is_empty() {
            let record = access_record(session, ctx, status, started.elapsed());
            crate::access_log::log(&hcm.access_logs, record);
        }
    }
    ctx.active = None;
    ctx.request_slot = None;
}

/// The request phase of `request_filter`, for either engine: loads the snapshot, applies
/// the HCM's header rules and filters, routes the request, and answers locally (direct
/// response, redirect, 404, 503) when it does not forward. True when it answered.
pub(crate) async fn handle_request<C: Client>(
    snapshot: Arc<Snapshot>,
    session: &mut C,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    // Before any header edit (see `Client::body_follows`).
    ctx.body_follows = session.body_follows();
    let local = session.local_addr();
    let Some(listener) = local.and_then(|a| snapshot.listener_at(a)).cloned() else {
        send_local_reply(session, ctx, LocalReply::new(503, "listener removed")).await?;
        return Ok(true);
    };
    ctx.chain = session.connection().map_or(0, |i| i.chain);
    if session.is_http2() {
        if let Some(info) = session.connection() {
            info.streams.fetch_add(1, Ordering::Relaxed);
            ctx.counted_stream = true;
        }
    }
    if let Some(clock) = request_clock(session) {
        clock.headers_done();
    }
    ctx.protocol = if session.is_http2() {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    };
    let Some(chain) = listener.chains.get(ctx.chain) else {
        send_local_reply(session, ctx, LocalReply::new(503, "listener changed")).await?;
        return Ok(true);
    };
    ctx.snapshot = Some(snapshot);
    ctx.started = Some(Instant::now());
    if !chain.hcm.access_logs.is_empty() {
        ctx.start_time = Some(std::time::SystemTime::now());
    }
    ctx.listener = Some(listener.clone());
    let hcm = &listener.chains[ctx.chain].hcm;
    hcm.stats
        .downstream_rq_total
        .fetch_add(1, Ordering::Relaxed);
    if !ctx.refused_head {
        ctx.refused_head = underscores_refused(session.req_header_mut(), hcm);
    }
    if ctx.refused_head {
        // As Envoy answers a head its codec refuses: 400 and close, logged as DPE with
        // no method or path.
        hcm.stats
            .downstream_cx_protocol_error
            .fetch_add(1, Ordering::Relaxed);
        ctx.flags = "DPE";
        session.set_keepalive(None);
        send_local_reply(session, ctx, LocalReply::new(400, "Bad Request")).await?;
        return Ok(true);
    }
    // Envoy's idle timeout; `Some(0)` keeps the connection without a limit.
    session.set_keepalive(Some(hcm.idle_timeout.map_or(0, |d| d.as_secs().max(1))));
    if let Some(reply) = apply_connection_limits(session, hcm) {
        send_local_reply(session, ctx, reply).await?;
        return Ok(true);
    }
    if session.req_header().version == http::Version::HTTP_10 {
        // Envoy's default (`accept_http_10: false`): 426 and close.
        session.set_keepalive(None);
        send_local_reply(session, ctx, LocalReply::new(426, "Upgrade Required")).await?;
        return Ok(true);
    }
    if let Some(reply) = normalize_path(session.req_header_mut(), hcm) {
        if reply.status == 400 {
            // As Envoy closes an HTTP/1 connection after a 400 it answers itself.
            session.set_keepalive(None);
        }
        send_local_reply(session, ctx, reply).await?;
        return Ok(true);
    }
    if expects_continue(session.req_header()) {
        // Envoy's default (`proxy_100_continue: false`, the only setting accepted): the
        // proxy answers the interim response itself, and the upstream never sees the
        // header (so never sends one of its own).
        session.send_continue().await?;
        session
            .req_header_mut()
            .remove_header(&http::header::EXPECT);
    }
    ctx.remote = session.remote_addr();
    ctx.local = local;
    let scheme = match session.connection().and_then(|i| i.tls.as_ref()) {
        Some(_) => "https",
        None => "http",
    };
    let upgrade = downstream::requested_upgrade(session.req_header());
    ctx.upgrade = upgrade.is_some();
    let client_certificate = session
        .connection()
        .and_then(|i| i.tls.as_ref())
        .is_some_and(|t| t.peer_certificate);
    let ds = downstream::mutate_request_headers(
        hcm,
        session.req_header_mut(),
        ctx.remote.map(|a| a.ip()),
        listener.address.port(),
        scheme,
        ctx.upgrade,
        client_certificate,
    );
    ctx.request_id = ds.request_id;
    ctx.client_ip = ds.remote;
    // Routing is decided first so that filters know the route (as Envoy's filters see
    // the cached route); it is acted on after them.
    let unroutable = find_route(session.req_header(), ctx, &listener);
    if let Some(kind) = &upgrade {
        if !upgrade_allowed(kind, hcm, ctx) {
            // Envoy refuses an upgrade its route and connection manager do not allow, and
            // closes: the upgrade's payload might hold a smuggled request.
            session.set_keepalive(None);
            send_local_reply(session, ctx, LocalReply::new(403, "")).await?;
            return Ok(true);
        }
    }
    ctx.filter_state = hcm
        .filters
        .filters
        .iter()
        .map(|_| Default::default())
        .collect();
    for (i, f) in hcm.filters.filters.iter().enumerate() {
        let cx = filter_context(ctx, i, &f.name);
        let reply = match f.filter.on_request_headers(session.req_header_mut(), &cx) {
            FilterDecision::Continue => continue,
            FilterDecision::Respond { status, body } => LocalReply::new(status, body),
            FilterDecision::RespondWithHeaders { status, headers } => {
                let mut reply = LocalReply::new(status, Bytes::new());
                reply.filter_headers = headers;
                reply
            }
        };
        send_local_reply(session, ctx, reply).await?;
        return Ok(true);
    }
    if let Some(reply) = unroutable {
        send_local_reply(session, ctx, reply).await?;
        return Ok(true);
    }
    match decide(session.req_header(), ctx, &listener) {
        Decision::Reply(reply) => {
            send_local_reply(session, ctx, reply).await?;
            Ok(true)
        }
        Decision::Forward {
            cluster,
            host,
            weighted,
            timeout,
            hash,
        } => {
            let Some(slot) = cluster.circuit.try_request() else {
                cluster
                    .stats
                    .upstream_rq_pending_overflow
                    .fetch_add(1, Ordering::Relaxed);
                ctx.flags = "UO";
                send_local_reply(session, ctx, overflow_reply()).await?;
                return Ok(true);
            };
            ctx.request_slot = Some(slot);
            ctx.active = Some(host.start_request());
            ctx.host = Some(host);
            ctx.cluster = Some(cluster);
            ctx.weighted = weighted;
            ctx.hash = hash;
            start_attempts(session, ctx, timeout);
            Ok(false)
        }
    }
}

/// `Expect: 100-continue` (other expectations pass through, as in Envoy).
pub(crate) fn expects_continue(req: &pingora::http::RequestHeader) -> bool {
    req.headers.get(http::header::EXPECT).is_some_and(|v| {
        v.as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"100-continue")
    })
}

/// What the access log needs from a finished request.
fn access_record<C: Client>(
    session: &C,
    ctx: &RequestCtx,
    status: u16,
    duration: Duration,
) -> crate::access_log::Record {
    let req = session.req_header();
    let authority = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let route_name = ctx
        .matched()
        .map(|m| m.route.name.clone())
        .unwrap_or_default();
    let mut record = crate::access_log::Record {
        protocol: ctx.protocol,
        start: ctx.start_time,
        request_headers: req.headers.clone(),
        method: req.method.to_string(),
        path: req
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string()),
        authority: authority.to_string(),
        response_headers: session
            .response_written()
            .map(|r| r.headers.clone())
            .unwrap_or_default(),
        status,
        flags: if ctx.flags.is_empty() { "-" } else { ctx.flags },
        bytes_received: session.body_bytes_read(),
        bytes_sent: session.body_bytes_sent(),
        duration,
        upstream_host: ctx.host.as_ref().map(|h| h.address),
        upstream_cluster: ctx.cluster.as_ref().map(|c| c.name.clone()),
        remote: ctx.remote,
        local: ctx.local,
        route_name,
    };
    if ctx.refused_head {
        // Nothing of a refused head is known (Envoy logs `- -`).
        record.method.clear();
        record.path.clear();
        record.authority.clear();
        record.request_headers.clear();
    }
    record
}

/// Sets up retries and deadlines: the route's (or virtual host's) retry policy with the
/// `x-envoy-*` request headers applied, and body buffering so a retry can replay it.
fn start_attempts<C: Client>(session: &mut C, ctx: &mut RequestCtx, timeout: Option<Duration>) {
    let headers = &session.req_header().headers;
    let configured = ctx.matched().and_then(|m| match &m.route.action {
        Action::Forward(a) => a
            .retry_policy
            .as_ref()
            .or(m.virtual_host.retry_policy.as_ref()),
        _ => None,
    });
    let mut policy = effective_policy(configured, headers);
    // As in effective_policy: no lookups when no name could match.
    let envoy_fields = headers.keys().any(|n| n.as_str().starts_with("x-envoy-"));
    let header_ms = |name| envoy_fields.then(|| header_ms(headers, name)).flatten();
    let timeout = header_ms(&names::X_ENVOY_UPSTREAM_RQ_TIMEOUT_MS).unwrap_or(timeout);
    if let (Some(p), Some(per_try)) = (
        policy.as_mut(),
        header_ms(&names::X_ENVOY_UPSTREAM_RQ_PER_TRY_TIMEOUT_MS),
    ) {
        p.per_try_timeout = per_try;
    }
    if let Some(p) = &policy {
        let req = session.req_header();
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let view = RequestView::new(req.method.as_str(), path, "", "http", &req.headers);
        if !p.request_is_retriable(&view) {
            policy = None;
        }
    }
    if policy.is_some() {
        // Keep the body (up to Pingora's 64 KiB retry buffer) so a retry can replay it.
        session.enable_retry_buffering();
    }
    ctx.attempts = Attempts::new(policy, timeout, Instant::now());
}

/// Envoy's per-request and per-connection limits: oversized headers get 431 (and the
/// connection closes); the last request a connection may carry, by count or age, is
/// answered with `connection: close`, and an idle connection waits no longer than its age
/// allows.
fn apply_connection_limits<C: Client>(
    session: &mut C,
    hcm: &HttpConnectionManager,
) -> Option<LocalReply> {
    let req = session.req_header();
    let headers = &req.headers;
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum::<usize>()
        + req.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req.method.as_str().len();
    if headers.len() > hcm.limits.max_headers_count as usize
        || bytes > hcm.max_request_headers_bytes
    {
        session.set_keepalive(None);
        return Some(LocalReply::new(431, "Request Header Fields Too Large"));
    }
    let info = session.connection()?;
    let n = info.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let age = info.accepted.elapsed();
    let last_by_count = hcm
        .limits
        .max_requests_per_connection
        .is_some_and(|max| n >= max);
    if session.is_http2() {
        // HTTP/2 has no keep-alive switch: the connection is drained (GOAWAY) and closes
        // when its streams end, as Envoy does. Age is watched by the connection itself.
        if last_by_count {
            if let Some(drain) = &info.drain {
                drain.send_replace(true);
            }
        }
        return None;
    }
    match hcm.limits.max_connection_duration {
        _ if last_by_count => session.set_keepalive(None),
        Some(max) if age >= max => session.set_keepalive(None),
        Some(max) => {
            let left = (max - age).as_secs().max(1);
            let idle = hcm
                .idle_timeout
                .map_or(left, |d| d.as_secs().max(1).min(left));
            session.set_keepalive(Some(idle));
        }
        None => {}
    }
    None
}

/// Counts a retry, or a retry the `max_retries` breaker refused.
fn count_retry(ctx: &RequestCtx, retried: bool) {
    let Some(c) = &ctx.cluster else { return };
    if retried {
        c.stats.upstream_rq_retry.fetch_add(1, Ordering::Relaxed);
    } else if ctx.attempts.retry_overflowed {
        c.stats
            .upstream_rq_retry_overflow
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Envoy's answer when a circuit breaker is full.
fn overflow_reply() -> LocalReply {
    let mut reply = LocalReply::new(
        503,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    );
    reply.extra_headers.push(("x-envoy-overloaded", "true"));
    reply
}

/// A millisecond count from a request header such as `x-envoy-upstream-rq-timeout-ms`;
/// 0 means no timeout, as in Envoy.
fn header_ms(headers: &http::HeaderMap, name: &http::HeaderName) -> Option<Option<Duration>> {
    let ms: u64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    Some((ms > 0).then(|| Duration::from_millis(ms)))
}

/// What filters are told about the request: the matched route, its cluster, and the
/// filter's own per-route settings.
fn filter_context<'a>(ctx: &'a RequestCtx, index: usize, filter: &str) -> FilterContext<'a> {
    let m = ctx.matched();
    let lookup = |list: &'a crate::filter::PerFilterConfigs| {
        list.iter()
            .find(|(n, _)| n == filter)
            .map(|(_, c)| c.as_ref() as &(dyn std::any::Any + Send + Sync))
    };
    FilterContext {
        route_name: m.map(|m| m.route.name.as_str()).filter(|n| !n.is_empty()),
        cluster: m.and_then(|m| match &m.route.action {
            Action::Forward(a) => match &a.cluster {
                ClusterChoice::Named(n) => Some(n.as_str()),
                _ => None,
            },
            _ => None,
        }),
        per_route: m.and_then(|m| {
            lookup(&m.route.per_filter).or_else(|| lookup(&m.virtual_host.per_filter))
        }),
        client: ctx.client_ip,
        state: ctx
            .filter_state
            .get(index)
            .unwrap_or(FilterContext::default().state),
    }
}

/// The request as route matching reads it; None without a Host.
fn request_view<'a>(
    req: &'a pingora::http::RequestHeader,
    ctx: &RequestCtx,
) -> Option<RequestView<'a>> {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))?;
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let scheme = req
        .headers
        .get(&names::X_FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http");
    let mut view = RequestView::new(req.method.as_str(), path, host, scheme, &req.headers);
    view.remote_ip = ctx.client_ip;
    Some(view)
}

/// Matches the route (into `ctx.route`); a reply when the request cannot be routed at all.
fn find_route(
    req: &pingora::http::RequestHeader,
    ctx: &mut RequestCtx,
    listener: &Listener,
) -> Option<LocalReply> {
    let Some(view) = request_view(req, ctx) else {
        return Some(LocalReply::new(400, "missing host header"));
    };
    let Some(chain) = listener.chains.get(ctx.chain) else {
        return Some(LocalReply::new(503, "listener changed"));
    };
    ctx.route = chain.hcm.routes.route_index(&view);
    None
}

/// `headers_with_underscores_action`, applied where Envoy's codec applies it: true when the
/// request is to be refused as malformed; dropped headers are removed here.
fn underscores_refused(
    req: &mut pingora::http::RequestHeader,
    hcm: &HttpConnectionManager,
) -> bool {
    use crate::config::http_options::UnderscoresAction;
    let action = hcm.limits.headers_with_underscores;
    if action == UnderscoresAction::Allow {
        return false;
    }
    let named: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    if named.is_empty() {
        return false;
    }
    if action == UnderscoresAction::RejectRequest {
        return true;
    }
    for k in named {
        req.remove_header(&k);
    }
    false
}

/// Whether the request body can be sent again: Pingora kept all of it, and it did not
/// outgrow the listener's `per_connection_buffer_limit_bytes` (past which Envoy gives up
/// retrying a request).
fn body_replayable(session: &Session, ctx: &RequestCtx) -> bool {
    let limit = ctx
        .listener
        .as_ref()
        .map_or(crate::listener::DEFAULT_BUFFER_LIMIT, |l| l.buffer_limit);
    !session.as_ref().retry_buffer_truncated() && session.as_ref().body_bytes_read() <= limit
}

/// Whether an upgrade may go through: the connection manager's `upgrade_configs`, then the
/// route's, which override per type. Without a route it goes on (to the router's 404).
fn upgrade_allowed(kind: &str, hcm: &HttpConnectionManager, ctx: &RequestCtx) -> bool {
    let Some(m) = ctx.matched() else {
        return true;
    };
    let mut enabled = hcm
        .upgrades
        .iter()
        .find(|(k, _)| k == kind)
        .is_some_and(|(_, on)| *on);
    if let Action::Forward(a) = &m.route.action {
        if let Some((_, on)) = a.upgrades.iter().find(|(k, _)| k == kind) {
            enabled = *on;
        }
    }
    enabled
}

/// The connection manager's path sanitising (see `path_normalization`): the request goes on
/// with the new path, or is answered 400 (refused) or 307 (escaped slashes, redirected).
fn normalize_path(
    req: &mut pingora::http::RequestHeader,
    hcm: &HttpConnectionManager,
) -> Option<LocalReply> {
    use crate::path_normalization::{normalize, PathAction};
    if hcm.path_normalization.is_off() {
        return None;
    }
    let original = req.uri.path_and_query().map_or("/", |p| p.as_str());
    match normalize(original, &hcm.path_normalization) {
        PathAction::Continue(None) => None,
        PathAction::Continue(Some(path)) => match http::Uri::try_from(path) {
            Ok(uri) => {
                req.set_uri(uri);
                None
            }
            Err(_) => Some(path_refused(hcm)),
        },
        PathAction::Redirect(path) => {
            let grpc = req
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            if grpc {
                // gRPC clients do not follow redirects: Envoy refuses these instead.
                return Some(path_refused(hcm));
            }
            hcm.stats
                .downstream_rq_redirected_with_normalized_path
                .fetch_add(1, Ordering::Relaxed);
            let mut reply = LocalReply::new(307, Bytes::new());
            reply.location = Some(path);
            Some(reply)
        }
        PathAction::Reject => Some(path_refused(hcm)),
    }
}

fn path_refused(hcm: &HttpConnectionManager) -> LocalReply {
    hcm.stats
        .downstream_rq_failed_path_normalization
        .fetch_add(1, Ordering::Relaxed);
    LocalReply::new(400, Bytes::new())
}

/// Picks the cluster and host for the matched route, or says what to answer instead.
fn decide(
    req: &pingora::http::RequestHeader,
    ctx: &mut RequestCtx,
    listener: &Listener,
) -> Decision {
    let Some(view) = request_view(req, ctx) else {
        return Decision::Reply(LocalReply::new(400, "missing host header"));
    };
    let Some(chain) = listener.chains.get(ctx.chain) else {
        return Decision::Reply(LocalReply::new(503, "listener changed"));
    };
    let table = &chain.hcm.routes;
    let Some((v, r)) = ctx.route else {
        ctx.flags = "NR";
        return Decision::Reply(LocalReply::new(404, ""));
    };
    let Some(m) = table.matched(v, r) else {
        return Decision::Reply(LocalReply::new(404, ""));
    };
    let action = match &m.route.action {
        Action::Direct(d) => {
            return Decision::Reply(LocalReply::new(
                d.status,
                d.body.clone().unwrap_or_default(),
            ));
        }
        Action::Redirect(rd) => {
            let mut reply = LocalReply::new(rd.status, Bytes::new());
            reply.location = Some(rd.location(&view, m.route.matched_prefix()));
            return Decision::Reply(reply);
        }
        Action::Forward(a) => a,
    };
    let (cluster_name, weighted) = match &action.cluster {
        ClusterChoice::Named(n) => (Some(n.as_str()), None),
        ClusterChoice::FromHeader(h) => (req.headers.get(h).and_then(|v| v.to_str().ok()), None),
        ClusterChoice::Weighted(w) => {
            let i = w.pick_index(rand::random());
            (w.clusters.get(i).map(|c| c.name.as_str()), Some(i))
        }
    };
    let snapshot = ctx.snapshot.as_deref();
    let Some(cluster) = cluster_name
        .and_then(|n| snapshot.and_then(|s| s.cluster(n)))
        .cloned()
    else {
        ctx.flags = "NC";
        return Decision::Reply(LocalReply::new(action.cluster_not_found_status, ""));
    };
    let hash = if action.hash_policy.is_empty() {
        None
    } else {
        action.hash_policy.hash(&view)
    };
    let Some(host) = cluster.pick(hash) else {
        ctx.flags = "UH";
        return Decision::Reply(LocalReply::new(503, NO_HEALTHY_UPSTREAM));
    };
    Decision::Forward {
        cluster,
        host,
        weighted,
        timeout: action
            .grpc_timeout
            .and_then(|g| {
                let v = req.headers.get("grpc-timeout")?.to_str().ok()?;
                g.for_header(v)
            })
            .unwrap_or(action.timeout),
        hash,
    }
}

/// Header edits every response gets, proxied or local: route/vhost/route-config
/// mutations, the server header, the request id and the filters' response hooks.
fn finish_response_headers(resp: &mut ResponseHeader, ctx: &RequestCtx) {
    let Some(hcm) = ctx.hcm() else { return };
    if let Some(m) = ctx.matched() {
        let fmt = FormatContext {
            remote: ctx.remote,
            local: ctx.local,
            protocol: ctx.protocol,
            request_headers: None,
        };
        upstream::apply_response_mutations(resp, m, ctx.weighted, &hcm.routes, &fmt);
    }
    upstream::set_server_header(resp, hcm);
    if let Some(via) = &hcm.via {
        let joined = match resp
            .headers
            .get(http::header::VIA)
            .and_then(|v| v.to_str().ok())
        {
            Some(old) if !old.is_empty() => format!("{old}, {via}"),
            _ => via.clone(),
        };
        let _ = resp.insert_header(http::header::VIA, joined);
    }
    if hcm.always_set_request_id_in_response {
        if let Some(id) = &ctx.request_id {
            let _ = resp.insert_header("x-request-id", id.clone());
        }
    }
    for (i, f) in hcm.filters.filters.iter().enumerate() {
        f.filter
            .on_response_headers(resp, &filter_context(ctx, i, &f.name));
    }
}

async fn send_local_reply<C: Client>(
    session: &mut C,
    ctx: &RequestCtx,
    reply: LocalReply,
) -> Result<()> {
    if let Some(clock) = request_clock(session) {
        clock.request_done();
    }
    let server = ctx.hcm().map_or("legate", |h| h.server_name.as_str());
    let head = session.req_header().method == http::Method::HEAD;
    let mut resp = reply.header(server, head)?;
    finish_response_headers(&mut resp, ctx);
    let no_body = head || reply.body.is_empty();
    session
        .write_reply(resp, (!no_body).then_some(reply.body))
        .await
}

/// Envoy's response flag for a request that failed upstream or downstream.
fn response_flag(e: &Error, code: u16) -> &'static str {
    if e.etype() == &NO_HOST {
        return "UH";
    }
    match (e.esource(), e.etype()) {
        (_, ErrorType::HTTPStatus(_)) => "-",
        (ErrorSource::Upstream, _) if code == 504 => "UT",
        (
            _,
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::SocketError
            | ErrorType::BindError,
        ) => "UF",
        (ErrorSource::Upstream, _) => "UC",
        (ErrorSource::Downstream, ErrorType::ReadTimedout) => "DT",
        (ErrorSource::Downstream, ErrorType::ReadError) if crate::io::is_malformed_request(e) => {
            "DPE"
        }
        (
            ErrorSource::Downstream,
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
        ) => "DC",
        (ErrorSource::Downstream, _) => "DPE",
        _ => "-",
    }
}

/// The local reply Envoy sends for an upstream failure; None when nothing can be sent.
fn error_reply(e: &Error, attempts: &Attempts) -> Option<LocalReply> {
    let retried = if attempts.count > 1 {
        "retried and the latest "
    } else {
        ""
    };
    let reset = |reason: &str| {
        LocalReply::new(
            503,
            format!(
                "upstream connect error or disconnect/reset before headers. {retried}reset reason: {reason}"
            ),
        )
    };
    if e.etype() == &NO_HOST {
        return Some(LocalReply::new(503, NO_HEALTHY_UPSTREAM));
    }
    Some(match e.etype() {
        ErrorType::HTTPStatus(code) => LocalReply::new(*code, ""),
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::SocketError
        | ErrorType::BindError => {
            reset(attempts.last_failure.unwrap_or("remote connection failure"))
        }
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            LocalReply::new(504, UPSTREAM_TIMEOUT)
        }
        _ => match e.esource() {
            ErrorSource::Upstream => reset("connection termination"),
            ErrorSource::Downstream => match e.etype() {
                // A body whose chunked framing was refused part-way, as Envoy answers it.
                ErrorType::ReadError if crate::io::is_malformed_request(e) => {
                    LocalReply::new(400, "Bad Request")
                }
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                    return None
                }
                ErrorType::ReadTimedout => LocalReply::new(408, "request timeout"),
                _ => LocalReply::new(400, "Bad Request"),
            },
            ErrorSource::Internal | ErrorSource::Unset => LocalReply::new(500, ""),
        },
    })
}
