//! quorumkv's fuzz targets, as a library so that a crash input can also be replayed by a plain
//! test or binary. Each `run` takes the fuzzer's bytes, drives real quorumkv code with them and
//! panics when a property fails; `fuzz_targets/` only hands the bytes over.
//!
//! - `wal`: bytes as WAL segments, and a written-crashed-read-back log against a model.
//! - `mvcc`: operations on the real mvcc store on sled (or the in-memory backend) against a
//!   model of revisions, with crashes and reopens.
//! - `peer`: bytes as an inbound peer batch, stepped into a raft node whose log is persisted to
//!   a real WAL; the node must refuse what is malformed and keep its log intact.
//! - `replication`: bytes as a fault schedule for a simulated cluster, checked by the
//!   simulator's checkers.
//!
//! Built with `--cfg madsim` (the simulator needs it): `ci/fuzz`.

/// Prints when FUZZ_TRACE is set: what a replayed input does, step by step.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if std::env::var_os("FUZZ_TRACE").is_some() {
            eprintln!($($arg)*);
        }
    };
}

pub mod input;
pub mod mvcc;
pub mod peer;
pub mod replication;
pub mod wal;

/// A raft entry carrying `data`.
pub fn entry(term: u64, index: u64, data: &[u8]) -> raft::eraftpb::Entry {
    raft::eraftpb::Entry {
        term,
        index,
        data: data.to_vec().into(),
        ..Default::default()
    }
}
