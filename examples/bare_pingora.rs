//! The floor under legate's request path: a Pingora proxy with no logic of its own (one
//! fixed upstream, pooled connections, no header edits), run by `benches/load/run.py
//! --bare` next to legate so the cost of legate's hooks and the cost of Pingora itself can
//! be told apart.
//!
//! `cargo run --release --example bare_pingora -- 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM`

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

// legate's allocator and its setting (src/allocator.rs), so that only the hooks differ.
legate::install_allocator!();

struct Bare(String);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.0.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_pingora LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    // One worker on a single-threaded runtime, as legate runs with --concurrency 1.
    // legate's timer setting too (ListenerManager::new): Pingora's timeouts of a second or
    // more on the worker's Tokio timer.
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut service = http_proxy_service(&server.configuration, Bare(upstream));
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
