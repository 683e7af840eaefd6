//! Store-level properties on the in-memory backend.

use std::sync::Arc;

use super::*;
use crate::io::{Backend, MemBackend};
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::{
    request_op, response_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use crate::proto::quorumkvpb::raft_request::Request;

pub(super) struct Fixture {
    pub(super) backend: MemBackend,
    pub(super) store: MvccStore,
    pub(super) index: u64,
}

impl Fixture {
    pub(super) fn new() -> Self {
        let backend = MemBackend::new();
        let store = MvccStore::open(Arc::new(backend.clone())).expect("open");
        Fixture {
            backend,
            store,
            index: 0,
        }
    }

    pub(super) fn apply(&mut self, request: Request) -> ApplyResult {
        self.index += 1;
        let result = self.store.apply(self.index, &request);
        if result.is_err() {
            self.store.skip(self.index);
        }
        self.store.flush_staged().expect("flush staged");
        result
    }

    pub(super) fn put(&mut self, key: &str, value: &str) {
        self.apply(Request::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }))
        .expect("put");
    }

    pub(super) fn get(&self, req: RangeRequest) -> Vec<(String, String)> {
        let resp = self.store.range(&req).expect("range");
        resp.kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into(),
                    String::from_utf8_lossy(&kv.value).into(),
                )
            })
            .collect()
    }
}

