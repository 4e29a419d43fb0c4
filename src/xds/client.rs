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

use super::state::TypeState;
use super::{Dynamic, XdsConfig, CLUSTER_TYPE, ENDPOINT_TYPE};

/// Applies a candidate set of dynamic resources: Ok with the EDS names the resulting
/// clusters need, or Err with every problem (field path and reason) for the NACK.
pub type Apply = Arc<dyn Fn(Dynamic) -> Result<Vec<String>, String> + Send + Sync>;
/// Where the management server is right now (a host of the ADS cluster).
pub type Target = Arc<dyn Fn() -> Option<std::net::SocketAddr> + Send + Sync>;

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub fn spawn(
    rt: &tokio::runtime::Handle,
    config: XdsConfig,
    node: Option<Node>,
    target: Target,
    apply: Apply,
    initial: Dynamic,
    eds_names: Vec<String>,
) {
    rt.spawn(async move {
        let mut client = Client {
            config,
            node,
            dynamic: initial,
            cds: TypeState::new(CLUSTER_TYPE),
            eds: TypeState::new(ENDPOINT_TYPE),
            apply,
        };
        client.eds.names = eds_names;
        let mut backoff = MIN_BACKOFF;
        loop {
            match client.session(&target).await {
                Ok(()) => log::warn!("xDS stream to '{}' closed", client.config.ads_cluster),
                Err(e) => log::warn!("xDS stream to '{}' failed: {e}", client.config.ads_cluster),
            }
            let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 + 1);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if client.cds.version.is_empty() && client.eds.version.is_empty() {
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
    apply: Apply,
}

impl Client {
    async fn session(&mut self, target: &Target) -> Result<(), String> {
        let addr = target().ok_or("the ADS cluster has no host")?;
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5));
        let endpoint = match format!("http://{}", self.config.authority).parse::<http::Uri>() {
            Ok(origin) => endpoint.origin(origin),
            Err(_) => endpoint,
        };
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
        self.cds.reset_stream();
        self.eds.reset_stream();
        // The node goes with the first request of each stream.
        let mut first = true;
        if self.config.cds {
            send(&tx, self.cds.subscribe(self.node.as_ref())).await?;
            first = false;
        }
        if !self.eds.names.is_empty() {
            let node = if first { self.node.as_ref() } else { None };
            send(&tx, self.eds.subscribe(node)).await?;
        }
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut responses = client
            .stream_aggregated_resources(requests)
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        log::info!("xDS stream to '{}' ({addr}) open", self.config.ads_cluster);
        while let Some(resp) = responses.message().await.map_err(|s| s.to_string())? {
            for req in self.handle(&resp) {
                send(&tx, req).await?;
            }
        }
        Ok(())
    }

    /// The requests (ACK/NACK, and a new EDS subscription) that answer one response.
    fn handle(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        match resp.type_url.as_str() {
            CLUSTER_TYPE => self.on_clusters(resp),
            ENDPOINT_TYPE => self.on_endpoints(resp),
            other => {
                log::warn!("xDS: ignoring a response of unsubscribed type {other}");
                Vec::new()
            }
        }
    }

    fn on_clusters(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let mut clusters = BTreeMap::new();
        for (i, any) in resp.resources.iter().enumerate() {
            match ClusterProto::decode(any.value.as_slice()) {
                Ok(c) if clusters.contains_key(&c.name) => {
                    return vec![self.cds.nack(
                        resp,
                        &format!("resources[{i}]: duplicate cluster '{}'", c.name),
                    )];
                }
                Ok(c) => {
                    clusters.insert(c.name.clone(), c);
                }
                Err(e) => return vec![self.cds.nack(resp, &format!("resources[{i}]: {e}"))],
            }
        }
        let mut candidate = self.dynamic.clone();
        candidate.clusters = clusters;
        self.apply_candidate(candidate, resp, true)
    }

    fn on_endpoints(&mut self, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let mut candidate = self.dynamic.clone();
        for (i, any) in resp.resources.iter().enumerate() {
            match ClusterLoadAssignment::decode(any.value.as_slice()) {
                Ok(cla) => {
                    candidate.endpoints.insert(cla.cluster_name.clone(), cla);
                }
                Err(e) => return vec![self.eds.nack(resp, &format!("resources[{i}]: {e}"))],
            }
        }
        self.apply_candidate(candidate, resp, false)
    }

    fn apply_candidate(
        &mut self,
        mut candidate: Dynamic,
        resp: &DiscoveryResponse,
        is_cds: bool,
    ) -> Vec<DiscoveryRequest> {
        // Endpoints of EDS names no longer subscribed are dropped with the clusters.
        let state = if is_cds { &mut self.cds } else { &mut self.eds };
        match (self.apply)(candidate.clone()) {
            Err(reason) => {
                log::error!(
                    "xDS: rejected {} version {}: {reason}",
                    resp.type_url,
                    resp.version_info
                );
                vec![state.nack(resp, &reason)]
            }
            Ok(mut eds_names) => {
                let mut out = vec![state.ack(resp)];
                eds_names.sort();
                eds_names.dedup();
                candidate.endpoints.retain(|k, _| eds_names.contains(k));
                self.dynamic = candidate;
                if eds_names != self.eds.names {
                    self.eds.names = eds_names;
                    out.push(self.eds.subscribe(None));
                }
                out
            }
        }
    }
}

async fn send(tx: &mpsc::Sender<DiscoveryRequest>, req: DiscoveryRequest) -> Result<(), String> {
    tx.send(req)
        .await
        .map_err(|_| "the stream closed".to_string())
}
