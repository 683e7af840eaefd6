//! The store: opening from the backend, and reads at any revision.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use prost::Message;

use super::error::MvccError;
use super::index::{KeyAt, TreeIndex};
use super::revision::{
    decode_u64, encode_u64, meta_key, parse_run_key, records, run_key, runs_end, Revision,
    META_COMPACT_REV, META_CONSISTENT_INDEX, OLD_REV_PREFIX, RUN_BYTES, RUN_PREFIX,
};
use crate::alarm::{AlarmTable, ALARM_RECORD_PREFIX};
use crate::io::{Backend, WriteBatch};
use crate::lease::{LeaseTable, LEASE_RECORD_PREFIX};
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::{RangeRequest, RangeResponse};
use crate::proto::mvccpb::{Event, KeyValue};

pub struct MvccStore {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) index: TreeIndex,
    /// The newest revision; 1 in an empty store, as in etcd.
    pub(super) current_rev: i64,
    pub(super) compact_rev: i64,
    /// The raft index of the last entry whose effects are in the backend (or staged for it).
    pub(super) consistent_index: u64,
    /// Writes of applied entries not yet handed to the backend: many entries become one
    /// backend batch (`flush_staged`), which matters because each batch costs the backend a
    /// log write. Reads see staged values first.
    pub(super) staged: WriteBatch,
    /// The staged revisions' records, as runs (each with its newest revision), in order.
    pub(super) staged_runs: Vec<(Revision, Vec<u8>)>,
    pub(super) staged_values: HashMap<Revision, KeyValue>,
    /// Values of a batch taken by `take_staged` and being written elsewhere: readable here
    /// until `staged_written` says the backend has them.
    pub(super) writing_values: HashMap<Revision, KeyValue>,
    /// The leases and the keys attached to them: applied with the keys, in the same batches.
    pub(super) leases: LeaseTable,
    /// Collect each applied write's events for `take_published` (someone watches).
    pub(super) publish_events: bool,
    pub(super) published: Vec<Event>,
    /// The active alarms: applied with the keys, in the same batches.
    pub(super) alarms: AlarmTable,
    /// The users, roles and permissions, shared with the request path (which reads them
    /// without this store's lock); replaced at each applied change.
    pub(super) auth: Arc<crate::auth::AuthView>,
    /// The v2 keys API's tree (`--enable-v2`), in its own records.
    pub(super) v2: crate::v2::V2Store,
    /// Bytes the backend's keys and values take (runs exactly; metadata as of opening):
    /// `Status.db_size_in_use`.
    pub(super) in_use_bytes: u64,
    /// The v2 tree's records' share of `meta_bytes_at_open`: since then the tree counts its own
    /// (`in_use_bytes()`).
    pub(super) v2_bytes_at_open: u64,
    /// The metadata's share of `in_use_bytes` (measured at opening): the rest is runs.
    meta_bytes_at_open: u64,
}

/// Where a range reads values from: the backend, or (inside a write) the revision being written.
pub(super) trait ValueSource {
    fn value(&self, rev: Revision) -> Result<KeyValue, MvccError>;

    /// The values at `revs`, in that order.
    fn values(&self, revs: &[Revision]) -> Result<Vec<KeyValue>, MvccError> {
        revs.iter().map(|rev| self.value(*rev)).collect()
    }
}

/// `Corrupt` for a run that does not hold together.
pub(super) fn bad_run(reason: String) -> MvccError {
    MvccError::Corrupt {
        main: -1,
        sub: -1,
        reason,
    }
}

/// The record of revision `rev`, decoded; `Corrupt` naming the revision if it does not decode.
pub(super) fn decode_at(rev: Revision, bytes: &[u8]) -> Result<KeyValue, MvccError> {
    KeyValue::decode(bytes).map_err(|e| MvccError::Corrupt {
        main: rev.main,
        sub: rev.sub,
        reason: e.to_string(),
    })
}

/// What rebuilding the key index needs of a stored `mvccpb.KeyValue`: everything but the value,
/// read in place (decoding whole records copied every value of the store at every start).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct IndexFields<'a> {
    pub key: &'a [u8],
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

fn read_varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or("a varint runs past the record")?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint longer than ten bytes".into())
}