pub(super) fn range(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

fn kv(key: &str, value: &str) -> (String, String) {
    (key.into(), value.into())
}

#[test]
fn revisions_start_at_one_and_count_writes() {
    let mut f = Fixture::new();
    assert_eq!(f.store.current_rev(), 1);
    f.put("a", "1");
    f.put("a", "2");
    assert_eq!(f.store.current_rev(), 3);
    let resp = f.store.range(&range("a", "")).expect("range");
    let kv = &resp.kvs[0];
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
}

#[test]
fn range_reads_old_revisions_and_prefixes() {
    let mut f = Fixture::new();
    f.put("foo", "1");
    f.put("foo/a", "2");
    f.put("fop", "3");
    f.put("foo", "4");
    assert_eq!(
        f.get(RangeRequest {
            revision: 2,
            ..range("foo", "")
        }),
        vec![kv("foo", "1")]
    );
    assert_eq!(
        f.get(range("foo", "fop")),
        vec![kv("foo", "4"), kv("foo/a", "2")]
    );
    assert_eq!(f.get(range("\0", "\0")).len(), 3, "\\0 to \\0 is every key");
    assert_eq!(
        f.get(range("fo", "\0")).len(),
        3,
        "\\0 end means no upper bound"
    );
    assert!(f.get(range("zzz", "")).is_empty());
}

#[test]
fn limit_sort_count_and_filters_follow_etcd() {
    let mut f = Fixture::new();
    f.put("a", "z");
    f.put("b", "y");
    f.put("c", "x");
    f.put("a", "w");
    let resp = f
        .store
        .range(&RangeRequest {
            limit: 2,
            ..range("a", "d")
        })
        .expect("range");
    assert_eq!(resp.kvs.len(), 2);
    assert!(resp.more);
    assert_eq!(resp.count, 3, "count is every key in the range");
    let sorted = f.get(RangeRequest {
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Value as i32,
        ..range("a", "d")
    });
    assert_eq!(sorted, vec![kv("b", "y"), kv("c", "x"), kv("a", "w")]);
    let by_mod = f.get(RangeRequest {
        sort_target: SortTarget::Mod as i32,
        ..range("a", "d")
    });
    assert_eq!(
        by_mod[0],
        kv("b", "y"),
        "a target without an order sorts ascending"
    );
    let filtered = f.get(RangeRequest {
        min_mod_revision: 4,
        ..range("a", "d")
    });
    assert_eq!(filtered, vec![kv("a", "w"), kv("c", "x")]);
    let count_only = f
        .store
        .range(&RangeRequest {
            count_only: true,
            ..range("a", "d")
        })
        .expect("range");
    assert_eq!((count_only.count, count_only.kvs.len()), (3, 0));
    let keys_only = f
        .store
        .range(&RangeRequest {
            keys_only: true,
            ..range("a", "")
        })
        .expect("range");
    assert!(keys_only.kvs[0].value.is_empty());
}

#[test]
fn future_and_compacted_revisions_are_refused() {
    let mut f = Fixture::new();
    for i in 0..5 {
        f.put("k", &i.to_string());
    }
    assert!(matches!(
        f.store.range(&RangeRequest {
            revision: 7,
            ..range("k", "")
        }),
        Err(MvccError::FutureRev)
    ));
    f.apply(Request::Compaction(CompactionRequest {
        revision: 4,
        physical: true,
    }))
    .expect("compact");
    assert!(matches!(
        f.store.range(&RangeRequest {
            revision: 3,
            ..range("k", "")
        }),
        Err(MvccError::Compacted)
    ));
    assert_eq!(
        f.get(RangeRequest {
            revision: 4,
            ..range("k", "")
        }),
        vec![kv("k", "2")]
    );
    assert_eq!(f.get(range("k", "")), vec![kv("k", "4")]);
    assert!(matches!(
        f.apply(Request::Compaction(CompactionRequest {
            revision: 4,
            physical: true
        })),
        Err(MvccError::Compacted)
    ));
    assert!(matches!(
        f.apply(Request::Compaction(CompactionRequest {
            revision: 99,
            physical: true
        })),
        Err(MvccError::FutureRev)
    ));
}

#[test]
fn compaction_removes_old_revisions_from_the_backend() {
    let mut f = Fixture::new();
    for i in 0..10 {
        f.put("k", &i.to_string());
    }
    f.apply(Request::DeleteRange(DeleteRangeRequest {
        key: "k".into(),
        ..Default::default()
    }))
    .expect("del");
    let count_revs = |backend: &MemBackend| {
        let mut n = 0;
        backend
            .scan(b"r", Some(b"s"), &mut |_, run| {
                n += revision::records(run).count();
                true
            })
            .expect("scan");
        n
    };
    assert_eq!(count_revs(&f.backend), 11);
    let rev = f.store.current_rev();
    f.apply(Request::Compaction(CompactionRequest {
        revision: rev,
        physical: true,
    }))
    .expect("compact");
    assert_eq!(
        count_revs(&f.backend),
        0,
        "a deleted key leaves nothing behind"
    );
}

#[test]
fn delete_range_returns_prev_kvs_and_bumps_revision_once() {
    let mut f = Fixture::new();
    f.put("a", "1");
    f.put("b", "2");
    let rev = f.store.current_rev();
    let out = f
        .apply(Request::DeleteRange(DeleteRangeRequest {
            key: "a".into(),
            range_end: "c".into(),
            prev_kv: true,
        }))
        .expect("delete");
    let ApplyOutcome::DeleteRange(resp) = out else {
        panic!("wrong outcome")
    };
    assert_eq!(resp.deleted, 2);
    assert_eq!(resp.prev_kvs.len(), 2);
    assert_eq!(f.store.current_rev(), rev + 1);
    f.apply(Request::DeleteRange(DeleteRangeRequest {
        key: "a".into(),
        ..Default::default()
    }))
    .expect("delete");
    assert_eq!(
        f.store.current_rev(),
        rev + 1,
        "deleting nothing writes no revision"
    );
    f.put("a", "again");
    let resp = f.store.range(&range("a", "")).expect("range");
    assert_eq!(
        (resp.kvs[0].version, resp.kvs[0].create_revision),
        (1, rev + 2),
        "a new life"
    );
}

#[test]
fn put_options_prev_kv_ignore_value_and_lease() {
    let mut f = Fixture::new();
    let missing = f.apply(Request::Put(PutRequest {
        key: "a".into(),
        ignore_value: true,
        ..Default::default()
    }));
    assert!(matches!(missing, Err(MvccError::KeyNotFound)));
    let leased = f.apply(Request::Put(PutRequest {
        key: "a".into(),
        lease: 5,
        ..Default::default()
    }));
    assert!(matches!(leased, Err(MvccError::LeaseNotFound)));
    f.put("a", "v1");
    let out = f
        .apply(Request::Put(PutRequest {
            key: "a".into(),
            ignore_value: true,
            prev_kv: true,
            ..Default::default()
        }))
        .expect("put");
    let ApplyOutcome::Put(resp) = out else {
        panic!("wrong outcome")
    };
    assert_eq!(resp.prev_kv.expect("prev").value, b"v1");
    assert_eq!(
        f.get(range("a", "")),
        vec![kv("a", "v1")],
        "ignore_value keeps the value"
    );
}

fn compare(key: &str, target: CompareTarget, result: CompareResult, union: TargetUnion) -> Compare {
    Compare {
        key: key.into(),
        target: target as i32,
        result: result as i32,
        target_union: Some(union),
        range_end: vec![],
    }
}

fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

fn range_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(range(key, ""))),
    }
}

