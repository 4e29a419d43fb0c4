//! State-of-the-world xDS bookkeeping for one resource type: what is subscribed, the last
//! accepted version, and the ACK or NACK to send for each response. Plain data, so the
//! protocol rules are tested without a stream.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;

/// gRPC INVALID_ARGUMENT, the code Envoy puts in a NACK's error_detail.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Clone, Default)]
pub struct TypeState {
    pub type_url: String,
    /// Resource names asked for; empty means all (wildcard), as for CDS.
    pub names: Vec<String>,
    /// The version of the last accepted response ("" before any).
    pub version: String,
    /// The nonce of the last response seen.
    pub nonce: String,
}

impl TypeState {
    pub fn new(type_url: &str) -> Self {
        TypeState {
            type_url: type_url.to_string(),
            ..TypeState::default()
        }
    }

    /// The subscription request: sent first, after a reconnect (with the last accepted
    /// version, so the server can skip unchanged state), and when the names change.
    pub fn subscribe(&self, node: Option<&Node>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: self.version.clone(),
            node: node.cloned(),
            resource_names: self.names.clone(),
            type_url: self.type_url.clone(),
            response_nonce: self.nonce.clone(),
            ..Default::default()
        }
    }

    /// Records a response that was applied, and returns its ACK.
    pub fn ack(&mut self, resp: &DiscoveryResponse) -> DiscoveryRequest {
        self.version = resp.version_info.clone();
        self.nonce = resp.nonce.clone();
        DiscoveryRequest {
            version_info: self.version.clone(),
            resource_names: self.names.clone(),
            type_url: self.type_url.clone(),
            response_nonce: self.nonce.clone(),
            ..Default::default()
        }
    }

    /// Records a rejected response and returns the NACK: the previous version, this nonce,
    /// and the reason.
    pub fn nack(&mut self, resp: &DiscoveryResponse, reason: &str) -> DiscoveryRequest {
        self.nonce = resp.nonce.clone();
        DiscoveryRequest {
            version_info: self.version.clone(),
            resource_names: self.names.clone(),
            type_url: self.type_url.clone(),
            response_nonce: self.nonce.clone(),
            error_detail: Some(Status {
                code: INVALID_ARGUMENT,
                message: reason.to_string(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    /// Forgets the stream's nonce (a new stream starts without one).
    pub fn reset_stream(&mut self) {
        self.nonce.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(version: &str, nonce: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            nonce: nonce.into(),
            type_url: "t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn ack_carries_the_version_and_nonce() {
        let mut s = TypeState::new("t");
        let a = s.ack(&resp("v1", "n1"));
        assert_eq!(
            (a.version_info.as_str(), a.response_nonce.as_str()),
            ("v1", "n1")
        );
        assert!(a.error_detail.is_none());
    }

    #[test]
    fn nack_keeps_the_last_good_version() {
        let mut s = TypeState::new("t");
        s.ack(&resp("v1", "n1"));
        let n = s.nack(&resp("v2", "n2"), "clusters[0]: bad");
        assert_eq!(
            (n.version_info.as_str(), n.response_nonce.as_str()),
            ("v1", "n2")
        );
        assert_eq!(n.error_detail.unwrap().message, "clusters[0]: bad");
    }

    #[test]
    fn resubscribe_after_reconnect_sends_the_accepted_version_without_nonce() {
        let mut s = TypeState::new("t");
        s.names = vec!["a".into()];
        s.ack(&resp("v3", "n3"));
        s.reset_stream();
        let r = s.subscribe(None);
        assert_eq!(
            (r.version_info.as_str(), r.response_nonce.as_str()),
            ("v3", "")
        );
        assert_eq!(r.resource_names, ["a"]);
    }
}
