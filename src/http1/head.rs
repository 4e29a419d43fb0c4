//! Is a request head well-formed HTTP/1.1, and how is its body framed? RFC 9112 §2.2
//! (message parsing), §3 (request line and target), §5 (field syntax), §6 (framing) and
//! RFC 9110 §7.2 (Host), judged as strictly as Envoy's codec judges them.

/// How the bytes after a head are delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body: the next request's head follows.
    None,
    Length(u64),
    Chunked,
}

/// What a head asks of the rest of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub body: BodyFraming,
    /// CONNECT or an upgrade: after the body the connection may stop being HTTP/1.
    pub tunnel: bool,
    /// An absolute-form target (`GET http://host/path`): see `origin_form`.
    pub absolute: bool,
}

/// Why a head (or a body's framing) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub &'static str);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The methods Envoy's HTTP/1 codec knows (http-parser's list, which its Balsa parser
/// keeps); any other, even a well-formed token, is refused with 400 as Envoy refuses it.
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"COPY",
    b"LOCK",
    b"MKCOL",
    b"MOVE",
    b"PROPFIND",
    b"PROPPATCH",
    b"SEARCH",
    b"UNLOCK",
    b"BIND",
    b"REBIND",
    b"UNBIND",
    b"ACL",
    b"REPORT",
    b"MKACTIVITY",
    b"CHECKOUT",
    b"MERGE",
    b"M-SEARCH",
    b"NOTIFY",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"PURGE",
    b"MKCALENDAR",
    b"LINK",
    b"UNLINK",
    b"SOURCE",
];

/// Byte classes, one table lookup per byte on the request path.
const TCHAR: u8 = 1;
const VALUE: u8 = 2;
const TARGET: u8 = 4;
const HOST: u8 = 8;

static CLASSES: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    const fn among(b: u8, set: &[u8]) -> bool {
        let mut i = 0;
        while i < set.len() {
            if set[i] == b {
                return true;
            }
            i += 1;
        }
        false
    }
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut class = 0;
        // RFC 9110 §5.6.2 `tchar`.
        if b.is_ascii_alphanumeric() || among(b, b"!#$%&'*+-.^_`|~") {
            class |= TCHAR;
        }
        // A field value's bytes (RFC 9110 §5.5): visible ASCII, obs-text, SP and HTAB;
        // no other control byte (NUL, CR, LF, DEL).
        if b == b'\t' || (b >= b' ' && b <= b'~') || b >= 0x80 {
            class |= VALUE;
        }
        // The request-target's bytes: visible ASCII only. Envoy refuses a space, a control
        // byte, DEL and non-ASCII bytes (where Pingora's reader percent-escapes or drops
        // them), and a `#` fragment, which a client never sends.
        if b >= b'!' && b <= b'~' && b != b'#' {
            class |= TARGET;
        }
        // Host's bytes (RFC 3986 reg-name or IP-literal, and a port): no whitespace, no
        // userinfo.
        if b.is_ascii_alphanumeric() || among(b, b"-._~!$&'()*+,;=:[]%") {
            class |= HOST;
        }
        table[i] = class;
        i += 1;
    }
    table
}

fn all_in(bytes: &[u8], class: u8) -> bool {
    bytes.iter().all(|b| CLASSES[*b as usize] & class != 0)
}

pub(crate) fn is_tchar(b: u8) -> bool {
    CLASSES[b as usize] & TCHAR != 0
}

pub(crate) fn is_field_value_byte(b: u8) -> bool {
    CLASSES[b as usize] & VALUE != 0
}

