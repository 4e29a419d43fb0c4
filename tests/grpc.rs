//! gRPC and HTTP/2 end to end: a tonic client speaking h2c to legate, legate speaking h2c
//! to a tonic server (cluster with explicit HTTP/2), unary and server-streaming calls with
//! grpc-status in trailers; a raw HTTP/2 echo that streams both ways at once, with
//! trailers; and HTTP/1.1 clients still served on the same listener.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus as Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;

const H2: &str = r#"typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {http2_protocol_options: {}}"#;

async fn tonic_health_server() -> (tonic_health::server::HealthReporter, u16) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (reporter, port)
}

/// An HTTP/2 (h2c) server that echoes each request body chunk as soon as it arrives and
/// ends with trailers, so a client only gets chunk N back if the proxy streams both ways.
async fn h2_echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let resp = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(resp, false) else {
                            return;
                        };
                        let mut body = req.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            let _ = send.send_data(chunk, false);
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("x-echo", "done".parse().unwrap());
                        let _ = send.send_trailers(trailers);
                    });
                }
            });
        }
    });
    port
}

fn config(port: u16, grpc: u16, echo: u16, up: u16) -> String {
    bootstrap(
        &[listener_yaml(
            "grpc",
            port,
            r#"virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - {match: {prefix: /echo, grpc: {}}, route: {cluster: echo, timeout: 0s}}
  - {match: {prefix: /grpc.health.v1.Health/, grpc: {}}, route: {cluster: grpc, timeout: 0s}}
  - {match: {prefix: /}, route: {cluster: plain}}"#,
            "",
        )],
        &[
            cluster_yaml("grpc", &[grpc], H2),
            cluster_yaml("echo", &[echo], H2),
            cluster_yaml("plain", &[up], ""),
        ],
    )
}

#[test]
fn grpc_and_h2_streams_end_to_end() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (reporter, grpc_port) = rt.block_on(tonic_health_server());
    let echo_port = rt.block_on(h2_echo_server());
    let up = Upstream::start("plain");
    let port = free_port();
    let _l = Legate::start(&config(port, grpc_port, echo_port, up.port()), port);

    // HTTP/1.1 on the same listener still works (h2c is detected from the preface).
    assert_eq!(get(port, "/", "x").status, 200);
    // A request shorter than the h2 preface is answered without waiting for more bytes
    // (426 and close: HTTP/1.0 is refused by default, as in Envoy).
    let started = std::time::Instant::now();
    assert_eq!(send_raw(port, b"GET / HTTP/1.0\r\n\r\n").status, 426);
    assert!(started.elapsed() < Duration::from_secs(5));

    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        // Unary, with grpc-status 0 in the trailers.
        let r = client
            .check(HealthCheckRequest {
                service: "orders".into(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, Status::Serving as i32);
        // A gRPC error travels in the trailers (grpc-status 5) and reaches the client.
        let e = client
            .check(HealthCheckRequest {
                service: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        // Server streaming: each status change arrives while the call stays open.
        let mut watch = client
            .watch(HealthCheckRequest {
                service: "orders".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status, Status::Serving as i32);
        reporter
            .set_service_status("orders", ServingStatus::NotServing)
            .await;
        let second = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("streamed update")
            .unwrap()
            .unwrap();
        assert_eq!(second.status, Status::NotServing as i32);

        // Both directions at once: chunk N comes back before chunk N+1 is sent.
        let (mut h2, _conn) = h2c_connect(port).await;
        let req = http::Request::post(format!("http://127.0.0.1:{port}/echo"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut send) = h2.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        for i in 0..5 {
            let chunk = Bytes::from(format!("chunk-{i}"));
            send.send_data(chunk.clone(), false).unwrap();
            let mut got = Vec::new();
            while got.len() < chunk.len() {
                let data = tokio::time::timeout(Duration::from_secs(5), body.data())
                    .await
                    .expect("echo of a chunk while the request is still open")
                    .unwrap()
                    .unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                got.extend_from_slice(&data);
            }
            assert_eq!(got, chunk);
        }
        send.send_data(Bytes::new(), true).unwrap();
        while body.data().await.is_some() {}
        let trailers = body.trailers().await.unwrap().expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(trailers.get("x-echo").unwrap(), "done");
    });
}

/// `grpc-timeout` replaces the route timeout where the route honours it
/// (`max_stream_duration.grpc_timeout_header_max`), capped by that max; same statuses as
/// Envoy.
#[test]
fn grpc_timeout_header_bounds_the_request_like_envoy() {
    let slow = ScriptedUpstream::start("slow", |_| Behavior::Sleep(1500));
    let config = |port: u16| {
        bootstrap(
            &[listener_yaml(
                "main",
                port,
                r#"virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - {match: {prefix: /capped}, route: {cluster: slow, timeout: 10s, max_stream_duration: {grpc_timeout_header_max: 0.2s}}}
  - {match: {prefix: /honoured}, route: {cluster: slow, timeout: 10s, max_stream_duration: {grpc_timeout_header_max: 0s}}}
  - {match: {prefix: /}, route: {cluster: slow, timeout: 10s}}"#,
                "",
            )],
            &[cluster_yaml("slow", &[slow.addr.port()], "")],
        )
    };
    let port = free_port();
    let _l = Legate::start(&config(port), port);
    let envoy_port = free_port();
    let _e = Envoy::start(&config(envoy_port), envoy_port);
    // The upstream answers after 1.5 s, well inside the route's 10 s: a 504 means the
    // grpc-timeout (or its cap) bounded the request.
    let status = |port: u16, path: &str, header: &str| {
        request(port, "GET", path, "x", &[("grpc-timeout", header)]).status
    };
    for p in [port, envoy_port] {
        assert_eq!(status(p, "/honoured", "300m"), 504, "port {p}");
        // Capped at 200 ms even though the client allows 5 s.
        assert_eq!(status(p, "/capped", "5S"), 504, "port {p}");
        // A longer grpc-timeout lets the answer through.
        assert_eq!(status(p, "/honoured", "5S"), 200, "port {p}");
        // Not honoured on the plain route.
        assert_eq!(status(p, "/plain", "100m"), 200, "port {p}");
    }
}
