use super::store::V2Store;
use super::*;
use crate::proto::quorumkvpb::V2Request;

fn put(path: &str, value: &str) -> V2Request {
    V2Request {
        method: "PUT".into(),
        path: path.into(),
        val: value.into(),
        ..Default::default()
    }
}

fn apply(store: &mut V2Store, req: V2Request) -> Result<Event, V2Error> {
    store.apply(&req).0.map(|e| e.expect("an event"))
}

/// The store rebuilt from the records every apply so far wrote.
fn reopened(records: &std::collections::BTreeMap<String, Vec<u8>>) -> V2Store {
    let pick = |prefix: &str| {
        records
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    V2Store::from_records(pick(NODE_RECORD_PREFIX), pick(EVENT_RECORD_PREFIX)).expect("records")
}

#[test]
fn paths_are_cleaned_as_go_cleans_them() {
    assert_eq!(clean_path(""), "/");
    assert_eq!(clean_path("/"), "/");
    assert_eq!(clean_path("a//b/"), "/a/b");
    assert_eq!(clean_path("/a/./b/../c"), "/a/c");
    assert_eq!(clean_path("/../a"), "/a");
}

#[test]
fn set_creates_parents_and_answers_the_previous_node() {
    let mut store = V2Store::default();
    let first = apply(&mut store, put("/a/b", "1")).unwrap();
    assert_eq!(first.action, "set");
    assert!(first.created());
    assert_eq!((first.node.created, first.node.modified), (1, 1));
    let dir = store.get("/a", false).unwrap();
    assert!(dir.node.dir);
    assert_eq!(dir.node.created, 1, "the parent is made at the same index");
    let second = apply(&mut store, put("/a/b", "2")).unwrap();
    assert!(!second.created());
    assert_eq!(second.prev.as_ref().unwrap().value.as_deref(), Some("1"));
    assert_eq!(second.node.modified, 2);
    // A file on the way is "Not a directory" for a set (its lookup comes first).
    let e = apply(&mut store, put("/a/b/c", "x")).unwrap_err();
    assert_eq!((e.code, e.cause.as_str(), e.index), (NOT_DIR, "/a/b", 2));
    // ...and for an in-order create.
    let post = V2Request {
        method: "POST".into(),
        ..put("/a/b/c", "x")
    };
    let e = apply(&mut store, post).unwrap_err();
    assert_eq!((e.code, e.cause.as_str()), (NOT_DIR, "/a/b"));
    let e = apply(&mut store, put("/a", "x")).unwrap_err();
    assert_eq!((e.code, e.cause.as_str()), (NOT_FILE, "/a"));
    let e = apply(&mut store, put("/", "x")).unwrap_err();
    assert_eq!((e.code, e.cause.as_str()), (ROOT_READ_ONLY, "/"));
    assert_eq!(store.index(), 2, "failures change nothing");
}

#[test]
fn in_order_keys_are_named_by_their_index_zero_padded() {
    let mut store = V2Store::default();
    apply(&mut store, put("/x", "1")).unwrap();
    let post = V2Request {
        method: "POST".into(),
        ..put("/queue", "job")
    };
    let e = apply(&mut store, post.clone()).unwrap();
    assert_eq!(e.node.key, "/queue/00000000000000000002");
    assert_eq!(e.action, "create");
    let e = apply(&mut store, post).unwrap();
    assert_eq!(e.node.key, "/queue/00000000000000000003");
}

#[test]
fn compare_and_swap_and_delete_name_what_failed() {
    let mut store = V2Store::default();
    apply(&mut store, put("/k", "x")).unwrap();
    let cas = |value: &str, index: u64| V2Request {
        prev_value: value.into(),
        prev_index: index,
        ..put("/k", "y")
    };
    let e = apply(&mut store, cas("zz", 0)).unwrap_err();
    assert_eq!((e.code, e.cause.as_str()), (TEST_FAILED, "[zz != x]"));
    let e = apply(&mut store, cas("zz", 3)).unwrap_err();
    assert_eq!(e.cause, "[zz != x] [3 != 1]");
    let e = apply(&mut store, cas("", 3)).unwrap_err();
    assert_eq!(e.cause, "[3 != 1]");
    let ok = apply(&mut store, cas("x", 1)).unwrap();
    assert_eq!(ok.action, "compareAndSwap");
    assert_eq!(ok.node.value.as_deref(), Some("y"));
    let cad = V2Request {
        method: "DELETE".into(),
        prev_value: "y".into(),
        ..put("/k", "")
    };
    let ok = apply(&mut store, cad).unwrap();
    assert_eq!(ok.action, "compareAndDelete");
    assert!(store.get("/k", false).is_err());
}

#[test]
fn prev_exist_chooses_create_or_update() {
    let mut store = V2Store::default();
    let update = V2Request {
        prev_exist: Some(true),
        ..put("/k", "1")
    };
    let e = apply(&mut store, update.clone()).unwrap_err();
    assert_eq!((e.code, e.cause.as_str()), (KEY_NOT_FOUND, "/k"));
    let create = V2Request {
        prev_exist: Some(false),
        ..put("/k", "1")
    };
    assert_eq!(apply(&mut store, create.clone()).unwrap().action, "create");
    let e = apply(&mut store, create).unwrap_err();
    assert_eq!((e.code, e.http_status()), (NODE_EXIST, 412));
    let updated = apply(&mut store, update).unwrap();
    assert_eq!(updated.action, "update");
    assert_eq!(updated.node.created, 1);
    assert_eq!(updated.node.modified, 2);
}

#[test]
fn directories_need_dir_and_recursive_to_go() {
    let mut store = V2Store::default();
    apply(&mut store, put("/d/a", "1")).unwrap();
    let delete = |dir: bool, recursive: bool| V2Request {
        method: "DELETE".into(),
        dir,
        recursive,
        ..put("/d", "")
    };
    assert_eq!(
        apply(&mut store, delete(false, false)).unwrap_err().code,
        NOT_FILE
    );
    assert_eq!(
        apply(&mut store, delete(true, false)).unwrap_err().code,
        DIR_NOT_EMPTY
    );
    let gone = apply(&mut store, delete(false, true)).unwrap();
    assert_eq!(gone.action, "delete");
    assert!(gone.node.dir);
    assert_eq!(gone.removed, vec!["/d/a".to_string(), "/d".to_string()]);
    assert!(store.is_empty());
}

#[test]
fn hidden_keys_are_left_out_of_listings_but_can_be_read() {
    let mut store = V2Store::default();
    apply(&mut store, put("/d/_hidden", "1")).unwrap();
    apply(&mut store, put("/d/shown", "2")).unwrap();
    let listing = store.get("/d", true).unwrap();
    let keys: Vec<_> = listing
        .node
        .nodes
        .unwrap()
        .into_iter()
        .map(|n| n.key)
        .collect();
    assert_eq!(keys, vec!["/d/shown"]);
    assert!(store.get("/d/_hidden", false).is_ok());
}

#[test]
fn keys_expire_only_when_a_sync_reaches_their_time() {
    let mut store = V2Store::default();
    let at = 2_000_000_000 * 1_000_000_000_i64;
    let ttl = V2Request {
        expiration: at,
        ..put("/t", "v")
    };
    apply(&mut store, ttl).unwrap();
    assert_eq!(store.next_expiry(), Some(at));
    let sync = |time: i64| V2Request {
        method: "SYNC".into(),
        time,
        ..Default::default()
    };
    store.take_published();
    assert!(store.apply(&sync(at - 1)).0.unwrap().is_none());
    assert!(store.get("/t", false).is_ok(), "not due yet");
    store.apply(&sync(at)).0.unwrap();
    assert!(store.get("/t", false).is_err());
    let events = store.take_published();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, "expire");
    assert_eq!(events[0].index(), 2);
    assert_eq!(store.next_expiry(), None);
}

