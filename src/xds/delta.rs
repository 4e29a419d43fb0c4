//! Incremental (delta) xDS over ADS (`api_type: DELTA_GRPC`): resources arrive and leave
//! one by one with their own versions; subscriptions change by names added and removed;
//! a new stream announces the versions held (`initial_resource_versions`).

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use tokio::sync::mpsc;

use super::client::{connect, Apply, Needs, Target};
use super::fetch::FetchTimeouts;
use super::{
    Dynamic, XdsConfig, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE,
};

/// One resource type's delta subscription.
#[derive(Debug, Default, Clone)]
pub struct DeltaType {
    pub type_url: String,
    /// Wildcard (all resources of the type), as for clusters and listeners.
    pub wildcard: bool,
    pub names: BTreeSet<String>,
    /// Version of each resource held.
    pub versions: HashMap<String, String>,
}

impl DeltaType {
    fn new(type_url: &str, wildcard: bool) -> Self {
        DeltaType {
            type_url: type_url.to_string(),
            wildcard,
            ..Default::default()
        }
    }

    /// The first request of a stream: what is wanted and what is already held.
    pub fn subscribe(&self, node: Option<&Node>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: node.cloned(),
            type_url: self.type_url.clone(),
            resource_names_subscribe: if self.wildcard {
                Vec::new()
            } else {
                self.names.iter().cloned().collect()
            },
            initial_resource_versions: self.versions.clone(),
            ..Default::default()
        }
    }

    /// Changes the subscribed names; None when nothing changed.
    pub fn resubscribe(&mut self, names: &[String]) -> Option<DeltaDiscoveryRequest> {
        let wanted: BTreeSet<String> = names.iter().cloned().collect();
        let add: Vec<String> = wanted.difference(&self.names).cloned().collect();
        let drop: Vec<String> = self.names.difference(&wanted).cloned().collect();
        if add.is_empty() && drop.is_empty() {
            return None;
        }
        for d in &drop {
            self.versions.remove(d);
        }
        self.names = wanted;
        Some(DeltaDiscoveryRequest {
            type_url: self.type_url.clone(),
            resource_names_subscribe: add,
            resource_names_unsubscribe: drop,
            ..Default::default()
        })
    }

    pub fn ack(&self, nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: self.type_url.clone(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        }
    }

    pub fn nack(&self, nonce: &str, reason: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: self.type_url.clone(),
            response_nonce: nonce.to_string(),
            error_detail: Some(Status {
                code: 3,
                message: reason.to_string(),
                details: vec![],
            }),
            ..Default::default()
        }
    }
}

pub struct DeltaClient {
    pub config: XdsConfig,
    pub node: Option<Node>,
    pub dynamic: Dynamic,
    pub apply: Apply,
    cds: DeltaType,
    eds: DeltaType,
    lds: DeltaType,
    rds: DeltaType,
    sds: DeltaType,
    fetch: FetchTimeouts,
}

impl DeltaClient {
    pub fn new(
        config: XdsConfig,
        node: Option<Node>,
        dynamic: Dynamic,
        apply: Apply,
        needs: &Needs,
    ) -> Self {
        let mut c = DeltaClient {
            config,
            node,
            dynamic,
            apply,
            cds: DeltaType::new(CLUSTER_TYPE, true),
            eds: DeltaType::new(ENDPOINT_TYPE, false),
            lds: DeltaType::new(LISTENER_TYPE, true),
            rds: DeltaType::new(ROUTE_TYPE, false),
            sds: DeltaType::new(SECRET_TYPE, false),
            fetch: FetchTimeouts::default(),
        };
        c.eds.names = needs.eds.iter().cloned().collect();
        c.rds.names = needs.rds.iter().cloned().collect();
        c.sds.names = needs.sds.iter().cloned().collect();
        c.arm_fetch_timeouts(needs);
        c
    }

    pub fn has_config(&self) -> bool {
        !self.cds.versions.is_empty() || !self.lds.versions.is_empty()
    }

