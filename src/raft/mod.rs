//! The node: a sans-IO driver over `raft::RawNode` (`core`) and the async shell that runs it on
//! the ports (`shell`). The simulator runs the same shell on simulated ports.

mod core;
mod dedupe;
mod image;
mod shell;
mod storage;
mod transfer;

pub use self::core::{
    single_change, CoreOptions, PeerMessageRefused, PeerProgress, RaftCore, ReadyWork,
};
pub use image::{ImageRef, ImageStore};
pub use shell::{
    spawn_node, Applied, ApplyBatch, NodeError, NodeHandle, NodeOptions, NodeStatus, StartedNode,
    BOOTSTRAP_INDEX,
};
pub use storage::SnapshotRequests;
pub use transfer::{
    CHUNK_BYTES as SNAPSHOT_CHUNK_BYTES,
    TRANSFER_BYTES_PER_FOLLOWER as SNAPSHOT_TRANSFER_BYTES_PER_FOLLOWER,
};
