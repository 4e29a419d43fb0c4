//! `envoy.filters.http.health_check` with the admin `/healthcheck/fail|ok` switch, through
//! Envoy 1.40 and legate: the same answers required. Also `POST /logging`.

mod common;

use common::*;

const HC_FILTER: &str = r#"
- name: envoy.filters.http.health_check
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
    pass_through_mode: false
    headers:
    - name: ":path"
      string_match: {exact: /healthz}"#;

fn yaml(port: u16, admin: u16, up: u16) -> String {
    let route = "virtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c}\n";
    let listener = listener_yaml("main", port, route, "").replace(
        "          http_filters:\n",
        &format!("          http_filters:{}\n", indent(HC_FILTER, 10)),
    );
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\n{}",
        bootstrap(&[listener], &[cluster_yaml("c", &[up], "")])
    )
}

type Seen = Vec<(String, u16, Option<String>, String)>;

fn exercise(port: u16, admin: u16, up: &Upstream) -> Seen {
    let mut seen = Vec::new();
    let mut check = |what: &str, r: Response| {
        seen.push((
            what.to_string(),
            r.status,
            r.header("x-envoy-immediate-health-check-fail")
                .map(str::to_string),
            r.body.clone(),
        ));
    };
    check("healthz", get(port, "/healthz", "x"));
    check("app", get(port, "/app", "x"));
    check(
        "fail",
        request(admin, "POST", "/healthcheck/fail", "a", &[]),
    );
    check("healthz failing", get(port, "/healthz", "x"));
    check("app failing", get(port, "/app", "x"));
    check("ok", request(admin, "POST", "/healthcheck/ok", "a", &[]));
    check("healthz again", get(port, "/healthz", "x"));
    // Health checks never reach the upstream; the two app requests do.
    assert_eq!(up.count(), 2);
    seen
}

#[test]
fn health_check_filter_and_admin_switch_match_envoy() {
    let run = |envoy: bool| {
        let up = Upstream::start("u");
        let (port, admin) = (free_port(), free_port());
        let y = yaml(port, admin, up.port());
        if envoy {
            let _e = Envoy::start(&y, port);
            wait_for_port(admin, None);
            exercise(port, admin, &up)
        } else {
            let _l = Legate::start(&y, port);
            wait_for_port(admin, None);
            exercise(port, admin, &up)
        }
    };
    let envoy = run(true);
    let legate = run(false);
    assert_eq!(envoy[3].1, 503, "{envoy:#?}");
    assert_eq!(legate, envoy);
}

#[test]
fn pass_through_mode_is_rejected() {
    let (port, admin) = (free_port(), free_port());
    let y = yaml(port, admin, free_port())
        .replace("pass_through_mode: false", "pass_through_mode: true");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, y).unwrap();
    let out = std::process::Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("http_filters[0].typed_config.pass_through_mode"),
        "{text}"
    );
}

#[test]
fn logging_level_changes_at_runtime_by_post_only() {
    let up = Upstream::start("u");
    let (port, admin) = (free_port(), free_port());
    let _l = Legate::start(&yaml(port, admin, up.port()), port);
    wait_for_port(admin, None);
    assert_eq!(get(admin, "/logging?level=debug", "a").status, 405);
    let r = request(admin, "POST", "/logging?level=debug", "a", &[]);
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "active loggers:\n  legate: debug\n")
    );
    let r = request(admin, "POST", "/logging", "a", &[]);
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "active loggers:\n  legate: debug\n")
    );
    let r = request(admin, "POST", "/logging?level=warning", "a", &[]);
    assert_eq!(r.body, "active loggers:\n  legate: warn\n");
    assert_eq!(
        request(admin, "POST", "/logging?level=loud", "a", &[]).status,
        400
    );
}