#[test]
fn txn_compare_and_swap_and_reads_see_earlier_writes() {
    let mut f = Fixture::new();
    f.put("k", "old");
    let cas = |expected: &str, new: &str| TxnRequest {
        compare: vec![compare(
            "k",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(expected.into()),
        )],
        success: vec![put_op("k", new), range_op("k")],
        failure: vec![range_op("k")],
    };
    let ApplyOutcome::Txn(resp) = f.apply(Request::Txn(cas("old", "new"))).expect("txn") else {
        panic!()
    };
    assert!(resp.succeeded);
    let Some(response_op::Response::ResponseRange(read)) = &resp.responses[1].response else {
        panic!()
    };
    assert_eq!(
        read.kvs[0].value, b"new",
        "a read after a put in one txn sees the put"
    );
    let ApplyOutcome::Txn(resp) = f.apply(Request::Txn(cas("old", "newer"))).expect("txn") else {
        panic!()
    };
    assert!(!resp.succeeded);
    assert_eq!(f.get(range("k", "")), vec![kv("k", "new")]);
    let rev = f.store.current_rev();
    f.apply(Request::Txn(cas("nope", "x"))).expect("txn");
    assert_eq!(
        f.store.current_rev(),
        rev,
        "a read-only txn writes no revision"
    );
}

#[test]
fn txn_compares_on_missing_keys_and_ranges() {
    let mut f = Fixture::new();
    let created_never = compare(
        "x",
        CompareTarget::Create,
        CompareResult::Equal,
        TargetUnion::CreateRevision(0),
    );
    let txn = TxnRequest {
        compare: vec![created_never],
        success: vec![put_op("x", "1")],
        failure: vec![],
    };
    let ApplyOutcome::Txn(resp) = f.apply(Request::Txn(txn.clone())).expect("txn") else {
        panic!()
    };
    assert!(resp.succeeded, "a missing key has create_revision 0");
    let ApplyOutcome::Txn(resp) = f.apply(Request::Txn(txn)).expect("txn") else {
        panic!()
    };
    assert!(!resp.succeeded);
    f.put("p/1", "1");
    f.put("p/2", "2");
    let mut all_small = compare(
        "p/",
        CompareTarget::Version,
        CompareResult::Less,
        TargetUnion::Version(2),
    );
    all_small.range_end = "p0".into();
    let txn = TxnRequest {
        compare: vec![all_small],
        success: vec![],
        failure: vec![],
    };
    let ApplyOutcome::Txn(resp) = f.apply(Request::Txn(txn)).expect("txn") else {
        panic!()
    };
    assert!(resp.succeeded, "every key of the range compares");
    let value_missing = compare(
        "none",
        CompareTarget::Value,
        CompareResult::NotEqual,
        TargetUnion::Value("a".into()),
    );
    let txn = TxnRequest {
        compare: vec![value_missing],
        success: vec![],
        failure: vec![],
    };
    let ApplyOutcome::Txn(resp) = f.apply(Request::Txn(txn)).expect("txn") else {
        panic!()
    };
    assert!(!resp.succeeded, "a value compare on a missing key is false");
}

