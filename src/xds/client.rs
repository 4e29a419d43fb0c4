//! The ADS client: one gRPC stream (state of the world) to the management server,
//! subscribing to clusters (CDS) and to the endpoints of EDS clusters. Each response is
//! validated by compiling it into a new snapshot; it is ACKed and applied, or NACKed
//! with the field path and reason while the last good resources keep serving. A broken
//! stream is reopened with jittered exponential back-off and resubscribed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
use prost::Message;
use tokio::sync::mpsc;

use super::fetch::FetchTimeouts;
use super::state::TypeState;
use super::{
    Dynamic, XdsConfig, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE,
};
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

/// Applies a candidate set of dynamic resources: Ok with the EDS names the resulting
/// clusters need, or Err with every problem (field path and reason) for the NACK.
pub type Apply = Arc<dyn Fn(Dynamic) -> Result<Needs, String> + Send + Sync>;

/// The EDS and RDS resource names a compiled configuration needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    pub eds: Vec<String>,
    pub rds: Vec<String>,
    /// SDS secret names the listeners refer to.
    pub sds: Vec<String>,
    /// Each RDS name's `initial_fetch_timeout` (None: wait forever).
    pub rds_timeouts: std::collections::HashMap<String, Option<Duration>>,
}
/// Where the management server is right now (a host of the ADS cluster).
pub type Target = Arc<dyn Fn() -> Option<std::net::SocketAddr> + Send + Sync>;

/// Opens an ADS client to the management server's current host over h2c.
pub async fn connect(
    target: &Target,
    authority: &str,
) -> Result<
    (
        std::net::SocketAddr,
        AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    ),
    String,
> {
    let addr = target().ok_or("the ADS cluster has no host")?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    let endpoint = match format!("http://{authority}").parse::<http::Uri>() {
        Ok(origin) => endpoint.origin(origin),
        Err(_) => endpoint,
    };
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    // A full state-of-the-world push of a large mesh is far above gRPC's 4 MiB default.
    let client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(1 << 30);
    Ok((addr, client))
}

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub fn spawn(
    rt: &tokio::runtime::Handle,
    config: XdsConfig,
    node: Option<Node>,
    target: Target,
    apply: Apply,
    initial: Dynamic,
    needs: Needs,
) {
    if config.delta {
        spawn_delta(rt, config, node, target, apply, initial, needs);
        return;
    }
    rt.spawn(async move {
        let mut client = Client {
            config,
            node,
            dynamic: initial,
            cds: TypeState::new(CLUSTER_TYPE),
            eds: TypeState::new(ENDPOINT_TYPE),
            lds: TypeState::new(LISTENER_TYPE),
            rds: TypeState::new(ROUTE_TYPE),
            sds: TypeState::new(SECRET_TYPE),
            apply,
            fetch: FetchTimeouts::default(),
        };
        client.eds.names = needs.eds.clone();
        client.rds.names = needs.rds.clone();
        client.sds.names = needs.sds.clone();
        client.arm_fetch_timeouts(&needs);
        let mut backoff = MIN_BACKOFF;
        loop {
            match client.session(&target).await {
                Ok(()) => log::warn!("xDS stream to '{}' closed", client.config.ads_cluster),
                Err(e) => log::warn!("xDS stream to '{}' failed: {e}", client.config.ads_cluster),
            }
            let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 + 1);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if client.cds.version.is_empty() && client.lds.version.is_empty() {
                continue;
            }
            // Once a stream delivered config, start the next back-off from the bottom.
            backoff = backoff.min(MIN_BACKOFF * 4);
        }
    });
}

struct Client {
    config: XdsConfig,
    node: Option<Node>,
    dynamic: Dynamic,
    cds: TypeState,
    eds: TypeState,
    lds: TypeState,
    rds: TypeState,
    sds: TypeState,
    apply: Apply,
    fetch: FetchTimeouts,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cds,
    Eds,
    Lds,
    Rds,
    Sds,
}

impl Client {
    async fn session(&mut self, target: &Target) -> Result<(), String> {
        let (addr, mut client) = connect(target, &self.config.authority).await?;
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
        // Subscribe in Envoy's order: clusters, endpoints, listeners, routes. The node goes
        // with the first request of each stream.
        let mut first = true;
        let wanted = [
            (Kind::Cds, self.config.cds),
            (Kind::Eds, !self.eds.names.is_empty()),
            (Kind::Lds, self.config.lds),
            (Kind::Rds, !self.rds.names.is_empty()),
            (Kind::Sds, !self.sds.names.is_empty()),
        ];
        for (kind, on) in wanted {
            let node = if first { self.node.clone() } else { None };
            let state = self.state(kind);
            state.reset_stream();
            if on {
                send(&tx, state.subscribe(node.as_ref())).await?;
                first = false;
            }
        }
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut responses = client
            .stream_aggregated_resources(requests)
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        log::info!("xDS stream to '{}' ({addr}) open", self.config.ads_cluster);
        let _connected = Connected::open();
        loop {
            let timer = FetchTimeouts::wait(self.fetch.next());
            tokio::select! {
                msg = responses.message() => {
                    let Some(resp) = msg.map_err(|s| s.to_string())? else { return Ok(()) };
                    for req in self.handle(&resp) {
                        send(&tx, req).await?;
                    }
                }
                _ = timer => self.expire_fetches(),
            }
        }
    }

