//! The whole store as bytes: what a raft snapshot carries to a follower that is behind the
//! compacted log, and how that follower (or a member restarting after receiving one) restores it.
//!
//! Format: `QKVDB1`, then for every backend key in order `[key len u32 LE][key][value len u32
//! LE][value]`. The snapshot file and the transport protect it with their own checksums.

use std::sync::Arc;

use super::error::MvccError;
use super::revision::{encode_u64, meta_key, META_CONSISTENT_INDEX, RUN_PREFIX};
use super::store::{IndexBuild, MvccStore};
use crate::io::Backend;

const MAGIC: &[u8; 6] = b"QKVDB1";

fn corrupt(reason: &str) -> MvccError {
    MvccError::Corrupt {
        main: -1,
        sub: -1,
        reason: format!("snapshot data: {reason}"),
    }
}

fn image_error(e: std::io::Error) -> MvccError {
    MvccError::Backend(crate::io::BackendError::Store(format!(
        "writing the snapshot image: {e}"
    )))
}

/// A backend key and its value, read from an image.
pub type OwnedPair = (Vec<u8>, Vec<u8>);

/// Reads an image (as `write_image` and `end_image` write it) from a stream, a key and its
/// value at a time: a file of any size is read in bounded memory.
pub struct ImageReader<R> {
    input: R,
    started: bool,
    ended: bool,
}

impl<R: std::io::Read> ImageReader<R> {
    pub fn new(input: R) -> Self {
        ImageReader {
            input,
            started: false,
            ended: false,
        }
    }

    /// Fills `buf`; `Ok(false)` if the input ended before its first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, MvccError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.input.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(corrupt("truncated")),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(image_error(e)),
            }
        }
        Ok(true)
    }

    fn chunk(&mut self, len: [u8; 4]) -> Result<Vec<u8>, MvccError> {
        let mut chunk = vec![0; u32::from_le_bytes(len) as usize];
        if !self.fill(&mut chunk)? && !chunk.is_empty() {
            return Err(corrupt("truncated"));
        }
        Ok(chunk)
    }

    /// The next backend key and value; `None` at the image's end.
    pub fn next_pair(&mut self) -> Result<Option<OwnedPair>, MvccError> {
        if !self.started {
            let mut magic = [0; MAGIC.len()];
            if !self.fill(&mut magic)? || &magic != MAGIC {
                return Err(corrupt("bad magic: not a quorumkv snapshot image"));
            }
            self.started = true;
        }
        if self.ended {
            return Ok(None);
        }
        let mut len = [0; 4];
        if !self.fill(&mut len)? {
            self.ended = true;
            return Ok(None);
        }
        if len == IMAGE_END {
            self.ended = true;
            let mut rest = [0; 512];
            loop {
                match self.input.read(&mut rest) {
                    Ok(0) => return Ok(None),
                    Ok(n) if rest[..n].iter().all(|b| *b == 0) => {}
                    Ok(_) => return Err(corrupt("bytes after the end mark")),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(image_error(e)),
                }
            }
        }
        let key = self.chunk(len)?;
        let mut len = [0; 4];
        if !self.fill(&mut len)? {
            return Err(corrupt("truncated"));
        }
        let value = self.chunk(len)?;
        Ok(Some((key, value)))
    }
}

/// In place of a key's length: the image ends here; zeros up to a multiple of `IMAGE_ALIGN`
/// follow.
const IMAGE_END: [u8; 4] = u32::MAX.to_le_bytes();
/// Image files are a whole number of these bytes long (etcdctl's `snapshot save` wants a file
/// whose length modulo 512 is its 32-byte SHA-256 trailer, as a bolt file's pages give).
pub const IMAGE_ALIGN: u64 = 512;

/// Ends an image of `written` bytes (as `write_image` counts them) for a file: the end mark,
/// then zeros to a multiple of `IMAGE_ALIGN`. Returns the image's new length.
fn end_image(out: &mut dyn std::io::Write, written: u64) -> std::io::Result<u64> {
    let mut length = written + IMAGE_END.len() as u64;
    out.write_all(&IMAGE_END)?;
    let padding = (IMAGE_ALIGN - length % IMAGE_ALIGN) % IMAGE_ALIGN;
    out.write_all(&vec![0; padding as usize])?;
    length += padding;
    Ok(length)
}

impl MvccStore {
    /// Every staged write goes to the backend first; then the backend is dumped.
    pub fn snapshot_data(&mut self) -> Result<Vec<u8>, MvccError> {
        let mut out = Vec::new();
        self.write_image(&mut out)?;
        Ok(out)
    }

    /// Writes the whole store, in the snapshot format, to `out` as it scans the backend (the
    /// image is never held in memory whole); staged writes go to the backend first. Returns
    /// the bytes written. The caller keeps the store from changing meanwhile.
    pub fn write_image(&mut self, out: &mut dyn std::io::Write) -> Result<u64, MvccError> {
        self.flush_staged()?;
        let lose_tail = crate::hooks::injected(crate::hooks::Bug::LoseSnapshotTail);
        self.write_image_as(out, lose_tail)
    }

