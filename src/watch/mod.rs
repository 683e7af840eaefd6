//! Watches: each applied revision's events, delivered in order to every watcher whose range
//! they touch, with no gaps and no duplicates. As in etcd, a watcher is either *synced* (it
//! gets each new revision's events as they are applied) or *unsynced* (new with a past start
//! revision, or too slow to take events as they came): unsynced watchers catch up from the
//! store's history, a bounded batch at a time, without holding writers back. A watcher whose
//! next revision was compacted away is cancelled with the compact revision.
//!
//! The apply loop only queues new events (`publish`); the hub's own task delivers them, so a
//! write never waits for its watchers, and revisions applied while a delivery is under way go
//! out together in the next one. Watchers that want the same events share one encoding of them
//! (`WatchOut::Shared`): with a thousand watchers on a prefix, each revision is encoded once,
//! not a thousand times; and those of one stream take one slot of its queue between them
//! (`Queued::Fanout`), not one each.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::sync::{mpsc, Notify};

use crate::hooks::{self, Bug};
use crate::io::Clock;
use crate::mvcc::{in_range, MvccError, MvccStore};
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::{
    RangeRequest, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::{event::EventType, Event};

/// Entries queued for one watch stream, at most (etcd: 1024 events per stream); a watcher
/// that finds the queue full falls back to catching up from history. Many watchers share a
/// stream: an entry is one response, or one delivery's responses to several of its watchers.
pub const STREAM_QUEUE: usize = 4096;
/// Bytes of responses queued for one watch stream, at most (a single response bigger than
/// this still goes out, alone): with 1 MiB values, a stream that reads slowly holds tens of
/// MiB, not GiBs; its watchers fall back to catching up from history. (At 32 MiB, 20 slow
/// streams of 1 MiB values held 640 MiB of queues.)
pub const STREAM_QUEUE_BYTES: usize = 8 << 20;
/// Revisions read from history per catch-up step of one watcher...
pub const CATCH_UP_REVISIONS: usize = 1000;
/// ...and bytes of keys and values (whole revisions, at least one).
pub const CATCH_UP_BYTES: usize = 4 << 20;
/// How often unsynced watchers are looked at even without a wake-up.
pub const CATCH_UP_INTERVAL: Duration = Duration::from_millis(100);
/// How often a watcher that asked for progress notifications gets one (etcd: 10 minutes).
pub const PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);
/// The shortest interval `--experimental-watch-progress-notify-interval` may set.
pub const MIN_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_millis(100);
/// New events queued for delivery, at most: past this, the synced watchers fall back to
/// catching up from history (which is bounded per step) rather than the queue growing.
pub const PENDING_EVENTS: usize = 4096;
/// ...or this many bytes of keys and values.
pub const PENDING_BYTES: usize = 64 << 20;
/// `WatchResponse`'s field numbers.
const HEADER_FIELD: u32 = 1;
const WATCH_ID_FIELD: u32 = 2;
const EVENTS_FIELD: u32 = 11;

fn watch_id_len(watch_id: i64) -> usize {
    if watch_id == 0 {
        0
    } else {
        prost::encoding::int64::encoded_len(WATCH_ID_FIELD, &watch_id)
    }
}

fn shared_len(header: &Bytes, watch_id: i64, events: &Bytes) -> usize {
    header.len() + watch_id_len(watch_id) + events.len()
}

/// A response from shared parts: fields in number order, as prost writes them.
fn encode_shared(header: &Bytes, watch_id: i64, events: &Bytes, buf: &mut impl bytes::BufMut) {
    buf.put_slice(header);
    if watch_id != 0 {
        prost::encoding::int64::encode(WATCH_ID_FIELD, &watch_id, buf);
    }
    buf.put_slice(events);
}

/// `header` as a response's `header` field, a part of `WatchOut::Shared` (nothing for none).
pub fn encode_header_field(header: Option<&ResponseHeader>) -> Bytes {
    let mut buf = BytesMut::new();
    if let Some(header) = header {
        prost::encoding::message::encode(HEADER_FIELD, header, &mut buf);
    }
    buf.freeze()
}

/// `events` as a response's `events` fields, a part of `WatchOut::Shared`.
pub fn encode_events_field<'a>(events: impl Iterator<Item = &'a Event>) -> Bytes {
    let mut buf = BytesMut::new();
    for event in events {
        prost::encoding::message::encode(EVENTS_FIELD, event, &mut buf);
    }
    buf.freeze()
}

pub const EMPTY_RANGE: &str = "mvcc: watcher range is empty";
pub const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// Makes response headers (cluster, member, term) for a revision.
pub type HeaderFn = Arc<dyn Fn(i64) -> ResponseHeader + Send + Sync>;

/// An event's keys and values, in bytes (what it holds in memory, about).
fn event_bytes(event: &Event) -> usize {
    let kv = |kv: &Option<crate::proto::mvccpb::KeyValue>| {
        kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len())
    };
    kv(&event.kv) + kv(&event.prev_kv)
}

/// What a watch stream's queue carries.
#[derive(Debug, Clone)]
pub enum WatchOut {
    Response(WatchResponse),
    /// A response in encoded parts shared with other watchers: its header (as the `header`
    /// field) and its events (as `events` fields); only the watch id is its own.
    Shared {
        header: Bytes,
        watch_id: i64,
        events: Bytes,
    },
}

impl From<WatchResponse> for WatchOut {
    fn from(response: WatchResponse) -> Self {
        WatchOut::Response(response)
    }
}

