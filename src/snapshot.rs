//! `compile`: Envoy v3 protos in, an immutable routing snapshot out. A request loads the
//! current snapshot once and keeps it to the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::bootstrap::v3::{bootstrap::StaticResources, Admin, Bootstrap};

use crate::cluster::{socket_address, Cluster};
use crate::config::error::{index, join, ConfigErrors, Errors};
use crate::listener::{Listener, Rds};
use crate::reject_set;
use crate::xds::{Dynamic, XdsConfig};
use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

#[derive(Debug)]
pub struct Snapshot {
    pub listeners: Vec<Arc<Listener>>,
    listener_index: HashMap<String, usize>,
    pub clusters: foldhash::HashMap<String, Arc<Cluster>>,
    pub admin_address: Option<SocketAddr>,
    /// `admin.access_log`: a line per admin request.
    pub admin_access_logs: Arc<[crate::access_log::Logger]>,
    /// The overload manager's `global_downstream_max_connections` monitor.
    pub global_max_connections: Option<u64>,
    pub bootstrap: Bootstrap,
    /// The management server, when the bootstrap has `dynamic_resources`.
    pub xds: Option<XdsConfig>,
    /// Resources delivered over xDS and accepted.
    pub dynamic: Arc<Dynamic>,
    /// Route configurations the listeners take from RDS.
    pub rds_names: Vec<String>,
    /// SDS secrets the listeners name (to subscribe to).
    pub sds_names: Vec<String>,
    /// Their `initial_fetch_timeout`s.
    pub rds_timeouts: HashMap<String, Option<std::time::Duration>>,
    /// Listeners waiting for their RDS routes (not serving yet).
    pub warming: Vec<String>,
}

impl Snapshot {
    /// Each cluster's source proto by name: static ones, then those from CDS.
    pub fn cluster_sources(&self) -> HashMap<&str, &ClusterProto> {
        let statics = self
            .bootstrap
            .static_resources
            .iter()
            .flat_map(|s| &s.clusters);
        statics
            .chain(self.dynamic.clusters.values())
            .map(|c| (c.name.as_str(), c))
            .collect()
    }

    /// Each listener's source proto by name: static ones, then those from LDS.
    pub fn listener_sources(&self) -> HashMap<&str, &ListenerProto> {
        let statics = self
            .bootstrap
            .static_resources
            .iter()
            .flat_map(|s| &s.listeners);
        statics
            .chain(self.dynamic.listeners.values())
            .map(|l| (l.name.as_str(), l))
            .collect()
    }

    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listener_index
            .get(name)
            .and_then(|i| self.listeners.get(*i))
    }

    /// The listener that owns a connection's local address: an exact bind, or a wildcard
    /// bind (0.0.0.0, ::) on the same port.
    pub fn listener_at(&self, local: SocketAddr) -> Option<&Arc<Listener>> {
        self.listeners
            .iter()
            .find(|l| l.address == local)
            .or_else(|| {
                self.listeners
                    .iter()
                    .find(|l| l.address.ip().is_unspecified() && l.address.port() == local.port())
            })
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }
}

const GLOBAL_CONNECTIONS_MONITOR: &str =
    "envoy.resource_monitors.global_downstream_max_connections";
const DOWNSTREAM_CONNECTIONS_TYPE: &str =
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// `overload_manager`: the global limit on open downstream connections (the one monitor
/// legate has). Its `refresh_interval` paces monitors that are sampled; this one is counted
/// as connections open and close, in Envoy too.
fn convert_overload_manager(
    o: &envoy_types::pb::envoy::config::overload::v3::OverloadManager,
    at: &str,
    errs: &mut Errors,
) -> Option<u64> {
    use envoy_types::pb::envoy::config::overload::v3::{resource_monitor, OverloadManager};
    use envoy_types::pb::envoy::extensions::resource_monitors::downstream_connections::v3::DownstreamConnectionsConfig;
    let OverloadManager {
        refresh_interval,
        resource_monitors,
        actions,
        loadshed_points,
        buffer_factory_config,
    } = o;
    reject_set!(errs, at, actions, loadshed_points, buffer_factory_config);
    crate::config::duration::check(refresh_interval, &join(at, "refresh_interval"), errs);
    let mut max = None;
    for (i, m) in resource_monitors.iter().enumerate() {
        let mat = index(&join(at, "resource_monitors"), i);
        let Some(resource_monitor::ConfigType::TypedConfig(any)) = &m.config_type else {
            errs.add(join(&mat, "typed_config"), "required");
            continue;
        };
        let type_name = crate::config::load::type_name(any);
        if m.name != GLOBAL_CONNECTIONS_MONITOR || type_name != DOWNSTREAM_CONNECTIONS_TYPE {
            errs.unsupported_extension(
                &mat,
                &type_name,
                format!(
                    "resource monitor '{}' ({type_name}) is not supported (only {GLOBAL_CONNECTIONS_MONITOR})",
                    m.name
                ),
            );
            continue;
        }
        let Some(c) = crate::config::load::unpack_or_report::<DownstreamConnectionsConfig>(
            any,
            DOWNSTREAM_CONNECTIONS_TYPE,
            &mat,
            errs,
        ) else {
            continue;
        };
        match u64::try_from(c.max_active_downstream_connections) {
            Ok(n) if n > 0 => max = Some(n),
            _ => errs.add(
                join(&mat, "typed_config.max_active_downstream_connections"),
                "must be greater than 0",
            ),
        }
    }
    max
}

