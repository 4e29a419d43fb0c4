//! Envoy's file format in: YAML or JSON in the proto3 JSON mapping, converted to the typed
//! v3 messages through a descriptor pool built from the same protos as the types.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, Weak};

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};

use super::error::{ConfigError, ConfigErrors};
use super::shape::{shape, UnknownAny, UNKNOWN_TYPE};

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

/// A config read from text: the message, and the `Any`s whose types the descriptor pool
/// lacks, left in it as placeholders ([`type_name`] still gives their names).
#[derive(Debug)]
pub struct Parsed<M> {
    pub message: M,
    pub unknown: Vec<UnknownAny>,
}

impl<M> Parsed<M> {
    /// The message, or an error for each unknown type (for callers that will not compile it).
    pub fn strict(self) -> Result<M, ConfigErrors> {
        if self.unknown.is_empty() {
            Ok(self.message)
        } else {
            Err(report_unknown(&self.unknown, ConfigErrors::default()))
        }
    }

    /// Compiles the message with `compile`, adding an error for every unknown type the
    /// compiler did not already report by name: a config with an unknown type is never
    /// accepted, and its other problems are still all reported.
    pub fn compile<T>(
        self,
        compile: impl FnOnce(M) -> Result<T, ConfigErrors>,
    ) -> Result<T, ConfigErrors> {
        let compiled = compile(self.message);
        if self.unknown.is_empty() {
            return compiled;
        }
        Err(report_unknown(
            &self.unknown,
            compiled.err().unwrap_or_default(),
        ))
    }
}

fn report_unknown(unknown: &[UnknownAny], mut errors: ConfigErrors) -> ConfigErrors {
    for u in unknown {
        let named = errors
            .0
            .iter()
            .any(|e| e.reason.contains(&u.type_name) || e.path.starts_with(&u.path));
        if !named {
            errors.0.push(ConfigError::extension(
                &u.path,
                format!("type {} is not part of Envoy's v3 API", u.type_name),
                &u.type_name,
            ));
        }
    }
    errors
}

/// Reads a bootstrap file (YAML or JSON, told apart by content).
pub fn load_bootstrap_file(path: &std::path::Path) -> Result<Parsed<Bootstrap>, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one("", format!("cannot read {}: {e}", path.display())))?;
    parse_bootstrap(&text)
}

/// Parses bootstrap text (YAML or JSON).
pub fn parse_bootstrap(text: &str) -> Result<Parsed<Bootstrap>, ConfigErrors> {
    parse_lenient(text, "envoy.config.bootstrap.v3.Bootstrap")
}

/// Parses any Envoy message of the pool from YAML or JSON text; an extension type the pool
/// lacks is an error.
pub fn parse_message<M: Message + Default>(text: &str, full_name: &str) -> Result<M, ConfigErrors> {
    parse_lenient(text, full_name)?.strict()
}

/// Parses any Envoy message of the pool from YAML or JSON text, keeping extensions of types
/// the pool lacks as placeholders.
pub fn parse_lenient<M: Message + Default>(
    text: &str,
    full_name: &str,
) -> Result<Parsed<M>, ConfigErrors> {
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
    mut value: serde_json::Value,
    full_name: &str,
) -> Result<Parsed<M>, ConfigErrors> {
    let pool = pool();
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| ConfigErrors::one("", format!("unknown message type {full_name}")))?;
    let unknown = shape(&mut value, &desc, &pool);
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
    let message = M::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| ConfigErrors::one("", format!("cannot decode {full_name}: {e}")))?;
    Ok(Parsed { message, unknown })
}

/// serde_json appends "at line L column C" of the converted JSON, which points nowhere in
/// the user's YAML.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// The full name of the message type an `Any` holds, e.g.
/// `envoy.extensions.filters.http.router.v3.Router`; for a placeholder left by the parser,
/// the name the config gave.
pub fn type_name(any: &Any) -> Cow<'_, str> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != UNKNOWN_TYPE {
        return Cow::Borrowed(name);
    }
    match UnknownType::decode(any.value.as_slice()) {
        Ok(u) => Cow::Owned(
            u.type_url
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        Err(_) => Cow::Borrowed(name),
    }
}

/// proto/unknown_type.proto.
#[derive(Clone, PartialEq, prost::Message)]
struct UnknownType {
    #[prost(string, tag = "1")]
    type_url: String,
}

/// Unpacks a `google.protobuf.Any` into the typed message its URL names.
pub fn unpack_any<M: Message + Default>(
    any: &Any,
    expected: &str,
    at: &str,
) -> Result<M, ConfigErrors> {
    let name = type_name(any);
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
    any: &Any,
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
        let c = &b.message.static_resources.unwrap().clusters[0];
        assert_eq!(c.connect_timeout.unwrap().nanos, 250_000_000);
    }
}
