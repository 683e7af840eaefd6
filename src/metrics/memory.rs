//! What each part of the member holds in memory, and its bound: counted where the part
//! changes (a few atomic adds), reported on `/metrics` as `quorumkv_memory_bytes{part}` and
//! `quorumkv_memory_limit_bytes{part}`.
//!
//! Parts: `backend_cache` (sled's page cache: sled does not say how full it is, so its use is
//! reported as the smaller of its capacity and the store's size), `raft_log` (entries held
//! in memory until a snapshot compacts them), `key_index` (an estimate: keys, revisions and
//! the structures around them), `watch_queues` (responses queued to watch streams and events
//! waiting for delivery), `snapshot_transfer` (image chunks sent and not yet acknowledged,
//! and buffers of images being written).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The backend's page cache, at most (`--backend-cache-bytes`): set before the backend opens,
/// one member per process.
pub static BACKEND_CACHE_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_BACKEND_CACHE_BYTES);
pub const DEFAULT_BACKEND_CACHE_BYTES: u64 = 64 << 20;

pub fn backend_cache_bytes() -> u64 {
    BACKEND_CACHE_BYTES.load(Ordering::Relaxed)
}

/// One part's bytes, kept by whoever changes it.
#[derive(Debug, Default)]
pub struct PartBytes(AtomicI64);

impl PartBytes {
    pub const fn new() -> Self {
        PartBytes(AtomicI64::new(0))
    }

    pub fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes as i64, Ordering::Relaxed);
    }

    pub fn sub(&self, bytes: usize) {
        self.0.fetch_sub(bytes as i64, Ordering::Relaxed);
    }

    pub fn set(&self, bytes: u64) {
        self.0.store(bytes as i64, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed).max(0)
    }
}

/// The parts counted as they change (the others are read at a scrape).
pub struct Memory {
    /// Raft log entries in memory.
    pub raft_log: PartBytes,
    /// Image bytes in flight to followers and buffered while written.
    pub snapshot_transfer: PartBytes,
}

/// This process's parts (one member per process, but in tests and the simulator).
pub static MEMORY: Memory = Memory {
    raft_log: PartBytes::new(),
    snapshot_transfer: PartBytes::new(),
};

/// The parts' names, as `/metrics` labels them.
pub const PARTS: [&str; 5] = [
    "backend_cache",
    "raft_log",
    "key_index",
    "watch_queues",
    "snapshot_transfer",
];
