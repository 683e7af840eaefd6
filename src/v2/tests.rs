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
    store.apply(&req).map(|e| e.expect("an event"))
}

type RecordMap = std::collections::BTreeMap<String, Vec<u8>>;

/// Writes the store's next batch records (the batch ending at raft index `index`) to `records`,
/// as the backend would.
fn write_batch(store: &mut V2Store, index: u64, records: &mut RecordMap) {
    for (name, value) in store.take_batch_records(index) {
        match value {
            Some(v) => records.insert(name, v),
            None => records.remove(&name),
        };
    }
}

/// The store rebuilt from the records every batch so far wrote.
fn reopened(records: &RecordMap) -> V2Store {
    let pick = |prefix: &str| {
        records
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    V2Store::from_records(V2Records {
        chunks: pick(CHUNK_RECORD_PREFIX),
        history: pick(HISTORY_RECORD_PREFIX),
        nodes: pick(NODE_RECORD_PREFIX),
        events: pick(EVENT_RECORD_PREFIX),
        journal: pick(JOURNAL_RECORD_PREFIX),
    })
    .expect("records")
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
    assert!(store.apply(&sync(at - 1)).unwrap().is_none());
    assert!(store.get("/t", false).is_ok(), "not due yet");
    store.apply(&sync(at)).unwrap();
    assert!(store.get("/t", false).is_err());
    let events = store.take_published();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, "expire");
    assert_eq!(events[0].index(), 2);
    assert_eq!(store.next_expiry(), None);
}

