//! Watch coalescing. Client watchers of the same range share one upstream watcher (a
//! *broadcast*), and the upstream watchers are on one upstream watch stream (a *feed*) per
//! auth token: clients with no token share one, and a client with a token shares only with
//! clients of the same token, so the member checks every watcher as its own client's.
//!
//! - A broadcast remembers the next revision it wants (`next_rev`): one past the last event it
//!   delivered, or past the revision a progress notification vouched for. A new client watcher
//!   whose start revision is 0 or not older than that joins the broadcast (events before its
//!   start are not sent to it); an older start joins a catch-up broadcast of the range that has
//!   not gone past it, or gets one of its own, upstream from that revision; a catch-up
//!   broadcast merges into the shared one once it has caught up.
//! - A broadcast of a prefix shared by many single-key watchers finds each event's watchers
//!   through an index by key.
//! - A client stream's answers go through one bounded queue. A watcher whose queue is full is
//!   taken off its broadcast (the others go on) and *parked* at the revision it missed; once the
//!   client has read half the queue, it watches again from that revision.
//! - When the upstream stream breaks, the proxy moves to the next endpoint and creates every
//!   broadcast again from its `next_rev`: no event is lost, repeated or reordered.
//! - `RequestProgress` is sent upstream; the member's answer vouches for every upstream watcher
//!   of the stream, and each waiting client is answered with the oldest revision its own
//!   watchers have been given everything up to.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::metrics::ProxyMetrics;
use super::port::{identity_of, Answers, ClusterPort};
use crate::hooks::{self, Bug};
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::{
    RangeRequest, ResponseHeader, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::event::EventType;
use crate::proto::mvccpb::Event;
use crate::watch::WatchOut;

/// A client stream's answers, in order: an event answer whose events other watchers got
/// alike is in encoded parts shared with them (`WatchOut::Shared`).
pub type ClientAnswers =
    std::pin::Pin<Box<dyn Stream<Item = Result<WatchOut, Status>> + Send + 'static>>;

/// Answers queued to one client stream, at most; a watcher that would go past it is parked.
pub const CLIENT_QUEUE: usize = 1024;
/// A watch permission check is reused for this long for the same token and range.
const PERMISSION_TTL: Duration = Duration::from_secs(1);
/// Once this many keys under one prefix have a shared upstream watcher each, further watchers of
/// single keys under it share one upstream watcher of the whole prefix, filtered per client
/// (100,000 pods each watching its own key are a handful of watchers on the member).
pub const PREFIX_AFTER: usize = 8;
/// A progress request some client's watchers were not ready for is made again after this.
const PROGRESS_RETRY: Duration = Duration::from_millis(50);
/// The pause before the upstream stream is opened again after it broke.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// A client stream's one queue of answers, in order. Events count against `CLIENT_QUEUE`;
/// answers about the watchers themselves (created, canceled, progress) are never refused, so
/// they are never lost and always in order with the events.
#[derive(Clone)]
struct ClientTx {
    tx: mpsc::UnboundedSender<Result<WatchOut, Status>>,
    queued_events: Arc<AtomicUsize>,
    /// Event answers it holds at most (`CLIENT_QUEUE`; the simulator makes it small).
    limit: usize,
}

/// Why an event answer was not queued.
enum NotQueued {
    Full,
    Closed,
}

impl ClientTx {
    fn new(limit: usize) -> (ClientTx, mpsc::UnboundedReceiver<Result<WatchOut, Status>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            ClientTx {
                tx,
                queued_events: Arc::default(),
                limit,
            },
            rx,
        )
    }

    /// Queues an answer that is not an event; `false` when the client has gone.
    fn control(&self, answer: Result<WatchResponse, Status>) -> bool {
        self.tx.send(answer.map(WatchOut::Response)).is_ok()
    }

    fn event(&self, answer: WatchOut) -> Result<(), NotQueued> {
        if self.queued_events.load(Ordering::Relaxed) >= self.limit {
            return Err(NotQueued::Full);
        }
        self.queued_events.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Ok(answer)).map_err(|_| NotQueued::Closed)
    }

    fn room(&self) -> usize {
        self.limit
            .saturating_sub(self.queued_events.load(Ordering::Relaxed))
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// One client watcher, as a broadcast delivers to it.
struct Subscriber {
    stream: u64,
    watch_id: i64,
    tx: ClientTx,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    progress_notify: bool,
    /// Events before this revision are not the client's.
    min_rev: i64,
    /// Has the client been sent its `created` answer?
    announced: bool,
    /// The client's own key, when its broadcast watches a whole prefix (distinct keys
    /// coalesced): only events on this key are its.
    own_key: Option<Vec<u8>>,
}

/// One upstream watcher and the client watchers it serves.
struct Broadcast {
    token: Token,
    key: Vec<u8>,
    range_end: Vec<u8>,
    shared: bool,
    upstream_id: Option<i64>,
    /// The revision the upstream watcher starts from when it is (re)created; 0: from now.
    next_rev: i64,
    header: ResponseHeader,
    subscribers: Vec<Subscriber>,
    /// Which subscribers want which key (built when an event needs it, dropped whenever the
    /// subscribers change): a broadcast of a prefix shared by many distinct-key watchers
    /// delivers each event to its key's watchers without looking at the others.
    index: Option<KeyIndex>,
    /// The planted bug `ProxyDropsEventAtFailover` (simulator only): the first events after
    /// the stream was opened again are lost.
    drop_next_events: bool,
}

/// A broadcast's subscribers by the key they want.
#[derive(Default)]
struct KeyIndex {
    /// Subscribers of one key (distinct keys coalesced under a prefix), by that key.
    by_key: HashMap<Vec<u8>, Vec<usize>>,
    /// Subscribers of the whole range.
    whole: Vec<usize>,
}

impl KeyIndex {
    fn of(subscribers: &[Subscriber]) -> KeyIndex {
        let mut index = KeyIndex::default();
        for (i, s) in subscribers.iter().enumerate() {
            match &s.own_key {
                Some(key) => index.by_key.entry(key.clone()).or_default().push(i),
                None => index.whole.push(i),
            }
        }
        index
    }
}

/// Above this many subscribers, a broadcast finds an event's watchers through its `KeyIndex`.
const INDEX_AFTER: usize = 16;

/// One upstream answer on its way to a broadcast's subscribers.
struct Delivery<'a> {
    response: &'a WatchResponse,
    /// The revision of its first event.
    first_rev: i64,
    shared: SharedParts,
    delivered: u64,
    /// Subscribers whose queue was full: (stream, watch id, the revision they missed).
    full: Vec<(u64, i64, i64)>,
}