    /// The requests (ACK/NACK, and a new EDS subscription) that answer one response.
    fn handle(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        match resp.type_url.as_str() {
            CLUSTER_TYPE => self.on_clusters(resp),
            ENDPOINT_TYPE => self.on_endpoints(resp),
            LISTENER_TYPE => self.on_listeners(resp),
            ROUTE_TYPE => self.on_routes(resp),
            SECRET_TYPE => self.on_secrets(resp),
            other => {
                log::warn!("xDS: ignoring a response of unsubscribed type {other}");
                Vec::new()
            }
        }
    }

    fn on_clusters(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let clusters = match decode_named(resp, "cluster", |c: &ClusterProto| &c.name) {
            Ok(c) => c,
            Err(e) => return vec![self.cds.nack(resp, &e)],
        };
        let mut candidate = self.dynamic.clone();
        candidate.clusters = clusters;
        self.apply_candidate(candidate, resp, Kind::Cds)
    }

    fn on_listeners(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let listeners = match decode_named(resp, "listener", |l: &ListenerProto| &l.name) {
            Ok(l) => l,
            Err(e) => return vec![self.lds.nack(resp, &e)],
        };
        let mut candidate = self.dynamic.clone();
        candidate.listeners = listeners;
        self.apply_candidate(candidate, resp, Kind::Lds)
    }

    fn on_routes(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let mut candidate = self.dynamic.clone();
        if let Err(e) = merge_into(resp, &mut candidate.routes, |r: &RouteConfiguration| {
            r.name.clone()
        }) {
            return vec![self.rds.nack(resp, &e)];
        }
        self.apply_candidate(candidate, resp, Kind::Rds)
    }

    fn on_secrets(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let mut candidate = self.dynamic.clone();
        if let Err(e) = merge_into(resp, &mut candidate.secrets, |s: &crate::tls::Secret| {
            s.name.clone()
        }) {
            return vec![self.sds.nack(resp, &e)];
        }
        self.apply_candidate(candidate, resp, Kind::Sds)
    }

    fn arm_fetch_timeouts(&mut self, needs: &Needs) {
        self.fetch.arm(needs, &self.dynamic);
    }

    fn expire_fetches(&mut self) {
        if let Some(candidate) = self.fetch.expire(&self.dynamic) {
            match (self.apply)(candidate.clone()) {
                Ok(_) => self.dynamic = candidate,
                Err(e) => log::error!("xDS: cannot start listeners without their routes: {e}"),
            }
        }
    }

    fn state(&mut self, kind: Kind) -> &mut TypeState {
        match kind {
            Kind::Cds => &mut self.cds,
            Kind::Eds => &mut self.eds,
            Kind::Lds => &mut self.lds,
            Kind::Rds => &mut self.rds,
            Kind::Sds => &mut self.sds,
        }
    }

    fn on_endpoints(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let mut candidate = self.dynamic.clone();
        if let Err(e) = merge_into(
            resp,
            &mut candidate.endpoints,
            |c: &ClusterLoadAssignment| c.cluster_name.clone(),
        ) {
            return vec![self.eds.nack(resp, &e)];
        }
        self.apply_candidate(candidate, resp, Kind::Eds)
    }