#[test]
fn the_history_keeps_the_last_thousand_events_and_survives_a_reopen() {
    let mut store = V2Store::default();
    let mut records = std::collections::BTreeMap::new();
    for i in 0..1005 {
        let (answer, written) = store.apply(&put("/h/k", &i.to_string()));
        answer.unwrap();
        for (name, value) in written {
            match value {
                Some(v) => records.insert(name, v),
                None => records.remove(&name),
            };
        }
    }
    for store in [&store, &reopened(&records)] {
        assert_eq!(store.index(), 1005);
        let e = store.scan("/h/k", false, 2).unwrap_err();
        assert_eq!(e.code, EVENT_INDEX_CLEARED);
        assert_eq!(e.cause, "the requested history has been cleared [6/2]");
        assert_eq!(e.http_status(), 400);
        let found = store.scan("/h", true, 1000).unwrap().unwrap();
        assert_eq!(found.index(), 1000);
        assert_eq!(found.etcd_index, 1005);
        assert!(store.scan("/h", true, 1006).unwrap().is_none());
        assert_eq!(
            store.get("/h/k", false).unwrap().node.value.as_deref(),
            Some("1004")
        );
    }
    assert_eq!(
        records
            .keys()
            .filter(|k| k.starts_with(EVENT_RECORD_PREFIX))
            .count(),
        HISTORY_EVENTS
    );
}

