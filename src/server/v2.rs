//! The v2 keys API's requests: writes through the raft log, reads of this member's tree (after
//! a ReadIndex for `quorum=true`), waits on its watchers, and the leader's expiry of TTL keys.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::error::ServerError;
use super::kv::KvServer;
use crate::mvcc::ApplyOutcome;
use crate::proto::quorumkvpb::raft_request::Request;
use crate::proto::quorumkvpb::V2Request;
use crate::v2::store::Op;
use crate::v2::watchers::Waiting;
use crate::v2::{Event, V2Error};

/// How often the leader looks for v2 keys due to expire (etcd's SYNC ticker).
pub const V2_SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// A `stream=true` wait from an old index takes at most this many events from the history...
pub const STREAM_PAST_EVENTS: usize = crate::v2::watchers::QUEUED_EVENTS;
/// ...and about this many bytes of them.
pub const STREAM_PAST_BYTES: usize = 4 << 20;

/// What a `wait=true` request gets: events already in the history, then (unless it was
/// answered from the history) its registration for the next ones.
pub struct V2Wait {
    /// The store's index when the wait began (`X-Etcd-Index`).
    pub start_index: u64,
    pub past: Vec<Event>,
    pub waiting: Option<Waiting>,
}

impl KvServer {
    /// Proposes a v2 write and waits for its answer.
    pub async fn v2_write(&self, req: V2Request) -> Result<Result<Event, V2Error>, ServerError> {
        match self.propose(Request::V2(req)).await? {
            (ApplyOutcome::V2(answer), _) => Ok(answer.and_then(|event| {
                event.ok_or_else(|| V2Error::new(crate::v2::RAFT_INTERNAL, "no event", 0))
            })),
            _ => unreachable!("a v2 request applies as one"),
        }
    }

    /// A v2 read of this member's tree; linearizable when `quorum`.
    pub async fn v2_get(
        &self,
        path: &str,
        recursive: bool,
        quorum: bool,
    ) -> Result<Result<Event, V2Error>, ServerError> {
        if quorum {
            self.linearizable_barrier().await?;
        }
        let store = self.read_store();
        let answer = store.v2().get(path, recursive);
        store.v2().stats.count(Op::Get, answer.is_ok());
        Ok(answer)
    }

    /// This member's whole v2 store (the simulator compares members).
    pub fn v2_dump(&self) -> crate::v2::store::V2Dump {
        self.read_store().v2().dump()
    }

    /// The v2 store's index now.
    pub fn v2_index(&self) -> u64 {
        self.read_store().v2().index()
    }

    /// `/v2/stats/store`.
    pub fn v2_stats_json(&self) -> String {
        self.read_store().v2().stats.to_json(self.v2_watchers.len())
    }

    /// A `wait=true` request at `path` from index `since` (0: the next change). The history is
    /// scanned and the watcher registered under one read of the store, so no event falls
    /// between the two.
    pub fn v2_wait(
        &self,
        path: &str,
        recursive: bool,
        stream: bool,
        since: u64,
    ) -> Result<V2Wait, V2Error> {
        let store = self.read_store();
        let v2 = store.v2();
        let current = v2.index();
        let since = if since == 0 { current + 1 } else { since };
        let mut past = Vec::new();
        let mut bytes = 0;
        let mut from = since;
        while let Some(event) = v2.scan(path, recursive, from)? {
            from = event.index() + 1;
            bytes += event.value_bytes();
            past.push(event);
            if stream && (past.len() >= STREAM_PAST_EVENTS || bytes >= STREAM_PAST_BYTES) {
                // More than a stream may take from the history at once: it gets these and
                // ends, and its client asks again from the index after the last.
                return Ok(V2Wait {
                    start_index: current,
                    past,
                    waiting: None,
                });
            }
            if !stream {
                // A wait ends with its first event.
                return Ok(V2Wait {
                    start_index: current,
                    past,
                    waiting: None,
                });
            }
        }
        let waiting = self
            .v2_watchers
            .register(path, recursive, stream, since, current);
        Ok(V2Wait {
            start_index: current,
            past,
            waiting: Some(waiting),
        })
    }

    /// On the leader, every `V2_SYNC_INTERVAL`: once a v2 key is due, a SYNC entry with the
    /// leader's clock expires every key due by then, at the same index on every member. The
    /// entry is applied only in the term it was proposed in: a deposed leader's is dropped.
    pub async fn run_v2_expiry(self) {
        let clock = self.lease_clock.clock.clone();
        loop {
            clock.sleep(V2_SYNC_INTERVAL).await;
            if self.stopped() {
                return;
            }
            if crate::hooks::injected(crate::hooks::Bug::V2ExpiresLocally) {
                // The planted bug: every member expires keys by its own clock, off the log.
                let now = clock.unix_nanos();
                let mut store = self.store().write().unwrap_or_else(|p| p.into_inner());
                store.v2_expire_outside_log(now);
                continue;
            }
            let status = self.node().status();
            if status.leader.load(Ordering::Relaxed) != self.member_id() {
                continue;
            }
            let term = status.term.load(Ordering::Relaxed);
            let now = clock.unix_nanos();
            let due = self.read_store().v2().next_expiry();
            if due.is_none_or(|at| at > now) {
                continue;
            }
            let sync = V2Request {
                method: "SYNC".into(),
                time: now,
                ..Default::default()
            };
            if let Err(e) = self.propose_in_term(Request::V2(sync), term).await {
                tracing::debug!(error = %e, "v2 expiry not committed");
            }
        }
    }
}