/// The encodings of an answer's parts that subscribers given all its events share: the
/// header, and the events with and without their previous values; each made when first needed.
#[derive(Default)]
struct SharedParts {
    header: Option<bytes::Bytes>,
    events: [Option<bytes::Bytes>; 2],
}

impl Delivery<'_> {
    /// Sends `s` the events of the answer that are its own.
    fn offer(&mut self, s: &mut Subscriber) {
        let wanted = |e: &Event| {
            let put = e.r#type == EventType::Put as i32;
            e.kv.as_ref().is_some_and(|kv| {
                kv.mod_revision >= s.min_rev && s.own_key.as_ref().is_none_or(|own| *own == kv.key)
            }) && !(put && s.no_put || !put && s.no_delete)
        };
        let events = &self.response.events;
        let taken = events.iter().filter(|e| wanted(e)).count();
        if taken == 0 {
            return;
        }
        let answer = if taken == events.len() {
            // All of them, as others get them: from the parts encoded once.
            let keep_prev = s.prev_kv || events.iter().all(|e| e.prev_kv.is_none());
            let header = self.shared.header.get_or_insert_with(|| {
                crate::watch::encode_header_field(self.response.header.as_ref())
            });
            let header = header.clone();
            let encoded = self.shared.events[usize::from(keep_prev)].get_or_insert_with(|| {
                if keep_prev {
                    crate::watch::encode_events_field(events.iter())
                } else {
                    let bare: Vec<Event> = events
                        .iter()
                        .map(|e| Event {
                            prev_kv: None,
                            ..e.clone()
                        })
                        .collect();
                    crate::watch::encode_events_field(bare.iter())
                }
            });
            WatchOut::Shared {
                header,
                watch_id: s.watch_id,
                events: encoded.clone(),
            }
        } else {
            // Some of them (a key of its own under a shared prefix, a filter): its own answer.
            WatchOut::Response(WatchResponse {
                header: self.response.header,
                watch_id: s.watch_id,
                events: events
                    .iter()
                    .filter(|e| wanted(e))
                    .map(|e| {
                        let mut e = e.clone();
                        if !s.prev_kv {
                            e.prev_kv = None;
                        }
                        e
                    })
                    .collect(),
                ..Default::default()
            })
        };
        match s.tx.event(answer) {
            Ok(()) => self.delivered += 1,
            Err(NotQueued::Full) => {
                self.full
                    .push((s.stream, s.watch_id, self.first_rev.max(s.min_rev)))
            }
            // The client is gone: its stream's end takes it off.
            Err(NotQueued::Closed) => {}
        }
    }
}

/// A client watcher off its broadcast because its stream's queue was full.
#[derive(Clone)]
struct Parked {
    create: WatchCreateRequest,
    resume_rev: i64,
}

/// A client's auth token (`token` metadata), empty for none.
type Token = Vec<u8>;

/// A permission check's answer and when it was made.
type Permission = (Instant, Result<(), Status>);

/// One upstream watch stream, for the clients of one token.
#[derive(Default)]
struct Feed {
    /// Requests to the upstream stream, while it is open.
    upstream: Option<mpsc::UnboundedSender<WatchRequest>>,
    by_upstream: HashMap<i64, u64>,
    /// Broadcasts whose create request is upstream, oldest first (answered in order).
    creating: VecDeque<u64>,
    /// Client streams are waiting for the upstream's progress answer.
    progress_asked: bool,
    /// The broadcasts of its token (the feed is let go when none is left).
    broadcasts: usize,
    /// Wakes its task: a broadcast or a progress request waits for the stream.
    wake: Arc<Notify>,
}

impl Feed {
    /// Sends a progress request upstream, unless one is out or the stream is not open.
    fn ask_progress(&mut self) {
        if self.progress_asked {
            return;
        }
        if let Some(up) = &self.upstream {
            self.progress_asked = up.send(progress_request()).is_ok();
        }
    }
}

fn progress_request() -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
    }
}

#[derive(Default)]
struct ClientStream {
    token: Token,
    tx: Option<ClientTx>,
    /// Its watchers: watch id -> broadcast id.
    watchers: HashMap<i64, u64>,
    parked: HashMap<i64, Parked>,
    /// The requests each watcher was made with (to watch again when parked).
    requests: HashMap<i64, WatchCreateRequest>,
    waiting_progress: bool,
    /// The revision of its last progress answer: a later one never names an older revision
    /// (after a failover, the member now in use may be behind the one before).
    progress_rev: i64,
    unpark: Arc<Notify>,
}

