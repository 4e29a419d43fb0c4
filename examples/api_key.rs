//! legate embedded as a library, with one custom HTTP filter: an API-key check.
//!
//! Requests must carry a key from the configured list in the configured header; others get
//! 401. The key is removed before the request goes upstream. A route can turn the check
//! off, or accept other keys, through `typed_per_filter_config`. Configured like any Envoy
//! extension, with a TypedStruct (see examples/api_key.yaml):
//!
//! ```text
//! cargo run --example api_key -- -c examples/api_key.yaml
//! curl -H 'x-api-key: k-123' http://127.0.0.1:10000/
//! ```

use std::any::Any;
use std::sync::Arc;

use legate::filter::{FilterContext, FilterDecision, HttpFilter, HttpFilterFactory};
use pingora::http::RequestHeader;
use serde::Deserialize;

/// The filter's settings (the TypedStruct's `value`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyConfig {
    /// The request header that carries the key.
    header: String,
    keys: Vec<String>,
}

/// Per-route settings: switch the check off, or accept these keys instead.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyPerRoute {
    #[serde(default)]
    disabled: bool,
    keys: Option<Vec<String>>,
}

#[derive(Debug)]
struct ApiKey {
    header: http::HeaderName,
    keys: Vec<String>,
}

impl HttpFilter for ApiKey {
    fn on_request_headers(
        &self,
        req: &mut RequestHeader,
        cx: &FilterContext<'_>,
    ) -> FilterDecision {
        let per_route = cx
            .per_route
            .and_then(|c| c.downcast_ref::<ApiKeyPerRoute>());
        if per_route.is_some_and(|p| p.disabled) {
            return FilterDecision::Continue;
        }
        let keys = per_route
            .and_then(|p| p.keys.as_ref())
            .unwrap_or(&self.keys);
        let given = req.headers.get(&self.header).and_then(|v| v.to_str().ok());
        if !given.is_some_and(|g| keys.iter().any(|k| k == g)) {
            return FilterDecision::Respond {
                status: 401,
                body: "missing or invalid API key\n".into(),
            };
        }
        // The upstream never sees the key.
        req.remove_header(&self.header);
        FilterDecision::Continue
    }
}

struct ApiKeyFactory;

impl HttpFilterFactory for ApiKeyFactory {
    fn config_type(&self) -> &str {
        "example.ApiKey"
    }

    fn create(&self, config: &serde_json::Value) -> Result<Box<dyn HttpFilter>, String> {
        let c: ApiKeyConfig = serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        let header = http::HeaderName::from_bytes(c.header.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("header: '{}' is not a header name", c.header))?;
        if c.keys.is_empty() {
            return Err("keys: at least one key is required".into());
        }
        Ok(Box::new(ApiKey {
            header,
            keys: c.keys,
        }))
    }

    fn per_route(&self, config: &serde_json::Value) -> Result<Arc<dyn Any + Send + Sync>, String> {
        let c: ApiKeyPerRoute =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        Ok(Arc::new(c))
    }
}

fn main() -> std::process::ExitCode {
    legate::Legate::new().http_filter(ApiKeyFactory).main()
}
