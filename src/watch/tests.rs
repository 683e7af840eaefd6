//! The hub against a real store on the in-memory backend, driven by hand: what a watcher
//! receives when it keeps up, when its stream's queue is full, and when its start is compacted.

use std::sync::{Arc, RwLock};

use super::*;
use crate::io::{MemBackend, TokioClock};
use crate::proto::etcdserverpb::{CompactionRequest, PutRequest};
use crate::proto::mvccpb::KeyValue;
use crate::proto::quorumkvpb::raft_request::Request;

struct Fixture {
    store: Arc<RwLock<MvccStore>>,
    hub: WatchHub,
    index: u64,
}

impl Fixture {
    fn new() -> Self {
        Self::with_response_limit(1 << 20)
    }

    /// Fragmenting watchers' responses stay under `limit` bytes.
    fn with_response_limit(limit: usize) -> Self {
        let backend = Arc::new(MemBackend::new());
        let store = Arc::new(RwLock::new(MvccStore::open(backend).expect("open")));
        let header: HeaderFn = Arc::new(|revision| ResponseHeader {
            revision,
            ..Default::default()
        });
        let hub = WatchHub::new(store.clone(), header, Arc::new(TokioClock::new()), limit);
        Fixture {
            store,
            hub,
            index: 0,
        }
    }

    /// Applies a request as the apply loop does, and publishes its events; the hub's task
    /// delivers them.
    fn apply(&mut self, request: Request) {
        self.apply_queued(request);
        self.hub.deliver_pending();
    }

    /// Applies a request and publishes its events, which wait for the hub's task.
    fn apply_queued(&mut self, request: Request) {
        self.index += 1;
        let events = {
            let mut store = self.store.write().expect("lock");
            store.apply(self.index, &request).expect("apply");
            store.take_published()
        };
        self.hub.publish(events);
    }

    fn put(&mut self, key: &str, value: &str) {
        self.apply(Request::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }));
    }

    fn watch(&self, key: &str, start_revision: i64) -> (WatchReceiver, i64) {
        self.watch_with(WatchCreateRequest {
            key: key.into(),
            start_revision,
            ..Default::default()
        })
    }

    fn watch_with(&self, create: WatchCreateRequest) -> (WatchReceiver, i64) {
        let (stream, tx, rx) = self.hub.open_stream();
        let created = self.hub.create(stream, &tx, &create);
        assert!(created.created && !created.canceled);
        self.hub.activate(stream, created.watch_id);
        (rx, created.watch_id)
    }
}

/// Every (revision, value) received so far.
fn drain(rx: &mut WatchReceiver) -> Vec<(i64, String)> {
    let mut got = Vec::new();
    while let Ok(response) = rx.try_recv() {
        for event in response.events {
            let kv = event.kv.expect("kv");
            got.push((
                kv.mod_revision,
                String::from_utf8_lossy(&kv.value).into_owned(),
            ));
        }
    }
    got
}

#[test]
fn a_watcher_starting_now_follows_new_revisions_once_it_has_caught_up() {
    let mut f = Fixture::new();
    f.put("a", "old");
    let (mut rx, _) = f.watch("a", 0);
    f.hub.catch_up(); // Nothing to catch up on: it is synced from here.
    f.put("a", "new");
    f.put("b", "other key");
    assert_eq!(drain(&mut rx), vec![(3, "new".to_string())]);
}

#[test]
fn a_watcher_whose_queue_filled_catches_up_from_history_without_gaps_or_repeats() {
    let mut f = Fixture::new();
    let (mut rx, _) = f.watch("k", 0);
    f.hub.catch_up();
    let writes = STREAM_QUEUE + 100;
    for i in 0..writes {
        f.put("k", &format!("v{i}"));
    }
    // The queue took STREAM_QUEUE responses; the rest waits in history.
    let first = drain(&mut rx);
    assert_eq!(first.len(), STREAM_QUEUE);
    f.put("k", "while behind");
    assert!(
        drain(&mut rx).is_empty(),
        "an unsynced watcher gets no live events"
    );
    f.hub.catch_up();
    f.put("k", "after");
    let rest = drain(&mut rx);
    let all: Vec<i64> = first.iter().chain(&rest).map(|(rev, _)| *rev).collect();
    let expected: Vec<i64> = (2..2 + writes as i64 + 2).collect();
    assert_eq!(all, expected, "every revision once, in order");
    assert_eq!(rest.last().map(|(_, v)| v.as_str()), Some("after"));
}

