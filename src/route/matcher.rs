//! Envoy's string, regex, header and query-parameter matchers.

use std::borrow::Cow;

use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    HeaderMatcher as HeaderMatcherProto, QueryParameterMatcher as QueryParameterMatcherProto,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatchAndSubstitute, RegexMatcher,
    StringMatcher as StringMatcherProto,
};
use regex::Regex;

use crate::config::error::{join, Errors};
use crate::route::request::RequestView;

/// Compiles an Envoy `RegexMatcher` (RE2 syntax) so that it must match the whole input,
/// as Envoy's `safe_regex` does.
pub fn full_match_regex(m: &RegexMatcher, at: &str, errs: &mut Errors) -> Option<Regex> {
    let RegexMatcher {
        regex,
        engine_type: _,
    } = m;
    match Regex::new(&format!("^(?:{regex})$")) {
        Ok(r) => Some(r),
        Err(e) => {
            errs.add(join(at, "regex"), format!("invalid regex: {e}"));
            None
        }
    }
}

/// The literal text every match of `pattern` must start with ("/api/" for `/api/[0-9]+`), so
/// that a regex route can be indexed like a prefix route; empty when there is none.
pub fn literal_prefix(pattern: &str) -> String {
    use regex_syntax::hir::{HirKind, Look};
    let Ok(hir) = regex_syntax::Parser::new().parse(pattern) else {
        return String::new();
    };
    let parts = match hir.kind() {
        HirKind::Concat(parts) => parts.as_slice(),
        _ => std::slice::from_ref(&hir),
    };
    let mut prefix = Vec::new();
    for part in parts {
        match part.kind() {
            HirKind::Literal(lit) => prefix.extend_from_slice(&lit.0),
            HirKind::Look(Look::Start) if prefix.is_empty() => {}
            _ => break,
        }
    }
    // A literal may end inside a UTF-8 sequence only if the pattern was bytes; keep the
    // valid part, which is still a prefix of every match.
    match String::from_utf8(prefix) {
        Ok(s) => s,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            String::from_utf8_lossy(&e.into_bytes()[..valid]).into_owned()
        }
    }
}

/// An unanchored regex, for rewrites that replace every match.
pub fn search_regex(m: &RegexMatcher, at: &str, errs: &mut Errors) -> Option<Regex> {
    let RegexMatcher {
        regex,
        engine_type: _,
    } = m;
    match Regex::new(regex) {
        Ok(r) => Some(r),
        Err(e) => {
            errs.add(join(at, "regex"), format!("invalid regex: {e}"));
            None
        }
    }
}

/// `regex_rewrite`: a pattern and an RE2 substitution (`\1` names a capture group).
#[derive(Debug, Clone)]
pub struct RegexRewrite {
    pattern: Regex,
    substitution: String,
}

impl RegexRewrite {
    pub fn convert(p: &RegexMatchAndSubstitute, at: &str, errs: &mut Errors) -> Option<Self> {
        let RegexMatchAndSubstitute {
            pattern,
            substitution,
        } = p;
        let Some(pattern) = pattern else {
            errs.add(join(at, "pattern"), "required");
            return None;
        };
        let pattern = search_regex(pattern, &join(at, "pattern"), errs)?;
        Some(RegexRewrite {
            pattern,
            substitution: re2_substitution(substitution),
        })
    }

    pub fn replace_all<'a>(&self, input: &'a str) -> Cow<'a, str> {
        self.pattern.replace_all(input, self.substitution.as_str())
    }
}

/// Translates RE2's `\N` group references to the regex crate's `${N}`, escaping `$`.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str(&format!("${{{d}}}"));
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            _ => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub struct StringMatcher {
    pattern: Pattern,
    ignore_case: bool,
}

