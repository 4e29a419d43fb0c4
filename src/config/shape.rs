//! Brings a config's JSON into the form the proto3 JSON reader takes, as Envoy's own parser
//! reads it, so that a config Envoy loads does not fail here on form alone:
//! - a single value where the proto has a repeated field is a list of one (Envoy's
//!   protobuf JSON parser takes `filters: {name: ...}` and `domains: "*"`);
//! - an `Any` whose type is not in the descriptor pool becomes an [`UNKNOWN_TYPE`]
//!   placeholder carrying the original type URL, and is listed. The JSON reader would
//!   otherwise stop at the first one, hiding every later problem in the file; this way the
//!   compiler meets the extension where it is used and reports it by its path, with
//!   everything else.

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};
use serde_json::{Map, Value};

use super::error::{index, join};

/// Full name of the placeholder message (proto/unknown_type.proto).
pub const UNKNOWN_TYPE: &str = "legate.config.v1.UnknownType";

/// An `Any` of a type the pool does not have: where it was and what it named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownAny {
    pub path: String,
    pub type_name: String,
}

/// Rewrites `value` (a message of type `desc`) in place; returns the unknown `Any`s found.
pub fn shape(
    value: &mut Value,
    desc: &MessageDescriptor,
    pool: &DescriptorPool,
) -> Vec<UnknownAny> {
    let mut unknown = Vec::new();
    walk_message(value, desc, pool, "", &mut unknown);
    unknown
}

fn walk_message(
    value: &mut Value,
    desc: &MessageDescriptor,
    pool: &DescriptorPool,
    at: &str,
    unknown: &mut Vec<UnknownAny>,
) {
    let Value::Object(obj) = value else { return };
    match desc.full_name() {
        "google.protobuf.Any" => return walk_any(obj, pool, at, unknown),
        // Free-form JSON, and well-known types whose JSON form is not an object of fields.
        "google.protobuf.Struct" | "google.protobuf.Value" | "google.protobuf.ListValue" => return,
        _ => {}
    }
    for (key, child) in obj.iter_mut() {
        let Some(field) = desc
            .get_field_by_name(key)
            .or_else(|| desc.get_field_by_json_name(key))
        else {
            // Unknown field names are the JSON reader's to report, with their path.
            continue;
        };
        let at = join(at, field.name());
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else {
                continue;
            };
            let Kind::Message(value_desc) = entry.map_entry_value_field().kind() else {
                continue;
            };
            if let Value::Object(entries) = child {
                for (k, v) in entries.iter_mut() {
                    walk_message(v, &value_desc, pool, &join(&at, k), unknown);
                }
            }
            continue;
        }
        if field.is_list() && !child.is_array() && !child.is_null() {
            let one = std::mem::take(child);
            *child = Value::Array(vec![one]);
        }
        let Kind::Message(child_desc) = field.kind() else {
            continue;
        };
        match child {
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    walk_message(item, &child_desc, pool, &index(&at, i), unknown);
                }
            }
            other => walk_message(other, &child_desc, pool, &at, unknown),
        }
    }
}

fn walk_any(
    obj: &mut Map<String, Value>,
    pool: &DescriptorPool,
    at: &str,
    unknown: &mut Vec<UnknownAny>,
) {
    let Some(Value::String(url)) = obj.get("@type") else {
        // A missing or malformed `@type` is the JSON reader's to report.
        return;
    };
    let url = url.clone();
    let type_name = url.rsplit('/').next().unwrap_or_default();
    match pool.get_message_by_name(type_name) {
        Some(desc) => {
            // Well-known types keep their JSON form under "value".
            if desc.full_name().starts_with("google.protobuf.") {
                return;
            }
            let mut inner = Value::Object(std::mem::take(obj));
            walk_message(&mut inner, &desc, pool, at, unknown);
            if let Value::Object(back) = inner {
                *obj = back;
            }
        }
        None => {
            unknown.push(UnknownAny {
                path: at.to_string(),
                type_name: type_name.to_string(),
            });
            obj.clear();
            obj.insert(
                "@type".into(),
                Value::String(format!("type.googleapis.com/{UNKNOWN_TYPE}")),
            );
            obj.insert("typeUrl".into(), Value::String(url));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::pool;

    fn shaped(text: &str) -> (Value, Vec<UnknownAny>) {
        let mut v: Value = serde_yaml::from_str(text).unwrap();
        let pool = pool();
        let desc = pool
            .get_message_by_name("envoy.config.bootstrap.v3.Bootstrap")
            .unwrap();
        let unknown = shape(&mut v, &desc, &pool);
        (v, unknown)
    }

    #[test]
    fn a_single_object_for_a_repeated_field_becomes_a_list_of_one() {
        let (v, unknown) = shaped(
            "static_resources:\n  listeners:\n    name: l\n    filterChains:\n      filters: {name: f}\n",
        );
        assert!(unknown.is_empty());
        assert_eq!(
            v["static_resources"]["listeners"][0]["filterChains"][0]["filters"][0]["name"],
            "f"
        );
    }

    #[test]
    fn an_unknown_any_is_replaced_and_listed_with_its_path() {
        let (v, unknown) = shaped(
            "static_resources:\n  clusters:\n  - name: c\n    cluster_type:\n      name: x\n      typed_config:\n        '@type': type.googleapis.com/acme.Nope\n        size: 3\n",
        );
        assert_eq!(
            unknown,
            vec![UnknownAny {
                path: "static_resources.clusters[0].cluster_type.typed_config".into(),
                type_name: "acme.Nope".into(),
            }]
        );
        let tc = &v["static_resources"]["clusters"][0]["cluster_type"]["typed_config"];
        assert_eq!(tc["typeUrl"], "type.googleapis.com/acme.Nope");
        assert!(tc.get("size").is_none());
    }

    #[test]
    fn known_anys_are_walked_inside() {
        let (v, unknown) = shaped(concat!(
            "static_resources:\n  listeners:\n  - name: l\n    filter_chains:\n    - filters:\n",
            "      - name: hcm\n        typed_config:\n",
            "          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n",
            "          http_filters:\n            name: r\n            typed_config: {'@type': type.googleapis.com/acme.Filter}\n",
        ));
        let hcm = &v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        assert!(hcm["http_filters"].is_array());
        assert_eq!(
            unknown[0].path,
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config"
        );
    }
}
