//! The write-ahead log and the raft snapshot file store.
//!
//! Raft may only send a message or acknowledge a write once the entries and hard state it
//! depends on are durable; this module is where they become durable, and where they are read
//! back after a crash. The log is a chain of CRC-protected records (see `record`) in
//! preallocated segment files (see `segment`); replay (see `replay`) rebuilds the log raft last
//! wrote, drops a torn tail of the last segment and refuses, naming file and offset, anything
//! that looks like damage to data that may have been acknowledged.
//!
//! Known limit of the torn-tail rule: a bad record followed by any self-consistent record is
//! reported as corruption, so a crash that persisted a later page of an unsynced write but not an
//! earlier one is reported too. That errs on the side of stopping rather than dropping data.

mod record;
mod replay;
mod segment;
mod snap;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft::eraftpb::{Entry, HardState};

use crate::io::{Disk, DiskFile};

pub use record::MAX_RECORD_PAYLOAD_BYTES;
use record::{RecordRef, RECORD_ALIGN};
pub use replay::{TailRepair, WalReplay};
use segment::{Chain, SegmentMeta, SegmentName, Tail};
pub use snap::{SnapStore, MAX_SNAPSHOT_BYTES};

/// Segment size used unless the options say otherwise.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Smallest segment size accepted; smaller requests are raised to it.
pub const MIN_SEGMENT_BYTES: u64 = 128;
/// Largest segment size accepted, and the largest segment file replay will read.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// The most bytes one `append` may write.
pub const MAX_APPEND_BYTES: u64 = 256 << 20;
/// The write buffer keeps at most this much capacity between appends.
const BUFFER_RETAIN_BYTES: usize = 4 << 20;
/// Zeros written per call when a torn tail is wiped.
const ZERO_CHUNK_BYTES: u64 = 64 << 10;
/// How far ahead of the records the current segment is overwritten with zeros.
///
/// A preallocated range is "unwritten" to the file system: the first write into each part of
/// it changes the file's extent map, and every fdatasync after such a write must also write
/// that metadata. Zeroing ahead in large steps makes one fdatasync in this many bytes pay for
/// it, and the others write the record data alone (on ext4 here: 30% less time per sync).
const ZERO_AHEAD_BYTES: u64 = 1 << 20;

/// Errors of the WAL and the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal: {op} {}: {source}", file.display())]
    Io {
        /// What was being done: `write`, `fdatasync`, `create`, ...
        op: &'static str,
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("wal: corrupt record in {} at offset {offset}: {reason}", file.display())]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("wal: no space left on the device for the new segment {}: it needs at least {needed} bytes free", file.display())]
    NoSpace { file: PathBuf, needed: u64 },
    /// The log does not continue the caller's snapshot: entries after it were released or lost.
    #[error("wal: entries after index {after_index} are missing; the log resumes at index {first_index}")]
    Gap { after_index: u64, first_index: u64 },
    /// The log ends before the last entry the backend applied: durable entries were lost.
    #[error("wal: the log in {} ends at index {last_index}, but the backend has applied entries up to index {applied_index}: applied entries are missing from the WAL", dir.display())]
    Behind {
        dir: PathBuf,
        last_index: u64,
        applied_index: u64,
    },
    /// A record, batch or snapshot exceeds its size limit; nothing was written.
    #[error("wal: {what} of {bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        bytes: u64,
        max: u64,
    },
    /// The caller passed something that must never be persisted; nothing was written.
    #[error("wal: invalid input: {reason}")]
    Invalid { reason: String },
    /// An earlier write or sync failed, so what is on disk is unknown (a failed fdatasync may
    /// have dropped dirty pages); the log refuses further use until it is reopened and replayed.
    #[error("wal: an earlier I/O error left the log in an unknown state; reopen it to recover")]
    Failed,
}

/// How the WAL lays out its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalOptions {
    /// Preallocated size of each segment, clamped to
    /// [`MIN_SEGMENT_BYTES`]..=[`MAX_SEGMENT_BYTES`] and rounded up to a multiple of 8.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

impl WalOptions {
    fn segment_capacity(&self) -> u64 {
        let bytes = self
            .segment_bytes
            .clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
        bytes.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
    }
}