#[test]
fn nested_txn_takes_its_own_branch() {
    let mut f = Fixture::new();
    f.put("a", "1");
    let inner = TxnRequest {
        compare: vec![compare(
            "a",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value("2".into()),
        )],
        success: vec![put_op("b", "inner-then")],
        failure: vec![put_op("b", "inner-else")],
    };
    let outer = TxnRequest {
        compare: vec![compare(
            "a",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value("1".into()),
        )],
        success: vec![
            put_op("c", "outer"),
            RequestOp {
                request: Some(request_op::Request::RequestTxn(inner)),
            },
        ],
        failure: vec![],
    };
    f.apply(Request::Txn(outer)).expect("txn");
    assert_eq!(
        f.get(range("b", "d")),
        vec![kv("b", "inner-else"), kv("c", "outer")]
    );
    let resp = f.store.range(&range("b", "d")).expect("range");
    assert_eq!(
        resp.kvs[0].mod_revision, resp.kvs[1].mod_revision,
        "one revision for the whole txn"
    );
}

#[test]
fn txn_failing_check_writes_nothing() {
    let mut f = Fixture::new();
    f.put("a", "1");
    let rev = f.store.current_rev();
    let bad_read = RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            revision: 100,
            ..range("a", "")
        })),
    };
    let txn = TxnRequest {
        compare: vec![],
        success: vec![put_op("b", "x"), bad_read],
        failure: vec![],
    };
    assert!(matches!(
        f.apply(Request::Txn(txn)),
        Err(MvccError::FutureRev)
    ));
    assert_eq!(f.store.current_rev(), rev);
    assert!(f.get(range("b", "")).is_empty());
}

#[test]
fn reopen_rebuilds_index_and_consistent_index() {
    let mut f = Fixture::new();
    f.put("a", "1");
    f.put("b", "2");
    f.apply(Request::DeleteRange(DeleteRangeRequest {
        key: "a".into(),
        ..Default::default()
    }))
    .expect("del");
    f.put("a", "3");
    f.apply(Request::Compaction(CompactionRequest {
        revision: 3,
        physical: false,
    }))
    .expect("compact");
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(reopened.current_rev(), f.store.current_rev());
    assert_eq!(reopened.compact_rev(), 3);
    assert_eq!(reopened.consistent_index(), f.index);
    let resp = reopened.range(&range("a", "")).expect("range");
    assert_eq!(
        (resp.kvs[0].version, resp.kvs[0].value.as_slice()),
        (1, &b"3"[..])
    );
}

#[test]
fn reopen_after_crash_keeps_only_flushed_consistent_state() {
    let mut f = Fixture::new();
    f.put("a", "1");
    f.backend.flush().expect("flush");
    let flushed_index = f.index;
    f.put("a", "2");
    let crashed = MvccStore::open(Arc::new(f.backend.crashed_copy())).expect("reopen");
    assert_eq!(
        crashed.consistent_index(),
        flushed_index,
        "replay resumes after the flushed entry"
    );
    assert_eq!(crashed.current_rev(), 2);
}

#[test]
fn reopen_after_compaction_keeps_versions_and_create_revisions() {
    let mut f = Fixture::new();
    for i in 0..5 {
        f.put("k", &i.to_string());
    }
    f.apply(Request::Compaction(CompactionRequest {
        revision: 5,
        physical: true,
    }))
    .expect("compact");
    f.put("k", "5");
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    let resp = reopened.range(&range("k", "")).expect("range");
    assert_eq!((resp.kvs[0].version, resp.kvs[0].create_revision), (6, 2));
    let mut f2 = Fixture {
        store: reopened,
        backend: f.backend.clone(),
        index: f.index,
    };
    f2.put("k", "6");
    let resp = f2.store.range(&range("k", "")).expect("range");
    assert_eq!(
        (resp.kvs[0].version, resp.kvs[0].create_revision),
        (7, 2),
        "puts after reopen continue the count"
    );
}

