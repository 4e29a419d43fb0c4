//! Running the gateway: a listener manager that accepts on every configured listener and
//! hands connections to Pingora's HTTP proxy, a control runtime for health checks and
//! DNS, and signal handling (SIGHUP reloads; SIGUSR1 reopens access logs; SIGTERM and SIGINT stop).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;

use crate::io::{ConnectionInfo, Downstream};
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use tokio::sync::watch;

use crate::config::http2_options::H2Settings;
use crate::config::load::Parsed;
use crate::config::{load_bootstrap_file, parse_bootstrap, ConfigErrors};
use crate::proxy::LegateProxy;
use crate::snapshot::{compile_with, Snapshot};
use crate::xds::client::Needs;
use crate::xds::Dynamic;
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;

/// Set once the gateway drains (SIGTERM, SIGINT or POST /drain_listeners): listeners stop
/// accepting, open connections finish their request, /ready answers 503.
pub static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    BuiltIn(&'static str),
}

impl ConfigSource {
    /// The file compiled, with every problem in it reported (not just the first).
    pub fn load(&self) -> Result<Snapshot, ConfigErrors> {
        self.load_with(Arc::new(Dynamic::default()))
    }

    /// Like `load`, with the resources a management server delivered.
    fn load_with(&self, dynamic: Arc<Dynamic>) -> Result<Snapshot, ConfigErrors> {
        self.bootstrap()?.compile(|b| compile_with(b, dynamic))
    }

    pub fn bootstrap(&self) -> Result<Parsed<Bootstrap>, ConfigErrors> {
        match self {
            ConfigSource::File(p) => load_bootstrap_file(p),
            ConfigSource::BuiltIn(text) => parse_bootstrap(text),
        }
    }

    fn describe(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::BuiltIn(_) => "built-in default config".to_string(),
        }
    }
}

type App = HttpProxy<LegateProxy>;

/// One worker's Pingora proxies: one per set of HTTP/2 SETTINGS the connection managers
/// advertise (Pingora takes them per proxy, not per connection), made when first needed.
/// Each has its own upstream pool; configs that set one `http2_protocol_options` on every
/// listener, as control planes do, use one of them.
struct WorkerApps {
    conf: Arc<ServerConf>,
    shared: Arc<ArcSwap<Snapshot>>,
    default: Arc<App>,
    tuned: ArcSwap<Vec<(H2Settings, Arc<App>)>>,
    adding: Mutex<()>,
}

impl WorkerApps {
    fn new(conf: Arc<ServerConf>, shared: Arc<ArcSwap<Snapshot>>) -> Self {
        let default = Arc::new(Self::app(&conf, &shared, H2Settings::default()));
        WorkerApps {
            conf,
            shared,
            default,
            tuned: ArcSwap::from_pointee(Vec::new()),
            adding: Mutex::new(()),
        }
    }

    fn app(conf: &Arc<ServerConf>, shared: &Arc<ArcSwap<Snapshot>>, h2: H2Settings) -> App {
        let mut app = pingora::proxy::http_proxy(conf, LegateProxy::new(shared.clone()));
        // Pingora looks for the h2c preface only where the stream lets it peek (see
        // io.rs).
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2c = true;
        app.server_options = Some(options);
        // Pingora's bounded defaults (the header-list limit), with the SETTINGS Envoy's
        // connection manager advertises.
        let mut o = pingora::protocols::http::v2::server::default_h2_options();
        o.max_concurrent_streams(h2.max_concurrent_streams)
            .initial_window_size(h2.initial_stream_window_size)
            .initial_connection_window_size(h2.initial_connection_window_size);
        app.h2_options = Some(o);
        app
    }

    /// The proxy for connections to a connection manager with these settings.
    fn for_settings(&self, h2: H2Settings) -> Arc<App> {
        if h2 == H2Settings::default() {
            return self.default.clone();
        }
        if let Some((_, app)) = self.tuned.load().iter().find(|(s, _)| *s == h2) {
            return app.clone();
        }
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = Vec::clone(&self.tuned.load());
        if let Some((_, app)) = list.iter().find(|(s, _)| *s == h2) {
            return app.clone();
        }
        let app = Arc::new(Self::app(&self.conf, &self.shared, h2));
        list.push((h2, app.clone()));
        self.tuned.store(Arc::new(list));
        app
    }
}

/// One accepting listener: dropping the stop sender ends the accept loop; the shutdown
/// sender tells its open connections to finish their current request and close.
struct Running {
    address: SocketAddr,
    /// The workers' listening sockets, handed to a new process on SIGQUIT.
    fds: Vec<std::os::fd::RawFd>,
    stop: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
}