impl WatchOut {
    /// The length of its wire form.
    pub fn encoded_len(&self) -> usize {
        match self {
            WatchOut::Response(response) => response.encoded_len(),
            WatchOut::Shared {
                header,
                watch_id,
                events,
            } => shared_len(header, *watch_id, events),
        }
    }

    /// Its wire form, as `WatchResponse::encode` would write it (the buffer grows as needed).
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            WatchOut::Response(response) => response.encode_raw(buf),
            WatchOut::Shared {
                header,
                watch_id,
                events,
            } => encode_shared(header, *watch_id, events, buf),
        }
    }

    /// As a `WatchResponse` (the shared events decoded).
    pub fn into_response(self) -> WatchResponse {
        match self {
            WatchOut::Response(response) => response,
            WatchOut::Shared {
                header,
                watch_id,
                events,
            } => {
                let mut response = WatchResponse {
                    watch_id,
                    ..Default::default()
                };
                if let Err(e) = response.merge(header).and_then(|()| response.merge(events)) {
                    // Encoded here from decoded messages: cannot fail short of a bug.
                    tracing::error!(error = %e, "shared watch response undecodable");
                }
                response
            }
        }
    }
}

/// An entry of a watch stream's queue.
#[derive(Debug)]
pub enum Queued {
    One(WatchOut),
    /// The same shared parts for each of these watch ids, a response each, in this order.
    Fanout {
        header: Bytes,
        events: Bytes,
        watch_ids: Vec<i64>,
    },
}

impl From<WatchOut> for Queued {
    fn from(out: WatchOut) -> Self {
        Queued::One(out)
    }
}

impl From<WatchResponse> for Queued {
    fn from(response: WatchResponse) -> Self {
        Queued::One(WatchOut::Response(response))
    }
}

impl Queued {
    /// Appends its responses as gRPC messages (uncompressed, length-prefixed), a fan-out's
    /// straight from the shared parts.
    pub fn write_grpc(&self, buf: &mut BytesMut) {
        let prefix = |buf: &mut BytesMut, len: usize| {
            buf.reserve(5 + len);
            buf.put_u8(0);
            // A response is far below 4 GiB: the server's request limit bounds its values.
            buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        };
        match self {
            Queued::One(out) => {
                prefix(buf, out.encoded_len());
                out.encode(buf);
            }
            Queued::Fanout {
                header,
                events,
                watch_ids,
            } => {
                for &watch_id in watch_ids {
                    prefix(buf, shared_len(header, watch_id, events));
                    encode_shared(header, watch_id, events, buf);
                }
            }
        }
    }
}

impl Queued {
    /// The bytes it holds (a fan-out's shared parts once: its watchers share them).
    fn bytes(&self) -> usize {
        match self {
            Queued::One(out) => out.encoded_len(),
            Queued::Fanout { header, events, .. } => header.len() + events.len(),
        }
    }
}

/// The sending end of a watch stream's queue, bounded in entries (`STREAM_QUEUE`) and in
/// bytes (`STREAM_QUEUE_BYTES`).
#[derive(Clone)]
pub struct WatchSender {
    tx: mpsc::Sender<Queued>,
    /// Bytes queued and not yet taken by the receiver.
    bytes: Arc<AtomicUsize>,
}

impl WatchSender {
    /// Queues `queued` if there is room (in entries and in bytes; one entry is always let in
    /// when nothing else waits, however big).
    pub fn try_send(&self, queued: Queued) -> Result<(), mpsc::error::TrySendError<Queued>> {
        let size = queued.bytes();
        let before = self.bytes.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before + size > STREAM_QUEUE_BYTES {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(if self.tx.is_closed() {
                mpsc::error::TrySendError::Closed(queued)
            } else {
                mpsc::error::TrySendError::Full(queued)
            });
        }
        self.tx.try_send(queued).inspect_err(|_| {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
        })
    }

    /// Queues `queued`, waiting for a slot (answers that must go out: created, canceled,
    /// progress; not held to the byte bound).
    pub async fn send(&self, queued: Queued) -> Result<(), mpsc::error::SendError<Queued>> {
        let size = queued.bytes();
        self.bytes.fetch_add(size, Ordering::AcqRel);
        self.tx.send(queued).await.inspect_err(|_| {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
        })
    }

    /// Entries that may still be queued.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// The receiving end of a watch stream's queue: one response at a time (a fan-out entry
/// handed out a watcher at a time).
pub struct WatchReceiver {
    rx: mpsc::Receiver<Queued>,
    /// Shared with the sender: what is taken out is no longer queued.
    bytes: Arc<AtomicUsize>,
    /// What is left of the fan-out entry being handed out.
    fanout: Option<(Bytes, Bytes, std::vec::IntoIter<i64>)>,
}

impl WatchReceiver {
    pub async fn recv(&mut self) -> Option<WatchResponse> {
        std::future::poll_fn(|cx| self.poll_out(cx))
            .await
            .map(WatchOut::into_response)
    }

    pub fn try_recv(&mut self) -> Result<WatchResponse, mpsc::error::TryRecvError> {
        self.try_recv_out().map(WatchOut::into_response)
    }

    /// The next response as queued (shared parts unencoded), if one is there.
    pub fn try_recv_out(&mut self) -> Result<WatchOut, mpsc::error::TryRecvError> {
        loop {
            if let Some(out) = self.next_of_fanout() {
                return Ok(out);
            }
            let queued = self.rx.try_recv()?;
            self.bytes.fetch_sub(queued.bytes(), Ordering::AcqRel);
            if let Some(out) = self.take(queued) {
                return Ok(out);
            }
        }
    }

