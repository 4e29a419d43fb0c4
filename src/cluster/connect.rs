//! Upstream TCP connects for clusters whose `connect_timeout` is under a second.
//!
//! Pingora bounds a connect with its own process-wide timer wheel when the timeout is under
//! a second (longer ones go to the worker's Tokio timer, see `ListenerManager::new`). That
//! wheel's clock thread, once started, wakes every 10 ms for the rest of the process's
//! life, and Envoy's own examples use `connect_timeout: 0.25s`. These clusters connect
//! through this connector instead, with a Tokio timer; Pingora still sets TCP_NODELAY and
//! keepalive on the stream and does any TLS handshake after it.

use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType, Result};

/// Connect timeouts from this long on are left to Pingora: its timer for them is Tokio's.
pub const PINGORA_TOKIO_THRESHOLD: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct TokioConnect {
    pub timeout: Duration,
}

#[async_trait]
impl L4Connect for TokioConnect {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::ConnectError, "not a TCP address");
        };
        match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(inet)).await {
            Ok(Ok(stream)) => Ok(stream.into()),
            Ok(Err(e)) => Err(Error::because(
                connect_error_type(&e),
                format!("Fail to connect to {addr}"),
                e,
            )),
            Err(_) => Error::e_explain(
                ErrorType::ConnectTimedout,
                format!("timeout {:?} connecting to server {addr}", self.timeout),
            ),
        }
    }
}

/// The error types Pingora's own connector gives the same failures (the retry policy and
/// the response flags tell them apart).
pub(crate) fn connect_error_type(e: &std::io::Error) -> ErrorType {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
        ErrorKind::TimedOut => ErrorType::ConnectTimedout,
        ErrorKind::AddrNotAvailable => ErrorType::BindError,
        ErrorKind::PermissionDenied | ErrorKind::AddrInUse => ErrorType::InternalError,
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => ErrorType::ConnectNoRoute,
        _ => ErrorType::ConnectError,
    }
}
