//! The chunked transfer coding (RFC 9112 §7.1) checked byte by byte, with nothing
//! buffered: each byte is judged once, so a body can stream through while it is checked.
//!
//! ```text
//! chunked-body = *chunk last-chunk trailer-section CRLF
//! chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! chunk-size   = 1*HEXDIG
//! chunk-ext    = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
//! ```
//! Refused as Envoy refuses them: a size with a sign, `0x` or whitespace before it, more
//! than 16 hex digits, a bare CR or LF, data not followed by CRLF, a malformed trailer.

use super::head::{is_field_value_byte, is_tchar, Refusal};

/// Bytes of a chunk-size line or a trailer line beyond which the body is refused.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (`digits` so far).
    Size {
        digits: u8,
    },
    /// After the size: extensions or whitespace up to CR. `quoted`: inside a
    /// quoted-string (`escaped`: after a backslash there).
    Ext {
        quoted: bool,
        escaped: bool,
    },
    /// CR seen at the end of a size line: LF must follow.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    /// Inside a trailer field line (`colon` seen).
    Trailer {
        colon: bool,
    },
    TrailerLf,
    FinalLf,
    Done,
}

/// Where a chunked body is, as its bytes arrive.
#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    /// Data bytes left in the current chunk.
    size: u64,
    /// Length of the current size or trailer line.
    line: usize,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
        }
    }
}

impl ChunkedScanner {
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Judges `input`, the body's next bytes; how many of them belong to the body (all,
    /// unless it ended inside them), or how many were good before the refused one.
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, (usize, Refusal)> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                // Data is taken in one step, not judged byte by byte.
                let n = self.size.min((input.len() - i) as u64) as usize;
                self.size -= n as u64;
                i += n;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            if self.state == State::Done {
                return Ok(i);
            }
            self.byte(input[i]).map_err(|why| (i, why))?;
            i += 1;
        }
        Ok(i)
    }

    fn byte(&mut self, b: u8) -> Result<(), Refusal> {
        let bad = |what| Err(Refusal(what));
        self.line += 1;
        if self.line > MAX_LINE {
            return bad("chunk line too long");
        }
        self.state = match self.state {
            State::Size { digits } => match b {
                _ if b.is_ascii_hexdigit() => {
                    if digits == 16 {
                        return bad("chunk size overflow");
                    }
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    self.size = (self.size << 4) | u64::from(d);
                    State::Size { digits: digits + 1 }
                }
                _ if digits == 0 => return bad("chunk size"),
                b'\r' => State::SizeLf,
                b';' | b' ' | b'\t' => State::Ext {
                    quoted: false,
                    escaped: false,
                },
                _ => return bad("chunk size"),
            },
            State::Ext { quoted, escaped } => match b {
                _ if quoted && escaped => State::Ext {
                    quoted,
                    escaped: false,
                },
                b'\\' if quoted => State::Ext {
                    quoted,
                    escaped: true,
                },
                b'"' => State::Ext {
                    quoted: !quoted,
                    escaped: false,
                },
                _ if quoted && is_field_value_byte(b) => self.state,
                b'\r' if !quoted => State::SizeLf,
                b';' | b'=' | b' ' | b'\t' => self.state,
                _ if is_tchar(b) => self.state,
                _ => return bad("chunk extension"),
            },
            State::SizeLf => match b {
                b'\n' => {
                    self.line = 0;
                    if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    }
                }
                _ => return bad("bare CR in chunk size line"),
            },
            State::Data => State::Data,
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return bad("chunk data longer than its size"),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.line = 0;
                    State::Size { digits: 0 }
                }
                _ => return bad("bare CR after chunk data"),
            },
            State::TrailerStart => match b {
                b'\r' => State::FinalLf,
                _ if is_tchar(b) => State::Trailer { colon: false },
                _ => return bad("trailer field name"),
            },
            State::Trailer { colon: false } => match b {
                b':' => State::Trailer { colon: true },
                _ if is_tchar(b) => self.state,
                _ => return bad("trailer field name"),
            },
            State::Trailer { colon: true } => match b {
                b'\r' => State::TrailerLf,
                _ if is_field_value_byte(b) => self.state,
                _ => return bad("trailer field value"),
            },
            State::TrailerLf => match b {
                b'\n' => {
                    self.line = 0;
                    State::TrailerStart
                }
                _ => return bad("bare CR in trailer"),
            },
            State::FinalLf => match b {
                b'\n' => State::Done,
                _ => return bad("bare CR at the end of the body"),
            },
            State::Done => State::Done,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `body` one byte at a time and whole; both must agree.
    fn check(body: &[u8]) -> Result<usize, Refusal> {
        let mut whole = ChunkedScanner::default();
        let all = whole.scan(body).map_err(|(_, why)| why).and_then(|n| {
            if whole.done() {
                Ok(n)
            } else {
                Err(Refusal("unfinished"))
            }
        });
        let mut bytewise = ChunkedScanner::default();
        let mut n = 0;
        let mut one = Ok(0);
        for b in body {
            if bytewise.done() {
                break;
            }
            match bytewise.scan(std::slice::from_ref(b)) {
                Ok(k) => n += k,
                Err((_, e)) => {
                    one = Err(e);
                    break;
                }
            }
        }
        if one.is_ok() {
            one = if bytewise.done() {
                Ok(n)
            } else {
                Err(Refusal("unfinished"))
            };
        }
        assert_eq!(
            all.is_ok(),
            one.is_ok(),
            "{:?}",
            String::from_utf8_lossy(body)
        );
        all
    }

    #[test]
    fn valid_bodies_end_where_they_end() {
        for body in [
            &b"5\r\nhello\r\n0\r\n\r\n"[..],
            b"5;a=b;c\r\nhello\r\n000\r\n\r\n",
            b"5 ; name=\"v;\\\"x\"\r\nhello\r\n0\r\n\r\n",
            b"A\r\n0123456789\r\n0\r\nx-trailer: 1\r\nx-other:\r\n\r\n",
            b"ffffffffffffffff\r\n",
        ] {
            let r = check(body);
            if body.starts_with(b"ffff") {
                // The largest size is fine; the body is simply unfinished.
                assert_eq!(r, Err(Refusal("unfinished")));
            } else {
                assert_eq!(r, Ok(body.len()), "{:?}", String::from_utf8_lossy(body));
            }
        }
        // The next request's bytes are not the body's.
        let mut s = ChunkedScanner::default();
        assert_eq!(s.scan(b"0\r\n\r\nGET / HTTP/1.1\r\n"), Ok(5));
        assert!(s.done());
    }

    #[test]
    fn malformed_framing_is_refused() {
        for body in [
            &b"-5\r\nhello\r\n0\r\n\r\n"[..],
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"g\r\n",
            b"10000000000000000\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello world\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
            b"5\r\nhello\r\n0\r\nx: a\rb\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\rX",
            b"5;\x01\r\nhello\r\n0\r\n\r\n",
            b"5\rX\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                check(body).is_err(),
                "accepted: {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
