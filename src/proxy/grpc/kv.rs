//! KV through the proxy. Writes and linearizable reads go upstream. Serializable reads of the
//! current revision are answered from a cache when it can: the cache follows every change of
//! the cluster through one upstream watcher of the whole key space, which removes an answer as
//! soon as an event touches its range. An answer is served only while that watcher has
//! delivered everything up to the newest revision the proxy has shown any client, and it
//! carries that revision: a client never sees a revision older than one it saw through the
//! proxy.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use super::forward::{pass, upstream_call};
use super::metrics::ProxyMetrics;
use super::upstream::{carry, endpoint_gone, Upstream};
use crate::mvcc::in_range;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::*;

/// Cached answers, at most (etcd's proxy keeps 2048 too).
pub const CACHE_ENTRIES: usize = 2048;
/// An answer larger than this is not cached.
const CACHE_ENTRY_BYTES: usize = 1 << 20;

struct Entry {
    key: Vec<u8>,
    range_end: Vec<u8>,
    response: RangeResponse,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<Vec<u8>, Entry>,
    /// Entries of one key, by that key; the rest (ranges) are scanned.
    by_key: HashMap<Vec<u8>, Vec<Vec<u8>>>,
    ranges: Vec<Vec<u8>>,
    order: VecDeque<Vec<u8>>,
    /// Every event up to this revision has reached the cache (0: not following).
    through: i64,
}

pub struct RangeCache {
    state: Mutex<CacheState>,
    seen: Arc<AtomicI64>,
    metrics: Arc<ProxyMetrics>,
}

impl RangeCache {
    pub fn new(up: Arc<Upstream>, seen: Arc<AtomicI64>, metrics: Arc<ProxyMetrics>) -> Arc<Self> {
        let cache = Arc::new(RangeCache {
            state: Mutex::new(CacheState::default()),
            seen,
            metrics,
        });
        tokio::spawn(cache.clone().follow(up));
        cache
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache's key for a request: the request and the caller's token (answers differ by
    /// permission).
    fn cache_key<T>(request: &RangeRequest, from: &Request<T>) -> Vec<u8> {
        let mut key = request.encode_to_vec();
        for name in [crate::api::TOKEN_METADATA, crate::api::AUTHORIZATION] {
            if let Some(token) = from.metadata().get(name) {
                key.extend_from_slice(token.as_bytes());
            }
        }
        key
    }

    fn cacheable(request: &RangeRequest) -> bool {
        request.serializable && request.revision == 0
    }

    fn get(&self, cache_key: &[u8]) -> Option<RangeResponse> {
        let state = self.lock();
        let seen = self.seen.load(Ordering::Relaxed);
        if state.through == 0 || state.through < seen {
            return None;
        }
        let entry = state.entries.get(cache_key)?;
        let mut response = entry.response.clone();
        if let Some(header) = response.header.as_mut() {
            header.revision = header.revision.max(state.through);
        }
        Some(response)
    }

    /// Keeps an answer, unless an event newer than it has passed (its range may have changed).
    fn put(&self, cache_key: Vec<u8>, request: &RangeRequest, response: &RangeResponse) {
        if response.encoded_len() > CACHE_ENTRY_BYTES {
            return;
        }
        let revision = response.header.map(|h| h.revision).unwrap_or(0);
        let mut state = self.lock();
        if state.through == 0 || revision < state.through {
            return;
        }
        if state.entries.contains_key(&cache_key) {
            return;
        }
        while state.entries.len() >= CACHE_ENTRIES {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            Self::remove(&mut state, &oldest);
        }
        if request.range_end.is_empty() {
            state
                .by_key
                .entry(request.key.clone())
                .or_default()
                .push(cache_key.clone());
        } else {
            state.ranges.push(cache_key.clone());
        }
        state.order.push_back(cache_key.clone());
        state.entries.insert(
            cache_key,
            Entry {
                key: request.key.clone(),
                range_end: request.range_end.clone(),
                response: response.clone(),
            },
        );
        if state.order.len() > 2 * CACHE_ENTRIES {
            // Names of entries an event removed since: drop them, and repeats.
            let CacheState { order, entries, .. } = &mut *state;
            let mut kept = std::collections::HashSet::new();
            order.retain(|k| entries.contains_key(k) && kept.insert(k.clone()));
        }
        self.metrics.cache_keys.set(state.entries.len() as i64);
    }

    fn remove(state: &mut CacheState, cache_key: &[u8]) {
        let Some(entry) = state.entries.remove(cache_key) else {
            return;
        };
        if entry.range_end.is_empty() {
            if let Some(keys) = state.by_key.get_mut(&entry.key) {
                keys.retain(|k| k != cache_key);
                if keys.is_empty() {
                    state.by_key.remove(&entry.key);
                }
            }
        } else {
            state.ranges.retain(|k| k != cache_key);
        }
        // `order` keeps stale names; popping one that is gone removes nothing.
    }

    /// An event on `key`: every answer whose range holds it goes.
    fn invalidate(state: &mut CacheState, key: &[u8]) {
        if let Some(keys) = state.by_key.remove(key) {
            for cache_key in keys {
                state.entries.remove(&cache_key);
            }
        }
        if state.ranges.is_empty() {
            return;
        }
        let gone: Vec<Vec<u8>> = state
            .ranges
            .iter()
            .filter(|k| {
                state
                    .entries
                    .get(*k)
                    .is_some_and(|e| in_range(key, &e.key, &e.range_end))
            })
            .cloned()
            .collect();
        for cache_key in gone {
            Self::remove(state, &cache_key);
        }
    }

    fn clear(&self) {
        let mut state = self.lock();
        *state = CacheState::default();
        self.metrics.cache_keys.set(0);
    }

    /// Follows the whole key space from upstream, for as long as the proxy runs.
    async fn follow(self: Arc<Self>, up: Arc<Upstream>) {
        loop {
            self.clear();
            let link = match up.link().await {
                Ok(link) => link,
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: vec![0],
                    range_end: vec![0],
                    ..Default::default()
                })),
            });
            let mut client =
                WatchClient::new(link.channel).max_decoding_message_size(up.max_recv_bytes);
            let ended = match client.watch(UnboundedReceiverStream::new(rx)).await {
                Ok(answers) => {
                    let mut answers = answers.into_inner();
                    loop {
                        match answers.message().await {
                            Ok(Some(response)) => {
                                if !self.follow_one(response) {
                                    break Ok(());
                                }
                            }
                            Ok(None) => break Ok(()),
                            Err(status) => break Err(status),
                        }
                    }
                }
                Err(status) => Err(status),
            };
            drop(tx);
            // Not following any more: nothing is answered from the cache from now on.
            self.clear();
            if let Err(status) = ended {
                if endpoint_gone(&status) {
                    up.failed(link.generation);
                }
                tracing::debug!(error = %status, "the range cache's watch ended; following again");
            }
            // Also after a refusal (auth on, and the proxy has no token): try again gently.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One answer of the cache's watcher; `false`: it ended.
    fn follow_one(&self, response: WatchResponse) -> bool {
        let revision = response.header.map(|h| h.revision).unwrap_or(0);
        let mut state = self.lock();
        if response.canceled {
            return false;
        }
        if response.created {
            state.through = revision;
            return true;
        }
        for event in &response.events {
            if let Some(kv) = &event.kv {
                Self::invalidate(&mut state, &kv.key);
                state.through = state.through.max(kv.mod_revision);
            }
        }
        if response.events.is_empty() {
            state.through = state.through.max(revision);
        }
        self.metrics.cache_keys.set(state.entries.len() as i64);
        true
    }
}

