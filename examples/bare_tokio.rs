//! What an HTTP/1 proxy engine of our own on Tokio would cost, without Pingora: the
//! experiment behind the design question in issue 6 (can legate reach nginx's CPU per
//! request on Pingora's HTTP/1 path, or would it need another engine under its hooks?).
//!
//! It does the minimum an honest HTTP/1.1 keep-alive proxy does for a request without a
//! body: parse the request (httparse), rebuild its header block for the upstream without
//! hop-by-hop headers, send it over a pooled upstream connection, parse the response,
//! rebuild its header block and send header and body to the client in one write. No
//! routing, no bodies, no chunked encoding, no timeouts: a floor, like
//! `examples/bare_pingora.rs`, run by `benches/load/run.py --bare` next to it.
//!
//! `cargo run --release --example bare_tokio -- 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM`

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// legate's allocator (src/allocator.rs), as in the other floor.
legate::install_allocator!();

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Idle upstream connections of this (single) worker, each with its read buffer.
type Pool = Rc<RefCell<Vec<(TcpStream, BytesMut)>>>;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_tokio LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().map_err(std::io::Error::other)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(&listen).await?;
        let pool: Pool = Rc::default();
        loop {
            let (client, _) = listener.accept().await?;
            let _ = client.set_nodelay(true);
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let _ = serve(client, upstream, pool).await;
            });
        }
    })
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, pool: Pool) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    loop {
        // Read until the request's header block is complete.
        let head_len = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf).map_err(std::io::Error::other)? {
                httparse::Status::Complete(n) => {
                    out.clear();
                    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
                    out.extend_from_slice(b" HTTP/1.1\r\n");
                    forward_headers(req.headers, &mut out);
                    out.extend_from_slice(b"x-forwarded-proto: http\r\n\r\n");
                    break n;
                }
                httparse::Status::Partial => {
                    if client.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
            }
        };
        buf.advance(head_len);

        let reused = pool.borrow_mut().pop();
        let (mut up, mut ubuf) = match reused {
            Some(c) => c,
            None => {
                let s = TcpStream::connect(upstream).await?;
                s.set_nodelay(true)?;
                (s, BytesMut::with_capacity(4096))
            }
        };
        up.write_all(&out).await?;

        // Read the response's header block and its content-length body.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&ubuf).map_err(std::io::Error::other)? {
                httparse::Status::Complete(n) => {
                    out.clear();
                    out.extend_from_slice(b"HTTP/1.1 ");
                    out.extend_from_slice(resp.code.unwrap_or(502).to_string().as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
                    out.extend_from_slice(b"\r\n");
                    forward_headers(resp.headers, &mut out);
                    out.extend_from_slice(b"\r\n");
                    let len = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0usize);
                    break (n, len);
                }
                httparse::Status::Partial => {
                    if up.read_buf(&mut ubuf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        };
        ubuf.advance(head_len);
        while ubuf.len() < body_len {
            if up.read_buf(&mut ubuf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        out.extend_from_slice(&ubuf[..body_len]);
        ubuf.advance(body_len);
        pool.borrow_mut().push((up, ubuf));
        client.write_all(&out).await?;
    }
}

/// Appends the end-to-end headers of a parsed header block, as the proxy sends them on.
fn forward_headers(headers: &[httparse::Header<'_>], out: &mut Vec<u8>) {
    for h in headers {
        if HOP_BY_HOP.iter().any(|n| h.name.eq_ignore_ascii_case(n)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
}
