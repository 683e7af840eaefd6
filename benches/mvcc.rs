//! MVCC put and range on the real backend (sled) in a temp dir: the apply path's cost per
//! request, and the read path's.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use quorumkv::io::SledBackend;
use quorumkv::mvcc::MvccStore;
use quorumkv::proto::etcdserverpb::{PutRequest, RangeRequest};
use quorumkv::proto::quorumkvpb::raft_request::Request;

const KEYS: u64 = 10_000;

fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:08}").into_bytes()
}

fn open(dir: &tempfile::TempDir) -> MvccStore {
    let backend = SledBackend::open(&dir.path().join("db")).expect("sled");
    MvccStore::open(Arc::new(backend)).expect("mvcc")
}

fn filled(dir: &tempfile::TempDir) -> (MvccStore, u64) {
    let mut store = open(dir);
    let mut index = 0;
    for i in 0..KEYS {
        index += 1;
        let put = PutRequest {
            key: key(i),
            value: vec![b'v'; 256],
            ..Default::default()
        };
        store.apply(index, &Request::Put(put)).expect("put");
    }
    store.flush_staged().expect("flush");
    (store, index)
}

fn bench_put(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, mut index) = filled(&dir);
    let mut i = 0u64;
    c.bench_function("mvcc/put_256B_then_stage", |b| {
        b.iter(|| {
            index += 1;
            i = (i + 7919) % KEYS;
            let put = PutRequest {
                key: key(i),
                value: vec![b'x'; 256],
                ..Default::default()
            };
            store.apply(index, &Request::Put(put)).expect("put");
        })
    });
    store.flush_staged().expect("flush");
    c.bench_function("mvcc/put_64_then_flush_to_sled", |b| {
        b.iter_batched(
            || (),
            |()| {
                for _ in 0..64 {
                    index += 1;
                    i = (i + 7919) % KEYS;
                    let put = PutRequest {
                        key: key(i),
                        value: vec![b'y'; 256],
                        ..Default::default()
                    };
                    store.apply(index, &Request::Put(put)).expect("put");
                }
                store.flush_staged().expect("flush");
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_range(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = filled(&dir);
    let mut i = 0u64;
    c.bench_function("mvcc/range_single_key", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            let resp = store
                .range(&RangeRequest {
                    key: key(i),
                    ..Default::default()
                })
                .expect("range");
            assert_eq!(resp.kvs.len(), 1);
        })
    });
    c.bench_function("mvcc/range_100_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % (KEYS - 100);
            let resp = store
                .range(&RangeRequest {
                    key: key(i),
                    range_end: key(i + 100),
                    ..Default::default()
                })
                .expect("range");
            assert_eq!(resp.kvs.len(), 100);
        })
    });
}

criterion_group!(benches, bench_put, bench_range);
criterion_main!(benches);
