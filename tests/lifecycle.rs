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
}
