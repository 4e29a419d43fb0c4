//! Downstream TLS: filter chains chosen by SNI (exact, wildcard, fallback), certificates
//! generated here with rcgen, plain and TLS listeners side by side, HTTP/2 by ALPN,
//! certificates re-read on SIGHUP without dropping open connections, and bad TLS config
//! rejected with its field path.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls_pki_types::{CertificateDer, ServerName};

struct Cert {
    pem: String,
    key: String,
    der: Vec<u8>,
}

fn cert(names: &[&str]) -> Cert {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let c = rcgen::generate_simple_self_signed(names).unwrap();
    Cert {
        pem: c.cert.pem(),
        key: c.signing_key.serialize_pem(),
        der: c.cert.der().to_vec(),
    }
}

fn write_cert(dir: &Path, name: &str, c: &Cert) -> (String, String) {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&crt, &c.pem).unwrap();
    std::fs::write(&key, &c.key).unwrap();
    (crt.display().to_string(), key.display().to_string())
}

fn hcm(prefix: &str, route: &str) -> String {
    format!(
        r#"      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          route_config:
            virtual_hosts: [{{name: vh, domains: ["*"], routes: [{{match: {{prefix: /}}, {route}}}]}}]
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
"#
    )
}

fn tls_socket((crt, key): &(String, String), alpn: &str) -> String {
    format!(
        r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [{alpn}]
            tls_certificates: [{{certificate_chain: {{filename: {crt}}}, private_key: {{filename: {key}}}}}]
"#
    )
}

fn direct(body: &str) -> String {
    format!("direct_response: {{status: 200, body: {{inline_string: {body}}}}}")
}

/// A rustls client trusting exactly `roots`.
fn client(roots: &[&Cert], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(CertificateDer::from(r.der.clone())).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(port: u16, sni: &str, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Drive the handshake so that certificate errors surface here.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// One HTTP/1.1 request on a TLS stream; reads a content-length framed response.
fn get_on(tls: &mut Tls, host: &str) -> Response {
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n");
    tls.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return parse_response(&buf);
            }
        }
    }
}

fn https_get(port: u16, sni: &str, roots: &[&Cert]) -> Response {
    let mut tls = connect(port, sni, client(roots, &[b"http/1.1"])).unwrap();
    get_on(&mut tls, sni)
}

#[test]
fn sni_selects_the_filter_chain_and_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("up");
    let a = cert(&["a.example.com"]);
    let b = cert(&["*.b.example.com"]);
    let d = cert(&["default.example.com", "y.a.example.com", "b.example.com"]);
    let (fa, fb, fd) = (
        write_cert(dir.path(), "a", &a),
        write_cert(dir.path(), "b", &b),
        write_cert(dir.path(), "d", &d),
    );
    let yaml_for = |port: u16| {
        format!(
            r#"static_resources:
  listeners:
  - name: https
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters: [{{name: envoy.filters.listener.tls_inspector, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}}}]
    filter_chains:
    - filter_chain_match: {{server_names: [a.example.com]}}
{ta}{ha}    - filter_chain_match: {{server_names: ["*.b.example.com"]}}
{tb}{hb}    - {{}}
{td}{hd}  clusters:{cluster}
"#,
            ta = tls_socket(&fa, "http/1.1"),
            ha = hcm("a", &direct("chain-a")),
            tb = tls_socket(&fb, "http/1.1"),
            hb = hcm("b", &direct("chain-b")),
            td = tls_socket(&fd, "http/1.1"),
            hd = hcm("d", "route: {cluster: up}"),
            cluster = cluster_yaml("up", &[up.port()], ""),
        )
        .replace("    - {}\n      transport_socket", "    - transport_socket")
    };
    let port = free_port();
    let yaml = yaml_for(port);
    let _l = Legate::start(&yaml, port);

    let r = https_get(port, "a.example.com", &[&a]);
    assert_eq!((r.status, r.body.as_str()), (200, "chain-a"));
    // The wildcard chain, with its own certificate (the client trusts only that one).
    let r = https_get(port, "x.b.example.com", &[&b]);
    assert_eq!((r.status, r.body.as_str()), (200, "chain-b"));
    // No name matches: the chain without server_names, proxying upstream over TLS.
    let r = https_get(port, "default.example.com", &[&d]);
    assert_eq!(r.status, 200);
    assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
    // An exact name is not a wildcard match for a deeper name, nor the other way round.
    assert_eq!(https_get(port, "y.a.example.com", &[&d]).status, 200);
    assert_eq!(https_get(port, "b.example.com", &[&d]).body.trim(), "up");
    // Plaintext to a TLS-only listener: the connection is closed, as Envoy's handshake fails.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));

    // Envoy 1.40 on the same bootstrap chooses the same chains.
    let envoy_port = free_port();
    let _e = Envoy::start(&yaml_for(envoy_port), envoy_port);
    let body = |port, sni, roots: &[&Cert]| https_get(port, sni, roots).body;
    assert_eq!(body(envoy_port, "a.example.com", &[&a]), "chain-a");
    assert_eq!(body(envoy_port, "x.b.example.com", &[&b]), "chain-b");
    assert_eq!(
        body(envoy_port, "y.a.example.com", &[&d]),
        body(port, "y.a.example.com", &[&d])
    );
    assert_eq!(body(envoy_port, "b.example.com", &[&d]).trim(), "up");
}