/// Starts and stops listeners so that the set of open sockets follows the config.
struct ListenerManager {
    /// One single-threaded runtime per worker thread, as Envoy and Pingora run workers:
    /// a connection stays on the worker that accepted it, with no cross-thread wakeups.
    workers: Vec<tokio::runtime::Handle>,
    /// One proxy per worker, for one upstream connection pool per worker as in Envoy. With
    /// one shared pool a connection released on one worker and reused on another raced
    /// Pingora's idle watcher: the reuse failed ("failed to acquire reusable stream"), the
    /// connection was closed, and each cross-worker reuse woke the other worker's thread.
    apps: Vec<Arc<WorkerApps>>,
    engine: Engine,
    shared: Arc<ArcSwap<Snapshot>>,
    running: Mutex<HashMap<String, Running>>,
}

impl ListenerManager {
    fn new(
        threads: usize,
        shared: Arc<ArcSwap<Snapshot>>,
        engine: Engine,
    ) -> std::io::Result<Self> {
        // Pingora's own timeouts (upstream reads, connects, downstream keep-alive) go to a
        // process-wide timer wheel whose clock thread, once the first one is armed, wakes
        // every 10 ms for the rest of the process's life: 100 wake-ups a second on an idle
        // sidecar, and a lock shared by the workers under load. Timeouts of a second or
        // more (the defaults: 15 s route, 5 s connect, 1 h idle) go to each worker's Tokio
        // timer instead; only sub-second ones still start that thread.
        pingora::time::fast_timeout::set_fast_timeout_to_tokio_threshold(Some(Duration::ZERO));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.spawn(timer_anchor());
            workers.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("legate-worker-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        let conf = Arc::new(ServerConf {
            // Retries are decided by the route's retry policy, not by a fixed cap.
            max_retries: 1_000_000,
            ..ServerConf::default()
        });
        let apps = workers
            .iter()
            .map(|_| Arc::new(WorkerApps::new(conf.clone(), shared.clone())))
            .collect();
        Ok(ListenerManager {
            engine,
            workers,
            apps,
            shared,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Binds new listeners and stops removed ones. Binding happens before anything is
    /// stopped, so a listener that cannot bind rejects the change as a whole.
    fn apply(&self, snapshot: &Snapshot) -> Result<(), String> {
        if DRAINING.load(Ordering::Relaxed) {
            // A draining gateway opens nothing new.
            return Ok(());
        }
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: HashMap<&str, SocketAddr> = snapshot
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.address))
            .collect();
        let mut bound = Vec::new();
        for (name, addr) in &wanted {
            let keep = running.get(*name).is_some_and(|r| r.address == *addr);
            if !keep {
                let moved_from_same_addr = running.values().any(|r| r.address == *addr);
                if moved_from_same_addr {
                    // Renamed on the same address: keep the socket under its new name.
                    continue;
                }
                // One socket per worker on the same address (SO_REUSEPORT): the kernel spreads
                // connections over the workers. Registering a socket needs its worker's
                // context (entered, not block_on, so this also works from another runtime).
                let mut sockets = Vec::new();
                for (i, w) in self.workers.iter().enumerate() {
                    let _enter = w.enter();
                    let l = inherited(*addr, i)
                        .unwrap_or_else(|| bind(*addr))
                        .map_err(|e| format!("listener '{name}' cannot bind {addr}: {e}"))?;
                    sockets.push(l);
                }
                bound.push((name.to_string(), *addr, sockets));
            }
        }
        // Rename entries whose address stayed but name changed.
        let renames: Vec<(String, String)> = running
            .iter()
            .filter(|(n, r)| {
                !wanted.contains_key(n.as_str()) && wanted.values().any(|a| *a == r.address)
            })
            .map(|(n, r)| {
                let new = wanted
                    .iter()
                    .find(|(_, a)| **a == r.address)
                    .map(|(n, _)| n.to_string());
                (n.clone(), new.unwrap_or_default())
            })
            .collect();
        for (old, new) in renames {
            if let Some(r) = running.remove(&old) {
                running.insert(new, r);
            }
        }
        let removed: Vec<String> = running
            .iter()
            .filter(|(n, r)| wanted.get(n.as_str()) != Some(&r.address))
            .map(|(n, _)| n.clone())
            .collect();
        for name in removed {
            if let Some(r) = running.remove(&name) {
                let _ = r.stop.send(true);
                // Open connections finish the request in flight, then close.
                let _ = r.shutdown.send(true);
                log::info!(
                    "listener '{name}' on {} stopped; its connections drain",
                    r.address
                );
            }
        }
        for (name, addr, sockets) in bound {
            let (stop_tx, stop_rx) = watch::channel(false);
            let (shutdown_tx, shutdown_rx) = watch::channel(false);
            let config = snapshot.listeners.iter().find(|l| l.name == name);
            let cx_stats = config.map(|l| l.hcm().stats.clone());
            let scheme = match config {
                Some(l) if l.chains.iter().all(|c| c.tls.is_some()) => "https",
                _ => "http",
            };
            let fds = sockets
                .iter()
                .map(std::os::fd::AsRawFd::as_raw_fd)
                .collect();
            for ((w, apps), listener) in self.workers.iter().zip(&self.apps).zip(sockets) {
                w.spawn(accept_loop(
                    listener,
                    apps.clone(),
                    self.shared.clone(),
                    stop_rx.clone(),
                    shutdown_rx.clone(),
                    cx_stats.clone(),
                    self.engine,
                ));
            }
            println!("legate: listener '{name}' on {scheme}://{addr}");
            running.insert(
                name,
                Running {
                    address: addr,
                    fds,
                    stop: stop_tx,
                    shutdown: shutdown_tx,
                },
            );
        }
        Ok(())
    }
}

