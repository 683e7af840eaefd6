//! What is synced before what: the orderings crash safety rests on, and sync failures.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::io::instrumented_disk::{file_name, InstrumentedDisk};

fn segment_file_name(seq: u64, first_index: u64) -> String {
    SegmentName { seq, first_index }.file_name()
}

#[test]
fn the_segment_is_zeroed_a_step_ahead_of_the_records() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Arc::new(InstrumentedDisk::default());
    let options = WalOptions {
        segment_bytes: 4 * ZERO_AHEAD_BYTES,
    };
    let (mut wal, _) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
    let segment = segment_file_name(1, 1);
    disk.take_writes();

    // The first append zeroes one step past where its records end, then writes them.
    wal.append(&entries(1, 1..=1), None).unwrap();
    let writes = disk.take_writes();
    let (records, zeros) = writes.split_last().unwrap();
    assert!(!records.zeros && records.offset == 0 && records.file == segment);
    assert!(zeros.iter().all(|w| w.zeros && w.file == segment));
    let mut end = records.len;
    for w in zeros {
        assert_eq!(
            w.offset, end,
            "zeros are written contiguously after the records"
        );
        end += w.len;
    }
    assert_eq!(end, records.len + ZERO_AHEAD_BYTES);

    // Appends inside the zeroed range write only their records.
    let mut index = 1;
    while wal.write_offset < end - 4096 {
        index += 1;
        wal.append(&entries(1, index..=index), None).unwrap();
        let writes = disk.take_writes();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(!writes[0].zeros);
    }
    // The append that passes the zeroed end zeroes the next step, from where zeroing stopped.
    while wal.write_offset <= end {
        index += 1;
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    let writes = disk.take_writes();
    let first_zero = writes.iter().find(|w| w.zeros).unwrap();
    let passing = writes
        .iter()
        .find(|w| !w.zeros && w.offset + w.len > end)
        .unwrap();
    assert_eq!(
        first_zero.offset,
        passing.offset + passing.len,
        "zeroing starts where the records end"
    );
    assert_eq!(
        writes
            .iter()
            .filter(|w| w.zeros)
            .map(|w| w.len)
            .sum::<u64>(),
        ZERO_AHEAD_BYTES
    );

    // Zeroing never writes past the segment's end, and replay is unaffected by it.
    while wal.segments.len() == 1 {
        index += 1;
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    let capacity = 4 * ZERO_AHEAD_BYTES;
    let writes = disk.take_writes();
    assert!(writes
        .iter()
        .filter(|w| w.file == segment)
        .all(|w| w.offset + w.len <= capacity));
    wal.sync().unwrap();
    drop(wal);
    let (_, replay) = Wal::open(disk, tmp.path(), options, 0).unwrap();
    assert_eq!(replay.entries.len() as u64, index);
    assert_eq!(replay.entries.last().unwrap().index, index);
}

#[test]
fn rolling_syncs_the_full_segment_before_the_next_one_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Arc::new(InstrumentedDisk::default());
    let options = WalOptions {
        segment_bytes: TINY_SEGMENT_BYTES,
    };
    let (mut wal, _) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
    let mut index = 0;
    while wal.segments.len() == 1 {
        index += 1;
        disk.take_events();
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    let first = segment_file_name(1, 1);
    let second = segment_file_name(2, index);
    assert_eq!(
        disk.take_events(),
        [
            format!("sync {first}"),
            format!("create {second}"),
            format!("sync {second}"),
            "sync dir".to_string(),
        ]
    );
}

#[test]
fn release_syncs_the_current_segment_before_removing_older_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Arc::new(InstrumentedDisk::default());
    let options = WalOptions {
        segment_bytes: TINY_SEGMENT_BYTES,
    };
    let (mut wal, _) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
    while wal.segments.len() < 3 {
        let index = wal.last_index() + 1;
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    let covered = wal.last_index();
    wal.save_snapshot_marker(1, covered).unwrap();
    wal.append(&entries(1, covered + 1..=covered + 1), None)
        .unwrap();
    let names: Vec<String> = wal.segments.iter().map(|s| file_name(&s.path)).collect();
    let (current, older) = names.split_last().unwrap();
    disk.take_events();
    wal.release_to(covered + 1).unwrap();
    let mut expected = vec![format!("sync {current}")];
    for name in older {
        expected.extend([format!("remove {name}"), "sync dir".to_string()]);
    }
    assert!(older.len() >= 2);
    assert_eq!(disk.take_events(), expected);
}

#[test]
fn failed_sync_poisons_the_log_until_it_is_reopened() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Arc::new(InstrumentedDisk::default());
    let options = WalOptions {
        segment_bytes: 4096,
    };
    let (mut wal, _) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
    wal.append(&entries(1, 1..=2), None).unwrap();
    disk.fail_sync.store(true, Ordering::SeqCst);
    let err = wal.sync().unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err}");
    disk.fail_sync.store(false, Ordering::SeqCst);
    assert!(matches!(wal.sync(), Err(WalError::Failed)));
    assert!(matches!(
        wal.append(&entries(1, 3..=3), None),
        Err(WalError::Failed)
    ));
    drop(wal);
    let (_, replay) = Wal::open(disk, tmp.path(), options, 0).unwrap();
    assert_eq!(replay.entries, entries(1, 1..=2));
}

