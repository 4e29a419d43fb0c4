//! Header additions and removals configured at route-configuration, virtual-host, route and
//! weighted-cluster level (`*_headers_to_add`, `*_headers_to_remove`).

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue as HeaderValueProto, HeaderValueOption,
};
use http::{HeaderName, HeaderValue};

use crate::config::error::{index, join, Errors};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// A piece of a header value: literal text or one of Envoy's command operators.
#[derive(Debug, Clone)]
enum Part {
    Text(String),
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    Protocol,
    Hostname,
    RequestHeader(HeaderName),
}

#[derive(Debug, Clone)]
enum ValueTemplate {
    Literal(HeaderValue),
    Formatted(Vec<Part>),
}

/// What a formatted header value can refer to.
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatContext<'a> {
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub protocol: &'a str,
    pub request_headers: Option<&'a http::HeaderMap>,
}

#[derive(Debug, Clone)]
struct HeaderToAdd {
    name: HeaderName,
    value: ValueTemplate,
    action: AppendAction,
    keep_empty_value: bool,
}

/// Something whose headers can be edited: Pingora's request/response headers, or a plain
/// `HeaderMap` in tests.
pub trait HeaderTarget {
    fn contains(&self, name: &HeaderName) -> bool;
    fn append(&mut self, name: HeaderName, value: HeaderValue);
    fn insert(&mut self, name: HeaderName, value: HeaderValue);
    fn remove(&mut self, name: &HeaderName);
    fn header_map(&self) -> &http::HeaderMap;
}

/// Removes every header whose name `doomed` selects. One pass over the names the message
/// has (a handful, and usually none doomed) costs less than one hashed lookup per name on
/// a list: the request path strips some thirty names from every request.
pub fn remove_where<T: HeaderTarget + ?Sized>(target: &mut T, doomed: impl Fn(&str) -> bool) {
    // Collecting an empty iterator does not allocate.
    let names: Vec<HeaderName> = target
        .header_map()
        .keys()
        .filter(|n| doomed(n.as_str()))
        .cloned()
        .collect();
    for name in &names {
        target.remove(name);
    }
}

impl HeaderTarget for http::HeaderMap {
    fn contains(&self, name: &HeaderName) -> bool {
        self.contains_key(name)
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        http::HeaderMap::append(self, name, value);
    }
    fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        http::HeaderMap::insert(self, name, value);
    }
    fn remove(&mut self, name: &HeaderName) {
        http::HeaderMap::remove(self, name);
    }
    fn header_map(&self) -> &http::HeaderMap {
        self
    }
}

impl HeaderTarget for pingora::http::RequestHeader {
    fn contains(&self, name: &HeaderName) -> bool {
        self.headers.contains_key(name)
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        // Both arguments are already valid header types; appending cannot fail.
        let _ = self.append_header(name, value);
    }
    fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.insert_header(name, value);
    }
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
    fn header_map(&self) -> &http::HeaderMap {
        &self.headers
    }
}

impl HeaderTarget for pingora::http::ResponseHeader {
    fn contains(&self, name: &HeaderName) -> bool {
        self.headers.contains_key(name)
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.append_header(name, value);
    }
    fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.insert_header(name, value);
    }
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
    fn header_map(&self) -> &http::HeaderMap {
        &self.headers
    }
}

/// One level's `headers_to_add` and `headers_to_remove`.
#[derive(Debug, Clone, Default)]
pub struct HeaderMutations {
    add: Vec<HeaderToAdd>,
    remove: Vec<HeaderName>,
}

