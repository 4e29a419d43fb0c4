//! An upstream that keeps exactly the bytes it received, per connection, and reads the
//! requests in them with its own strict HTTP/1.1 reader (not a library server that
//! re-frames): what a framing test compares.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the upstream read it off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRequest {
    /// The request line.
    pub line: String,
    /// Header fields as received (name lowercased, value trimmed), in order.
    pub fields: Vec<(String, String)>,
    /// The body after removing its framing (content-length or chunked).
    pub body: Vec<u8>,
    /// A chunked body's trailer fields, as received.
    pub trailers: Vec<String>,
}

impl WireRequest {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What one connection brought.
#[derive(Debug, Clone, Default)]
pub struct WireConnection {
    /// Every byte received, in order.
    pub raw: Vec<u8>,
    /// The requests read from them.
    pub requests: Vec<WireRequest>,
    /// The bytes could not be read as HTTP/1.1 (what was wrong); the connection was closed.
    pub malformed: Option<String>,
    /// The connection ended inside a request (a proxy aborting a request it had begun
    /// to forward): that request was never complete, so it is not in `requests`.
    pub aborted: bool,
}

#[derive(Default)]
struct Log {
    connections: Vec<WireConnection>,
    /// Requests answered so far, across connections (the script's index).
    answered: usize,
    /// Every request read, over all connections, in the order they were read.
    all: Vec<WireRequest>,
}

/// A raw HTTP/1.1 upstream on 127.0.0.1. Each request is answered with the status the
/// script gives for its index (0, 1, ...) and a small content-length body.
pub struct WireUpstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

type Script = dyn Fn(usize) -> u16 + Send + Sync;

impl WireUpstream {
    /// Answers 200 to everything.
    pub fn start() -> WireUpstream {
        Self::scripted(|_| 200)
    }

    pub fn scripted(script: impl Fn(usize) -> u16 + Send + Sync + 'static) -> WireUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind wire upstream");
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Log::default()));
        let script: Arc<Script> = Arc::new(script);
        let log2 = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (log, script) = (log2.clone(), script.clone());
                std::thread::spawn(move || serve(conn, &log, &*script));
            }
        });
        WireUpstream { addr, log }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connections(&self) -> Vec<WireConnection> {
        self.log.lock().unwrap().connections.clone()
    }

    /// Every request read, over all connections, in the order they were read.
    pub fn requests(&self) -> Vec<WireRequest> {
        self.log.lock().unwrap().all.clone()
    }

    /// Connections whose bytes were not HTTP/1.1.
    pub fn malformed(&self) -> Vec<String> {
        self.connections()
            .into_iter()
            .filter_map(|c| c.malformed)
            .collect()
    }
}

fn serve(mut conn: TcpStream, log: &Mutex<Log>, script: &Script) {
    let index = {
        let mut log = log.lock().unwrap();
        log.connections.push(WireConnection::default());
        log.connections.len() - 1
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = Reader {
        conn: &mut conn,
        buf: Vec::new(),
        log,
        index,
    };
    loop {
        match reader.request() {
            Ok(Some(req)) => {
                let n = {
                    let mut log = log.lock().unwrap();
                    log.connections[index].requests.push(req.clone());
                    log.all.push(req);
                    log.answered += 1;
                    log.answered - 1
                };
                let status = script(n);
                let body = format!("wire {n}\n");
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if reader.conn.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(what) => {
                let conn = &mut log.lock().unwrap().connections[index];
                if what.starts_with("connection ended") {
                    conn.aborted = true;
                } else {
                    conn.malformed = Some(what);
                }
                return;
            }
        }
    }
}

struct Reader<'a> {
    conn: &'a mut TcpStream,
    buf: Vec<u8>,
    log: &'a Mutex<Log>,
    index: usize,
}

impl Reader<'_> {
    /// Reads more; false at the end of the connection.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.conn.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.log.lock().unwrap().connections[self.index]
                    .raw
                    .extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..at].to_vec();
                self.buf.drain(..at + 2);
                return Ok(line);
            }
            if !self.fill() {
                return Err("connection ended inside a line".into());
            }
        }
    }

    fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.fill() {
                return Err(format!(
                    "connection ended {} bytes into {n}",
                    self.buf.len()
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn request(&mut self) -> Result<Option<WireRequest>, String> {
        if self.buf.is_empty() && !self.fill() {
            return Ok(None);
        }
        let line = String::from_utf8(self.line()?).map_err(|_| "request line not UTF-8")?;
        let mut fields = Vec::new();
        loop {
            let l = self.line()?;
            if l.is_empty() {
                break;
            }
            let l = String::from_utf8(l).map_err(|_| "field not UTF-8")?;
            let (k, v) = l
                .split_once(':')
                .ok_or(format!("field without colon: {l:?}"))?;
            if k.is_empty() || k.bytes().any(|b| b.is_ascii_whitespace()) {
                return Err(format!("bad field name: {k:?}"));
            }
            fields.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        let req = WireRequest {
            line,
            fields,
            body: Vec::new(),
            trailers: Vec::new(),
        };
        let te = req.all("transfer-encoding");
        let cl = req.all("content-length");
        let (body, trailers) = match (te.as_slice(), cl.as_slice()) {
            ([], []) => (Vec::new(), Vec::new()),
            ([], [n]) => {
                let n: usize = n.parse().map_err(|_| format!("content-length {n:?}"))?;
                (self.exact(n)?, Vec::new())
            }
            (["chunked"], []) => self.chunked()?,
            _ => return Err(format!("framing: te {te:?}, cl {cl:?}")),
        };
        Ok(Some(WireRequest {
            body,
            trailers,
            ..req
        }))
    }

    fn chunked(&mut self) -> Result<(Vec<u8>, Vec<String>), String> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .ok_or(format!(
                    "chunk size line {:?}",
                    String::from_utf8_lossy(&line)
                ))?;
            if size == 0 {
                // Trailers, then the empty line.
                let mut trailers = Vec::new();
                loop {
                    let line = self.line()?;
                    if line.is_empty() {
                        return Ok((body, trailers));
                    }
                    trailers.push(String::from_utf8_lossy(&line).into_owned());
                }
            }
            body.extend_from_slice(&self.exact(size)?);
            if self.exact(2)? != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
        }
    }
}