impl ListenerManager {
    /// SIGQUIT: hands every listening socket to the new process waiting on `sock`.
    fn send_listeners(&self, sock: &str) -> Result<usize, String> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut fds = pingora::server::Fds::new();
        for r in running.values() {
            for (i, fd) in r.fds.iter().enumerate() {
                fds.add(upgrade_key(r.address, i), *fd);
            }
        }
        // Pingora's transfer carries at most 32 descriptors and 2 KiB of names.
        let (names, raw) = fds.serialize();
        if raw.len() > 32 || names.iter().map(|n| n.len() + 1).sum::<usize>() > 2048 {
            return Err(format!(
                "{} listening sockets (listeners x workers) are more than an upgrade can pass (32)",
                raw.len()
            ));
        }
        fds.send_to_sock(sock)
            .map_err(|e| format!("cannot hand listeners to {sock}: {e}"))
    }

    /// Stops every listener; open connections finish the request in flight and close.
    fn drain_all(&self) {
        DRAINING.store(true, Ordering::Relaxed);
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (name, r) in running.drain() {
            let _ = r.stop.send(true);
            let _ = r.shutdown.send(true);
            log::info!("listener '{name}' on {} draining", r.address);
        }
    }
}

/// Listening sockets received from the previous process (`--upgrade`), by "addr#worker",
/// and the names of those a listener has taken.
type Inherited = (pingora::server::Fds, std::collections::HashSet<String>);
static INHERITED: Mutex<Option<Inherited>> = Mutex::new(None);

fn upgrade_key(addr: SocketAddr, worker: usize) -> String {
    format!("{addr}#{worker}")
}

/// Takes the previous process's socket for this address and worker, if it sent one.
fn inherited(addr: SocketAddr, worker: usize) -> Option<std::io::Result<tokio::net::TcpListener>> {
    use std::os::fd::FromRawFd;
    let mut guard = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    let (fds, claimed) = guard.as_mut()?;
    let key = upgrade_key(addr, worker);
    let fd = *fds.get(&key)?;
    if !claimed.insert(key) {
        return None;
    }
    // SAFETY: the fd came over SCM_RIGHTS for this process alone and is claimed once.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    log::info!("listener on {addr} (worker {worker}): socket taken over from the previous process");
    Some(
        std.set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std)),
    )
}

/// `--upgrade`: waits on `sock` for the running legate's listening sockets (sent when it
/// gets SIGQUIT), as Pingora's graceful upgrade does.
pub fn receive_listeners(sock: &str) -> Result<(), String> {
    // Pingora's receiver panics on a path it cannot bind; check what can be checked first.
    let parent = std::path::Path::new(sock)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if sock.len() >= 108 || !parent.is_dir() {
        return Err(format!(
            "--upgrade-sock {sock}: needs an existing directory and under 108 bytes"
        ));
    }
    let mut fds = pingora::server::Fds::new();
    fds.get_from_sock(sock)
        .map_err(|e| format!("no listening sockets received on {sock}: {e}"))?;
    *INHERITED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fds, Default::default()));
    Ok(())
}

/// Closes inherited sockets no listener claimed: an unclaimed SO_REUSEPORT socket would
/// still get connections and never accept them.
fn close_unclaimed_inherited() {
    let mut guard = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((mut fds, claimed)) = guard.take() {
        for addr in fds.close_unclaimed(&claimed) {
            log::info!("inherited socket {addr} not in the config; closed");
        }
    }
}

pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    apps: Arc<WorkerApps>,
    shared: Arc<ArcSwap<Snapshot>>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    cx_stats: Option<Arc<crate::stats::HttpStats>>,
    engine: Engine,
) {
    let local = listener.local_addr().ok();
    // Connections accepted since the socket last had none pending.
    let mut in_turn = 0u32;
    loop {
        let next = std::future::poll_fn(|cx| {
            let polled = listener.poll_accept(cx);
            if polled.is_pending() {
                in_turn = 0;
            }
            polled
        });
        tokio::select! {
            accepted = next => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        log::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let apps = apps.clone();
                let shutdown = shutdown.clone();
                let active = cx_stats.clone().map(ActiveConnection::new);
                let snapshot = shared.load_full();
                let config = local.and_then(|a| snapshot.listener_at(a));
                let per_wakeup = config.and_then(|l| l.accepts_per_wakeup);
                let counted = snapshot
                    .global_max_connections
                    .filter(|_| !config.is_some_and(|l| l.outside_global_limit));
                let global = match counted.map(GlobalConnection::try_new) {
                    Some(None) => {
                        // Over the overload manager's limit: closed at once, as Envoy does.
                        drop(tcp);
                        continue;
                    }
                    Some(Some(g)) => Some(g),
                    None => None,
                };
                let native = (engine == Engine::Native).then(|| shared.clone());
                tokio::spawn(async move {
                    serve_connection(tcp, peer, apps, shutdown, snapshot, native).await;
                    drop(active);
                    drop(global);
                });
                in_turn += 1;
                if per_wakeup.is_some_and(|max| in_turn >= max) {
                    // Envoy's max_connections_to_accept_per_socket_event: the rest wait
                    // for a later turn of the worker, after the connections it has.
                    in_turn = 0;
                    tokio::task::yield_now().await;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Open downstream connections that count against the overload manager's global limit.
static GLOBAL_CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One of them, given back when the connection ends.
struct GlobalConnection;

impl GlobalConnection {
    /// None when `max` are open already.
    fn try_new(max: u64) -> Option<Self> {
        GLOBAL_CONNECTIONS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| GlobalConnection)
    }
}

impl Drop for GlobalConnection {
    fn drop(&mut self) {
        GLOBAL_CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts an open downstream connection in `http.<prefix>.downstream_cx_active`.
struct ActiveConnection(Arc<crate::stats::HttpStats>);

impl ActiveConnection {
    fn new(stats: Arc<crate::stats::HttpStats>) -> Self {
        stats.downstream_cx_active.fetch_add(1, Ordering::Relaxed);
        ActiveConnection(stats)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.downstream_cx_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a timer due within the next second on a worker runtime. Tokio wakes its driver
/// through an eventfd write whenever a newly armed timer is due before every other one;
/// without an earlier timer, each request's idle and upstream timeouts (seconds to an hour
/// away) would cost that syscall and an extra epoll wakeup (two per request measured with
/// strace). One wakeup a second is the price.
async fn timer_anchor() {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The shutdown signal one connection's Pingora session watches: the process's, or the
/// connection reaching `max_age`, or a request hook draining it (`ConnectionInfo::drain`).
fn connection_shutdown(
    drain: Arc<watch::Sender<bool>>,
    mut global: watch::Receiver<bool>,
    max_age: Option<Duration>,
    idle: Option<(Duration, Arc<pingora::protocols::raw_connect::ProxyDigest>)>,
) -> watch::Receiver<bool> {
    let signal = drain.subscribe();
    tokio::spawn(async move {
        let aged = async {
            match max_age {
                Some(age) => tokio::time::sleep(age).await,
                None => std::future::pending().await,
            }
        };
        let idled = async {
            match &idle {
                Some((timeout, digest)) => http2_idle(*timeout, digest).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = global.wait_for(|down| *down) => {}
            _ = aged => {}
            _ = idled => {}
            // The connection is gone (its receiver dropped) or a hook drained it.
            _ = drain.closed() => return,
        }
        drain.send_replace(true);
    });
    signal
}

/// Resolves once an HTTP/2 connection has had no stream for `timeout` (Envoy's
/// `idle_timeout`; checked at the end of each quiet period, so a connection busy at that
/// moment is looked at again one period later). Never resolves on HTTP/1 connections.
async fn http2_idle(timeout: Duration, digest: &pingora::protocols::raw_connect::ProxyDigest) {
    let Some(info) = crate::io::info_of(digest) else {
        return std::future::pending().await;
    };
    let mut since = info.idle_since_ms.load(Ordering::Relaxed);
    let mut deadline = info.accepted + timeout;
    loop {
        tokio::time::sleep_until(deadline.into()).await;
        if !info.http2.load(Ordering::Relaxed) {
            // Decided before the first request; HTTP/1 keep-alive has its own timeout.
            return std::future::pending().await;
        }
        let now = info.idle_since_ms.load(Ordering::Relaxed);
        if info.streams.load(Ordering::Relaxed) == 0 && now == since {
            return;
        }
        if info.streams.load(Ordering::Relaxed) == 0 {
            deadline = info.accepted + Duration::from_millis(now) + timeout;
        } else {
            deadline = std::time::Instant::now() + timeout;
        }
        since = now;
    }
}

/// Serves one downstream connection through Pingora's proxy, request after request.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    apps: Arc<WorkerApps>,
    shutdown: watch::Receiver<bool>,
    snapshot: Arc<Snapshot>,
    native: Option<Arc<ArcSwap<Snapshot>>>,
) {
    use std::os::unix::io::AsRawFd;
    let local = tcp.local_addr().ok();
    let mut snapshot = snapshot;
    let mut tcp = tcp;
    // Bytes legate's HTTP/1 engine read before handing the connection to Pingora.
    let mut replay = None;
    // The connection_limit slot, when the native engine took it first.
    let mut native_slot = None;
    if let (Some(shared), Some(local)) = (&native, local) {
        let serves = snapshot
            .listener_at(local)
            .filter(|l| crate::proxy::native_serves(l));
        if let Some(l) = serves {
            native_slot = match connection_slot(l, 0) {
                Ok(slot) => Some(slot),
                Err(()) => return,
            };
            drop(snapshot);
            let handed = crate::proxy::serve_native(
                tcp,
                None,
                local,
                peer,
                shared.clone(),
                shutdown.clone(),
            );
            let Some((stream, unread)) = handed.await else {
                return;
            };
            tcp = stream;
            replay = Some(unread);
            snapshot = shared.load_full();
        }
    }
    let fd = tcp.as_raw_fd();
    let mut l4: L4Stream = tcp.into();
    if let Some(unread) = replay {
        l4.rewind(&unread);
    }
    let digest = SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(peer.into()));
    l4.set_socket_digest(digest);
    let listener = local.and_then(|a| snapshot.listener_at(a));
    // Age, request-count and (on connections that may speak HTTP/2) idle limits drain a
    // connection through Pingora's shutdown signal, which is how it sends HTTP/2 GOAWAY;
    // connections without them share the global one.
    let drain = listener
        .filter(|l| {
            l.chains
                .iter()
                .any(|c| ConnectionInfo::drains(&c.hcm, c.tls.is_some()))
        })
        .map(|_| Arc::new(watch::channel(false).0));
    let (stream, chain): (pingora::protocols::Stream, usize) = match listener {
        Some(l) if l.inspect => {
            match accept_inspected(l4, l, drain.clone(), native.is_some()).await {
                Some(Accepted::Pingora(s, chain)) => (s, chain),
                Some(Accepted::Native(accepted, chain)) => {
                    let (tls, info) = *accepted;
                    let (Some(shared), Some(local)) = (native, local) else {
                        return;
                    };
                    let Ok(_slot) = connection_slot(l, chain) else {
                        return;
                    };
                    let buffer_limit = l.buffer_limit;
                    let app = apps.for_settings(l.chains[chain].hcm.h2_settings);
                    // Nothing below needs the listener's config again: chains the engine
                    // serves have no age limit, and an HTTP/1.1 connection no HTTP/2 idle drain.
                    drop(snapshot);
                    let handed = crate::proxy::serve_native(
                        tls,
                        Some(&info),
                        local,
                        peer,
                        shared,
                        shutdown.clone(),
                    );
                    let Some((tls, unread)) = handed.await else {
                        return;
                    };
                    let replayed = crate::io::Replayed::new(tls, unread);
                    let stream: pingora::protocols::Stream =
                        Box::new(Downstream::new(replayed, Some(info), false, buffer_limit));
                    serve_with_pingora(&app, stream, &shutdown).await;
                    return;
                }
                None => return,
            }
        }
        Some(l) => {
            // Connection limits need per-connection state; other connections carry none.
            let hcm = l.hcm();
            let info = ConnectionInfo::needed(hcm)
                .then(|| ConnectionInfo::new(0, None, hcm, drain.clone()));
            (
                Box::new(Downstream::new(l4, info, l.hcm().h2c, l.buffer_limit)),
                0,
            )
        }
        None => (
            Box::new(Downstream::new(
                l4,
                None,
                false,
                crate::listener::DEFAULT_BUFFER_LIMIT,
            )),
            0,
        ),
    };
    let hcm = listener.and_then(|l| l.chains.get(chain)).map(|c| &c.hcm);
    let max_age = hcm.and_then(|h| h.limits.max_connection_duration);
    let idle =
        hcm.and_then(|h| h.idle_timeout)
            .zip(pingora::protocols::GetProxyDigest::get_proxy_digest(
                &*stream,
            ));
    let shutdown = match drain {
        Some(drain) => connection_shutdown(drain, shutdown, max_age, idle),
        None => shutdown,
    };
    let _slot = match native_slot {
        Some(slot) => slot,
        None => match listener.map_or(Ok(None), |l| connection_slot(l, chain)) {
            Ok(slot) => slot,
            Err(()) => return,
        },
    };
    let app = apps.for_settings(hcm.map_or(H2Settings::default(), |h| h.h2_settings));
    drop(snapshot);
    serve_with_pingora(&app, stream, &shutdown).await;
}

/// Serves a connection through Pingora's proxy, request after request.
async fn serve_with_pingora(
    app: &Arc<App>,
    stream: pingora::protocols::Stream,
    shutdown: &watch::Receiver<bool>,
) {
    let mut next = app.process_new(stream, shutdown).await;
    while let Some(s) = next {
        if *shutdown.borrow() {
            return;
        }
        next = app.process_new(s, shutdown).await;
    }
}

/// What the TLS inspector and filter-chain match made of a connection.
enum Accepted {
    /// For Pingora's proxy, on this filter chain.
    Pingora(pingora::protocols::Stream, usize),
    /// TLS speaking HTTP/1.1 on a chain legate's own engine serves (boxed: the TLS state
    /// is large, and this is once per connection).
    Native(
        Box<(tokio_rustls::server::TlsStream<L4Stream>, ConnectionInfo)>,
        usize,
    ),
}

/// Envoy's connection_limit filter: over the limit (Err), the connection is closed at once.
fn connection_slot(
    listener: &crate::listener::Listener,
    chain: usize,
) -> Result<Option<crate::listener::ConnectionSlot>, ()> {
    match listener
        .chains
        .get(chain)
        .and_then(|c| c.connection_limit.as_ref())
    {
        Some(limit) => limit.acquire().map(Some).ok_or(()),
        None => Ok(None),
    }
}

/// What Envoy's TLS inspector and filter-chain match do: tell TLS from plaintext by the
/// first byte, read the ClientHello's SNI, pick the filter chain, then finish the TLS
/// handshake with that chain's context. None closes the connection (no chain matched, the
/// client went away, or the handshake failed or timed out).
async fn accept_inspected(
    mut l4: L4Stream,
    listener: &crate::listener::Listener,
    drain: Option<Arc<watch::Sender<bool>>>,
    native: bool,
) -> Option<Accepted> {
    use crate::io::TlsInfo;
    use crate::listener::Transport;
    use pingora::protocols::Peek;
    let within = |limit: Option<Duration>| limit.unwrap_or(Duration::from_secs(u64::MAX >> 2));
    let mut first = [0u8; 1];
    // A TLS connection opens with a handshake record (content type 22).
    let peeked = tokio::time::timeout(within(listener.inspect_timeout), l4.try_peek(&mut first));
    let is_tls = match peeked.await {
        Ok(Ok(_)) => first[0] == 0x16,
        Ok(Err(_)) => return None,
        Err(_) => {
            log::debug!(
                "listener '{}': no data within listener_filters_timeout",
                listener.name
            );
            return None;
        }
    };
    if !is_tls {
        let Some(chain) = listener.select_chain(Transport::RawBuffer, None) else {
            log::debug!(
                "listener '{}': no filter chain matches a plaintext connection",
                listener.name
            );
            return None;
        };
        if listener.chains[chain].tls.is_some() {
            log::debug!(
                "listener '{}': plaintext connection to a TLS filter chain",
                listener.name
            );
            return None;
        }
        let h2c = listener.chains[chain].hcm.h2c;
        let info = ConnectionInfo::new(chain, None, &listener.chains[chain].hcm, drain);
        return Some(Accepted::Pingora(
            Box::new(Downstream::new(l4, Some(info), h2c, listener.buffer_limit)),
            chain,
        ));
    }
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), l4);
    let start = match tokio::time::timeout(within(listener.inspect_timeout), acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            log::debug!("listener '{}': bad TLS ClientHello: {e}", listener.name);
            return None;
        }
        Err(_) => return None,
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let Some(chain) = listener.select_chain(Transport::Tls, sni.as_deref()) else {
        log::debug!(
            "listener '{}': no filter chain for server name {sni:?}",
            listener.name
        );
        return None;
    };
    let c = &listener.chains[chain];
    let Some(tls) = &c.tls else {
        log::debug!(
            "listener '{}': TLS connection to a plaintext filter chain",
            listener.name
        );
        return None;
    };
    let handshake = start.into_stream(tls.config.clone());
    let stream = match tokio::time::timeout(within(c.handshake_timeout), handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            log::debug!("listener '{}': TLS handshake failed: {e}", listener.name);
            return None;
        }
        Err(_) => return None,
    };
    let conn = stream.get_ref().1;
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "",
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("");
    let info = ConnectionInfo::new(
        chain,
        Some(TlsInfo {
            sni,
            version,
            cipher,
            peer_certificate: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
        }),
        &c.hcm,
        drain,
    );
    let h2 = matches!(
        crate::io::Transport::alpn(&stream),
        Some(pingora::protocols::ALPN::H2)
    );
    if native && !h2 && crate::proxy::native_serves_chain(c) {
        return Some(Accepted::Native(Box::new((stream, info)), chain));
    }
    Some(Accepted::Pingora(
        Box::new(Downstream::new(
            stream,
            Some(info),
            false,
            listener.buffer_limit,
        )),
        chain,
    ))
}

/// Envoy's `cluster_manager.cluster_added|modified|removed` and the `listener_manager`
/// equivalents: by name, modified meaning the source resource changed.
fn count_changes(old: Option<&Snapshot>, new: &Snapshot) {
    fn count<T: PartialEq>(
        old: &HashMap<&str, &T>,
        new: &HashMap<&str, &T>,
        [added, modified, removed]: [&std::sync::atomic::AtomicU64; 3],
    ) {
        for (name, now) in new {
            match old.get(name) {
                None => added.fetch_add(1, Ordering::Relaxed),
                Some(before) if before != now => modified.fetch_add(1, Ordering::Relaxed),
                Some(_) => 0,
            };
        }
        let gone = old.keys().filter(|n| !new.contains_key(*n)).count();
        removed.fetch_add(gone as u64, Ordering::Relaxed);
    }
    let s = crate::stats::server();
    let empty = (HashMap::new(), HashMap::new());
    let (old_c, old_l) = old.map_or(empty, |o| (o.cluster_sources(), o.listener_sources()));
    count(
        &old_c,
        &new.cluster_sources(),
        [&s.cluster_added, &s.cluster_modified, &s.cluster_removed],
    );
    count(
        &old_l,
        &new.listener_sources(),
        [&s.listener_added, &s.listener_modified, &s.listener_removed],
    );
}

/// The running gateway: what serves now, and how a new configuration is put in place.
struct Gateway {
    source: ConfigSource,
    shared: Arc<ArcSwap<Snapshot>>,
    control: tokio::runtime::Handle,
    manager: ListenerManager,
}

impl Gateway {
    /// Puts a compiled snapshot in place: cluster state carried over, background tasks
    /// started, listeners added or removed. A listener that cannot bind rolls it back.
    fn publish(&self, new: Snapshot) -> Result<(), String> {
        let old = self.shared.load_full();
        for (name, c) in &new.clusters {
            if let Some(prev) = old.clusters.get(name) {
                c.adopt_state(prev);
            }
            c.start_background(&self.control);
        }
        let new = Arc::new(new);
        // Swap first, so a new listener's first request already sees its routes.
        self.shared.store(new.clone());
        if let Err(e) = self.manager.apply(&new) {
            self.shared.store(old);
            return Err(e);
        }
        count_changes(Some(&old), &new);
        drop((old, new));
        crate::allocator::return_freed_memory();
        Ok(())
    }

    /// SIGHUP: the file again, with the resources xDS delivered so far.
    fn reload(&self) {
        let reject = |reason: String| {
            let n = crate::stats::server()
                .config_reload_rejected
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            log::error!(
                "reload of {} rejected ({n} so far), keeping the last good config: {reason}",
                self.source.describe()
            );
        };
        let old = self.shared.load_full();
        let new = match self.source.load_with(old.dynamic.clone()) {
            Ok(n) => n,
            Err(e) => return reject(e.to_string().replace('\n', "; ")),
        };
        if new.xds != old.xds {
            log::warn!("dynamic_resources changed; the xDS client keeps its stream until restart");
        }
        match self.publish(new) {
            Ok(()) => {
                crate::stats::server()
                    .config_reload_success
                    .fetch_add(1, Ordering::Relaxed);
                log::info!("reloaded {}", self.source.describe());
            }
            Err(e) => reject(e),
        }
    }

    /// xDS: a candidate set of dynamic resources, compiled with the current bootstrap.
    fn apply_dynamic(&self, dynamic: Dynamic) -> Result<Needs, String> {
        let current = self.shared.load_full();
        let new = compile_with(current.bootstrap.clone(), Arc::new(dynamic))
            .map_err(|e| e.to_string().replace('\n', "; "))?;
        let needs = needs(&new);
        self.publish(new)?;
        Ok(needs)
    }
}

/// The EDS and RDS names a snapshot's clusters and listeners wait for.
fn needs(s: &Snapshot) -> Needs {
    Needs {
        eds: s
            .clusters
            .values()
            .filter_map(|c| c.eds_service.clone())
            .collect(),
        rds: s.rds_names.clone(),
        sds: s.sds_names.clone(),
        rds_timeouts: s.rds_timeouts.clone(),
    }
}

/// Runs the gateway until SIGTERM or SIGINT. Never returns on success.
/// Stops accepting, lets open connections finish (up to `drain_time`), and exits 0.
fn drain_and_exit(gateway: &Gateway, drain_time: Duration) -> ! {
    gateway.manager.drain_all();
    let deadline = std::time::Instant::now() + drain_time;
    while crate::stats::active_connections() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::process::exit(0);
}

/// How the process starts and hands over: `--upgrade` and `--upgrade-sock`.
pub struct Lifecycle {
    pub drain_time: Duration,
    /// Which HTTP engine serves plaintext HTTP/1 listeners.
    pub engine: Engine,
    /// Take the listening sockets from the running process instead of binding.
    pub upgrade: bool,
    /// Where the sockets are passed (SIGQUIT in the old process sends them there).
    pub upgrade_sock: String,
}

/// The HTTP engine for plaintext HTTP/1 connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// Pingora's proxy for every connection.
    Pingora,
    /// legate's own HTTP/1.1 engine where it covers the listener and the request
    /// (`proxy::native`); Pingora for the rest.
    #[default]
    Native,
}

pub fn run(source: ConfigSource, threads: usize, life: Lifecycle) -> Result<(), ConfigErrors> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
    let drain_time = life.drain_time;
    // The default action of SIGHUP ends the process; take it over before anything else.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1, SIGQUIT])
            .map_err(|e| ConfigErrors::one("", format!("cannot install signal handlers: {e}")))?;

    let snapshot = source.load()?;
    let control = control_runtime()
        .map_err(|e| ConfigErrors::one("", format!("cannot start the control runtime: {e}")))?;
    for c in snapshot.clusters.values() {
        c.start_background(&control);
    }
    wait_for_initial_health_checks(&snapshot);
    count_changes(None, &snapshot);
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let manager = ListenerManager::new(threads, shared.clone(), life.engine)
        .map_err(|e| ConfigErrors::one("", format!("cannot start workers: {e}")))?;
    if life.upgrade {
        println!(
            "legate: waiting on {} for the running process's listeners (send it SIGQUIT)",
            life.upgrade_sock
        );
        receive_listeners(&life.upgrade_sock).map_err(|e| ConfigErrors::one("", e))?;
    }
    manager
        .apply(&shared.load())
        .map_err(|e| ConfigErrors::one("", e))?;
    close_unclaimed_inherited();
    println!("legate: config from {}", source.describe());
    let gateway = Arc::new(Gateway {
        source,
        shared: shared.clone(),
        control: control.clone(),
        manager,
    });
    if let Some(addr) = shared.load().admin_address {
        let drainer = Arc::downgrade(&gateway);
        let state = Arc::new(crate::admin::AdminState {
            snapshot: shared.clone(),
            started: std::time::Instant::now(),
            ready: std::sync::atomic::AtomicBool::new(true),
            command_line: std::env::args().collect(),
            drain: Box::new(move || {
                if let Some(g) = drainer.upgrade() {
                    g.manager.drain_all();
                }
            }),
        });
        crate::admin::start(&control, addr, state)
            .map_err(|e| ConfigErrors::one("admin.address", format!("cannot bind {addr}: {e}")))?;
    }
    start_xds(&gateway);
    crate::allocator::return_freed_memory();

    for sig in signals.forever() {
        match sig {
            SIGHUP => gateway.reload(),
            // Envoy reopens its access log files on SIGUSR1, after logrotate moves them.
            SIGUSR1 => crate::access_log::reopen(),
            // Pingora's graceful upgrade: the new process (started with --upgrade) gets the
            // listening sockets, so no connection is refused; this one then drains.
            SIGQUIT => match gateway.manager.send_listeners(&life.upgrade_sock) {
                Ok(_) => {
                    log::info!("listeners handed to the new process; draining");
                    drain_and_exit(&gateway, drain_time);
                }
                Err(e) => log::error!("SIGQUIT: {e}; still serving"),
            },
            _ => {
                log::info!("signal {sig}: draining for up to {drain_time:?}, then stopping");
                drain_and_exit(&gateway, drain_time);
            }
        }
    }
    Ok(())
}

/// Starts the ADS client when the bootstrap has `dynamic_resources`. The static part of
/// the config serves at once; dynamic clusters join as they arrive.
fn start_xds(gateway: &Arc<Gateway>) {
    let snapshot = gateway.shared.load_full();
    let Some(config) = snapshot.xds.clone() else {
        return;
    };
    let node = snapshot.bootstrap.node.clone();
    let shared = gateway.shared.clone();
    let ads_cluster = config.ads_cluster.clone();
    let target: crate::xds::client::Target = Arc::new(move || {
        let s = shared.load();
        s.cluster(&ads_cluster)
            .and_then(|c| c.pick(None))
            .map(|h| h.address)
    });
    // The client runs on the control runtime and publishes from there; it holds the
    // gateway weakly so that nothing keeps it alive but the main loop.
    let weak = Arc::downgrade(gateway);
    let apply: crate::xds::client::Apply = Arc::new(move |dynamic| match weak.upgrade() {
        Some(g) => g.apply_dynamic(dynamic),
        None => Err("shutting down".to_string()),
    });
    println!("legate: xDS over ADS via cluster '{}'", config.ads_cluster);
    crate::xds::client::spawn(
        &gateway.control,
        config,
        node,
        target,
        apply,
        (*snapshot.dynamic).clone(),
        needs(&snapshot),
    );
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
        .map(|d| std::time::Instant::now() + d + Duration::from_millis(500));
    let Some(deadline) = deadline else { return };
    let done = || {
        snapshot
            .clusters
            .values()
            .filter(|c| c.health_check.is_some())
            .all(|c| {
                c.members()
                    .iter()
                    .all(|h| h.hc_checked.load(Ordering::Relaxed))
            })
    };
    while !done() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