    /// `write_image` of a store whose staged writes are in the backend already (`Err`
    /// otherwise): it needs only to read, so readers go on meanwhile.
    pub fn write_flushed_image(&self, out: &mut dyn std::io::Write) -> Result<u64, MvccError> {
        self.require_flushed()?;
        let lose_tail = crate::hooks::injected(crate::hooks::Bug::LoseSnapshotTail);
        self.write_image_as(out, lose_tail)
    }

    /// A backup, as the Snapshot RPC streams it: the image, ended and padded for a file
    /// (`end_image`). Returns its length. Every applied write must be in the backend (a store
    /// job's view); otherwise it refuses.
    pub fn write_backup(&self, out: &mut dyn std::io::Write) -> Result<u64, MvccError> {
        self.require_flushed()?;
        let lose_tail = crate::hooks::injected(crate::hooks::Bug::BackupMissesLastBatch);
        let written = self.write_image_as(out, lose_tail)?;
        end_image(out, written).map_err(image_error)
    }

    /// `write_image` of a flushed store, leaving out the run of the newest revision when
    /// `lose_tail` (a planted bug).
    fn write_image_as(
        &self,
        out: &mut dyn std::io::Write,
        lose_tail: bool,
    ) -> Result<u64, MvccError> {
        let mut written = MAGIC.len() as u64;
        let mut failure = None;
        out.write_all(MAGIC).map_err(image_error)?;
        let mut tail =
            super::revision::run_key(super::revision::Revision::new(self.current_rev(), 0));
        tail.truncate(9); // `r` + main: the run ending in the last revision
        self.backend.scan(&[], None, &mut |key, value| {
            if lose_tail && key.starts_with(&tail) {
                return true;
            }
            for chunk in [key, value] {
                let wrote = out
                    .write_all(&(chunk.len() as u32).to_le_bytes())
                    .and_then(|()| out.write_all(chunk));
                if let Err(e) = wrote {
                    failure = Some(e);
                    return false;
                }
                written += 4 + chunk.len() as u64;
            }
            true
        })?;
        match failure {
            Some(e) => Err(image_error(e)),
            None => Ok(written),
        }
    }

    /// Replaces the whole store with `data`, the state as of raft index `index`. Durable on
    /// return (the backend is flushed), so the WAL before `index` is no longer needed.
    pub fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), MvccError> {
        self.restore_from(index, data)
    }

    /// `restore`, from an image read a pair at a time: the backend takes it in batches, so an
    /// image of any size is restored in bounded memory. Atomic: a crash, or an image found
    /// damaged partway, leaves the store as it was.
    pub fn restore_from(&mut self, index: u64, image: impl std::io::Read) -> Result<(), MvccError> {
        let staged = self.stage_restore(index, image)?;
        self.install_restore(staged)
    }

    /// The long step of `restore_from`, which needs only `&self`: writes the image's state
    /// aside in the backend and builds its key index, while the store's own state stays
    /// readable as it was. The caller applies nothing until it installs or drops the result.
    pub fn stage_restore(
        &self,
        index: u64,
        image: impl std::io::Read,
    ) -> Result<StagedRestore, MvccError> {
        assert!(
            self.writing_values.is_empty(),
            "restore while a staged batch is being written"
        );
        let mut reader = ImageReader::new(image);
        let mut image_error = None;
        let mut ended = false;
        // The key index is built from the runs as they stream into the backend: no second
        // pass over the whole store.
        let mut build = IndexBuild::default();
        let mut next = || {
            if ended {
                return Ok(None);
            }
            match reader.next_pair() {
                Ok(Some((key, value))) => {
                    if key.first() == Some(&RUN_PREFIX) {
                        if let Err(e) = build.add(&key, &value) {
                            let message = e.to_string();
                            image_error = Some(e);
                            return Err(crate::io::BackendError::Store(message));
                        }
                    }
                    Ok(Some((key, value)))
                }
                Ok(None) => {
                    // Last, so that it wins over the sender's own.
                    ended = true;
                    Ok(Some((meta_key(META_CONSISTENT_INDEX), encode_u64(index))))
                }
                Err(e) => {
                    let message = e.to_string();
                    image_error = Some(e);
                    Err(crate::io::BackendError::Store(message))
                }
            }
        };
        let staged = self.backend.stage_replacement(&mut next);
        if let Some(e) = image_error {
            return Err(e);
        }
        Ok(StagedRestore {
            index,
            contents: staged?,
            build,
        })
    }

    /// The short step of `restore_from`: the staged state becomes the store's.
    pub fn install_restore(&mut self, staged: StagedRestore) -> Result<(), MvccError> {
        let StagedRestore {
            index,
            contents,
            build,
        } = staged;
        self.backend.install_replacement(contents)?;
        let backend: Arc<dyn Backend> = self.backend.clone();
        let min_lease_ttl = self.leases.min_ttl();
        let publish_events = self.publish_events;
        let auth = self.auth.clone();
        *self = MvccStore::open_from(backend, None, Some(build))?;
        // The request path holds the view: it sees the snapshot's auth state in the same one.
        auth.publish((*self.auth.current()).clone());
        self.auth = auth;
        self.leases.set_min_ttl(min_lease_ttl);
        self.publish_events = publish_events;
        debug_assert_eq!(self.consistent_index, index);
        Ok(())
    }
}

