//! A connection's request bytes, judged as they arrive, before any HTTP/1 reader sees
//! them: each head whole (held back until it is complete and well-formed), then its body
//! by the framing the head declared, then the next head. Whatever reads the bytes after
//! this (Pingora's lenient reader) only ever sees requests Envoy would accept.

use super::chunked::ChunkedScanner;
use super::head::{check_request_head, BodyFraming, Refusal};

/// Heads larger than this are refused (Pingora's own limit; the connection manager's
/// `max_request_headers_kb` is checked later, on the parsed head, with Envoy's 431).
const MAX_HEAD: usize = 1024 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone)]
enum State {
    /// Waiting for a complete head; `searched` bytes of it hold no end yet.
    Head {
        searched: usize,
    },
    Length(u64),
    Chunked(ChunkedScanner),
    /// No longer HTTP/1 requests (HTTP/2 with prior knowledge, an upgrade, CONNECT):
    /// passed through.
    Tunnel,
}

/// What `RequestStream::scan` made of the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// This many bytes at the front are judged good and may be read.
    pub good: usize,
    /// The bytes after those are refused.
    pub refused: Option<Refused>,
    /// The head after the good bytes is good but is to be read rewritten; the bytes
    /// after it are not judged yet (scan them next).
    pub rewrite: Option<Rewrite>,
}

/// A good head to be read as other bytes: an absolute-form target in origin-form, with
/// its authority as `Host` (`http1::origin_form`), so that a reader never has to choose
/// between the target's authority and `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The head's length as it came.
    pub len: usize,
    /// What is read in its place.
    pub head: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub why: Refusal,
    /// Inside a body whose head was already let through (the reader must fail that
    /// request), rather than at a head.
    pub in_body: bool,
}

#[derive(Debug, Clone)]
pub struct RequestStream {
    state: State,
    /// At the connection's first byte (where an HTTP/2 preface may come).
    first: bool,
    /// The current request turns the connection into a tunnel after its body.
    tunnel_after: bool,
    /// The head just judged, rewritten.
    rewritten: Option<Vec<u8>>,
}

impl Default for RequestStream {
    fn default() -> Self {
        RequestStream {
            state: State::Head { searched: 0 },
            first: true,
            tunnel_after: false,
            rewritten: None,
        }
    }
}

impl RequestStream {
    /// Judges `input`: every byte of the connection not yet judged good, oldest first
    /// (bytes held back last time come again, followed by new ones).
    pub fn scan(&mut self, input: &[u8]) -> Scanned {
        let mut good = 0;
        loop {
            let rest = &input[good..];
            if rest.is_empty() {
                return Scanned {
                    good,
                    refused: None,
                    rewrite: None,
                };
            }
            let step = match &mut self.state {
                State::Tunnel => Ok(rest.len()),
                State::Length(left) => {
                    let n = (*left).min(rest.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        self.body_done();
                    }
                    Ok(n as usize)
                }
                State::Chunked(body) => match body.scan(rest) {
                    Ok(n) => {
                        if body.done() {
                            self.body_done();
                        }
                        Ok(n)
                    }
                    Err((n, why)) => {
                        return Scanned {
                            good: good + n,
                            refused: Some(Refused { why, in_body: true }),
                            rewrite: None,
                        }
                    }
                },
                State::Head { .. } => self.head(rest),
            };
            match step {
                Ok(0) => {
                    return Scanned {
                        good,
                        refused: None,
                        rewrite: None,
                    }
                }
                Ok(len) => {
                    if let Some(head) = self.rewritten.take() {
                        return Scanned {
                            good,
                            refused: None,
                            rewrite: Some(Rewrite { len, head }),
                        };
                    }
                    good += len
                }
                Err(refused) => {
                    return Scanned {
                        good,
                        refused: Some(refused),
                        rewrite: None,
                    }
                }
            }
        }
    }

