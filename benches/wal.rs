//! WAL append + fdatasync latency: the price every raft `Ready` pays before it may acknowledge
//! a write or send the messages that depend on it. One entry per sync is the unbatched worst
//! case; 64 entries per sync shows what group commit buys.
//!
//! Runs on `StdDisk` in a temp dir (set `TMPDIR` to measure a particular file system; tmpfs
//! makes fdatasync free).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quorumkv::io::StdDisk;
use quorumkv::wal::{Wal, WalOptions};
use raft::eraftpb::Entry;

/// Payload bytes of each benchmarked entry.
const ENTRY_DATA_BYTES: usize = 256;
/// Entries between two releases of old segments.
const RELEASE_EVERY_ENTRIES: u64 = 1 << 16;

fn append_and_sync(c: &mut Criterion, name: &str, batch_len: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut wal, _) =
        Wal::open(StdDisk::shared(), dir.path(), WalOptions::default(), 0).expect("open wal");
    let mut batch: Vec<Entry> = (0..batch_len)
        .map(|_| Entry {
            term: 1,
            data: vec![0xa5u8; ENTRY_DATA_BYTES].into(),
            ..Default::default()
        })
        .collect();
    let mut group = c.benchmark_group("wal");
    group.throughput(Throughput::Elements(batch_len as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            let next = wal.last_index() + 1;
            for (offset, entry) in batch.iter_mut().enumerate() {
                entry.index = next + offset as u64;
            }
            wal.append(black_box(&batch), None).expect("append");
            wal.sync().expect("sync");
            // Keep the temp dir to a segment or two however long the run: now and then
            // pretend a snapshot covers the log and release it.
            let last = next + batch_len as u64 - 1;
            if last / RELEASE_EVERY_ENTRIES != (next - 1) / RELEASE_EVERY_ENTRIES {
                wal.save_snapshot_marker(1, last).expect("marker");
                wal.release_to(last + 1).expect("release");
            }
        })
    });
    group.finish();
}

fn bench_wal(c: &mut Criterion) {
    append_and_sync(c, "append_1x256B_sync", 1);
    append_and_sync(c, "append_64x256B_sync", 64);
}

criterion_group!(benches, bench_wal);
criterion_main!(benches);