#[test]
fn the_history_keeps_the_last_thousand_events_and_survives_a_reopen() {
    let mut store = V2Store::with_checkpoint_bytes(1024);
    let mut records = RecordMap::new();
    for i in 0..1005 {
        store.apply(&put("/h/k", &i.to_string())).unwrap();
        write_batch(&mut store, i + 1, &mut records);
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
    assert!(
        records.contains_key(HISTORY_RECORD),
        "no checkpoint was written"
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
/// written so far hold (journal and checkpoints), and what a store rebuilt from them counts.
#[test]
fn record_bytes_are_the_bytes_of_the_records_written() {
    let mut store = V2Store::with_checkpoint_bytes(4096);
    let mut records = RecordMap::new();
    let mut requests = vec![put("/a/b", "1"), put("/a/c", &"v".repeat(300))];
    requests.extend((0..1010).map(|i| put("/h/k", &i.to_string())));
    requests.push(V2Request {
        method: "DELETE".into(),
        path: "/a".into(),
        recursive: true,
        ..Default::default()
    });
    for (i, req) in requests.into_iter().enumerate() {
        store.apply(&req).expect("applied");
        if i % 3 == 0 {
            write_batch(&mut store, i as u64 + 1, &mut records);
        }
        let sum: u64 = records
            .iter()
            .map(|(name, value)| (1 + name.len() + value.len()) as u64)
            .sum();
        assert_eq!(store.record_bytes(), sum);
    }
    write_batch(&mut store, 2000, &mut records);
    assert_eq!(reopened(&records).record_bytes(), store.record_bytes());
    assert!(store.memory_bytes() > 1010 * 4, "{}", store.memory_bytes());
}

/// A mix of every kind of change, written in batches of changing sizes, some of them
/// checkpoints: the store rebuilt from the records after any batch is the store that wrote
/// them, tree and history, and has nothing to publish.
#[test]
fn the_journal_replayed_onto_the_checkpoint_gives_the_same_tree_and_history() {
    let mut store = V2Store::with_checkpoint_bytes(2048);
    let mut records = RecordMap::new();
    let base: i64 = 1_700_000_000_000_000_000;
    let (mut checkpoints, mut journaled) = (0, 0);
    for i in 0..1500u64 {
        let key = format!("/d{}/k{}", i % 3, i % 17);
        let req = match i % 7 {
            0 => V2Request {
                expiration: base + (i as i64) * 10,
                ..put(&key, "ttl")
            },
            1 => V2Request {
                method: "POST".into(),
                path: "/queue".into(),
                val: format!("job{i}"),
                ..Default::default()
            },
            2 => V2Request {
                method: "SYNC".into(),
                time: base + (i as i64) * 10 - 200,
                ..Default::default()
            },
            3 => V2Request {
                method: "DELETE".into(),
                path: format!("/d{}", i % 3),
                recursive: true,
                ..Default::default()
            },
            4 => V2Request {
                prev_value: "ttl".into(),
                ..put(&key, "swapped")
            },
            _ => put(&key, &"v".repeat((i % 50) as usize)),
        };
        let _ = store.apply(&req);
        if i % 5 == 4 {
            let batch = store.take_batch_records(i + 1);
            if batch
                .iter()
                .any(|(name, v)| name.starts_with(JOURNAL_RECORD_PREFIX) && v.is_none())
            {
                checkpoints += 1;
            } else if !batch.is_empty() {
                journaled += 1;
            }
            for (name, value) in batch {
                match value {
                    Some(v) => records.insert(name, v),
                    None => records.remove(&name),
                };
            }
            let mut loaded = reopened(&records);
            assert_eq!(loaded.dump(), store.dump(), "after entry {i}");
            assert!(loaded.take_published().is_empty());
            assert_eq!(loaded.record_bytes(), store.record_bytes());
        }
    }
    assert!(
        checkpoints >= 2 && journaled >= 10,
        "{checkpoints} checkpoints, {journaled} journal records"
    );
}

/// The journal never grows past its bound (as many bytes as the checkpoint, at least the
/// minimum) and one batch: a checkpoint replaces it and the checkpoint before.
#[test]
fn a_checkpoint_replaces_the_journal_and_the_last_checkpoint() {
    let mut store = V2Store::with_checkpoint_bytes(8192);
    let mut records = RecordMap::new();
    let mut checkpoints = 0;
    for i in 0..3000u64 {
        store
            .apply(&put(&format!("/k{}", i % 40), &i.to_string()))
            .expect("set");
        let batch = store.take_batch_records(i + 1);
        checkpoints += usize::from(batch.iter().any(|(name, _)| name == HISTORY_RECORD));
        for (name, value) in batch {
            match value {
                Some(v) => records.insert(name, v),
                None => records.remove(&name),
            };
        }
        let bytes = |journal: bool| -> usize {
            records
                .iter()
                .filter(|(name, _)| name.starts_with(JOURNAL_RECORD_PREFIX) == journal)
                .map(|(name, value)| 1 + name.len() + value.len())
                .sum()
        };
        let (journal, checkpoint) = (bytes(true), bytes(false));
        assert!(
            journal < checkpoint.max(8192) + 100,
            "journal of {journal} bytes, checkpoint of {checkpoint}"
        );
    }
    assert!(checkpoints >= 2, "{checkpoints} checkpoints");
    // One checkpoint's records: a chunk of nodes and the history.
    let kinds: Vec<&str> = records
        .keys()
        .filter(|name| !name.starts_with(JOURNAL_RECORD_PREFIX))
        .map(String::as_str)
        .collect();
    assert_eq!(
        kinds,
        [&format!("{CHUNK_RECORD_PREFIX}00000000"), HISTORY_RECORD]
    );
    assert_eq!(reopened(&records).dump(), store.dump());
}

/// A checkpoint larger than `CHUNK_BYTES` is written in several records, and loads back.
#[test]
fn a_large_checkpoint_is_written_in_chunks() {
    let mut store = V2Store::with_checkpoint_bytes(1);
    let value = "v".repeat(64 << 10);
    for i in 0..40 {
        store
            .apply(&put(&format!("/big/k{i:02}"), &value))
            .expect("set");
    }
    let mut records = RecordMap::new();
    write_batch(&mut store, 40, &mut records);
    let chunks = records
        .keys()
        .filter(|name| name.starts_with(CHUNK_RECORD_PREFIX))
        .count();
    assert_eq!(chunks, 3, "{:?}", records.keys().collect::<Vec<_>>());
    assert_eq!(reopened(&records).dump(), store.dump());
}

/// A batch's journal larger than `CHUNK_BYTES` is written in several records, in order.
#[test]
fn a_large_journal_is_written_in_pieces() {
    let mut store = V2Store::default();
    let value = "v".repeat(64 << 10);
    for i in 0..40 {
        store
            .apply(&put(&format!("/big/k{}", i % 7), &format!("{i}{value}")))
            .expect("set");
    }
    let mut records = RecordMap::new();
    write_batch(&mut store, 40, &mut records);
    let pieces: Vec<&String> = records
        .keys()
        .filter(|name| name.starts_with(JOURNAL_RECORD_PREFIX))
        .collect();
    assert_eq!(pieces.len(), 3, "{pieces:?}");
    assert_eq!(records.len(), 3, "a journal only: no checkpoint yet");
    assert!(records.values().all(|v| v.len() < (1 << 20) + (65 << 10)));
    assert_eq!(reopened(&records).dump(), store.dump());
}

/// A data dir of an older quorumkv keeps a record per node and per event: it loads, and the
/// next checkpoint replaces those records.
#[test]
fn records_of_the_older_layout_load_and_the_next_checkpoint_replaces_them() {
    let mut old = RecordMap::new();
    old.insert(
        format!("{NODE_RECORD_PREFIX}/a"),
        br#"{"c":1,"m":1}"#.to_vec(),
    );
    old.insert(
        format!("{NODE_RECORD_PREFIX}/a/b"),
        br#"{"c":2,"m":2,"v":"x"}"#.to_vec(),
    );
    let mut writer = V2Store::default();
    apply(&mut writer, put("/a/b", "x")).unwrap();
    let event = serde_json::to_vec(&writer.history()[0]).unwrap();
    old.insert(format!("{EVENT_RECORD_PREFIX}{:020}", 1), event);
    let mut store = reopened(&old);
    assert_eq!(
        store.get("/a/b", false).unwrap().node.value.as_deref(),
        Some("x")
    );
    assert_eq!(store.index(), 2);
    assert_eq!(store.history().len(), 1);
    let mut records = old.clone();
    apply(&mut store, put("/a/c", "y")).unwrap();
    // Past the default minimum: checkpoint now.
    store.apply(&put("/pad", &"p".repeat(9 << 20))).unwrap();
    write_batch(&mut store, 3, &mut records);
    assert!(
        records
            .keys()
            .all(|name| name.starts_with(CHUNK_RECORD_PREFIX) || name == HISTORY_RECORD),
        "{:?}",
        records.keys().collect::<Vec<_>>()
    );
    assert_eq!(reopened(&records).dump(), store.dump());
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
