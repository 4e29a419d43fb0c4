//! Route `hash_policy`: the request hash that RING_HASH and MAGLEV clusters use, computed
//! exactly as Envoy does (xxHash64, rotate-and-xor combination, `terminal`).

use envoy_types::pb::envoy::config::route::v3::route_action::{
    hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter},
    HashPolicy as HashPolicyProto,
};
use xxhash_rust::xxh64::{xxh64, Xxh64};

use crate::config::error::{index, join, Errors};
use crate::reject_set;
use crate::route::matcher::RegexRewrite;
use crate::route::request::RequestView;

#[derive(Debug)]
enum Method {
    Header {
        name: String,
        rewrite: Option<RegexRewrite>,
    },
    Cookie(String),
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug)]
struct Policy {
    method: Method,
    terminal: bool,
}

#[derive(Debug, Default)]
pub struct HashPolicy {
    policies: Vec<Policy>,
}

impl HashPolicy {
    pub fn convert(list: &[HashPolicyProto], at: &str, errs: &mut Errors) -> Self {
        let mut policies = Vec::new();
        for (i, p) in list.iter().enumerate() {
            let at = index(at, i);
            let HashPolicyProto {
                terminal,
                policy_specifier,
            } = p;
            let method = match policy_specifier {
                Some(PolicySpecifier::Header(Header {
                    header_name,
                    regex_rewrite,
                })) => Method::Header {
                    name: header_name.to_ascii_lowercase(),
                    rewrite: regex_rewrite.as_ref().and_then(|r| {
                        RegexRewrite::convert(r, &join(&at, "header.regex_rewrite"), errs)
                    }),
                },
                Some(PolicySpecifier::Cookie(Cookie {
                    name,
                    ttl,
                    path,
                    attributes,
                })) => {
                    // Envoy sets a cookie when `ttl` is given; legate does not generate cookies yet.
                    let at = join(&at, "cookie");
                    reject_set!(errs, &at, ttl, path, attributes);
                    Method::Cookie(name.clone())
                }
                Some(PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip })) => {
                    if !source_ip {
                        continue;
                    }
                    Method::SourceIp
                }
                Some(PolicySpecifier::QueryParameter(QueryParameter { name })) => {
                    Method::QueryParameter(name.clone())
                }
                Some(PolicySpecifier::FilterState(_)) => {
                    errs.add(join(&at, "filter_state"), "not supported");
                    continue;
                }
                None => {
                    errs.add(&at, "one of header, cookie, connection_properties or query_parameter is required");
                    continue;
                }
            };
            policies.push(Policy {
                method,
                terminal: *terminal,
            });
        }
        HashPolicy { policies }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The request's hash, or None when no policy produced one.
    pub fn hash(&self, req: &RequestView<'_>) -> Option<u64> {
        let mut hash: Option<u64> = None;
        for p in &self.policies {
            if let Some(new) = p.method.evaluate(req) {
                let old = hash.map_or(0, |h| h.rotate_left(1));
                hash = Some(old ^ new);
            }
            if p.terminal && hash.is_some() {
                break;
            }
        }
        hash
    }
}

impl Method {
    fn evaluate(&self, req: &RequestView<'_>) -> Option<u64> {
        match self {
            Method::Header { name, rewrite } => {
                let mut values: Vec<String> = req
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                if values.is_empty() {
                    if let Some(v) = req.header_joined(name) {
                        // Pseudo-headers such as :authority and :path.
                        values.push(v.into_owned());
                    } else {
                        return None;
                    }
                }
                if let Some(r) = rewrite {
                    for v in &mut values {
                        *v = r.replace_all(v).into_owned();
                    }
                }
                // Same hash whatever the order of repeated headers.
                values.sort();
                let mut h = Xxh64::new(0);
                for v in &values {
                    h.update(v.as_bytes());
                }
                Some(h.digest())
            }
            Method::Cookie(name) => req
                .cookie(name)
                .filter(|v| !v.is_empty())
                .map(|v| xxh64(v.as_bytes(), 0)),
            Method::SourceIp => req.remote_ip.map(|ip| xxh64(ip.to_string().as_bytes(), 0)),
            Method::QueryParameter(name) => req.query_param(name).map(|v| xxh64(v.as_bytes(), 0)),
        }
    }
}
