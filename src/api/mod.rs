//! The client-facing API: etcd's v3 gRPC services over tonic. Services (and methods) not built
//! yet answer gRPC `Unimplemented`.

mod auth;
mod cluster;
mod coalesce;
mod concurrency;
pub mod corruption;
pub(crate) mod forward;
mod gateway;
mod grpc_metrics;
mod h2fix;
mod health;
mod kv;
mod lease;
mod limit;
mod maintenance;
mod serve;
mod status;
pub(crate) mod unary;
pub(crate) mod watch;

pub use auth::{AuthService, PeerCommonName, AUTHORIZATION, TOKEN_METADATA};
pub use cluster::ClusterService;
pub use coalesce::CoalescedWrites;
pub use concurrency::{ElectionService, LockService};
pub use forward::set_forwarding_tls;
pub use gateway::routes as gateway_routes;
pub use grpc_metrics::GrpcMetrics;
pub use h2fix::AuthorityFix;
pub use health::{fallback, routes as probe_routes};
pub use kv::KvService;
pub use lease::LeaseService;
pub use maintenance::{remove_stale_images, MaintenanceService};
pub use serve::serve;
pub use status::to_status;
pub use unary::UnaryKvLayer;
pub use watch::WatchService;

use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};

// gRPC's header names as constants: a lookup or insert by `&str` parses the name each time.
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The trailers that end a call that succeeded.
fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
    trailers
}

/// The etcd API version quorumkv speaks, reported by `Maintenance.Status`.
pub const ETCD_API_VERSION: &str = crate::server::ETCD_VERSION;

/// `Maintenance.Status.version`: the etcd API version, with quorumkv's own as semver build
/// metadata (`3.5.0+quorumkv.0.1.0`): a client that parses it as a version reads 3.5.0.
pub const STATUS_VERSION: &str = concat!("3.5.0+quorumkv.", env!("CARGO_PKG_VERSION"));

/// Room for gRPC framing above `--max-request-bytes`, as etcd allows.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