/// The KV service of the proxy.
#[derive(Clone)]
pub struct ProxyKv {
    pub up: Arc<Upstream>,
    pub cache: Arc<RangeCache>,
    pub seen: Arc<AtomicI64>,
}

impl ProxyKv {
    fn saw(&self, header: &Option<ResponseHeader>) {
        if let Some(h) = header {
            self.seen.fetch_max(h.revision, Ordering::Relaxed);
        }
    }
}

pass! { Kv, ProxyKv, KvClient;
    [
        put(PutRequest) -> PutResponse, false;
        delete_range(DeleteRangeRequest) -> DeleteRangeResponse, false;
        txn(TxnRequest) -> TxnResponse, false;
        compact(CompactionRequest) -> CompactionResponse, false;
    ]
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let cacheable = RangeCache::cacheable(request.get_ref());
        let cache_key = cacheable.then(|| RangeCache::cache_key(request.get_ref(), &request));
        if let Some(cache_key) = &cache_key {
            if let Some(response) = self.cache.get(cache_key) {
                self.cache.metrics.cache_hits.inc();
                return Ok(Response::new(response));
            }
            self.cache.metrics.cache_misses.inc();
        }
        let message = request.get_ref().clone();
        let answer: Result<Response<RangeResponse>, Status> =
            upstream_call!(self.up, request, KvClient, range, true);
        let answer = answer?;
        if let Some(cache_key) = cache_key {
            self.cache.put(cache_key, &message, answer.get_ref());
        }
        self.saw(&answer.get_ref().header);
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_keys_as_etcd_reads_them() {
        assert!(in_range(b"a", b"a", b""));
        assert!(!in_range(b"ab", b"a", b""));
        assert!(in_range(b"ab", b"a", b"b"));
        assert!(!in_range(b"b", b"a", b"b"));
        assert!(in_range(b"zzz", b"a", &[0]));
        assert!(in_range(b"a", &[0], &[0]));
    }
}