/// `cluster_manager`: the local cluster's name (checked against the static clusters
/// below). Envoy uses it for zone-aware balancing, which legate refuses, so it has no other
/// effect in either.
fn convert_cluster_manager(
    c: &envoy_types::pb::envoy::config::bootstrap::v3::ClusterManager,
    at: &str,
    errs: &mut Errors,
) -> Option<String> {
    let envoy_types::pb::envoy::config::bootstrap::v3::ClusterManager {
        local_cluster_name,
        outlier_detection,
        upstream_bind_config,
        load_stats_config,
        enable_deferred_cluster_creation,
    } = c;
    reject_set!(
        errs,
        at,
        outlier_detection,
        upstream_bind_config,
        load_stats_config,
        enable_deferred_cluster_creation,
    );
    (!local_cluster_name.is_empty()).then(|| local_cluster_name.clone())
}

/// `static_resources.secrets` by name: the certificates an `SdsSecretConfig` without an
/// `sds_config` names.
fn convert_static_secrets(
    secrets: &[crate::tls::Secret],
    errs: &mut Errors,
) -> HashMap<String, crate::tls::Secret> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    let mut out = HashMap::new();
    for (i, secret) in secrets.iter().enumerate() {
        let at = index("static_resources.secrets", i);
        if secret.name.is_empty() {
            errs.add(join(&at, "name"), "must not be empty");
            continue;
        }
        match &secret.r#type {
            Some(Type::TlsCertificate(_)) => {}
            Some(Type::ValidationContext(_)) => {
                errs.add(
                    join(&at, "validation_context"),
                    "not supported (validation contexts are read inline only, not from secrets)",
                );
            }
            Some(Type::SessionTicketKeys(_)) => {
                errs.add(join(&at, "session_ticket_keys"), "not supported");
            }
            Some(Type::GenericSecret(_)) => {
                errs.add(join(&at, "generic_secret"), "not supported");
            }
            None => errs.add(&at, "a secret type is required"),
        }
        if out.insert(secret.name.clone(), secret.clone()).is_some() {
            // As Envoy: "Duplicate static TlsCertificate secret name".
            errs.add(
                join(&at, "name"),
                format!("duplicate secret name '{}'", secret.name),
            );
        }
    }
    out
}

/// Validates a bootstrap and builds the runtime tables, reporting every error found.
pub fn compile(bootstrap: Bootstrap) -> Result<Snapshot, ConfigErrors> {
    compile_with(bootstrap, Arc::new(Dynamic::default()))
}

