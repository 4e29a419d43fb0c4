//! Stopping: SIGTERM drains and exits 0; POST /drain_listeners stops accepting.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let slow = ScriptedUpstream::start("slow", |_| Behavior::Sleep(700));
    let port = free_port();
    let mut legate = Legate::start(&one_route_bootstrap(port, "", &[slow.port()], ""), port);
    let in_flight = std::thread::spawn(move || get(port, "/", "w"));
    eventually(5, "request at the upstream", || slow.count() == 1);
    legate.signal("TERM");
    eventually(5, "no longer accepting", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "the request in flight finished");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = legate.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "legate did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn drain_listeners_stops_accepting_and_ready_reports_draining() {
    let a = Upstream::start("a");
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\n{}",
        one_route_bootstrap(port, "", &[a.port()], "")
    );
    let _l = Legate::start(&yaml, port);
    wait_for_port(admin, None);
    assert_eq!(get(admin, "/ready", "admin").status, 200);
    // A kept-alive connection, and one accepted whose first request is still to come.
    let mut kept = KeepAlive::connect(port).unwrap();
    assert_eq!(kept.get("/", "w").unwrap().status, 200);
    let mut fresh = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        get(admin, "/drain_listeners", "admin").status,
        405,
        "mutations only by POST"
    );
    assert_eq!(
        request(admin, "POST", "/drain_listeners", "admin", &[]).status,
        200
    );
    eventually(5, "listener closed", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    let r = get(admin, "/ready", "admin");
    assert_eq!((r.status, r.body.as_str()), (503, "DRAINING\n"));
    // The idle kept-alive connection was closed; the new one's first request is served,
    // and then the connection closes (on the native engine; Pingora's proxy closes both).
    assert!(
        kept.get("/", "w").is_err(),
        "an idle connection outlived the drain"
    );
    if !engine_args().contains(&"pingora".to_string()) {
        use std::io::{Read, Write};
        fresh
            .write_all(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        let _ = fresh.read_to_end(&mut raw);
        let r = parse_response(&raw);
        assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    }
}

/// Inodes of the sockets listening on 127.0.0.1:`port` (from /proc/net/tcp).
fn listening_inodes(port: u16) -> Vec<String> {
    let local = format!("0100007F:{port:04X}");
    let mut inodes: Vec<String> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|s| s.to_string()))
                .flatten()
        })
        .collect();
    inodes.sort();
    inodes
}

#[test]
fn sigquit_hands_the_listening_sockets_to_the_new_process() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let a = Upstream::start("a");
    let port = free_port();
    let yaml = one_route_bootstrap(port, "", &[a.port()], "");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let sock_arg = sock.to_str().unwrap();
    // Both processes are told the same socket path, as Pingora's upgrade_sock setting.
    let mut old = Legate::spawn_with(&yaml, &["--upgrade-sock", sock_arg]);
    wait_for_port(port, Some(&mut old.child));
    // The port answers once the first worker has bound its socket; the second may be a
    // moment behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut before = listening_inodes(port);
    while before.len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        before = listening_inodes(port);
    }
    assert_eq!(before.len(), 2, "one socket per worker");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = std::panic::catch_unwind(|| get(port, "/", "w").status);
                match r {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    let mut new = Legate::spawn_with(&yaml, &["--upgrade", "--upgrade-sock", sock_arg]);
    eventually(10, "the new process waiting for sockets", || sock.exists());
    old.signal("QUIT");
    assert_eq!(old.wait_exit(10), Some(0));
    let served_by_old = ok.load(Ordering::Relaxed);
    eventually(10, "requests served by the new process", || {
        ok.load(Ordering::Relaxed) > served_by_old + 50
    });
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request refused or failed"
    );
    assert_eq!(
        listening_inodes(port),
        before,
        "the same sockets, not new binds"
    );
    assert_eq!(get(port, "/", "w").status, 200);
    assert_eq!(
        new.child.try_wait().unwrap(),
        None,
        "the new process keeps serving"
    );
}