#[test]
fn a_watch_from_a_compacted_revision_is_canceled_with_the_compact_revision() {
    let mut f = Fixture::new();
    for v in ["1", "2", "3"] {
        f.put("a", v);
    }
    f.apply(Request::Compaction(CompactionRequest {
        revision: 3,
        physical: false,
    }));
    let (mut rx, id) = f.watch("a", 2);
    f.hub.catch_up();
    let canceled = rx.try_recv().expect("a response");
    assert!(canceled.canceled);
    assert_eq!((canceled.watch_id, canceled.compact_revision), (id, 3));
}

fn put_request(key: &str, value: &str) -> Request {
    Request::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
}

#[test]
fn revisions_applied_before_a_delivery_go_out_together_in_order() {
    let mut f = Fixture::new();
    let (mut rx, id) = f.watch("k", 0);
    f.hub.catch_up();
    for v in ["1", "2", "3"] {
        f.apply_queued(put_request("k", v));
    }
    assert!(
        rx.try_recv().is_err(),
        "nothing is sent before the hub's task runs"
    );
    f.hub.deliver_pending();
    let response = rx.try_recv().expect("one response");
    assert_eq!(response.watch_id, id);
    assert_eq!(response.header.map(|h| h.revision), Some(4));
    let got: Vec<(i64, Vec<u8>)> = response
        .events
        .into_iter()
        .map(|e| e.kv.expect("kv"))
        .map(|kv| (kv.mod_revision, kv.value))
        .collect();
    assert_eq!(
        got,
        vec![(2, b"1".to_vec()), (3, b"2".to_vec()), (4, b"3".to_vec())]
    );
    assert!(rx.try_recv().is_err(), "and only one");
}

#[test]
fn watchers_sharing_an_encoding_each_get_what_they_asked_for() {
    let mut f = Fixture::new();
    f.put("k", "before");
    let end = b"l".to_vec();
    let (mut plain, _) = f.watch_with(WatchCreateRequest {
        key: b"k".to_vec(),
        range_end: end.clone(),
        ..Default::default()
    });
    let (mut also_plain, _) = f.watch_with(WatchCreateRequest {
        key: b"k".to_vec(),
        range_end: end.clone(),
        ..Default::default()
    });
    let (mut with_prev, _) = f.watch_with(WatchCreateRequest {
        key: b"k".to_vec(),
        range_end: end.clone(),
        prev_kv: true,
        ..Default::default()
    });
    let (mut deletes_only, _) = f.watch_with(WatchCreateRequest {
        key: b"k".to_vec(),
        range_end: end,
        filters: vec![FilterType::Noput as i32],
        ..Default::default()
    });
    f.hub.catch_up();
    f.apply_queued(put_request("k", "after"));
    f.apply_queued(Request::DeleteRange(
        crate::proto::etcdserverpb::DeleteRangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        },
    ));
    f.hub.deliver_pending();
    let summary = |rx: &mut WatchReceiver| -> Vec<(i32, i64, Option<Vec<u8>>)> {
        let response = rx.try_recv().expect("a response");
        assert!(rx.try_recv().is_err());
        response
            .events
            .into_iter()
            .map(|e| {
                let rev = e.kv.map_or(0, |kv| kv.mod_revision);
                (e.r#type, rev, e.prev_kv.map(|kv| kv.value))
            })
            .collect()
    };
    let (put, delete) = (EventType::Put as i32, EventType::Delete as i32);
    let plain_events = vec![(put, 3, None), (delete, 4, None)];
    assert_eq!(summary(&mut plain), plain_events);
    assert_eq!(summary(&mut also_plain), plain_events);
    assert_eq!(
        summary(&mut with_prev),
        vec![
            (put, 3, Some(b"before".to_vec())),
            (delete, 4, Some(b"after".to_vec()))
        ]
    );
    assert_eq!(summary(&mut deletes_only), vec![(delete, 4, None)]);
}