/// Reads a `KeyValue`'s key, create_revision, version and lease (fields 1, 2, 4 and 6),
/// skipping the rest as protobuf's wire format says.
pub(super) fn index_fields(mut bytes: &[u8]) -> Result<IndexFields<'_>, String> {
    let mut fields = IndexFields {
        key: &[],
        create_revision: 0,
        version: 0,
        lease: 0,
    };
    while !bytes.is_empty() {
        let tag = read_varint(&mut bytes)?;
        let (field, wire_type) = (tag >> 3, tag & 7);
        match wire_type {
            0 => {
                let value = read_varint(&mut bytes)? as i64;
                match field {
                    2 => fields.create_revision = value,
                    4 => fields.version = value,
                    6 => fields.lease = value,
                    _ => {}
                }
            }
            2 => {
                let len = usize::try_from(read_varint(&mut bytes)?)
                    .map_err(|_| "a length past the address space")?;
                if len > bytes.len() {
                    return Err("a field runs past the record".into());
                }
                let (value, rest) = bytes.split_at(len);
                if field == 1 {
                    fields.key = value;
                }
                bytes = rest;
            }
            1 | 5 => {
                let len = if wire_type == 1 { 8 } else { 4 };
                if len > bytes.len() {
                    return Err("a field runs past the record".into());
                }
                bytes = &bytes[len..];
            }
            other => return Err(format!("wire type {other} in a stored KeyValue")),
        }
    }
    Ok(fields)
}

/// The first bytes of a saved key index (`MvccStore::save_index`).
const SAVED_INDEX_MAGIC: &[u8; 8] = b"QKVIDX01";

/// The key index and what goes with it, rebuilt from the backend's runs in revision order, or
/// loaded.
pub(super) struct IndexBuild {
    index: TreeIndex,
    current_rev: i64,
    /// Bytes of the runs' keys and values.
    runs_bytes: u64,
    /// Each key's lease as of its newest revision.
    key_lease: HashMap<Vec<u8>, i64>,
}

impl Default for IndexBuild {
    fn default() -> Self {
        IndexBuild {
            index: TreeIndex::default(),
            current_rev: 1,
            runs_bytes: 0,
            key_lease: HashMap::new(),
        }
    }
}

impl IndexBuild {
    /// Adds the revisions of the run stored under `key`; runs come in revision order.
    pub(super) fn add(&mut self, key: &[u8], run: &[u8]) -> Result<(), MvccError> {
        if parse_run_key(key).is_none() {
            return Err(bad_run("bad run key".into()));
        }
        self.runs_bytes += (key.len() + run.len()) as u64;
        for record in records(run) {
            let (rev, bytes) = record.map_err(bad_run)?;
            let kv = index_fields(bytes).map_err(|reason| MvccError::Corrupt {
                main: rev.main,
                sub: rev.sub,
                reason,
            })?;
            self.current_rev = self.current_rev.max(rev.main);
            if kv.version == 0 {
                self.index.tombstone(kv.key, rev);
                self.key_lease.remove(kv.key);
            } else {
                self.index
                    .restore(kv.key, rev, kv.create_revision, kv.version);
                if kv.lease != 0 {
                    self.key_lease.insert(kv.key.to_vec(), kv.lease);
                } else {
                    self.key_lease.remove(kv.key);
                }
            }
        }
        Ok(())
    }
}

