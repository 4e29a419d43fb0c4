//! What route matching reads from a request, independent of the server that received it.

use std::borrow::Cow;

use http::HeaderMap;

/// A request as the route table sees it: method, `:path` (with query), host, scheme and
/// headers. Pseudo-headers (`:path`, `:method`, `:authority`, `:scheme`) are readable by
/// name, as in Envoy's header matchers.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    pub remote_ip: Option<std::net::IpAddr>,
}

impl<'a> RequestView<'a> {
    pub fn new(
        method: &'a str,
        path: &'a str,
        host: &'a str,
        scheme: &'a str,
        headers: &'a HeaderMap,
    ) -> Self {
        RequestView {
            method,
            path,
            host,
            scheme,
            headers,
            remote_ip: None,
        }
    }

    /// The path without query string or fragment.
    pub fn path_only(&self) -> &'a str {
        match self.path.find(['?', '#']) {
            Some(i) => &self.path[..i],
            None => self.path,
        }
    }

    /// The raw query string (without `?`), if any.
    pub fn query(&self) -> Option<&'a str> {
        let q = self.path.split_once('?')?.1;
        Some(q.split_once('#').map_or(q, |(q, _)| q))
    }

    /// All values of a header joined with `,` (Envoy's rule for matching), or None if absent.
    pub fn header_joined(&self, lower_name: &str) -> Option<Cow<'a, str>> {
        match lower_name {
            ":path" => return Some(Cow::Borrowed(self.path)),
            ":method" => return Some(Cow::Borrowed(self.method)),
            ":authority" | "host" => return Some(Cow::Borrowed(self.host)),
            ":scheme" => return Some(Cow::Borrowed(self.scheme)),
            _ => {}
        }
        let mut values = self.headers.get_all(lower_name).iter();
        let first = values.next()?;
        let first = String::from_utf8_lossy(first.as_bytes());
        let Some(second) = values.next() else {
            return Some(first);
        };
        let mut joined = first.into_owned();
        for v in std::iter::once(second).chain(values) {
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
        Some(Cow::Owned(joined))
    }

    /// The first value of a query parameter, percent-decoded; `Some("")` for `?flag`.
    pub fn query_param(&self, name: &str) -> Option<Cow<'a, str>> {
        let query = self.query()?;
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(k) == name {
                return Some(percent_decode(v));
            }
        }
        None
    }

    /// Cookie value by name from the `cookie` header(s).
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        for value in self.headers.get_all(http::header::COOKIE) {
            let Ok(s) = value.to_str() else { continue };
            for part in s.split(';') {
                let part = part.trim();
                if let Some((k, v)) = part.split_once('=') {
                    if k == name {
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or(v);
                        return Some(v);
                    }
                }
            }
        }
        None
    }
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}