    pub async fn session(&mut self, target: &Target) -> Result<(), String> {
        let (addr, mut client) = connect(target, &self.config.authority).await?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        let mut first = true;
        let kinds = [
            (&self.cds, self.config.cds),
            (&self.eds, !self.eds.names.is_empty()),
            (&self.lds, self.config.lds),
            (&self.rds, !self.rds.names.is_empty()),
            (&self.sds, !self.sds.names.is_empty()),
        ];
        let mut initial = Vec::new();
        for (state, on) in kinds {
            if on {
                initial.push(state.subscribe(if first { self.node.as_ref() } else { None }));
                first = false;
            }
        }
        for req in initial {
            send(&tx, req).await?;
        }
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut responses = client
            .delta_aggregated_resources(requests)
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        log::info!(
            "delta xDS stream to '{}' ({addr}) open",
            self.config.ads_cluster
        );
        let _connected = super::client::Connected::open();
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

    fn handle(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<DeltaDiscoveryRequest> {
        let mut candidate = self.dynamic.clone();
        candidate.versions.insert(
            resp.type_url.clone(),
            (resp.system_version_info.clone(), super::now_unix()),
        );
        let decoded = match resp.type_url.as_str() {
            CLUSTER_TYPE => upsert(resp, &mut candidate.clusters, |c: &ClusterProto| {
                c.name.clone()
            }),
            ENDPOINT_TYPE => upsert_map(
                resp,
                &mut candidate.endpoints,
                |c: &ClusterLoadAssignment| c.cluster_name.clone(),
            ),
            LISTENER_TYPE => upsert(resp, &mut candidate.listeners, |l: &ListenerProto| {
                l.name.clone()
            }),
            ROUTE_TYPE => upsert_map(resp, &mut candidate.routes, |r: &RouteConfiguration| {
                r.name.clone()
            }),
            SECRET_TYPE => upsert_map(resp, &mut candidate.secrets, |s: &crate::tls::Secret| {
                s.name.clone()
            }),
            other => {
                log::warn!("delta xDS: ignoring type {other}");
                return Vec::new();
            }
        };
        let state = match resp.type_url.as_str() {
            CLUSTER_TYPE => &mut self.cds,
            ENDPOINT_TYPE => &mut self.eds,
            LISTENER_TYPE => &mut self.lds,
            SECRET_TYPE => &mut self.sds,
            _ => &mut self.rds,
        };
        if let Err(reason) = decoded {
            return vec![state.nack(&resp.nonce, &reason)];
        }
        match (self.apply)(candidate.clone()) {
            Err(reason) => {
                log::error!("delta xDS: rejected {}: {reason}", resp.type_url);
                super::client::count_update(&resp.type_url, false);
                vec![state.nack(&resp.nonce, &reason)]
            }
            Ok(needs) => {
                for r in &resp.resources {
                    state.versions.insert(r.name.clone(), r.version.clone());
                }
                for name in &resp.removed_resources {
                    state.versions.remove(name);
                }
                super::client::count_update(&resp.type_url, true);
                let mut out = vec![state.ack(&resp.nonce)];
                candidate.endpoints.retain(|k, _| needs.eds.contains(k));
                candidate.routes.retain(|k, _| needs.rds.contains(k));
                candidate.secrets.retain(|k, _| needs.sds.contains(k));
                self.dynamic = candidate;
                self.arm_fetch_timeouts(&needs);
                out.extend(self.eds.resubscribe(&needs.eds));
                out.extend(self.rds.resubscribe(&needs.rds));
                out.extend(self.sds.resubscribe(&needs.sds));
                out
            }
        }
    }
}

impl DeltaClient {
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
}

/// Applies added/updated and removed resources to a by-name map.
fn upsert<T: Message + Default>(
    resp: &DeltaDiscoveryResponse,
    map: &mut std::collections::BTreeMap<String, T>,
    name_of: impl Fn(&T) -> String,
) -> Result<(), String> {
    for (i, r) in resp.resources.iter().enumerate() {
        let Some(any) = &r.resource else { continue };
        let v = T::decode(any.value.as_slice()).map_err(|e| format!("resources[{i}]: {e}"))?;
        map.insert(name_of(&v), v);
    }
    for name in &resp.removed_resources {
        map.remove(name);
    }
    Ok(())
}

fn upsert_map<T: Message + Default>(
    resp: &DeltaDiscoveryResponse,
    map: &mut HashMap<String, T>,
    name_of: impl Fn(&T) -> String,
) -> Result<(), String> {
    for (i, r) in resp.resources.iter().enumerate() {
        let Some(any) = &r.resource else { continue };
        let v = T::decode(any.value.as_slice()).map_err(|e| format!("resources[{i}]: {e}"))?;
        map.insert(name_of(&v), v);
    }
    for name in &resp.removed_resources {
        map.remove(name);
    }
    Ok(())
}

async fn send(
    tx: &mpsc::Sender<DeltaDiscoveryRequest>,
    req: DeltaDiscoveryRequest,
) -> Result<(), String> {
    tx.send(req)
        .await
        .map_err(|_| "the stream closed".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resubscribe_sends_only_the_difference() {
        let mut t = DeltaType::new(ENDPOINT_TYPE, false);
        let r = t.resubscribe(&["a".into(), "b".into()]).unwrap();
        assert_eq!(r.resource_names_subscribe, ["a", "b"]);
        t.versions.insert("a".into(), "1".into());
        let r = t.resubscribe(&["b".into(), "c".into()]).unwrap();
        assert_eq!(r.resource_names_subscribe, ["c"]);
        assert_eq!(r.resource_names_unsubscribe, ["a"]);
        assert!(!t.versions.contains_key("a"));
        assert!(t.resubscribe(&["b".into(), "c".into()]).is_none());
    }

    #[test]
    fn a_new_stream_announces_held_versions() {
        let mut t = DeltaType::new(CLUSTER_TYPE, true);
        t.versions.insert("svc".into(), "7".into());
        let r = t.subscribe(None);
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        assert_eq!(
            r.initial_resource_versions.get("svc").map(String::as_str),
            Some("7")
        );
    }
}