/// Reads and removes the saved index at `path`; the index, if the file is whole and matches
/// the backend (its consistent index, its compaction, and no run newer than its revision).
/// Any doubt: `None`, and the caller scans the backend.
fn take_saved_index(
    path: &Path,
    backend: &dyn Backend,
    consistent_index: u64,
    compact_rev: i64,
) -> Option<IndexBuild> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved key index; scanning the backend");
            return None;
        }
    };
    // Removed first, durably: a store that changes after this never meets this file again.
    let removed = std::fs::remove_file(path).and_then(|_| match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    });
    if let Err(e) = removed {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the saved key index; scanning the backend");
        return None;
    }
    let loaded = (|| -> Result<IndexBuild, String> {
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or("shorter than its checksum")?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("its checksum does not match".into());
        }
        let rest = body
            .strip_prefix(SAVED_INDEX_MAGIC.as_slice())
            .ok_or("not a saved key index")?;
        let word = |i: usize| -> Result<[u8; 8], String> {
            rest.get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| "its header ends early".to_string())
        };
        let saved_consistent_index = u64::from_le_bytes(word(0)?);
        let current_rev = i64::from_le_bytes(word(1)?);
        let saved_compact_rev = i64::from_le_bytes(word(2)?);
        let runs_bytes = u64::from_le_bytes(word(3)?);
        if (saved_consistent_index, saved_compact_rev) != (consistent_index, compact_rev) {
            return Err(format!(
                "it was saved at consistent index {saved_consistent_index} and compaction \
                 {saved_compact_rev}, the backend is at {consistent_index} and {compact_rev}"
            ));
        }
        let mut newer = false;
        backend
            .scan(
                &run_key(Revision::new(current_rev + 1, 0)),
                Some(&runs_end()),
                &mut |_, _| {
                    newer = true;
                    false
                },
            )
            .map_err(|e| e.to_string())?;
        if newer {
            return Err(format!(
                "the backend holds revisions after its {current_rev}"
            ));
        }
        let (index, leases) = TreeIndex::decode_saved(&rest[32..])?;
        Ok(IndexBuild {
            index,
            current_rev,
            runs_bytes,
            key_lease: leases.into_iter().collect(),
        })
    })();
    match loaded {
        Ok(loaded) => {
            tracing::info!(path = %path.display(), keys = loaded.index.len(), revision = loaded.current_rev, "loaded the key index saved at the last clean stop");
            Some(loaded)
        }
        Err(reason) => {
            tracing::warn!(path = %path.display(), %reason, "the saved key index does not match the backend; scanning it");
            None
        }
    }
}

impl ValueSource for MvccStore {
    fn value(&self, rev: Revision) -> Result<KeyValue, MvccError> {
        self.read_value(rev)
    }

    fn values(&self, revs: &[Revision]) -> Result<Vec<KeyValue>, MvccError> {
        self.read_values(revs)
    }
}

impl MvccStore {
    /// Opens the store kept in `backend`, rebuilding the key index from it.
    pub fn open(backend: Arc<dyn Backend>) -> Result<Self, MvccError> {
        Self::open_with_saved_index(backend, None)
    }

    /// Opens the store kept in `backend`, loading its key index from `saved` (written by
    /// `save_index` at a clean stop) when that file is there and names exactly the backend's
    /// state; otherwise rebuilding it from a scan of every run. The file is removed before the
    /// store is used, so it is never loaded twice nor after a later crash.
    pub fn open_with_saved_index(
        backend: Arc<dyn Backend>,
        saved: Option<&Path>,
    ) -> Result<Self, MvccError> {
        Self::open_from(backend, saved, None)
    }