/// Found by the `wal_decode` fuzz target: a crash right after a roll keeps the new segment (its
/// name was made durable) but not its first write, the hard state and marker copies it opens
/// with. Releasing the older segments must not take the only copies with them.
#[test]
fn release_keeps_the_hard_state_when_a_crash_took_the_new_segments_opening_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: TINY_SEGMENT_BYTES,
    };
    let vote = hard_state(3, 2, 1);
    let (mut wal, _) = Wal::open(StdDisk::shared(), tmp.path(), options, 0).unwrap();
    wal.append(&entries(3, 1..=2), Some(&vote)).unwrap();
    wal.sync().unwrap();
    while wal.segments.len() < 2 {
        let index = wal.last_index() + 1;
        wal.append(&entries(3, index..=index), None).unwrap();
    }
    wal.sync().unwrap();
    let newest = wal.segments.last().unwrap().path.clone();
    drop(wal);
    // What the crash left of the newest segment: its preallocated zeros.
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::write(&newest, vec![0u8; len as usize]).unwrap();

    let (mut wal, replay) = Wal::open(StdDisk::shared(), tmp.path(), options, 0).unwrap();
    assert_eq!(replay.hard_state, vote);
    let covered = wal.last_index();
    wal.save_snapshot_marker(3, covered).unwrap();
    wal.release_to(covered + 1).unwrap();
    assert_eq!(
        segment_paths(tmp.path()).len(),
        1,
        "older segments released"
    );
    drop(wal);
    let (_, replay) = Wal::open(StdDisk::shared(), tmp.path(), options, covered).unwrap();
    assert_eq!(replay.hard_state, vote, "term and vote survive the release");
    assert!(replay.entries.is_empty());
}

/// Found by the `peer_message` fuzz target: a follower whose log ran past the leader's snapshot
/// (entries of an old term) installs it; raft drops all of its entries, so a restart must not
/// bring the ones after the snapshot back. A local snapshot (a plain marker) keeps them.
#[test]
fn an_installed_snapshot_supersedes_every_entry_before_it_but_a_marker_does_not() {
    let options = WalOptions {
        segment_bytes: TINY_SEGMENT_BYTES,
    };
    for install in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(StdDisk::shared(), tmp.path(), options, 0).unwrap();
        wal.append(&entries(1, 1..=10), Some(&hard_state(1, 1, 5)))
            .unwrap();
        if install {
            wal.install_snapshot(2, 8).unwrap();
        } else {
            wal.save_snapshot_marker(1, 8).unwrap();
        }
        drop(wal);
        let (mut wal, replay) = Wal::open(StdDisk::shared(), tmp.path(), options, 8).unwrap();
        let kept: Vec<u64> = replay.entries.iter().map(|e| e.index).collect();
        let expected: Vec<u64> = if install { vec![] } else { vec![9, 10] };
        assert_eq!(kept, expected, "install={install}");
        wal.append(&entries(2, 9..=9), None).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, replay) = Wal::open(StdDisk::shared(), tmp.path(), options, 8).unwrap();
        let kept: Vec<(u64, u64)> = replay.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(kept, [(9, 2)], "install={install}");
    }
}