    /// The next entry as queued (what is left of a fan-out handed out in part comes first,
    /// a response at a time).
    pub fn poll_queued(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Queued>> {
        if let Some(out) = self.next_of_fanout() {
            return std::task::Poll::Ready(Some(Queued::One(out)));
        }
        let queued = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(queued) = &queued {
            self.bytes.fetch_sub(queued.bytes(), Ordering::AcqRel);
        }
        std::task::Poll::Ready(queued)
    }

    fn poll_out(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<WatchOut>> {
        loop {
            let Some(queued) = std::task::ready!(self.poll_queued(cx)) else {
                return std::task::Poll::Ready(None);
            };
            if let Some(out) = self.take(queued) {
                return std::task::Poll::Ready(Some(out));
            }
        }
    }

    /// A single response at once; a fan-out kept to be handed out.
    fn take(&mut self, queued: Queued) -> Option<WatchOut> {
        match queued {
            Queued::One(out) => Some(out),
            Queued::Fanout {
                header,
                events,
                watch_ids,
            } => {
                self.fanout = Some((header, events, watch_ids.into_iter()));
                self.next_of_fanout()
            }
        }
    }

    fn next_of_fanout(&mut self) -> Option<WatchOut> {
        let (header, events, ids) = self.fanout.as_mut()?;
        match ids.next() {
            Some(watch_id) => Some(WatchOut::Shared {
                header: header.clone(),
                watch_id,
                events: events.clone(),
            }),
            None => {
                self.fanout = None;
                None
            }
        }
    }
}

/// One response at a time, as the JSON gateway streams them.
impl tonic::codegen::tokio_stream::Stream for WatchReceiver {
    type Item = WatchOut;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<WatchOut>> {
        self.get_mut().poll_out(cx)
    }
}

struct Watcher {
    start: Vec<u8>,
    end: Vec<u8>,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// A progress notification goes out at its stream's next tick: no events were sent to it
    /// since the last tick (etcd elides the notification after an update).
    progress_due: bool,
    /// The first revision whose events it has not been sent.
    next_rev: i64,
    synced: bool,
    /// Its `created` answer has gone out: events may follow.
    ready: bool,
    tx: WatchSender,
}

impl Watcher {
    fn wants(&self, event: &Event) -> bool {
        let Some(kv) = &event.kv else { return false };
        let put = event.r#type == EventType::Put as i32;
        let filtered = if put { self.no_put } else { self.no_delete };
        !filtered && in_range(&kv.key, &self.start, &self.end)
    }
}

/// Where a delivery's events come from: the events, and the store for previous values (if
/// at hand).
#[derive(Clone, Copy)]
struct Source<'a> {
    store: Option<&'a MvccStore>,
    events: &'a [Event],
}

/// The encodings made for one delivery's events, shared by the watchers it goes to: headers
/// by revision, and events by whether previous values go with them and which were chosen
/// (indexes into the delivery's events).
#[derive(Default)]
struct Encodings {
    headers: HashMap<i64, Bytes>,
    events: [HashMap<Vec<u32>, Bytes>; 2],
}

impl Encodings {
    fn header(&mut self, make: &HeaderFn, revision: i64) -> Bytes {
        self.headers
            .entry(revision)
            .or_insert_with(|| {
                let mut buf = BytesMut::new();
                prost::encoding::message::encode(HEADER_FIELD, &make(revision), &mut buf);
                buf.freeze()
            })
            .clone()
    }

    /// A response's shared parts: the header at `header_rev` and the chosen events, encoded;
    /// `None` if previous values were asked for and the store (where they are looked up) is
    /// not at hand.
    fn parts(
        &mut self,
        make: &HeaderFn,
        source: Source<'_>,
        chosen: &[u32],
        prev_kv: bool,
        header_rev: i64,
    ) -> Option<(Bytes, Bytes)> {
        let events = self.events(source, chosen, prev_kv)?;
        Some((self.header(make, header_rev), events))
    }

    fn events(&mut self, source: Source<'_>, chosen: &[u32], prev_kv: bool) -> Option<Bytes> {
        if let Some(encoded) = self.events[usize::from(prev_kv)].get(chosen) {
            return Some(encoded.clone());
        }
        let store = if prev_kv { Some(source.store?) } else { None };
        let mut buf = BytesMut::new();
        for event in chosen.iter().filter_map(|&i| source.events.get(i as usize)) {
            match store {
                Some(store) => {
                    let mut event = event.clone();
                    event.prev_kv = previous(store, &event);
                    prost::encoding::message::encode(EVENTS_FIELD, &event, &mut buf);
                }
                None => prost::encoding::message::encode(EVENTS_FIELD, event, &mut buf),
            }
        }
        let encoded = buf.freeze();
        self.events[usize::from(prev_kv)].insert(chosen.to_vec(), encoded.clone());
        Some(encoded)
    }
}

/// What a delivery came to for one watcher, kept for the next: watchers alike (same range,
/// filters and next revision, as a prefix's watchers usually are) come to the same.
struct Outcome {
    start: Vec<u8>,
    end: Vec<u8>,
    no_put: bool,
    no_delete: bool,
    from_rev: i64,
    /// The events it is sent (indexes into the delivery's), its new next revision, and
    /// whether history must fill a gap after them.
    chosen: Vec<u32>,
    next: i64,
    gap: bool,
    /// The response's shared parts, without and with previous values, once made.
    parts: [Option<(Bytes, Bytes)>; 2],
}

impl Outcome {
    fn fits(&self, watcher: &Watcher) -> bool {
        self.from_rev == watcher.next_rev
            && self.no_put == watcher.no_put
            && self.no_delete == watcher.no_delete
            && self.start == watcher.start
            && self.end == watcher.end
    }
}

/// A delivery's responses to the watchers of one stream that get the same parts, gathered
/// to go on its queue as one entry; each member's next revision before this delivery is kept
/// in case the queue refuses them.
struct Fanout {
    stream: u64,
    tx: WatchSender,
    header: Bytes,
    events: Bytes,
    /// (watch id, next revision before).
    members: Vec<(i64, i64)>,
}

impl Fanout {
    fn new(stream: u64, watcher: &Watcher, header: &Bytes, events: &Bytes) -> Self {
        Fanout {
            stream,
            tx: watcher.tx.clone(),
            header: header.clone(),
            events: events.clone(),
            members: Vec::new(),
        }
    }