    fn apply_candidate(
        &mut self,
        mut candidate: Dynamic,
        resp: &DiscoveryResponse,
        kind: Kind,
    ) -> Vec<DiscoveryRequest> {
        candidate.versions.insert(
            resp.type_url.clone(),
            (resp.version_info.clone(), super::now_unix()),
        );
        match (self.apply)(candidate.clone()) {
            Err(reason) => {
                log::error!(
                    "xDS: rejected {} version {}: {reason}",
                    resp.type_url,
                    resp.version_info
                );
                count_update(&resp.type_url, false);
                vec![self.state(kind).nack(resp, &reason)]
            }
            Ok(mut needs) => {
                count_update(&resp.type_url, true);
                let mut out = vec![self.state(kind).ack(resp)];
                needs.eds.sort();
                needs.eds.dedup();
                needs.rds.sort();
                needs.rds.dedup();
                needs.sds.sort();
                needs.sds.dedup();
                // Endpoints, routes and secrets nothing refers to any more are forgotten.
                candidate.endpoints.retain(|k, _| needs.eds.contains(k));
                candidate.routes.retain(|k, _| needs.rds.contains(k));
                candidate.secrets.retain(|k, _| needs.sds.contains(k));
                self.dynamic = candidate;
                self.arm_fetch_timeouts(&needs);
                if needs.eds != self.eds.names {
                    self.eds.names = needs.eds.clone();
                    out.push(self.eds.subscribe(None));
                }
                if needs.rds != self.rds.names {
                    self.rds.names = needs.rds.clone();
                    out.push(self.rds.subscribe(None));
                }
                if needs.sds != self.sds.names {
                    self.sds.names = needs.sds.clone();
                    out.push(self.sds.subscribe(None));
                }
                out
            }
        }
    }
}

fn spawn_delta(
    rt: &tokio::runtime::Handle,
    config: XdsConfig,
    node: Option<Node>,
    target: Target,
    apply: Apply,
    initial: Dynamic,
    needs: Needs,
) {
    rt.spawn(async move {
        let mut client = super::delta::DeltaClient::new(config, node, initial, apply, &needs);
        let mut backoff = MIN_BACKOFF;
        loop {
            match client.session(&target).await {
                Ok(()) => log::warn!("delta xDS stream to '{}' closed", client.config.ads_cluster),
                Err(e) => log::warn!(
                    "delta xDS stream to '{}' failed: {e}",
                    client.config.ads_cluster
                ),
            }
            let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 + 1);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            backoff = if client.has_config() {
                MIN_BACKOFF * 4
            } else {
                (backoff * 2).min(MAX_BACKOFF)
            };
        }
    });
}

/// `control_plane.connected_state` is 1 while a stream is open.
pub struct Connected;

impl Connected {
    pub fn open() -> Self {
        crate::stats::server()
            .control_plane_connected
            .store(1, std::sync::atomic::Ordering::Relaxed);
        Connected
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        crate::stats::server()
            .control_plane_connected
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts an accepted or rejected update of a resource type.
pub fn count_update(type_url: &str, accepted: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = crate::stats::server();
    let counter = match (type_url, accepted) {
        (CLUSTER_TYPE, true) => &s.cds_update_success,
        (CLUSTER_TYPE, false) => &s.cds_update_rejected,
        (ENDPOINT_TYPE, true) => &s.eds_update_success,
        (ENDPOINT_TYPE, false) => &s.eds_update_rejected,
        (LISTENER_TYPE, true) => &s.lds_update_success,
        (LISTENER_TYPE, false) => &s.lds_update_rejected,
        (ROUTE_TYPE, true) => &s.rds_update_success,
        (ROUTE_TYPE, false) => &s.rds_update_rejected,
        _ => return,
    };
    counter.fetch_add(1, Relaxed);
}

async fn send(tx: &mpsc::Sender<DiscoveryRequest>, req: DiscoveryRequest) -> Result<(), String> {
    tx.send(req)
        .await
        .map_err(|_| "the stream closed".to_string())
}

/// Decodes a state-of-the-world response's resources by name: each must decode, have a
/// name, and appear once; the error names the resource index for the NACK.
/// Decodes each resource of a response into `map` by its name (EDS, RDS and SDS responses
/// carry the resources asked for, which replace the previous versions one by one).
fn merge_into<T: Message + Default>(
    resp: &DiscoveryResponse,
    map: &mut std::collections::HashMap<String, T>,
    name_of: impl Fn(&T) -> String,
) -> Result<(), String> {
    for (i, any) in resp.resources.iter().enumerate() {
        let r = T::decode(any.value.as_slice()).map_err(|e| format!("resources[{i}]: {e}"))?;
        map.insert(name_of(&r), r);
    }
    Ok(())
}

fn decode_named<T: Message + Default>(
    resp: &DiscoveryResponse,
    kind: &str,
    name_of: impl Fn(&T) -> &String,
) -> Result<BTreeMap<String, T>, String> {
    let mut out = BTreeMap::new();
    for (i, any) in resp.resources.iter().enumerate() {
        let r = T::decode(any.value.as_slice()).map_err(|e| format!("resources[{i}]: {e}"))?;
        let name = name_of(&r).clone();
        if name.is_empty() {
            return Err(format!("resources[{i}].name: required"));
        }
        if out.contains_key(&name) {
            return Err(format!("resources[{i}]: duplicate {kind} '{name}'"));
        }
        out.insert(name, r);
    }
    Ok(out)
}
