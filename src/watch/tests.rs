//! The hub against a real store on the in-memory backend, driven by hand: what a watcher
//! receives when it keeps up, when its stream's queue is full, and when its start is compacted.

use std::sync::{Arc, RwLock};

use super::*;
use crate::io::{MemBackend, TokioClock};
use crate::proto::etcdserverpb::{CompactionRequest, PutRequest};
use crate::proto::quorumkvpb::raft_request::Request;

struct Fixture {
    store: Arc<RwLock<MvccStore>>,
    hub: WatchHub,
    index: u64,
}

impl Fixture {
    fn new() -> Self {
        let backend = Arc::new(MemBackend::new());
        let store = Arc::new(RwLock::new(MvccStore::open(backend).expect("open")));
        let header: HeaderFn = Arc::new(|revision| ResponseHeader {
            revision,
            ..Default::default()
        });
        let hub = WatchHub::new(store.clone(), header, Arc::new(TokioClock::new()), 1 << 20);
        Fixture {
            store,
            hub,
            index: 0,
        }
    }

    /// Applies a request as the apply loop does, and publishes its events.
    fn apply(&mut self, request: Request) {
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

    fn watch(&self, key: &str, start_revision: i64) -> (mpsc::Receiver<WatchResponse>, i64) {
        let (stream, tx, rx) = self.hub.open_stream();
        let created = self.hub.create(
            stream,
            &tx,
            &WatchCreateRequest {
                key: key.into(),
                start_revision,
                ..Default::default()
            },
        );
        assert!(created.created && !created.canceled);
        self.hub.activate(stream, created.watch_id);
        (rx, created.watch_id)
    }
}

/// Every (revision, value) received so far.
fn drain(rx: &mut mpsc::Receiver<WatchResponse>) -> Vec<(i64, String)> {
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
