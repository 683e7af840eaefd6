//! The client-facing API: etcd's v3 gRPC services over tonic. Services (and methods) not built
//! yet answer gRPC `Unimplemented`.

mod cluster;
mod coalesce;
mod concurrency;
mod forward;
mod gateway;
mod h2fix;
mod kv;
mod lease;
mod maintenance;
mod serve;
mod status;
mod unary;
mod watch;

pub use cluster::ClusterService;
pub use coalesce::CoalescedWrites;
pub use concurrency::{ElectionService, LockService};
pub use gateway::routes as gateway_routes;
pub use h2fix::AuthorityFix;
pub use kv::KvService;
pub use lease::LeaseService;
pub use maintenance::MaintenanceService;
pub use serve::serve;
pub use status::to_status;
pub use unary::UnaryKvLayer;
pub use watch::WatchService;

/// The etcd API version quorumkv speaks, reported by `Maintenance.Status`.
pub const ETCD_API_VERSION: &str = "3.5.0";

/// Room for gRPC framing above `--max-request-bytes`, as etcd allows.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
