//! Watches: each applied revision's events, delivered in order to every watcher whose range
//! they touch, with no gaps and no duplicates. As in etcd, a watcher is either *synced* (it
//! gets each new revision's events as they are applied) or *unsynced* (new with a past start
//! revision, or too slow to take events as they came): unsynced watchers catch up from the
//! store's history, a bounded batch at a time, without holding writers back. A watcher whose
//! next revision was compacted away is cancelled with the compact revision.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{mpsc, Notify};

use crate::hooks::{self, Bug};
use crate::io::Clock;
use crate::mvcc::{in_range, MvccError, MvccStore};
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::{RangeRequest, ResponseHeader, WatchCreateRequest, WatchResponse};
use crate::proto::mvccpb::{event::EventType, Event};

/// Responses queued for one watch stream, at most (etcd: 1024 events per stream); a watcher
/// that finds the queue full falls back to catching up from history. Many watchers share a
/// stream, and each revision is one response per watcher.
pub const STREAM_QUEUE: usize = 4096;
/// Revisions read from history per catch-up step of one watcher.
pub const CATCH_UP_REVISIONS: usize = 1000;
/// How often unsynced watchers are looked at even without a wake-up.
pub const CATCH_UP_INTERVAL: Duration = Duration::from_millis(100);
/// How often a watcher that asked for progress notifications gets one (etcd: 10 minutes).
pub const PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);

pub const EMPTY_RANGE: &str = "mvcc: watcher range is empty";
pub const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// Makes response headers (cluster, member, term) for a revision.
pub type HeaderFn = Arc<dyn Fn(i64) -> ResponseHeader + Send + Sync>;

struct Watcher {
    start: Vec<u8>,
    end: Vec<u8>,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// The first revision whose events it has not been sent.
    next_rev: i64,
    synced: bool,
    /// Its `created` answer has gone out: events may follow.
    ready: bool,
    tx: mpsc::Sender<WatchResponse>,
}

impl Watcher {
    fn wants(&self, event: &Event) -> bool {
        let Some(kv) = &event.kv else { return false };
        let put = event.r#type == EventType::Put as i32;
        let filtered = if put { self.no_put } else { self.no_delete };
        !filtered && in_range(&kv.key, &self.start, &self.end)
    }
}

#[derive(Default)]
struct HubState {
    /// By (stream, watch id).
    watchers: BTreeMap<(u64, i64), Watcher>,
    next_stream: u64,
}

#[derive(Clone)]
pub struct WatchHub {
    store: Arc<RwLock<MvccStore>>,
    state: Arc<Mutex<HubState>>,
    wake: Arc<Notify>,
    header: HeaderFn,
    clock: Arc<dyn Clock>,
    /// A fragmenting watcher's responses stay below this size.
    max_response_bytes: usize,
}

/// What sending one response to a watcher came to.
enum Sent {
    Yes,
    Full,
    Closed,
}

fn send(tx: &mpsc::Sender<WatchResponse>, response: WatchResponse) -> Sent {
    match tx.try_send(response) {
        Ok(()) => Sent::Yes,
        Err(mpsc::error::TrySendError::Full(_)) => Sent::Full,
        Err(mpsc::error::TrySendError::Closed(_)) => Sent::Closed,
    }
}