#[test]
fn a_shared_response_is_on_the_wire_what_the_whole_response_is() {
    let mut f = Fixture::new();
    let (rx, _) = f.watch("k", 0);
    let mut rx = rx;
    f.hub.catch_up();
    f.put("k", "v");
    let out = rx.try_recv_out().expect("a response");
    assert!(matches!(out, WatchOut::Shared { .. }));
    let mut wire = BytesMut::new();
    out.encode(&mut wire);
    let whole = out.into_response();
    assert_eq!(whole.events.len(), 1);
    assert_eq!(WatchResponse::decode(&wire[..]).expect("decode"), whole);
    assert_eq!(wire.len(), whole.encoded_len());
}

#[test]
fn too_many_queued_events_send_the_watchers_to_history_without_gaps() {
    let mut f = Fixture::new();
    let (mut rx, _) = f.watch("k", 0);
    f.hub.catch_up();
    let writes = PENDING_EVENTS + 10;
    for i in 0..writes {
        f.apply_queued(put_request("k", &format!("v{i}")));
    }
    f.hub.deliver_pending();
    let mut got = drain(&mut rx);
    while got.len() < writes {
        let before = got.len();
        f.hub.catch_up();
        got.extend(drain(&mut rx));
        assert!(got.len() > before, "catch-up makes progress");
    }
    f.put("k", "live again");
    got.extend(drain(&mut rx));
    let revisions: Vec<i64> = got.iter().map(|(rev, _)| *rev).collect();
    let expected: Vec<i64> = (2..2 + writes as i64 + 1).collect();
    assert_eq!(revisions, expected, "every revision once, in order");
}

#[test]
fn a_fragmenting_watcher_gets_a_large_revision_in_marked_parts() {
    use crate::proto::etcdserverpb::{request_op, RequestOp, TxnRequest};
    let limit = 300;
    let mut f = Fixture::with_response_limit(limit);
    let (mut fragmented, _) = f.watch_with(WatchCreateRequest {
        key: b"k".to_vec(),
        range_end: b"l".to_vec(),
        fragment: true,
        ..Default::default()
    });
    let (mut whole, _) = f.watch_with(WatchCreateRequest {
        key: b"k".to_vec(),
        range_end: b"l".to_vec(),
        ..Default::default()
    });
    f.hub.catch_up();
    let puts: Vec<RequestOp> = (0..6)
        .map(|i| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: format!("k{i}").into_bytes(),
                value: vec![b'v'; 100],
                ..Default::default()
            })),
        })
        .collect();
    f.apply(Request::Txn(TxnRequest {
        success: puts,
        ..Default::default()
    }));
    let mut parts = Vec::new();
    while let Ok(response) = fragmented.try_recv() {
        parts.push(response);
    }
    assert!(parts.len() > 1, "split into {} parts", parts.len());
    let (last, marked) = parts.split_last().expect("parts");
    assert!(marked.iter().all(|p| p.fragment) && !last.fragment);
    assert!(parts.iter().all(|p| p.encoded_len() <= limit));
    let keys = |events: &[Event]| -> Vec<Vec<u8>> {
        events
            .iter()
            .map(|e| e.kv.as_ref().expect("kv").key.clone())
            .collect()
    };
    let from_parts: Vec<Vec<u8>> = parts.iter().flat_map(|p| keys(&p.events)).collect();
    let unsplit = whole.try_recv().expect("one response");
    assert!(!unsplit.fragment);
    assert_eq!(from_parts, keys(&unsplit.events));
    assert_eq!(from_parts.len(), 6);
}

/// Creates watches on one new stream; returns its queue's ends and their ids.
fn watch_on_one_stream(
    f: &Fixture,
    creates: &[WatchCreateRequest],
) -> (WatchSender, WatchReceiver, Vec<i64>) {
    let (stream, tx, rx) = f.hub.open_stream();
    let ids = creates
        .iter()
        .map(|create| {
            let created = f.hub.create(stream, &tx, create);
            assert!(created.created && !created.canceled);
            f.hub.activate(stream, created.watch_id);
            created.watch_id
        })
        .collect();
    (tx, rx, ids)
}

fn prefix_watch(prev_kv: bool) -> WatchCreateRequest {
    WatchCreateRequest {
        key: "k".into(),
        range_end: "l".into(),
        prev_kv,
        ..Default::default()
    }
}

