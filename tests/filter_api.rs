//! The public filter API through the embedding example (examples/api_key.rs): a custom
//! filter configured by TypedStruct, per-route overrides, the matched route visible to the
//! filter, and bad filter settings rejected with their field path.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// The example binary, built here (with the same cargo, profile and target directory as
/// this test) since `cargo test` does not build examples as programs.
fn example_bin() -> std::path::PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--example", "api_key"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(repo_path(".")).status().unwrap();
        assert!(status.success(), "cargo build --example api_key");
    });
    legate_bin()
        .parent()
        .unwrap()
        .join("examples")
        .join("api_key")
}

fn config(port: u16, backend: u16) -> String {
    std::fs::read_to_string(repo_path("examples/api_key.yaml"))
        .unwrap()
        .replace("port_value: 10000", &format!("port_value: {port}"))
        .replace("port_value: 10001", &format!("port_value: {backend}"))
}

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn request_with_key(port: u16, path: &str, key: Option<&str>) -> Response {
    let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    send_raw(
        port,
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n{key}connection: close\r\n\r\n").as_bytes(),
    )
}

#[test]
fn api_key_example_filters_requests() {
    let backend = Upstream::start("backend");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api_key.yaml");
    std::fs::write(&file, config(port, backend.port())).unwrap();
    let mut child = Running(
        Command::new(example_bin())
            .arg("-c")
            .arg(&file)
            .args(["--concurrency", "1", "--log-level", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, Some(&mut child.0));

    let r = request_with_key(port, "/orders", None);
    assert_eq!(
        (r.status, r.body.as_str()),
        (401, "missing or invalid API key\n")
    );
    assert_eq!(request_with_key(port, "/orders", Some("wrong")).status, 401);
    let r = request_with_key(port, "/orders", Some("k-123"));
    assert_eq!(r.status, 200);
    // The key was checked and removed before the request went upstream.
    assert_eq!(backend.last().path, "/orders");
    assert_eq!(backend.last().header("x-api-key"), None);
    assert_eq!(backend.count(), 1);
    // Per-route settings: off for /public, other keys for /partners.
    assert_eq!(request_with_key(port, "/public", None).body, "public\n");
    assert_eq!(
        request_with_key(port, "/partners", Some("k-123")).status,
        401
    );
    assert_eq!(
        request_with_key(port, "/partners", Some("p-456")).body,
        "partners\n"
    );
}

#[test]
fn bad_filter_settings_are_rejected_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    let yaml = config(1, 2)
        .replace("keys: [k-123, k-789]", "keys: []")
        .replace("value: {keys: [p-456]}", "value: {keys: [p-456], colour: blue}")
        .replace("type_url: type.googleapis.com/example.ApiKey\n                    value: {disabled: true}", "type_url: type.googleapis.com/example.Unknown\n                    value: {disabled: true}");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(example_bin())
        .args(["--validate", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    let hcm = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
    let routes = format!("{hcm}.route_config.virtual_hosts[0].routes");
    for expected in [
        format!("{hcm}.http_filters[0].typed_config.value: keys: at least one key is required"),
        format!("{routes}[0].typed_per_filter_config.example.api_key.type_url: no registered filter takes example.Unknown"),
        format!("{routes}[1].typed_per_filter_config.example.api_key.value: unknown field `colour`"),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    // The plain legate binary has no such filter and says so.
    let out = Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(repo_path("examples/api_key.yaml"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no registered filter takes example.ApiKey")
    );
}
