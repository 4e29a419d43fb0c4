//! The admin server: Envoy's read-only endpoints.

mod common;

use common::*;

fn start() -> (Upstream, Legate, u16, u16) {
    let a = Upstream::start("a");
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\n{}",
        one_route_bootstrap(port, "", &[a.port()], "")
    );
    let l = Legate::start(&yaml, port);
    wait_for_port(admin, None);
    (a, l, port, admin)
}

fn json(port: u16, path: &str) -> serde_json::Value {
    let r = get(port, path, "admin");
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_str(&r.body).unwrap()
}

#[test]
fn ready_server_info_and_methods() {
    let (_a, _l, _port, admin) = start();
    let r = get(admin, "/ready", "admin");
    assert_eq!((r.status, r.body.as_str()), (200, "LIVE\n"));
    assert_eq!(request(admin, "POST", "/ready", "admin", &[]).status, 405);
    assert_eq!(get(admin, "/no-such-thing", "admin").status, 404);
    let info = json(admin, "/server_info");
    assert!(info["version"].as_str().unwrap().starts_with("legate/"));
    assert_eq!(info["state"], "LIVE");
}

#[test]
fn config_dump_shows_the_bootstrap_and_filters_by_resource() {
    let (_a, _l, _port, admin) = start();
    let dump = json(admin, "/config_dump");
    let configs = dump["configs"].as_array().unwrap();
    assert_eq!(
        configs[0]["@type"],
        "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"
    );
    let clusters = &configs[0]["bootstrap"]["static_resources"]["clusters"];
    assert_eq!(clusters[0]["name"], "c", "{clusters}");
    let only = json(admin, "/config_dump?resource=static_clusters");
    let list = only["configs"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["cluster"]["name"], "c");
}

#[test]
fn clusters_lists_every_endpoint_with_health_and_requests() {
    let (a, _l, port, admin) = start();
    assert_eq!(get(port, "/", "w").status, 200);
    let text = get(admin, "/clusters", "admin").body;
    let host = format!("c::127.0.0.1:{}", a.port());
    assert!(
        text.contains(&format!("{host}::health_flags::healthy")),
        "{text}"
    );
    assert!(text.contains(&format!("{host}::rq_total::1")), "{text}");
    let j = json(admin, "/clusters?format=json");
    let status = &j["cluster_statuses"][0];
    assert_eq!(status["name"], "c");
    assert_eq!(
        status["host_statuses"][0]["address"]["socket_address"]["port_value"],
        a.port()
    );
}
