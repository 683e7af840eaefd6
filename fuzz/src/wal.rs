//! `wal_decode`: the WAL reader on bytes it did not write, and the writer against a model
//! across crashes.
//!
//! The first byte picks a mode:
//! - raw segments: the rest becomes one to three segment files. Opening them must return the log
//!   or a corruption/gap error, never panic; every entry returned must come from a record whose
//!   own CRC holds (checked by an independent scan of the bytes); after a successful open the
//!   log must take appends, and a reopen must read back exactly what was there plus them.
//! - write, crash, read: the rest is a sequence of appends, syncs, snapshot markers, releases
//!   and power losses (the simulator's disk keeps what was synced plus a prefix of later
//!   writes, the last one possibly torn). After each power loss the reopened log must be one of
//!   the states the model passed through since the last sync, record by record.

use std::path::Path;
use std::sync::Arc;

use protobuf::Message as _;
use quorumkv::io::Disk;
use quorumkv::wal::{Wal, WalError, WalOptions};
use quorumkv_sim::disk::SimDisk;
use raft::eraftpb::{Entry, HardState};
use rand::SeedableRng;

use crate::entry;
use crate::input::Input;

const DIR: &str = "/member/wal";
/// Operations per write-crash-read input.
const MAX_OPS: usize = 64;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    if input.byte() & 1 == 0 {
        raw_segments(&mut input);
    } else {
        write_crash_read(&mut input);
    }
}

fn options(input: &mut Input) -> WalOptions {
    WalOptions {
        segment_bytes: 128 * (1 + input.below(16)),
    }
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

fn raw_segments(input: &mut Input) {
    let disk = SimDisk::new();
    let dir = Path::new(DIR);
    disk.create_dir_all(dir).expect("sim disk");
    let opts = options(input);
    let count = 1 + input.below(3);
    let first_seq = if input.bool() { 1 } else { 2 + input.below(3) };
    let after_index = if input.bool() { 0 } else { input.below(8) };
    let mut segments = Vec::new();
    for i in 0..count {
        let len = if i + 1 == count {
            input.remaining()
        } else {
            input.below(input.remaining() as u64 + 1) as usize
        };
        let first_index = input.below(8);
        let bytes = input.take(len).to_vec();
        let path = dir.join(segment_name(first_seq + i, first_index));
        let mut file = disk.open(&path, true).expect("sim disk");
        file.write_at(0, &bytes).expect("sim disk");
        file.sync_data().expect("sim disk");
        segments.push(bytes);
    }
    disk.sync_dir(dir).expect("sim disk");

    let disk: Arc<dyn Disk> = Arc::new(disk);
    let (mut wal, replay) = match Wal::open(disk.clone(), dir, opts, after_index) {
        Ok(opened) => opened,
        Err(WalError::Corrupt { .. } | WalError::Gap { .. }) => return,
        Err(e) => panic!("reading segments failed with an unexpected error: {e}"),
    };
    let written: Vec<Entry> = segments
        .iter()
        .flat_map(|s| self_consistent_entries(s))
        .collect();
    for entry in &replay.entries {
        assert!(
            written.contains(entry),
            "replay returned entry {} (term {}) that no CRC-valid record holds",
            entry.index,
            entry.term
        );
        assert!(entry.index > after_index, "entry at or below the snapshot");
    }
    assert!(
        replay
            .entries
            .windows(2)
            .all(|w| w[0].index + 1 == w[1].index),
        "replayed entries are contiguous"
    );

    // The log must go on from where replay left it, and read back the same.
    let last = wal.last_index();
    let term = replay
        .entries
        .last()
        .map_or(0, |e| e.term)
        .max(replay.hard_state.term)
        .max(1);
    let appended: Vec<Entry> = (last + 1..=last + 3)
        .map(|index| entry(term, index, b"after"))
        .collect();
    let hard_state = HardState {
        term,
        vote: replay.hard_state.vote,
        commit: replay.hard_state.commit.min(last + 3),
        ..Default::default()
    };
    wal.append(&appended, Some(&hard_state))
        .expect("append after a successful open");
    wal.sync().expect("sync after a successful open");
    drop(wal);
    let reopened = Wal::open(disk, dir, opts, after_index);
    let contiguous = last == after_index + replay.entries.len() as u64;
    match reopened {
        Ok((_, again)) => {
            assert!(contiguous, "reopen skipped a gap the first open had");
            let mut expected = replay.entries.clone();
            expected.extend(appended);
            assert_eq!(again.entries, expected, "reopen reads back the log");
            assert_eq!(
                again.hard_state, hard_state,
                "reopen reads back the hard state"
            );
            assert!(
                again.repaired_tail.is_none(),
                "the first open repaired the tail"
            );
        }
        Err(WalError::Gap { .. }) if !contiguous => {}
        Err(e) => panic!("a log that opened and was appended to no longer opens: {e}"),
    }
}

/// Every entry held by a record whose CRC matches its contents, at any aligned offset of a
/// segment; written from the record layout in `wal::record`'s docs, independently of it.
fn self_consistent_entries(segment: &[u8]) -> Vec<Entry> {
    const HEADER: usize = 16;
    const ENTRY: u8 = 1;
    let mut found = Vec::new();
    let mut offset = 0;
    while offset + HEADER <= segment.len() {
        let header = &segment[offset..offset + HEADER];
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let len = word(0) as usize;
        let end = offset + HEADER + len;
        if header[4] == ENTRY && end <= segment.len() {
            let payload = &segment[offset + HEADER..end];
            let crc = crc32c::crc32c_append(
                crc32c::crc32c_append(crc32c::crc32c(&header[8..12]), &[ENTRY]),
                payload,
            );
            if crc == word(12) {
                if let Ok(entry) = Entry::parse_from_bytes(payload) {
                    found.push(entry);
                }
            }
        }
        offset += 8;
    }
    found
}

/// The log as raft would see it after a sequence of writes.
#[derive(Clone, Debug, Default, PartialEq)]
struct LogModel {
    /// Contiguous; the first may be above 1 after releases (never compared below `snapshot`).
    entries: Vec<Entry>,
    hard_state: HardState,
    /// The newest snapshot marker's index (0: none).
    snapshot: u64,
}

impl LogModel {
    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot, |e| e.index.max(self.snapshot))
    }

    fn term_at(&self, index: u64) -> u64 {
        self.entries
            .iter()
            .find(|e| e.index == index)
            .map_or(0, |e| e.term)
    }

    fn append(&mut self, entry: Entry) {
        self.entries.retain(|e| e.index < entry.index);
        self.entries.push(entry);
    }

    /// What a replay after `after_index` should return.
    fn after(&self, after_index: u64) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| e.index > after_index)
            .cloned()
            .collect()
    }
}

