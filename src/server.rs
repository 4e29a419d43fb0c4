//! Running the gateway: one Pingora proxy service listening on every listener's address,
//! and a SIGHUP handler that reloads the configuration file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;

use crate::config::{load_bootstrap_file, parse_bootstrap, ConfigErrors};
use crate::proxy::LegateProxy;
use crate::snapshot::{compile, Snapshot};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    BuiltIn(&'static str),
}

impl ConfigSource {
    pub fn load(&self) -> Result<Snapshot, ConfigErrors> {
        let bootstrap = match self {
            ConfigSource::File(p) => load_bootstrap_file(p)?,
            ConfigSource::BuiltIn(text) => parse_bootstrap(text)?,
        };
        compile(bootstrap)
    }

    fn describe(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::BuiltIn(_) => "built-in default config".to_string(),
        }
    }
}

/// Maps a connection's local address to the listener that owns it.
#[derive(Debug, Default)]
pub struct ListenerMap {
    exact: HashMap<SocketAddr, String>,
    /// Wildcard binds (0.0.0.0, ::) by port.
    by_port: HashMap<u16, String>,
}

impl ListenerMap {
    pub fn new(snapshot: &Snapshot) -> Self {
        let mut map = ListenerMap::default();
        for l in &snapshot.listeners {
            if l.address.ip().is_unspecified() {
                map.by_port.insert(l.address.port(), l.name.clone());
            } else {
                map.exact.insert(l.address, l.name.clone());
            }
        }
        map
    }

    pub fn listener_for(&self, local: Option<SocketAddr>) -> Option<&str> {
        let local = local?;
        self.exact
            .get(&local)
            .or_else(|| self.by_port.get(&local.port()))
            .map(String::as_str)
    }
}

/// Runs the gateway until the process is told to stop. Never returns.
pub fn run(source: ConfigSource, threads: usize) -> Result<(), ConfigErrors> {
    // Pingora has no SIGHUP handler and the default action ends the process; register ours
    // before anything else can receive the signal.
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .map_err(|e| ConfigErrors::one("", format!("cannot install the SIGHUP handler: {e}")))?;

    let snapshot = source.load()?;
    let control = control_runtime()
        .map_err(|e| ConfigErrors::one("", format!("cannot start the control runtime: {e}")))?;
    for c in snapshot.clusters.values() {
        c.start_background(&control);
    }
    wait_for_initial_health_checks(&snapshot);
    let listeners = Arc::new(ListenerMap::new(&snapshot));
    let addresses: Vec<(String, SocketAddr)> = snapshot
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.address))
        .collect();
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));

    {
        let shared = shared.clone();
        let source = source.clone();
        let control = control.clone();
        std::thread::Builder::new()
            .name("sighup".into())
            .spawn(move || {
                for _ in signals.forever() {
                    reload(&source, &shared, &control);
                }
            })
            .map_err(|e| ConfigErrors::one("", format!("cannot start the reload thread: {e}")))?;
    }

    let conf = ServerConf {
        threads: threads.max(1),
        pid_file: format!("/tmp/legate-{}.pid", std::process::id()),
        upgrade_sock: format!("/tmp/legate-{}-upgrade.sock", std::process::id()),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let proxy = LegateProxy::new(listeners, shared);
    let mut service =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, proxy, "legate");
    for (name, addr) in &addresses {
        service.add_tcp(&addr.to_string());
        println!("legate: listener '{name}' on http://{addr}");
    }
    println!("legate: config from {}", source.describe());
    server.add_service(service);
    server.run_forever();
}

/// A small runtime, separate from the proxy's workers, for health checks, outlier
/// detection and DNS refresh.
fn control_runtime() -> std::io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("legate-control")
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("legate-control".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// Envoy does not serve until health-checked clusters finished their first round (cluster
/// warming); wait the same way, bounded by each cluster's check timeout.
fn wait_for_initial_health_checks(snapshot: &Snapshot) {
    let deadline = snapshot
        .clusters
        .values()
        .filter_map(|c| {
            c.health_check
                .as_ref()
                .map(|h| h.timeout + h.initial_jitter)
        })
        .max()
        .map(|d| std::time::Instant::now() + d + std::time::Duration::from_millis(500));
    let Some(deadline) = deadline else { return };
    let done = || {
        snapshot
            .clusters
            .values()
            .filter(|c| c.health_check.is_some())
            .all(|c| {
                c.members()
                    .iter()
                    .all(|h| h.hc_checked.load(std::sync::atomic::Ordering::Relaxed))
            })
    };
    while !done() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn reload(source: &ConfigSource, shared: &ArcSwap<Snapshot>, control: &tokio::runtime::Handle) {
    match source.load() {
        Ok(new) => {
            let old = shared.load();
            let same_listeners = old.listeners.len() == new.listeners.len()
                && old
                    .listeners
                    .iter()
                    .zip(&new.listeners)
                    .all(|(a, b)| a.name == b.name && a.address == b.address);
            if !same_listeners {
                log::warn!(
                    "reload of {}: listeners were added, removed or moved; that needs a restart for now, routes and clusters are applied",
                    source.describe()
                );
            }
            for (name, c) in &new.clusters {
                if let Some(prev) = old.clusters.get(name) {
                    c.adopt_state(prev);
                }
                c.start_background(control);
            }
            shared.store(Arc::new(new));
            log::info!("reloaded {}", source.describe());
        }
        Err(e) => {
            log::error!(
                "reload of {} rejected, keeping the last good config: {}",
                source.describe(),
                e.to_string().replace('\n', "; ")
            );
        }
    }
}