/// A complete head: the request line, the field lines, and the empty line, every line
/// ending in CRLF (one or more empty lines may come first, RFC 9112 §2.2). The framing
/// of what follows, or why the head is refused.
pub fn check_request_head(head: &[u8]) -> Result<Framing, Refusal> {
    let mut lines = Lines(head);
    let mut line = lines.next()?.ok_or(Refusal("incomplete head"))?;
    while line.is_empty() {
        line = lines.next()?.ok_or(Refusal("incomplete head"))?;
    }
    let (method, target, version) = request_line(line)?;
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Err(Refusal("HTTP version")),
    };
    let absolute = check_target(method, target)?;

    let mut hosts = 0;
    let mut lengths = 0;
    let mut length = None;
    let mut te = 0;
    let mut chunked = false;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    loop {
        let line = lines.next()?.ok_or(Refusal("incomplete head"))?;
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(Refusal("obsolete line folding"));
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(Refusal("field line without a colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !all_in(name, TCHAR) {
            return Err(Refusal("field name"));
        }
        if !all_in(value, VALUE) {
            return Err(Refusal("field value"));
        }
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            // Empty is allowed: the target may have no authority (RFC 9110 §7.2).
            if !all_in(value, HOST) {
                return Err(Refusal("host"));
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = Some(decimal(value)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection_upgrade |= value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        }
    }
    if lines.0.iter().any(|_| true) {
        return Err(Refusal("bytes after the head"));
    }
    // RFC 9110 §7.2: exactly one Host in an HTTP/1.1 request.
    if hosts > 1 || (hosts == 0 && !http10) {
        return Err(Refusal("host count"));
    }
    let body = match (te, lengths) {
        (0, 0) => BodyFraming::None,
        (0, 1) => match length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        },
        // Repeated lengths, even equal ones, are refused as Envoy refuses them.
        (0, _) => return Err(Refusal("content-length repeated")),
        // RFC 9112 §6.1: both is a smuggling attempt; TE in HTTP/1.0 is faulty framing;
        // anything but a lone `chunked` is a coding Envoy does not implement.
        (_, 1..) => return Err(Refusal("transfer-encoding with content-length")),
        _ if http10 => return Err(Refusal("transfer-encoding in HTTP/1.0")),
        (1, 0) if chunked => BodyFraming::Chunked,
        _ => return Err(Refusal("transfer-encoding other than chunked")),
    };
    Ok(Framing {
        body,
        tunnel: method == b"CONNECT" || (upgrade && connection_upgrade),
        absolute,
    })
}

/// RFC 9112 §3.2.2: an absolute-form target names the request's authority, which wins
/// over `Host`. A head that `check_request_head` let through, with such a target, as
/// Envoy forwards it: the target in origin-form (`/` when it has no path) and `Host` set
/// to the target's authority (added where an HTTP/1.0 head has none); the other lines as
/// they came. None for any other target.
pub fn origin_form(head: &[u8]) -> Option<Vec<u8>> {
    let lead = head.chunks(2).take_while(|p| *p == b"\r\n").count() * 2;
    let head = &head[lead..];
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let (method, target, version) = request_line(&head[..line_end]).ok()?;
    let (authority, path) = split_absolute(target)?;
    let mut out = Vec::with_capacity(head.len() + authority.len());
    // No path, or only a query: the path is `/`.
    let slash: &[u8] = if path.starts_with(b"/") { b"" } else { b"/" };
    for part in [method, b" ", slash, path, b" ", version, b"\r\n"] {
        out.extend_from_slice(part);
    }
    let mut host = false;
    // The head was judged good: every line ends in CRLF, so splitting at LF is exact.
    for line in head[line_end + 2..].split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:") {
            out.extend_from_slice(&line[..5]);
            out.push(b' ');
            out.extend_from_slice(authority);
            host = true;
        } else {
            out.extend_from_slice(line);
        }
        out.extend_from_slice(b"\r\n");
    }
    if !host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// An absolute-form target's authority and its path-and-query (`?q` becomes `/?q`).
fn split_absolute(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let lower = |n: usize| target.get(..n).map(<[u8]>::to_ascii_lowercase);
    let rest = if lower(7)? == b"http://" {
        &target[7..]
    } else if lower(8)? == b"https://" {
        &target[8..]
    } else {
        return None;
    };
    let end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    Some((&rest[..end], &rest[end..]))
}

/// A request line's method, target and version.
type RequestLine<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// `method SP request-target SP HTTP-version`, single spaces.
fn request_line(line: &[u8]) -> Result<RequestLine<'_>, Refusal> {
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal("request line"));
    };
    if !METHODS.contains(&method) {
        return Err(Refusal("method"));
    }
    Ok((method, target, version))
}

