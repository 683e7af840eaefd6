//! Properties of the WAL on a real file system (`StdDisk` in a temp dir): what replay returns.
//! `damage` covers torn tails and corruption, `durability` the order of syncs.

mod damage;
mod durability;

use std::path::{Path, PathBuf};

use raft::eraftpb::{Entry, HardState};

use super::record::{self, Decoded};
use super::*;
use crate::io::StdDisk;

const TINY_SEGMENT_BYTES: u64 = 256;

fn entry(term: u64, index: u64, data_len: usize) -> Entry {
    let data: Vec<u8> = (0..data_len)
        .map(|i| (index as u8).wrapping_mul(31).wrapping_add(i as u8) | 1)
        .collect();
    Entry {
        term,
        index,
        data: data.into(),
        ..Default::default()
    }
}

fn entries(term: u64, indices: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    indices.map(|index| entry(term, index, 20)).collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn open(dir: &Path, segment_bytes: u64, after_index: u64) -> Result<(Wal, WalReplay), WalError> {
    Wal::open(
        StdDisk::shared(),
        dir,
        WalOptions { segment_bytes },
        after_index,
    )
}

fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    paths.sort();
    paths
}

/// (offset, bytes used by header and payload) of every record in a segment file.
fn record_spans(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut spans = Vec::new();
    let mut offset = 0;
    while let Decoded::Record(raw) = record::decode_at(bytes, offset) {
        spans.push((offset, record::HEADER_BYTES + raw.payload.len() as u64));
        offset += raw.len;
    }
    spans
}

fn expect_corrupt(result: Result<(Wal, WalReplay), WalError>, file: &Path, offset: u64) {
    match result {
        Err(err @ WalError::Corrupt { .. }) => {
            let WalError::Corrupt {
                file: found_file,
                offset: found_offset,
                ..
            } = &err
            else {
                unreachable!()
            };
            assert_eq!(
                (found_file.as_path(), *found_offset),
                (file, offset),
                "{err}"
            );
            let message = err.to_string();
            assert!(message.contains(&file.display().to_string()), "{message}");
            assert!(message.contains(&format!("offset {offset}")), "{message}");
        }
        Err(other) => panic!("expected corruption at {offset}, got {other}"),
        Ok(_) => panic!("expected corruption at {offset}, the log opened"),
    }
}

#[test]
fn entries_and_hard_state_round_trip_across_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, replay) = open(tmp.path(), 4096, 0).unwrap();
    assert_eq!(replay, WalReplay::default());
    wal.append(&entries(1, 1..=3), Some(&hard_state(1, 1, 0)))
        .unwrap();
    wal.append(&entries(1, 4..=7), Some(&hard_state(1, 1, 5)))
        .unwrap();
    wal.sync().unwrap();
    drop(wal);

    let (mut wal, replay) = open(tmp.path(), 4096, 0).unwrap();
    assert_eq!(replay.entries, entries(1, 1..=7));
    assert_eq!(replay.hard_state, hard_state(1, 1, 5));
    assert_eq!(replay.repaired_tail, None);
    assert_eq!(wal.last_index(), 7);
    wal.append(&entries(2, 8..=8), None).unwrap();
    wal.sync().unwrap();
    drop(wal);

    let (_, replay) = open(tmp.path(), 4096, 0).unwrap();
    assert_eq!(
        replay.entries,
        [entries(1, 1..=7), entries(2, 8..=8)].concat()
    );
    assert_eq!(replay.hard_state, hard_state(1, 1, 5));
}

#[test]
fn overwritten_suffix_is_truncated_on_replay_even_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    for index in 1..=12 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.append(&entries(2, 5..=6), Some(&hard_state(2, 0, 4)))
        .unwrap();
    assert_eq!(wal.last_index(), 6);
    wal.sync().unwrap();
    drop(wal);
    assert!(
        segment_paths(tmp.path()).len() > 2,
        "the test spans segments"
    );

    let (wal, replay) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    assert_eq!(
        replay.entries,
        [entries(1, 1..=4), entries(2, 5..=6)].concat()
    );
    assert_eq!(wal.last_index(), 6);
}

#[test]
fn replay_returns_only_entries_after_after_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), 4096, 0).unwrap();
    wal.append(&entries(1, 1..=10), Some(&hard_state(1, 0, 10)))
        .unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (wal, replay) = open(tmp.path(), 4096, 4).unwrap();
    assert_eq!(replay.entries, entries(1, 5..=10));
    assert_eq!(wal.last_index(), 10);
    drop(wal);
    let (wal, replay) = open(tmp.path(), 4096, 10).unwrap();
    assert!(replay.entries.is_empty());
    assert_eq!(wal.last_index(), 10);
    drop(wal);
    let (wal, replay) = open(tmp.path(), 4096, 15).unwrap();
    assert!(replay.entries.is_empty());
    assert_eq!(wal.last_index(), 15, "the snapshot is newer than the log");
}

