//! Active health checking (cluster `health_checks`): HTTP and TCP checks with Envoy's
//! thresholds, intervals and jitter. The state machine is plain data; the checker is a
//! small async loop per host on the control runtime.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    health_check::{self, payload, HealthChecker, HttpHealthCheck, Payload, TcpHealthCheck},
    HealthCheck, RequestMethod,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::host::{flags, Host};
use crate::config::duration;
use crate::config::error::{index, join, Errors};
use crate::reject_set;

#[derive(Debug, Clone)]
pub enum Probe {
    Http {
        host: Option<String>,
        path: String,
        method: String,
        headers: Vec<(String, String)>,
        remove_headers: Vec<String>,
        expected: Vec<(i64, i64)>,
        retriable: Vec<(i64, i64)>,
    },
    Tcp {
        send: Vec<u8>,
        receive: Vec<Vec<u8>>,
    },
    /// grpc.health.v1 `Check` over HTTP/2 cleartext.
    Grpc {
        service_name: String,
        authority: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub probe: Probe,
    pub timeout: Duration,
    pub interval: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    pub initial_jitter: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub unhealthy_interval: Option<Duration>,
    pub unhealthy_edge_interval: Option<Duration>,
    pub healthy_edge_interval: Option<Duration>,
    pub no_traffic_interval: Duration,
    pub no_traffic_healthy_interval: Option<Duration>,
}

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Healthy,
    /// Counts toward `unhealthy_threshold` (timeouts, connection failures, retriable statuses).
    Failure,
    /// Marks the host unhealthy at once (an unexpected, non-retriable HTTP status).
    ImmediateFailure,
}

/// A change of a host's active health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    BecameHealthy,
    BecameUnhealthy,
    Unchanged,
}

fn payload_bytes(p: &Payload, at: &str, errs: &mut Errors) -> Vec<u8> {
    match &p.payload {
        Some(payload::Payload::Text(hex)) => match decode_hex(hex) {
            Some(b) => b,
            None => {
                errs.add(join(at, "text"), "must be hex");
                Vec::new()
            }
        },
        Some(payload::Payload::Binary(b)) => b.clone(),
        None => Vec::new(),
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
        .collect()
}

fn ranges(
    list: &[envoy_types::pb::envoy::r#type::v3::Int64Range],
    at: &str,
    errs: &mut Errors,
) -> Vec<(i64, i64)> {
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            if !(100..=600).contains(&r.start) || r.end <= r.start || r.end > 600 {
                errs.add(
                    index(at, i),
                    "must be a range of HTTP statuses [start, end) within [100, 600)",
                );
            }
            (r.start, r.end)
        })
        .collect()
}

