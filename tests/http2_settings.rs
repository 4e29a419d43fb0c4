//! What a downstream HTTP/2 connection advertises under the connection manager's
//! `http2_protocol_options`, read off the wire (raw frames, not a client library that
//! hides them) from Envoy 1.40 and from legate on the same bootstrap.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// (MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, connection window) as the server
/// advertises them: its SETTINGS, and the WINDOW_UPDATEs on stream 0 it sends before it
/// answers a second PING (both Envoy and legate send the connection's WINDOW_UPDATE just
/// after answering the first; frames go out in order, so it is in before the second).
fn advertised(port: u16) -> (Option<u32>, Option<u32>, u64) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    out.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0]); // PING
    out.extend_from_slice(b"legate!!");
    s.write_all(&out).expect("send preface");
    let (mut streams, mut window) = (None, None);
    let mut pings = 0;
    let mut connection_window = 65_535u64;
    loop {
        let (kind, flags, stream, payload) = read_frame(&mut s);
        match kind {
            4 if flags & 1 == 0 => {
                for p in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([p[0], p[1]]);
                    let v = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                    match id {
                        3 => streams = Some(v),
                        4 => window = Some(v),
                        _ => {}
                    }
                }
            }
            8 if stream == 0 => connection_window += increment(&payload),
            6 if flags & 1 == 1 => {
                pings += 1;
                if pings == 2 {
                    return (streams, window, connection_window);
                }
                let mut ping = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
                ping.extend_from_slice(b"again!!!");
                s.write_all(&ping).expect("send ping");
            }
            _ => {}
        }
    }
}

/// One frame: (type, flags, stream, payload).
fn read_frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).expect("a frame");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("frame payload");
    (head[3], head[4], stream, payload)
}

/// A WINDOW_UPDATE's increment.
fn increment(payload: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff)
}

fn config(port: u16, up: u16, h2: &str) -> String {
    bootstrap(
        &[listener_yaml(
            "main",
            port,
            "virtual_hosts: [{name: all, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: up}}]}]",
            &format!("http2_protocol_options: {h2}\n"),
        )],
        &[cluster_yaml("up", &[up], "")],
    )
}

#[test]
fn settings_are_advertised_as_envoy_advertises_them() {
    let up = Upstream::start("up");
    for h2 in [
        // Envoy Gateway's listener settings.
        "{max_concurrent_streams: 100, initial_stream_window_size: 65536, initial_connection_window_size: 1048576}",
        "{max_concurrent_streams: 7, initial_stream_window_size: 1000000}",
        // Envoy's defaults.
        "{}",
    ] {
        let mut seen = Vec::new();
        for envoy in [true, false] {
            let port = free_port();
            let yaml = config(port, up.port(), h2);
            let _p: Box<dyn std::any::Any> = if envoy {
                Box::new(Envoy::start(&yaml, port))
            } else {
                Box::new(Legate::start(&yaml, port))
            };
            seen.push(advertised(port));
        }
        assert_eq!(seen[0], seen[1], "{h2}: envoy, then legate");
    }
}

#[test]
fn settings_out_of_envoys_bounds_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        config(
            1,
            2,
            "{initial_stream_window_size: 100, hpack_table_size: 10}",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let at = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http2_protocol_options";
    assert!(
        text.contains(&format!(
            "{at}.initial_stream_window_size: must be in [65535, 2147483647]"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{at}.hpack_table_size: not supported")),
        "{text}"
    );
}

/// What an HTTP/2 client opened a connection with: (INITIAL_WINDOW_SIZE it advertised,
/// its connection window after its WINDOW_UPDATEs), read by a raw upstream up to the
/// client's first HEADERS frame. The upstream then closes: the request fails, which does
/// not matter here.
fn client_opening(listener: &std::net::TcpListener) -> (Option<u32>, u64) {
    let (mut s, _) = listener.accept().expect("the proxy connects");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).expect("client preface");
    // The server's own SETTINGS, empty, so the client goes on.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    let mut window = None;
    let mut connection_window = 65_535u64;
    loop {
        let (kind, flags, stream, payload) = read_frame(&mut s);
        match kind {
            4 if flags & 1 == 0 => {
                for p in payload.chunks_exact(6) {
                    if u16::from_be_bytes([p[0], p[1]]) == 4 {
                        window = Some(u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
                    }
                }
                s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).unwrap(); // ACK
            }
            8 if stream == 0 => connection_window += increment(&payload),
            1 => return (window, connection_window),
            _ => {}
        }
    }
}

#[test]
fn upstream_connections_open_with_the_windows_envoy_opens_them_with() {
    for h2 in [
        // Envoy Gateway's cluster settings.
        "{initial_stream_window_size: 65536, initial_connection_window_size: 1048576}",
        // Envoy's defaults.
        "{}",
    ] {
        let mut seen = Vec::new();
        for envoy in [true, false] {
            let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let up = upstream.local_addr().unwrap().port();
            let port = free_port();
            let cluster_extra = format!(
                "typed_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n    explicit_http_config: {{http2_protocol_options: {h2}}}\n"
            );
            let yaml = bootstrap(
                &[listener_yaml(
                    "main",
                    port,
                    "virtual_hosts: [{name: all, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: up}}]}]",
                    "",
                )],
                &[cluster_yaml("up", &[up], &cluster_extra)],
            );
            let _p: Box<dyn std::any::Any> = if envoy {
                Box::new(Envoy::start(&yaml, port))
            } else {
                Box::new(Legate::start(&yaml, port))
            };
            let client = std::thread::spawn(move || get(port, "/", "w").status);
            seen.push(client_opening(&upstream));
            drop(upstream);
            let _ = client.join();
        }
        assert_eq!(seen[0], seen[1], "{h2}: envoy, then legate");
    }
}
