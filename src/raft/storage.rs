//! The log raft reads: entries in memory (raft-rs's `MemStorage`; the WAL is what makes them
//! durable) plus the newest snapshot *with data*, built on demand when a follower needs one.
//!
//! raft asks `snapshot()` when a follower is behind the compacted log. Building one means
//! dumping the backend at an applied index, which only the apply loop can do: so the first ask
//! answers "temporarily unavailable" and raises `wanted`; the apply loop builds the data and
//! hands it back through the node (`RaftCore::offer_snapshot`); raft asks again and gets it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use raft::eraftpb::{Entry, Snapshot};

use super::core::is_member;
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use tokio::sync::Notify;

/// Shared between the node (raft's storage) and the apply loop (which builds snapshots).
#[derive(Default)]
pub struct SnapshotRequests {
    wanted: AtomicBool,
    notify: Notify,
    latest: Mutex<Option<Snapshot>>,
}

impl SnapshotRequests {
    /// Waits until raft wants a snapshot with data, and takes the request.
    pub async fn wanted(&self) {
        loop {
            if self.wanted.swap(false, Ordering::AcqRel) {
                return;
            }
            self.notify.notified().await;
        }
    }

    fn request(&self) {
        self.wanted.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Snapshot>> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
pub struct NodeStorage {
    pub mem: MemStorage,
    pub snapshots: Arc<SnapshotRequests>,
}

impl NodeStorage {
    pub fn new(snapshots: Arc<SnapshotRequests>) -> Self {
        NodeStorage {
            mem: MemStorage::new(),
            snapshots,
        }
    }

    /// Offers a snapshot with data for raft to send.
    pub fn set_latest(&self, snapshot: Snapshot) {
        *self.snapshots.lock() = Some(snapshot);
    }
}

impl Storage for NodeStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // Useful only if it reaches the log we still have: a follower resumes right after it.
        // And only if its configuration has the follower: one made before the follower was
        // added would be ignored by it (raft-rs does not restore a snapshot that leaves it
        // out), and the leader would wait for it forever.
        let needed = request_index.max(self.mem.first_index()?.saturating_sub(1));
        if let Some(snapshot) = self.snapshots.lock().as_ref() {
            let metadata = snapshot.get_metadata();
            if metadata.index >= needed && is_member(metadata.get_conf_state(), to) {
                return Ok(snapshot.clone());
            }
        }
        self.snapshots.request();
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