#[test]
fn entries_released_past_the_callers_snapshot_are_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    for index in 1..=20 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.save_snapshot_marker(1, 15).unwrap();
    wal.release_to(15).unwrap();
    drop(wal);
    let err = open(tmp.path(), TINY_SEGMENT_BYTES, 2)
        .err()
        .expect("a gap");
    let WalError::Gap {
        after_index,
        first_index,
    } = err
    else {
        panic!("expected a gap, got {err}")
    };
    assert_eq!(after_index, 2);
    assert!(first_index > 3 && first_index <= 15, "{first_index}");
    assert!(err.to_string().contains("after index 2"), "{err}");
    let (_, replay) = open(tmp.path(), TINY_SEGMENT_BYTES, 15).unwrap();
    assert_eq!(replay.entries, entries(1, 16..=20));
}

#[test]
fn snapshot_marker_lets_the_log_jump_after_a_snapshot_install() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), 4096, 0).unwrap();
    wal.append(&entries(1, 1..=5), None).unwrap();
    wal.save_snapshot_marker(3, 100).unwrap();
    assert_eq!(wal.last_index(), 100);
    wal.append(&entries(3, 101..=103), Some(&hard_state(3, 2, 101)))
        .unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (wal, replay) = open(tmp.path(), 4096, 100).unwrap();
    assert_eq!(replay.entries, entries(3, 101..=103));
    assert_eq!(wal.snapshot_marker, Some((3, 100)));
    drop(wal);
    assert!(matches!(
        open(tmp.path(), 4096, 3),
        Err(WalError::Gap {
            after_index: 3,
            first_index: 101
        })
    ));
}

#[test]
fn tiny_segments_roll_and_replay_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    for index in 1..=40 {
        wal.append(
            &entries(1, index..=index),
            Some(&hard_state(1, 1, index - 1)),
        )
        .unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let paths = segment_paths(tmp.path());
    assert!(paths.len() >= 10, "{} segments", paths.len());
    for (seq, path) in paths.iter().enumerate() {
        let name = SegmentName::parse(path.file_name().unwrap().to_str().unwrap()).unwrap();
        assert_eq!(name.seq, seq as u64 + 1);
        assert_eq!(std::fs::metadata(path).unwrap().len(), TINY_SEGMENT_BYTES);
    }
    let (_, replay) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    assert_eq!(replay.entries, entries(1, 1..=40));
    assert_eq!(replay.hard_state, hard_state(1, 1, 39));
}

#[test]
fn hard_state_and_snapshot_marker_survive_release_of_old_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    wal.append(&entries(4, 1..=1), Some(&hard_state(4, 2, 1)))
        .unwrap();
    for index in 2..=34 {
        wal.append(&entries(4, index..=index), None).unwrap();
    }
    wal.save_snapshot_marker(4, 34).unwrap();
    let marker_segment = wal.segments.len();
    // Too big to share a segment with the marker: the marker's segment becomes releasable.
    let big = entry(4, 35, 200);
    wal.append(std::slice::from_ref(&big), None).unwrap();
    assert_eq!(wal.segments.len(), marker_segment + 1);
    for index in 36..=60 {
        wal.append(&entries(4, index..=index), None).unwrap();
    }
    let before = segment_paths(tmp.path()).len();
    wal.release_to(35).unwrap();
    let after = segment_paths(tmp.path()).len();
    assert!(
        before - after >= marker_segment,
        "the segments holding the hard state and the marker went: {before} -> {after}"
    );
    drop(wal);
    let (wal, replay) = open(tmp.path(), TINY_SEGMENT_BYTES, 34).unwrap();
    assert_eq!(replay.hard_state, hard_state(4, 2, 1));
    assert_eq!(wal.snapshot_marker, Some((4, 34)));
    assert_eq!(replay.entries, [vec![big], entries(4, 36..=60)].concat());
}

#[test]
fn release_never_removes_the_current_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    for index in 1..=20 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.save_snapshot_marker(1, 20).unwrap();
    wal.release_to(21).unwrap();
    assert_eq!(segment_paths(tmp.path()).len(), 1);
    wal.append(&entries(1, 21..=21), None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (wal, replay) = open(tmp.path(), TINY_SEGMENT_BYTES, 20).unwrap();
    assert_eq!(replay.entries, entries(1, 21..=21));
    assert_eq!(wal.last_index(), 21);
}

#[test]
fn batch_larger_than_a_segment_gets_a_segment_of_its_own_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    let big: Vec<Entry> = (1..=20).map(|index| entry(1, index, 100)).collect();
    wal.append(&big, Some(&hard_state(1, 1, 20))).unwrap();
    wal.append(&entries(1, 21..=21), None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let sizes: Vec<u64> = segment_paths(tmp.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert!(sizes.iter().any(|len| *len > 20 * 100), "{sizes:?}");
    let (_, replay) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    assert_eq!(replay.entries, [big, entries(1, 21..=21)].concat());
}

#[test]
fn oversized_entry_is_rejected_and_the_log_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), 4096, 0).unwrap();
    let huge = entry(1, 1, MAX_RECORD_PAYLOAD_BYTES as usize);
    assert!(matches!(
        wal.append(&[huge], None),
        Err(WalError::TooLarge { .. })
    ));
    wal.append(&entries(1, 1..=1), None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    assert_eq!(
        open(tmp.path(), 4096, 0).unwrap().1.entries,
        entries(1, 1..=1)
    );
}