impl HealthCheckConfig {
    pub fn convert(h: &HealthCheck, at: &str, errs: &mut Errors) -> Option<Self> {
        let HealthCheck {
            timeout,
            interval,
            initial_jitter,
            interval_jitter,
            interval_jitter_percent,
            unhealthy_threshold,
            healthy_threshold,
            alt_port,
            reuse_connection: _,
            no_traffic_interval,
            no_traffic_healthy_interval,
            unhealthy_interval,
            unhealthy_edge_interval,
            healthy_edge_interval,
            event_log_path,
            event_logger,
            event_service,
            always_log_health_check_failures,
            always_log_health_check_success,
            tls_options,
            transport_socket_match_criteria,
            health_checker,
        } = h;
        // reuse_connection only changes how connections are kept between checks.
        reject_set!(
            errs,
            at,
            alt_port,
            event_log_path,
            event_logger,
            event_service,
            always_log_health_check_failures,
            always_log_health_check_success,
            tls_options,
            transport_socket_match_criteria,
        );
        let req = |d: &Option<envoy_types::pb::google::protobuf::Duration>,
                   f: &str,
                   errs: &mut Errors| {
            duration::check(d, &join(at, f), errs);
            match d.as_ref().map(duration::to_std) {
                Some(d) if !d.is_zero() => Some(d),
                _ => {
                    errs.add(join(at, f), "required, greater than 0");
                    None
                }
            }
        };
        let opt = |d: &Option<envoy_types::pb::google::protobuf::Duration>,
                   f: &str,
                   errs: &mut Errors| {
            duration::check(d, &join(at, f), errs);
            d.as_ref().map(duration::to_std).filter(|d| !d.is_zero())
        };
        let timeout = req(timeout, "timeout", errs);
        let interval = req(interval, "interval", errs);
        let (Some(unhealthy), Some(healthy)) = (unhealthy_threshold, healthy_threshold) else {
            errs.add(at, "unhealthy_threshold and healthy_threshold are required");
            return None;
        };
        let probe = match health_checker {
            Some(HealthChecker::HttpHealthCheck(hc)) => {
                convert_http(hc, &join(at, "http_health_check"), errs)?
            }
            Some(HealthChecker::TcpHealthCheck(tc)) => {
                let TcpHealthCheck {
                    send,
                    receive,
                    proxy_protocol_config,
                } = tc;
                let tat = join(at, "tcp_health_check");
                reject_set!(errs, &tat, proxy_protocol_config);
                Probe::Tcp {
                    send: send
                        .as_ref()
                        .map_or(Vec::new(), |p| payload_bytes(p, &join(&tat, "send"), errs)),
                    receive: receive
                        .iter()
                        .enumerate()
                        .map(|(i, p)| payload_bytes(p, &index(&join(&tat, "receive"), i), errs))
                        .collect(),
                }
            }
            Some(HealthChecker::GrpcHealthCheck(g)) => {
                let health_check::GrpcHealthCheck {
                    service_name,
                    authority,
                    initial_metadata,
                } = g;
                let gat = join(at, "grpc_health_check");
                reject_set!(errs, &gat, initial_metadata);
                Probe::Grpc {
                    service_name: service_name.clone(),
                    authority: (!authority.is_empty()).then(|| authority.clone()),
                }
            }
            Some(HealthChecker::CustomHealthCheck(_)) => {
                errs.add(join(at, "custom_health_check"), "not supported");
                return None;
            }
            None => {
                errs.add(
                    at,
                    "one of http_health_check or tcp_health_check is required",
                );
                return None;
            }
        };
        Some(HealthCheckConfig {
            probe,
            timeout: timeout?,
            interval: interval?,
            interval_jitter: opt(interval_jitter, "interval_jitter", errs).unwrap_or_default(),
            interval_jitter_percent: *interval_jitter_percent,
            initial_jitter: opt(initial_jitter, "initial_jitter", errs).unwrap_or_default(),
            unhealthy_threshold: unhealthy.value.max(1),
            healthy_threshold: healthy.value.max(1),
            unhealthy_interval: opt(unhealthy_interval, "unhealthy_interval", errs),
            unhealthy_edge_interval: opt(unhealthy_edge_interval, "unhealthy_edge_interval", errs),
            healthy_edge_interval: opt(healthy_edge_interval, "healthy_edge_interval", errs),
            no_traffic_interval: opt(no_traffic_interval, "no_traffic_interval", errs)
                .unwrap_or(Duration::from_secs(60)),
            no_traffic_healthy_interval: opt(
                no_traffic_healthy_interval,
                "no_traffic_healthy_interval",
                errs,
            ),
        })
    }