    /// The very same encodings (a delivery shares one of each among its watchers).
    fn carries(&self, header: &Bytes, events: &Bytes) -> bool {
        let same = |a: &Bytes, b: &Bytes| a.as_ptr() == b.as_ptr() && a.len() == b.len();
        same(&self.header, header) && same(&self.events, events)
    }

    /// Queues it; a refusal is added to `refused` for each member: (its key, its next
    /// revision before, whether the stream is closed rather than full).
    fn send(self, refused: &mut Vec<((u64, i64), i64, bool)>) {
        let watch_ids = self.members.iter().map(|&(id, _)| id).collect();
        let queued = Queued::Fanout {
            header: self.header,
            events: self.events,
            watch_ids,
        };
        let closed = match send(&self.tx, queued) {
            Sent::Yes => return,
            Sent::Full => false,
            Sent::Closed => true,
        };
        for (watch_id, next_rev) in self.members {
            refused.push(((self.stream, watch_id), next_rev, closed));
        }
    }
}

#[derive(Default)]
struct HubState {
    /// By (stream, watch id).
    watchers: BTreeMap<(u64, i64), Watcher>,
    next_stream: u64,
    /// Streams opened and not closed yet.
    open_streams: usize,
    /// Which watchers want which keys, for a delivery to visit only the watchers its events
    /// concern (`None` once a watcher was added or removed: rebuilt at the next delivery).
    index: Option<RangeIndex>,
    /// The revision after the last delivered to the synced watchers (0: not known since they
    /// were all sent to catch up). A synced watcher that no delivery visited wanted nothing
    /// before it: its next revision is at least this (see `effective_next`).
    synced_next: i64,
    /// Whether some watcher may be ready and not synced: a catch-up pass is due.
    maybe_unsynced: bool,
    /// Each open stream's next progress tick (clock ms). As etcd's, a stream's ticks start
    /// when it opens, every interval plus a jitter of up to a tenth of it, fixed per stream.
    ticks: HashMap<u64, u64>,
    /// The same, by time: (tick, stream).
    tick_order: BTreeSet<(u64, u64)>,
    /// `--experimental-watch-progress-notify-interval`, in ms (0 until `run` sets it).
    progress_interval_ms: u64,
}

impl HubState {
    /// Sets (or with `None` removes) a stream's next tick.
    fn set_tick(&mut self, stream: u64, at: Option<u64>) {
        if let Some(old) = self.ticks.remove(&stream) {
            self.tick_order.remove(&(old, stream));
        }
        if let Some(at) = at {
            self.ticks.insert(stream, at);
            self.tick_order.insert((at, stream));
        }
    }

    /// The time between a stream's ticks: the interval plus its jitter (from the stream's
    /// id, so that a simulated run stays deterministic).
    fn tick_period_ms(&self, stream: u64) -> u64 {
        let interval = match self.progress_interval_ms {
            0 => PROGRESS_NOTIFY_INTERVAL.as_millis() as u64,
            ms => ms,
        };
        let jitter = (interval / 10).max(1);
        interval + stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) % jitter
    }

    /// Watchers were added or removed.
    fn changed(&mut self) {
        self.index = None;
    }

    /// Sends every synced watcher to catch up from history, from where it really is.
    fn unsync_all(&mut self) {
        let synced_next = self.synced_next;
        for watcher in self.watchers.values_mut() {
            watcher.next_rev = effective_next(watcher, synced_next);
            watcher.synced = false;
        }
        self.synced_next = 0;
        self.maybe_unsynced = true;
    }
}

/// The next revision a watcher is to be sent: a synced one has been offered every revision
/// before the hub's `synced_next`, even if no delivery had events for it.
fn effective_next(watcher: &Watcher, synced_next: i64) -> i64 {
    if watcher.synced {
        watcher.next_rev.max(synced_next)
    } else {
        watcher.next_rev
    }
}

/// A watcher's place in the hub: (stream, watch id).
type WatcherKey = (u64, i64);

/// The watchers of one range: its start, its end, and who.
type RangeGroup = (Vec<u8>, Vec<u8>, Vec<WatcherKey>);

/// The watchers by what they watch: one key (a hash map) or a range (each distinct range once).
#[derive(Default)]
struct RangeIndex {
    by_key: HashMap<Vec<u8>, Vec<WatcherKey>>,
    by_range: Vec<RangeGroup>,
    any_prev_kv: bool,
}

impl RangeIndex {
    fn build(watchers: &BTreeMap<(u64, i64), Watcher>) -> RangeIndex {
        let mut index = RangeIndex::default();
        let mut ranges: BTreeMap<(&[u8], &[u8]), Vec<WatcherKey>> = BTreeMap::new();
        for (key, watcher) in watchers {
            index.any_prev_kv |= watcher.prev_kv;
            if watcher.end.is_empty() {
                index
                    .by_key
                    .entry(watcher.start.clone())
                    .or_default()
                    .push(*key);
            } else {
                ranges
                    .entry((&watcher.start, &watcher.end))
                    .or_default()
                    .push(*key);
            }
        }
        index.by_range = ranges
            .into_iter()
            .map(|((start, end), members)| (start.to_vec(), end.to_vec(), members))
            .collect();
        index
    }

