//! The proxy's read cache. Serializable reads of the current revision are answered from it
//! when it can: it follows every change of the cluster through one upstream watcher of the
//! whole key space, which removes an answer as soon as an event touches its range. An answer
//! is served only while that watcher has delivered everything up to the newest revision the
//! proxy has shown any client, and it carries that revision: a client never sees a revision
//! older than one it saw through the proxy. An upstream answer older than that (a member
//! behind the others, after a failover) is asked again as a linearizable read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::metrics::ProxyMetrics;
use super::port::{identity_of, ClusterPort};
use crate::hooks::{self, Bug};
use crate::mvcc::in_range;
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
    up: Arc<dyn ClusterPort>,
    /// The newest revision the proxy has shown a client (shared with the watch broker and the
    /// services passed through).
    pub seen: Arc<AtomicI64>,
    pub metrics: Arc<ProxyMetrics>,
}

impl RangeCache {
    pub fn new(
        up: Arc<dyn ClusterPort>,
        seen: Arc<AtomicI64>,
        metrics: Arc<ProxyMetrics>,
    ) -> Arc<Self> {
        let cache = Arc::new(RangeCache {
            state: Mutex::new(CacheState::default()),
            up,
            seen,
            metrics,
        });
        tokio::spawn(cache.clone().follow());
        cache
    }

    /// A range read through the proxy: from the cache when it can, otherwise upstream (and
    /// kept). `credentials`: the caller's metadata, carried upstream.
    pub async fn range(
        &self,
        request: RangeRequest,
        credentials: &MetadataMap,
    ) -> Result<RangeResponse, Status> {
        let cache_key = Self::cacheable(&request).then(|| Self::cache_key(&request, credentials));
        if let Some(cache_key) = &cache_key {
            if let Some(response) = self.get(cache_key) {
                self.metrics.cache_hits.inc();
                // It may name a revision newer than any shown yet (the cache's watcher is ahead).
                self.seen
                    .fetch_max(response.header.map_or(0, |h| h.revision), Ordering::Relaxed);
                return Ok(response);
            }
            self.metrics.cache_misses.inc();
        }
        let mut response = self.up.range(request.clone(), credentials).await?;
        let revision = |r: &RangeResponse| r.header.map_or(0, |h| h.revision);
        if request.serializable && revision(&response) < self.seen.load(Ordering::Relaxed) {
            // A member behind what this proxy has shown: its committed state is newer.
            let linearizable = RangeRequest {
                serializable: false,
                ..request.clone()
            };
            response = self.up.range(linearizable, credentials).await?;
        }
        if let Some(cache_key) = cache_key {
            self.put(cache_key, &request, &response);
        }
        self.seen.fetch_max(revision(&response), Ordering::Relaxed);
        Ok(response)
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache's key for a request: the request and the caller's token (answers differ by
    /// permission).
    fn cache_key(request: &RangeRequest, credentials: &MetadataMap) -> Vec<u8> {
        let mut key = request.encode_to_vec();
        key.extend_from_slice(&identity_of(credentials));
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
    async fn follow(self: Arc<Self>) {
        loop {
            self.clear();
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: vec![0],
                    range_end: vec![0],
                    ..Default::default()
                })),
            });
            let (ended, generation) = match self.up.open_watch(b"", rx).await {
                Ok(mut opened) => {
                    let ended = loop {
                        match opened.answers.next().await {
                            Some(Ok(response)) => {
                                if !self.follow_one(response) {
                                    break Ok(());
                                }
                            }
                            None => break Ok(()),
                            Some(Err(status)) => break Err(status),
                        }
                    };
                    (ended, Some(opened.generation))
                }
                Err(status) => (Err(status), None),
            };
            drop(tx);
            // Not following any more: nothing is answered from the cache from now on.
            self.clear();
            if let (Err(status), Some(generation)) = (&ended, generation) {
                self.up.broke(generation, Some(status));
            }
            if let Err(status) = ended {
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
                if hooks::injected(Bug::ProxyMissesInvalidation) && kv.mod_revision % 3 == 0 {
                    state.through = state.through.max(kv.mod_revision);
                    continue;
                }
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
