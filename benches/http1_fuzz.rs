//! Differential fuzzing of legate's HTTP/1 judge (`src/http1`), for a bounded time:
//!
//! ```text
//! cargo bench --bench http1_fuzz -- 300     # seconds (default 60); exits 1 on a finding
//! ```
//!
//! Inputs are valid requests (from RFC 9112's examples and the smuggling suite's shapes)
//! mutated at random: bytes replaced by the ones framing hinges on (CR, LF, SP, HTAB, `:`,
//! `,`, `;`, hex digits, NUL, DEL, non-ASCII), framing fields and line ends inserted,
//! ranges deleted, lines doubled. Each input is checked four ways; a finding prints the
//! input and what went wrong.
//! 1. Nothing panics.
//! 2. `RequestStream` judges the same bytes good, and refuses at the same place, whatever
//!    sizes the reads come in (1, 2, 3, 7, 64 bytes, or whole).
//! 3. A head it lets through is one httparse (Pingora's parser) reads completely, to the
//!    same length, method, target and fields, with the same body framing.
//!    An absolute-form head's origin-form rewrite is judged good, with the same framing.
//! 4. A chunked body `ChunkedScanner` accepts is one a reference decoder written here from
//!    RFC 9112 §7.1 accepts too, ending at the same byte.

use std::time::{Duration, Instant};

use legate::http1::{check_request_head, origin_form, BodyFraming, ChunkedScanner, RequestStream};
use rand::{Rng, SeedableRng};

const SEEDS: &[&[u8]] = &[
    b"GET /hello.txt HTTP/1.1\r\nUser-Agent: curl/7.64.1\r\nHost: www.example.com\r\nAccept-Language: en, mi\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://www.example.org/pub/WWW/TheProject.html HTTP/1.1\r\nHost: www.example.org\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST https://b.example:8443?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
];

const BYTES: &[u8] = b" \t\r\n:,;0159afxAF\"#/\\=-+\x00\x0b\x7f\x80\xff";
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"Host: x\r\n",
    b"chunked",
    b"0\r\n\r\n",
    b";a=\"b\"",
    b"\r\n\r\n",
];

fn mutate(rng: &mut impl Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=v.len());
        match rng.random_range(0..5) {
            0 if at < v.len() => v[at] = BYTES[rng.random_range(0..BYTES.len())],
            1 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            2 if at < v.len() => {
                let end = (at + rng.random_range(1..8)).min(v.len());
                v.drain(at..end);
            }
            3 => {
                // Double the line around `at`.
                let start = v[..at]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                let end = v[at..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(v.len(), |i| at + i + 1);
                let line = v[start..end].to_vec();
                v.splice(end..end, line);
            }
            _ if at < v.len() => v[at] = rng.random(),
            _ => {}
        }
    }
    v
}

/// The good bytes and where the refusal came, reading `wire` in pieces of `step`.
fn judge(wire: &[u8], step: usize) -> (usize, bool) {
    let mut s = RequestStream::default();
    let (mut held, mut good) = (Vec::new(), 0);
    for piece in wire.chunks(step.max(1)) {
        held.extend_from_slice(piece);
        loop {
            let r = s.scan(&held);
            good += r.good;
            held.drain(..r.good);
            if r.refused.is_some() {
                return (good, true);
            }
            // A rewritten head counts as the bytes it replaces.
            let Some(rewrite) = r.rewrite else { break };
            good += rewrite.len;
            held.drain(..rewrite.len);
        }
    }
    (good, false)
}