#[test]
fn plain_and_tls_listeners_side_by_side_and_h2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("up");
    let c = cert(&["gw.example.com"]);
    let files = write_cert(dir.path(), "gw", &c);
    let (tls_port, plain_port) = (free_port(), free_port());
    let yaml = format!(
        r#"static_resources:
  listeners:
  - name: https
    address: {{socket_address: {{address: 127.0.0.1, port_value: {tls_port}}}}}
    filter_chains:
    -
{t}{h}{plain}
  clusters:{cluster}
"#,
        t = tls_socket(&files, "h2, http/1.1"),
        h = hcm("https", "route: {cluster: up}"),
        plain = listener_yaml(
            "plain",
            plain_port,
            "virtual_hosts: [{name: vh, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: up}}]}]",
            ""
        ),
        cluster = cluster_yaml("up", &[up.port()], ""),
    )
    .replace("    -\n      transport_socket", "    - transport_socket");
    let _l = Legate::start(&yaml, tls_port);
    assert_eq!(get(plain_port, "/", "x").status, 200);
    assert_eq!(up.last().header("x-forwarded-proto"), Some("http"));
    assert_eq!(https_get(tls_port, "gw.example.com", &[&c]).status, 200);

    // HTTP/2, negotiated by ALPN, end to end through the proxy.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body, proto) = rt.block_on(async {
        let config = client(&[&c], &[b"h2"]);
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("gw.example.com").unwrap(), tcp)
            .await
            .unwrap();
        let proto = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        let (mut h2, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("https://gw.example.com/h2")
            .body(())
            .unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        (status, String::from_utf8(bytes).unwrap(), proto)
    });
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));
    assert_eq!(status, 200);
    assert_eq!(body.trim(), "up");
    assert_eq!(up.last().path, "/h2");
}

