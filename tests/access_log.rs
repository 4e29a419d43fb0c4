//! HCM access logs: the same bootstrap through Envoy 1.40 and legate must write the same
//! lines (fields that depend on time or ports left out), JSON logs stay JSON, and SIGUSR1
//! reopens a rotated file.

mod common;

use common::*;
use std::path::Path;

/// Every operator whose value is deterministic across the two gateways.
const FORMAT: &str = "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% \\\"%REQ(USER-AGENT)%\\\" \\\"%REQ(:AUTHORITY)%\\\" %UPSTREAM_CLUSTER% %ROUTE_NAME% %RESP(CONTENT-TYPE)% %REQ(X-MISSING):3%\\n";

fn access_log_yaml(path: &Path, format: &str) -> String {
    format!(
        r#"access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: {}
{format}"#,
        path.display()
    )
}

fn bootstrap_for(port: u16, up: u16, log: &Path, format: &str) -> String {
    let routes = r#"virtual_hosts:
- name: app
  domains: [app.test]
  routes:
  - name: ok
    match: {prefix: /ok}
    route: {cluster: c}
  - name: nocluster
    match: {prefix: /nocluster}
    route: {cluster_header: x-target}
  - name: direct
    match: {prefix: /direct}
    direct_response: {status: 202, body: {inline_string: accepted}}
  - name: dead
    match: {prefix: /dead}
    route: {cluster: dead}
"#;
    bootstrap(
        &[listener_yaml(
            "main",
            port,
            routes,
            &access_log_yaml(log, format),
        )],
        &[
            cluster_yaml("c", &[up], ""),
            // Never the gateway's own port (free_port does not repeat), or `/dead` would loop.
            cluster_yaml("dead", &[free_port()], ""),
        ],
    )
}

fn exercise(port: u16) {
    let r = get(port, "/ok/one?x=1", "app.test");
    assert_eq!(r.status, 200);
    let r = request_with_body(port, "POST", "/ok/post", "app.test", &[], "hello body");
    assert_eq!(r.status, 200);
    assert_eq!(get(port, "/direct", "app.test").status, 202);
    assert_eq!(get(port, "/nowhere", "other.test").status, 404);
    let r = request(
        port,
        "GET",
        "/nocluster",
        "app.test",
        &[("x-target", "missing")],
    );
    assert_eq!(r.status, 503);
    assert_eq!(get(port, "/dead", "app.test").status, 503);
}

fn read_lines(path: &Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    // Envoy writes its log files every 10 s (its default flush interval), counted from
    // its start: up to 10 s after the requests, so the wait allows twice that.
    eventually(20, "access log lines", || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        lines.len() >= n
    });
    lines
}

/// The 503 for a refused connection carries OS error text in Envoy's body, so its byte
/// count is not compared.
fn mask_dead(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .map(|l| {
            if l.contains("/dead") {
                let mut f: Vec<&str> = l.split(' ').collect();
                f[6] = "*";
                f.join(" ")
            } else {
                l
            }
        })
        .collect()
}

#[test]
fn access_log_lines_match_envoy() {
    let format = format!("    log_format: {{text_format_source: {{inline_string: \"{FORMAT}\"}}}}");
    let run = |envoy: bool| {
        let up = Upstream::start("u");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let port = free_port();
        let yaml = bootstrap_for(port, up.port(), &log, &format);
        let lines = if envoy {
            let _e = Envoy::start(&yaml, port);
            exercise(port);
            read_lines(&log, 6)
        } else {
            let _l = Legate::start(&yaml, port);
            exercise(port);
            read_lines(&log, 6)
        };
        mask_dead(lines)
    };
    let envoy = run(true);
    let legate = run(false);
    assert_eq!(envoy.len(), 6, "{envoy:#?}");
    assert_eq!(legate, envoy);
}