    /// The wait before the next check, per Envoy's interval rules, plus jitter.
    pub fn next_interval(
        &self,
        healthy: bool,
        transition: Transition,
        has_traffic: bool,
        random: u64,
    ) -> Duration {
        let base = if !has_traffic {
            if healthy {
                self.no_traffic_healthy_interval
                    .unwrap_or(self.no_traffic_interval)
            } else {
                self.no_traffic_interval
            }
        } else {
            match transition {
                Transition::BecameUnhealthy => self
                    .unhealthy_edge_interval
                    .or(self.unhealthy_interval)
                    .unwrap_or(self.interval),
                Transition::BecameHealthy => self.healthy_edge_interval.unwrap_or(self.interval),
                Transition::Unchanged if !healthy => {
                    self.unhealthy_interval.unwrap_or(self.interval)
                }
                Transition::Unchanged => self.interval,
            }
        };
        let mut jitter_ms = 0u64;
        let j = self.interval_jitter.as_millis() as u64;
        if j > 0 {
            jitter_ms += random % j;
        }
        let pct = base.as_millis() as u64 * u64::from(self.interval_jitter_percent) / 100;
        if pct > 0 {
            jitter_ms += (random >> 17) % pct;
        }
        base + Duration::from_millis(jitter_ms)
    }
}

fn convert_http(hc: &HttpHealthCheck, at: &str, errs: &mut Errors) -> Option<Probe> {
    let HttpHealthCheck {
        host,
        path,
        send,
        receive,
        response_buffer_size,
        request_headers_to_add,
        request_headers_to_remove,
        expected_statuses,
        retriable_statuses,
        codec_client_type,
        service_name_matcher,
        method,
    } = hc;
    reject_set!(
        errs,
        at,
        send,
        receive,
        response_buffer_size,
        codec_client_type,
        service_name_matcher,
    );
    if path.is_empty() {
        errs.add(join(at, "path"), "required");
        return None;
    }
    let method = match RequestMethod::try_from(*method) {
        Ok(RequestMethod::MethodUnspecified) | Ok(RequestMethod::Get) => "GET".to_string(),
        Ok(RequestMethod::Connect) => {
            errs.add(join(at, "method"), "CONNECT is not allowed");
            return None;
        }
        Ok(m) => m.as_str_name().to_string(),
        Err(_) => {
            errs.add(join(at, "method"), "unknown value");
            return None;
        }
    };
    let mut headers = Vec::new();
    for (i, h) in request_headers_to_add.iter().enumerate() {
        let hat = index(&join(at, "request_headers_to_add"), i);
        let Some(hv) = &h.header else {
            errs.add(join(&hat, "header"), "required");
            continue;
        };
        if hv.value.contains('%') {
            errs.add(
                join(&hat, "header.value"),
                "command operators are not supported in health checks",
            );
        }
        headers.push((hv.key.to_ascii_lowercase(), hv.value.clone()));
    }
    let expected = if expected_statuses.is_empty() {
        vec![(200, 201)]
    } else {
        ranges(expected_statuses, &join(at, "expected_statuses"), errs)
    };
    Some(Probe::Http {
        host: (!host.is_empty()).then(|| host.clone()),
        path: path.clone(),
        method,
        headers,
        remove_headers: request_headers_to_remove
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        expected,
        retriable: ranges(retriable_statuses, &join(at, "retriable_statuses"), errs),
    })
}

/// Applies a check result to a host's state; returns whether its health changed.
pub fn apply_result(host: &Host, result: CheckResult, cfg: &HealthCheckConfig) -> Transition {
    let first = !host.hc_checked.swap(true, Ordering::Relaxed);
    let unhealthy_now = host.health_flags() & flags::FAILED_ACTIVE_HC != 0;
    match result {
        CheckResult::Healthy => {
            host.hc_failures.store(0, Ordering::Relaxed);
            let n = host.hc_successes.fetch_add(1, Ordering::Relaxed) + 1;
            // A host's first successful check makes it healthy at once, as in Envoy.
            if unhealthy_now && (first || n >= cfg.healthy_threshold) {
                host.set_flag(flags::FAILED_ACTIVE_HC, false);
                return Transition::BecameHealthy;
            }
        }
        CheckResult::Failure | CheckResult::ImmediateFailure => {
            host.hc_successes.store(0, Ordering::Relaxed);
            let n = host.hc_failures.fetch_add(1, Ordering::Relaxed) + 1;
            let trip =
                result == CheckResult::ImmediateFailure || n >= cfg.unhealthy_threshold || first;
            if !unhealthy_now && trip {
                host.set_flag(flags::FAILED_ACTIVE_HC, true);
                return Transition::BecameUnhealthy;
            }
        }
    }
    Transition::Unchanged
}

