//! The connection manager's path sanitising, as Envoy's `maybeNormalizePath` does it before
//! routing and filters see the request: `path_with_escaped_slashes_action`, then
//! `normalize_path` (RFC 3986 dot segments, with the escaping rules of the URL library Envoy
//! uses), then `merge_slashes`. Routing and the upstream see the result.

/// What the connection manager does to `%2F` and `%5C` in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    #[default]
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// The HCM's path settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathNormalization {
    pub normalize: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

impl PathNormalization {
    pub fn is_off(&self) -> bool {
        *self == PathNormalization::default()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Go on with this path (None: unchanged).
    Continue(Option<String>),
    /// 307 to this path (escaped slashes were unescaped).
    Redirect(String),
    /// 400.
    Reject,
}

/// Applies the settings to a request's `:path` (path and query).
pub fn normalize(path_and_query: &str, cfg: &PathNormalization) -> PathAction {
    if cfg.is_off() {
        return PathAction::Continue(None);
    }
    let mut path = path_and_query.to_string();
    let mut redirect = false;
    if cfg.escaped_slashes != EscapedSlashes::KeepUnchanged {
        if let Some(unescaped) = unescape_slashes(&path) {
            match cfg.escaped_slashes {
                EscapedSlashes::RejectRequest => return PathAction::Reject,
                EscapedSlashes::UnescapeAndRedirect => redirect = true,
                _ => {}
            }
            path = unescaped;
        }
    }
    if cfg.normalize {
        let (p, query) = split_query(&path);
        match canonical_path(p) {
            Some(c) => path = c + query,
            None => return PathAction::Reject,
        }
    }
    if cfg.merge_slashes {
        path = merge_slashes(&path);
    }
    if redirect {
        PathAction::Redirect(path)
    } else if path == path_and_query {
        PathAction::Continue(None)
    } else {
        PathAction::Continue(Some(path))
    }
}

fn split_query(p: &str) -> (&str, &str) {
    match p.find('?') {
        Some(i) => p.split_at(i),
        None => (p, ""),
    }
}

/// `%2F`/`%2f` to `/` and `%5C`/`%5c` to `\` in the path (not the query); None when
/// there were none.
fn unescape_slashes(path_and_query: &str) -> Option<String> {
    let (path, query) = split_query(path_and_query);
    let b = path.as_bytes();
    let mut out = String::with_capacity(path_and_query.len());
    let mut found = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let pair = [b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()];
            let replacement = match &pair {
                b"2F" => Some('/'),
                b"5C" => Some('\\'),
                _ => None,
            };
            if let Some(c) = replacement {
                out.push(c);
                found = true;
                i += 3;
                continue;
            }
        }
        // Paths reaching here passed the request judge: ASCII only.
        out.push(b[i] as char);
        i += 1;
    }
    found.then(|| out + query)
}

/// Envoy's `merge_slashes`: runs of `/` in the path become one; the query is untouched.
fn merge_slashes(path_and_query: &str) -> String {
    let (path, query) = split_query(path_and_query);
    if !path.contains("//") {
        return path_and_query.to_string();
    }
    let mut out = String::with_capacity(path_and_query.len());
    if path.starts_with('/') {
        out.push('/');
    }
    let mut first = true;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if !first {
            out.push('/');
        }
        out.push_str(seg);
        first = false;
    }
    if path.ends_with('/') && !out.ends_with('/') {
        out.push('/');
    }
    out + query
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Copied as it is, escaped or not.
    Pass,
    /// Written escaped.
    Escape,
    /// Written unescaped when it arrives escaped (unreserved characters).
    Unescape,
    /// Refused (NUL).
    Invalid,
}

/// The URL library's class of each byte in a path (Envoy's chromium_url snapshot).
fn class(b: u8) -> Class {
    match b {
        0 => Class::Invalid,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => Class::Unescape,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'/' | b':' | b';'
        | b'=' | b'@' | b'[' | b']' => Class::Pass,
        _ => Class::Escape,
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A `%XX` at `i`: the byte it stands for.
fn escaped_at(b: &[u8], i: usize) -> Option<u8> {
    if b.get(i) != Some(&b'%') {
        return None;
    }
    Some(hex(*b.get(i + 1)?)? << 4 | hex(*b.get(i + 2)?)?)
}

/// Length of a dot at `i`: `.` is 1, `%2E`/`%2e` is 3, else 0.
fn dot_len(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'.') => 1,
        Some(b'%') if escaped_at(b, i) == Some(b'.') => 3,
        _ => 0,
    }
}

fn is_slash(b: Option<&u8>) -> bool {
    matches!(b, Some(b'/') | Some(b'\\'))
}