/// Compiles the bootstrap together with the resources a management server delivered.
pub fn compile_with(bootstrap: Bootstrap, dynamic: Arc<Dynamic>) -> Result<Snapshot, ConfigErrors> {
    let mut errs = Errors::default();
    let Bootstrap {
        node: _,
        node_context_params,
        static_resources,
        dynamic_resources,
        cluster_manager,
        hds_config,
        flags_path,
        stats_sinks,
        // Envoy creates some cluster stats when first used, to save memory; legate's
        // exist from the start (docs/configuration.md: differences).
        deferred_stat_options: _,
        stats_config,
        watchdog,
        watchdogs,
        tracing,
        layered_runtime,
        admin,
        enable_dispatcher_stats,
        header_prefix,
        use_tcp_for_dns_lookups,
        fatal_actions,
        config_sources,
        default_socket_interface,
        inline_headers,
        perf_tracing_file_path,
        application_log_config,
        memory_allocator_manager,
        enable_worker_cpu_affinity,
        stats_flush,
        stats_eviction,
        stats_flush_interval,
        bootstrap_extensions,
        certificate_provider_instances,
        typed_dns_resolver_config,
        stats_server_version_override,
        dns_resolution_config,
        xds_delegate_extension,
        xds_config_tracker_extension,
        listener_manager,
        grpc_async_client_manager_config,
        overload_manager,
        default_config_source,
        default_regex_engine,
    } = &bootstrap;
    // `node` identifies this gateway to management servers and is kept for them.
    reject_set!(
        errs,
        "",
        node_context_params,
        hds_config,
        flags_path,
        stats_sinks,
        stats_config,
        watchdog,
        watchdogs,
        tracing,
        layered_runtime,
        enable_dispatcher_stats,
        header_prefix,
        use_tcp_for_dns_lookups,
        fatal_actions,
        config_sources,
        default_socket_interface,
        inline_headers,
        perf_tracing_file_path,
        application_log_config,
        memory_allocator_manager,
        enable_worker_cpu_affinity,
        stats_flush,
        stats_eviction,
        stats_flush_interval,
        bootstrap_extensions,
        certificate_provider_instances,
        typed_dns_resolver_config,
        stats_server_version_override,
        dns_resolution_config,
        xds_delegate_extension,
        xds_config_tracker_extension,
        listener_manager,
        grpc_async_client_manager_config,
        default_config_source,
        default_regex_engine,
    );
    let global_max_connections = overload_manager
        .as_ref()
        .and_then(|o| convert_overload_manager(o, "overload_manager", &mut errs));
    let local_cluster = cluster_manager
        .as_ref()
        .and_then(|c| convert_cluster_manager(c, "cluster_manager", &mut errs));
    let xds = dynamic_resources
        .as_ref()
        .and_then(|d| XdsConfig::convert(d, "dynamic_resources", &mut errs));
    let eds = |name: &str| dynamic.endpoints.get(name).cloned();
    let (admin_address, admin_access_logs) = match admin {
        Some(a) => convert_admin(a, "admin", &mut errs),
        None => (None, Vec::new()),
    };
    let mut listeners = Vec::new();
    let mut listener_index = HashMap::new();
    let mut pending: Vec<(String, &ListenerProto, String)> = Vec::new();
    let mut clusters = foldhash::HashMap::default();
    let mut static_secrets = HashMap::new();
    if let Some(sr) = static_resources {
        let StaticResources {
            listeners: listener_protos,
            clusters: cluster_protos,
            secrets,
        } = sr;
        static_secrets = convert_static_secrets(secrets, &mut errs);
        for (i, c) in cluster_protos.iter().enumerate() {
            let at = index("static_resources.clusters", i);
            if let Some(cluster) = Cluster::convert_with_eds(c, &at, &eds, &mut errs) {
                let name = cluster.name.clone();
                if clusters.insert(name.clone(), Arc::new(cluster)).is_some() {
                    errs.add(
                        join(&at, "name"),
                        format!("duplicate cluster name '{name}'"),
                    );
                }
            }
        }
        for (i, l) in listener_protos.iter().enumerate() {
            pending.push((
                index("static_resources.listeners", i),
                l,
                format!("listener_{i}"),
            ));
        }
    }
    if let Some(local) = &local_cluster {
        let defined = static_resources
            .as_ref()
            .is_some_and(|sr| sr.clusters.iter().any(|c| c.name == *local));
        if !defined {
            // As Envoy: the local cluster must be a static one.
            errs.add(
                "cluster_manager.local_cluster_name",
                format!("local cluster '{local}' must be defined in static_resources.clusters"),
            );
        }
    }
    for (name, c) in &dynamic.clusters {
        let at = format!("cds[{name}]");
        if clusters.contains_key(name) {
            errs.add(
                join(&at, "name"),
                format!("'{name}' is already a static cluster"),
            );
            continue;
        }
        if let Some(cluster) = Cluster::convert_with_eds(c, &at, &eds, &mut errs) {
            clusters.insert(name.clone(), Arc::new(cluster));
        }
    }
    for (name, l) in &dynamic.listeners {
        pending.push((format!("lds[{name}]"), l, name.clone()));
    }
    let routes_source = dynamic.clone();
    // A route configuration whose initial fetch timed out serves as an empty table (every
    // request 404), as Envoy initializes a listener without it.
    let rds_lookup = move |name: &str| {
        routes_source.routes.get(name).cloned().or_else(|| {
            routes_source
                .rds_timed_out
                .contains(name)
                .then(|| RouteConfiguration {
                    name: name.to_string(),
                    ..Default::default()
                })
        })
    };
    let secrets_source = dynamic.secrets.clone();
    let secret_lookup = move |name: &str| secrets_source.get(name).cloned();
    let mut rds = Rds {
        lookup: &rds_lookup,
        names: Vec::new(),
        missing: false,
        timeouts: HashMap::new(),
        secrets: &secret_lookup,
        static_secrets: &static_secrets,
        secret_names: Vec::new(),
    };
    let mut warming = Vec::new();
    let mut addresses: HashMap<SocketAddr, String> = HashMap::new();
    for (at, l, default_name) in pending {
        rds.missing = false;
        let Some(mut listener) =
            Listener::convert(l, &at, default_name.clone(), &mut rds, &mut errs)
        else {
            if rds.missing {
                warming.push(if l.name.is_empty() {
                    default_name
                } else {
                    l.name.clone()
                });
            }
            continue;
        };
        if listener_index.contains_key(&listener.name) {
            errs.add(
                join(&at, "name"),
                format!("duplicate listener name '{}'", listener.name),
            );
            continue;
        }
        if let Some(other) = addresses.insert(listener.address, listener.name.clone()) {
            errs.add(
                join(&at, "address"),
                format!("{} is already used by listener '{other}'", listener.address),
            );
            continue;
        }
        for (i, chain) in listener.chains.iter().enumerate() {
            let chain_at = if Some(i) == listener.default_chain {
                join(&at, "default_filter_chain")
            } else {
                index(&join(&at, "filter_chains"), i)
            };
            let rc_at = join(
                &index(&join(&chain_at, "filters"), chain.hcm_index),
                "typed_config.route_config",
            );
            chain
                .hcm
                .routes
                .check_clusters(&rc_at, &|n| clusters.contains_key(n), &mut errs);
        }
        for chain in &mut listener.chains {
            // A missing cluster is answered locally (503), by either engine.
            chain.plain_upstreams = chain.hcm.routes.clusters_all(|n| {
                clusters
                    .get(n)
                    .is_none_or(|c: &Arc<Cluster>| c.speaks_plain_http1())
            });
        }
        listener_index.insert(listener.name.clone(), listeners.len());
        listeners.push(Arc::new(listener));
    }
    if let Some(x) = &xds {
        match clusters.get(&x.ads_cluster) {
            Some(_) if !dynamic.clusters.contains_key(&x.ads_cluster) => {}
            _ => errs.add(
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                format!("'{}' must be a static cluster", x.ads_cluster),
            ),
        }
    }
    errs.into_result(())?;
    Ok(Snapshot {
        listeners,
        listener_index,
        clusters,
        admin_address,
        admin_access_logs: admin_access_logs.into(),
        global_max_connections,
        xds,
        dynamic,
        rds_names: rds.names,
        sds_names: rds.secret_names,
        rds_timeouts: rds.timeouts,
        warming,
        bootstrap,
    })
}

fn convert_admin(
    a: &Admin,
    at: &str,
    errs: &mut Errors,
) -> (Option<SocketAddr>, Vec<crate::access_log::Logger>) {
    let Admin {
        access_log,
        access_log_path,
        profile_path,
        address,
        socket_options,
        ignore_global_conn_limit,
        allow_paths,
    } = a;
    let logs = crate::access_log::convert(access_log, &join(at, "access_log"), errs);
    reject_set!(
        errs,
        at,
        access_log_path,
        profile_path,
        socket_options,
        ignore_global_conn_limit,
        allow_paths,
    );
    let Some((host, port)) = socket_address(address, &join(at, "address"), errs) else {
        return (None, logs);
    };
    match host.parse() {
        Ok(ip) => (Some(SocketAddr::new(ip, port)), logs),
        Err(_) => {
            errs.add(
                join(at, "address.socket_address.address"),
                format!("'{host}' is not an IP address"),
            );
            (None, logs)
        }
    }
}