fn write_crash_read(input: &mut Input) {
    let sim_disk = SimDisk::new();
    let disk: Arc<dyn Disk> = Arc::new(sim_disk.clone());
    let dir = Path::new(DIR);
    let opts = options(input);
    let mut rng = rand::rngs::StdRng::seed_from_u64(input.u64());
    let (mut wal, _) = Wal::open(disk.clone(), dir, opts, 0).expect("a new log opens");
    let mut model = LogModel::default();
    // The durable state, then every state reached record by record since the last sync: a
    // crash may leave any of them.
    let mut since_sync: Vec<LogModel> = vec![model.clone()];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.byte() % 8;
        crate::trace!(
            "op {op}: model last {} snapshot {} hs {:?}",
            model.last_index(),
            model.snapshot,
            model.hard_state
        );
        match op {
            0..=2 => {
                // Append entries from somewhere in the unsnapshotted suffix, maybe a hard state.
                let last = model.last_index();
                let from = last + 1 - input.below(last - model.snapshot + 1);
                let count = 1 + input.below(4);
                let term = model.term_at(from - 1).max(model.hard_state.term) + input.below(2);
                let entries: Vec<Entry> = (from..from + count)
                    .map(|index| {
                        let len = input.below(48) as usize;
                        entry(term.max(1), index, input.take(len))
                    })
                    .collect();
                let new_last = from + count - 1;
                let hard_state = input.bool().then(|| HardState {
                    term: term.max(1),
                    vote: input.below(4),
                    commit: input.below(new_last + 1).max(model.snapshot.min(new_last)),
                    ..Default::default()
                });
                crate::trace!(
                    "append {:?} hs {hard_state:?}",
                    entries
                        .iter()
                        .map(|e| (e.index, e.term))
                        .collect::<Vec<_>>()
                );
                wal.append(&entries, hard_state.as_ref())
                    .expect("append within the contract");
                for e in entries {
                    model.append(e);
                    since_sync.push(model.clone());
                }
                if let Some(hard_state) = hard_state {
                    model.hard_state = hard_state;
                    since_sync.push(model.clone());
                }
            }
            3 | 4 => {
                wal.sync().expect("sync");
                since_sync = vec![model.clone()];
            }
            5 => {
                // A snapshot at an index in the log (markers are synced when saved).
                let last = model.last_index();
                if last > model.snapshot {
                    let index = model.snapshot + 1 + input.below(last - model.snapshot);
                    let term = model.term_at(index).max(1);
                    crate::trace!("snapshot marker {index} term {term}");
                    wal.save_snapshot_marker(term, index)
                        .expect("snapshot marker");
                    model.snapshot = index;
                    since_sync = vec![model.clone()];
                }
            }
            6 => {
                let upto = input.below(model.snapshot + 2);
                crate::trace!("release to {upto}");
                wal.release_to(upto).expect("release");
            }
            _ => {
                drop(wal);
                let report = sim_disk.crash(&mut rng, true);
                crate::trace!("crash: {report:?}");
                let after_index = model.snapshot;
                let (reopened, replay) = match Wal::open(disk.clone(), dir, opts, after_index) {
                    Ok(opened) => opened,
                    Err(e) => panic!("the log does not open after a power loss: {e}"),
                };
                let matched = since_sync.iter().find(|state| {
                    state.after(after_index) == replay.entries
                        && state.hard_state == replay.hard_state
                });
                let Some(matched) = matched else {
                    panic!(
                        "after a power loss the log holds {:?} with {:?}; none of the {} states since the last sync matches",
                        replay.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
                        replay.hard_state,
                        since_sync.len()
                    );
                };
                model = matched.clone();
                since_sync = vec![model.clone()];
                wal = reopened;
            }
        }
    }
}