/// The regular files in `dir` and their sizes.
fn files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_roll_on_a_nearly_full_disk_makes_a_smaller_segment_and_leaves_no_failed_file() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Arc::new(InstrumentedDisk::default());
    let options = WalOptions {
        segment_bytes: 64 << 10,
    };
    let (mut wal, _) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
    disk.no_space_over.store(10 << 10, Ordering::SeqCst);
    let mut index = 0;
    while wal.segments.len() == 1 {
        index += 1;
        wal.append(&entries(1, index..=index), None).unwrap();
    }
    wal.sync().unwrap();
    let on_disk = files(tmp.path());
    assert_eq!(on_disk.len(), 2, "{on_disk:?}");
    assert_eq!(on_disk[0].1, 64 << 10);
    // 64 KiB, 32 and 16 did not fit; 8 did.
    assert_eq!(on_disk[1].1, 8 << 10, "{on_disk:?}");
    let second = segment_file_name(2, index);
    let removed = disk
        .take_events()
        .iter()
        .filter(|e| **e == format!("remove {second}"))
        .count();
    assert_eq!(removed, 3);
    drop(wal);
    let (_, replay) = Wal::open(disk, tmp.path(), options, 0).unwrap();
    assert_eq!(replay.entries, entries(1, 1..=index));
}

#[test]
fn a_roll_with_no_room_at_all_names_the_space_it_needs_and_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Arc::new(InstrumentedDisk::default());
    let options = WalOptions {
        segment_bytes: TINY_SEGMENT_BYTES,
    };
    let (mut wal, _) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
    disk.no_space_over.store(8, Ordering::SeqCst);
    let mut index = 0;
    let err = loop {
        index += 1;
        if let Err(e) = wal.append(&entries(1, index..=index), None) {
            break e;
        }
    };
    assert!(
        matches!(err, WalError::NoSpace { needed, .. } if needed > 8),
        "{err}"
    );
    assert!(err.to_string().contains("bytes free"), "{err}");
    assert!(matches!(wal.sync(), Err(WalError::Failed)));
    drop(wal);
    let on_disk = files(tmp.path());
    assert_eq!(on_disk.len(), 1, "{on_disk:?}");
    disk.no_space_over.store(0, Ordering::SeqCst);
    let (_, replay) = Wal::open(disk, tmp.path(), options, 0).unwrap();
    assert_eq!(replay.entries, entries(1, 1..=index - 1));
}

#[test]
fn a_start_removes_a_newest_segment_that_holds_no_record() {
    for leftover_bytes in [0u64, 4096] {
        let tmp = tempfile::tempdir().unwrap();
        let disk = Arc::new(InstrumentedDisk::default());
        let options = WalOptions {
            segment_bytes: 4096,
        };
        let (mut wal, _) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
        wal.append(&entries(1, 1..=3), None).unwrap();
        wal.sync().unwrap();
        drop(wal);
        // What a roll that failed after creating its file, or a crash before the first write
        // to it, leaves: empty, or preallocated zeros.
        let leftover = tmp.path().join(segment_file_name(2, 4));
        std::fs::File::create(&leftover)
            .unwrap()
            .set_len(leftover_bytes)
            .unwrap();
        let (mut wal, replay) = Wal::open(disk.clone(), tmp.path(), options, 0).unwrap();
        assert_eq!(replay.entries, entries(1, 1..=3));
        assert!(!leftover.exists(), "{leftover_bytes}");
        wal.append(&entries(1, 4..=4), None).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, replay) = Wal::open(disk, tmp.path(), options, 0).unwrap();
        assert_eq!(replay.entries, entries(1, 1..=4));
    }
}
