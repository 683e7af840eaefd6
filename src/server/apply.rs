//! The apply loop: committed entries, in log order, into mvcc; each result to the request that
//! waits for it; the applied index published; a snapshot every `snapshot_count` entries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType};
use raft_proto::ConfChangeI;
use tokio::sync::{mpsc, oneshot, watch};

use super::kv::{ApplyReply, MemberReply, Waiters};
use super::lease::LeaseClock;
use crate::cluster::{Members, RecordChange};
use crate::hooks::{self, Observation};
use crate::io::{BackendError, Clock};
use crate::mvcc::{MvccError, MvccStore};
use crate::proto::mvccpb::Event;
use crate::proto::quorumkvpb::raft_request::Request;
use crate::proto::quorumkvpb::ConfChangeContext;
use crate::proto::quorumkvpb::RaftRequest;
use crate::raft::{ApplyBatch, ImageRef, ImageStore, NodeError, NodeHandle, SnapshotRequests};
use crate::watch::WatchHub;

pub struct ApplyLoop {
    pub store: Arc<RwLock<MvccStore>>,
    pub waiters: Waiters,
    pub node: NodeHandle,
    /// The last applied raft index, published to readers waiting for it.
    pub applied_tx: watch::Sender<u64>,
    pub snapshot_count: u64,
    pub last_snapshot_index: u64,
    pub clock: Arc<dyn Clock>,
    pub snapshot_requests: Arc<SnapshotRequests>,
    /// Snapshot images: written here for followers, and read here to restore from the
    /// leader's.
    pub images: Arc<ImageStore>,
    /// The staged batch being written to the backend off the apply path, if any.
    pub writing: Option<tokio::task::JoinHandle<Result<(), BackendError>>>,
    /// The membership table, published to the request path and the peer transport.
    pub members: watch::Sender<Members>,
    pub member_waiters: Waiters<MemberReply>,
    /// Is this member a learner (it then refuses writes and linearizable reads, as etcd does)?
    pub learner: Arc<AtomicBool>,
    /// Watchers, told each applied revision's events...
    pub watches: WatchHub,
    /// ...once per batch of entries (fewer, larger responses when writes come fast).
    pub events: Vec<Event>,
    /// The v2 store's waiting requests, told each batch's v2 events.
    pub v2_watchers: Arc<crate::v2::V2Watchers>,
    pub v2_events: Vec<crate::v2::Event>,
    /// The batch's answers to proposers, sent once its events are with the watchers: a
    /// client that saw its write acknowledged then asks for watch progress must get a
    /// revision that includes the write.
    pub acks: Vec<(oneshot::Sender<ApplyReply>, ApplyReply)>,
    /// The leader's lease clock, brought up to date around each lease grant.
    pub leases: LeaseClock,
    /// Work that needs the whole store still, in the backend, between two entries (hashes,
    /// snapshot images).
    pub jobs: mpsc::Receiver<StoreJob>,
    /// The node stopped under a configuration change: nothing after it may be applied (its
    /// index must stay unapplied, so that the next start applies it whole).
    pub halted: bool,
    /// The simple tokens this member knows: learned as their entries apply.
    pub tokens: Arc<crate::auth::TokenTable>,
    /// Bytes of the entries applied since the last snapshot (the raft log holds them in
    /// memory until a snapshot compacts it).
    pub log_bytes: u64,
    /// Bytes of the entries the last snapshot kept behind it.
    pub kept_log_bytes: u64,
    /// The sizes of the latest entries applied (up to `catch_up_entries` of them), newest
    /// last: how many a snapshot keeps behind it within `KEPT_LOG_BYTES`.
    pub recent_sizes: std::collections::VecDeque<u64>,
    /// `--experimental-snapshot-catchup-entries`.
    pub catch_up_entries: u64,
}

/// A snapshot is taken once the entries applied since the last one hold this many bytes,
/// whatever `--snapshot-count` says: the raft log they stay in is in memory.
pub const LOG_MEMORY_BYTES: u64 = 128 << 20;
/// Entries kept in memory behind a snapshot for slow followers: at most this many bytes of them.
pub const KEPT_LOG_BYTES: u64 = 64 << 20;

/// Is a snapshot due, `since` entries and `log_bytes` bytes after the last one?
fn snapshot_due(since: u64, snapshot_count: u64, log_bytes: u64) -> bool {
    since >= snapshot_count || log_bytes >= LOG_MEMORY_BYTES
}