impl WatchHub {
    pub fn new(
        store: Arc<RwLock<MvccStore>>,
        header: HeaderFn,
        clock: Arc<dyn Clock>,
        max_response_bytes: usize,
    ) -> Self {
        WatchHub {
            store,
            state: Arc::default(),
            wake: Arc::new(Notify::new()),
            header,
            clock,
            max_response_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_store(&self) -> std::sync::RwLockReadGuard<'_, MvccStore> {
        self.store.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A new watch stream: its id and where its responses arrive.
    pub fn open_stream(
        &self,
    ) -> (
        u64,
        mpsc::Sender<WatchResponse>,
        mpsc::Receiver<WatchResponse>,
    ) {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let mut state = self.lock();
        state.next_stream += 1;
        (state.next_stream, tx, rx)
    }

    pub fn close_stream(&self, stream: u64) {
        self.lock().watchers.retain(|(s, _), _| *s != stream);
        self.update_publishing();
    }

    /// Registers a watcher; the answer (`created`, or `created` and `canceled` with a reason)
    /// must be sent before `activate` lets events follow it.
    pub fn create(
        &self,
        stream: u64,
        tx: &mpsc::Sender<WatchResponse>,
        req: &WatchCreateRequest,
    ) -> WatchResponse {
        // Lock order, everywhere: the store, then the hub.
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        let current = store.current_rev();
        let mut state = self.lock();
        let refused = |watch_id: i64, reason: &str| WatchResponse {
            header: Some((self.header)(current)),
            watch_id,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        if !req.range_end.is_empty() && req.range_end != [0] && req.key >= req.range_end {
            return refused(req.watch_id, EMPTY_RANGE);
        }
        let watch_id = if req.watch_id != 0 {
            if state.watchers.contains_key(&(stream, req.watch_id)) {
                return refused(req.watch_id, DUPLICATE_ID);
            }
            req.watch_id
        } else {
            (0..)
                .find(|id| !state.watchers.contains_key(&(stream, *id)))
                .unwrap_or(0)
        };
        let has = |filter: FilterType| req.filters.contains(&(filter as i32));
        state.watchers.insert(
            (stream, watch_id),
            Watcher {
                start: req.key.clone(),
                end: req.range_end.clone(),
                no_put: has(FilterType::Noput),
                no_delete: has(FilterType::Nodelete),
                prev_kv: req.prev_kv,
                fragment: req.fragment,
                progress_notify: req.progress_notify,
                next_rev: if req.start_revision > 0 {
                    req.start_revision
                } else {
                    current + 1
                },
                synced: false,
                ready: false,
                tx: tx.clone(),
            },
        );
        store.set_publish_events(true);
        WatchResponse {
            header: Some((self.header)(current)),
            watch_id,
            created: true,
            ..Default::default()
        }
    }

    /// The watcher's `created` answer is out: it catches up, then follows new revisions.
    pub fn activate(&self, stream: u64, watch_id: i64) {
        if let Some(watcher) = self.lock().watchers.get_mut(&(stream, watch_id)) {
            watcher.ready = true;
        }
        self.wake.notify_one();
    }

    /// Removes a watcher; `false` if there was none.
    pub fn cancel(&self, stream: u64, watch_id: i64) -> bool {
        let removed = self.lock().watchers.remove(&(stream, watch_id)).is_some();
        self.update_publishing();
        removed
    }

    fn update_publishing(&self) {
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        let any = !self.lock().watchers.is_empty();
        store.set_publish_events(any);
    }

    /// A progress answer for the stream (`RequestProgress`): every event up to the revision it
    /// names has been sent on this stream.
    pub fn progress(&self, stream: u64) -> WatchResponse {
        let current = self.read_store().current_rev();
        let state = self.lock();
        let delivered = state
            .watchers
            .iter()
            .filter(|((s, _), _)| *s == stream)
            .map(|(_, w)| if w.synced { current } else { w.next_rev - 1 })
            .min()
            .unwrap_or(current);
        WatchResponse {
            header: Some((self.header)(delivered.min(current))),
            watch_id: -1,
            ..Default::default()
        }
    }

    /// The state was replaced (a snapshot from the leader): every watcher catches up from the
    /// new history.
    pub fn resync_all(&self) {
        for watcher in self.lock().watchers.values_mut() {
            watcher.synced = false;
        }
        self.wake.notify_one();
    }

    /// New revisions' events, in order, from the apply loop: each synced watcher gets those it
    /// wants at once, in one response (whole revisions, in order); one that cannot take them
    /// falls back to catching up.
    pub fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let store = self.read_store();
        let mut state = self.lock();
        let mut closed = Vec::new();
        let mut fell_behind = false;
        for (key, watcher) in state.watchers.iter_mut() {
            if !(watcher.ready && watcher.synced) {
                continue;
            }
            // Every revision it is due, in one response.
            let mut wanted = Vec::new();
            let mut next = watcher.next_rev;
            let mut gap = false;
            for revision in events.chunk_by(|a, b| mod_rev(a) == mod_rev(b)) {
                let rev = mod_rev(&revision[0]);
                if rev < next {
                    continue;
                }
                if rev > next {
                    gap = true; // History fills it.
                    break;
                }
                wanted.extend(revision.iter().filter(|e| watcher.wants(e)).cloned());
                next = rev + 1;
            }
            if !wanted.is_empty() {
                match self.deliver(&store, key.1, watcher, wanted, next - 1) {
                    Sent::Yes => {}
                    Sent::Full => {
                        watcher.synced = false;
                        fell_behind = true;
                        continue;
                    }
                    Sent::Closed => {
                        closed.push(*key);
                        continue;
                    }
                }
            }
            watcher.next_rev = next;
            if gap {
                watcher.synced = false;
                fell_behind = true;
            }
        }
        for key in closed {
            state.watchers.remove(&key);
        }
        if fell_behind {
            self.wake.notify_one();
        }
    }

    /// Sends `events` (with previous values if asked for) to one watcher, in fragments if it
    /// allows them and they are large.
    fn deliver(
        &self,
        store: &MvccStore,
        watch_id: i64,
        watcher: &Watcher,
        mut events: Vec<Event>,
        header_rev: i64,
    ) -> Sent {
        if watcher.prev_kv {
            for event in &mut events {
                event.prev_kv = previous(store, event);
            }
        }
        let response = |events: Vec<Event>, fragment: bool| WatchResponse {
            header: Some((self.header)(header_rev)),
            watch_id,
            events,
            fragment,
            ..Default::default()
        };
        let whole = response(events, false);
        if !watcher.fragment || whole.encoded_len() <= self.max_response_bytes {
            return send(&watcher.tx, whole);
        }
        // Fragments: all but the last marked, each under the size (at least one event).
        if watcher.tx.capacity() < whole.events.len() {
            return Sent::Full;
        }
        let mut parts: Vec<Vec<Event>> = vec![Vec::new()];
        let mut size = 0;
        for event in whole.events {
            let len = event.encoded_len();
            if size + len > self.max_response_bytes && !parts.last().is_some_and(Vec::is_empty) {
                parts.push(Vec::new());
                size = 0;
            }
            size += len;
            parts.last_mut().expect("a part").push(event);
        }
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            match send(&watcher.tx, response(part, i < last)) {
                Sent::Yes => {}
                other => return other,
            }
        }
        Sent::Yes
    }

    /// One pass over the unsynced watchers: each takes up to `CATCH_UP_REVISIONS` revisions
    /// of history, and is synced once it has everything up to the current revision.
    pub fn catch_up(&self) {
        let store = self.read_store();
        let current = store.current_rev();
        let compacted = store.compact_rev();
        let mut state = self.lock();
        let mut done = Vec::new();
        // Watchers that fell behind together (a stream's, say) read the history once.
        let mut read: HashMap<HistoryRead, (Vec<Event>, i64)> = HashMap::new();
        for (key, watcher) in state.watchers.iter_mut() {
            if !watcher.ready || watcher.synced {
                continue;
            }
            let from = (
                watcher.next_rev,
                watcher.start.as_slice(),
                watcher.end.as_slice(),
            );
            let found = match read.get(&from) {
                Some(found) => Ok(found.clone()),
                None => store
                    .events_since(from.0, from.1, from.2, CATCH_UP_REVISIONS)
                    .inspect(|found| {
                        read.insert(from, found.clone());
                    }),
            };
            let (events, next) = match found {
                Ok(found) => found,
                Err(MvccError::Compacted) => {
                    let canceled = WatchResponse {
                        header: Some((self.header)(current)),
                        watch_id: key.1,
                        canceled: true,
                        compact_revision: compacted,
                        cancel_reason: "etcdserver: mvcc: required revision has been compacted"
                            .into(),
                        ..Default::default()
                    };
                    if !matches!(send(&watcher.tx, canceled), Sent::Full) {
                        done.push(*key);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "watch history unreadable");
                    continue;
                }
            };
            let mut wanted: Vec<Event> = events.into_iter().filter(|e| watcher.wants(e)).collect();
            if hooks::injected(Bug::WatchOutOfOrder) {
                wanted.reverse();
            }
            let sent = if wanted.is_empty() {
                Sent::Yes
            } else {
                self.deliver(&store, key.1, watcher, wanted, current)
            };
            match sent {
                Sent::Yes => {
                    watcher.next_rev = next;
                    watcher.synced = next > current;
                }
                Sent::Full => {}
                Sent::Closed => done.push(*key),
            }
        }
        let more = state.watchers.values().any(|w| w.ready && !w.synced);
        for key in done {
            state.watchers.remove(&key);
        }
        drop(state);
        drop(store);
        if more {
            self.wake.notify_one();
        }
    }

    /// Sends each synced watcher that asked for them an empty response naming the current
    /// revision (it has seen every event up to it).
    fn notify_progress(&self) {
        let current = self.read_store().current_rev();
        let state = self.lock();
        for ((_, watch_id), watcher) in state.watchers.iter() {
            if watcher.progress_notify && watcher.synced {
                let _ = send(
                    &watcher.tx,
                    WatchResponse {
                        header: Some((self.header)(current)),
                        watch_id: *watch_id,
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// Catches unsynced watchers up (when woken, and every `CATCH_UP_INTERVAL`) and sends
    /// progress notifications, until `stopped` says the member stopped.
    pub async fn run(self, stopped: impl Fn() -> bool) {
        let mut next_progress_ms =
            self.clock.now_ms() + PROGRESS_NOTIFY_INTERVAL.as_millis() as u64;
        while !stopped() {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = self.clock.sleep(CATCH_UP_INTERVAL) => {}
            }
            self.catch_up();
            // Give writers a turn between passes of a long catch-up.
            tokio::task::yield_now().await;
            if self.clock.now_ms() >= next_progress_ms {
                self.notify_progress();
                next_progress_ms =
                    self.clock.now_ms() + PROGRESS_NOTIFY_INTERVAL.as_millis() as u64;
            }
        }
    }
}

/// A read of history: from a revision, over a key range.
type HistoryRead<'a> = (i64, &'a [u8], &'a [u8]);

fn mod_rev(event: &Event) -> i64 {
    event.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// The key's value just before the event's revision, if still in history.
fn previous(store: &MvccStore, event: &Event) -> Option<crate::proto::mvccpb::KeyValue> {
    let kv = event.kv.as_ref()?;
    if kv.mod_revision <= 1 {
        return None;
    }
    let before = RangeRequest {
        key: kv.key.clone(),
        revision: kv.mod_revision - 1,
        ..Default::default()
    };
    store.range(&before).ok()?.kvs.into_iter().next()
}

#[cfg(test)]
mod tests;