    /// The watchers whose key or range holds one of `events`' keys, in (stream, id) order;
    /// `None` when that is every watcher (of `total`).
    fn concerned(&self, events: &[Event], total: usize) -> Option<BTreeSet<(u64, i64)>> {
        let mut groups: Vec<&[(u64, i64)]> = Vec::new();
        let mut keys_seen: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        for event in events {
            let Some(kv) = &event.kv else { continue };
            if let Some(members) = self.by_key.get(&kv.key) {
                if keys_seen.insert(&kv.key) {
                    groups.push(members);
                }
            }
        }
        for (start, end, members) in &self.by_range {
            let any = events.iter().any(|e| {
                e.kv.as_ref()
                    .is_some_and(|kv| in_range(&kv.key, start, end))
            });
            if any {
                groups.push(members);
            }
        }
        // Each watcher is in one group only.
        if groups.iter().map(|g| g.len()).sum::<usize>() >= total {
            return None;
        }
        Some(groups.into_iter().flatten().copied().collect())
    }
}

/// Events applied but not yet delivered to the synced watchers, in revision order. A lock of
/// its own: the apply loop queues events without waiting for a fan-out in progress, which holds
/// the hub's state (lock order: the state, then this).
#[derive(Default)]
struct Pending {
    events: Vec<Event>,
    /// Their keys' and values' bytes.
    bytes: usize,
    /// Events were dropped for want of room: the synced watchers must catch up from history.
    overflowed: bool,
}

#[derive(Clone)]
pub struct WatchHub {
    store: Arc<RwLock<MvccStore>>,
    state: Arc<Mutex<HubState>>,
    pending: Arc<Mutex<Pending>>,
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

fn send(tx: &WatchSender, response: impl Into<Queued>) -> Sent {
    match tx.try_send(response.into()) {
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
            pending: Arc::default(),
            wake: Arc::new(Notify::new()),
            header,
            clock,
            max_response_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queued events, taken for delivery under the state's lock (so that deliveries stay
    /// in order); `None` when they overflowed, after marking every watcher to catch up.
    fn take_pending(&self, state: &mut HubState) -> Option<Vec<Event>> {
        let mut pending = self.lock_pending();
        let events = std::mem::take(&mut pending.events);
        pending.bytes = 0;
        if std::mem::take(&mut pending.overflowed) {
            drop(pending);
            state.unsync_all();
            self.wake.notify_one();
            return None;
        }
        Some(events)
    }

    fn read_store(&self) -> std::sync::RwLockReadGuard<'_, MvccStore> {
        self.store.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A new watch stream: its id and where its responses arrive.
    pub fn open_stream(&self) -> (u64, WatchSender, WatchReceiver) {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let bytes = Arc::new(AtomicUsize::new(0));
        let now = self.clock.now_ms();
        let mut state = self.lock();
        state.next_stream += 1;
        state.open_streams += 1;
        let stream = state.next_stream;
        let tick = now + state.tick_period_ms(stream);
        state.set_tick(stream, Some(tick));
        let rx = WatchReceiver {
            rx,
            bytes: bytes.clone(),
            fanout: None,
        };
        (state.next_stream, WatchSender { tx, bytes }, rx)
    }

    pub fn close_stream(&self, stream: u64) {
        let mut state = self.lock();
        state.watchers.retain(|(s, _), _| *s != stream);
        state.changed();
        state.set_tick(stream, None);
        state.open_streams = state.open_streams.saturating_sub(1);
        drop(state);
        self.update_publishing();
    }

    /// Open streams and their watchers, for the metrics.
    /// Bytes queued to the streams that have watchers, and events waiting for delivery.
    pub fn memory_bytes(&self) -> usize {
        let state = self.lock();
        let mut streams = std::collections::BTreeMap::new();
        for ((stream, _), watcher) in &state.watchers {
            streams
                .entry(*stream)
                .or_insert_with(|| watcher.tx.queued_bytes());
        }
        drop(state);
        self.lock_pending().bytes + streams.values().sum::<usize>()
    }

    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.open_streams, state.watchers.len())
    }