/// How many of the latest entries (`sizes`, newest last) a snapshot keeps behind it: as many
/// as fit in `limit` bytes, at least one.
fn entries_to_keep(sizes: &std::collections::VecDeque<u64>, limit: u64) -> u64 {
    let mut bytes = 0;
    let mut kept = 0;
    for size in sizes.iter().rev() {
        bytes += size;
        if bytes > limit && kept > 0 {
            break;
        }
        kept += 1;
    }
    kept.max(1)
}

/// A job the apply loop runs between two entries, every applied write in the backend: on a
/// blocking thread, with the store read-locked (reads go on; applying waits for it).
pub type StoreJob = Box<dyn FnOnce(&MvccStore) + Send>;

/// An entry whose apply takes longer is logged (etcd's `apply request took too long`).
pub const SLOW_APPLY: Duration = Duration::from_millis(100);

/// How many store jobs may wait for the apply loop.
pub const STORE_JOBS_QUEUED: usize = 16;

/// Applied writes are handed to the backend at least this often (etcd's backend batch interval)...
pub const BACKEND_BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// ...or once this many writes are staged, whichever comes first. The WAL holds them meanwhile.
pub const BACKEND_BATCH_LIMIT_OPS: usize = 10_000;

/// Runs until the node stops; `Err` when the backend fails (fatal: the member must stop).
pub async fn run_apply_loop(
    mut apply: ApplyLoop,
    mut batches: mpsc::Receiver<ApplyBatch>,
) -> Result<(), MvccError> {
    let mut last_flush_ms = apply.clock.now_ms();
    let requests = apply.snapshot_requests.clone();
    loop {
        let staged = apply.lock().staged_ops();
        let due_ms = last_flush_ms + BACKEND_BATCH_INTERVAL.as_millis() as u64;
        let flush_wait = Duration::from_millis(due_ms.saturating_sub(apply.clock.now_ms()));
        let flush_due = async {
            if staged == 0 {
                std::future::pending::<()>().await;
            }
            apply.clock.sleep(flush_wait).await;
        };
        let batch = tokio::select! {
            batch = batches.recv() => batch,
            _ = flush_due => {
                apply.write_staged().await?;
                last_flush_ms = apply.clock.now_ms();
                continue;
            }
            _ = requests.wanted() => {
                apply.offer_snapshot().await?;
                continue;
            }
            Some(job) = apply.jobs.recv() => {
                apply.finish_write().await?;
                apply.lock().flush_staged()?;
                let store = apply.store.clone();
                // Under the simulator this is an ordinary task (madsim marks it deprecated).
                #[allow(deprecated)]
                let ran = tokio::task::spawn_blocking(move || {
                    job(&store.read().unwrap_or_else(|p| p.into_inner()));
                })
                .await;
                if let Err(e) = ran {
                    tracing::error!(error = %e, "a store job failed");
                }
                continue;
            }
        };
        let Some(batch) = batch else { break };
        match batch {
            ApplyBatch::Entries(entries) => {
                let Some(last) = entries.last().map(|e| e.index) else {
                    continue;
                };
                for entry in entries {
                    let index = entry.index;
                    apply.note_size(entry.data.len() as u64);
                    hooks::observe(|| Observation::Applied {
                        node: apply.node.id(),
                        entry: &entry,
                    });
                    let started_ms = apply.clock.now_ms();
                    apply.entry(entry).await?;
                    let took_ms = apply.clock.now_ms().saturating_sub(started_ms);
                    if took_ms >= SLOW_APPLY.as_millis() as u64 {
                        crate::metrics::METRICS.slow_apply.inc();
                        tracing::warn!(
                            index,
                            took = ?Duration::from_millis(took_ms),
                            expected_duration = ?SLOW_APPLY,
                            "apply request took too long"
                        );
                    }
                    apply.observe_state(index);
                    if apply.halted {
                        break;
                    }
                }
                let events = std::mem::take(&mut apply.events);
                apply.watches.publish(events);
                if !apply.v2_events.is_empty() {
                    apply.v2_watchers.publish(&apply.v2_events);
                    apply.v2_events.clear();
                }
                for (waiter, reply) in apply.acks.drain(..) {
                    let _ = waiter.send(reply);
                }
                let now_ms = apply.clock.now_ms();
                let staged = apply.lock().staged_ops();
                if staged >= BACKEND_BATCH_LIMIT_OPS
                    || now_ms >= last_flush_ms + BACKEND_BATCH_INTERVAL.as_millis() as u64
                {
                    apply.write_staged().await?;
                    last_flush_ms = now_ms;
                }
                if apply.halted {
                    break;
                }
                // Replay after a restart re-delivers entries the backend already holds: the
                // applied index never goes back.
                apply.applied_tx.send_if_modified(|applied| {
                    let advanced = last > *applied;
                    *applied = (*applied).max(last);
                    advanced
                });
                apply.maybe_snapshot(last).await?;
                // The requests just answered (and the hub) run before the next batch, rather
                // than wait behind it in this worker's queue.
                tokio::task::yield_now().await;
            }
            ApplyBatch::Snapshot(snapshot) => {
                let index = snapshot.get_metadata().index;
                apply.finish_write().await?;
                // A restore reads and writes the whole state (15-18 s for a 2.2-2.8 GB image).
                // It ran on a runtime worker under the store's write lock, and every request
                // that read the store meanwhile (a serializable get, /metrics) blocked another
                // worker on that lock: with both stuck, the raft node stopped answering
                // heartbeats and a two-member cluster lost its leader for the whole restore.
                // Now it runs on a blocking thread, and the store is locked for writing only
                // for the last, short step; reads meanwhile see the state before the snapshot.
                let v2_before = apply.lock().v2().index();
                let (store, images) = (apply.store.clone(), apply.images.clone());
                // Under the simulator this is an ordinary task (madsim marks it deprecated).
                #[allow(deprecated)]
                let restored = tokio::task::spawn_blocking(move || {
                    restore_snapshot_in(&store, &images, &snapshot)
                })
                .await;
                restored.map_err(|e| {
                    BackendError::Store(format!("the snapshot restore failed: {e}"))
                })??;
                apply.watches.resync_all();
                let v2_history = apply.lock().v2().history();
                apply.v2_watchers.catch_up(v2_before, &v2_history);
                let members = Members::load(&apply.lock())?;
                apply.publish_members(members);
                apply.observe_state(index);
                tracing::info!(index, "restored the state from the leader's snapshot");
                apply.last_snapshot_index = index;
                apply.applied_tx.send_replace(index);
            }
        }
    }
    apply.finish_write().await?;
    apply.lock().flush_staged()?;
    Ok(())
}

