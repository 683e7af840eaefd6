//! The node: a sans-IO driver over `raft::RawNode` (`core`) and the async shell that runs it on
//! the ports (`shell`). The simulator runs the same shell on simulated ports.

mod core;
mod dedupe;
mod shell;
mod storage;

pub use self::core::{
    single_change, CoreOptions, PeerMessageRefused, PeerProgress, RaftCore, ReadyWork,
};
pub use shell::{
    spawn_node, Applied, ApplyBatch, NodeError, NodeHandle, NodeOptions, NodeStatus, StartedNode,
    BOOTSTRAP_INDEX,
};
pub use storage::SnapshotRequests;