    /// Opens the store with the key index `built` as its runs streamed by (a snapshot's
    /// restore), else `saved`'s, else one rebuilt by a scan.
    pub(super) fn open_from(
        backend: Arc<dyn Backend>,
        saved: Option<&Path>,
        built: Option<IndexBuild>,
    ) -> Result<Self, MvccError> {
        let meta = |name: &str| -> Result<u64, MvccError> {
            Ok(backend
                .get(&meta_key(name))?
                .and_then(|bytes| decode_u64(&bytes))
                .unwrap_or(0))
        };
        let consistent_index = meta(META_CONSISTENT_INDEX)?;
        let compact_rev = meta(META_COMPACT_REV)? as i64;
        let mut old_layout = false;
        backend.scan(
            &[OLD_REV_PREFIX],
            Some(&[OLD_REV_PREFIX + 1]),
            &mut |_, _| {
                old_layout = true;
                false
            },
        )?;
        if old_layout {
            return Err(bad_run(
                "the data was written by an older quorumkv, one backend key per revision; \
                 this version keeps revisions in runs and cannot read it"
                    .into(),
            ));
        }
        let loaded = match (built, saved) {
            (Some(built), _) => Some(built),
            (None, Some(path)) => {
                take_saved_index(path, backend.as_ref(), consistent_index, compact_rev)
            }
            (None, None) => None,
        };
        let built = match loaded {
            Some(loaded) => loaded,
            None => {
                let mut build = IndexBuild::default();
                let mut failure = None;
                backend.scan(
                    &[RUN_PREFIX],
                    Some(&runs_end()),
                    &mut |key, run| match build.add(key, run) {
                        Ok(()) => true,
                        Err(e) => {
                            failure = Some(e);
                            false
                        }
                    },
                )?;
                if let Some(e) = failure {
                    return Err(e);
                }
                build
            }
        };
        let IndexBuild {
            index,
            mut current_rev,
            runs_bytes: in_use_bytes,
            key_lease,
        } = built;
        // A compaction may have removed every revision up to it.
        current_rev = current_rev.max(compact_rev);
        let mut store = MvccStore {
            backend,
            index,
            current_rev,
            compact_rev,
            consistent_index,
            staged: WriteBatch::default(),
            staged_runs: Vec::new(),
            staged_values: HashMap::new(),
            writing_values: HashMap::new(),
            leases: LeaseTable::default(),
            publish_events: false,
            published: Vec::new(),
            alarms: AlarmTable::default(),
            auth: Arc::default(),
            v2: crate::v2::V2Store::default(),
            in_use_bytes,
            meta_bytes_at_open: 0,
            v2_bytes_at_open: 0,
        };
        let meta_end = [super::revision::META_PREFIX + 1];
        store.backend.scan(
            &[super::revision::META_PREFIX],
            Some(&meta_end),
            &mut |k, v| {
                store.meta_bytes_at_open += (k.len() + v.len()) as u64;
                true
            },
        )?;
        store.in_use_bytes += store.meta_bytes_at_open;
        let alarms = store.records(ALARM_RECORD_PREFIX)?;
        store.alarms = AlarmTable::from_records(alarms.iter().map(|(name, _)| name.as_str()))
            .map_err(|reason| MvccError::Corrupt {
                main: -1,
                sub: -1,
                reason,
            })?;
        let auth =
            crate::auth::AuthState::from_records(&store.records(crate::auth::AUTH_RECORD_PREFIX)?)
                .map_err(|reason| MvccError::Corrupt {
                    main: -1,
                    sub: -1,
                    reason,
                })?;
        store.auth = Arc::new(crate::auth::AuthView::new(auth));
        store.v2 = crate::v2::V2Store::from_records(crate::v2::V2Records {
            chunks: store.records(crate::v2::CHUNK_RECORD_PREFIX)?,
            history: store.records(crate::v2::HISTORY_RECORD_PREFIX)?,
            nodes: store.records(crate::v2::NODE_RECORD_PREFIX)?,
            events: store.records(crate::v2::EVENT_RECORD_PREFIX)?,
            journal: store.records(crate::v2::JOURNAL_RECORD_PREFIX)?,
        })
        .map_err(|reason| MvccError::Corrupt {
            main: -1,
            sub: -1,
            reason,
        })?;
        store.v2_bytes_at_open = store.v2.record_bytes();
        store.leases =
            LeaseTable::load(store.records(LEASE_RECORD_PREFIX)?, key_lease).map_err(|e| {
                MvccError::Corrupt {
                    main: -1,
                    sub: -1,
                    reason: e.to_string(),
                }
            })?;
        Ok(store)
    }