/// A snapshot's state written aside (`MvccStore::stage_restore`), to install.
pub struct StagedRestore {
    index: u64,
    contents: crate::io::StagedContents,
    build: IndexBuild,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::io::MemBackend;
    use crate::proto::etcdserverpb::{PutRequest, RangeRequest};
    use crate::proto::quorumkvpb::raft_request::Request;

    /// Applies a put of `key` = `value` as raft entry `index`.
    pub(in crate::mvcc) fn put(store: &mut MvccStore, index: u64, key: &str, value: &str) {
        let req = PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        store.apply(index, &Request::Put(req)).expect("put");
    }

    #[test]
    fn restore_replaces_the_whole_store_with_the_snapshot_state() {
        let mut leader = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        put(&mut leader, 1, "a", "1");
        put(&mut leader, 2, "b", "2");
        put(&mut leader, 3, "a", "3");
        let data = leader.snapshot_data().expect("dump");

        let backend = MemBackend::new();
        let mut follower = MvccStore::open(Arc::new(backend.clone())).expect("open");
        put(&mut follower, 1, "stale", "x");
        follower.restore(10, &data).expect("restore");
        assert_eq!(follower.consistent_index(), 10);
        assert_eq!(follower.current_rev(), leader.current_rev());
        let all = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        };
        let resp = follower.range(&all).expect("range");
        let keys: Vec<_> = resp
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone(), kv.version))
            .collect();
        assert_eq!(
            keys,
            vec![
                (b"a".to_vec(), b"3".to_vec(), 2),
                (b"b".to_vec(), b"2".to_vec(), 1)
            ]
        );
        let history = RangeRequest {
            key: b"a".to_vec(),
            revision: 2,
            ..Default::default()
        };
        assert_eq!(
            follower.range(&history).expect("range").kvs[0].value,
            b"1",
            "history comes along"
        );
        let reopened = MvccStore::open(Arc::new(backend.crashed_copy())).expect("reopen");
        assert_eq!(reopened.consistent_index(), 10, "restore is durable");
    }

    #[test]
    fn a_backup_is_padded_to_512_bytes_restores_and_refuses_bytes_after_its_end_mark() {
        let mut leader = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        put(&mut leader, 1, "a", "1");
        put(&mut leader, 2, "b", "2");
        let mut backup = Vec::new();
        assert!(
            leader.write_backup(&mut backup).is_err(),
            "staged writes are refused, not left out"
        );
        leader.flush_staged().expect("flush");
        let length = leader.write_backup(&mut backup).expect("backup");
        assert_eq!(length as usize, backup.len());
        assert_eq!(backup.len() as u64 % IMAGE_ALIGN, 0);
        let mut follower = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        follower.restore(7, &backup).expect("restore");
        assert_eq!(follower.current_rev(), leader.current_rev());
        let mut damaged = backup.clone();
        let last = damaged.len() - 1;
        damaged[last] = 1;
        assert!(follower.restore(8, &damaged).is_err());
        assert_eq!(
            follower.consistent_index(),
            7,
            "the refused restore changed nothing"
        );
    }

    #[test]
    fn a_staged_restore_leaves_the_old_state_readable_until_installed() {
        let mut leader = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        put(&mut leader, 1, "a", "new");
        let data = leader.snapshot_data().expect("dump");
        let mut follower = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        put(&mut follower, 1, "a", "old");
        follower.flush_staged().expect("flush");
        let get = |store: &MvccStore| {
            let req = RangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            };
            store.range(&req).expect("range").kvs[0].value.clone()
        };
        let staged = follower.stage_restore(9, data.as_slice()).expect("stage");
        assert_eq!(
            get(&follower),
            b"old",
            "reads meanwhile see the state before"
        );
        assert_eq!(follower.consistent_index(), 1);
        follower.install_restore(staged).expect("install");
        assert_eq!(get(&follower), b"new");
        assert_eq!(follower.consistent_index(), 9);
    }

    #[test]
    fn damaged_snapshot_data_is_refused_and_changes_nothing() {
        let mut leader = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        put(&mut leader, 1, "a", "1");
        let data = leader.snapshot_data().expect("dump");
        let mut follower = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
        put(&mut follower, 1, "keep", "me");
        follower.flush_staged().expect("flush");
        for cut in [0, 3, data.len() - 1] {
            assert!(follower.restore(5, &data[..cut]).is_err());
        }
        let resp = follower
            .range(&RangeRequest {
                key: b"keep".to_vec(),
                ..Default::default()
            })
            .expect("range");
        assert_eq!(resp.kvs.len(), 1);
    }
}
