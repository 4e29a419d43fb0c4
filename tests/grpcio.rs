//! gRPC on the C core (grpcio from PyPI) at both ends, through legate and through Envoy
//! 1.40 on the same bootstrap: unary, server streaming, an error status with trailing
//! metadata, and a 1 MiB message. C-core servers reset a stream that lacks `te: trailers`
//! (tonic does not check), so this is the test that catches a proxy dropping it.
//!
//! Needs `python3` with `grpcio` and the `envoy` binary (scripts/setup.sh installs both).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};

use common::*;

const H2: &str = r#"typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {http2_protocol_options: {}}"#;

fn script() -> std::path::PathBuf {
    repo_path("tests/grpcio/echo.py")
}

/// The grpcio server: stops when its standard input closes (on drop).
struct Server {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new("python3")
            .arg(script())
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with grpcio (pip install grpcio)");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the server's port");
        Server {
            child,
            _stdin: stdin,
            port,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The grpcio client's results, calling through `port`.
fn call(port: u16) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(script())
        .args(["call", &port.to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON results")
}

fn bootstrap_for(port: u16, server: u16) -> String {
    bootstrap(
        &[listener_yaml(
            "grpc",
            port,
            "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - {match: {prefix: /, grpc: {}}, route: {cluster: grpc, timeout: 0s}}",
            "",
        )],
        &[cluster_yaml("grpc", &[server], H2)],
    )
}

#[test]
fn grpcio_calls_pass_as_through_envoy() {
    let server = Server::start();
    let expected = serde_json::json!({
        "unary": ["hello", "unary"],
        "mib": [1_048_576, true],
        "stream": ["item 0", "item 1", "item 2", "item 3", "item 4"],
        "fail": ["NOT_FOUND", "no such thing", "why-not"],
    });
    // The server and client agree without a proxy in between.
    assert_eq!(call(server.port), expected, "direct");

    let port = free_port();
    let yaml = bootstrap_for(port, server.port);
    let envoy = Envoy::start(&yaml, port);
    assert_eq!(call(port), expected, "through Envoy");
    drop(envoy);

    let port = free_port();
    let _legate = Legate::start(&bootstrap_for(port, server.port), port);
    assert_eq!(call(port), expected, "through legate");
}