/// `restore_snapshot` on the shared store: an image is staged under a read lock (the store's
/// state stays readable) and installed under a short write lock.
fn restore_snapshot_in(
    store: &RwLock<MvccStore>,
    images: &ImageStore,
    snapshot: &raft::eraftpb::Snapshot,
) -> Result<(), MvccError> {
    let index = snapshot.get_metadata().index;
    let Some(image) = ImageRef::parse(&snapshot.data) else {
        let mut store = store.write().unwrap_or_else(|p| p.into_inner());
        return restore_snapshot(&mut store, images, snapshot);
    };
    let reader = open_image(images, index, image)?;
    let staged = store
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .stage_restore(index, std::io::BufReader::new(reader))?;
    store
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .install_restore(staged)?;
    images.remove_through(index);
    Ok(())
}

/// The image `image` at `index`, checked whole, to read.
fn open_image(
    images: &ImageStore,
    index: u64,
    image: ImageRef,
) -> Result<impl std::io::Read, MvccError> {
    images.open(index, image).map_err(|e| {
        MvccError::Backend(BackendError::Store(format!(
            "cannot restore the snapshot at {index}: {e}"
        )))
    })
}

/// Replaces the store with the state of raft's `snapshot`: from the image its data names (read
/// a buffer at a time, checked whole first), or from its data itself (an inline image). The
/// image is removed once the backend holds the state durably.
pub fn restore_snapshot(
    store: &mut MvccStore,
    images: &ImageStore,
    snapshot: &raft::eraftpb::Snapshot,
) -> Result<(), MvccError> {
    let index = snapshot.get_metadata().index;
    match ImageRef::parse(&snapshot.data) {
        Some(image) => {
            let reader = open_image(images, index, image)?;
            store.restore_from(index, std::io::BufReader::new(reader))?;
            images.remove_through(index);
        }
        None => store.restore(index, &snapshot.data)?,
    }
    Ok(())
}

