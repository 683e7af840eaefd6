//! Leases as the store applies them: grant, attach by put, revoke (the keys go in one
//! revision), checkpoint, and the table rebuilt on reopen and carried by snapshots.

use std::sync::Arc;

use super::tests::{range, Fixture};
use super::*;
use crate::io::MemBackend;
use crate::proto::etcdserverpb::{
    request_op, DeleteRangeRequest, LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use crate::proto::quorumkvpb::raft_request::Request;

fn grant(f: &mut Fixture, id: i64, ttl: i64) -> ApplyResult {
    f.apply(Request::LeaseGrant(LeaseGrantRequest { ttl, id }))
}

fn put_leased(f: &mut Fixture, key: &str, lease: i64) -> ApplyResult {
    f.apply(Request::Put(PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        lease,
        ..Default::default()
    }))
}

fn revoke(f: &mut Fixture, id: i64) -> ApplyResult {
    f.apply(Request::LeaseRevoke(LeaseRevokeRequest { id }))
}

fn keys_of(store: &MvccStore, lease: i64) -> Vec<String> {
    store
        .leases()
        .get(lease)
        .expect("lease")
        .keys
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[test]
fn revoke_deletes_the_attached_keys_in_one_revision_and_only_those() {
    let mut f = Fixture::new();
    grant(&mut f, 7, 30).expect("grant");
    assert_eq!(f.store.current_rev(), 1, "a grant writes no revision");
    put_leased(&mut f, "a", 7).expect("put a");
    put_leased(&mut f, "b", 7).expect("put b");
    f.put("c", "plain");
    assert_eq!(keys_of(&f.store, 7), vec!["a", "b"]);
    let before = f.store.current_rev();
    revoke(&mut f, 7).expect("revoke");
    assert_eq!(f.store.current_rev(), before + 1);
    assert_eq!(f.get(range("a", "z")), vec![("c".into(), "plain".into())]);
    assert!(f.store.leases().get(7).is_none());
    assert!(matches!(revoke(&mut f, 7), Err(MvccError::LeaseNotFound)));
    // A lease without keys goes without a revision.
    grant(&mut f, 8, 30).expect("grant");
    let before = f.store.current_rev();
    revoke(&mut f, 8).expect("revoke");
    assert_eq!(f.store.current_rev(), before);
}

#[test]
fn keys_leave_their_lease_when_rewritten_deleted_or_moved_and_ignore_lease_keeps_it() {
    let mut f = Fixture::new();
    grant(&mut f, 1, 30).expect("grant");
    grant(&mut f, 2, 30).expect("grant");
    for key in ["x", "y", "z", "w"] {
        put_leased(&mut f, key, 1).expect("put");
    }
    f.put("x", "no lease now");
    put_leased(&mut f, "y", 2).expect("move");
    f.apply(Request::DeleteRange(DeleteRangeRequest {
        key: "z".into(),
        ..Default::default()
    }))
    .expect("delete");
    f.apply(Request::Put(PutRequest {
        key: "w".into(),
        value: b"new".to_vec(),
        ignore_lease: true,
        ..Default::default()
    }))
    .expect("ignore_lease");
    assert_eq!(keys_of(&f.store, 1), vec!["w"]);
    assert_eq!(keys_of(&f.store, 2), vec!["y"]);
    // A txn put on an unknown lease fails whole.
    let txn = f.apply(Request::Txn(TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: "t".into(),
                lease: 99,
                ..Default::default()
            })),
        }],
        ..Default::default()
    }));
    assert!(matches!(txn, Err(MvccError::LeaseNotFound)));
}

#[test]
fn grant_refuses_a_taken_id_and_applies_the_minimum_ttl() {
    let mut f = Fixture::new();
    f.store.set_min_lease_ttl(2);
    let ApplyOutcome::LeaseGrant(resp) = grant(&mut f, 3, 1).expect("grant") else {
        panic!("wrong outcome");
    };
    assert_eq!((resp.id, resp.ttl), (3, 2));
    assert!(matches!(grant(&mut f, 3, 10), Err(MvccError::LeaseExists)));
    assert!(matches!(
        grant(&mut f, 4, crate::lease::MAX_LEASE_TTL + 1),
        Err(MvccError::LeaseTtlTooLarge)
    ));
}