#[test]
fn a_streams_watchers_that_get_the_same_take_one_queue_entry_and_each_their_response() {
    let mut f = Fixture::new();
    f.put("k1", "old");
    let creates = [prefix_watch(false), prefix_watch(false), prefix_watch(true)];
    let (tx, mut rx, ids) = watch_on_one_stream(&f, &creates);
    let (mut other, _) = f.watch("k1", 0);
    f.hub.catch_up();
    f.put("k1", "new");
    // One entry for the two alike watchers, one for the one that wants previous values.
    let mut entries = Vec::new();
    while let Ok(queued) = rx.rx.try_recv() {
        entries.push(queued);
    }
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(
        matches!(&entries[0], Queued::Fanout { watch_ids, .. } if watch_ids == &ids[..2]),
        "{entries:?}"
    );
    // On the wire: a gRPC message per watcher, each what its whole response encodes to.
    let mut wire = BytesMut::new();
    for queued in &entries {
        queued.write_grpc(&mut wire);
    }
    let mut framed = Vec::new();
    let mut rest = &wire[..];
    while let [0, a, b, c, d, tail @ ..] = rest {
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        framed.push(WatchResponse::decode(&tail[..len]).expect("a response"));
        rest = &tail[len..];
    }
    assert!(rest.is_empty(), "nothing but whole messages");
    for queued in entries {
        tx.try_send(queued).expect("room");
    }
    let mut received = Vec::new();
    while let Ok(response) = rx.try_recv() {
        received.push(response);
    }
    assert_eq!(framed, received);
    let mut got = Vec::new();
    for response in received {
        let [event] = &response.events[..] else {
            panic!("one event each: {response:?}");
        };
        let value = |kv: &Option<KeyValue>| kv.as_ref().map(|kv| kv.value.clone());
        got.push((response.watch_id, value(&event.kv), value(&event.prev_kv)));
    }
    let new = Some(b"new".to_vec());
    assert_eq!(
        got,
        vec![
            (ids[0], new.clone(), None),
            (ids[1], new.clone(), None),
            (ids[2], new, Some(b"old".to_vec())),
        ]
    );
    assert_eq!(drain(&mut other), vec![(3, "new".to_string())]);
}

#[test]
fn a_fanout_its_queue_refuses_sends_each_of_its_watchers_to_history_without_gaps() {
    let mut f = Fixture::new();
    let (_tx, mut rx, ids) = watch_on_one_stream(&f, &[prefix_watch(false), prefix_watch(false)]);
    f.hub.catch_up();
    let writes = STREAM_QUEUE + 10;
    for i in 0..writes {
        f.put("k", &format!("v{i}"));
    }
    let mut revisions: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut take = |rx: &mut WatchReceiver| {
        while let Ok(response) = rx.try_recv() {
            let revs = revisions.entry(response.watch_id).or_default();
            revs.extend(
                response
                    .events
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision),
            );
        }
    };
    // The queue took STREAM_QUEUE deliveries to both; the rest waits in history.
    take(&mut rx);
    f.hub.catch_up();
    f.put("k", "after");
    take(&mut rx);
    let expected: Vec<i64> = (2..2 + writes as i64 + 1).collect();
    for id in ids {
        assert_eq!(
            revisions.get(&id),
            Some(&expected),
            "watch {id}: every revision once, in order"
        );
    }
}

/// A slow stream's queue holds at most `STREAM_QUEUE_BYTES` (plus one response), whatever the
/// values' size: with 1 MiB values it takes a few dozen, not thousands; the rest waits in
/// history, read back in steps of `CATCH_UP_BYTES`, every revision once and in order.
#[test]
fn a_slow_streams_queue_is_bounded_in_bytes_and_catches_up_without_gaps() {
    let mut f = Fixture::with_response_limit(64 << 20);
    let (stream, tx, mut rx) = f.hub.open_stream();
    let created = f.hub.create(
        stream,
        &tx,
        &WatchCreateRequest {
            key: "big".into(),
            ..Default::default()
        },
    );
    f.hub.activate(stream, created.watch_id);
    f.hub.catch_up();
    let value = "x".repeat(1 << 20);
    let writes = 200;
    for _ in 0..writes {
        f.put("big", &value);
        // Absolute figures: the test fails if the bound goes (or grows past them).
        assert!(
            tx.queued_bytes() <= 10 << 20,
            "{} bytes queued for one stream",
            tx.queued_bytes()
        );
    }
    let first = drain(&mut rx);
    assert!(
        first.len() <= 10,
        "{} MiB responses were queued",
        first.len()
    );
    assert_eq!(tx.queued_bytes(), 0, "what was taken is no longer counted");
    let mut got = first;
    while got.len() < writes {
        let before = got.len();
        f.hub.catch_up();
        let step = drain(&mut rx);
        assert!(step.len() <= 8, "a catch-up step read {} MiB", step.len());
        got.extend(step);
        assert!(got.len() > before, "catch-up makes progress");
    }
    let revisions: Vec<i64> = got.iter().map(|(rev, _)| *rev).collect();
    let expected: Vec<i64> = (2..2 + writes as i64).collect();
    assert_eq!(revisions, expected, "every revision once, in order");
}