/// Envoy's `canonicalizePath` (Chromium's `CanonicalizePath`): dot segments resolved (also
/// when written `%2E`), `\` as `/`, unreserved characters unescaped, characters that must
/// be escaped escaped. None for a path the library refuses (a NUL).
fn canonical_path(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len() + 1);
    if b.is_empty() {
        return Some("/".into());
    }
    if !is_slash(b.first()) {
        out.push(b'/');
    }
    let mut ok = true;
    // Where in `out` a '%' that began no valid escape was written.
    let mut last_invalid_percent: Option<usize> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let dot = dot_len(b, i);
        if dot > 0 {
            if out.last() == Some(&b'/') {
                let after = i + dot;
                if after == b.len() {
                    i = after; // "/." at the end: the current directory.
                    continue;
                }
                if is_slash(b.get(after)) {
                    i = after + 1;
                    continue;
                }
                let second = dot_len(b, after);
                if second > 0 {
                    let after2 = after + second;
                    if after2 == b.len() || is_slash(b.get(after2)) {
                        back_up_to_previous_slash(&mut out);
                        i = if after2 == b.len() {
                            after2
                        } else {
                            after2 + 1
                        };
                        continue;
                    }
                }
            }
            out.push(b'.');
            i += dot;
            continue;
        }
        match c {
            b'\\' => out.push(b'/'),
            b'%' => match escaped_at(b, i) {
                Some(v) if class(v) == Class::Unescape => {
                    out.push(v);
                    i += 3;
                    if let Some(p) = last_invalid_percent.filter(|p| p + 3 >= out.len()) {
                        check_nested_escapes(b, i, p, &mut out);
                    }
                    continue;
                }
                Some(v) => {
                    out.extend_from_slice(&b[i..i + 3]);
                    if class(v) == Class::Invalid {
                        ok = false;
                    }
                    i += 3;
                    continue;
                }
                None => {
                    last_invalid_percent = Some(out.len());
                    out.push(b'%');
                }
            },
            _ => match class(c) {
                Class::Pass | Class::Unescape => out.push(c),
                Class::Escape => push_escaped(&mut out, c),
                Class::Invalid => {
                    push_escaped(&mut out, c);
                    ok = false;
                }
            },
        }
        i += 1;
    }
    if !ok {
        return None;
    }
    String::from_utf8(out).ok()
}

/// A '%' that began no escape, followed by what was just unescaped, must not read as an
/// escape now (`%%30%30` would become `%00`): such a '%' is written `%25`.
fn check_nested_escapes(b: &[u8], next: usize, percent: usize, out: &mut Vec<u8>) {
    let length = out.len();
    let last = out[length - 1];
    let append_next = percent + 2 == length;
    if append_next {
        match b.get(next) {
            Some(&c) if c < 0x80 => out.push(c),
            _ => return,
        }
    }
    if escaped_at(out, percent).is_some() {
        if !append_next {
            out.push(out[percent + 1]);
        }
        out[percent + 1] = b'2';
        out[percent + 2] = b'5';
        out.push(last);
    } else if append_next {
        out.truncate(length);
    }
}

fn push_escaped(out: &mut Vec<u8>, c: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
}

/// The output ends with `/`; drop the last segment before it, never above the first `/`.
fn back_up_to_previous_slash(out: &mut Vec<u8>) {
    let mut i = out.len() - 1;
    if i == 0 {
        return;
    }
    i -= 1;
    while out[i] != b'/' && i > 0 {
        i -= 1;
    }
    out.truncate(i + 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> PathNormalization {
        PathNormalization {
            normalize: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::UnescapeAndRedirect,
        }
    }

    #[test]
    fn dot_segments_resolve_as_rfc_3986_says() {
        for (input, want) in [
            ("/a/b/../c", "/a/c"),
            ("/a/./b/.", "/a/b/"),
            ("/../../a", "/a"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/..", "/"),
            ("/a/b/..?x=/../", "/a/?x=/../"),
            ("/a\\b", "/a/b"),
            ("/%41%7e%2d", "/A~-"),
            ("/a%2fb", "/a%2fb"),
            ("/a b", "/a%20b"),
            ("/a..b/.c", "/a..b/.c"),
        ] {
            assert_eq!(canonical_path_and_query(input), want, "{input}");
        }
    }

    fn canonical_path_and_query(p: &str) -> String {
        let cfg = PathNormalization {
            normalize: true,
            ..Default::default()
        };
        match normalize(p, &cfg) {
            PathAction::Continue(Some(p)) => p,
            PathAction::Continue(None) => p.to_string(),
            other => panic!("{p}: {other:?}"),
        }
    }

    #[test]
    fn escaped_slashes_by_action() {
        let mut cfg = all();
        assert_eq!(
            normalize("/a%2F..%5cb?q=%2F", &cfg),
            PathAction::Redirect("/b?q=%2F".into())
        );
        cfg.escaped_slashes = EscapedSlashes::RejectRequest;
        assert_eq!(normalize("/a%2fb", &cfg), PathAction::Reject);
        cfg.escaped_slashes = EscapedSlashes::UnescapeAndForward;
        assert_eq!(
            normalize("/a%2fb", &cfg),
            PathAction::Continue(Some("/a/b".into()))
        );
        assert_eq!(normalize("/a/b", &cfg), PathAction::Continue(None));
    }

    #[test]
    fn slashes_merge_after_normalising() {
        let cfg = PathNormalization {
            merge_slashes: true,
            ..Default::default()
        };
        assert_eq!(
            normalize("//a///b//?x=//", &cfg),
            PathAction::Continue(Some("/a/b/?x=//".into()))
        );
    }

    #[test]
    fn a_nul_is_refused() {
        assert_eq!(normalize("/a%00b", &all()), PathAction::Reject);
    }
}