/// Runs one check against `addr`.
pub async fn check(addr: SocketAddr, cfg: &HealthCheckConfig, cluster_name: &str) -> CheckResult {
    match tokio::time::timeout(cfg.timeout, probe(addr, &cfg.probe, cluster_name)).await {
        Ok(r) => r,
        Err(_) => CheckResult::Failure,
    }
}

async fn probe(addr: SocketAddr, probe: &Probe, cluster_name: &str) -> CheckResult {
    match probe {
        Probe::Grpc {
            service_name,
            authority,
        } => {
            grpc_check(
                addr,
                service_name,
                authority.as_deref().unwrap_or(cluster_name),
            )
            .await
        }
        Probe::Tcp { send, receive } => tcp_check(addr, send, receive).await,
        Probe::Http { .. } => http_check(addr, probe, cluster_name).await,
    }
}

async fn tcp_check(addr: SocketAddr, send: &[u8], receive: &[Vec<u8>]) -> CheckResult {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return CheckResult::Failure;
    };
    if !send.is_empty() && stream.write_all(send).await.is_err() {
        return CheckResult::Failure;
    }
    let want: Vec<u8> = receive.concat();
    if want.is_empty() {
        return CheckResult::Healthy;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return CheckResult::Failure,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if contains_in_order(&got, receive) {
            return CheckResult::Healthy;
        }
    }
}

async fn http_check(addr: SocketAddr, probe: &Probe, cluster_name: &str) -> CheckResult {
    let Probe::Http {
        host,
        path,
        method,
        headers,
        remove_headers,
        expected,
        retriable,
    } = probe
    else {
        return CheckResult::Failure;
    };
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return CheckResult::Failure;
    };
    let host = host.as_deref().unwrap_or(cluster_name);
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    let base = [
        ("host", host),
        ("user-agent", "Envoy/HC"),
        ("connection", "close"),
    ];
    for (k, v) in base {
        if !remove_headers.iter().any(|r| r == k) && !headers.iter().any(|(h, _)| h == k) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return CheckResult::Failure;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return CheckResult::Failure,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let Some(status) = line.split(' ').nth(1).and_then(|s| s.parse::<i64>().ok()) else {
        return CheckResult::Failure;
    };
    let within = |rs: &[(i64, i64)]| rs.iter().any(|(a, b)| status >= *a && status < *b);
    if within(expected) {
        CheckResult::Healthy
    } else if within(retriable) {
        CheckResult::Failure
    } else {
        CheckResult::ImmediateFailure
    }
}

/// grpc.health.v1.HealthCheckRequest.
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcHealthRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// grpc.health.v1.HealthCheckResponse; status 1 is SERVING.
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcHealthResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

async fn grpc_check(addr: SocketAddr, service: &str, authority: &str) -> CheckResult {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return CheckResult::Failure;
    };
    let endpoint = match format!("http://{authority}").parse::<http::Uri>() {
        Ok(origin) => endpoint.origin(origin),
        Err(_) => endpoint,
    };
    let Ok(channel) = endpoint.connect().await else {
        return CheckResult::Failure;
    };
    let mut client = tonic::client::Grpc::new(channel);
    if client.ready().await.is_err() {
        return CheckResult::Failure;
    }
    let request = tonic::Request::new(GrpcHealthRequest {
        service: service.to_string(),
    });
    let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
    let codec = tonic_prost::ProstCodec::<GrpcHealthRequest, GrpcHealthResponse>::default();
    match client.unary(request, path, codec).await {
        Ok(resp) if resp.get_ref().status == 1 => CheckResult::Healthy,
        _ => CheckResult::Failure,
    }
}