impl HeaderMutations {
    pub fn convert(
        to_add: &[HeaderValueOption],
        to_remove: &[String],
        at: &str,
        add_field: &str,
        remove_field: &str,
        errs: &mut Errors,
    ) -> Self {
        let mut out = HeaderMutations::default();
        for (i, opt) in to_add.iter().enumerate() {
            let at = index(&join(at, add_field), i);
            if let Some(h) = convert_option(opt, &at, errs) {
                out.add.push(h);
            }
        }
        for (i, name) in to_remove.iter().enumerate() {
            let at = index(&join(at, remove_field), i);
            match modifiable_name(name) {
                Ok(n) => out.remove.push(n),
                Err(reason) => errs.add(at, reason),
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Whether any value uses a command operator (`%...%`).
    pub fn uses_format(&self) -> bool {
        self.add
            .iter()
            .any(|h| matches!(h.value, ValueTemplate::Formatted(_)))
    }

    /// Envoy removes first, then adds.
    pub fn apply(&self, target: &mut dyn HeaderTarget, ctx: &FormatContext<'_>) {
        for name in &self.remove {
            target.remove(name);
        }
        for h in &self.add {
            let value = match &h.value {
                ValueTemplate::Literal(v) => v.clone(),
                ValueTemplate::Formatted(parts) => {
                    match HeaderValue::from_str(&render(parts, ctx)) {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                }
            };
            if value.is_empty() && !h.keep_empty_value {
                continue;
            }
            match h.action {
                AppendAction::AppendIfExistsOrAdd => target.append(h.name.clone(), value),
                AppendAction::AddIfAbsent => {
                    if !target.contains(&h.name) {
                        target.insert(h.name.clone(), value);
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => target.insert(h.name.clone(), value),
                AppendAction::OverwriteIfExists => {
                    if target.contains(&h.name) {
                        target.insert(h.name.clone(), value);
                    }
                }
            }
        }
    }
}

fn modifiable_name(name: &str) -> Result<HeaderName, String> {
    if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
        return Err("':'-prefixed or host headers may not be modified".into());
    }
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("invalid header name '{name}'"))
}

fn convert_option(opt: &HeaderValueOption, at: &str, errs: &mut Errors) -> Option<HeaderToAdd> {
    let HeaderValueOption {
        header,
        append,
        append_action,
        keep_empty_value,
    } = opt;
    let Some(HeaderValueProto {
        key,
        value,
        raw_value,
    }) = header
    else {
        errs.add(join(at, "header"), "required");
        return None;
    };
    let name = match modifiable_name(key) {
        Ok(n) => n,
        Err(reason) => {
            errs.add(join(at, "header.key"), reason);
            return None;
        }
    };
    let action = match (append, HeaderAppendAction::try_from(*append_action)) {
        (Some(_), Ok(a)) if a != HeaderAppendAction::AppendIfExistsOrAdd => {
            errs.add(at, "append and append_action are mutually exclusive");
            return None;
        }
        (Some(b), _) if b.value => AppendAction::AppendIfExistsOrAdd,
        (Some(_), _) => AppendAction::OverwriteIfExistsOrAdd,
        (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => AppendAction::AppendIfExistsOrAdd,
        (None, Ok(HeaderAppendAction::AddIfAbsent)) => AppendAction::AddIfAbsent,
        (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => {
            AppendAction::OverwriteIfExistsOrAdd
        }
        (None, Ok(HeaderAppendAction::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
        (None, Err(_)) => {
            errs.add(join(at, "append_action"), "unknown value");
            return None;
        }
    };
    if !value.is_empty() && !raw_value.is_empty() {
        errs.add(
            join(at, "header"),
            "only one of value and raw_value may be set",
        );
        return None;
    }
    let text = if raw_value.is_empty() {
        value.clone()
    } else {
        match String::from_utf8(raw_value.clone()) {
            Ok(s) => s,
            Err(_) => {
                errs.add(join(at, "header.raw_value"), "must be UTF-8");
                return None;
            }
        }
    };
    let value = match parse_template(&text) {
        Ok(v) => v,
        Err(reason) => {
            errs.add(join(at, "header.value"), reason);
            return None;
        }
    };
    if let ValueTemplate::Literal(_) = value {
    } else if let ValueTemplate::Formatted(parts) = &value {
        if parts.iter().all(|p| matches!(p, Part::Text(_))) {
            let text = render(parts, &FormatContext::default());
            return literal(&text, at, errs).map(|v| HeaderToAdd {
                name,
                value: ValueTemplate::Literal(v),
                action,
                keep_empty_value: *keep_empty_value,
            });
        }
    }
    Some(HeaderToAdd {
        name,
        value,
        action,
        keep_empty_value: *keep_empty_value,
    })
}

fn literal(text: &str, at: &str, errs: &mut Errors) -> Option<HeaderValue> {
    match HeaderValue::from_str(text) {
        Ok(v) => Some(v),
        Err(_) => {
            errs.add(join(at, "header.value"), "invalid header value");
            None
        }
    }
}

/// Parses Envoy's header value format: `%%` is a literal `%`, `%NAME%` or `%REQ(h)%` a
/// command operator.
fn parse_template(s: &str) -> Result<ValueTemplate, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            text.push('%');
            rest = r;
            continue;
        }
        let Some(end) = rest.find('%') else {
            return Err(format!(
                "unterminated command operator in '{s}' (write %% for a literal %)"
            ));
        };
        let op = &rest[..end];
        rest = &rest[end + 1..];
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(match op {
            "DOWNSTREAM_REMOTE_ADDRESS" => Part::DownstreamRemoteAddress,
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Part::DownstreamRemoteAddressWithoutPort,
            "DOWNSTREAM_LOCAL_ADDRESS" => Part::DownstreamLocalAddress,
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Part::DownstreamLocalAddressWithoutPort,
            "DOWNSTREAM_LOCAL_PORT" => Part::DownstreamLocalPort,
            "PROTOCOL" => Part::Protocol,
            "HOSTNAME" => Part::Hostname,
            _ => match op.strip_prefix("REQ(").and_then(|o| o.strip_suffix(')')) {
                Some(h) => Part::RequestHeader(
                    HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("invalid header name in %{op}%"))?,
                ),
                None => return Err(format!("command operator %{op}% is not supported")),
            },
        });
    }
    text.push_str(rest);
    if parts.is_empty() {
        return HeaderValue::from_str(&text)
            .map(ValueTemplate::Literal)
            .map_err(|_| "invalid header value".to_string());
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(ValueTemplate::Formatted(parts))
}

fn render(parts: &[Part], ctx: &FormatContext<'_>) -> String {
    let mut out = String::new();
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::DownstreamRemoteAddress => {
                if let Some(a) = ctx.remote {
                    out.push_str(&a.to_string());
                }
            }
            Part::DownstreamRemoteAddressWithoutPort => {
                if let Some(a) = ctx.remote {
                    out.push_str(&a.ip().to_string());
                }
            }
            Part::DownstreamLocalAddress => {
                if let Some(a) = ctx.local {
                    out.push_str(&a.to_string());
                }
            }
            Part::DownstreamLocalAddressWithoutPort => {
                if let Some(a) = ctx.local {
                    out.push_str(&a.ip().to_string());
                }
            }
            Part::DownstreamLocalPort => {
                if let Some(a) = ctx.local {
                    out.push_str(&a.port().to_string());
                }
            }
            Part::Protocol => out.push_str(ctx.protocol),
            Part::Hostname => out.push_str(&crate::hostname()),
            Part::RequestHeader(h) => {
                if let Some(v) = ctx.request_headers.and_then(|m| m.get(h)) {
                    out.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_where_drops_every_value_of_selected_names_only() {
        let mut req = pingora::http::RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("Keep-Alive", "1").unwrap();
        req.append_header("x-envoy-retry-on", "5xx").unwrap();
        req.append_header("x-envoy-retry-on", "reset").unwrap();
        req.append_header("x-kept", "yes").unwrap();
        remove_where(&mut req, |n| n == "keep-alive" || n.starts_with("x-envoy-"));
        let names: Vec<&str> = req.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        // The case-preserving copy Pingora writes to the wire lost them too.
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        assert_eq!(wire, b"x-kept: yes\r\n");
    }

    fn opt(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValueProto {
                key: key.into(),
                value: value.into(),
                raw_value: vec![],
            }),
            append: None,
            append_action: action as i32,
            keep_empty_value: false,
        }
    }

    fn apply(opts: &[HeaderValueOption], remove: &[String], h: &mut http::HeaderMap) {
        let mut errs = Errors::default();
        let m = HeaderMutations::convert(opts, remove, "r", "add", "remove", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        m.apply(h, &FormatContext::default());
    }

    #[test]
    fn append_actions_follow_envoy() {
        let mut h = http::HeaderMap::new();
        h.insert("a", HeaderValue::from_static("old"));
        h.insert("b", HeaderValue::from_static("old"));
        h.insert("c", HeaderValue::from_static("old"));
        apply(
            &[
                opt("a", "new", HeaderAppendAction::AppendIfExistsOrAdd),
                opt("b", "new", HeaderAppendAction::AddIfAbsent),
                opt("c", "new", HeaderAppendAction::OverwriteIfExistsOrAdd),
                opt("d", "new", HeaderAppendAction::OverwriteIfExists),
                opt("e", "new", HeaderAppendAction::AddIfAbsent),
                opt("f", "", HeaderAppendAction::AddIfAbsent),
            ],
            &[],
            &mut h,
        );
        let all = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("a"), ["old", "new"]);
        assert_eq!(all("b"), ["old"]);
        assert_eq!(all("c"), ["new"]);
        assert!(all("d").is_empty());
        assert_eq!(all("e"), ["new"]);
        assert!(
            all("f").is_empty(),
            "empty values are dropped unless keep_empty_value"
        );
    }

    #[test]
    fn remove_happens_before_add() {
        let mut h = http::HeaderMap::new();
        h.insert("x", HeaderValue::from_static("old"));
        apply(
            &[opt("x", "new", HeaderAppendAction::AppendIfExistsOrAdd)],
            &["x".to_string()],
            &mut h,
        );
        assert_eq!(h.get("x").unwrap(), "new");
    }

    #[test]
    fn host_and_pseudo_headers_are_rejected() {
        let mut errs = Errors::default();
        HeaderMutations::convert(
            &[opt("host", "x", HeaderAppendAction::AddIfAbsent)],
            &[":path".into()],
            "r",
            "request_headers_to_add",
            "request_headers_to_remove",
            &mut errs,
        );
        let e = errs.into_result(()).unwrap_err();
        assert_eq!(e.0.len(), 2);
        assert_eq!(e.0[0].path, "r.request_headers_to_add[0].header.key");
    }

    #[test]
    fn command_operators_render() {
        let mut h = http::HeaderMap::new();
        let mut errs = Errors::default();
        let m = HeaderMutations::convert(
            &[opt(
                "x-client",
                "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%%",
                HeaderAppendAction::AddIfAbsent,
            )],
            &[],
            "r",
            "a",
            "b",
            &mut errs,
        );
        m.apply(
            &mut h,
            &FormatContext {
                remote: Some("127.0.0.9:5555".parse().unwrap()),
                ..Default::default()
            },
        );
        assert_eq!(h.get("x-client").unwrap(), "127.0.0.9 100%");
        HeaderMutations::convert(
            &[opt("x", "%NO_SUCH%", HeaderAppendAction::AddIfAbsent)],
            &[],
            "r",
            "a",
            "b",
            &mut errs,
        );
        assert!(!errs.is_empty());
    }
}