impl ApplyLoop {
    /// Tells the simulator the state right after `index` was applied (not when the entry was
    /// skipped as already in the backend: the state then is a later one).
    fn observe_state(&self, index: u64) {
        if !hooks::observing() {
            return;
        }
        let store = self.lock();
        if store.consistent_index() == index {
            hooks::observe(|| Observation::State {
                node: self.node.id(),
                index,
                store: &store,
            });
        }
    }

    /// Waits until the batch being written (if any) is in the backend.
    async fn finish_write(&mut self) -> Result<(), MvccError> {
        if let Some(writing) = self.writing.take() {
            writing
                .await
                .map_err(|e| BackendError::Store(format!("backend writer failed: {e}")))??;
            self.lock().staged_written();
        }
        Ok(())
    }

    /// Hands the staged writes to the backend on a blocking thread, so that the backend's
    /// batch cost (a synchronous log write in sled) does not stall applying. One at a time.
    async fn write_staged(&mut self) -> Result<(), MvccError> {
        self.finish_write().await?;
        let (batch, backend) = {
            let mut store = self.lock();
            (store.take_staged(), store.backend().clone())
        };
        if let Some(batch) = batch {
            // Under the simulator this is an ordinary task (madsim marks it deprecated).
            #[allow(deprecated)]
            let writing = tokio::task::spawn_blocking(move || backend.apply(batch));
            self.writing = Some(writing);
        }
        Ok(())
    }

