//! Upgrades (`upgrade_configs`): a WebSocket handshake is passed to the upstream, the
//! connection becomes a two-way tunnel after 101 and survives a config reload; an upgrade
//! the connection manager does not allow is refused with 403, as Envoy does.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;

/// Answers an upgrade with 101 and then echoes bytes, uppercased, until the client closes.
fn upgrade_echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line.to_ascii_lowercase());
                }
                let mut w = conn;
                if !head.iter().any(|l| l.starts_with("upgrade: websocket"))
                    || !head
                        .iter()
                        .any(|l| l.starts_with("connection:") && l.contains("upgrade"))
                {
                    let _ = w.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                    return;
                }
                let _ = w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
                );
                let mut buf = [0u8; 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if w.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

fn config(port: u16, upstream: u16, upgrades: &str, marker: &str) -> String {
    bootstrap(
        &[listener_yaml(
            "ws",
            port,
            &format!(
                "virtual_hosts: [{{name: all, domains: ['*'], routes: [{{match: {{prefix: /}}, route: {{cluster: ws, timeout: 1s}}, name: {marker}}}]}}]"
            ),
            upgrades,
        )],
        &[cluster_yaml("ws", &[upstream], "")],
    )
}

/// Sends a WebSocket handshake; the status and the connection.
fn handshake(port: u16) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .unwrap();
    let head = read_head(&mut s);
    let status = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, s)
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    got
}

#[test]
fn websocket_tunnels_through_a_reload() {
    let up = upgrade_echo_server();
    let port = free_port();
    let allow = "upgrade_configs: [{upgrade_type: websocket}]";
    let l = Legate::start(&config(port, up, allow, "one"), port);
    let (status, mut ws) = handshake(port);
    assert_eq!(status, 101);
    assert_eq!(echo(&mut ws, b"hello"), b"HELLO");

    // A reload (the route changes) leaves the open tunnel alone.
    l.rewrite_config(&config(port, up, allow, "two"));
    l.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(echo(&mut ws, b"after reload"), b"AFTER RELOAD");
    // Quiet for longer than the route's 1s timeout: a tunnel is not bound by it (in Envoy
    // the route timeout starts when the request ends, which an upgraded one never does).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(echo(&mut ws, b"still here"), b"STILL HERE");
    // Plain requests on the listener still work.
    assert_eq!(
        get(port, "/", "x").status,
        400,
        "the echo server wants an upgrade"
    );
}

#[test]
fn upgrade_not_configured_is_refused_like_envoy() {
    let up = upgrade_echo_server();
    let port = free_port();
    let _l = Legate::start(&config(port, up, "", "r"), port);
    let (status, _) = handshake(port);
    let envoy_port = free_port();
    let _e = Envoy::start(&config(envoy_port, up, "", "r"), envoy_port);
    let (envoy_status, _) = handshake(envoy_port);
    assert_eq!(status, envoy_status);
    assert_eq!(status, 403);
}