/// Events waiting for the hub's task are bounded in bytes too (`PENDING_BYTES`): past it the
/// watchers catch up from history instead, without gaps.
#[test]
fn pending_events_are_bounded_in_bytes() {
    let mut f = Fixture::with_response_limit(64 << 20);
    let (mut rx, _) = f.watch("big", 0);
    f.hub.catch_up();
    let value = "y".repeat(1 << 20);
    let writes = 100;
    for _ in 0..writes {
        f.apply_queued(put_request("big", &value));
        let pending: usize = f.hub.lock_pending().events.iter().map(event_bytes).sum();
        assert!(pending <= 66 << 20, "{pending} bytes of events pending");
    }
    f.hub.deliver_pending();
    let mut got = drain(&mut rx);
    while got.len() < writes {
        let before = got.len();
        f.hub.catch_up();
        got.extend(drain(&mut rx));
        assert!(got.len() > before, "catch-up makes progress");
    }
    let revisions: Vec<i64> = got.iter().map(|(rev, _)| *rev).collect();
    let expected: Vec<i64> = (2..2 + writes as i64).collect();
    assert_eq!(revisions, expected, "every revision once, in order");
}

#[test]
fn a_delivery_visits_only_the_watchers_its_keys_concern_and_the_others_stay_in_step() {
    let mut f = Fixture::new();
    let (stream, tx, mut rx) = f.hub.open_stream();
    let created = f.hub.create(
        stream,
        &tx,
        &WatchCreateRequest {
            key: b"a".to_vec(),
            ..Default::default()
        },
    );
    f.hub.activate(stream, created.watch_id);
    f.hub.catch_up();
    // Many revisions of other keys: no delivery touches the watcher of "a".
    for i in 0..50 {
        f.put("b", &format!("v{i}"));
    }
    {
        let state = f.hub.lock();
        let watcher = state.watchers.values().next().expect("the watcher");
        assert!(watcher.synced);
        assert_eq!(watcher.next_rev, 2, "not touched");
        assert_eq!(effective_next(watcher, state.synced_next), 52);
    }
    // Yet it is in step: a progress answer names the current revision, and the next event of
    // "a" reaches it live, with nothing to catch up.
    assert_eq!(f.hub.progress(stream).header.expect("header").revision, 51);
    f.put("a", "live");
    assert_eq!(drain(&mut rx), vec![(52, "live".to_string())]);
    assert!(!f.hub.lock().watchers.values().any(|w| !w.synced));
    // Sent to history (too many queued events), it catches up from where it really is: only
    // what it wants, once.
    for i in 0..PENDING_EVENTS + 10 {
        f.apply_queued(put_request("b", &format!("w{i}")));
    }
    f.apply_queued(put_request("a", "in the overflow"));
    f.hub.deliver_pending();
    for _ in 0..100 {
        f.hub.catch_up();
    }
    f.put("a", "after");
    let got: Vec<String> = drain(&mut rx).into_iter().map(|(_, v)| v).collect();
    assert_eq!(got, ["in the overflow", "after"]);
}

#[test]
fn a_watcher_of_a_range_is_visited_for_keys_in_it_only() {
    let mut f = Fixture::new();
    let (mut ranged, _) = f.watch_with(WatchCreateRequest {
        key: b"p/".to_vec(),
        range_end: b"p0".to_vec(),
        ..Default::default()
    });
    let (mut single, _) = f.watch("p/x", 0);
    f.hub.catch_up();
    f.put("q", "outside");
    f.put("p/x", "both");
    f.put("p/y", "the range");
    assert_eq!(
        drain(&mut ranged),
        vec![(3, "both".to_string()), (4, "the range".to_string())]
    );
    assert_eq!(drain(&mut single), vec![(3, "both".to_string())]);
}
