//! Hashes of the store for consistency checks between members: `HashKV` (the key space up to a
//! revision, equal on every member that applied the same log) and `Hash` (the whole backend,
//! metadata included, so it differs between members as etcd's does).

use super::error::MvccError;
use super::revision::{records, runs_end, Revision, RUN_PREFIX};
use super::store::{bad_run, MvccStore};

/// A `HashKV` answer: the hash, the compaction revision it was taken under, and the revision
/// it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    pub compact_revision: i64,
    pub hash_revision: i64,
}

impl MvccStore {
    /// CRC32C over every revision record at or below `revision` (0: the newest) still kept,
    /// in revision order: each record's main and sub revision (big-endian) and its encoded
    /// `KeyValue`. Independent of how a member batched its records into backend keys. Every
    /// applied write must be in the backend (a store job's view).
    pub fn hash_kv(&self, revision: i64) -> Result<KvHash, MvccError> {
        let revision = if revision <= 0 {
            self.current_rev
        } else {
            revision
        };
        if revision > self.current_rev {
            return Err(MvccError::FutureRev);
        }
        if revision < self.compact_rev {
            return Err(MvccError::Compacted);
        }
        self.require_flushed()?;
        let last = Revision::new(revision, i64::MAX);
        let mut hash = 0u32;
        let mut failure = None;
        self.backend
            .scan(&[RUN_PREFIX], Some(&runs_end()), &mut |_, run| {
                for record in records(run) {
                    match record {
                        Ok((rev, _)) if rev > last => return false,
                        Ok((rev, bytes)) => {
                            hash = crc32c::crc32c_append(hash, &(rev.main as u64).to_be_bytes());
                            hash = crc32c::crc32c_append(hash, &(rev.sub as u64).to_be_bytes());
                            hash = crc32c::crc32c_append(hash, bytes);
                        }
                        Err(reason) => {
                            failure = Some(bad_run(reason));
                            return false;
                        }
                    }
                }
                true
            })?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(KvHash {
            hash,
            compact_revision: self.compact_rev,
            hash_revision: revision,
        })
    }

    /// CRC32C over every backend key and value, in key order, of a flushed store.
    pub fn hash_backend(&self) -> Result<u32, MvccError> {
        self.require_flushed()?;
        let mut hash = 0u32;
        self.backend.scan(&[], None, &mut |key, value| {
            hash = crc32c::crc32c_append(hash, key);
            hash = crc32c::crc32c_append(hash, value);
            true
        })?;
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::io::MemBackend;
    use crate::mvcc::snapshot::tests::put;
    use crate::proto::etcdserverpb::CompactionRequest;
    use crate::proto::quorumkvpb::raft_request::Request;

    #[test]
    fn hash_kv_is_equal_whatever_the_batching_and_changes_with_any_record() {
        // One member flushes after every write, the other once: different runs, same records.
        let mut a = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        let mut b = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        for (i, (k, v)) in [("a", "1"), ("b", "2"), ("a", "3")].into_iter().enumerate() {
            put(&mut a, i as u64 + 1, k, v);
            a.flush_staged().expect("flush");
            put(&mut b, i as u64 + 1, k, v);
        }
        a.flush_staged().expect("flush");
        b.flush_staged().expect("flush");
        assert!(b.hash_kv(0).is_ok() && a.hash_kv(0).is_ok(), "both flushed");
        let at_a = a.hash_kv(0).expect("hash");
        assert_eq!(at_a, b.hash_kv(0).expect("hash"));
        assert_eq!(at_a.hash_revision, 4);
        assert_eq!(
            a.hash_kv(3).expect("hash"),
            b.hash_kv(3).expect("hash"),
            "same at an older revision"
        );
        assert_ne!(
            a.hash_kv(3).expect("hash"),
            at_a,
            "an older revision hashes less"
        );
        put(&mut b, 4, "c", "4");
        assert!(
            b.hash_kv(0).is_err(),
            "staged writes are refused, not left out"
        );
        b.flush_staged().expect("flush");
        assert_ne!(b.hash_kv(0).expect("hash").hash, at_a.hash);
        assert_eq!(
            b.hash_kv(4).expect("hash"),
            at_a,
            "a later write does not change an earlier hash"
        );
        assert!(matches!(a.hash_kv(9), Err(MvccError::FutureRev)));
        a.apply(
            5,
            &Request::Compaction(CompactionRequest {
                revision: 3,
                physical: true,
            }),
        )
        .expect("compact");
        a.flush_staged().expect("flush");
        assert!(matches!(a.hash_kv(2), Err(MvccError::Compacted)));
        assert_eq!(a.hash_kv(0).expect("hash").compact_revision, 3);
    }

    #[test]
    fn hash_backend_covers_metadata_that_hash_kv_leaves_out() {
        // The same write at different raft indexes: the same key space, other metadata.
        let mut a = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        let mut b = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        put(&mut a, 1, "a", "1");
        put(&mut b, 2, "a", "1");
        a.flush_staged().expect("flush");
        b.flush_staged().expect("flush");
        assert_eq!(a.hash_kv(0).expect("hash"), b.hash_kv(0).expect("hash"));
        assert_ne!(
            a.hash_backend().expect("hash"),
            b.hash_backend().expect("hash")
        );
    }
}