impl StringMatcher {
    pub fn convert(m: &StringMatcherProto, at: &str, errs: &mut Errors) -> Option<Self> {
        let StringMatcherProto {
            ignore_case,
            match_pattern,
        } = m;
        let lower = |s: &String| {
            if *ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        let pattern = match match_pattern {
            Some(MatchPattern::Exact(s)) => Pattern::Exact(lower(s)),
            Some(MatchPattern::Prefix(s)) => Pattern::Prefix(lower(s)),
            Some(MatchPattern::Suffix(s)) => Pattern::Suffix(lower(s)),
            Some(MatchPattern::Contains(s)) => Pattern::Contains(lower(s)),
            Some(MatchPattern::SafeRegex(r)) => {
                Pattern::Regex(full_match_regex(r, &join(at, "safe_regex"), errs)?)
            }
            Some(MatchPattern::Custom(_)) => {
                errs.add(join(at, "custom"), "not supported");
                return None;
            }
            None => {
                errs.add(
                    at,
                    "one of exact, prefix, suffix, contains or safe_regex is required",
                );
                return None;
            }
        };
        Some(StringMatcher {
            pattern,
            ignore_case: *ignore_case,
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        let value: Cow<'_, str> = if self.ignore_case && !matches!(self.pattern, Pattern::Regex(_))
        {
            Cow::Owned(value.to_ascii_lowercase())
        } else {
            Cow::Borrowed(value)
        };
        match &self.pattern {
            Pattern::Exact(s) => value == s.as_str(),
            Pattern::Prefix(s) => value.starts_with(s.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            Pattern::Contains(s) => value.contains(s.as_str()),
            Pattern::Regex(r) => r.is_match(&value),
        }
    }
}

#[derive(Debug, Clone)]
enum HeaderMatch {
    /// Empty matches any value, as in Envoy.
    Exact(String),
    Regex(Regex),
    Range {
        start: i64,
        end: i64,
    },
    Present(bool),
    Prefix(String),
    Suffix(String),
    Contains(String),
    String(StringMatcher),
}

/// `envoy.config.route.v3.HeaderMatcher`, with Envoy's rules for absent headers and
/// headers that appear more than once (values joined by `,`).
#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    name: String,
    kind: HeaderMatch,
    invert: bool,
    treat_missing_as_empty: bool,
}

impl HeaderMatcher {
    pub fn convert(m: &HeaderMatcherProto, at: &str, errs: &mut Errors) -> Option<Self> {
        let HeaderMatcherProto {
            name,
            invert_match,
            treat_missing_header_as_empty,
            header_match_specifier,
        } = m;
        if name.is_empty() {
            errs.add(join(at, "name"), "must not be empty");
        }
        let kind = match header_match_specifier {
            None => HeaderMatch::Present(true),
            Some(HeaderMatchSpecifier::ExactMatch(s)) => HeaderMatch::Exact(s.clone()),
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
                HeaderMatch::Regex(full_match_regex(r, &join(at, "safe_regex_match"), errs)?)
            }
            Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderMatch::Range {
                start: r.start,
                end: r.end,
            },
            Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderMatch::Present(*p),
            Some(HeaderMatchSpecifier::PrefixMatch(s)) => HeaderMatch::Prefix(s.clone()),
            Some(HeaderMatchSpecifier::SuffixMatch(s)) => HeaderMatch::Suffix(s.clone()),
            Some(HeaderMatchSpecifier::ContainsMatch(s)) => HeaderMatch::Contains(s.clone()),
            Some(HeaderMatchSpecifier::StringMatch(s)) => {
                HeaderMatch::String(StringMatcher::convert(s, &join(at, "string_match"), errs)?)
            }
        };
        Some(HeaderMatcher {
            name: name.to_ascii_lowercase(),
            kind,
            invert: *invert_match,
            treat_missing_as_empty: *treat_missing_header_as_empty,
        })
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let value = req.header_joined(&self.name);
        let value = match value {
            Some(v) => v,
            None if self.treat_missing_as_empty => Cow::Borrowed(""),
            None => {
                let is_present_true = matches!(self.kind, HeaderMatch::Present(true));
                let is_present_false = matches!(self.kind, HeaderMatch::Present(false));
                return if self.invert {
                    is_present_true
                } else {
                    is_present_false
                };
            }
        };
        let matched = match &self.kind {
            HeaderMatch::Exact(s) => s.is_empty() || value == s.as_str(),
            HeaderMatch::Regex(r) => r.is_match(&value),
            HeaderMatch::Range { start, end } => {
                value.parse::<i64>().is_ok_and(|v| v >= *start && v < *end)
            }
            HeaderMatch::Present(p) => *p,
            HeaderMatch::Prefix(s) => value.starts_with(s.as_str()),
            HeaderMatch::Suffix(s) => value.ends_with(s.as_str()),
            HeaderMatch::Contains(s) => value.contains(s.as_str()),
            HeaderMatch::String(m) => m.matches(&value),
        };
        matched != self.invert
    }
}

/// `envoy.config.route.v3.QueryParameterMatcher`: the first value of the named parameter.
#[derive(Debug, Clone)]
pub struct QueryParameterMatcher {
    name: String,
    /// None: the parameter must be present.
    value: Option<StringMatcher>,
}

impl QueryParameterMatcher {
    pub fn convert(m: &QueryParameterMatcherProto, at: &str, errs: &mut Errors) -> Option<Self> {
        let QueryParameterMatcherProto {
            name,
            query_parameter_match_specifier,
        } = m;
        if name.is_empty() {
            errs.add(join(at, "name"), "must not be empty");
        }
        let value = match query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => {
                Some(StringMatcher::convert(s, &join(at, "string_match"), errs)?)
            }
            Some(QueryParameterMatchSpecifier::PresentMatch(true)) => None,
            Some(QueryParameterMatchSpecifier::PresentMatch(false)) => {
                errs.add(join(at, "present_match"), "must be true when set");
                return None;
            }
            None => {
                errs.add(at, "one of string_match or present_match is required");
                return None;
            }
        };
        Some(QueryParameterMatcher {
            name: name.clone(),
            value,
        })
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        match req.query_param(&self.name) {
            None => false,
            Some(v) => match &self.value {
                None => true,
                Some(m) => m.matches(&v),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::v3::Int64Range;

    fn view<'a>(path: &'a str, headers: &'a http::HeaderMap) -> RequestView<'a> {
        RequestView::new("GET", path, "example.com", "http", headers)
    }

    fn sm(p: MatchPattern, ignore_case: bool) -> StringMatcher {
        let mut errs = Errors::default();
        let m = StringMatcher::convert(
            &StringMatcherProto {
                ignore_case,
                match_pattern: Some(p),
            },
            "m",
            &mut errs,
        );
        assert!(errs.is_empty());
        m.unwrap()
    }

    fn hm(spec: Option<HeaderMatchSpecifier>, invert: bool, missing_empty: bool) -> HeaderMatcher {
        let mut errs = Errors::default();
        HeaderMatcher::convert(
            &HeaderMatcherProto {
                name: "X-Test".into(),
                invert_match: invert,
                treat_missing_header_as_empty: missing_empty,
                header_match_specifier: spec,
            },
            "h",
            &mut errs,
        )
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn string_matcher_forms() {
        assert!(sm(MatchPattern::Exact("abc".into()), false).matches("abc"));
        assert!(!sm(MatchPattern::Exact("abc".into()), false).matches("ABC"));
        assert!(sm(MatchPattern::Exact("abc".into()), true).matches("ABC"));
        assert!(sm(MatchPattern::Prefix("ab".into()), false).matches("abc"));
        assert!(sm(MatchPattern::Suffix("bc".into()), false).matches("abc"));
        assert!(sm(MatchPattern::Contains("b".into()), false).matches("abc"));
        assert!(!sm(MatchPattern::Contains("B".into()), false).matches("abc"));
        let re = MatchPattern::SafeRegex(RegexMatcher {
            regex: "a.c".into(),
            engine_type: None,
        });
        assert!(sm(re.clone(), false).matches("abc"));
        // Envoy's safe_regex must match the whole value.
        assert!(!sm(re, false).matches("xabcx"));
    }

    #[test]
    fn header_exact_and_invert() {
        let h = headers(&[("x-test", "v1")]);
        let v = view("/", &h);
        assert!(hm(
            Some(HeaderMatchSpecifier::ExactMatch("v1".into())),
            false,
            false
        )
        .matches(&v));
        assert!(!hm(
            Some(HeaderMatchSpecifier::ExactMatch("v1".into())),
            true,
            false
        )
        .matches(&v));
        assert!(!hm(
            Some(HeaderMatchSpecifier::ExactMatch("v2".into())),
            false,
            false
        )
        .matches(&v));
    }

    #[test]
    fn header_missing_follows_envoy() {
        let h = headers(&[]);
        let v = view("/", &h);
        let exact = Some(HeaderMatchSpecifier::ExactMatch("v1".into()));
        assert!(!hm(exact.clone(), false, false).matches(&v));
        // An inverted value match does not match a missing header (only present_match does).
        assert!(!hm(exact.clone(), true, false).matches(&v));
        assert!(hm(
            Some(HeaderMatchSpecifier::PresentMatch(false)),
            false,
            false
        )
        .matches(&v));
        assert!(!hm(Some(HeaderMatchSpecifier::PresentMatch(true)), false, false).matches(&v));
        assert!(hm(Some(HeaderMatchSpecifier::PresentMatch(true)), true, false).matches(&v));
        // treat_missing_header_as_empty: the value is "".
        let empty_prefix = Some(HeaderMatchSpecifier::PrefixMatch("".into()));
        assert!(hm(empty_prefix, false, true).matches(&v));
        assert!(!hm(exact, false, true).matches(&v));
    }

    #[test]
    fn header_range_and_multiple_values() {
        let h = headers(&[("x-test", "5")]);
        let range = Some(HeaderMatchSpecifier::RangeMatch(Int64Range {
            start: 1,
            end: 6,
        }));
        assert!(hm(range.clone(), false, false).matches(&view("/", &h)));
        let h = headers(&[("x-test", "6")]);
        assert!(!hm(range.clone(), false, false).matches(&view("/", &h)));
        let h = headers(&[("x-test", "abc")]);
        assert!(!hm(range, false, false).matches(&view("/", &h)));
        let h = headers(&[("x-test", "a"), ("x-test", "b")]);
        let joined = Some(HeaderMatchSpecifier::ExactMatch("a,b".into()));
        assert!(hm(joined, false, false).matches(&view("/", &h)));
    }

    #[test]
    fn header_matches_pseudo_headers() {
        let h = headers(&[]);
        let mut errs = Errors::default();
        let m = HeaderMatcher::convert(
            &HeaderMatcherProto {
                name: ":method".into(),
                header_match_specifier: Some(HeaderMatchSpecifier::ExactMatch("GET".into())),
                ..Default::default()
            },
            "h",
            &mut errs,
        )
        .unwrap();
        assert!(m.matches(&view("/", &h)));
    }

    #[test]
    fn query_parameter_present_and_value() {
        let h = headers(&[]);
        let mut errs = Errors::default();
        let present = QueryParameterMatcher::convert(
            &QueryParameterMatcherProto {
                name: "debug".into(),
                query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::PresentMatch(
                    true,
                )),
            },
            "q",
            &mut errs,
        )
        .unwrap();
        assert!(present.matches(&view("/a?x=1&debug", &h)));
        assert!(!present.matches(&view("/a?x=1", &h)));
        let value = QueryParameterMatcher::convert(
            &QueryParameterMatcherProto {
                name: "x".into(),
                query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::StringMatch(
                    StringMatcherProto {
                        ignore_case: false,
                        match_pattern: Some(MatchPattern::Exact("1".into())),
                    },
                )),
            },
            "q",
            &mut errs,
        )
        .unwrap();
        assert!(value.matches(&view("/a?x=1&debug", &h)));
        assert!(!value.matches(&view("/a?x=2", &h)));
    }

    #[test]
    fn re2_group_references_translate() {
        assert_eq!(re2_substitution(r"\1-\2"), "${1}-${2}");
        assert_eq!(re2_substitution("a$b"), "a$$b");
    }

    #[test]
    fn literal_prefix_of_regexes() {
        assert_eq!(literal_prefix("/api/[0-9]+"), "/api/");
        assert_eq!(literal_prefix("^/api/v1"), "/api/v1");
        assert_eq!(literal_prefix("/a|/b"), "");
        assert_eq!(literal_prefix("a|/b"), "");
        assert_eq!(literal_prefix("(?i)/api"), "/");
        assert_eq!(literal_prefix(".*"), "");
        assert_eq!(literal_prefix("/x(/y)?"), "/x");
    }
}