/// RFC 9112 §3.2: origin-form, absolute-form, authority-form for CONNECT, `*` for OPTIONS.
/// True for absolute-form.
fn check_target(method: &[u8], target: &[u8]) -> Result<bool, Refusal> {
    if target.is_empty() || !all_in(target, TARGET) {
        return Err(Refusal("request target"));
    }
    let ok = match target {
        _ if method == b"CONNECT" => !target.contains(&b'/'),
        b"*" => method == b"OPTIONS",
        [b'/', ..] => true,
        _ => {
            // Absolute-form: an authority that is a host (no userinfo), as for `Host`.
            let (authority, _) = split_absolute(target).ok_or(Refusal("request target form"))?;
            if authority.is_empty() || !all_in(authority, HOST) {
                return Err(Refusal("request target authority"));
            }
            return Ok(true);
        }
    };
    if ok {
        Ok(false)
    } else {
        Err(Refusal("request target form"))
    }
}

/// `1*DIGIT` that fits in 64 bits.
fn decimal(v: &[u8]) -> Result<u64, Refusal> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(Refusal("content-length"));
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(Refusal("content-length overflow"))
    })
}

/// CRLF-terminated lines; a bare LF is refused (RFC 9112 §2.2 lets a recipient accept
/// one; Envoy does not). A bare CR stays inside its line, where every line's byte classes
/// refuse it.
struct Lines<'a>(&'a [u8]);

impl<'a> Lines<'a> {
    fn next(&mut self) -> Result<Option<&'a [u8]>, Refusal> {
        let Some(at) = self.0.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let Some(line) = self.0[..at].strip_suffix(b"\r") else {
            return Err(Refusal("bare LF"));
        };
        self.0 = &self.0[at + 1..];
        Ok(Some(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &str) -> Result<BodyFraming, Refusal> {
        check_request_head(head.as_bytes()).map(|f| f.body)
    }

    #[test]
    fn valid_heads_and_their_framing() {
        let ok = [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", BodyFraming::None),
            (
                "\r\nGET /a?b=c HTTP/1.1\r\nHost: a:80\r\nX: y z\t\r\n\r\n",
                BodyFraming::None,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n",
                BodyFraming::Length(12),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                BodyFraming::None,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
                BodyFraming::Chunked,
            ),
            (
                "GET http://a/b HTTP/1.1\r\nHost: a\r\n\r\n",
                BodyFraming::None,
            ),
            ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", BodyFraming::None),
            ("GET / HTTP/1.0\r\n\r\n", BodyFraming::None),
            (
                "GET /caf%C3%A9 HTTP/1.1\r\nHost: [::1]:8080\r\nV: caf\u{e9}\r\n\r\n",
                BodyFraming::None,
            ),
        ];
        for (head, want) in ok {
            assert_eq!(framing(head), Ok(want), "{head:?}");
        }
        let connect = check_request_head(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
        assert!(connect.is_ok_and(|f| f.tunnel));
        let ws = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(check_request_head(ws).is_ok_and(|f| f.tunnel));
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_authority_as_host() {
        for (head, want) in [
            (
                "GET http://a.example:8080/x?y HTTP/1.1\r\nX: 1\r\nHOST: other\r\nZ: 2\r\n\r\n",
                "GET /x?y HTTP/1.1\r\nX: 1\r\nHOST: a.example:8080\r\nZ: 2\r\n\r\n",
            ),
            (
                "\r\nGET HTTPS://a?q HTTP/1.1\r\nHost: a\r\n\r\n",
                "GET /?q HTTP/1.1\r\nHost: a\r\n\r\n",
            ),
            (
                "GET http://a HTTP/1.0\r\n\r\n",
                "GET / HTTP/1.0\r\nhost: a\r\n\r\n",
            ),
        ] {
            assert!(check_request_head(head.as_bytes()).is_ok_and(|f| f.absolute));
            let got = origin_form(head.as_bytes()).map(|h| String::from_utf8(h).unwrap());
            assert_eq!(got.as_deref(), Some(want));
            assert!(check_request_head(want.as_bytes()).is_ok_and(|f| !f.absolute));
        }
        assert_eq!(origin_form(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        for bad in [
            "GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(check_request_head(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let refused = [
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "get / HTTP/1.1\r\nHost: a\r\n\r\n",
            "FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nNo colon\r\n\r\n",
            "GET a HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for head in refused {
            assert!(framing(head).is_err(), "accepted: {head:?}");
        }
    }
}