#[derive(Default)]
struct State {
    feeds: HashMap<Token, Feed>,
    broadcasts: HashMap<u64, Broadcast>,
    /// The shared broadcast of each range, for each token.
    shared: HashMap<(Token, Vec<u8>, Vec<u8>), u64>,
    next_broadcast: u64,
    streams: HashMap<u64, ClientStream>,
    next_stream: u64,
    /// Shared broadcasts of single keys under each prefix (the part up to the last `/`).
    keyed: HashMap<(Token, Vec<u8>), usize>,
    /// The catch-up broadcasts (not shared) of each range, for each token.
    catching_up: HashMap<(Token, Vec<u8>, Vec<u8>), Vec<u64>>,
    permissions: HashMap<(Token, Vec<u8>, Vec<u8>), Permission>,
}

impl State {
    /// The shared broadcast of `range` a watcher from `start` can join: one that has not gone
    /// past its start.
    ///
    /// A watcher from an older revision (one catching up, or a parked one watching again) joins
    /// a catch-up broadcast of the range that has not gone past its start either, the one
    /// nearest to it: watchers parked together catch up together, on one upstream watcher.
    fn joinable(&self, range: &(Token, Vec<u8>, Vec<u8>), start: i64) -> Option<u64> {
        let shared = self.shared.get(range).copied().filter(|id| {
            self.broadcasts.get(id).is_some_and(|b| {
                if b.upstream_id.is_none() && b.next_rev == 0 {
                    // Not created yet, from now: only a watcher from now may join.
                    start == 0
                } else {
                    start == 0 || start >= b.next_rev
                }
            })
        });
        if shared.is_some() || start == 0 {
            return shared;
        }
        self.catching_up
            .get(range)?
            .iter()
            .filter_map(|id| Some((*id, self.broadcasts.get(id)?.next_rev)))
            .filter(|(_, next_rev)| *next_rev > 0 && *next_rev <= start)
            .max_by_key(|(_, next_rev)| *next_rev)
            .map(|(id, _)| id)
    }
}

pub struct Broker {
    up: Arc<dyn ClusterPort>,
    state: Mutex<State>,
    /// The newest revision the proxy has passed to any client (watch and KV answers).
    pub seen: Arc<AtomicI64>,
    metrics: Arc<ProxyMetrics>,
    /// Event answers a client stream's queue holds (`CLIENT_QUEUE`).
    client_queue: usize,
}

/// The prefix a single key is coalesced under: up to and including its last `/` (none for a
/// key without one, or ending in one).
fn prefix_of(key: &[u8]) -> Option<Vec<u8>> {
    let at = key.iter().rposition(|b| *b == b'/')?;
    (at + 1 < key.len() && at > 0).then(|| key[..=at].to_vec())
}

fn has(create: &WatchCreateRequest, filter: FilterType) -> bool {
    create.filters.contains(&(filter as i32))
}

impl Broker {
    pub fn new(
        up: Arc<dyn ClusterPort>,
        seen: Arc<AtomicI64>,
        metrics: Arc<ProxyMetrics>,
    ) -> Arc<Self> {
        Self::with_client_queue(up, seen, metrics, CLIENT_QUEUE)
    }

