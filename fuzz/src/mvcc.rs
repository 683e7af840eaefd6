//! `mvcc_model`: the real mvcc store, on sled or on the in-memory backend, against a model that
//! keeps the whole key space at every revision.
//!
//! Operations: put, delete (one key, a range, everything from a key), txn (a compare on one key,
//! then put/delete/range ops), range (at any revision, with limit, count-only and keys-only),
//! compaction, handing the staged writes to the backend, flushing the backend, and a crash
//! (the store and backend are dropped and reopened; with the in-memory backend only what was
//! flushed survives). Every response is compared with the model; after each reopen the store
//! must be exactly the model at one of the points its writes could have stopped at, and every
//! revision not compacted must read back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use quorumkv::io::{Backend, MemBackend, SledBackend};
use quorumkv::mvcc::{check_txn, ApplyOutcome, MvccError, MvccStore};
use quorumkv::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use quorumkv::proto::etcdserverpb::{
    request_op, response_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RangeResponse, RequestOp, TxnRequest,
};
use quorumkv::proto::mvccpb::KeyValue;
use quorumkv::proto::quorumkvpb::raft_request::Request;

use crate::input::Input;

const MAX_OPS: usize = 48;
const KEYS: [&[u8]; 5] = [b"a", b"b", b"b/1", b"b/2", b"c"];
/// etcd's default --max-txn-ops.
const MAX_TXN_OPS: usize = 128;

/// One key as the model holds it.
#[derive(Clone, Debug, PartialEq)]
struct ModelKv {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

type KeySpace = BTreeMap<Vec<u8>, ModelKv>;

/// Every revision's key space; `revisions[0]` is revision 1, the empty store.
#[derive(Clone, Debug)]
struct Model {
    revisions: Vec<KeySpace>,
    compact_rev: i64,
}

impl Model {
    fn new() -> Self {
        Model {
            revisions: vec![KeySpace::new()],
            compact_rev: 0,
        }
    }

    fn current_rev(&self) -> i64 {
        self.revisions.len() as i64
    }

    fn at(&self, rev: i64) -> &KeySpace {
        &self.revisions[(rev - 1) as usize]
    }

    fn read_rev(&self, rev: i64) -> Result<i64, &'static str> {
        let current = self.current_rev();
        let rev = if rev <= 0 { current } else { rev };
        if rev > current {
            return Err("future");
        }
        if rev < self.compact_rev {
            return Err("compacted");
        }
        Ok(rev)
    }
}