/// Envoy's TCP receive match: every expected payload appears, in order.
fn contains_in_order(got: &[u8], parts: &[Vec<u8>]) -> bool {
    let mut rest = got;
    for p in parts {
        match rest.windows(p.len().max(1)).position(|w| w == p.as_slice()) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> HealthCheckConfig {
        let p: HealthCheck =
            crate::config::load::parse_message(yaml, "envoy.config.core.v3.HealthCheck").unwrap();
        let mut errs = Errors::default();
        let c = HealthCheckConfig::convert(&p, "hc", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        c.unwrap()
    }

    const HTTP: &str = "timeout: 1s\ninterval: 5s\nunhealthy_threshold: 3\nhealthy_threshold: 2\nhttp_health_check: {path: /healthz}";

    fn host() -> Host {
        let h = Host::new("127.0.0.1:1".parse().unwrap(), String::new(), 1, 0);
        h.set_flag(flags::FAILED_ACTIVE_HC, true);
        h
    }

    #[test]
    fn first_success_makes_a_new_host_healthy() {
        let c = cfg(HTTP);
        let h = host();
        assert_eq!(
            apply_result(&h, CheckResult::Healthy, &c),
            Transition::BecameHealthy
        );
        assert!(h.is_healthy());
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let c = cfg(HTTP);
        let h = host();
        apply_result(&h, CheckResult::Healthy, &c);
        assert_eq!(
            apply_result(&h, CheckResult::Failure, &c),
            Transition::Unchanged
        );
        assert_eq!(
            apply_result(&h, CheckResult::Failure, &c),
            Transition::Unchanged
        );
        assert_eq!(
            apply_result(&h, CheckResult::Failure, &c),
            Transition::BecameUnhealthy
        );
        assert_eq!(
            apply_result(&h, CheckResult::Healthy, &c),
            Transition::Unchanged
        );
        assert_eq!(
            apply_result(&h, CheckResult::Healthy, &c),
            Transition::BecameHealthy
        );
    }

    #[test]
    fn an_unexpected_status_is_immediately_unhealthy() {
        let c = cfg(HTTP);
        let h = host();
        apply_result(&h, CheckResult::Healthy, &c);
        assert_eq!(
            apply_result(&h, CheckResult::ImmediateFailure, &c),
            Transition::BecameUnhealthy
        );
    }

    #[test]
    fn intervals_follow_traffic_and_health() {
        let c = cfg("timeout: 1s\ninterval: 5s\nunhealthy_interval: 2s\nno_traffic_interval: 30s\nunhealthy_threshold: 1\nhealthy_threshold: 1\ntcp_health_check: {}");
        assert_eq!(
            c.next_interval(true, Transition::Unchanged, false, 0),
            Duration::from_secs(30)
        );
        assert_eq!(
            c.next_interval(true, Transition::Unchanged, true, 0),
            Duration::from_secs(5)
        );
        assert_eq!(
            c.next_interval(false, Transition::Unchanged, true, 0),
            Duration::from_secs(2)
        );
        let j = cfg("timeout: 1s\ninterval: 5s\ninterval_jitter: 1s\nunhealthy_threshold: 1\nhealthy_threshold: 1\ntcp_health_check: {}");
        for r in 0..100u64 {
            let d = j.next_interval(true, Transition::Unchanged, true, r * 7919);
            assert!(d >= Duration::from_secs(5) && d < Duration::from_secs(6));
        }
    }

    #[test]
    fn tcp_payloads_decode_and_match_in_order() {
        assert_eq!(decode_hex("50 49 4e 47").unwrap(), b"PING");
        assert!(contains_in_order(
            b"xxPONGyyOK",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
        assert!(!contains_in_order(
            b"OKxxPONG",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
    }
}