    /// A broker whose client streams hold at most `client_queue` event answers (the simulator
    /// makes them small, so that slow watchers are parked and resumed often).
    pub fn with_client_queue(
        up: Arc<dyn ClusterPort>,
        seen: Arc<AtomicI64>,
        metrics: Arc<ProxyMetrics>,
        client_queue: usize,
    ) -> Arc<Self> {
        Arc::new(Broker {
            up,
            state: Mutex::new(State::default()),
            seen,
            metrics,
            client_queue: client_queue.max(2),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn saw(&self, header: &Option<ResponseHeader>) {
        if let Some(h) = header {
            self.seen.fetch_max(h.revision, Ordering::Relaxed);
        }
    }

    /// (Upstream watchers, client watchers sharing one with another): read when `/metrics` is
    /// scraped, not kept up on every event.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let coalescing = state
            .broadcasts
            .values()
            .map(|b| b.subscribers.len().saturating_sub(1))
            .sum();
        (state.broadcasts.len(), coalescing)
    }

    fn open_stream(&self, tx: ClientTx, token: Token) -> (u64, Arc<Notify>) {
        let mut state = self.lock();
        let id = state.next_stream;
        state.next_stream += 1;
        let unpark = Arc::new(Notify::new());
        state.streams.insert(
            id,
            ClientStream {
                token,
                tx: Some(tx),
                unpark: unpark.clone(),
                ..Default::default()
            },
        );
        (id, unpark)
    }

    fn close_stream(&self, stream: u64) {
        let mut state = self.lock();
        if let Some(client) = state.streams.remove(&stream) {
            for (watch_id, broadcast) in client.watchers {
                self.unsubscribe(&mut state, broadcast, stream, watch_id);
            }
        }
    }

    /// Takes a client watcher off its broadcast; a broadcast left with no watcher is canceled
    /// upstream.
    fn unsubscribe(&self, state: &mut State, broadcast: u64, stream: u64, watch_id: i64) {
        let Some(b) = state.broadcasts.get_mut(&broadcast) else {
            return;
        };
        b.subscribers
            .retain(|s| !(s.stream == stream && s.watch_id == watch_id));
        b.index = None;
        if b.subscribers.is_empty() && b.upstream_id.is_some() {
            self.drop_broadcast(state, broadcast);
        }
        // One still being created is dropped when its `created` comes.
    }

    fn drop_broadcast(&self, state: &mut State, broadcast: u64) {
        let Some(b) = state.broadcasts.remove(&broadcast) else {
            return;
        };
        let range = (b.token.clone(), b.key.clone(), b.range_end.clone());
        if !b.shared {
            if let Some(ids) = state.catching_up.get_mut(&range) {
                ids.retain(|id| *id != broadcast);
                if ids.is_empty() {
                    state.catching_up.remove(&range);
                }
            }
        }
        if b.shared && state.shared.get(&range) == Some(&broadcast) {
            state.shared.remove(&range);
            if b.range_end.is_empty() {
                if let Some(prefix) = prefix_of(&b.key) {
                    let counted = (b.token.clone(), prefix);
                    if let Some(n) = state.keyed.get_mut(&counted) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            state.keyed.remove(&counted);
                        }
                    }
                }
            }
        }
        let Some(feed) = state.feeds.get_mut(&b.token) else {
            return;
        };
        feed.broadcasts = feed.broadcasts.saturating_sub(1);
        // Its task closes the stream once nothing is left on it.
        feed.wake.notify_one();
        if let Some(id) = b.upstream_id {
            feed.by_upstream.remove(&id);
            if let Some(up) = &feed.upstream {
                let _ = up.send(WatchRequest {
                    request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                        watch_id: id,
                    })),
                });
            }
        }
    }

    /// Checks that the caller may watch the range, as the member would (etcd's proxy does the
    /// same: a one-key read with the caller's credentials). Reused for `PERMISSION_TTL`.
    async fn permitted(
        &self,
        create: &WatchCreateRequest,
        credentials: &MetadataMap,
    ) -> Result<(), Status> {
        let cache_key = (
            identity_of(credentials),
            create.key.clone(),
            create.range_end.clone(),
        );
        if let Some((at, answer)) = self.lock().permissions.get(&cache_key) {
            if at.elapsed() < PERMISSION_TTL {
                return answer.clone();
            }
        }
        let probe = RangeRequest {
            key: create.key.clone(),
            range_end: create.range_end.clone(),
            limit: 1,
            serializable: true,
            keys_only: true,
            ..Default::default()
        };
        let answer = self.up.range(probe, credentials).await.map(|_| ());
        if matches!(&answer, Err(status) if status.code() == tonic::Code::Unavailable) {
            // Not an answer about the caller: ask again next time.
            return answer;
        }
        let mut state = self.lock();
        if state.permissions.len() > 10_000 {
            state.permissions.clear();
        }
        state
            .permissions
            .insert(cache_key, (Instant::now(), answer.clone()));
        answer
    }

    /// A client's create request: joins a broadcast or starts one, and queues its answer (before
    /// any event can follow it). `resume`: a parked watcher watching again (its id is kept and
    /// it is not announced again).
    fn subscribe(
        self: &Arc<Self>,
        stream: u64,
        mut create: WatchCreateRequest,
        resume: Option<i64>,
    ) {
        // As the member: a start at or below 0 is "from now".
        create.start_revision = create.start_revision.max(0);
        let mut state = self.lock();
        let Some(client) = state.streams.get(&stream) else {
            return;
        };
        let Some(tx) = client.tx.clone() else {
            return;
        };
        let token = client.token.clone();
        // As etcd 3.4: a watcher it refuses is named -1.
        let refused = |reason: &str, header: ResponseHeader| WatchResponse {
            header: Some(header),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        let seen = self.seen.load(Ordering::Relaxed);
        let any_header = state
            .broadcasts
            .values()
            .next()
            .map(|b| ResponseHeader {
                revision: seen,
                ..b.header
            })
            .unwrap_or(ResponseHeader {
                revision: seen,
                ..Default::default()
            });
        if !create.range_end.is_empty() && create.range_end != [0] && create.key >= create.range_end
        {
            tx.control(Ok(refused(crate::watch::EMPTY_RANGE, any_header)));
            return;
        }
        let watch_id = match resume {
            Some(id) => id,
            None if create.watch_id != 0 => {
                if client.watchers.contains_key(&create.watch_id)
                    || client.parked.contains_key(&create.watch_id)
                {
                    tx.control(Ok(refused(crate::watch::DUPLICATE_ID, any_header)));
                    return;
                }
                create.watch_id
            }
            None => (0..)
                .find(|id| !client.watchers.contains_key(id) && !client.parked.contains_key(id))
                .unwrap_or(0),
        };
        let start = resume
            .map(|_| create.start_revision)
            .unwrap_or(create.start_revision);
        let range = (token.clone(), create.key.clone(), create.range_end.clone());
        // A shared broadcast this watcher can join: one that has not gone past its start.
        let joinable = state.joinable(&range, start);
        let mut subscriber = Subscriber {
            stream,
            watch_id,
            tx,
            no_put: has(&create, FilterType::Noput),
            no_delete: has(&create, FilterType::Nodelete),
            prev_kv: create.prev_kv,
            progress_notify: create.progress_notify,
            min_rev: start,
            announced: resume.is_some(),
            own_key: None,
        };
        // Distinct keys under a busy prefix: the prefix's shared broadcast, or a new one.
        let mut range = range;
        let mut joinable = joinable;
        if joinable.is_none() && create.range_end.is_empty() {
            if let Some(prefix) = prefix_of(&create.key) {
                let wide = (
                    token.clone(),
                    prefix.clone(),
                    crate::server::prefix_end(&prefix),
                );
                let busy = state
                    .keyed
                    .get(&(token.clone(), prefix))
                    .copied()
                    .unwrap_or(0)
                    >= PREFIX_AFTER;
                let wide_joinable = state.joinable(&wide, start);
                if wide_joinable.is_some() || (busy && !state.shared.contains_key(&wide)) {
                    subscriber.own_key = Some(create.key.clone());
                    joinable = wide_joinable;
                    range = wide;
                }
            }
        }
        let broadcast = match joinable {
            Some(id) => {
                let Some(b) = state.broadcasts.get_mut(&id) else {
                    return;
                };
                if start == 0 {
                    // From now: nothing older than what any client has been shown.
                    subscriber.min_rev = b.next_rev.max(seen + 1);
                }
                if b.upstream_id.is_some() && !subscriber.announced {
                    // Queued before it joins: no event can come before it.
                    subscriber.announced = true;
                    subscriber.tx.control(Ok(WatchResponse {
                        header: Some(ResponseHeader {
                            revision: b.header.revision.max(subscriber.min_rev - 1),
                            ..b.header
                        }),
                        watch_id,
                        created: true,
                        ..Default::default()
                    }));
                }
                b.subscribers.push(subscriber);
                b.index = None;
                self.metrics.watchers_coalesced.inc();
                id
            }
            None => {
                let id = state.next_broadcast;
                state.next_broadcast += 1;
                let shared = !state.shared.contains_key(&range);
                let (_, key, range_end) = range.clone();
                if shared {
                    state.shared.insert(range, id);
                    if range_end.is_empty() {
                        if let Some(prefix) = prefix_of(&key) {
                            *state.keyed.entry((token.clone(), prefix)).or_default() += 1;
                        }
                    }
                } else {
                    state.catching_up.entry(range).or_default().push(id);
                }
                state.broadcasts.insert(
                    id,
                    Broadcast {
                        token: token.clone(),
                        key,
                        range_end,
                        shared,
                        upstream_id: None,
                        next_rev: start,
                        header: ResponseHeader::default(),
                        subscribers: vec![subscriber],
                        index: None,
                        drop_next_events: false,
                    },
                );
                self.feed(&mut state, &token).broadcasts += 1;
                self.create_upstream(&mut state, id);
                id
            }
        };
        if let Some(client) = state.streams.get_mut(&stream) {
            client.watchers.insert(watch_id, broadcast);
            client.parked.remove(&watch_id);
            client.requests.insert(watch_id, create);
        }
    }

    /// Sends the create request of `broadcast` upstream (when the stream is open; otherwise the
    /// upstream task creates it on connecting).
    fn create_upstream(&self, state: &mut State, broadcast: u64) {
        let Some(b) = state.broadcasts.get(&broadcast) else {
            return;
        };
        let Some(feed) = state.feeds.get_mut(&b.token) else {
            return;
        };
        let Some(up) = feed.upstream.clone() else {
            return;
        };
        let request = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b.key.clone(),
                range_end: b.range_end.clone(),
                start_revision: b.next_rev,
                progress_notify: true,
                prev_kv: true,
                ..Default::default()
            })),
        };
        if up.send(request).is_ok() {
            feed.creating.push_back(broadcast);
        }
    }

    /// The feed of `token`, its task started if it has none.
    fn feed<'a>(self: &Arc<Self>, state: &'a mut State, token: &Token) -> &'a mut Feed {
        if !state.feeds.contains_key(token) {
            let feed = Feed::default();
            let wake = feed.wake.clone();
            state.feeds.insert(token.clone(), feed);
            tokio::spawn(self.clone().feed_loop(token.clone(), wake));
        }
        state.feeds.entry(token.clone()).or_default()
    }

    fn cancel(&self, stream: u64, watch_id: i64) -> bool {
        let mut state = self.lock();
        let Some(client) = state.streams.get_mut(&stream) else {
            return false;
        };
        client.requests.remove(&watch_id);
        let parked = client.parked.remove(&watch_id).is_some();
        let Some(broadcast) = client.watchers.remove(&watch_id) else {
            return parked;
        };
        self.unsubscribe(&mut state, broadcast, stream, watch_id);
        true
    }

    /// A client asks for progress: asked upstream once for every client waiting.
    fn ask_progress(self: &Arc<Self>, stream: u64) {
        let mut state = self.lock();
        let Some(client) = state.streams.get_mut(&stream) else {
            return;
        };
        client.waiting_progress = true;
        let token = client.token.clone();
        let feed = self.feed(&mut state, &token);
        feed.ask_progress();
        // With no stream open, the feed's task asks once it is.
        feed.wake.notify_one();
    }

    /// Asks the feed of `token` for progress again in a moment (clients wait for watchers that
    /// are behind).
    fn ask_again_later(self: &Arc<Self>, token: Token) {
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PROGRESS_RETRY).await;
            let mut state = broker.lock();
            let waiting = state
                .streams
                .values()
                .any(|c| c.waiting_progress && c.token == token);
            let Some(feed) = state.feeds.get_mut(&token) else {
                return;
            };
            if waiting {
                feed.ask_progress();
            }
        });
    }

    /// Delivers to every subscriber of `b`; those whose queue is full are returned (parked by
    /// the caller).
    fn deliver(
        b: &mut Broadcast,
        response: &WatchResponse,
        events_coalesced: &prometheus::IntCounter,
    ) -> Vec<(u64, i64, i64)> {
        let mut delivery = Delivery {
            response,
            first_rev: response
                .events
                .first()
                .and_then(|e| e.kv.as_ref())
                .map(|kv| kv.mod_revision)
                .unwrap_or(0),
            shared: SharedParts::default(),
            delivered: 0,
            full: Vec::new(),
        };
        if b.subscribers.len() > INDEX_AFTER {
            // Those of the whole range, then those of each key the events name (once a key).
            let Broadcast {
                index, subscribers, ..
            } = b;
            let index = index.get_or_insert_with(|| KeyIndex::of(subscribers));
            for &i in &index.whole {
                if let Some(s) = subscribers.get_mut(i) {
                    delivery.offer(s);
                }
            }
            let mut keys = std::collections::HashSet::new();
            for kv in response.events.iter().filter_map(|e| e.kv.as_ref()) {
                if !keys.insert(kv.key.as_slice()) {
                    continue;
                }
                for &i in index.by_key.get(&kv.key).into_iter().flatten() {
                    if let Some(s) = subscribers.get_mut(i) {
                        delivery.offer(s);
                    }
                }
            }
        } else {
            for s in &mut b.subscribers {
                delivery.offer(s);
            }
        }
        if delivery.delivered > 1 {
            events_coalesced.inc_by((delivery.delivered - 1) * response.events.len() as u64);
        }
        delivery.full
    }

    /// One answer from upstream.
    fn dispatch(self: &Arc<Self>, token: &Token, response: WatchResponse) {
        self.saw(&response.header);
        let mut state = self.lock();
        let header = response.header.unwrap_or_default();
        let Some(feed) = state.feeds.get_mut(token) else {
            return;
        };
        if response.created {
            let Some(id) = feed.creating.pop_front() else {
                return;
            };
            feed.by_upstream.insert(response.watch_id, id);
            let mut unwanted = false;
            if let Some(b) = state.broadcasts.get_mut(&id) {
                b.upstream_id = Some(response.watch_id);
                b.header = header;
                if b.next_rev == 0 {
                    b.next_rev = header.revision + 1;
                }
                unwanted = b.subscribers.is_empty();
                if !response.canceled {
                    for s in &mut b.subscribers {
                        if s.min_rev == 0 {
                            s.min_rev = b.next_rev;
                        }
                        if !s.announced {
                            s.announced = true;
                            s.tx.control(Ok(WatchResponse {
                                header: Some(header),
                                watch_id: s.watch_id,
                                created: true,
                                ..Default::default()
                            }));
                        }
                    }
                }
            }
            if response.canceled {
                self.end_broadcast(&mut state, id, &response);
            } else if unwanted {
                self.drop_broadcast(&mut state, id);
            }
            return;
        }
        if response.watch_id == -1 {
            feed.progress_asked = false;
            // The member vouches for every watcher of the stream up to this revision.
            for b in state.broadcasts.values_mut() {
                if b.upstream_id.is_some() && b.token == *token {
                    b.next_rev = b.next_rev.max(header.revision + 1);
                    b.header = header;
                }
            }
            if self.answer_progress(&mut state, token, header) {
                self.ask_again_later(token.clone());
            }
            return;
        }
        let Some(&id) = feed.by_upstream.get(&response.watch_id) else {
            return;
        };
        if response.canceled {
            self.end_broadcast(&mut state, id, &response);
            return;
        }
        let mut full = Vec::new();
        if let Some(b) = state.broadcasts.get_mut(&id) {
            b.header = header;
            if let Some(last) = response.events.last().and_then(|e| e.kv.as_ref()) {
                if !std::mem::take(&mut b.drop_next_events) {
                    full = Self::deliver(b, &response, &self.metrics.events_coalescing);
                }
                b.next_rev = b.next_rev.max(last.mod_revision + 1);
            } else {
                // A progress notification of this watcher.
                b.next_rev = b.next_rev.max(header.revision + 1);
                for s in b.subscribers.iter().filter(|s| s.progress_notify) {
                    s.tx.control(Ok(WatchResponse {
                        header: Some(header),
                        watch_id: s.watch_id,
                        ..Default::default()
                    }));
                }
            }
        }
        for (stream, watch_id, resume_rev) in full {
            self.park(&mut state, id, stream, watch_id, resume_rev);
        }
        self.maybe_merge(&mut state, id);
    }

    /// A full queue: the watcher leaves its broadcast and waits to watch again from
    /// `resume_rev`.
    fn park(&self, state: &mut State, broadcast: u64, stream: u64, watch_id: i64, resume_rev: i64) {
        self.unsubscribe(state, broadcast, stream, watch_id);
        self.metrics.slow_watchers.inc();
        if let Some(client) = state.streams.get_mut(&stream) {
            client.watchers.remove(&watch_id);
            if let Some(create) = client.requests.get(&watch_id).cloned() {
                client
                    .parked
                    .insert(watch_id, Parked { create, resume_rev });
            }
            client.unpark.notify_one();
        }
    }

    /// A broadcast of its own that has caught up with the shared one of its range joins it.
    fn maybe_merge(&self, state: &mut State, id: u64) {
        let Some(b) = state.broadcasts.get(&id) else {
            return;
        };
        if b.shared {
            return;
        }
        let range = (b.token.clone(), b.key.clone(), b.range_end.clone());
        let Some(&shared_id) = state.shared.get(&range) else {
            return;
        };
        let Some(shared) = state.broadcasts.get(&shared_id) else {
            return;
        };
        let at = b.next_rev;
        if shared.upstream_id.is_none() || at < shared.next_rev {
            return;
        }
        let Some(mut own) = state.broadcasts.get(&id).map(|b| b.subscribers.len()) else {
            return;
        };
        let moved: Vec<Subscriber> = state
            .broadcasts
            .get_mut(&id)
            .map(|b| {
                b.index = None;
                std::mem::take(&mut b.subscribers)
            })
            .unwrap_or_default();
        for mut s in moved {
            s.min_rev = s.min_rev.max(at);
            if let Some(client) = state.streams.get_mut(&s.stream) {
                client.watchers.insert(s.watch_id, shared_id);
            }
            if let Some(shared) = state.broadcasts.get_mut(&shared_id) {
                shared.subscribers.push(s);
                shared.index = None;
                own -= 1;
            }
        }
        debug_assert_eq!(own, 0);
        self.metrics.watchers_coalesced.inc();
        self.drop_broadcast(state, id);
    }

    /// The upstream watcher ended (canceled, or its start revision compacted): every client
    /// watcher of it ends with the same answer.
    fn end_broadcast(&self, state: &mut State, id: u64, response: &WatchResponse) {
        let Some(b) = state.broadcasts.get_mut(&id) else {
            return;
        };
        let subscribers = std::mem::take(&mut b.subscribers);
        b.index = None;
        let b_token = b.token.clone();
        for s in &subscribers {
            s.tx.control(Ok(WatchResponse {
                header: response.header,
                watch_id: s.watch_id,
                created: !s.announced,
                canceled: true,
                compact_revision: response.compact_revision,
                cancel_reason: response.cancel_reason.clone(),
                ..Default::default()
            }));
            if let Some(client) = state.streams.get_mut(&s.stream) {
                client.watchers.remove(&s.watch_id);
                client.requests.remove(&s.watch_id);
            }
        }
        // Already ended upstream: no cancel to send.
        if let Some(b) = state.broadcasts.get_mut(&id) {
            b.upstream_id = None;
        }
        if let Some(feed) = state.feeds.get_mut(&b_token) {
            feed.by_upstream.remove(&response.watch_id);
        }
        self.drop_broadcast(state, id);
    }

    /// Answers every client of `token` waiting for progress whose watchers have all been given
    /// everything up to the member's answer. One with a watcher behind (catching up, parked, or
    /// not created yet) keeps waiting, as a member defers progress until its watchers are
    /// synced; returns whether any client still waits (the feed asks again a little later).
    fn answer_progress(&self, state: &mut State, token: &Token, header: ResponseHeader) -> bool {
        let State {
            streams,
            broadcasts,
            ..
        } = state;
        let mut still_waiting = false;
        for client in streams
            .values_mut()
            .filter(|c| c.waiting_progress && c.token == *token)
        {
            let behind = client.watchers.iter().any(|(watch_id, b)| {
                broadcasts.get(b).is_some_and(|b| {
                    let floor = b
                        .subscribers
                        .iter()
                        .find(|s| s.watch_id == *watch_id)
                        .map(|s| s.min_rev - 1)
                        .unwrap_or(0);
                    b.upstream_id.is_none() || (b.next_rev - 1).max(floor) < header.revision
                })
            }) || !client.parked.is_empty();
            if behind {
                still_waiting = true;
                continue;
            }
            let Some(tx) = &client.tx else { continue };
            // Everything up to an earlier answer's revision was given already.
            let revision = header.revision.max(client.progress_rev);
            client.progress_rev = revision;
            tx.control(Ok(WatchResponse {
                header: Some(ResponseHeader { revision, ..header }),
                watch_id: -1,
                ..Default::default()
            }));
            client.waiting_progress = false;
        }
        still_waiting
    }

    /// Keeps the feed of `token` open while there is anything to watch on it, opening it again
    /// (on the next endpoint, if the one in use failed) when it breaks; removes the feed and
    /// ends when nothing is left.
    async fn feed_loop(self: Arc<Self>, token: Token, wake: Arc<Notify>) {
        let mut reconnecting = false;
        loop {
            let wanted = {
                let mut state = self.lock();
                let wanted = state.feeds.get(&token).is_some_and(|f| f.broadcasts > 0)
                    || state
                        .streams
                        .values()
                        .any(|c| c.waiting_progress && c.token == token);
                if !wanted {
                    // Decided under the lock: a subscriber after this starts a new feed.
                    state.feeds.remove(&token);
                    return;
                }
                wanted
            };
            debug_assert!(wanted);
            let (tx, rx) = mpsc::unbounded_channel();
            {
                let mut state = self.lock();
                let waiting = state
                    .streams
                    .values()
                    .any(|c| c.waiting_progress && c.token == token);
                let ids: Vec<u64> = state
                    .broadcasts
                    .iter()
                    .filter(|(_, b)| b.token == token)
                    .map(|(id, _)| *id)
                    .collect();
                for id in &ids {
                    if let Some(b) = state.broadcasts.get_mut(id) {
                        b.upstream_id = None;
                    }
                }
                let Some(feed) = state.feeds.get_mut(&token) else {
                    return;
                };
                feed.upstream = Some(tx.clone());
                feed.creating.clear();
                feed.by_upstream.clear();
                feed.progress_asked = false;
                if waiting {
                    feed.progress_asked = tx.send(progress_request()).is_ok();
                }
                for id in ids {
                    if reconnecting && hooks::injected(Bug::ProxyDropsEventAtFailover) {
                        if let Some(b) = state.broadcasts.get_mut(&id) {
                            b.drop_next_events = true;
                        }
                    }
                    self.create_upstream(&mut state, id);
                }
            }
            let (ended, generation) = match self.up.open_watch(&token, rx).await {
                Ok(opened) => (
                    self.read_feed(&token, &wake, opened.answers).await,
                    Some(opened.generation),
                ),
                Err(status) => (Err(status), None),
            };
            {
                let mut state = self.lock();
                if let Some(feed) = state.feeds.get_mut(&token) {
                    feed.upstream = None;
                    feed.creating.clear();
                    feed.by_upstream.clear();
                }
                for b in state.broadcasts.values_mut().filter(|b| b.token == token) {
                    b.upstream_id = None;
                }
            }
            reconnecting = true;
            match ended {
                Ok(FeedEnd::Idle) => {
                    reconnecting = false;
                    continue;
                }
                Err(status) => {
                    tracing::warn!(endpoint = %self.up.endpoint(), error = %status, "the upstream watch stream broke; watching again from where each watcher was");
                    if let Some(generation) = generation {
                        self.up.broke(generation, Some(&status));
                    }
                }
                Ok(FeedEnd::Closed) => {
                    tracing::warn!(endpoint = %self.up.endpoint(), "the upstream watch stream ended; watching again from where each watcher was");
                    if let Some(generation) = generation {
                        self.up.broke(generation, None);
                    }
                }
            }
            self.metrics.upstream_reconnects.inc();
            // No endpoint could be reached: wait longer before going round them again.
            let pause = if generation.is_some() {
                RECONNECT_PAUSE
            } else {
                RECONNECT_PAUSE * 10
            };
            tokio::time::sleep(pause).await;
        }
    }

    async fn read_feed(
        self: &Arc<Self>,
        token: &Token,
        wake: &Notify,
        mut answers: Answers,
    ) -> Result<FeedEnd, Status> {
        loop {
            let idle = {
                let state = self.lock();
                !state
                    .feeds
                    .get(token)
                    .is_some_and(|f| f.broadcasts > 0 || f.progress_asked)
            };
            if idle {
                return Ok(FeedEnd::Idle);
            }
            tokio::select! {
                answer = answers.next() => match answer {
                    Some(response) => self.dispatch(token, response?),
                    None => return Ok(FeedEnd::Closed),
                },
                // Something changed (a broadcast dropped): look again whether it is idle.
                _ = wake.notified() => {}
            }
        }
    }
}