#[test]
fn default_format_and_json_format() {
    let up = Upstream::start("u");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.log");
    let json = dir.path().join("json.log");
    let port = free_port();
    let extra = format!(
        "{}\n{}",
        access_log_yaml(&text, ""),
        access_log_yaml(
            &json,
            "    log_format:\n      json_format: {status: '%RESPONSE_CODE%', path: '%REQ(:PATH)%', flags: '%RESPONSE_FLAGS%', nested: {cluster: '%UPSTREAM_CLUSTER%'}, fixed: 7}"
        )
        .replacen("access_log:\n", "", 1)
    );
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let yaml = bootstrap(
        &[listener_yaml("main", port, route, &extra)],
        &[cluster_yaml("c", &[up.port()], "")],
    );
    let _l = Legate::start(&yaml, port);
    assert_eq!(get(port, "/a", "x.test").status, 200);

    let line = read_lines(&text, 1).remove(0);
    // [2026-11-27T23:00:00.123Z] "GET /a HTTP/1.1" 200 - 0 <n> <ms> <ms> "-" "-" "<id>" "x.test" "127.0.0.1:<port>"
    assert!(line.starts_with('['), "{line}");
    assert!(line.contains("] \"GET /a HTTP/1.1\" 200 - 0 "), "{line}");
    assert!(line.contains("\"x.test\""), "{line}");
    assert!(
        line.ends_with(&format!("\"127.0.0.1:{}\"", up.port())),
        "{line}"
    );

    let line = read_lines(&json, 1).remove(0);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["status"], 200, "{line}");
    assert_eq!(v["path"], "/a");
    assert_eq!(v["flags"], "-");
    assert_eq!(v["nested"]["cluster"], "c");
    assert_eq!(v["fixed"], 7);
}

#[test]
fn sigusr1_reopens_rotated_file() {
    let up = Upstream::start("u");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let port = free_port();
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let fmt = "    log_format: {text_format_source: {inline_string: \"%REQ(:PATH)%\\n\"}}";
    let yaml = bootstrap(
        &[listener_yaml(
            "main",
            port,
            route,
            &access_log_yaml(&log, fmt),
        )],
        &[cluster_yaml("c", &[up.port()], "")],
    );
    let l = Legate::start(&yaml, port);
    get(port, "/before", "x");
    read_lines(&log, 1);
    std::fs::rename(&log, &rotated).unwrap();
    // Until SIGUSR1 the open file (now rotated) keeps receiving lines.
    get(port, "/still-old", "x");
    assert_eq!(read_lines(&rotated, 2), ["/before", "/still-old"]);
    l.signal("USR1");
    eventually(10, "new access log file", || {
        get(port, "/after", "x");
        log.exists()
    });
    assert_eq!(read_lines(&log, 1)[0], "/after");
}

#[test]
fn bad_format_is_rejected_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let port = free_port();
    let fmt = "    log_format: {text_format_source: {inline_string: \"%NOT_AN_OPERATOR%\"}}";
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    direct_response: {status: 200}\n";
    let yaml = bootstrap(
        &[listener_yaml(
            "main",
            port,
            route,
            &access_log_yaml(&log, fmt),
        )],
        &[],
    );
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = std::process::Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        err.contains("access_log[0].typed_config.log_format") && err.contains("NOT_AN_OPERATOR"),
        "{err}"
    );
}

/// `admin.access_log`, as Envoy Gateway's bootstrap sets it: a line per admin request in
/// the logger's format, the same fields from Envoy and legate (the bodies of admin pages
/// differ, so not their sizes).
#[test]
fn admin_requests_are_access_logged_as_by_envoy() {
    let format = "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% \\\"%REQ(USER-AGENT)%\\\" \\\"%REQ(:AUTHORITY)%\\\"\\n";
    let run = |envoy: bool| {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("admin.log");
        let (port, admin) = (free_port(), free_port());
        let yaml = format!(
            "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}\n  access_log:\n  - name: envoy.access_loggers.file\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n      path: {}\n      log_format: {{text_format_source: {{inline_string: \"{format}\"}}}}\n{}",
            log.display(),
            bootstrap(
                &[listener_yaml(
                    "main",
                    port,
                    "virtual_hosts: [{name: all, domains: ['*'], routes: [{match: {prefix: /}, direct_response: {status: 200}}]}]",
                    "",
                )],
                &[],
            )
        );
        let _p: Box<dyn std::any::Any> = if envoy {
            Box::new(Envoy::start(&yaml, port))
        } else {
            Box::new(Legate::start(&yaml, port))
        };
        wait_for_port(admin, None);
        assert_eq!(get(admin, "/ready", "admin.test").status, 200);
        assert_eq!(
            get(admin, "/stats?filter=nothing", "admin.test").status,
            200
        );
        read_lines(&log, 2)
    };
    let envoy = run(true);
    let legate = run(false);
    assert_eq!(envoy.len(), 2, "{envoy:#?}");
    assert_eq!(legate, envoy);
}
