//! SIGHUP: reloads under load, listeners coming and going, bad files rejected.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn route_to(cluster: &str, header: &str) -> String {
    format!(
        "virtual_hosts:\n- name: all\n  domains: ['*']\n  request_headers_to_add: [{{header: {{key: x-config, value: '{header}'}}}}]\n  routes:\n  - match: {{prefix: /}}\n    route: {{cluster: {cluster}}}\n"
    )
}

#[test]
fn zero_failed_requests_across_repeated_reloads_under_load() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let port = free_port();
    let config = |n: usize| {
        bootstrap(
            &[listener_yaml(
                "main",
                port,
                &route_to(if n.is_multiple_of(2) { "a" } else { "b" }, &n.to_string()),
                "",
            )],
            &[
                cluster_yaml("a", &[a.port()], ""),
                cluster_yaml("b", &[b.port()], ""),
            ],
        )
    };
    let legate = Legate::start(&config(0), port);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut c = KeepAlive::connect(port).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match c.get("/", "w") {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for n in 1..=20 {
        legate.rewrite_config(&config(n));
        legate.signal("HUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests: {ok} ok, {failed} failed over 20 reloads");
    assert!(ok > 200, "the load ran");
    assert_eq!(failed, 0);
    // Both configs served: the reloads took effect while the connections stayed open.
    assert!(a.count() > 0 && b.count() > 0);
    let last = a
        .seen()
        .last()
        .map(|s| s.header("x-config").map(str::to_string));
    assert!(last.is_some());
}

#[test]
fn reload_adds_and_removes_listeners_without_a_restart() {
    let slow = ScriptedUpstream::start("slow", |_| Behavior::Sleep(600));
    let fast = Upstream::start("fast");
    let (p1, p2) = (free_port(), free_port());
    let one = bootstrap(
        &[listener_yaml("first", p1, &route_to("slow", "1"), "")],
        &[
            cluster_yaml("slow", &[slow.port()], ""),
            cluster_yaml("fast", &[fast.port()], ""),
        ],
    );
    let two = bootstrap(
        &[listener_yaml("second", p2, &route_to("fast", "2"), "")],
        &[
            cluster_yaml("slow", &[slow.port()], ""),
            cluster_yaml("fast", &[fast.port()], ""),
        ],
    );
    let legate = Legate::start(&one, p1);
    // A request in flight on the listener being removed still completes.
    let in_flight = std::thread::spawn(move || get(p1, "/", "w"));
    eventually(5, "request reached the slow upstream", || slow.count() == 1);
    legate.rewrite_config(&two);
    legate.signal("HUP");
    wait_for_port(p2, None);
    assert_eq!(get(p2, "/", "w").upstream(), Some("fast"));
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "the draining listener finished its request");
    eventually(5, "old listener closed", || {
        std::net::TcpStream::connect(("127.0.0.1", p1)).is_err()
    });
}

#[test]
fn a_listener_that_cannot_bind_rejects_the_reload() {
    let a = Upstream::start("a");
    let port = free_port();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let good = bootstrap(
        &[listener_yaml("main", port, &route_to("a", "good"), "")],
        &[cluster_yaml("a", &[a.port()], "")],
    );
    let legate = Legate::start(&good, port);
    let bad = bootstrap(
        &[
            listener_yaml("main", port, &route_to("a", "bad"), ""),
            listener_yaml("clash", taken_port, &route_to("a", "bad"), ""),
        ],
        &[cluster_yaml("a", &[a.port()], "")],
    );
    legate.rewrite_config(&bad);
    legate.signal("HUP");
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert_eq!(get(port, "/", "w").status, 200);
    }
    assert_eq!(
        a.last().header("x-config"),
        Some("good"),
        "the last good config keeps serving"
    );
    drop(taken);
}

/// Envoy refuses a bootstrap file with no document in it. A reload that reads the file
/// just after an editor (or `echo >`) truncated it must keep the listeners, not take the
/// emptiness for a config without any.
#[test]
fn an_empty_file_rejects_the_reload() {
    let a = Upstream::start("a");
    let port = free_port();
    let good = bootstrap(
        &[listener_yaml("main", port, &route_to("a", "good"), "")],
        &[cluster_yaml("a", &[a.port()], "")],
    );
    let legate = Legate::start(&good, port);
    for empty in ["", "\n# nothing yet\n"] {
        legate.rewrite_config(empty);
        legate.signal("HUP");
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            assert_eq!(get(port, "/", "w").status, 200);
        }
    }
    assert_eq!(a.last().header("x-config"), Some("good"));
    let checked = std::process::Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&legate.config)
        .output()
        .unwrap();
    assert!(!checked.status.success());
    assert!(
        String::from_utf8_lossy(&checked.stdout).contains("no configuration")
            || String::from_utf8_lossy(&checked.stderr).contains("no configuration"),
        "{checked:?}"
    );
}