/// The write-ahead log. One writer; see the crate's `Disk` contract for what `sync` promises.
pub struct Wal {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    segment_capacity: u64,
    /// Oldest first; the last one is `file`.
    segments: Vec<SegmentMeta>,
    file: Box<dyn DiskFile>,
    /// Where the next record goes in `file`.
    write_offset: u64,
    /// Length of `file`; records never cross it.
    file_capacity: u64,
    /// `file` below this offset has been written (records or zeros); see [`ZERO_AHEAD_BYTES`].
    zeroed_to: u64,
    /// CRC of the last record written or read back.
    last_crc: u32,
    last_index: u64,
    /// The newest snapshot index known: the caller's or the newest marker. Entries at or below
    /// it are committed and never rewritten.
    snapshot_index: u64,
    hard_state: HardState,
    snapshot_marker: Option<(u64, u64)>,
    unsynced: bool,
    failed: bool,
    buf: Vec<u8>,
}

pub(crate) fn io_error<'a>(
    op: &'static str,
    file: &'a Path,
) -> impl FnOnce(std::io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        op,
        file: file.to_path_buf(),
        source,
    }
}

impl Wal {
    /// Opens (creating the directory and a first segment when empty) and replays.
    ///
    /// `after_index` is the index of the snapshot the caller restored (0 for none): the replay
    /// returns the entries after it and fails with [`WalError::Gap`] if they do not start at
    /// `after_index + 1`. A torn tail of the last segment is zeroed, synced and reported in
    /// [`WalReplay::repaired_tail`]; any other damage is [`WalError::Corrupt`].
    pub fn open(
        disk: Arc<dyn Disk>,
        dir: &Path,
        opts: WalOptions,
        after_index: u64,
    ) -> Result<(Wal, WalReplay), WalError> {
        let segment_capacity = opts.segment_capacity();
        if !disk.exists(dir) {
            disk.create_dir_all(dir)
                .map_err(io_error("create directory", dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                disk.sync_dir(parent)
                    .map_err(io_error("fsync directory", parent))?;
            }
        }
        let mut names = segment::list(disk.as_ref(), dir)?;
        // A newest segment without a record was made by a start or a roll that failed before
        // writing to it (the disk was full, say): nothing in it was ever acknowledged.
        if let Some(newest) = names.last() {
            let path = dir.join(newest.file_name());
            if segment::holds_no_record(disk.as_ref(), &path)? {
                disk.remove(&path).map_err(io_error("remove", &path))?;
                disk.sync_dir(dir)
                    .map_err(io_error("fsync directory", dir))?;
                tracing::info!(file = %path.display(), "wal: removed a segment that holds no record");
                names.pop();
            }
        }
        let Some((&newest, older)) = names.split_last() else {
            return Wal::create_empty(disk, dir, segment_capacity, after_index);
        };

        let mut builder = replay::LogBuilder::new(after_index);
        // The very first record ever follows crc 0; after a release the oldest record's
        // predecessor is gone, so any value is accepted there.
        let mut chain = Chain {
            expected_prev_crc: (names[0].seq == 1).then_some(0),
        };
        let mut segments = Vec::with_capacity(names.len());
        for name in older {
            let scanned =
                segment::read_and_scan(disk.as_ref(), dir, *name, &mut chain, &mut builder, false)?;
            debug_assert!(
                matches!(scanned.tail, Tail::Clean { .. }),
                "only the last is torn"
            );
            segments.push(scanned.meta);
        }
        let last =
            segment::read_and_scan(disk.as_ref(), dir, newest, &mut chain, &mut builder, true)?;
        // Any Gap is reported before the disk is touched.
        let replayed = builder.finish()?;
        let mut file = last.file;
        let (write_offset, repaired_tail) = match last.tail {
            Tail::Clean { end } => (end, None),
            Tail::Torn {
                offset,
                last_nonzero,
            } => {
                let repair =
                    segment::zero_torn_tail(file.as_mut(), &last.meta.path, offset, last_nonzero)?;
                (offset, Some(repair))
            }
        };
        segments.push(last.meta);
        debug_assert!(
            write_offset.is_multiple_of(RECORD_ALIGN),
            "appends stay aligned"
        );
        debug_assert!(write_offset <= last.len, "appends continue inside the file");

        let marker_index = replayed.snapshot_marker.map_or(0, |(_, index)| index);
        let snapshot_index = after_index.max(marker_index);
        let wal = Wal {
            disk,
            dir: dir.to_path_buf(),
            segment_capacity,
            segments,
            file,
            write_offset,
            file_capacity: last.len,
            zeroed_to: write_offset,
            last_crc: chain.expected_prev_crc.unwrap_or(0),
            last_index: replayed.log_last_index.max(snapshot_index),
            snapshot_index,
            hard_state: replayed.hard_state.clone(),
            snapshot_marker: replayed.snapshot_marker,
            unsynced: false,
            failed: false,
            buf: Vec::new(),
        };
        let replay = WalReplay {
            hard_state: replayed.hard_state,
            entries: replayed.entries,
            repaired_tail,
        };
        Ok((wal, replay))
    }

    fn create_empty(
        disk: Arc<dyn Disk>,
        dir: &Path,
        segment_capacity: u64,
        after_index: u64,
    ) -> Result<(Wal, WalReplay), WalError> {
        let name = SegmentName {
            seq: 1,
            first_index: after_index + 1,
        };
        let (path, file, capacity) = segment::create_fitting(
            disk.as_ref(),
            dir,
            name,
            segment_capacity,
            MIN_SEGMENT_BYTES,
        )?;
        let wal = Wal {
            disk,
            dir: dir.to_path_buf(),
            segment_capacity,
            segments: vec![SegmentMeta {
                name,
                path,
                max_entry_index: None,
            }],
            file,
            write_offset: 0,
            file_capacity: capacity,
            zeroed_to: 0,
            last_crc: 0,
            last_index: after_index,
            snapshot_index: after_index,
            hard_state: HardState::default(),
            snapshot_marker: None,
            unsynced: false,
            failed: false,
            buf: Vec::new(),
        };
        Ok((wal, WalReplay::default()))
    }

    /// Buffers and writes records for these entries and (if given) the hard state, in that
    /// order; does NOT sync. One call is one `write_at` (group commit: append many proposals,
    /// then `sync` once).
    ///
    /// Contract: `entries` are contiguous; the first one is at most `last_index() + 1` (an
    /// index at or below `last_index()` overwrites that suffix) and above every snapshot index
    /// (after installing a snapshot, call `save_snapshot_marker` before appending what follows
    /// it). `hard_state.commit` is at most the last index after this append.
    ///
    /// A failed write or sync leaves the log refusing every later call with
    /// [`WalError::Failed`] until it is reopened and replayed.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), WalError> {
        debug_assert!(
            entries.windows(2).all(|w| w[0].index + 1 == w[1].index),
            "appended entries are contiguous"
        );
        if let Some(first) = entries.first() {
            debug_assert!(
                first.index <= self.last_index + 1,
                "entry {} leaves a hole after last index {}",
                first.index,
                self.last_index
            );
            debug_assert!(
                first.index > self.snapshot_index,
                "entry {} rewrites the snapshot at {}",
                first.index,
                self.snapshot_index
            );
        }
        if let Some(hard_state) = hard_state {
            let last_index = entries.last().map_or(self.last_index, |e| e.index);
            debug_assert!(
                hard_state.commit <= last_index,
                "commit {} beyond last index {last_index}",
                hard_state.commit
            );
        }
        if entries.first().is_some_and(|first| first.index == 0) {
            debug_assert!(false, "raft entries start at index 1");
            return Err(WalError::Invalid {
                reason: "entry at index 0".to_string(),
            });
        }
        let records = entries
            .iter()
            .map(RecordRef::Entry)
            .chain(hard_state.map(RecordRef::HardState));
        self.write_records(records)?;
        if let Some(hard_state) = hard_state {
            self.hard_state = hard_state.clone();
        }
        Ok(())
    }