#[test]
fn certificates_reload_on_sighup_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let old = cert(&["gw.example.com"]);
    let files = write_cert(dir.path(), "gw", &old);
    let port = free_port();
    let yaml = format!(
        "static_resources:\n  listeners:\n  - name: https\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    filter_chains:\n    - transport_socket:\n{t}{h}",
        t = tls_socket(&files, "http/1.1")
            .trim_start_matches("      transport_socket:\n"),
        h = hcm("https", &direct("ok")),
    );
    let l = Legate::start(&yaml, port);
    let mut open = connect(port, "gw.example.com", client(&[&old], &[])).unwrap();
    assert_eq!(get_on(&mut open, "gw").body, "ok");

    let new = cert(&["gw.example.com"]);
    write_cert(dir.path(), "gw", &new);
    l.signal("HUP");
    eventually(10, "the renewed certificate is served", || {
        connect(port, "gw.example.com", client(&[&new], &[])).is_ok()
    });
    assert!(connect(port, "gw.example.com", client(&[&old], &[])).is_err());
    // The connection accepted before the reload keeps working.
    assert_eq!(get_on(&mut open, "gw").body, "ok");

    // A key that does not parse: the reload is rejected and the last good config serves.
    std::fs::write(&files.1, "not a key").unwrap();
    l.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(https_get(port, "gw.example.com", &[&new]).body, "ok");
}

#[test]
fn bad_tls_config_is_rejected_with_its_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(&["gw.example.com"]);
    let (crt, _) = write_cert(dir.path(), "gw", &c);
    let missing = dir.path().join("missing.key").display().to_string();
    let yaml = format!(
        "static_resources:\n  listeners:\n  - name: https\n    address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}\n    filter_chains:\n    - filter_chain_match: {{server_names: ['a.*.com'], destination_port: 443}}\n      transport_socket:\n{t}{h}",
        t = tls_socket(&(crt, missing), "http/1.1")
            .trim_start_matches("      transport_socket:\n")
            .replace("tls_certificates:", "tls_params: {tls_minimum_protocol_version: TLSv1_0, cipher_suites: [AES128-SHA]}\n            tls_certificates:"),
        h = hcm("https", &direct("ok")),
    );
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let output = std::process::Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let at = "static_resources.listeners[0].filter_chains[0]";
    for expected in [
        format!("{at}.filter_chain_match.server_names[0]"),
        format!("{at}.filter_chain_match.destination_port"),
        format!("{at}.transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version"),
        format!("{at}.transport_socket.typed_config.common_tls_context.tls_params.cipher_suites[0]"),
        format!("{at}.transport_socket.typed_config.common_tls_context.tls_certificates[0].private_key.filename"),
    ] {
        assert!(out.contains(&expected), "missing {expected} in:\n{out}");
    }
    assert!(!output.status.success());
}

/// An HTTPS upstream that answers each request with the SNI it was reached by; with
/// `client_ca`, it requires a client certificate signed by it.
fn tls_upstream(server: &Cert, client_ca: Option<&Cert>) -> (u16, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from(ca.der.clone())).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key = rustls_pki_types::PrivateKeyDer::try_from(
        rustls_pki_types::pem::PemObject::from_pem_slice(server.key.as_bytes())
            .map(|k: rustls_pki_types::PrivatePkcs8KeyDer| k.secret_pkcs8_der().to_vec())
            .unwrap(),
    )
    .unwrap();
    let config = builder
        .with_single_cert(vec![CertificateDer::from(server.der.clone())], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        seen.clear();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{sni}",
                            sni.len()
                        );
                        if tls.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, rt)
}

fn upstream_tls_cluster(name: &str, port: u16, context: &str) -> String {
    cluster_yaml(
        name,
        &[port],
        &format!(
            "transport_socket:\n  name: envoy.transport_sockets.tls\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n{}",
            indent(context, 4)
        ),
    )
}

