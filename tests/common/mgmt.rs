//! A scripted ADS management server for tests and benchmarks: it records every request
//! and pushes whatever responses the caller gives it to every open stream.
#![allow(dead_code)]

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct Shared {
    requests: Vec<DiscoveryRequest>,
    streams: Vec<mpsc::Sender<Result<DiscoveryResponse, Status>>>,
    streams_opened: usize,
    delta_requests: Vec<DeltaDiscoveryRequest>,
    delta_streams: Vec<mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>>,
}

#[derive(Clone, Default)]
struct Mgmt(Arc<Mutex<Shared>>);

type Out = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaOut = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Mgmt {
    type StreamAggregatedResourcesStream = Out;
    type DeltaAggregatedResourcesStream = DeltaOut;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Out>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        {
            let mut s = self.0.lock().unwrap();
            s.streams.push(tx);
            s.streams_opened += 1;
        }
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = incoming.message().await {
                shared.lock().unwrap().requests.push(req);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaOut>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        {
            let mut s = self.0.lock().unwrap();
            s.delta_streams.push(tx);
            s.streams_opened += 1;
        }
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = incoming.message().await {
                shared.lock().unwrap().delta_requests.push(req);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub struct Server {
    mgmt: Mgmt,
    pub port: u16,
    rt: tokio::runtime::Runtime,
}

impl Server {
    pub fn start() -> Server {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mgmt = Mgmt::default();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let svc = AggregatedDiscoveryServiceServer::new(mgmt.clone());
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        Server { mgmt, port, rt }
    }

    pub fn push(&self, type_url: &str, version: &str, resources: Vec<Vec<u8>>) {
        let resp = DiscoveryResponse {
            version_info: version.into(),
            type_url: type_url.into(),
            nonce: format!("nonce-{version}"),
            resources: resources
                .into_iter()
                .map(|value| Any {
                    type_url: type_url.into(),
                    value,
                })
                .collect(),
            ..Default::default()
        };
        let streams = self.mgmt.0.lock().unwrap().streams.clone();
        assert!(!streams.is_empty(), "a stream is open");
        for tx in streams {
            // A client that went away is skipped; the others still get the push.
            let _ = self.rt.block_on(tx.send(Ok(resp.clone())));
        }
    }

    pub fn disconnect(&self) {
        self.mgmt.0.lock().unwrap().streams.clear();
    }

    pub fn requests(&self) -> Vec<DiscoveryRequest> {
        self.mgmt.0.lock().unwrap().requests.clone()
    }

    pub fn streams(&self) -> usize {
        self.mgmt.0.lock().unwrap().streams_opened
    }

    /// Pushes a delta response: (name, version, encoded resource) upserts and removals.
    pub fn push_delta(
        &self,
        type_url: &str,
        nonce: &str,
        resources: Vec<(&str, &str, Vec<u8>)>,
        removed: Vec<&str>,
    ) {
        let resp = DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: nonce.into(),
            resources: resources
                .into_iter()
                .map(|(name, version, value)| {
                    envoy_types::pb::envoy::service::discovery::v3::Resource {
                        name: name.into(),
                        version: version.into(),
                        resource: Some(Any {
                            type_url: type_url.into(),
                            value,
                        }),
                        ..Default::default()
                    }
                })
                .collect(),
            removed_resources: removed.into_iter().map(String::from).collect(),
            ..Default::default()
        };
        let streams = self.mgmt.0.lock().unwrap().delta_streams.clone();
        assert!(!streams.is_empty(), "a delta stream is open");
        for tx in streams {
            let _ = self.rt.block_on(tx.send(Ok(resp.clone())));
        }
    }

    pub fn delta_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.mgmt.0.lock().unwrap().delta_requests.clone()
    }

    pub fn disconnect_delta(&self) {
        self.mgmt.0.lock().unwrap().delta_streams.clear();
    }
}