#[test]
fn staged_writes_are_readable_before_they_reach_the_backend() {
    let mut f = Fixture::new();
    f.index += 1;
    f.store
        .apply(
            f.index,
            &Request::Put(PutRequest {
                key: "s".into(),
                value: "1".into(),
                ..Default::default()
            }),
        )
        .expect("put");
    assert_eq!(
        f.get(range("s", "")),
        vec![kv("s", "1")],
        "reads see staged writes"
    );
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert!(
        reopened
            .range(&range("s", ""))
            .expect("range")
            .kvs
            .is_empty(),
        "not in the backend yet"
    );
    assert_eq!(reopened.consistent_index(), 0);
    f.store.flush_staged().expect("flush");
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(
        reopened.consistent_index(),
        f.index,
        "the batch carries the consistent index"
    );
    assert_eq!(reopened.range(&range("s", "")).expect("range").kvs.len(), 1);
}

#[test]
fn a_batch_being_written_stays_readable_until_the_backend_has_it() {
    let mut f = Fixture::new();
    f.index += 1;
    let req = PutRequest {
        key: "w".into(),
        value: "1".into(),
        ..Default::default()
    };
    f.store.apply(f.index, &Request::Put(req)).expect("put");
    let batch = f.store.take_staged().expect("a staged batch");
    assert_eq!(f.store.staged_ops(), 0, "nothing new is staged");
    assert_eq!(
        f.get(range("w", "")),
        vec![kv("w", "1")],
        "readable while on its way"
    );
    f.backend.apply(batch).expect("write");
    f.store.staged_written();
    assert_eq!(
        f.get(range("w", "")),
        vec![kv("w", "1")],
        "readable from the backend"
    );
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(
        reopened.consistent_index(),
        f.index,
        "the batch carried the consistent index"
    );
}

/// Applies without flushing: the writes stay staged, to reach the backend as runs.
fn apply_staged(f: &mut Fixture, request: Request) {
    f.index += 1;
    f.store.apply(f.index, &request).expect("apply");
}

fn put_req(key: &str, value: &str) -> Request {
    Request::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
}

fn at_rev(f: &Fixture, key: &str, revision: i64) -> Result<Vec<(String, String)>, MvccError> {
    let resp = f.store.range(&RangeRequest {
        revision,
        ..range(key, "")
    })?;
    Ok(resp
        .kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into(),
                String::from_utf8_lossy(&kv.value).into(),
            )
        })
        .collect())
}

fn runs(backend: &MemBackend) -> Vec<Vec<Revision>> {
    let mut out = Vec::new();
    backend
        .scan(b"r", Some(b"s"), &mut |_, run| {
            out.push(
                revision::records(run)
                    .map(|r| r.expect("record").0)
                    .collect(),
            );
            true
        })
        .expect("scan");
    out
}