    /// Saves the key index to `path` (atomically: a temporary file, synced, renamed), with
    /// what names the backend's state it matches, for the next `open_with_saved_index`. For a
    /// clean stop: nothing may be staged, and the backend must hold every applied entry
    /// durably. Returns the file's length.
    pub fn save_index(&self, path: &Path) -> std::io::Result<u64> {
        if !(self.staged.is_empty() && self.staged_runs.is_empty()) {
            return Err(std::io::Error::other(
                "writes are staged: the backend is behind the index",
            ));
        }
        let mut bytes = Vec::with_capacity(64 + self.index.approx_bytes() / 2);
        bytes.extend_from_slice(SAVED_INDEX_MAGIC);
        bytes.extend_from_slice(&self.consistent_index.to_le_bytes());
        bytes.extend_from_slice(&self.current_rev.to_le_bytes());
        bytes.extend_from_slice(&self.compact_rev.to_le_bytes());
        let runs_bytes = self.in_use_bytes.saturating_sub(self.meta_bytes_at_open);
        bytes.extend_from_slice(&runs_bytes.to_le_bytes());
        self.index
            .encode_saved(&mut bytes, &|key| self.leases.lease_of(key).unwrap_or(0));
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let part = path.with_extension("part");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&part)?;
            file.write_all(&bytes)?;
            file.sync_data()?;
        }
        std::fs::rename(&part, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(bytes.len() as u64)
    }

    pub fn alarms(&self) -> &AlarmTable {
        &self.alarms
    }

    /// The auth store, as the request path reads it.
    pub fn auth(&self) -> &Arc<crate::auth::AuthView> {
        &self.auth
    }

    /// Bytes the backend's keys and values take: the runs of revisions exactly, the metadata
    /// (leases, members, alarms) as of opening.
    pub fn in_use_bytes(&self) -> u64 {
        (self.in_use_bytes + self.v2.record_bytes()).saturating_sub(self.v2_bytes_at_open)
    }

    /// The v2 keys API's tree.
    pub fn v2(&self) -> &crate::v2::V2Store {
        &self.v2
    }

    /// See `V2Store::expire_outside_log` (a planted bug).
    pub fn v2_expire_outside_log(&mut self, now_ns: i64) {
        self.v2.expire_outside_log(now_ns);
    }

    /// The v2 events applied since the last call, for the v2 watchers.
    pub fn take_v2_published(&mut self) -> Vec<crate::v2::Event> {
        self.v2.take_published()
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// TTLs granted below this (seconds) are raised to it, as etcd does (1.5 election
    /// timeouts). Every member must use the same value: grants apply it.
    pub fn set_min_lease_ttl(&mut self, seconds: i64) {
        self.leases.set_min_ttl(seconds);
    }

    pub fn current_rev(&self) -> i64 {
        self.current_rev
    }

    pub fn compact_rev(&self) -> i64 {
        self.compact_rev
    }

    pub fn consistent_index(&self) -> u64 {
        self.consistent_index
    }

    pub fn key_count(&self) -> usize {
        self.index.len()
    }

    /// Roughly the bytes the key index takes in memory.
    pub fn index_bytes(&self) -> usize {
        self.index.approx_bytes()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// `Ok` when every applied write is in the backend (nothing staged or on its way): what
    /// reads of the backend alone (hashes, backups) need.
    pub(super) fn require_flushed(&self) -> Result<(), MvccError> {
        if self.staged.is_empty()
            && self.staged_runs.is_empty()
            && self.writing_values.is_empty()
            && self.v2.unwritten() == 0
        {
            return Ok(());
        }
        Err(MvccError::Backend(crate::io::BackendError::Store(
            "applied writes are not all in the backend yet".into(),
        )))
    }

    /// Backend writes staged and not yet handed to the backend (each revision's record and
    /// each journaled v2 request counts).
    pub fn staged_ops(&self) -> usize {
        self.staged.ops.len() + self.staged_values.len() + self.v2.unwritten()
    }

    /// Stages the records of one applied entry (encoded by `push_record`, `last` the newest):
    /// onto the open run, or a new one if they would take it past `RUN_BYTES`.
    pub(super) fn stage_records(&mut self, last: Revision, encoded: &[u8]) {
        match self.staged_runs.last_mut() {
            Some((newest, run)) if run.len() + encoded.len() <= RUN_BYTES => {
                run.extend_from_slice(encoded);
                *newest = last;
            }
            _ => self.staged_runs.push((last, encoded.to_vec())),
        }
    }

    /// Hands every staged write to the backend as one atomic batch (with the consistent index).
    /// No batch taken by `take_staged` may still be on its way.
    pub fn flush_staged(&mut self) -> Result<(), MvccError> {
        if let Some(batch) = self.take_staged() {
            self.backend.apply(batch)?;
            self.staged_written();
        }
        Ok(())
    }

    /// Takes the staged writes as one atomic batch (with the consistent index) for the caller
    /// to apply to the backend, e.g. off the apply path; reads keep seeing its values until
    /// `staged_written`. One such batch at a time.
    pub fn take_staged(&mut self) -> Option<WriteBatch> {
        assert!(
            self.writing_values.is_empty(),
            "a staged batch is still being written"
        );
        if self.staged.is_empty() && self.staged_runs.is_empty() && self.v2.unwritten() == 0 {
            return None;
        }
        let mut batch = std::mem::take(&mut self.staged);
        for (name, value) in self.v2.take_batch_records(self.consistent_index) {
            match value {
                Some(value) => batch.put(meta_key(&name), value),
                None => batch.delete(meta_key(&name)),
            }
        }
        for (last, run) in self.staged_runs.drain(..) {
            self.in_use_bytes += (super::revision::RUN_KEY_LEN + run.len()) as u64;
            batch.put(run_key(last), run);
        }
        batch.put(
            meta_key(META_CONSISTENT_INDEX),
            encode_u64(self.consistent_index),
        );
        // `writing_values` is empty: swapping keeps both tables' capacity for the next batches.
        std::mem::swap(&mut self.writing_values, &mut self.staged_values);
        Some(batch)
    }

    /// The batch from `take_staged` is in the backend.
    pub fn staged_written(&mut self) {
        self.writing_values.clear();
    }

    pub(super) fn read_value(&self, rev: Revision) -> Result<KeyValue, MvccError> {
        if let Some(kv) = self
            .staged_values
            .get(&rev)
            .or_else(|| self.writing_values.get(&rev))
        {
            return Ok(kv.clone());
        }
        let mut found = None;
        self.backend
            .scan(&run_key(rev), Some(&runs_end()), &mut |_, run| {
                found = Some(
                    records(run)
                        .find(|record| !matches!(record, Ok((at, _)) if *at != rev))
                        .map(|record| {
                            record
                                .map_err(bad_run)
                                .and_then(|(_, bytes)| decode_at(rev, bytes))
                        }),
                );
                false
            })?;
        found.flatten().unwrap_or_else(|| {
            Err(MvccError::Corrupt {
                main: rev.main,
                sub: rev.sub,
                reason: "indexed revision missing from the backend".into(),
            })
        })
    }

    /// The values at `revs`, in that order: the revisions that share a run of the backend
    /// are read from it in one look-up (a page of keys written together, as a list reads
    /// them, sits in a few runs), not one each.
    pub(super) fn read_values(&self, revs: &[Revision]) -> Result<Vec<KeyValue>, MvccError> {
        if revs.len() < 2 {
            return revs.iter().map(|rev| self.read_value(*rev)).collect();
        }
        let mut out: Vec<Option<KeyValue>> = vec![None; revs.len()];
        let mut wanted: Vec<usize> = Vec::with_capacity(revs.len());
        for (i, rev) in revs.iter().enumerate() {
            match self
                .staged_values
                .get(rev)
                .or_else(|| self.writing_values.get(rev))
            {
                Some(kv) => out[i] = Some(kv.clone()),
                None => wanted.push(i),
            }
        }
        wanted.sort_unstable_by_key(|i| revs[*i]);
        let mut next = 0;
        while next < wanted.len() {
            let first = revs[wanted[next]];
            let mut taken = 0;
            let mut failure = None;
            self.backend
                .scan(&run_key(first), Some(&runs_end()), &mut |_, run| {
                    // Both in ascending revision order: the wanted revisions this run holds
                    // are a prefix of those left.
                    for record in records(run) {
                        let Some(&at_index) = wanted.get(next + taken) else {
                            break;
                        };
                        match record {
                            Ok((at, bytes)) if at == revs[at_index] => {
                                match decode_at(at, bytes) {
                                    Ok(kv) => out[at_index] = Some(kv),
                                    Err(e) => {
                                        failure = Some(e);
                                        break;
                                    }
                                }
                                taken += 1;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                failure = Some(bad_run(e));
                                break;
                            }
                        }
                    }
                    false
                })?;
            if let Some(e) = failure {
                return Err(e);
            }
            if taken == 0 {
                return Err(MvccError::Corrupt {
                    main: first.main,
                    sub: first.sub,
                    reason: "indexed revision missing from the backend".into(),
                });
            }
            next += taken;
        }
        out.into_iter()
            .map(|kv| kv.ok_or_else(|| bad_run("a revision read from a run was not found".into())))
            .collect()
    }

    /// A Range as etcd answers it (the caller fills the header's other fields).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        self.range_with(req, self.current_rev, self)
    }

    /// Checks that a read at `rev` (0: the newest) is possible now.
    pub(super) fn check_read_rev(&self, rev: i64, current: i64) -> Result<i64, MvccError> {
        if rev > current {
            return Err(MvccError::FutureRev);
        }
        if rev > 0 && rev < self.compact_rev {
            return Err(MvccError::Compacted);
        }
        Ok(if rev <= 0 { current } else { rev })
    }

    /// Keys of a range request at revision `at`.
    pub(super) fn range_keys(&self, req: &RangeRequest, at: i64) -> Vec<(Vec<u8>, KeyAt)> {
        self.range_keys_counted(req, at, usize::MAX).0
    }

    /// The first `keep` keys of a range request at revision `at` (what a page needs), and how
    /// many keys the range holds in all: the others are counted, not copied (a page of 500 of a
    /// 100,000-key prefix copied every key before).
    fn range_keys_counted(
        &self,
        req: &RangeRequest,
        at: i64,
        keep: usize,
    ) -> (Vec<(Vec<u8>, KeyAt)>, usize) {
        let end = match req.range_end.as_slice() {
            [] => None,
            [0] => Some(&[][..]),
            end => Some(end),
        };
        let mut found = Vec::new();
        let mut count = 0;
        self.index.range(&req.key, end, at, &mut |key, key_at| {
            if count < keep {
                found.push((key.to_vec(), key_at));
            }
            count += 1;
            true
        });
        (found, count)
    }

    pub(super) fn range_with(
        &self,
        req: &RangeRequest,
        current: i64,
        source: &dyn ValueSource,
    ) -> Result<RangeResponse, MvccError> {
        let at = self.check_read_rev(req.revision, current)?;
        let sort_order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
        let sort_target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        // As etcd: fetch everything when sorting or filtering, else one more than the limit.
        let fetch_limit = if sort_order != SortOrder::None || filtered || req.limit <= 0 {
            usize::MAX
        } else {
            req.limit as usize + 1
        };
        let keep = if req.count_only { 0 } else { fetch_limit };
        let (keys, count) = self.range_keys_counted(req, at, keep);
        let mut resp = RangeResponse {
            count: count as i64,
            ..Default::default()
        };
        if req.count_only {
            return Ok(resp);
        }
        let revs: Vec<Revision> = keys
            .iter()
            .take(fetch_limit)
            .map(|(_, key_at)| key_at.modified)
            .collect();
        let mut kvs = source.values(&revs)?;
        debug_assert!(kvs
            .iter()
            .zip(&revs)
            .all(|(kv, rev)| kv.mod_revision == rev.main));
        kvs.retain(|kv| {
            !(req.max_mod_revision != 0 && kv.mod_revision > req.max_mod_revision
                || req.min_mod_revision != 0 && kv.mod_revision < req.min_mod_revision
                || req.max_create_revision != 0 && kv.create_revision > req.max_create_revision
                || req.min_create_revision != 0 && kv.create_revision < req.min_create_revision)
        });
        let order = if sort_target != SortTarget::Key && sort_order == SortOrder::None {
            SortOrder::Ascend
        } else {
            sort_order
        };
        if order != SortOrder::None {
            let compare = |a: &KeyValue, b: &KeyValue| -> Ordering {
                match sort_target {
                    SortTarget::Key => a.key.cmp(&b.key),
                    SortTarget::Version => a.version.cmp(&b.version),
                    SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                    SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                    SortTarget::Value => a.value.cmp(&b.value),
                }
            };
            if order == SortOrder::Descend {
                kvs.sort_by(|a, b| compare(b, a));
            } else {
                kvs.sort_by(compare);
            }
        }
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
            resp.more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        resp.kvs = kvs;
        Ok(resp)
    }
}

/// Records kept beside the key space (membership, ...): `m` + name in the backend, so that
/// snapshots carry them.
impl MvccStore {
    /// Stages entry `index`'s write of the record `name` (`None` deletes it), in the same
    /// backend batch as the entries around it.
    pub fn stage_record(&mut self, index: u64, name: &str, value: Option<Vec<u8>>) {
        match value {
            Some(value) => self.staged.put(meta_key(name), value),
            None => self.staged.delete(meta_key(name)),
        }
        self.consistent_index = self.consistent_index.max(index);
    }

    /// The records whose names start with `prefix`, from the backend (nothing may be staged:
    /// call it right after opening or restoring).
    pub fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MvccError> {
        debug_assert!(
            self.staged.is_empty() && self.staged_runs.is_empty(),
            "records read while writes are staged"
        );
        let start = meta_key(prefix);
        let mut end = start.clone();
        end.push(0xff);
        let mut out = Vec::new();
        self.backend.scan(&start, Some(&end), &mut |key, value| {
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            out.push((name, value.to_vec()));
            true
        })?;
        Ok(out)
    }
}
