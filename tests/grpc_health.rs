//! The gRPC health check (grpc.health.v1) against a real tonic health server.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HealthCheck;
use legate::cluster::health::{check, CheckResult, HealthCheckConfig};
use legate::config::Errors;
use tonic_health::ServingStatus;

fn config(service: &str) -> HealthCheckConfig {
    let yaml = format!(
        "timeout: 1s\ninterval: 1s\nunhealthy_threshold: 1\nhealthy_threshold: 1\ngrpc_health_check: {{service_name: '{service}'}}"
    );
    let proto: HealthCheck =
        legate::config::load::parse_message(&yaml, "envoy.config.core.v3.HealthCheck").unwrap();
    let mut errs = Errors::default();
    let cfg = HealthCheckConfig::convert(&proto, "hc", &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    cfg.unwrap()
}

#[tokio::test]
async fn grpc_health_check_follows_the_serving_status() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let cfg = config("orders");
    assert_eq!(check(addr, &cfg, "cluster").await, CheckResult::Healthy);
    reporter
        .set_service_status("orders", ServingStatus::NotServing)
        .await;
    assert_eq!(check(addr, &cfg, "cluster").await, CheckResult::Failure);
    assert_eq!(
        check(addr, &config("unknown"), "cluster").await,
        CheckResult::Failure
    );
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    assert_eq!(check(addr, &cfg, "cluster").await, CheckResult::Healthy);
    // Nothing listening: a failure, within the timeout.
    let dead: std::net::SocketAddr = (
        [127, 0, 0, 1],
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    )
        .into();
    let started = std::time::Instant::now();
    assert_eq!(check(dead, &cfg, "cluster").await, CheckResult::Failure);
    assert!(started.elapsed() < Duration::from_secs(2));
}