    /// Makes every appended record durable (fdatasync of the current segment).
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.failed {
            return Err(WalError::Failed);
        }
        if self.unsynced {
            let path = &self.segments[self.segments.len() - 1].path;
            if let Err(source) = self.file.sync_data() {
                if crate::hooks::injected(crate::hooks::Bug::IgnoreFsyncError) {
                    self.unsynced = false;
                    return Ok(());
                }
                self.failed = true;
                return Err(io_error("fdatasync", path)(source));
            }
            self.unsynced = false;
        }
        Ok(())
    }

    /// Records that a snapshot at (term, index) exists; synced before return.
    ///
    /// Call it once the snapshot itself is durable (`SnapStore::save`). Entries at or below
    /// `index` may then be released, and the next entry appended may be `index + 1`.
    pub fn save_snapshot_marker(&mut self, term: u64, index: u64) -> Result<(), WalError> {
        self.write_snapshot_record(RecordRef::SnapshotMarker { term, index }, term, index)?;
        self.last_index = self.last_index.max(index);
        self.sync()
    }

    /// Records that a snapshot from the leader at (term, index) was installed and replaced the
    /// whole log (raft discards every entry it had, even ones after `index`); synced before
    /// return. Replay then returns no entry written before this call. The snapshot itself must
    /// already be durable (`SnapStore::save`).
    pub fn install_snapshot(&mut self, term: u64, index: u64) -> Result<(), WalError> {
        self.write_snapshot_record(RecordRef::SnapshotInstall { term, index }, term, index)?;
        self.last_index = index;
        self.sync()
    }

    fn write_snapshot_record(
        &mut self,
        record: RecordRef<'_>,
        term: u64,
        index: u64,
    ) -> Result<(), WalError> {
        if index == 0 {
            debug_assert!(false, "a snapshot at index 0");
            return Err(WalError::Invalid {
                reason: "snapshot at index 0".to_string(),
            });
        }
        self.write_records(std::iter::once(record))?;
        self.snapshot_marker = Some((term, index));
        self.snapshot_index = self.snapshot_index.max(index);
        Ok(())
    }

    /// Removes whole segments all of whose entries have index < `index`, oldest first, never
    /// the current one. A copy of the hard state and snapshot marker is first appended to the
    /// current segment and synced, so that they survive the older copies going: the copies a
    /// segment opens with are not enough, because a crash may have taken them (the new segment's
    /// name was durable, its first write was not).
    ///
    /// Contract: a durable snapshot covers every entry below `index` (`index` is at most the
    /// newest snapshot index + 1, counting the caller's `after_index` and saved markers).
    pub fn release_to(&mut self, index: u64) -> Result<(), WalError> {
        debug_assert!(
            index <= self.snapshot_index.saturating_add(1),
            "releasing entries below {index} that no snapshot (newest {}) covers",
            self.snapshot_index
        );
        let releasable = self.segments[..self.segments.len() - 1]
            .iter()
            .take_while(|s| s.max_entry_index.is_none_or(|max| max < index))
            .count();
        if releasable == 0 {
            return Ok(());
        }
        let hard_state = self.hard_state.clone();
        let marker = self.snapshot_marker;
        self.write_records(
            std::iter::once(RecordRef::HardState(&hard_state))
                .chain(marker.map(|(term, index)| RecordRef::SnapshotMarker { term, index })),
        )?;
        self.sync()?;
        for _ in 0..releasable {
            let oldest = &self.segments[0];
            debug_assert!(self.segments.len() > 1, "the current segment stays");
            self.disk
                .remove(&oldest.path)
                .map_err(io_error("remove", &oldest.path))?;
            // One removal durable at a time: a crash must never leave a hole in the sequence.
            self.disk
                .sync_dir(&self.dir)
                .map_err(io_error("fsync directory", &self.dir))?;
            tracing::debug!(file = %oldest.path.display(), "wal: released segment");
            self.segments.remove(0);
        }
        Ok(())
    }

    /// The index of the last entry in the log or, when no entry follows the newest snapshot,
    /// that snapshot's index.
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Encodes `records` into one buffer and writes it with one `write_at`, rolling to a new
    /// segment first when they do not fit in the current one.
    fn write_records<'a>(
        &mut self,
        records: impl Iterator<Item = RecordRef<'a>> + Clone,
    ) -> Result<(), WalError> {
        if self.failed {
            return Err(WalError::Failed);
        }
        let mut batch_bytes = 0u64;
        for record in records.clone() {
            let payload = record.payload_len();
            if payload > MAX_RECORD_PAYLOAD_BYTES {
                return Err(WalError::TooLarge {
                    what: "record payload",
                    bytes: payload,
                    max: MAX_RECORD_PAYLOAD_BYTES,
                });
            }
            batch_bytes += record::record_len(payload);
        }
        if batch_bytes == 0 {
            return Ok(());
        }
        if batch_bytes > MAX_APPEND_BYTES {
            return Err(WalError::TooLarge {
                what: "append",
                bytes: batch_bytes,
                max: MAX_APPEND_BYTES,
            });
        }
        self.buf.clear();
        let mut crc = self.last_crc;
        if self.write_offset + batch_bytes > self.file_capacity {
            let first_entry = records.clone().find_map(|r| match r {
                RecordRef::Entry(entry) => Some(entry.index),
                _ => None,
            });
            crc = self.roll(batch_bytes, first_entry.unwrap_or(self.last_index + 1))?;
        }
        let mut max_entry_index = None;
        for record in records {
            if let RecordRef::Entry(entry) = record {
                max_entry_index = Some(entry.index);
            }
            crc = record.encode(&mut self.buf, crc).map_err(|reason| {
                // Cannot happen (sizes were checked); if it did after a roll, the new segment
                // would lack its opening records, so refuse to go on.
                self.failed = true;
                WalError::Invalid { reason }
            })?;
        }
        let len = self.buf.len() as u64;
        debug_assert!(
            len.is_multiple_of(RECORD_ALIGN) && self.write_offset.is_multiple_of(RECORD_ALIGN)
        );
        debug_assert!(
            self.write_offset + len <= self.file_capacity,
            "fits the segment"
        );
        debug_assert!(
            self.batch_reads_back(crc),
            "encoded batch decodes to itself"
        );
        let current = self.segments.len() - 1;
        if let Err(source) = self.zero_ahead(self.write_offset + len) {
            self.failed = true;
            return Err(io_error(
                "write zeros ahead in",
                &self.segments[current].path,
            )(source));
        }
        if let Err(source) = self.file.write_at(self.write_offset, &self.buf) {
            self.failed = true;
            return Err(io_error("write", &self.segments[current].path)(source));
        }
        self.unsynced = true;
        self.write_offset += len;
        self.last_crc = crc;
        if let Some(max) = max_entry_index {
            self.last_index = max;
            let meta = &mut self.segments[current];
            meta.max_entry_index = meta.max_entry_index.max(Some(max));
        }
        if self.buf.capacity() > BUFFER_RETAIN_BYTES {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Called before records are written up to `end`: when that passes what was written,
    /// overwrites the preallocated zeros of `file` from `end` to [`ZERO_AHEAD_BYTES`] past it
    /// (the records themselves cover the rest).
    fn zero_ahead(&mut self, end: u64) -> std::io::Result<()> {
        if end <= self.zeroed_to {
            return Ok(());
        }
        let start = end;
        let stop = (end + ZERO_AHEAD_BYTES).min(self.file_capacity);
        static ZEROS: [u8; ZERO_CHUNK_BYTES as usize] = [0; ZERO_CHUNK_BYTES as usize];
        let mut offset = start;
        while offset < stop {
            let n = (stop - offset).min(ZERO_CHUNK_BYTES);
            // `n` is at most ZERO_CHUNK_BYTES, so it indexes the array.
            self.file.write_at(offset, &ZEROS[..n as usize])?;
            offset += n;
        }
        self.zeroed_to = stop;
        Ok(())
    }

    /// Syncs the current segment, creates the next one (big enough for `batch_bytes` after its
    /// opening records), encodes the latest hard state and snapshot marker into `self.buf` as
    /// its first records and returns the chain's CRC after them.
    fn roll(&mut self, batch_bytes: u64, first_index: u64) -> Result<u32, WalError> {
        // A torn write may only ever sit in the last segment, so this one is made durable
        // before a newer one exists.
        self.sync()?;
        let hard_state = self.hard_state.clone();
        let marker = self.snapshot_marker;
        let opening = std::iter::once(RecordRef::HardState(&hard_state))
            .chain(marker.map(|(term, index)| RecordRef::SnapshotMarker { term, index }));
        let opening_bytes: u64 = opening.clone().map(|r| r.encoded_len()).sum();
        let needed = opening_bytes + batch_bytes;
        let name = SegmentName {
            seq: self.segments[self.segments.len() - 1].name.seq + 1,
            first_index,
        };
        let created = segment::create_fitting(
            self.disk.as_ref(),
            &self.dir,
            name,
            self.segment_capacity.max(needed),
            needed,
        );
        let (path, file, capacity) = created.inspect_err(|_| self.failed = true)?;
        tracing::debug!(file = %path.display(), capacity, "wal: new segment");
        self.segments.push(SegmentMeta {
            name,
            path,
            max_entry_index: None,
        });
        self.file = file;
        self.write_offset = 0;
        self.file_capacity = capacity;
        self.zeroed_to = 0;
        let mut crc = self.last_crc;
        for record in opening {
            crc = record.encode(&mut self.buf, crc).map_err(|reason| {
                self.failed = true;
                WalError::Invalid { reason }
            })?;
        }
        debug_assert_eq!(self.buf.len() as u64, opening_bytes);
        Ok(crc)
    }

    /// Decodes `self.buf` as the chain continuing `self.last_crc` and ending at `end_crc`.
    fn batch_reads_back(&self, end_crc: u32) -> bool {
        let mut offset = 0u64;
        let mut crc = self.last_crc;
        while offset < self.buf.len() as u64 {
            match record::decode_at(&self.buf, offset) {
                record::Decoded::Record(raw) if raw.prev_crc == crc && raw.decode().is_ok() => {
                    crc = raw.crc;
                    offset += raw.len;
                }
                _ => return false,
            }
        }
        crc == end_crc
    }
}