    /// A head at the front of `rest`: its length once complete and good (0 while
    /// incomplete).
    fn head(&mut self, rest: &[u8]) -> Result<usize, Refused> {
        let refuse = |why| Refused {
            why,
            in_body: false,
        };
        if std::mem::take(&mut self.first)
            && H2_PREFACE.starts_with(&rest[..rest.len().min(H2_PREFACE.len())])
        {
            if rest.len() < H2_PREFACE.len() {
                // Could still be the preface: wait for more.
                self.first = true;
                return Ok(0);
            }
            self.state = State::Tunnel;
            return Ok(rest.len());
        }
        let State::Head { searched } = &mut self.state else {
            return Ok(0);
        };
        // Empty lines may come before a request line (RFC 9112 §2.2): not a head's end.
        let lead = rest.chunks(2).take_while(|p| *p == b"\r\n").count() * 2;
        let from = searched.saturating_sub(3).max(lead);
        let end = rest[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|at| from + at + 4);
        // A bare CR or LF is refused as soon as it arrives: a reader that ends lines at LF
        // alone must never see such a head complete.
        let head = &rest[..end.unwrap_or(rest.len())];
        let bare = head[searched.saturating_sub(1)..]
            .windows(2)
            .any(|w| (w[0] == b'\r' && w[1] != b'\n') || (w[1] == b'\n' && w[0] != b'\r'))
            || head[0] == b'\n';
        if bare {
            return Err(refuse(Refusal("bare CR or LF")));
        }
        let Some(len) = end else {
            if rest.len() > MAX_HEAD {
                return Err(refuse(Refusal("request head too large")));
            }
            *searched = rest.len();
            return Ok(0);
        };
        let framing = check_request_head(&rest[..len]).map_err(refuse)?;
        self.tunnel_after = framing.tunnel;
        if framing.absolute {
            self.rewritten = super::head::origin_form(&rest[..len]);
        }
        self.state = match framing.body {
            BodyFraming::None => State::Head { searched: 0 },
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::Chunked(ChunkedScanner::default()),
        };
        if framing.body == BodyFraming::None {
            self.body_done();
        }
        Ok(len)
    }

    fn body_done(&mut self) {
        self.state = if std::mem::take(&mut self.tunnel_after) {
            State::Tunnel
        } else {
            State::Head { searched: 0 }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of `step` bytes as a reader would (held-back bytes again,
    /// then new ones); the bytes judged good, and the refusal if any.
    fn feed(wire: &[u8], step: usize) -> (Vec<u8>, Option<Refused>) {
        let mut s = RequestStream::default();
        let (mut pending, mut good) = (Vec::new(), Vec::new());
        for piece in wire.chunks(step) {
            pending.extend_from_slice(piece);
            loop {
                let r = s.scan(&pending);
                good.extend(pending.drain(..r.good));
                if r.refused.is_some() {
                    return (good, r.refused);
                }
                let Some(rewrite) = r.rewrite else { break };
                pending.drain(..rewrite.len);
                good.extend(rewrite.head);
            }
        }
        (good, None)
    }

    fn every_step(wire: &[u8]) -> (Vec<u8>, Option<Refused>) {
        let whole = feed(wire, wire.len());
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(feed(wire, step), whole, "step {step}");
        }
        whole
    }

    #[test]
    fn pipelined_requests_pass_whole() {
        // Bodies are bytes: a bare CR or LF in one is not the head's business.
        let wire = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n\n\r\n\
GET /b HTTP/1.1\r\nHost: a\r\n\r\n\
POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n";
        assert_eq!(every_step(wire), (wire.to_vec(), None));
        // A head is held back until it is complete.
        let partial = b"GET / HTTP/1.1\r\nHost: a\r\n";
        assert_eq!(feed(partial, partial.len()), (Vec::new(), None));
        // ...but a bare LF in it is refused at once.
        let (good, refused) = every_step(b"GET / HTTP/1.1\nHost: a\n");
        assert!(good.is_empty() && refused.is_some());
    }

    #[test]
    fn absolute_form_heads_are_read_in_origin_form() {
        let wire = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\
POST http://b.example/p HTTP/1.1\r\nHost: other\r\nContent-Length: 2\r\n\r\nhi\
GET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        let read = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\
POST /p HTTP/1.1\r\nHost: b.example\r\nContent-Length: 2\r\n\r\nhi\
GET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(every_step(wire), (read.to_vec(), None));
    }

    #[test]
    fn a_bad_second_request_stops_after_the_first() {
        let first = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let mut wire = first.clone();
        wire.extend_from_slice(b"GET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx");
        let (good, refused) = every_step(&wire);
        assert_eq!(good, first);
        assert!(refused.is_some_and(|r| !r.in_body));
    }

    #[test]
    fn a_bad_chunk_fails_the_request_inside_its_body() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        let mut wire = head.to_vec();
        wire.extend_from_slice(b"lo\r\n-1\r\n");
        let (good, refused) = every_step(&wire);
        assert!(good.starts_with(head));
        assert!(refused.is_some_and(|r| r.in_body));
    }

    #[test]
    fn http2_prior_knowledge_and_upgrades_pass_through() {
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00 anything");
        assert_eq!(every_step(&h2), (h2.clone(), None));
        let ws = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
        assert_eq!(every_step(ws), (ws.to_vec(), None));
        // A request that only starts like the preface is judged as HTTP/1.
        let (good, refused) = every_step(b"PRI / HTTP/1.1\r\n\r\n");
        assert!(good.is_empty() && refused.is_some());
    }
}