#[test]
fn many_writes_share_a_run_and_read_compact_and_reopen_as_separate_revisions() {
    let mut f = Fixture::new();
    for i in 0..6 {
        apply_staged(&mut f, put_req("a", &format!("a{i}")));
        apply_staged(&mut f, put_req("b", &format!("b{i}")));
    }
    apply_staged(
        &mut f,
        Request::DeleteRange(DeleteRangeRequest {
            key: "b".into(),
            ..Default::default()
        }),
    );
    f.store.flush_staged().expect("flush");
    // Revisions 2..=14: a0 b0 a1 b1 ... a5 b5, then b's tombstone.
    assert_eq!(runs(&f.backend).len(), 1, "one batch, one run");
    assert_eq!(runs(&f.backend)[0].len(), 13);
    for i in 0..6i64 {
        let rev = 2 + 2 * i;
        assert_eq!(
            at_rev(&f, "a", rev).expect("a"),
            vec![kv("a", &format!("a{i}"))]
        );
        assert_eq!(
            at_rev(&f, "b", rev + 1).expect("b"),
            vec![kv("b", &format!("b{i}"))]
        );
    }
    assert!(at_rev(&f, "b", 14).expect("b").is_empty(), "deleted");
    let (events, next) = f
        .store
        .events_since(9, b"a", b"", 100, usize::MAX)
        .expect("history");
    let values: Vec<_> = events
        .iter()
        .map(|e| String::from_utf8_lossy(&e.kv.as_ref().expect("kv").value).into_owned())
        .collect();
    assert_eq!(values, ["a4", "a5"], "from the middle of the run");
    assert_eq!(next, 15);

    // More writes in a second run, then a compaction in the middle of the first.
    apply_staged(&mut f, put_req("c", "c0"));
    f.store.flush_staged().expect("flush");
    f.apply(Request::Compaction(CompactionRequest {
        revision: 9,
        physical: true,
    }))
    .expect("compact");
    let left = runs(&f.backend);
    assert_eq!(
        left,
        vec![
            // a3 (rev 8) and b3 (rev 9) are the newest at 9; later ones are untouched.
            [8, 9, 10, 11, 12, 13, 14]
                .map(|main| Revision::new(main, 0))
                .to_vec(),
            vec![Revision::new(15, 0)],
        ]
    );
    assert!(matches!(at_rev(&f, "a", 7), Err(MvccError::Compacted)));
    assert_eq!(at_rev(&f, "a", 9).expect("a"), vec![kv("a", "a3")]);
    assert_eq!(at_rev(&f, "b", 11).expect("b"), vec![kv("b", "b4")]);

    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(reopened.current_rev(), 15);
    assert_eq!(reopened.compact_rev(), 9);
    let kvs = reopened.range(&range("a", "d")).expect("range").kvs;
    let got: Vec<_> = kvs
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.clone(),
                kv.version,
                kv.create_revision,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (b"a".to_vec(), b"a5".to_vec(), 6, 2),
            (b"c".to_vec(), b"c0".to_vec(), 1, 15),
        ]
    );
}

#[test]
fn a_long_batch_is_cut_into_runs_each_readable_at_its_edges() {
    let mut f = Fixture::new();
    let value = "v".repeat(1000);
    for i in 0..200 {
        apply_staged(&mut f, put_req(&format!("k{i:03}"), &value));
    }
    f.store.flush_staged().expect("flush");
    let runs = runs(&f.backend);
    assert!(runs.len() >= 3, "{} runs", runs.len());
    assert_eq!(runs.iter().map(Vec::len).sum::<usize>(), 200);
    for run in &runs {
        for rev in [run[0], run[run.len() - 1]] {
            let key = format!("k{:03}", rev.main - 2);
            assert_eq!(
                at_rev(&f, &key, rev.main).expect("read"),
                vec![kv(&key, &value)]
            );
        }
    }
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(reopened.key_count(), 200);
}

#[test]
fn a_store_in_the_older_one_key_per_revision_layout_is_refused() {
    let backend = MemBackend::new();
    let mut batch = crate::io::WriteBatch::default();
    let mut key = vec![b'k'];
    key.extend_from_slice(&[0; 16]);
    batch.put(key, b"old".to_vec());
    backend.apply(batch).expect("write");
    match MvccStore::open(Arc::new(backend)) {
        Err(MvccError::Corrupt { reason, .. }) => assert!(reason.contains("older"), "{reason}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened"),
    }
}

#[test]
fn a_cut_run_is_reported_as_corrupt_at_open() {
    let mut f = Fixture::new();
    f.put("a", "1");
    let mut batch = crate::io::WriteBatch::default();
    f.backend
        .scan(b"r", Some(b"s"), &mut |key, run| {
            batch.put(key.to_vec(), run[..run.len() - 1].to_vec());
            true
        })
        .expect("scan");
    f.backend.apply(batch).expect("write");
    assert!(matches!(
        MvccStore::open(Arc::new(f.backend.clone())),
        Err(MvccError::Corrupt { .. })
    ));
}