fn matches(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

fn model_range(space: &KeySpace, req: &RangeRequest) -> (Vec<KeyValue>, i64, bool) {
    let all: Vec<KeyValue> = space
        .iter()
        .filter(|(k, _)| matches(k, &req.key, &req.range_end))
        .map(|(k, kv)| KeyValue {
            key: k.clone(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: if req.keys_only {
                Vec::new()
            } else {
                kv.value.clone()
            },
            lease: 0,
        })
        .collect();
    let count = all.len() as i64;
    let limit = if req.limit > 0 {
        req.limit as usize
    } else {
        all.len()
    };
    // etcd reads one past the limit to tell whether there is more; a count-only read has none.
    let more = !req.count_only && all.len() > limit;
    let kvs = if req.count_only {
        Vec::new()
    } else {
        all.into_iter().take(limit).collect()
    };
    (kvs, count, more)
}

fn compare_holds(space: &KeySpace, cmp: &Compare) -> bool {
    let kv = space.get(&cmp.key);
    let ordering = match cmp.target_union.as_ref() {
        Some(TargetUnion::Value(value)) => match kv {
            Some(kv) => kv.value.as_slice().cmp(value.as_slice()),
            None => return false,
        },
        Some(TargetUnion::Version(v)) => kv.map_or(0, |kv| kv.version).cmp(v),
        Some(TargetUnion::CreateRevision(v)) => kv.map_or(0, |kv| kv.create_revision).cmp(v),
        Some(TargetUnion::ModRevision(v)) => kv.map_or(0, |kv| kv.mod_revision).cmp(v),
        Some(TargetUnion::Lease(v)) => 0.cmp(v),
        None => return false,
    };
    match CompareResult::try_from(cmp.result) {
        Ok(CompareResult::Equal) => ordering.is_eq(),
        Ok(CompareResult::Greater) => ordering.is_gt(),
        Ok(CompareResult::Less) => ordering.is_lt(),
        Ok(CompareResult::NotEqual) => ordering.is_ne(),
        Err(_) => false,
    }
}

fn key(input: &mut Input) -> Vec<u8> {
    KEYS[input.below(KEYS.len() as u64) as usize].to_vec()
}

/// A key and range end: one key, a prefix, or everything from the key.
fn key_range(input: &mut Input) -> (Vec<u8>, Vec<u8>) {
    match input.below(4) {
        0 | 1 => (key(input), Vec::new()),
        2 => (b"b".to_vec(), b"c".to_vec()),
        _ => (key(input), vec![0]),
    }
}

fn put_request(input: &mut Input) -> PutRequest {
    let len = input.below(8) as usize;
    PutRequest {
        key: key(input),
        value: input.take(len).to_vec(),
        prev_kv: input.bool(),
        ..Default::default()
    }
}

fn delete_request(input: &mut Input) -> DeleteRangeRequest {
    let (key, range_end) = key_range(input);
    DeleteRangeRequest {
        key,
        range_end,
        prev_kv: input.bool(),
    }
}

fn range_request(input: &mut Input, model: &Model) -> RangeRequest {
    let (key, range_end) = key_range(input);
    let revision = if input.bool() {
        0
    } else {
        input.below(model.current_rev() as u64 + 2) as i64
    };
    RangeRequest {
        key,
        range_end,
        revision,
        limit: input.below(4) as i64,
        count_only: input.below(8) == 0,
        keys_only: input.below(8) == 0,
        ..Default::default()
    }
}

fn request_op(input: &mut Input, model: &Model) -> RequestOp {
    let request = match input.below(3) {
        0 => request_op::Request::RequestPut(put_request(input)),
        1 => request_op::Request::RequestDeleteRange(delete_request(input)),
        _ => {
            let mut range = range_request(input, model);
            range.revision = 0;
            request_op::Request::RequestRange(range)
        }
    };
    RequestOp {
        request: Some(request),
    }
}

fn txn_request(input: &mut Input, model: &Model) -> TxnRequest {
    let target = match input.below(4) {
        0 => {
            let len = input.below(4) as usize;
            TargetUnion::Value(input.take(len).to_vec())
        }
        1 => TargetUnion::Version(input.below(4) as i64),
        2 => TargetUnion::CreateRevision(input.below(model.current_rev() as u64 + 1) as i64),
        _ => TargetUnion::ModRevision(input.below(model.current_rev() as u64 + 1) as i64),
    };
    let target_kind = match target {
        TargetUnion::Value(_) => CompareTarget::Value,
        TargetUnion::Version(_) => CompareTarget::Version,
        TargetUnion::CreateRevision(_) => CompareTarget::Create,
        TargetUnion::ModRevision(_) => CompareTarget::Mod,
        TargetUnion::Lease(_) => CompareTarget::Lease,
    };
    let compare = Compare {
        result: input.below(4) as i32,
        target: target_kind as i32,
        key: key(input),
        range_end: Vec::new(),
        target_union: Some(target),
    };
    let success = (0..input.below(3))
        .map(|_| request_op(input, model))
        .collect();
    let failure = (0..input.below(2))
        .map(|_| request_op(input, model))
        .collect();
    TxnRequest {
        compare: vec![compare],
        success,
        failure,
    }
}

/// Applies a write to the model; returns whether it made a new revision.
fn model_write(space: &mut KeySpace, rev: i64, op: &request_op::Request) -> bool {
    match op {
        request_op::Request::RequestPut(put) => {
            let (create_revision, version) = match space.get(&put.key) {
                Some(kv) => (kv.create_revision, kv.version + 1),
                None => (rev, 1),
            };
            space.insert(
                put.key.clone(),
                ModelKv {
                    value: put.value.clone(),
                    create_revision,
                    mod_revision: rev,
                    version,
                },
            );
            true
        }
        request_op::Request::RequestDeleteRange(del) => {
            let doomed: Vec<Vec<u8>> = space
                .keys()
                .filter(|k| matches(k, &del.key, &del.range_end))
                .cloned()
                .collect();
            for k in &doomed {
                space.remove(k);
            }
            !doomed.is_empty()
        }
        _ => false,
    }
}

enum Store {
    Sled { path: PathBuf },
    Mem { backend: MemBackend },
}

impl Store {
    fn open(&self) -> MvccStore {
        let backend: Arc<dyn Backend> = match self {
            Store::Sled { path } => Arc::new(open_sled(path)),
            Store::Mem { backend } => Arc::new(backend.clone()),
        };
        MvccStore::open(backend).expect("the store opens")
    }
}

/// Opens sled at `path`. A handle just dropped in this process may keep the directory's lock
/// for a moment (sled's flusher thread lets go of it last), so the lock is waited for; a server
/// opens its backend once per process and never meets this.
fn open_sled(path: &std::path::Path) -> SledBackend {
    let mut attempts = 0;
    loop {
        match SledBackend::open(path) {
            Ok(backend) => return backend,
            Err(e) if attempts < 2000 && e.to_string().contains("could not acquire lock") => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => panic!("sled does not open its own directory: {e}"),
        }
    }
}

fn scratch_dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("quorumkv-fuzz-mvcc-{}", std::process::id()))
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut store_kind = if input.below(4) == 0 {
        let path = scratch_dir();
        let _ = std::fs::remove_dir_all(&path);
        Store::Sled { path }
    } else {
        Store::Mem {
            backend: MemBackend::new(),
        }
    };
    let mut store = store_kind.open();
    let mut model = Model::new();
    let mut index = 0u64;
    // States the backend may hold after a crash: the one at the last backend flush, then one
    // per batch handed to it since (the backend applies batches atomically, in order).
    let mut recoverable: Vec<(u64, Model)> = vec![(0, model.clone())];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.below(10) {
            0 | 1 => {
                let req = put_request(&mut input);
                index += 1;
                let rev = model.current_rev() + 1;
                let mut next = model.at(model.current_rev()).clone();
                let prev = next.get(&req.key).cloned();
                model_write(
                    &mut next,
                    rev,
                    &request_op::Request::RequestPut(req.clone()),
                );
                match store.apply(index, &Request::Put(req.clone())) {
                    Ok(ApplyOutcome::Put(resp)) => {
                        let expected_prev = if req.prev_kv {
                            prev.map(|kv| kv.value)
                        } else {
                            None
                        };
                        assert_eq!(
                            resp.prev_kv.map(|kv| kv.value),
                            expected_prev,
                            "put's prev_kv"
                        );
                    }
                    other => panic!("put failed: {other:?}"),
                }
                model.revisions.push(next);
            }
            2 => {
                let req = delete_request(&mut input);
                index += 1;
                let rev = model.current_rev() + 1;
                let mut next = model.at(model.current_rev()).clone();
                let before = model.at(model.current_rev()).clone();
                let changed = model_write(
                    &mut next,
                    rev,
                    &request_op::Request::RequestDeleteRange(req.clone()),
                );
                match store.apply(index, &Request::DeleteRange(req.clone())) {
                    Ok(ApplyOutcome::DeleteRange(resp)) => {
                        let deleted: Vec<&Vec<u8>> = before
                            .keys()
                            .filter(|k| matches(k, &req.key, &req.range_end))
                            .collect();
                        assert_eq!(resp.deleted, deleted.len() as i64, "deleted count");
                        if req.prev_kv {
                            let got: Vec<&Vec<u8>> =
                                resp.prev_kvs.iter().map(|kv| &kv.key).collect();
                            assert_eq!(got, deleted, "delete's prev_kvs");
                        }
                    }
                    other => panic!("delete failed: {other:?}"),
                }
                if changed {
                    model.revisions.push(next);
                }
            }
            3 | 4 => {
                let req = txn_request(&mut input, &model);
                if check_txn(&req, MAX_TXN_OPS).is_err() {
                    continue;
                }
                index += 1;
                let rev = model.current_rev() + 1;
                let mut working = model.at(model.current_rev()).clone();
                let succeeded = req.compare.iter().all(|c| compare_holds(&working, c));
                let ops = if succeeded {
                    &req.success
                } else {
                    &req.failure
                };
                let mut changed = false;
                let mut expected_reads = Vec::new();
                for op in ops {
                    match op.request.as_ref() {
                        Some(request_op::Request::RequestRange(range)) => {
                            expected_reads.push(model_range(&working, range));
                        }
                        Some(write) => changed |= model_write(&mut working, rev, write),
                        None => {}
                    }
                }
                match store.apply(index, &Request::Txn(req.clone())) {
                    Ok(ApplyOutcome::Txn(resp)) => {
                        assert_eq!(resp.succeeded, succeeded, "txn branch");
                        let reads: Vec<(Vec<KeyValue>, i64, bool)> = resp
                            .responses
                            .iter()
                            .filter_map(|r| match r.response.as_ref() {
                                Some(response_op::Response::ResponseRange(range)) => {
                                    Some(summary(range))
                                }
                                _ => None,
                            })
                            .collect();
                        assert_eq!(reads, expected_reads, "ranges inside the txn");
                    }
                    other => panic!("txn failed: {other:?}"),
                }
                if changed {
                    model.revisions.push(working);
                }
            }
            5 | 6 => {
                let req = range_request(&mut input, &model);
                check_range_matches(&store, &model, &req);
            }
            7 => {
                let revision = input.below(model.current_rev() as u64 + 2) as i64;
                index += 1;
                // A compaction first hands the staged writes to the backend (its scan must
                // see every revision): the state before it becomes recoverable.
                let handed =
                    (store.staged_ops() > 0).then(|| (store.consistent_index(), model.clone()));
                let result = store.apply(
                    index,
                    &Request::Compaction(CompactionRequest {
                        revision,
                        physical: false,
                    }),
                );
                let expected = if revision > model.current_rev() {
                    Err("future")
                } else if revision <= model.compact_rev {
                    Err("compacted")
                } else {
                    Ok(())
                };
                match (result, expected) {
                    (Ok(_), Ok(())) => {
                        recoverable.extend(handed);
                        model.compact_rev = revision;
                    }
                    (Err(MvccError::FutureRev), Err("future"))
                    | (Err(MvccError::Compacted), Err("compacted")) => store.skip(index),
                    (got, want) => panic!("compact {revision}: got {got:?}, want {want:?}"),
                }
            }
            8 => {
                if store.staged_ops() > 0 {
                    store
                        .flush_staged()
                        .expect("hand staged writes to the backend");
                    recoverable.push((store.consistent_index(), model.clone()));
                }
                if input.bool() {
                    store.backend().flush().expect("backend flush");
                    // Only the newest batch handed over is certain now.
                    recoverable.drain(..recoverable.len() - 1);
                }
            }
            _ => {
                // A crash: what was not handed to the backend is gone; the in-memory backend
                // also loses what it did not flush.
                drop(store);
                if let Store::Mem { backend } = &store_kind {
                    store_kind = Store::Mem {
                        backend: backend.crashed_copy(),
                    };
                }
                store = store_kind.open();
                let at = store.consistent_index();
                let Some((_, state)) = recoverable.iter().find(|(ci, _)| *ci == at) else {
                    panic!(
                        "reopened at consistent index {at}, which no batch handed to the backend ended at ({:?})",
                        recoverable.iter().map(|(ci, _)| *ci).collect::<Vec<_>>()
                    );
                };
                model = state.clone();
                assert_eq!(
                    store.current_rev(),
                    model.current_rev(),
                    "revision after reopen"
                );
                assert_eq!(
                    store.compact_rev(),
                    model.compact_rev,
                    "compaction after reopen"
                );
                for rev in model.compact_rev.max(1)..=model.current_rev() {
                    check_range_matches(
                        &store,
                        &model,
                        &RangeRequest {
                            key: vec![0],
                            range_end: vec![0],
                            revision: rev,
                            ..Default::default()
                        },
                    );
                }
                recoverable = vec![(at, model.clone())];
                index = index.max(at);
            }
        }
        assert_eq!(store.current_rev(), model.current_rev(), "current revision");
    }
    drop(store);
    if let Store::Sled { path } = &store_kind {
        let _ = std::fs::remove_dir_all(path);
    }
}

fn summary(range: &RangeResponse) -> (Vec<KeyValue>, i64, bool) {
    (range.kvs.clone(), range.count, range.more)
}

fn check_range_matches(store: &MvccStore, model: &Model, req: &RangeRequest) {
    let result = store.range(req);
    match (model.read_rev(req.revision), result) {
        (Ok(rev), Ok(resp)) => {
            assert_eq!(
                summary(&resp),
                model_range(model.at(rev), req),
                "range {req:?} at revision {rev}"
            );
        }
        (Err("future"), Err(MvccError::FutureRev))
        | (Err("compacted"), Err(MvccError::Compacted)) => {}
        (want, got) => panic!("range {req:?}: got {got:?}, want {want:?}"),
    }
}