#[test]
fn a_deleted_directory_reaches_waits_under_it_in_the_history() {
    let mut store = V2Store::default();
    apply(&mut store, put("/d/a", "1")).unwrap();
    let delete = V2Request {
        method: "DELETE".into(),
        recursive: true,
        ..put("/d", "")
    };
    apply(&mut store, delete).unwrap();
    let found = store.scan("/d/a", false, 2).unwrap().unwrap();
    assert_eq!(found.action, "delete");
    assert_eq!(found.node.key, "/d");
}

#[test]
fn answers_are_written_as_etcd_writes_them() {
    let mut store = V2Store::default();
    let ttl = V2Request {
        expiration: 1_765_000_000_500_000_000,
        ..put("/k", "v")
    };
    let e = apply(&mut store, ttl).unwrap();
    let json = e.to_json(1_764_999_990_000_000_000, false);
    assert_eq!(
        json,
        "{\"action\":\"set\",\"node\":{\"key\":\"/k\",\"value\":\"v\",\
         \"expiration\":\"2025-12-06T05:46:40.5Z\",\"ttl\":11,\
         \"modifiedIndex\":1,\"createdIndex\":1}}\n"
    );
    assert_eq!(e.to_json(0, true), "{\"action\":\"set\"}\n");
    let error = V2Error::new(KEY_NOT_FOUND, "/x", 3);
    assert_eq!(
        error.to_json(),
        "{\"errorCode\":100,\"message\":\"Key not found\",\"cause\":\"/x\",\"index\":3}\n"
    );
}

/// The tree counts the bytes of its records as it writes them: the sum of what the records
/// written so far hold, and what a store rebuilt from them counts.
#[test]
fn record_bytes_are_the_bytes_of_the_records_written() {
    let mut store = V2Store::default();
    let mut records = std::collections::BTreeMap::new();
    let mut requests = vec![put("/a/b", "1"), put("/a/c", &"v".repeat(300))];
    requests.extend((0..1010).map(|i| put("/h/k", &i.to_string())));
    requests.push(V2Request {
        method: "DELETE".into(),
        path: "/a".into(),
        recursive: true,
        ..Default::default()
    });
    for req in requests {
        let (answer, written) = store.apply(&req);
        answer.expect("applied");
        for (name, value) in written {
            match value {
                Some(v) => records.insert(name, v),
                None => records.remove(&name),
            };
        }
        let sum: u64 = records
            .iter()
            .map(|(name, value)| (1 + name.len() + value.len()) as u64)
            .sum();
        assert_eq!(store.record_bytes(), sum);
    }
    assert_eq!(reopened(&records).record_bytes(), store.record_bytes());
    assert!(store.memory_bytes() > store.record_bytes());
}

#[test]
fn a_compare_and_delete_of_a_directory_names_it_but_the_root_by_no_cause() {
    let mut store = V2Store::default();
    apply(&mut store, put("/a/b", "1")).unwrap();
    let cad = |path: &str| V2Request {
        method: "DELETE".into(),
        path: path.into(),
        prev_value: "1".into(),
        ..Default::default()
    };
    let e = apply(&mut store, cad("/a")).unwrap_err();
    assert_eq!((e.code, e.cause.as_str()), (NOT_FILE, "/a"));
    // etcd 3.4 trims its keys' prefix from the cause: nothing is left of the root's.
    let e = apply(&mut store, cad("/")).unwrap_err();
    assert_eq!((e.code, e.cause.as_str()), (NOT_FILE, ""));
    assert!(!e.to_json().contains("cause"), "{}", e.to_json());
}
