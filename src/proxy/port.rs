//! What the proxy's watch coalescing (`broker`) and read cache (`cache`) need of the cluster,
//! as a port: the gRPC proxy reaches the members over gRPC (`grpc::upstream`); the simulator
//! reaches its simulated members directly, so that the same coalescing and cache code runs
//! under its faults.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::proto::etcdserverpb::{RangeRequest, RangeResponse, WatchRequest, WatchResponse};

/// A boxed future, as the port's methods return.
pub type PortFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answers of one upstream watch stream.
pub type Answers = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

/// An upstream watch stream, and the link it was opened on (named in `broke`).
pub struct Opened {
    pub answers: Answers,
    pub generation: u64,
}

pub trait ClusterPort: Send + Sync + 'static {
    /// Opens a watch stream on the endpoint in use, with `token` (empty: none) as its
    /// credentials; `requests` are its requests, in order.
    fn open_watch(
        &self,
        token: &[u8],
        requests: mpsc::UnboundedReceiver<WatchRequest>,
    ) -> PortFuture<'_, Result<Opened, Status>>;

    /// A range read on the endpoint in use, with the caller's credentials (`token` and
    /// `authorization` metadata). A read that finds the endpoint gone is tried on the next.
    fn range(
        &self,
        request: RangeRequest,
        credentials: &MetadataMap,
    ) -> PortFuture<'_, Result<RangeResponse, Status>>;

    /// The stream opened on link `generation` broke (`status`), or the member ended it
    /// (`None`): the port moves to the next endpoint when the one in use is gone.
    fn broke(&self, generation: u64, status: Option<&Status>);

    /// The endpoint in use, for the log.
    fn endpoint(&self) -> String;
}

/// The auth token `credentials` carry (etcd's `token` metadata), empty for none: a feed of
/// upstream watchers is shared only by clients of the same token.
pub fn token_of(credentials: &MetadataMap) -> Vec<u8> {
    credentials
        .get(crate::auth::TOKEN_METADATA)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default()
}

/// The credentials `credentials` carry upstream (token, then the gateway's `authorization`),
/// as bytes: part of a cache key where answers differ by permission.
pub fn identity_of(credentials: &MetadataMap) -> Vec<u8> {
    let mut identity = Vec::new();
    for name in [crate::auth::TOKEN_METADATA, crate::auth::AUTHORIZATION] {
        if let Some(value) = credentials.get(name) {
            identity.extend_from_slice(value.as_bytes());
            identity.push(0);
        }
    }
    identity
}
