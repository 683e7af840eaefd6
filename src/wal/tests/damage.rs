//! Torn tails are repaired, and damage anywhere else is reported with file and offset.

use std::path::{Path, PathBuf};

use super::*;

/// Writes entries 1..=5 (the last in a record of its own) and returns the segment, the last
/// record's offset and the bytes its header and payload use.
fn log_ending_in_one_entry_record(dir: &Path) -> (PathBuf, u64, u64) {
    let (mut wal, _) = open(dir, 4096, 0).unwrap();
    wal.append(&entries(1, 1..=4), Some(&hard_state(1, 1, 3)))
        .unwrap();
    let offset = wal.write_offset;
    wal.append(&entries(1, 5..=5), None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let path = segment_paths(dir).pop().unwrap();
    let spans = record_spans(&std::fs::read(&path).unwrap());
    assert_eq!(spans.last().map(|s| s.0), Some(offset));
    (path, offset, spans.last().unwrap().1)
}

/// Damages the last record with `damage(file bytes, k)` for every k inside its header and
/// payload, and checks that reopening keeps the earlier records, reports exactly the zeroed
/// repair, and that the log then takes and keeps a new entry 5.
fn check_torn_last_record(damage: impl Fn(&mut Vec<u8>, usize)) {
    let tmp = tempfile::tempdir().unwrap();
    let (path, offset, used) = log_ending_in_one_entry_record(tmp.path());
    let pristine = std::fs::read(&path).unwrap();
    for k in 0..used as usize {
        let mut bytes = pristine.clone();
        damage(&mut bytes, offset as usize + k);
        std::fs::write(&path, &bytes).unwrap();
        let expected = bytes[offset as usize..]
            .iter()
            .rposition(|b| *b != 0)
            .map(|last| TailRepair {
                file: path.clone(),
                offset,
                dropped_bytes: last as u64 + 1,
            });

        let (mut wal, replay) = open(tmp.path(), 4096, 0).unwrap();
        assert_eq!(replay.entries, entries(1, 1..=4), "damage at byte {k}");
        assert_eq!(replay.hard_state, hard_state(1, 1, 3));
        assert_eq!(replay.repaired_tail, expected, "damage at byte {k}");
        assert_eq!(wal.last_index(), 4);
        let after_repair = std::fs::read(&path).unwrap();
        assert!(after_repair[offset as usize..].iter().all(|b| *b == 0));
        let rewritten = entry(2, 5, 7);
        wal.append(std::slice::from_ref(&rewritten), None).unwrap();
        wal.sync().unwrap();
        drop(wal);

        let (_, replay) = open(tmp.path(), 4096, 0).unwrap();
        assert_eq!(
            replay.entries,
            [entries(1, 1..=4), vec![rewritten]].concat()
        );
        assert_eq!(replay.repaired_tail, None, "damage at byte {k}");
        for extra in segment_paths(tmp.path()).iter().filter(|p| **p != path) {
            std::fs::remove_file(extra).unwrap();
        }
        std::fs::write(&path, &pristine).unwrap();
    }
}

#[test]
fn torn_tail_zeroed_from_every_byte_of_the_last_record_is_repaired() {
    check_torn_last_record(|bytes, from| bytes[from..].fill(0));
}

#[test]
fn torn_tail_overwritten_with_garbage_from_every_byte_of_the_last_record_is_repaired() {
    check_torn_last_record(|bytes, from| {
        let end = (from + 64).min(bytes.len());
        bytes[from..end].iter_mut().for_each(|b| *b = !*b);
    });
}

#[test]
fn torn_tail_cut_short_at_every_byte_of_the_last_record_is_repaired() {
    check_torn_last_record(|bytes, from| bytes.truncate(from));
}

#[test]
fn flipped_byte_followed_by_valid_records_is_corruption_naming_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), 4096, 0).unwrap();
    for index in 1..=6 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let path = segment_paths(tmp.path()).pop().unwrap();
    let pristine = std::fs::read(&path).unwrap();
    let (offset, used) = record_spans(&pristine)[2];
    for at in offset..offset + used {
        let mut bytes = pristine.clone();
        bytes[at as usize] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        expect_corrupt(open(tmp.path(), 4096, 0), &path, offset);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "corruption is not 'repaired'"
        );
    }
}

#[test]
fn flipped_byte_in_a_non_last_segment_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    for index in 1..=20 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let path = segment_paths(tmp.path())[1].clone();
    let pristine = std::fs::read(&path).unwrap();
    let spans = record_spans(&pristine);
    // The first record (valid records follow it) and the last one (nothing follows it).
    for (offset, used) in [spans[0], spans[spans.len() - 1]] {
        let mut bytes = pristine.clone();
        bytes[(offset + used - 1) as usize] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        expect_corrupt(open(tmp.path(), TINY_SEGMENT_BYTES, 0), &path, offset);
    }
}

#[test]
fn zeroed_record_in_a_non_last_segment_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    for index in 1..=20 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let path = segment_paths(tmp.path())[1].clone();
    let mut bytes = std::fs::read(&path).unwrap();
    let spans = record_spans(&bytes);
    assert!(spans.len() >= 3);
    let (offset, _) = spans[1];
    let end = spans[2].0;
    bytes[offset as usize..end as usize].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    expect_corrupt(open(tmp.path(), TINY_SEGMENT_BYTES, 0), &path, offset);
}

#[test]
fn removed_record_breaks_the_chain_and_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), 4096, 0).unwrap();
    for index in 1..=5 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let path = segment_paths(tmp.path()).pop().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let spans = record_spans(&bytes);
    let (offset, next) = (spans[2].0 as usize, spans[3].0 as usize);
    let len = bytes.len();
    bytes.copy_within(next.., offset);
    bytes[len - (next - offset)..].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    expect_corrupt(open(tmp.path(), 4096, 0), &path, offset as u64);
}

#[test]
fn missing_middle_segment_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(tmp.path(), TINY_SEGMENT_BYTES, 0).unwrap();
    for index in 1..=20 {
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let paths = segment_paths(tmp.path());
    std::fs::remove_file(&paths[1]).unwrap();
    expect_corrupt(open(tmp.path(), TINY_SEGMENT_BYTES, 0), &paths[2], 0);
}
