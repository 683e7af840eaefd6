//! Glue between the API and the node: a request becomes a proposal, waits for its entry to be
//! applied, and returns what the apply produced; reads go through ReadIndex (linearizable) or
//! straight to local state (serializable).

mod apply;
mod auth;
mod cluster;
mod compactor;
mod concurrency;
mod error;
mod kv;
mod lease;
mod maintenance;
mod start;
mod v2;

pub use apply::{run_apply_loop, StoreJob};
pub use auth::{auth_error, AuthConfig, UserInfo};
pub use cluster::valid_peer_urls;
pub use compactor::{AutoCompaction, Compactor};
pub use concurrency::{holder_key, prefix, prefix_end};
pub use error::ServerError;
pub use kv::{KvServer, Precheck, ServerConfig, StatusReport};
pub use lease::LeaseClock;
pub use maintenance::{Unhealthy, DEFAULT_QUOTA_BACKEND_BYTES, MAX_SUGGESTED_QUOTA_BACKEND_BYTES};
pub use start::{start_member, MemberConfig, RunningMember, StartError, SNAPSHOT_CATCH_UP_ENTRIES};
pub use v2::{V2Wait, V2_SYNC_INTERVAL};

/// The etcd API version quorumkv serves: `/version`, `Maintenance.Status`, the metrics.
/// (`api::STATUS_VERSION` repeats it with quorumkv's version.)
pub const ETCD_VERSION: &str = "3.5.0";

#[cfg(test)]
mod tests;
