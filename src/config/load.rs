//! Envoy's file format in: YAML or JSON in the proto3 JSON mapping, converted to the typed
//! v3 messages through a descriptor pool built from the same protos as the types.

use std::sync::{Arc, Mutex, Weak};

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};

use super::error::ConfigErrors;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// The descriptor pool for Envoy's v3 API. It is decoded when a config is read or dumped
/// (about 20 ms) and freed when the last user lets go: kept for the process's life it is
/// ~10 MiB of a running gateway's ~26 MiB RSS, for the rare reload.
pub fn pool() -> Arc<DescriptorPool> {
    static CACHE: Mutex<Weak<DescriptorPool>> = Mutex::new(Weak::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pool) = cache.upgrade() {
        return pool;
    }
    // The bytes are produced by build.rs from protos that compiled; failing here is a build
    // defect, not a user input problem.
    let pool = Arc::new(
        DescriptorPool::decode(DESCRIPTORS).expect("descriptor set built by build.rs decodes"),
    );
    *cache = Arc::downgrade(&pool);
    // Unit tests parse hundreds of snippets; decoding for each would only slow them down.
    #[cfg(test)]
    std::mem::forget(pool.clone());
    pool
}

/// Reads a bootstrap file (YAML or JSON, told apart by content).
pub fn load_bootstrap_file(path: &std::path::Path) -> Result<Bootstrap, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one("", format!("cannot read {}: {e}", path.display())))?;
    parse_bootstrap(&text)
}

/// Parses bootstrap text (YAML or JSON).
pub fn parse_bootstrap(text: &str) -> Result<Bootstrap, ConfigErrors> {
    parse_message(text, "envoy.config.bootstrap.v3.Bootstrap")
}

/// Parses any Envoy message of the pool from YAML or JSON text.
pub fn parse_message<M: Message + Default>(text: &str, full_name: &str) -> Result<M, ConfigErrors> {
    let value = text_to_json(text)?;
    json_to_message(value, full_name)
}

fn text_to_json(text: &str) -> Result<serde_json::Value, ConfigErrors> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        serde_json::from_str(text).map_err(|e| ConfigErrors::one("", format!("invalid JSON: {e}")))
    } else {
        let v: serde_json::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigErrors::one("", format!("invalid YAML: {e}")))?;
        // Envoy refuses a file with no document ("Unable to convert YAML as JSON"). Taking
        // it as an empty bootstrap would stop every listener, e.g. when a reload reads the
        // file while an editor has just truncated it.
        if v.is_null() {
            return Err(ConfigErrors::one(
                "",
                "the file holds no configuration (empty YAML document)",
            ));
        }
        Ok(v)
    }
}

/// Converts a proto3-JSON value to a typed message, with the failing field's path in errors.
pub fn json_to_message<M: Message + Default>(
    value: serde_json::Value,
    full_name: &str,
) -> Result<M, ConfigErrors> {
    let desc = pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| ConfigErrors::one("", format!("unknown message type {full_name}")))?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    let dynamic = match DynamicMessage::deserialize(desc, de) {
        Ok(m) => m,
        Err(e) => {
            let path = track.path().to_string();
            let path = if path == "." { String::new() } else { path };
            return Err(ConfigErrors::one(path, strip_position(&e.to_string())));
        }
    };
    M::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| ConfigErrors::one("", format!("cannot decode {full_name}: {e}")))
}

/// serde_json appends "at line L column C" of the converted JSON, which points nowhere in
/// the user's YAML.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Unpacks a `google.protobuf.Any` into the typed message its URL names.
pub fn unpack_any<M: Message + Default>(
    any: &envoy_types::pb::google::protobuf::Any,
    expected: &str,
    at: &str,
) -> Result<M, ConfigErrors> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != expected {
        return Err(ConfigErrors::one(
            super::error::join(at, "typed_config"),
            format!("expected type {expected}, got {name}"),
        ));
    }
    M::decode(any.value.as_slice()).map_err(|e| {
        ConfigErrors::one(
            super::error::join(at, "typed_config"),
            format!("cannot decode {expected}: {e}"),
        )
    })
}

/// [`unpack_any`], with its error added to `errs`: None when the message did not unpack.
pub fn unpack_or_report<M: Message + Default>(
    any: &envoy_types::pb::google::protobuf::Any,
    expected: &str,
    at: &str,
    errs: &mut super::error::Errors,
) -> Option<M> {
    match unpack_any(any, expected, at) {
        Ok(m) => Some(m),
        Err(e) => {
            errs.extend(e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_document_is_refused_as_envoy_does() {
        for text in ["", "  \n", "# only a comment\n"] {
            let err = parse_bootstrap(text).unwrap_err();
            assert!(err.0[0].reason.contains("no configuration"), "{err:?}");
        }
        assert!(parse_bootstrap("{}").is_ok());
    }

    #[test]
    fn unknown_field_is_reported_with_its_path() {
        let err =
            parse_bootstrap("static_resources:\n  clusters:\n  - name: a\n    bogus_field: 1\n")
                .unwrap_err();
        assert_eq!(err.0[0].path, "static_resources.clusters[0]");
        assert!(err.0[0].reason.contains("bogus_field"), "{err}");
    }

    #[test]
    fn bad_enum_is_reported_with_its_path() {
        let err = parse_bootstrap(
            "static_resources:\n  clusters:\n  - name: a\n    lb_policy: NO_SUCH\n",
        )
        .unwrap_err();
        assert_eq!(err.0[0].path, "static_resources.clusters[0].lb_policy");
    }

    #[test]
    fn json_and_camel_case_parse() {
        let b = parse_bootstrap(
            r#"{"staticResources":{"clusters":[{"name":"a","connectTimeout":"0.25s"}]}}"#,
        )
        .unwrap();
        let c = &b.static_resources.unwrap().clusters[0];
        assert_eq!(c.connect_timeout.unwrap().nanos, 250_000_000);
    }
}
