//! Dynamic configuration over xDS: the bootstrap's `dynamic_resources`, the resources a
//! management server delivered, and the ADS client that keeps them current.

pub mod client;
pub mod delta;
mod fetch;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::DynamicResources;
use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::core::v3::{
    api_config_source::ApiType, config_source::ConfigSourceSpecifier,
    grpc_service::TargetSpecifier, ApiConfigSource, ApiVersion, ConfigSource, GrpcService,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

use crate::config::duration;
use crate::config::error::{index, join, Errors};
use crate::reject_set;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// How to reach the management server, from `dynamic_resources`.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsConfig {
    /// The static cluster that `ads_config.grpc_services[0].envoy_grpc` names.
    pub ads_cluster: String,
    /// `:authority` for the ADS stream (default: the cluster name).
    pub authority: String,
    /// Clusters come over ADS (`cds_config: {ads: {}}`).
    pub cds: bool,
    /// Listeners come over ADS (`lds_config: {ads: {}}`).
    pub lds: bool,
    /// Incremental xDS (`api_type: DELTA_GRPC`).
    pub delta: bool,
    /// How long to wait for the first CDS answer before serving anyway (Envoy: 15s).
    pub initial_fetch_timeout: Option<Duration>,
}

/// What the management server has delivered and legate accepted.
#[derive(Debug, Clone, Default)]
pub struct Dynamic {
    pub clusters: BTreeMap<String, ClusterProto>,
    pub endpoints: HashMap<String, ClusterLoadAssignment>,
    pub listeners: BTreeMap<String, ListenerProto>,
    pub routes: HashMap<String, RouteConfiguration>,
    /// TLS secrets (SDS), by name.
    pub secrets: HashMap<String, crate::tls::Secret>,
    /// Route configurations whose initial fetch timed out (served as empty tables).
    pub rds_timed_out: std::collections::BTreeSet<String>,
    /// Per resource type: the version last accepted and when (seconds since the epoch).
    pub versions: BTreeMap<String, (String, u64)>,
}

/// Seconds since the Unix epoch, for `last_updated`.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unset (AUTO) means V3 in Envoy 1.40, as in the standard ADS bootstrap, which sets neither
/// version; V2 is gone from Envoy.
fn check_api_version(version: i32, at: &str, errs: &mut Errors) {
    if version != ApiVersion::Auto as i32 && version != ApiVersion::V3 as i32 {
        errs.add(at, "only V3 is supported (or leave it unset)");
    }
}

fn check_ads_source(c: &ConfigSource, at: &str, errs: &mut Errors) -> Option<Duration> {
    let ConfigSource {
        authorities,
        initial_fetch_timeout,
        resource_api_version,
        config_source_specifier,
    } = c;
    reject_set!(errs, at, authorities);
    check_api_version(
        *resource_api_version,
        &join(at, "resource_api_version"),
        errs,
    );
    match config_source_specifier {
        Some(ConfigSourceSpecifier::Ads(_)) => {}
        _ => errs.add(at, "only ads: {} is supported"),
    }
    duration::check(
        initial_fetch_timeout,
        &join(at, "initial_fetch_timeout"),
        errs,
    );
    match initial_fetch_timeout {
        None => Some(Duration::from_secs(15)),
        Some(d) => Some(duration::to_std(d)).filter(|d| !d.is_zero()),
    }
}

impl XdsConfig {
    pub fn convert(d: &DynamicResources, at: &str, errs: &mut Errors) -> Option<Self> {
        let DynamicResources {
            lds_config,
            lds_resources_locator,
            cds_config,
            cds_resources_locator,
            ads_config,
        } = d;
        reject_set!(errs, at, lds_resources_locator, cds_resources_locator);
        let Some(ads) = ads_config else {
            errs.add(
                join(at, "ads_config"),
                "required (legate speaks xDS over ADS)",
            );
            return None;
        };
        let aat = join(at, "ads_config");
        let ApiConfigSource {
            api_type,
            transport_api_version,
            cluster_names,
            grpc_services,
            refresh_delay,
            request_timeout,
            rate_limit_settings,
            set_node_on_first_message_only: _,
            config_validators,
        } = ads;
        reject_set!(
            errs,
            &aat,
            cluster_names,
            refresh_delay,
            request_timeout,
            rate_limit_settings,
            config_validators,
        );
        match ApiType::try_from(*api_type) {
            Ok(ApiType::Grpc) => {}
            Ok(ApiType::DeltaGrpc) => {}
            _ => errs.add(join(&aat, "api_type"), "only GRPC is supported"),
        }
        check_api_version(
            *transport_api_version,
            &join(&aat, "transport_api_version"),
            errs,
        );
        let [GrpcService {
            timeout,
            initial_metadata,
            retry_policy,
            target_specifier,
        }] = grpc_services.as_slice()
        else {
            errs.add(
                join(&aat, "grpc_services"),
                "exactly one grpc service is required",
            );
            return None;
        };
        let gat = index(&join(&aat, "grpc_services"), 0);
        reject_set!(errs, &gat, timeout, initial_metadata, retry_policy);
        let (ads_cluster, authority) = match target_specifier {
            Some(TargetSpecifier::EnvoyGrpc(e)) => {
                let eat = join(&gat, "envoy_grpc");
                let envoy_types::pb::envoy::config::core::v3::grpc_service::EnvoyGrpc {
                    cluster_name,
                    authority,
                    retry_policy,
                    max_receive_message_length,
                    skip_envoy_headers: _,
                } = e;
                reject_set!(errs, &eat, retry_policy, max_receive_message_length);
                let auth = if authority.is_empty() {
                    cluster_name.clone()
                } else {
                    authority.clone()
                };
                (cluster_name.clone(), auth)
            }
            Some(TargetSpecifier::GoogleGrpc(_)) => {
                errs.add(join(&gat, "google_grpc"), "not supported (use envoy_grpc)");
                return None;
            }
            None => {
                errs.add(join(&gat, "envoy_grpc"), "required");
                return None;
            }
        };
        let mut initial_fetch_timeout = Some(Duration::from_secs(15));
        let cds = match cds_config {
            Some(c) => {
                initial_fetch_timeout = check_ads_source(c, &join(at, "cds_config"), errs);
                true
            }
            None => false,
        };
        let lds = match lds_config {
            Some(c) => {
                check_ads_source(c, &join(at, "lds_config"), errs);
                true
            }
            None => false,
        };
        Some(XdsConfig {
            ads_cluster,
            authority,
            cds,
            lds,
            delta: ads.api_type == ApiType::DeltaGrpc as i32,
            initial_fetch_timeout,
        })
    }
}
