//! quorumkv: a Raft key/value store that speaks etcd's v3 API.

pub mod alarm;
/// The gRPC services: not part of the simulated build (the simulator drives `server` directly).
#[cfg(not(madsim))]
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod hash;
pub mod hooks;
pub mod io;
pub mod lease;
pub mod metrics;
pub mod mvcc;
pub mod proto;
/// The proxies. The gateway and the gRPC proxy's services are not part of the simulated
/// build; the gRPC proxy's watch coalescing and read cache are (the simulator puts them in the
/// path).
pub mod proxy;
pub mod raft;
pub mod server;
/// The snapshot tool's verbs (save, status, restore): not part of the simulated build.
#[cfg(not(madsim))]
pub mod snapshot;
/// TLS for the client and peer ports: not part of the simulated build.
#[cfg(not(madsim))]
pub mod tls;
pub mod v2;
pub mod wal;
pub mod watch;