/// Why a feed's stream was let go.
enum FeedEnd {
    /// Nothing is watched on it any more.
    Idle,
    /// The member ended it.
    Closed,
}

impl Broker {
    /// One client watch stream: `inbound` are its requests, as the client sends them; the
    /// answers to send it are returned. `credentials`: the metadata it opened the stream with.
    pub fn serve(
        self: &Arc<Self>,
        credentials: MetadataMap,
        mut inbound: impl Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    ) -> ClientAnswers {
        let (tx, rx) = ClientTx::new(self.client_queue);
        let queued_events = tx.queued_events.clone();
        let broker = self.clone();
        let token = super::port::token_of(&credentials);
        let (stream, unpark) = broker.open_stream(tx.clone(), token);
        tokio::spawn(async move {
            let _closing = CloseStream {
                broker: broker.clone(),
                stream,
            };
            loop {
                tokio::select! {
                    message = inbound.next() => {
                        let request = match message {
                            Some(Ok(request)) => request,
                            None => break,
                            Some(Err(status)) => {
                                tx.control(Err(status));
                                break;
                            }
                        };
                        if !handle(&broker, stream, &tx, &credentials, request).await {
                            break;
                        }
                    }
                    _ = unpark.notified() => {
                        // Wait until the client has read half its queue, then watch again.
                        while tx.room() < tx.limit / 2 {
                            if tx.is_closed() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        // Copied, not taken: each stays parked (and holds progress back) until
                        // `subscribe` puts it on a broadcast.
                        let parked: Vec<(i64, Parked)> = {
                            let state = broker.lock();
                            match state.streams.get(&stream) {
                                Some(client) => client
                                    .parked
                                    .iter()
                                    .map(|(id, p)| (*id, p.clone()))
                                    .collect(),
                                None => Vec::new(),
                            }
                        };
                        for (watch_id, parked) in parked {
                            let mut create = parked.create;
                            create.start_revision = parked.resume_rev;
                            broker.subscribe(stream, create, Some(watch_id));
                        }
                    }
                }
            }
        });
        // An event answer leaves the queue's count as the client takes it.
        let answers = UnboundedReceiverStream::new(rx).map(move |answer| {
            let event = match &answer {
                Ok(WatchOut::Response(a)) => !a.events.is_empty(),
                Ok(WatchOut::Shared { .. }) => true,
                Err(_) => false,
            };
            if event {
                queued_events.fetch_sub(1, Ordering::Relaxed);
            }
            answer
        });
        Box::pin(answers)
    }
}

/// Closes the client stream's watchers when its task ends.
struct CloseStream {
    broker: Arc<Broker>,
    stream: u64,
}

impl Drop for CloseStream {
    fn drop(&mut self) {
        self.broker.close_stream(self.stream);
    }
}

/// One client request; `false` when the client has gone.
async fn handle(
    broker: &Arc<Broker>,
    stream: u64,
    tx: &ClientTx,
    credentials: &MetadataMap,
    request: WatchRequest,
) -> bool {
    match request.request_union {
        Some(RequestUnion::CreateRequest(create)) => {
            if let Err(status) = broker.permitted(&create, credentials).await {
                let seen = broker.seen.load(Ordering::Relaxed);
                return tx.control(Ok(WatchResponse {
                    header: Some(ResponseHeader {
                        revision: seen,
                        ..Default::default()
                    }),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    cancel_reason: status.message().to_string(),
                    ..Default::default()
                }));
            }
            broker.subscribe(stream, create, None);
            !tx.is_closed()
        }
        Some(RequestUnion::CancelRequest(cancel)) => {
            if !broker.cancel(stream, cancel.watch_id) {
                // As etcd: a cancel of an unknown watch gets no answer.
                return true;
            }
            let seen = broker.seen.load(Ordering::Relaxed);
            tx.control(Ok(WatchResponse {
                header: Some(ResponseHeader {
                    revision: seen,
                    ..broker.any_header()
                }),
                watch_id: cancel.watch_id,
                canceled: true,
                ..Default::default()
            }))
        }
        Some(RequestUnion::ProgressRequest(_)) => {
            broker.ask_progress(stream);
            true
        }
        None => true,
    }
}

impl Broker {
    /// A header with the cluster's IDs (from any upstream answer), for answers the proxy makes.
    fn any_header(&self) -> ResponseHeader {
        self.lock()
            .broadcasts
            .values()
            .map(|b| b.header)
            .find(|h| h.cluster_id != 0)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_keys_are_coalesced_under_the_part_up_to_their_last_slash() {
        assert_eq!(
            prefix_of(b"/registry/pods/ns/a"),
            Some(b"/registry/pods/ns/".to_vec())
        );
        assert_eq!(prefix_of(b"plain"), None);
        assert_eq!(prefix_of(b"/top"), None);
        assert_eq!(prefix_of(b"/dir/"), None);
        assert_eq!(crate::server::prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(crate::server::prefix_end(&[0xff, 0xff]), vec![0]);
    }
}
