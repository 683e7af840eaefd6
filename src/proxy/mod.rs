//! Proxies that stand between clients and a cluster. `tcp`: etcd's L4 gateway
//! (`quorumkv gateway start`); `grpc`: etcd's gRPC proxy (`quorumkv grpc-proxy start`). The
//! gRPC proxy's watch coalescing (`broker`) and read cache (`cache`) reach the cluster through
//! a port (`port`), so that the simulator runs them too, over its simulated members.

pub mod broker;
pub mod cache;
#[cfg(not(madsim))]
mod gateway;
#[cfg(not(madsim))]
pub mod grpc;
pub mod metrics;
pub mod port;
#[cfg(not(madsim))]
pub mod tcp;

#[cfg(not(madsim))]
pub(crate) use gateway::listen_address;
#[cfg(not(madsim))]
pub use gateway::{run_gateway, GatewayVerb};