#[test]
fn reopen_and_snapshots_rebuild_leases_their_checkpoints_and_attached_keys() {
    let mut f = Fixture::new();
    grant(&mut f, 5, 600).expect("grant");
    grant(&mut f, 6, 60).expect("grant");
    put_leased(&mut f, "k1", 5).expect("put");
    put_leased(&mut f, "k2", 6).expect("put");
    put_leased(&mut f, "k2", 5).expect("move");
    f.apply(Request::LeaseCheckpoint(LeaseCheckpointRequest {
        checkpoints: vec![LeaseCheckpoint {
            id: 5,
            remaining_ttl: 250,
        }],
    }))
    .expect("checkpoint");
    revoke(&mut f, 6).expect("revoke");
    let check = |store: &MvccStore| {
        assert_eq!(store.leases().len(), 1);
        let lease = store.leases().get(5).expect("lease 5");
        assert_eq!((lease.ttl, lease.remaining_ttl), (600, 250));
        assert_eq!(keys_of(store, 5), vec!["k1", "k2"]);
    };
    check(&f.store);
    let reopened = MvccStore::open(Arc::new(f.backend.clone())).expect("reopen");
    check(&reopened);
    let data = f.store.snapshot_data().expect("snapshot");
    let mut follower = MvccStore::open(Arc::new(MemBackend::new())).expect("open");
    follower.restore(f.index, &data).expect("restore");
    check(&follower);
}

/// Everything a reopened store answers about its keys, at every revision.
fn state(store: &MvccStore) -> Vec<String> {
    let mut out = vec![format!(
        "rev {} compact {} in_use {} keys {}",
        store.current_rev(),
        store.compact_rev(),
        store.in_use_bytes(),
        store.key_count()
    )];
    for rev in store.compact_rev().max(1)..=store.current_rev() {
        let resp = store
            .range(&RangeRequest {
                revision: rev,
                ..range("\0", "\0")
            })
            .expect("range");
        for kv in resp.kvs {
            out.push(format!(
                "@{rev} {:?} c{} m{} v{} l{} {:?}",
                kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.lease, kv.value
            ));
        }
    }
    for lease in [1, 2] {
        if store.leases().get(lease).is_some() {
            out.push(format!("lease {lease}: {:?}", keys_of(store, lease)));
        }
    }
    out
}

#[test]
fn a_saved_key_index_reopens_the_store_as_a_scan_does_and_only_for_that_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("index");
    let mut f = Fixture::new();
    grant(&mut f, 1, 100).expect("grant");
    grant(&mut f, 2, 100).expect("grant");
    for i in 0..50 {
        f.put(&format!("k{i:02}"), &"v".repeat(i * 300));
    }
    put_leased(&mut f, "leased-a", 1).expect("put");
    put_leased(&mut f, "leased-b", 2).expect("put");
    f.put("k01", "again");
    f.apply(Request::DeleteRange(DeleteRangeRequest {
        key: b"k02".to_vec(),
        range_end: b"k05".to_vec(),
        ..Default::default()
    }))
    .expect("delete");
    f.put("k03", "back");
    f.apply(Request::Compaction(
        crate::proto::etcdserverpb::CompactionRequest {
            revision: 20,
            ..Default::default()
        },
    ))
    .expect("compact");
    f.put("k01", "after compaction");
    let scan = |f: &Fixture| state(&MvccStore::open(Arc::new(f.backend.clone())).expect("open"));
    let scanned = scan(&f);
    assert!(scanned.len() > 100, "{scanned:?}");

    f.store.save_index(&path).expect("save");
    let loaded =
        MvccStore::open_with_saved_index(Arc::new(f.backend.clone()), Some(&path)).expect("open");
    assert!(!path.exists(), "a saved index is taken once");
    assert_eq!(state(&loaded), scanned, "loaded as a scan rebuilds it");

    // Saved, then the store moves on: the file no longer names the backend's state.
    f.store.save_index(&path).expect("save");
    f.put("k10", "later");
    let reopened =
        MvccStore::open_with_saved_index(Arc::new(f.backend.clone()), Some(&path)).expect("open");
    let k10 = reopened.range(&range("k10", "")).expect("range");
    assert_eq!(
        k10.kvs[0].value,
        b"later".to_vec(),
        "a stale file is not loaded: the backend is scanned"
    );
    assert_eq!(state(&reopened), scan(&f));
    // A damaged file is not loaded either.
    f.store.save_index(&path).expect("save");
    let mut bytes = std::fs::read(&path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let reopened =
        MvccStore::open_with_saved_index(Arc::new(f.backend.clone()), Some(&path)).expect("open");
    assert_eq!(state(&reopened), scan(&f));
    assert!(!path.exists());
}
