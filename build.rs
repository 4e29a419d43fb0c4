//! Compiles the descriptor pool for Envoy's v3 API from the `.proto` files that the
//! `envoy-types` crate ships, so the JSON/YAML loader and the typed messages come from the
//! same API snapshot.

use std::path::PathBuf;
use std::process::Command;

/// The API trees whose every file goes into the pool. All of Envoy's v3 API, not just the
/// extensions legate implements: a config naming an extension legate lacks must still parse,
/// so that `--validate` reports that extension by its path and goes on checking the rest
/// (an unknown `@type` would stop the JSON parser at the first one).
const TREES: &[&str] = &["data-plane-api/envoy", "xds/xds", "xds/udpa"];

const INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "googleapis",
    "protoc-gen-validate",
    "cel-spec/proto",
    "client_model",
    "opentelemetry-proto",
];

fn main() {
    let proto_dir = envoy_types_dir().join("proto");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut includes: Vec<PathBuf> = INCLUDES.iter().map(|i| proto_dir.join(i)).collect();
    // TypedStruct (custom filter settings), which envoy-types does not ship.
    includes.push(manifest.join("proto"));
    let mut roots = Vec::new();
    for tree in TREES {
        let base = proto_dir.join(tree);
        // Paths relative to the include root the tree sits in (data-plane-api/, xds/).
        let root = base.parent().expect("tree has a parent").to_path_buf();
        collect_protos(&base, &root, &mut roots);
    }
    roots.sort();
    roots.extend([
        "typed_struct.proto".into(),
        "udpa_typed_struct.proto".into(),
        "unknown_type.proto".into(),
    ]);
    let bytes = compile(&roots, &includes);
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("envoy_descriptors.bin");
    std::fs::write(&out, bytes).expect("write descriptor set");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=Cargo.lock");
}

/// One descriptor set for all `roots`. protoc's scoping rule makes a relative name such as
/// `common.dynamic_forward_proxy.v3.DnsCacheConfig` fail once a package named
/// `envoy.extensions.clusters.common` is loaded too; Envoy never compiles those files
/// together. A file that fails here is compiled on its own and its descriptors added; one
/// that fails even alone (its imports bring the clash along) is left out.
fn compile(roots: &[String], includes: &[PathBuf]) -> Vec<u8> {
    let mut all = protox::Compiler::new(includes).expect("proto include paths");
    all.include_imports(true);
    let mut apart = Vec::new();
    for root in roots {
        if all.open_file(root).is_err() {
            apart.push(root);
        }
    }
    let mut fds = all.file_descriptor_set();
    let mut seen: std::collections::HashSet<String> =
        fds.file.iter().filter_map(|f| f.name.clone()).collect();
    for root in apart {
        let mut one = protox::Compiler::new(includes).expect("proto include paths");
        one.include_imports(true);
        // Such a type (today only envoy.extensions.clusters.dynamic_forward_proxy.v3.
        // ClusterConfig) stays unknown to the parser, which reports it by its path like any
        // type it has no descriptor for.
        if one.open_file(root).is_err() {
            continue;
        }
        for file in one.file_descriptor_set().file {
            if seen.insert(file.name.clone().unwrap_or_default()) {
                fds.file.push(file);
            }
        }
    }
    prost::Message::encode_to_vec(&fds)
}

fn collect_protos(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_protos(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            let rel = path.strip_prefix(root).expect("under root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
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