    /// Registers a watcher; the answer (`created`, or `created` and `canceled` with a reason)
    /// must be sent before `activate` lets events follow it.
    pub fn create(&self, stream: u64, tx: &WatchSender, req: &WatchCreateRequest) -> WatchResponse {
        // Lock order, everywhere: the store, then the hub.
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        let current = store.current_rev();
        let mut state = self.lock();
        // As etcd 3.4: a watcher it refuses is named -1.
        let refused = |reason: &str| WatchResponse {
            header: Some((self.header)(current)),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        if !req.range_end.is_empty() && req.range_end != [0] && req.key >= req.range_end {
            return refused(EMPTY_RANGE);
        }
        let watch_id = if req.watch_id != 0 {
            if state.watchers.contains_key(&(stream, req.watch_id)) {
                return refused(DUPLICATE_ID);
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
                progress_due: req.progress_notify,
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
        state.changed();
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
        let mut state = self.lock();
        if let Some(watcher) = state.watchers.get_mut(&(stream, watch_id)) {
            watcher.ready = true;
            state.maybe_unsynced = true;
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Removes a watcher; `false` if there was none.
    pub fn cancel(&self, stream: u64, watch_id: i64) -> bool {
        let removed = {
            let mut state = self.lock();
            state.changed();
            state.watchers.remove(&(stream, watch_id)).is_some()
        };
        self.update_publishing();
        removed
    }

    fn update_publishing(&self) {
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        let any = !self.lock().watchers.is_empty();
        store.set_publish_events(any);
    }

    /// Answers one request of watch stream `stream` as etcd's Watch service does; `may_watch`
    /// checks a create against the caller's permissions (`Err`: the reason it is refused).
    /// `false` once the stream's client has gone.
    pub async fn answer(
        &self,
        stream: u64,
        tx: &WatchSender,
        request: WatchRequest,
        may_watch: impl FnOnce(&WatchCreateRequest) -> Result<(), String>,
    ) -> bool {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => match may_watch(&create) {
                Err(reason) => {
                    // As etcd: created and canceled at once, with the reason.
                    let mut refused = self.progress(stream);
                    refused.watch_id = -1;
                    refused.created = true;
                    refused.canceled = true;
                    refused.cancel_reason = reason;
                    tx.send(refused.into()).await.is_ok()
                }
                Ok(()) => {
                    let created = self.create(stream, tx, &create);
                    let (watch_id, ok) = (created.watch_id, !created.canceled);
                    let sent = tx.send(created.into()).await.is_ok();
                    if ok {
                        self.activate(stream, watch_id);
                    }
                    sent
                }
            },
            // As etcd: a cancel of an unknown watch gets no answer.
            Some(RequestUnion::CancelRequest(cancel)) if self.cancel(stream, cancel.watch_id) => {
                let mut canceled = self.progress(stream);
                canceled.watch_id = cancel.watch_id;
                canceled.canceled = true;
                tx.send(canceled.into()).await.is_ok()
            }
            Some(RequestUnion::CancelRequest(_)) => true,
            Some(RequestUnion::ProgressRequest(_)) => {
                tx.send(self.progress(stream).into()).await.is_ok()
            }
            None => true,
        }
    }

    /// Is `other` this very hub (the same member's, not one restarted since)?
    pub fn same_as(&self, other: &WatchHub) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// A progress answer for the stream (`RequestProgress`): every event up to the revision it
    /// names has been sent on this stream.
    pub fn progress(&self, stream: u64) -> WatchResponse {
        self.deliver_pending();
        let current = self.read_store().current_rev();
        let state = self.lock();
        // A watcher has been sent, or did not want, every event before its next revision.
        let delivered = state
            .watchers
            .iter()
            .filter(|((s, _), _)| *s == stream)
            .map(|(_, w)| effective_next(w, state.synced_next) - 1)
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
        let mut state = self.lock();
        *self.lock_pending() = Pending::default();
        state.unsync_all();
        self.wake.notify_one();
    }

    /// New revisions' events, in order, from the apply loop: queued for the hub's task
    /// (`deliver_pending`), which sends them on. Past `PENDING_EVENTS` the queue is dropped and
    /// the synced watchers catch up from history instead.
    pub fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let bytes: usize = events.iter().map(event_bytes).sum();
        let mut pending = self.lock_pending();
        if pending.overflowed
            || pending.events.len() + events.len() > PENDING_EVENTS
            || pending.bytes + bytes > PENDING_BYTES
        {
            *pending = Pending {
                overflowed: true,
                ..Pending::default()
            };
        } else {
            pending.events.extend(events);
            pending.bytes += bytes;
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Sends the queued events on: each synced watcher gets those it wants in one response
    /// (whole revisions, in order); one that cannot take them falls back to catching up.
    pub fn deliver_pending(&self) {
        // The store (lock order: the store, then the hub) only for previous values: a
        // delivery without it does not hold up the apply loop's writes.
        {
            let pending = self.lock_pending();
            if pending.events.is_empty() && !pending.overflowed {
                return;
            }
        }
        let wants_prev = {
            let mut state = self.lock();
            let state = &mut *state;
            state
                .index
                .get_or_insert_with(|| RangeIndex::build(&state.watchers))
                .any_prev_kv
        };
        let store = wants_prev.then(|| self.read_store());
        let mut state = self.lock();
        let Some(events) = self.take_pending(&mut state) else {
            return;
        };
        if events.is_empty() {
            return;
        }
        let state = &mut *state;
        let total = state.watchers.len();
        let concerned = state
            .index
            .get_or_insert_with(|| RangeIndex::build(&state.watchers))
            .concerned(&events, total);
        let synced_next = state.synced_next;
        state.synced_next = events.last().map_or(synced_next, |e| mod_rev(e) + 1);
        let source = Source {
            store: store.as_deref(),
            events: &events,
        };
        let mut encodings = Encodings::default();
        let mut last: Option<Outcome> = None;
        let mut group: Option<Fanout> = None;
        let mut refused = Vec::new();
        let mut closed = Vec::new();
        let mut fell_behind = false;
        let mut visit = |key: &(u64, i64), watcher: &mut Watcher| {
            if !(watcher.ready && watcher.synced) {
                return;
            }
            watcher.next_rev = watcher.next_rev.max(synced_next);
            let mut outcome = match last.take() {
                Some(outcome) if outcome.fits(watcher) => outcome,
                _ => outcome_for(watcher, &events),
            };
            let slot = usize::from(watcher.prev_kv);
            if outcome.parts[slot].is_none() && !outcome.chosen.is_empty() {
                let (chosen, header_rev) = (&outcome.chosen, outcome.next - 1);
                outcome.parts[slot] =
                    encodings.parts(&self.header, source, chosen, watcher.prev_kv, header_rev);
            }
            let sent = match &outcome.parts[slot] {
                _ if outcome.chosen.is_empty() => Sent::Yes,
                // Sent with the stream's other watchers that get the same (see `Fanout`).
                Some((header, events)) if !watcher.fragment => {
                    let joins = group
                        .as_ref()
                        .is_some_and(|g| g.stream == key.0 && g.carries(header, events));
                    if !joins {
                        if let Some(full) = group.take() {
                            full.send(&mut refused);
                        }
                        group = Some(Fanout::new(key.0, watcher, header, events));
                    }
                    if let Some(group) = group.as_mut() {
                        group.members.push((key.1, watcher.next_rev));
                    }
                    Sent::Yes
                }
                Some((header, events)) => {
                    let parts = (header.clone(), events.clone(), outcome.chosen.len());
                    self.deliver((key.1, watcher), parts)
                }
                // It became synced after this delivery started without the store: it reads
                // the previous values with the events from history.
                None => Sent::Full,
            };
            match sent {
                Sent::Yes => {
                    watcher.next_rev = outcome.next;
                    watcher.progress_due &= outcome.chosen.is_empty();
                    if outcome.gap {
                        watcher.synced = false;
                        fell_behind = true;
                    }
                }
                Sent::Full => {
                    watcher.synced = false;
                    fell_behind = true;
                }
                Sent::Closed => closed.push(*key),
            }
            last = Some(outcome);
        };
        // Only the watchers the events concern: the others, synced, wanted none of them and
        // are at `synced_next` now without being touched. When they concern all or most
        // watchers (one prefix watched by all), a walk over them all is cheaper than lookups.
        match concerned {
            None => {
                for (key, watcher) in state.watchers.iter_mut() {
                    visit(key, watcher);
                }
            }
            Some(concerned) if concerned.len() * 2 >= total => {
                for (key, watcher) in state.watchers.iter_mut() {
                    if concerned.contains(key) {
                        visit(key, watcher);
                    }
                }
            }
            Some(concerned) => {
                for key in &concerned {
                    if let Some(watcher) = state.watchers.get_mut(key) {
                        visit(key, watcher);
                    }
                }
            }
        }
        if let Some(full) = group.take() {
            full.send(&mut refused);
        }
        // The members of a fan-out its stream's queue refused: as if each had been refused.
        for (key, next_rev, stream_closed) in refused {
            if stream_closed {
                closed.push(key);
            } else if let Some(watcher) = state.watchers.get_mut(&key) {
                watcher.next_rev = next_rev;
                watcher.synced = false;
                fell_behind = true;
            }
        }
        if !closed.is_empty() {
            state.changed();
        }
        for key in closed {
            state.watchers.remove(&key);
        }
        if fell_behind {
            state.maybe_unsynced = true;
            self.wake.notify_one();
        }
    }

    /// Sends the chosen events (with previous values if asked for) to one watcher, in
    /// fragments if it allows them and they are large.
    fn deliver(
        &self,
        (watch_id, watcher): (i64, &Watcher),
        (header, events, count): (Bytes, Bytes, usize),
    ) -> Sent {
        let shared = WatchOut::Shared {
            header,
            watch_id,
            events,
        };
        if !watcher.fragment {
            return send(&watcher.tx, shared);
        }
        let whole = shared.into_response();
        if whole.encoded_len() <= self.max_response_bytes {
            return send(&watcher.tx, whole);
        }
        // Fragments: all but the last marked, each under the size (at least one event).
        if watcher.tx.capacity() < count {
            return Sent::Full;
        }
        let response = |events: Vec<Event>, fragment: bool| WatchResponse {
            header: whole.header,
            watch_id,
            events,
            fragment,
            ..Default::default()
        };
        let mut parts: Vec<Vec<Event>> = vec![Vec::new()];
        let mut size = 0;
        for event in whole.events.iter().cloned() {
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
        // Nothing to catch up (the common case, at every wake): no pass over every watcher.
        if !self.lock().maybe_unsynced {
            return;
        }
        let store = self.read_store();
        let current = store.current_rev();
        let compacted = store.compact_rev();
        let mut state = self.lock();
        let mut done = Vec::new();
        // Watchers that fell behind together (a stream's, say) read the history once, and
        // share the encoding of what they want of it.
        let mut read: HashMap<HistoryRead, (Vec<Event>, i64, Encodings)> = HashMap::new();
        for (key, watcher) in state.watchers.iter_mut() {
            if !watcher.ready || watcher.synced {
                continue;
            }
            let from = (
                watcher.next_rev,
                watcher.start.as_slice(),
                watcher.end.as_slice(),
            );
            let found = match read.entry(from) {
                Entry::Occupied(found) => Ok(found.into_mut()),
                Entry::Vacant(slot) => store
                    .events_since(from.0, from.1, from.2, CATCH_UP_REVISIONS, CATCH_UP_BYTES)
                    .map(|(events, next)| slot.insert((events, next, Encodings::default()))),
            };
            let (events, next, encodings) = match found {
                Ok(found) => found,
                Err(MvccError::Compacted) => {
                    // As etcd 3.4 answers it: the compacted revision, no reason, and a header
                    // without a revision.
                    let canceled = WatchResponse {
                        header: Some((self.header)(0)),
                        watch_id: key.1,
                        canceled: true,
                        compact_revision: compacted,
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
            let mut chosen: Vec<u32> = (0..events.len())
                .filter(|&i| watcher.wants(&events[i]))
                .map(|i| i as u32)
                .collect();
            if hooks::injected(Bug::WatchOutOfOrder) {
                chosen.reverse();
            }
            let sent = if chosen.is_empty() {
                Sent::Yes
            } else {
                let source = Source {
                    store: Some(&store),
                    events,
                };
                match encodings.parts(&self.header, source, &chosen, watcher.prev_kv, current) {
                    Some((header, events)) => {
                        self.deliver((key.1, watcher), (header, events, chosen.len()))
                    }
                    None => Sent::Full, // Not so: the store is at hand.
                }
            };
            match sent {
                Sent::Yes => {
                    watcher.next_rev = *next;
                    watcher.synced = *next > current;
                    watcher.progress_due &= chosen.is_empty();
                }
                Sent::Full => {}
                Sent::Closed => done.push(*key),
            }
        }
        let more = state.watchers.values().any(|w| w.ready && !w.synced);
        state.maybe_unsynced = more;
        if !done.is_empty() {
            state.changed();
        }
        for key in done {
            state.watchers.remove(&key);
        }
        drop(state);
        drop(store);
        if more {
            self.wake.notify_one();
        }
    }

    /// At each stream's tick, as etcd 3.4: each of its watchers that asked for progress
    /// notifications and was sent no events since the last tick is sent an empty response
    /// naming the current revision, if it is synced (it has seen every event up to it).
    fn notify_progress(&self) {
        let now = self.clock.now_ms();
        let is_due = |state: &HubState| state.tick_order.first().is_some_and(|(at, _)| *at <= now);
        if !is_due(&self.lock()) {
            return;
        }
        self.deliver_pending();
        let mut state = self.lock();
        let mut due = Vec::new();
        while is_due(&state) {
            let Some((at, stream)) = state.tick_order.first().copied() else {
                break;
            };
            // A tick missed is dropped, as Go's ticker drops it.
            let period = state.tick_period_ms(stream);
            let next = if at + period <= now {
                now + period
            } else {
                at + period
            };
            state.set_tick(stream, Some(next));
            due.push(stream);
        }
        let synced_next = state.synced_next;
        for stream in due {
            for ((_, watch_id), watcher) in state
                .watchers
                .range_mut((stream, i64::MIN)..=(stream, i64::MAX))
            {
                if !watcher.progress_notify {
                    continue;
                }
                if watcher.progress_due && watcher.synced {
                    let _ = send(
                        &watcher.tx,
                        WatchResponse {
                            header: Some((self.header)(effective_next(watcher, synced_next) - 1)),
                            watch_id: *watch_id,
                            ..Default::default()
                        },
                    );
                }
                watcher.progress_due = true;
            }
        }
    }

    /// Catches unsynced watchers up (when woken, and every `CATCH_UP_INTERVAL`) and sends
    /// progress notifications, until `stopped` says the member stopped.
    pub async fn run(self, stopped: impl Fn() -> bool, progress_interval: Duration) {
        let progress_interval = progress_interval.max(MIN_PROGRESS_NOTIFY_INTERVAL);
        {
            let mut state = self.lock();
            state.progress_interval_ms = progress_interval.as_millis() as u64;
            // Streams opened before this (none in a member, which starts this first) tick
            // from now.
            let now = self.clock.now_ms();
            let streams: Vec<u64> = state.ticks.keys().copied().collect();
            for stream in streams {
                let tick = now + state.tick_period_ms(stream);
                state.set_tick(stream, Some(tick));
            }
        }
        while !stopped() {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = self.clock.sleep(CATCH_UP_INTERVAL) => {}
            }
            self.deliver_pending();
            self.catch_up();
            // Give writers a turn between passes of a long catch-up.
            tokio::task::yield_now().await;
            self.notify_progress();
        }
    }
}

/// Which of a delivery's events a synced watcher is sent: every whole revision it is due, in
/// order, up to a gap (history fills it).
fn outcome_for(watcher: &Watcher, events: &[Event]) -> Outcome {
    let mut chosen = Vec::new();
    let mut next = watcher.next_rev;
    let mut gap = false;
    let mut at = 0;
    for revision in events.chunk_by(|a, b| mod_rev(a) == mod_rev(b)) {
        let first = at;
        at += revision.len();
        let rev = mod_rev(&revision[0]);
        if rev < next {
            continue;
        }
        if rev > next {
            gap = true;
            break;
        }
        chosen.extend(
            (first..at)
                .filter(|&i| watcher.wants(&events[i]))
                .map(|i| i as u32),
        );
        next = rev + 1;
    }
    Outcome {
        start: watcher.start.clone(),
        end: watcher.end.clone(),
        no_put: watcher.no_put,
        no_delete: watcher.no_delete,
        from_rev: watcher.next_rev,
        chosen,
        next,
        gap,
        parts: [None, None],
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
    // As etcd: a put that created its key has no previous value, even when a transaction
    // deleted the key earlier in the same revision.
    let created = event.r#type == crate::proto::mvccpb::event::EventType::Put as i32
        && kv.create_revision == kv.mod_revision;
    if kv.mod_revision <= 1 || created {
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
