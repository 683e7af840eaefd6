//! Rebuilding raft's persisted state from the records read back in log order.
//!
//! The WAL is append-only, but raft is not: a follower may overwrite a suffix of its log, and a
//! snapshot install makes the log jump forward. Replay folds those rewrites so the caller gets
//! the one log raft last wrote, restricted to what its snapshot does not already hold.

use std::path::PathBuf;

use raft::eraftpb::{Entry, HardState};

use super::record::Record;
use super::WalError;

/// A torn write that replay found at the end of the last segment and zeroed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailRepair {
    /// The segment holding the torn write.
    pub file: PathBuf,
    /// Where the valid records ended; appends continue here.
    pub offset: u64,
    /// How many bytes (from `offset` to the last non-zero byte) were zeroed.
    pub dropped_bytes: u64,
}

/// What `Wal::open` read back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WalReplay {
    /// The last hard state written (the default when none was).
    pub hard_state: HardState,
    /// Entries with index > `after_index`, conflicts resolved, contiguous from `after_index + 1`.
    pub entries: Vec<Entry>,
    /// Set when a torn tail was dropped.
    pub repaired_tail: Option<TailRepair>,
}

/// Folds records, in log order, into the state raft last persisted.
#[derive(Debug)]
pub(crate) struct LogBuilder {
    after_index: u64,
    /// Entries with index > `after_index`, contiguous.
    entries: Vec<Entry>,
    /// Index of the last entry of the whole log read so far (0 before any).
    log_last_index: u64,
    hard_state: HardState,
    snapshot_marker: Option<(u64, u64)>,
}

/// The state replay leaves the log in.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub(crate) hard_state: HardState,
    pub(crate) entries: Vec<Entry>,
    pub(crate) log_last_index: u64,
    pub(crate) snapshot_marker: Option<(u64, u64)>,
}

impl LogBuilder {
    pub(crate) fn new(after_index: u64) -> LogBuilder {
        LogBuilder {
            after_index,
            entries: Vec::new(),
            log_last_index: 0,
            hard_state: HardState::default(),
            snapshot_marker: None,
        }
    }

    pub(crate) fn add(&mut self, record: Record) {
        match record {
            Record::Entry(entry) => self.add_entry(entry),
            Record::HardState(hard_state) => self.hard_state = hard_state,
            Record::SnapshotInstall { term, index } => {
                // The installed snapshot replaced the log: nothing written before it survives.
                self.entries.clear();
                self.log_last_index = index;
                self.snapshot_marker = Some((term, index));
            }
            Record::SnapshotMarker { term, index } => {
                // Markers are written in increasing order, but a copy of the latest one opens
                // every segment; keep the newest.
                if self
                    .snapshot_marker
                    .is_none_or(|(_, newest)| index >= newest)
                {
                    self.snapshot_marker = Some((term, index));
                }
            }
        }
    }

    fn add_entry(&mut self, entry: Entry) {
        let index = entry.index;
        debug_assert!(index > 0, "record decoding rejects index 0");
        if self.log_last_index != 0 && index > self.log_last_index + 1 {
            // The log jumped forward: a snapshot was installed and what came before is
            // superseded. If the caller's snapshot is older than the jump, `finish` reports the gap.
            self.entries.clear();
        } else if index <= self.log_last_index {
            // Raft overwrote the suffix starting at `index`.
            let keep = self.entries.partition_point(|kept| kept.index < index);
            self.entries.truncate(keep);
        }
        if index > self.after_index {
            debug_assert!(
                self.entries
                    .last()
                    .is_none_or(|last| last.index + 1 == index),
                "kept entries stay contiguous"
            );
            self.entries.push(entry);
        }
        self.log_last_index = index;
    }

    /// Checks that the entries continue the caller's snapshot and returns the state.
    pub(crate) fn finish(self) -> Result<Replayed, WalError> {
        if let Some(first) = self.entries.first() {
            if first.index != self.after_index + 1 {
                return Err(WalError::Gap {
                    after_index: self.after_index,
                    first_index: first.index,
                });
            }
        }
        debug_assert!(
            self.entries
                .windows(2)
                .all(|w| w[0].index + 1 == w[1].index),
            "replayed entries are contiguous"
        );
        Ok(Replayed {
            hard_state: self.hard_state,
            entries: self.entries,
            log_last_index: self.log_last_index,
            snapshot_marker: self.snapshot_marker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(term: u64, index: u64) -> Record {
        Record::Entry(Entry {
            term,
            index,
            ..Default::default()
        })
    }

    fn indices_and_terms(replayed: &Replayed) -> Vec<(u64, u64)> {
        replayed.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn overwritten_suffix_replaces_the_old_one() {
        let mut builder = LogBuilder::new(0);
        for index in 1..=5 {
            builder.add(entry(1, index));
        }
        builder.add(entry(2, 3));
        builder.add(entry(2, 4));
        let replayed = builder.finish().unwrap();
        assert_eq!(
            indices_and_terms(&replayed),
            [(1, 1), (2, 1), (3, 2), (4, 2)]
        );
        assert_eq!(replayed.log_last_index, 4);
    }

    #[test]
    fn jump_after_snapshot_install_drops_superseded_entries_or_reports_gap() {
        let records = || [entry(1, 1), entry(1, 2), entry(3, 10), entry(3, 11)];
        let mut builder = LogBuilder::new(9);
        records().into_iter().for_each(|r| builder.add(r));
        assert_eq!(
            indices_and_terms(&builder.finish().unwrap()),
            [(10, 3), (11, 3)]
        );
        let mut builder = LogBuilder::new(1);
        records().into_iter().for_each(|r| builder.add(r));
        assert!(matches!(
            builder.finish(),
            Err(WalError::Gap {
                after_index: 1,
                first_index: 10
            })
        ));
    }

    #[test]
    fn newest_snapshot_marker_and_last_hard_state_win() {
        let mut builder = LogBuilder::new(0);
        let hard_state = HardState {
            term: 2,
            ..Default::default()
        };
        builder.add(Record::SnapshotMarker { term: 2, index: 8 });
        builder.add(Record::SnapshotMarker { term: 1, index: 4 });
        builder.add(Record::HardState(hard_state.clone()));
        let replayed = builder.finish().unwrap();
        assert_eq!(replayed.snapshot_marker, Some((2, 8)));
        assert_eq!(replayed.hard_state, hard_state);
    }
}