#[test]
fn index_fields_read_in_place_what_a_full_decode_reads() {
    use crate::proto::mvccpb::KeyValue;
    use prost::Message;
    let cases = [
        KeyValue::default(),
        KeyValue {
            key: b"a".to_vec(),
            create_revision: 2,
            mod_revision: 9,
            version: 3,
            value: vec![7; 70_000],
            lease: 0x7fff_ffff_ffff,
        },
        KeyValue {
            key: vec![0xff; 300],
            mod_revision: 1,
            ..Default::default()
        },
    ];
    for kv in cases {
        let bytes = kv.encode_to_vec();
        let fields = store::index_fields(&bytes).expect("decodes");
        assert_eq!(
            (
                fields.key,
                fields.create_revision,
                fields.version,
                fields.lease
            ),
            (kv.key.as_slice(), kv.create_revision, kv.version, kv.lease)
        );
        if !bytes.is_empty() {
            assert!(
                store::index_fields(&bytes[..bytes.len() - 1]).is_err(),
                "a cut record is an error"
            );
        }
    }
    // Fields it does not know are skipped by their wire type (fixed64, fixed32, bytes).
    let mut unknown = vec![(9 << 3) | 1];
    unknown.extend_from_slice(&[0; 8]);
    unknown.extend_from_slice(&[
        (10 << 3) | 5,
        0,
        0,
        0,
        0,
        (11 << 3) | 2,
        1,
        0,
        (1 << 3) | 2,
        1,
        b'k',
    ]);
    assert_eq!(store::index_fields(&unknown).expect("decodes").key, b"k");
}

/// v2 records count in `db_size_in_use` as they are written and removed, not only once the
/// store is reopened, and a reopened store counts the same.
#[test]
fn v2_records_count_in_use_as_they_are_written() {
    use crate::proto::quorumkvpb::V2Request;
    let v2 = |method: &str, path: &str, val: &str, recursive: bool| {
        Request::V2(V2Request {
            method: method.into(),
            path: path.into(),
            val: val.into(),
            recursive,
            ..Default::default()
        })
    };
    let mut f = Fixture::new();
    // The metadata records every store has once it applied an entry, counted at the opening.
    f.put("k", "v");
    f.store = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    let empty = f.store.in_use_bytes();
    for i in 0..50 {
        f.apply(v2("PUT", &format!("/d/k{i}"), &"x".repeat(100), false))
            .expect("set");
    }
    let grown = f.store.in_use_bytes();
    assert!(grown >= empty + 50 * 100, "{empty} -> {grown}");
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(reopened.in_use_bytes(), grown);
    f.apply(v2("PUT", "/d/k0", "short", false)).expect("set");
    let shorter = f.store.in_use_bytes();
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(reopened.in_use_bytes(), shorter);
    // Until a checkpoint, a delete is one more journaled request (the tree's own tests show a
    // checkpoint giving the bytes back).
    f.apply(v2("DELETE", "/d", "", true)).expect("delete");
    let deleted = f.store.in_use_bytes();
    assert!(deleted > shorter, "{shorter} -> {deleted}");
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    assert_eq!(reopened.in_use_bytes(), deleted);
}

/// A v2 request is journaled with the next backend batch: it counts as a staged write (the
/// apply loop flushes by that count and by time only when something is staged), and a store
/// reopened after the flush holds it.
#[test]
fn journaled_v2_requests_count_as_staged_writes() {
    use crate::proto::quorumkvpb::V2Request;
    let mut f = Fixture::new();
    let set = Request::V2(V2Request {
        method: "PUT".into(),
        path: "/k".into(),
        val: "v".into(),
        ..Default::default()
    });
    apply_staged(&mut f, set);
    assert_eq!(f.store.staged_ops(), 1);
    assert!(f.store.require_flushed().is_err());
    f.store.flush_staged().expect("flush");
    assert_eq!(f.store.staged_ops(), 0);
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    let node = reopened.v2().get("/k", false).expect("the key");
    assert_eq!(node.node.value.as_deref(), Some("v"));
    assert_eq!(reopened.consistent_index(), f.index);
}