/// Check 3: a good head reads the same through httparse.
fn same_as_httparse(head: &[u8]) -> Result<(), String> {
    let Ok(ours) = check_request_head(head) else {
        return Ok(());
    };
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        other => return Err(format!("good head, httparse says {other:?}")),
    };
    if len != head.len() {
        return Err(format!(
            "head length {} here, {len} by httparse",
            head.len()
        ));
    }
    // The request line's second word, as bytes (field values may be obs-text).
    let lead = head.chunks(2).take_while(|p| *p == b"\r\n").count() * 2;
    let target = head[lead..].split(|b| *b == b' ').nth(1);
    if req.path.map(str::as_bytes) != target {
        return Err(format!("target {target:?}, httparse {:?}", req.path));
    }
    let field = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_ascii())
            .collect::<Vec<_>>()
    };
    let theirs = match (
        field("transfer-encoding").as_slice(),
        field("content-length").as_slice(),
    ) {
        ([te], []) if te.eq_ignore_ascii_case(b"chunked") => BodyFraming::Chunked,
        ([], [cl]) => match std::str::from_utf8(cl)
            .ok()
            .and_then(|c| c.parse::<u64>().ok())
        {
            Some(0) => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
            None => return Err("good content-length httparse's reader cannot parse".into()),
        },
        ([], []) => BodyFraming::None,
        _ => return Err("good head with ambiguous framing".into()),
    };
    if theirs != ours.body {
        return Err(format!(
            "framing {:?} here, {theirs:?} from httparse's fields",
            ours.body
        ));
    }
    if ours.absolute {
        let rewritten = origin_form(head).ok_or("absolute-form head not rewritten")?;
        match check_request_head(&rewritten) {
            Ok(f) if !f.absolute && f.body == ours.body && f.tunnel == ours.tunnel => {}
            other => return Err(format!("rewritten head judged {other:?}")),
        }
    }
    Ok(())
}

/// RFC 9112 §7.1, written plainly: the length of the chunked body at the front of `b`.
fn reference_chunked(b: &[u8]) -> Option<usize> {
    let line = |at: usize| -> Option<(&[u8], usize)> {
        let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let l = &b[at..end];
        (!l.contains(&b'\r') && !l.contains(&b'\n')).then_some((l, end + 2))
    };
    let mut at = 0;
    loop {
        let (l, next) = line(at)?;
        let digits = l.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return None;
        }
        let ext = &l[digits..];
        if !ext.is_empty() && !matches!(ext[0], b';' | b' ' | b'\t') {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&l[..digits]).ok()?, 16).ok()?;
        at = next;
        if size == 0 {
            loop {
                let (l, next) = line(at)?;
                at = next;
                if l.is_empty() {
                    return Some(at);
                }
                let colon = l.iter().position(|c| *c == b':')?;
                if colon == 0 || l[0] == b' ' || l[0] == b'\t' {
                    return None;
                }
            }
        }
        let end = at.checked_add(usize::try_from(size).ok()?)?;
        if b.len() < end + 2 || &b[end..end + 2] != b"\r\n" {
            return None;
        }
        at = end + 2;
    }
}

fn check(input: &[u8]) -> Result<(), String> {
    // 2.
    let whole = judge(input, input.len());
    for step in [1, 2, 3, 7, 64] {
        let split = judge(input, step);
        if split != whole {
            return Err(format!("reads of {step}: {split:?}, whole: {whole:?}"));
        }
    }
    // 3: the first head, if complete.
    if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
        same_as_httparse(&input[..end + 4])?;
        // 4: the body after it, where the head declares chunked.
        if let Ok(f) = check_request_head(&input[..end + 4]) {
            if f.body == BodyFraming::Chunked {
                let body = &input[end + 4..];
                let mut s = ChunkedScanner::default();
                if let Ok(n) = s.scan(body) {
                    if s.done() && reference_chunked(body) != Some(n) {
                        return Err(format!(
                            "chunked body accepted to {n}, reference: {:?}",
                            reference_chunked(body)
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(60);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut runs, mut findings, mut refused) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..1000 {
            let base = SEEDS[rng.random_range(0..SEEDS.len())];
            let input = mutate(&mut rng, base);
            runs += 1;
            refused += u64::from(judge(&input, input.len()).1);
            let outcome = std::panic::catch_unwind(|| check(&input))
                .unwrap_or_else(|_| Err("panicked".into()));
            if let Err(why) = outcome {
                findings += 1;
                if findings <= 20 {
                    println!(
                        "finding: {why}\n  input: {:?}",
                        input.escape_ascii().to_string()
                    );
                }
            }
        }
    }
    println!(
        "http1_fuzz: seed {seed}, {runs} executions in {seconds} s, {refused} refused, {findings} findings"
    );
    if findings > 0 {
        std::process::exit(1);
    }
}
