//! Compiles the descriptor pool for Envoy's v3 API from the `.proto` files that the
//! `envoy-types` crate ships, so the JSON/YAML loader and the typed messages come from the
//! same API snapshot.

use std::path::PathBuf;
use std::process::Command;

/// Files whose messages (and everything they import) a bootstrap or an xDS resource may
/// carry, including the extension types that appear inside `typed_config`.
const ROOTS: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/service/discovery/v3/ads.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/network/connection_limit/v3/connection_limit.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/filters/http/local_ratelimit/v3/local_rate_limit.proto",
    "envoy/extensions/filters/http/cors/v3/cors.proto",
    "envoy/extensions/filters/http/header_mutation/v3/header_mutation.proto",
    "envoy/extensions/filters/http/health_check/v3/health_check.proto",
    "envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto",
    "envoy/extensions/request_id/uuid/v3/uuid.proto",
];

const INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "googleapis",
    "protoc-gen-validate",
    "cel-spec",
    "client_model",
    "opentelemetry-proto",
];

fn main() {
    let proto_dir = envoy_types_dir().join("proto");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut includes: Vec<PathBuf> = INCLUDES.iter().map(|i| proto_dir.join(i)).collect();
    // TypedStruct (custom filter settings), which envoy-types does not ship.
    includes.push(manifest.join("proto"));
    let roots = ROOTS
        .iter()
        .copied()
        .chain(["typed_struct.proto", "udpa_typed_struct.proto"]);
    let fds = protox::compile(roots, &includes).expect("compile envoy protos");
    let bytes = prost::Message::encode_to_vec(&fds);
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("envoy_descriptors.bin");
    std::fs::write(&out, bytes).expect("write descriptor set");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=Cargo.lock");
}

/// Where cargo unpacked the `envoy-types` dependency: the registry source directory of the
/// version Cargo.lock pins, else whatever `cargo metadata` reports.
fn envoy_types_dir() -> PathBuf {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    if let Some(dir) = from_registry(&manifest) {
        return dir;
    }
    from_metadata(&manifest)
}

fn from_registry(manifest: &std::path::Path) -> Option<PathBuf> {
    let lock = std::fs::read_to_string(manifest.join("Cargo.lock")).ok()?;
    let mut lines = lock.lines();
    let mut version = None;
    while let Some(l) = lines.next() {
        if l.trim() == "name = \"envoy-types\"" {
            version = lines
                .next()
                .and_then(|v| v.trim().strip_prefix("version = \""))
                .map(|v| v.trim_end_matches('"').to_string());
            break;
        }
    }
    let version = version?;
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cargo"))
        })?;
    let src = cargo_home.join("registry").join("src");
    for index in std::fs::read_dir(src).ok()?.flatten() {
        let dir = index.path().join(format!("envoy-types-{version}"));
        if dir.join("proto").is_dir() {
            return Some(dir);
        }
    }
    None
}

fn from_metadata(manifest: &std::path::Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(manifest.join("Cargo.toml"));
    if let Ok(target) = std::env::var("TARGET") {
        cmd.args(["--filter-platform", &target]);
    }
    let output = cmd.output().expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("metadata json");
    let packages = meta["packages"].as_array().expect("packages");
    let pkg = packages
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types in the dependency graph");
    let manifest_path = pkg["manifest_path"].as_str().expect("manifest_path");
    PathBuf::from(manifest_path)
        .parent()
        .expect("envoy-types dir")
        .to_path_buf()
}