#[test]
fn upstream_tls_with_sni_ca_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = cert(&["backend.internal", "api.example.com"]);
    let other = cert(&["backend.internal"]);
    let client_cert = cert(&["gateway.client"]);
    let (crt, _) = write_cert(dir.path(), "server", &server);
    let (other_crt, _) = write_cert(dir.path(), "other", &other);
    let (ccrt, ckey) = write_cert(dir.path(), "client", &client_cert);
    let (plain_port, _rt1) = tls_upstream(&server, None);
    let (mtls_port, _rt2) = tls_upstream(&server, Some(&client_cert));
    let port = free_port();
    let routes = r#"virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - {match: {prefix: /verified}, route: {cluster: verified}}
  - {match: {prefix: /wrong-ca}, route: {cluster: wrong_ca}}
  - {match: {prefix: /auto}, route: {cluster: auto}}
  - {match: {prefix: /mtls}, route: {cluster: mtls}}
  - {match: {prefix: /no-client-cert}, route: {cluster: no_client_cert}}"#;
    let ca = |f: &str| format!("validation_context: {{trusted_ca: {{filename: {f}}}}}");
    let yaml = bootstrap(
        &[listener_yaml("main", port, routes, "")],
        &[
            upstream_tls_cluster(
                "verified",
                plain_port,
                &format!("sni: backend.internal\ncommon_tls_context:\n  {}", ca(&crt)),
            ),
            upstream_tls_cluster(
                "wrong_ca",
                plain_port,
                &format!("sni: backend.internal\ncommon_tls_context:\n  {}", ca(&other_crt)),
            ),
            upstream_tls_cluster(
                "auto",
                plain_port,
                &format!("auto_host_sni: true\nauto_sni_san_validation: true\ncommon_tls_context:\n  {}", ca(&crt)),
            ),
            upstream_tls_cluster(
                "mtls",
                mtls_port,
                &format!(
                    "sni: backend.internal\ncommon_tls_context:\n  {}\n  tls_certificates: [{{certificate_chain: {{filename: {ccrt}}}, private_key: {{filename: {ckey}}}}}]",
                    ca(&crt)
                ),
            ),
            upstream_tls_cluster(
                "no_client_cert",
                mtls_port,
                &format!("sni: backend.internal\ncommon_tls_context:\n  {}", ca(&crt)),
            ),
        ],
    );
    let _l = Legate::start(&yaml, port);
    let r = get(port, "/verified", "x");
    assert_eq!((r.status, r.body.as_str()), (200, "backend.internal"));
    // A server certificate not signed by the trusted CA: the connection fails, 503.
    assert_eq!(get(port, "/wrong-ca", "x").status, 503);
    // SNI from the request's host, and the certificate must name it.
    let r = get(port, "/auto", "api.example.com:8443");
    assert_eq!((r.status, r.body.as_str()), (200, "api.example.com"));
    assert_eq!(get(port, "/auto", "elsewhere.example.com").status, 503);
    // The upstream requires a client certificate: sent when configured.
    assert_eq!(get(port, "/mtls", "x").status, 200);
    assert_eq!(get(port, "/no-client-cert", "x").status, 503);
}