    /// `Err` only for a backend failure or corruption: the member must stop, since its state
    /// may now differ from what the log says.
    async fn entry(&mut self, entry: Entry) -> Result<(), MvccError> {
        match entry.get_entry_type() {
            EntryType::EntryNormal => {
                let Some(request) = self.decode(&entry) else {
                    return Ok(());
                };
                if matches!(request.request, Some(Request::Compaction(_))) {
                    // Compaction scans the backend: the batch on its way must be there first.
                    self.finish_write().await?;
                }
                if request.leader_term != 0 && request.leader_term != entry.term {
                    tracing::debug!(
                        index = entry.index,
                        proposed_in = request.leader_term,
                        appended_in = entry.term,
                        "dropping a deposed leader's request"
                    );
                    self.lock().skip(entry.index);
                    if let Some(waiter) = self.waiters.take(request.id) {
                        let revision = self.lock().current_rev();
                        let _ = waiter.send((Err(MvccError::LeaderChanged), revision));
                    }
                    return Ok(());
                }
                return self.normal(entry.index, request);
            }
            EntryType::EntryConfChange => match ConfChange::parse_from_bytes(entry.get_data()) {
                Ok(change) => self.conf_change(entry.index, change.into_v2()).await,
                Err(e) => self.skip_bad(entry.index, &e.to_string()),
            },
            EntryType::EntryConfChangeV2 => {
                match ConfChangeV2::parse_from_bytes(entry.get_data()) {
                    Ok(change) => self.conf_change(entry.index, change).await,
                    Err(e) => self.skip_bad(entry.index, &e.to_string()),
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, MvccStore> {
        self.store.write().unwrap_or_else(|p| p.into_inner())
    }

    fn skip_bad(&self, index: u64, why: &str) {
        tracing::error!(index, error = why, "skipping an undecodable log entry");
        self.lock().skip(index);
    }

    /// The request of a normal entry still to apply; `None` for entries already in the
    /// backend (replay after a restart), a new leader's empty entry, or an undecodable one.
    fn decode(&self, entry: &Entry) -> Option<RaftRequest> {
        let mut store = self.lock();
        if entry.index <= store.consistent_index() {
            return None;
        }
        if entry.get_data().is_empty() {
            store.skip(entry.index);
            return None;
        }
        drop(store);
        match RaftRequest::decode(entry.get_data()) {
            Ok(request) => Some(request),
            Err(e) => {
                self.skip_bad(entry.index, &e.to_string());
                None
            }
        }
    }

    fn normal(&mut self, index: u64, request: RaftRequest) -> Result<(), MvccError> {
        if let Some(body @ (Request::MemberAttributes(_) | Request::MemberPeerUrls(_))) =
            &request.request
        {
            self.member_request(index, request.id, body);
            return Ok(());
        }
        let grant = matches!(request.request, Some(Request::LeaseGrant(_)));
        if grant {
            // A new leader takes over the leases it inherited before its first grant applies.
            drop(self.leases.current(&self.node, &self.store));
        }
        let mut store = self.lock();
        let Some(body) = &request.request else {
            store.skip(index);
            return Ok(());
        };
        let who = crate::auth::AuthInfo {
            user: request.username.clone(),
            revision: request.auth_revision,
        };
        // Checked again here, against the auth store in force at this entry: a permission
        // revoked since the request was checked at the API is not honoured.
        let authorized = if hooks::injected(hooks::Bug::SkipAuthCheckAtApply) {
            Ok(())
        } else {
            store.authorize(&who, body)
        };
        let result = authorized.and_then(|()| store.apply(index, body));
        let events = store.take_published();
        let v2_events = if matches!(body, Request::V2(_)) {
            store.take_v2_published()
        } else {
            Vec::new()
        };
        if matches!(
            result,
            Err(MvccError::Backend(_) | MvccError::Corrupt { .. })
        ) {
            // The key index may be half-changed: stop rather than serve a state the log
            // disagrees with.
            return result.map(drop);
        }
        if result.is_err() {
            store.skip(index); // A refused request: nothing changed.
        }
        let revision = store.current_rev();
        drop(store);
        if let Ok(crate::mvcc::ApplyOutcome::Auth(applied)) = &result {
            self.learn_tokens(applied);
        }
        if grant {
            // On the leader, the new lease's clock starts as it applies.
            drop(self.leases.current(&self.node, &self.store));
        }
        self.events.extend(events);
        self.v2_events.extend(v2_events);
        if let Some(waiter) = self.waiters.take(request.id) {
            self.acks.push((waiter, (result, revision)));
        }
        Ok(())
    }

    /// Tokens issued, or voided, by an applied auth change.
    fn learn_tokens(&self, applied: &crate::auth::AuthApplied) {
        if applied.forget_all {
            self.tokens.clear();
        }
        if let Some(user) = &applied.forget_user {
            self.tokens.forget_user(user);
        }
        if let Some((token, user)) = &applied.token {
            self.tokens
                .insert(token.clone(), user.clone(), self.clock.now_ms());
        }
    }

    /// raft's configuration and the membership table change together; the member that
    /// proposed the change (if it is this one) is told the outcome.
    async fn conf_change(&mut self, index: u64, change: ConfChangeV2) {
        let context = ConfChangeContext::decode(change.get_context()).unwrap_or_default();
        let outcome = self.node.apply_conf_change(change.clone()).await;
        let already_applied = index <= self.lock().consistent_index();
        let reply = match outcome {
            Ok(_) if already_applied => Ok(self.members.borrow().list()),
            Ok(_) => {
                let mut members = self.members.borrow().clone();
                let records = members.apply_conf_change(&change, context.member.as_ref());
                self.stage_records(index, records);
                let list = members.list();
                self.publish_members(members);
                Ok(list)
            }
            Err(NodeError::Stopped) => {
                // Shutting down: the change is applied at the next start, with what follows.
                self.halted = true;
                Err(NodeError::Stopped)
            }
            Err(e) => {
                tracing::error!(index, error = %e, "configuration change not applied");
                self.lock().skip(index);
                Err(e)
            }
        };
        if let Some(waiter) = self.member_waiters.take(context.request_id) {
            let _ = waiter.send(reply);
        }
    }

    /// A membership request in a normal entry (published attributes, new peer URLs).
    fn member_request(&self, index: u64, id: u64, request: &Request) {
        let mut members = self.members.borrow().clone();
        let records = match request {
            Request::MemberAttributes(attributes) => members.set_attributes(attributes),
            Request::MemberPeerUrls(update) => members.set_peer_urls(update),
            _ => return,
        };
        self.stage_records(index, records);
        let list = members.list();
        self.publish_members(members);
        if let Some(waiter) = self.member_waiters.take(id) {
            let _ = waiter.send(Ok(list));
        }
    }

    fn stage_records(&self, index: u64, records: Vec<RecordChange>) {
        let mut store = self.lock();
        store.skip(index);
        for (name, value) in records {
            store.stage_record(index, &name, value);
        }
    }

    fn publish_members(&self, members: Members) {
        let learner = members.get(self.node.id()).is_some_and(|m| m.is_learner);
        self.learner.store(learner, Ordering::Relaxed);
        self.members.send_if_modified(|current| {
            let changed = *current != members;
            *current = members;
            changed
        });
    }

    /// raft wants to send a follower the state: write its image to a file, and offer raft a
    /// snapshot that names it, labelled with the index the image really reflects (read under
    /// the same lock). The image never sits in memory whole.
    async fn offer_snapshot(&mut self) -> Result<(), MvccError> {
        self.finish_write().await?;
        self.lock().flush_staged()?;
        let (index, image) = {
            // Only this loop changes the store, and it is here: a read lock is enough, and
            // requests go on reading while the image is written.
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            let index = store.consistent_index().max(*self.applied_tx.borrow());
            let mut failure = None;
            let written = self.images.write(index, |out| {
                store.write_flushed_image(out).map(|_| ()).map_err(|e| {
                    let message = e.to_string();
                    failure = Some(e);
                    std::io::Error::other(message)
                })
            });
            match (written, failure) {
                (_, Some(e)) => return Err(e),
                (Err(e), None) => {
                    // The disk refused the image: raft asks again later.
                    tracing::warn!(index, error = %e, "cannot write a snapshot image");
                    return Ok(());
                }
                (Ok(image), None) => (index, image),
            }
        };
        tracing::info!(
            index,
            bytes = image.len,
            "offering a snapshot for a follower"
        );
        // A stopped node needs no snapshot.
        if self
            .node
            .offer_snapshot(index, image.descriptor())
            .await
            .is_ok()
        {
            self.snapshot_requests.offered();
        }
        Ok(())
    }

    /// Counts an applied entry's bytes (see `log_bytes`, `recent_sizes`).
    fn note_size(&mut self, bytes: u64) {
        self.log_bytes += bytes;
        crate::metrics::memory::MEMORY
            .raft_log
            .set(self.log_bytes + self.kept_log_bytes);
        self.recent_sizes.push_back(bytes);
        while self.recent_sizes.len() as u64 > self.catch_up_entries {
            self.recent_sizes.pop_front();
        }
    }

    fn entries_to_keep(&self) -> u64 {
        entries_to_keep(&self.recent_sizes, KEPT_LOG_BYTES)
    }

    /// `Err` when the backend fails: fatal, like any backend failure.
    async fn maybe_snapshot(&mut self, applied: u64) -> Result<(), MvccError> {
        let since = applied.saturating_sub(self.last_snapshot_index);
        if !snapshot_due(since, self.snapshot_count, self.log_bytes) {
            return Ok(());
        }
        // Everything the snapshot covers must be durable in the backend before the WAL that
        // holds it is released.
        self.finish_write().await?;
        {
            let mut store = self.lock();
            store.flush_staged()?;
            store.backend().flush()?;
        }
        let keep = self.entries_to_keep();
        if self.node.snapshot(applied, keep).await.is_ok() {
            self.last_snapshot_index = applied;
            self.log_bytes = 0;
            self.kept_log_bytes = self.recent_sizes.iter().rev().take(keep as usize).sum();
            crate::metrics::memory::MEMORY
                .raft_log
                .set(self.kept_log_bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod log_memory_tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_by_count_or_by_bytes() {
        assert!(!snapshot_due(10, 100_000, 1 << 20));
        assert!(snapshot_due(100_000, 100_000, 0));
        // 200 entries of 1 MiB: due long before --snapshot-count.
        assert!(snapshot_due(200, 100_000, 200 << 20));
    }

    #[test]
    fn the_entries_kept_behind_a_snapshot_fit_in_the_byte_bound() {
        let small: std::collections::VecDeque<u64> = std::iter::repeat_n(100, 5000).collect();
        assert_eq!(entries_to_keep(&small, KEPT_LOG_BYTES), 5000);
        let large: std::collections::VecDeque<u64> = std::iter::repeat_n(1 << 20, 5000).collect();
        assert_eq!(entries_to_keep(&large, KEPT_LOG_BYTES), 64);
        let huge: std::collections::VecDeque<u64> = [1 << 30].into_iter().collect();
        assert_eq!(entries_to_keep(&huge, KEPT_LOG_BYTES), 1, "at least one");
        assert_eq!(entries_to_keep(&Default::default(), KEPT_LOG_BYTES), 1);
    }
}