/// HTTPS on HTTP/1.1 goes through legate's own engine (header names lowercase, as Envoy
/// writes them; Pingora's proxy keeps the upstream's `X-Case`), and a request it does not
/// take (a chunked body) hands the TLS connection, with what was already decrypted, to
/// Pingora on the same connection.
#[test]
fn https_on_http1_runs_on_the_native_engine_and_hands_over_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_upstream();
    let c = cert(&["a.example.com"]);
    let files = write_cert(dir.path(), "a", &c);
    let yaml_for = |port: u16| {
        format!(
            r#"static_resources:
  listeners:
  - name: https
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters: [{{name: envoy.filters.listener.tls_inspector, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}}}]
    filter_chains:
    - filter_chain_match: {{server_names: [a.example.com]}}
{t}{h}  clusters:{cluster}
"#,
            t = tls_socket(&files, "http/1.1"),
            h = hcm("a", "route: {cluster: up}"),
            cluster = cluster_yaml("up", &[raw], ""),
        )
    };
    let raw_text = |engine: &str| {
        let port = free_port();
        let mut l = Legate::spawn_with(&yaml_for(port), &["--engine", engine]);
        wait_for_port(port, Some(&mut l.child));
        let mut tls = connect(port, "a.example.com", client(&[&c], &[b"http/1.1"])).unwrap();
        let r = get_on(&mut tls, "a.example.com");
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        // A chunked request on the same connection: Pingora's turn.
        tls.write_all(
            b"POST /plain HTTP/1.1\r\nhost: a.example.com\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("hello"), "{text}");
        // The first response again, raw, to see which engine wrote it.
        let mut tls = connect(port, "a.example.com", client(&[&c], &[b"http/1.1"])).unwrap();
        tls.write_all(b"GET /plain HTTP/1.1\r\nhost: a.example.com\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        String::from_utf8_lossy(&out).to_string()
    };
    assert!(raw_text("native").contains("\r\nx-case: Mixed\r\n"));
    assert!(raw_text("pingora").contains("\r\nX-Case: Mixed\r\n"));
}

/// Whether a second connection resumes the first's session, per TLS version, as an
/// OpenSSL client sees it (tests/tls/resume.py).
fn resumes(port: u16) -> (String, String) {
    let run = |version: &str| {
        let out = std::process::Command::new("python3")
            .arg(repo_path("tests/tls/resume.py"))
            .arg(port.to_string())
            .arg(version)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    (run("1.2"), run("1.3"))
}

/// Session resumption under Envoy Gateway's settings (both kinds off) and the others:
/// TLS 1.2 by session cache or ticket, TLS 1.3 by ticket only, as Envoy 1.40 resumes them.
#[test]
fn session_resumption_follows_the_context_as_in_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_cert(dir.path(), "a", &cert(&["localhost"]));
    for settings in [
        "",
        "disable_stateful_session_resumption: true",
        "disable_stateless_session_resumption: true",
        "disable_stateful_session_resumption: true\n          disable_stateless_session_resumption: true",
    ] {
        let mut seen = Vec::new();
        for envoy in [true, false] {
            let port = free_port();
            let socket = tls_socket(&files, "http/1.1").replace(
                "          common_tls_context:\n",
                &format!("          {settings}\n          common_tls_context:\n"),
            );
            let yaml = tls_listener(port, &socket, &hcm("tls", &direct("ok")), "");
            let _p: Box<dyn std::any::Any> = if envoy {
                Box::new(Envoy::start(&yaml, port))
            } else {
                Box::new(Legate::start(&yaml, port))
            };
            seen.push(resumes(port));
        }
        assert_eq!(seen[0], seen[1], "{settings:?}: envoy, then legate");
    }
}

/// A bootstrap with one TLS listener: `socket` (a filter chain's transport_socket lines),
/// then the connection manager, then `clusters` (lines of static_resources, or empty).
fn tls_listener(port: u16, socket: &str, hcm: &str, clusters: &str) -> String {
    format!(
        "static_resources:\n  listeners:\n  - name: tls\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    filter_chains:\n    -\n{socket}{hcm}{clusters}"
    )
}

/// Runs the openssl command line, its arguments split at spaces (certificates rcgen cannot
/// make: RSA keys, X.509 v1).
fn openssl(dir: &Path, args: &str) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args.split_whitespace())
        .output()
        .expect("the openssl command (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The certificate each client gets, as hex DER or "failed" (tests/tls/served_cert.py).
fn served(port: u16, clients: &[(&str, &str, &str)]) -> Vec<String> {
    clients
        .iter()
        .map(|(version, sni, ciphers)| {
            let mut cmd = std::process::Command::new("python3");
            cmd.arg(repo_path("tests/tls/served_cert.py"))
                .arg(port.to_string())
                .args([version, sni]);
            if !ciphers.is_empty() {
                cmd.arg(ciphers);
            }
            let out = cmd.output().expect("python3");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect()
}

/// An RSA and an ECDSA certificate in one context, as control planes configure them, and
/// an X.509 v1 certificate (Envoy's examples ship some): the certificate each client gets
/// from Envoy and from legate, by TLS version, SNI and the ciphers the client offers.
#[test]
fn certificates_are_chosen_per_client_as_envoy_chooses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(d, "req -x509 -newkey rsa:2048 -nodes -keyout rsa.key -out rsa.pem -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost");
    openssl(d, "ecparam -name prime256v1 -genkey -noout -out ec.key");
    openssl(d, "req -x509 -new -key ec.key -out ec.pem -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost");
    openssl(d, "req -new -key rsa.key -out v1.csr -subj /CN=localhost");
    openssl(
        d,
        "x509 -req -in v1.csr -signkey rsa.key -out v1.pem -days 2",
    );
    let path = |f: &str| d.join(f).display().to_string();
    let entry = |crt: &str, key: &str| {
        format!(
            "{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}",
            path(crt),
            path(key)
        )
    };
    let der = |f: &str| {
        use rustls_pki_types::pem::PemObject;
        let c = CertificateDer::from_pem_file(d.join(f)).unwrap();
        c.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let clients = [
        ("1.3", "localhost", ""),
        ("1.3", "-", ""),
        ("1.3", "other.test", ""),
        ("1.2", "localhost", ""),
        ("1.2", "localhost", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("1.2", "localhost", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ];
    for certs in [
        format!(
            "[{}, {}]",
            entry("rsa.pem", "rsa.key"),
            entry("ec.pem", "ec.key")
        ),
        format!("[{}]", entry("v1.pem", "rsa.key")),
    ] {
        let mut seen = Vec::new();
        for envoy in [true, false] {
            let port = free_port();
            let socket = format!(
                "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          common_tls_context:\n            tls_certificates: {certs}\n"
            );
            let yaml = tls_listener(port, &socket, &hcm("tls", &direct("ok")), "");
            let _p: Box<dyn std::any::Any> = if envoy {
                Box::new(Envoy::start(&yaml, port))
            } else {
                Box::new(Legate::start(&yaml, port))
            };
            seen.push(served(port, &clients));
        }
        let named = |v: &Vec<String>| -> Vec<String> {
            v.iter()
                .map(|h| {
                    [("rsa", "rsa.pem"), ("ecdsa", "ec.pem"), ("v1", "v1.pem")]
                        .iter()
                        .find(|(_, f)| der(f) == *h)
                        .map_or(h.clone(), |(n, _)| n.to_string())
                })
                .collect()
        };
        let (envoy, legate) = (named(&seen[0]), named(&seen[1]));
        assert_eq!(envoy, legate, "{certs}: envoy, then legate");
        assert!(
            legate.iter().any(|c| c == "ecdsa" || c == "v1"),
            "{legate:?}"
        );
    }
}

/// A certificate from `static_resources.secrets`, named by an `SdsSecretConfig` without a
/// config source: served by Envoy and legate alike; a name with no such secret is refused
/// by both.
#[test]
fn static_secrets_serve_certificates_named_by_sds_configs() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(&["localhost"]);
    let (crt, key) = write_cert(dir.path(), "s", &c);
    let hex: String = c.der.iter().map(|b| format!("{b:02x}")).collect();
    let config = |port: u16, name: &str| {
        let socket = format!(
            "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          common_tls_context:\n            tls_certificate_sds_secret_configs: [{{name: {name}}}]\n"
        );
        let secrets = format!("\n  secrets:\n  - name: server-cert\n    tls_certificate: {{certificate_chain: {{filename: {crt}}}, private_key: {{filename: {key}}}}}");
        tls_listener(port, &socket, &hcm("tls", &direct("ok")), &secrets)
    };
    for envoy in [true, false] {
        let port = free_port();
        let yaml = config(port, "server-cert");
        let _p: Box<dyn std::any::Any> = if envoy {
            Box::new(Envoy::start(&yaml, port))
        } else {
            Box::new(Legate::start(&yaml, port))
        };
        let got = served(port, &[("1.3", "localhost", "")]);
        assert_eq!(got, std::slice::from_ref(&hex), "envoy: {envoy}");
    }
    let path = dir.path().join("missing.yaml");
    std::fs::write(&path, config(1, "no-such-secret")).unwrap();
    let envoy = std::process::Command::new("envoy")
        .args(["--mode", "validate", "--log-level", "critical", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!envoy.status.success());
    let legate = std::process::Command::new(legate_bin())
        .args(["--validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&legate.stdout);
    assert!(
        text.contains(
            "tls_certificate_sds_secret_configs[0].name: no static secret named 'no-such-secret'"
        ),
        "{text}"
    );
}

/// Client certificates (mTLS): a CA in `validation_context` verifies a presented
/// certificate, `require_client_certificate` makes one mandatory (without a CA Envoy asks
/// for none, "required" or not); and `x-forwarded-client-cert` under FORWARD_ONLY is kept
/// only from a client that presented one. Three clients (none, CA-signed, another
/// self-signed) through Envoy and legate on each config.
#[test]
fn client_certificates_are_asked_for_and_checked_as_in_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca",
    );
    openssl(
        d,
        "req -new -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=client",
    );
    std::fs::write(
        d.join("client.ext"),
        "extendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://test/client\n",
    )
    .unwrap();
    openssl(d, "x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext");
    openssl(d, "req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.pem -days 2 -subj /CN=other -addext extendedKeyUsage=clientAuth");
    let server = write_cert(d, "server", &cert(&["localhost"]));
    let path = |f: &str| d.join(f).display().to_string();
    let clients = [
        ("-", "-"),
        ("client.pem", "client.key"),
        ("other.pem", "other.key"),
    ];
    // (DownstreamTlsContext fields, a line of its common_tls_context)
    let validation = format!(
        "validation_context: {{trusted_ca: {{filename: {}}}}}",
        path("ca.pem")
    );
    for (settings, common) in [
        ("", validation.as_str()),
        ("require_client_certificate: true", validation.as_str()),
        ("require_client_certificate: true", ""),
    ] {
        let context = format!("{settings} {common}");
        let mut seen = Vec::new();
        for envoy in [true, false] {
            let up = Upstream::start("up");
            let port = free_port();
            let socket = tls_socket(&server, "http/1.1")
                .replace(
                    "          common_tls_context:\n",
                    &format!("          {settings}\n          common_tls_context:\n"),
                )
                .replace(
                    "            tls_certificates:",
                    &format!("            {common}\n            tls_certificates:"),
                );
            let hcm = hcm("tls", "route: {cluster: up}").replace(
                "          stat_prefix: tls\n",
                "          stat_prefix: tls\n          forward_client_cert_details: FORWARD_ONLY\n",
            );
            let clusters = format!("\n  clusters:{}", cluster_yaml("up", &[up.port()], ""));
            let yaml = tls_listener(port, &socket, &hcm, &clusters);
            let _p: Box<dyn std::any::Any> = if envoy {
                Box::new(Envoy::start(&yaml, port))
            } else {
                Box::new(Legate::start(&yaml, port))
            };
            let outcomes: Vec<(String, Option<String>)> = clients
                .iter()
                .map(|(c, k)| {
                    let (c, k) = if *c == "-" {
                        ("-".to_string(), "-".to_string())
                    } else {
                        (path(c), path(k))
                    };
                    let before = up.count();
                    let out = std::process::Command::new("python3")
                        .arg(repo_path("tests/tls/client_cert_get.py"))
                        .args([port.to_string(), c, k])
                        .output()
                        .expect("python3");
                    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    let xfcc = (up.count() > before)
                        .then(|| {
                            up.last()
                                .header("x-forwarded-client-cert")
                                .map(str::to_string)
                        })
                        .flatten();
                    (status, xfcc)
                })
                .collect();
            seen.push(outcomes);
        }
        assert_eq!(seen[0], seen[1], "{context}: envoy, then legate");
        // With a CA, the other certificate is refused and the CA's client keeps its header;
        // without one, nobody is asked for a certificate, even when one is "required".
        let refused = seen[1].iter().filter(|(s, _)| s == "failed").count();
        assert_eq!(refused > 0, !common.is_empty(), "{context}: {:?}", seen[1]);
    }
}
