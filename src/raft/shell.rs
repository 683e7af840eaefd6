//! The async shell: runs a `RaftCore` on the ports. It owns the WAL and the snapshot store,
//! ticks on the `Clock`, sends through the `Transport`, and hands committed entries to the
//! apply loop in order. Entries are made durable (one fdatasync per ready: group commit) before
//! the messages that depend on them are sent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{
    ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot, SnapshotMetadata,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::core::{is_member, CoreOptions, PeerProgress, RaftCore, ReadyWork};
use super::dedupe::ForwardedProposals;
use super::image::ImageStore;
use super::storage::SnapshotRequests;
use super::transfer::{TransferMessage, Transfers};
use crate::hooks::{self, Bug, Observation};
use crate::io::transport::Inbox;
use crate::io::{Clock, Disk, Transport};
use crate::wal::{SnapStore, Wal, WalError, WalOptions};

/// Commands queued to the node, at most.
pub const COMMAND_QUEUE: usize = 16 * 1024;
/// Commands taken in one turn of the loop before raft is driven: the proposal batch size.
pub const MAX_COMMANDS_PER_TURN: usize = 4096;
/// Peer message batches taken in one turn besides the one that woke the node.
const MAX_PEER_BATCHES_PER_TURN: usize = 256;
/// Batches of committed entries queued to the apply loop, at most.
pub const APPLY_QUEUE: usize = 1024;
/// Ticks between two asks for the same unanswered ReadIndex.
pub const READ_RETRY_TICKS: usize = 5;
/// Commands from the apply loop queued to the node, at most.
pub const CONTROL_QUEUE: usize = 64;
/// Where a new cluster's first configuration sits in every initial member's log.
pub const BOOTSTRAP_INDEX: u64 = 1;
pub const BOOTSTRAP_TERM: u64 = 1;
/// Snapshot files kept.
pub const SNAPSHOTS_KEPT: usize = 5;

#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: {0}")]
    Raft(String),
}

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub id: u64,
    /// Voters of a brand-new cluster; ignored when the data dir has state.
    pub initial_voters: Vec<u64>,
    pub heartbeat_interval: Duration,
    pub election_tick: usize,
    pub wal_dir: PathBuf,
    pub snap_dir: PathBuf,
    pub wal: WalOptions,
    /// Seeds the ReadIndex context sequence (random in production, from the seed in the sim).
    pub read_seed: u64,
    /// Log entries kept in memory behind a snapshot (etcd: 5000).
    pub snapshot_catch_up_entries: u64,
    /// The size of the chunks a snapshot's image is sent in (`transfer::CHUNK_BYTES`; the
    /// simulator uses small ones, so that every transfer takes many).
    pub snapshot_chunk_bytes: usize,
    /// The last index the backend has applied. Only entries this member had made durable are
    /// ever applied, so a log that ends before it lost durable entries: the start is refused.
    pub backend_applied_index: u64,
}

/// What the apply loop receives, in log order.
#[derive(Debug)]
pub enum ApplyBatch {
    Entries(Vec<Entry>),
    Snapshot(Snapshot),
}

/// The node's state, readable by anyone without asking the node.
#[derive(Debug, Default)]
pub struct NodeStatus {
    pub term: AtomicU64,
    pub leader: AtomicU64,
    pub commit: AtomicU64,
}

/// The highest applied index, published by the apply loop.
pub type Applied = watch::Receiver<u64>;

enum Command {
    Propose {
        data: Vec<u8>,
        rejected: oneshot::Sender<NodeError>,
    },
    ProposeConfChange {
        change: ConfChangeV2,
        rejected: oneshot::Sender<NodeError>,
    },
    ApplyConfChange {
        change: ConfChangeV2,
        reply: oneshot::Sender<Result<ConfState, NodeError>>,
    },
    ReadIndex {
        reply: oneshot::Sender<u64>,
    },
    TransferLeader {
        to: u64,
    },
    Progress {
        reply: oneshot::Sender<Option<Vec<PeerProgress>>>,
    },
    Snapshot {
        index: u64,
        /// Entries to keep in memory behind it, at most (fewer than `catch_up_entries` when
        /// they are large).
        keep: u64,
    },
    OfferSnapshot {
        index: u64,
        data: Vec<u8>,
        /// Answered once raft's storage holds the offer.
        taken: oneshot::Sender<()>,
    },
    /// Shut down: finish this turn, sync the WAL, and end (the apply loop then drains).
    Stop,
}

/// A cheap handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    id: u64,
    commands: mpsc::Sender<Command>,
    /// The apply loop's commands: the node takes them even while it waits for the apply loop,
    /// so the two never wait on each other.
    control: mpsc::Sender<Command>,
    status: Arc<NodeStatus>,
}

impl NodeHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn status(&self) -> &NodeStatus {
        &self.status
    }

    async fn send(&self, command: Command) -> Result<(), NodeError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    async fn send_control(&self, command: Command) -> Result<(), NodeError> {
        self.control
            .send(command)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Queues a proposal. The returned receiver yields an error if raft refused it; it is
    /// closed without a value once raft accepted it.
    pub async fn propose(&self, data: Vec<u8>) -> Result<oneshot::Receiver<NodeError>, NodeError> {
        let (rejected, on_reject) = oneshot::channel();
        self.send(Command::Propose { data, rejected }).await?;
        Ok(on_reject)
    }

    pub async fn propose_conf_change(
        &self,
        change: ConfChangeV2,
    ) -> Result<oneshot::Receiver<NodeError>, NodeError> {
        let (rejected, on_reject) = oneshot::channel();
        self.send(Command::ProposeConfChange { change, rejected })
            .await?;
        Ok(on_reject)
    }

    /// Called by the apply loop for a committed configuration change.
    pub async fn apply_conf_change(&self, change: ConfChangeV2) -> Result<ConfState, NodeError> {
        let (reply, response) = oneshot::channel();
        self.send_control(Command::ApplyConfChange { change, reply })
            .await?;
        response.await.map_err(|_| NodeError::Stopped)?
    }

    /// The commit index a linearizable read must wait for (raft's ReadIndex). Concurrent
    /// requests share one ReadIndex round. Never answers while there is no leader.
    pub async fn read_index(&self) -> Result<u64, NodeError> {
        let (reply, response) = oneshot::channel();
        self.send(Command::ReadIndex { reply }).await?;
        response.await.map_err(|_| NodeError::Stopped)
    }

    pub async fn transfer_leader(&self, to: u64) -> Result<(), NodeError> {
        self.send(Command::TransferLeader { to }).await
    }

    /// The leader's view of every member's log; `None` when this member is not the leader.
    pub async fn progress(&self) -> Result<Option<Vec<PeerProgress>>, NodeError> {
        let (reply, response) = oneshot::channel();
        self.send(Command::Progress { reply }).await?;
        response.await.map_err(|_| NodeError::Stopped)
    }

    /// Asks the node to stop cleanly: it syncs its WAL and ends, and the apply loop, once it
    /// has applied what it was handed, writes everything to the backend and ends too.
    pub async fn stop(&self) {
        let _ = self.control.send(Command::Stop).await;
    }

    /// Hands raft the applied state at `index`, for followers behind the compacted log;
    /// returns once raft's storage holds it (what raft asks for from then on is answered
    /// with it, if it will do).
    pub async fn offer_snapshot(&self, index: u64, data: Vec<u8>) -> Result<(), NodeError> {
        let (taken, on_taken) = oneshot::channel();
        self.send_control(Command::OfferSnapshot { index, data, taken })
            .await?;
        on_taken.await.map_err(|_| NodeError::Stopped)
    }

    /// Asks for a snapshot at `index`: everything up to it is applied and flushed. At most
    /// `keep` entries behind it stay in memory for slow followers (and never more than
    /// `--experimental-snapshot-catchup-entries`).
    pub async fn snapshot(&self, index: u64, keep: u64) -> Result<(), NodeError> {
        self.send_control(Command::Snapshot { index, keep }).await
    }
}

pub struct StartedNode {
    pub handle: NodeHandle,
    pub apply_rx: mpsc::Receiver<ApplyBatch>,
    /// Ends with the node: `Err` on a fatal storage error.
    pub task: tokio::task::JoinHandle<Result<(), WalError>>,
    /// The index of the snapshot the node started from (the apply loop's replay starts after).
    pub snapshot_index: u64,
    /// That snapshot; its data,
    /// if any, is the state a backend older than it must be restored from.
    pub snapshot: Option<Snapshot>,
    /// raft's requests for snapshots with data, served by the apply loop.
    pub snapshot_requests: Arc<SnapshotRequests>,
    /// The snapshot images: written by the apply loop, sent and received by the node.
    pub images: Arc<ImageStore>,
}

struct Shell {
    core: RaftCore,
    wal: Wal,
    snaps: SnapStore,
    transport: Arc<dyn Transport>,
    apply_tx: mpsc::Sender<ApplyBatch>,
    status: Arc<NodeStatus>,
    reads_waiting: Vec<oneshot::Sender<u64>>,
    /// ReadIndex rounds not answered yet, by sequence number.
    reads_in_flight: BTreeMap<u64, Vec<oneshot::Sender<u64>>>,
    /// Starts at a random value: contexts must not repeat across restarts, since a delayed
    /// answer to an old round would otherwise satisfy a new read with a stale index.
    next_read_seq: u64,
    ticks_since_read_retry: usize,
    control: mpsc::Receiver<Command>,
    forwarded: ForwardedProposals,
    /// Snapshot images on their way to followers, or from the leader.
    transfers: Transfers,
    /// In-memory log entries kept before a snapshot, for followers a little behind.
    catch_up_entries: u64,
    /// This member was removed from the configuration: it stops.
    removed: bool,
    /// Asked to stop (a clean shutdown).
    stopping: bool,
    /// A storage error outside a ready (a snapshot that could not be saved): fatal, as one
    /// inside is; the loop ends with it.
    fatal: Option<WalError>,
}

/// Opens the node's storage, rebuilds raft from it and starts the node task.
pub fn spawn_node(
    opts: NodeOptions,
    disk: Arc<dyn Disk>,
    transport: Arc<dyn Transport>,
    inbox: Inbox,
    clock: Arc<dyn Clock>,
) -> Result<StartedNode, WalError> {
    let snaps = SnapStore::new(disk.clone(), &opts.snap_dir)?;
    let images = ImageStore::new(disk.clone(), &opts.snap_dir);
    // No transfer runs yet: what one left half written is of no use.
    images.remove_parts();
    let mut snapshot = snaps.load_newest()?;
    let snapshot_index = snapshot.as_ref().map_or(0, |s| s.get_metadata().index);
    let (wal, replay) = Wal::open(disk, &opts.wal_dir, opts.wal, snapshot_index)?;
    if let Some(repair) = &replay.repaired_tail {
        tracing::warn!(file = %repair.file.display(), offset = repair.offset, dropped_bytes = repair.dropped_bytes,
            "repaired a torn write at the end of the WAL");
    }
    let last_index = replay
        .entries
        .last()
        .map_or(snapshot_index, |e| e.index)
        .max(snapshot_index);
    let fresh = snapshot.is_none()
        && replay.entries.is_empty()
        && replay.hard_state == HardState::default();
    let bootstrapping = fresh && !opts.initial_voters.is_empty();
    if opts.backend_applied_index > last_index.max(if bootstrapping { BOOTSTRAP_INDEX } else { 0 })
    {
        return Err(WalError::Behind {
            dir: opts.wal_dir.clone(),
            last_index,
            applied_index: opts.backend_applied_index,
        });
    }
    // A member joining a running cluster (no initial voters) starts empty and learns the
    // configuration from the leader.
    let mut wal = wal;
    let mut snapshot_index = snapshot_index;
    if fresh && !opts.initial_voters.is_empty() {
        // A brand-new cluster's member: its first configuration, as the same snapshot on every
        // initial member. It sits at index 1, not 0, so that a member added later (whose log is
        // empty) cannot be sent entries from index 1 without the configuration: it must
        // install a snapshot, which carries it.
        let mut meta = SnapshotMetadata::default();
        meta.set_conf_state(ConfState::from((opts.initial_voters.clone(), vec![])));
        meta.index = BOOTSTRAP_INDEX;
        meta.term = BOOTSTRAP_TERM;
        let mut bootstrap = Snapshot::default();
        bootstrap.set_metadata(meta);
        snaps.save(&bootstrap)?;
        wal.save_snapshot_marker(BOOTSTRAP_TERM, BOOTSTRAP_INDEX)?;
        snapshot = Some(bootstrap);
        snapshot_index = BOOTSTRAP_INDEX;
    }
    tracing::info!(
        id = opts.id,
        snapshot_index,
        entries = replay.entries.len(),
        term = replay.hard_state.term,
        commit = replay.hard_state.commit,
        "raft log restored"
    );
    let core_opts = CoreOptions {
        id: opts.id,
        election_tick: opts.election_tick,
        heartbeat_tick: 1,
        applied: snapshot_index,
    };
    let snapshot_requests = Arc::new(SnapshotRequests::default());
    let mut core = RaftCore::new(
        &core_opts,
        snapshot.clone(),
        &replay.entries,
        replay.hard_state.clone(),
        &opts.initial_voters,
        snapshot_requests.clone(),
    )
    .map_err(|e| WalError::Invalid {
        reason: format!("cannot rebuild raft state: {e}"),
    })?;
    core.campaign_if_alone().map_err(|e| WalError::Invalid {
        reason: format!("cannot rebuild raft state: {e}"),
    })?;
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (apply_tx, apply_rx) = mpsc::channel(APPLY_QUEUE);
    let status = Arc::new(NodeStatus::default());
    let handle = NodeHandle {
        id: opts.id,
        commands: commands_tx,
        control: control_tx,
        status: status.clone(),
    };
    let shell = Shell {
        core,
        wal,
        snaps,
        transport,
        apply_tx,
        status,
        reads_waiting: Vec::new(),
        reads_in_flight: BTreeMap::new(),
        next_read_seq: opts.read_seed,
        ticks_since_read_retry: 0,
        control: control_rx,
        forwarded: ForwardedProposals::default(),
        transfers: Transfers::new(opts.id, images.clone(), opts.snapshot_chunk_bytes),
        catch_up_entries: opts.snapshot_catch_up_entries,
        removed: false,
        stopping: false,
        fatal: None,
    };
    let task = tokio::spawn(shell.run(commands_rx, inbox, clock, opts.heartbeat_interval));
    Ok(StartedNode {
        handle,
        apply_rx,
        task,
        snapshot_index,
        snapshot,
        snapshot_requests,
        images,
    })
}

impl Shell {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbox: Inbox,
        clock: Arc<dyn Clock>,
        tick_interval: Duration,
    ) -> Result<(), WalError> {
        let mut next_tick = clock.sleep(tick_interval);
        self.drive().await?;
        loop {
            tokio::select! {
                _ = &mut next_tick => {
                    self.core.tick();
                    next_tick = clock.sleep(tick_interval);
                    self.retry_reads();
                    let core = &self.core;
                    let resend = self.transfers.tick(|to| core.awaits_snapshot(to));
                    self.send_now(resend);
                }
                Some(command) = self.control.recv() => self.handle(command),
                Some(batch) = inbox.recv() => self.step_batch(batch),
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    self.handle(command);
                }
            }
            // Group commit: everything already waiting goes into this turn's one ready (one
            // fdatasync), not just the event that woke us. Under load, a follower thus syncs
            // several of the leader's appends at once and the leader several batches of
            // proposals, rather than one fdatasync each.
            for _ in 0..MAX_PEER_BATCHES_PER_TURN {
                match inbox.try_recv() {
                    Ok(batch) => self.step_batch(batch),
                    Err(_) => break,
                }
            }
            for _ in 0..MAX_COMMANDS_PER_TURN {
                match commands.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(_) => break,
                }
            }
            if !self.reads_waiting.is_empty() {
                let seq = self.next_read_seq;
                self.next_read_seq = self.next_read_seq.wrapping_add(1);
                self.reads_in_flight
                    .insert(seq, std::mem::take(&mut self.reads_waiting));
                let context = self.read_context(seq);
                self.core.read_index(context);
            }
            if let Some(e) = self.fatal.take() {
                return Err(e);
            }
            self.drive().await?;
            // Let the tasks this turn woke (the apply loop, above all: tokio keeps the last
            // one woken in this worker's slot, where the other worker cannot take it) run
            // before the next turn's fdatasync holds this worker. Measured: +5 to +18% puts/s
            // at 64 clients on one member.
            tokio::task::yield_now().await;
            if self.removed {
                tracing::warn!(
                    id = self.core.id(),
                    "this member was removed from the cluster; stopping"
                );
                break;
            }
            if self.stopping {
                break;
            }
        }
        self.wal.sync()?;
        Ok(())
    }

    fn step_batch(&mut self, batch: Vec<Message>) {
        for msg in batch {
            if self.removed {
                continue;
            }
            if let Some(transfer) = TransferMessage::parse(&msg) {
                self.on_transfer(msg.from, transfer);
                continue;
            }
            if !self.forwarded.first_time(&msg) {
                continue;
            }
            if !self.transfers.may_step(&msg) {
                // Its image is not here whole: as if lost; raft sends it again.
                tracing::debug!(
                    from = msg.from,
                    "dropped a snapshot whose image has not arrived"
                );
                continue;
            }
            // A refused message is as good as lost on the network; raft retries.
            if let Err(refused) = self.core.step_from_peer(msg) {
                tracing::debug!(%refused, "dropped a peer message");
            }
        }
    }

    /// A chunk of a snapshot image, or an acknowledgement of one.
    fn on_transfer(&mut self, from: u64, transfer: Result<TransferMessage, String>) {
        if from == self.core.id() || from == raft::INVALID_ID {
            return;
        }
        match transfer {
            Ok(TransferMessage::Chunk(chunk)) => {
                let ack = self.transfers.on_chunk(from, chunk);
                self.send_now(ack.into_iter().collect());
            }
            Ok(TransferMessage::Ack(ack)) => {
                let (next, progressed) = self.transfers.on_ack(from, ack);
                if progressed {
                    self.core.snapshot_progressed(from);
                }
                self.send_now(next);
            }
            Err(refused) => tracing::debug!(%refused, "dropped a peer message"),
        }
    }

    /// Sends transfer messages, and raft's snapshot once its image has arrived.
    fn send_now(&mut self, messages: Vec<Message>) {
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for msg in messages {
            if msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                // Its timeout counts from now, not from when its image started.
                self.core.sent(&msg);
            }
            by_peer.entry(msg.to).or_default().push(msg);
        }
        for (to, batch) in by_peer {
            self.transport.send(to, batch);
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Stop => self.stopping = true,
            Command::Propose { data, rejected } => {
                if let Err(e) = self.core.propose(data) {
                    let _ = rejected.send(proposal_error(e));
                }
            }
            Command::ProposeConfChange { change, rejected } => {
                if let Err(e) = self.core.propose_conf_change(vec![], change) {
                    let _ = rejected.send(proposal_error(e));
                }
            }
            Command::ApplyConfChange { change, reply } => {
                let applied = self.core.apply_conf_change(&change);
                if let Ok(conf_state) = &applied {
                    self.removed |= !is_member(conf_state, self.core.id());
                }
                let _ = reply.send(applied.map_err(|e| NodeError::Raft(e.to_string())));
            }
            Command::ReadIndex { reply } => self.reads_waiting.push(reply),
            Command::TransferLeader { to } => self.core.transfer_leader(to),
            Command::Progress { reply } => {
                let _ = reply.send(self.core.progress());
            }
            Command::OfferSnapshot { index, data, taken } => {
                self.core.offer_snapshot(index, data);
                let _ = taken.send(());
            }
            Command::Snapshot { index, keep } => {
                if let Err(e) = self.snapshot(index, keep) {
                    self.fatal.get_or_insert(e);
                }
            }
        }
    }

    fn snapshot(&mut self, index: u64, keep: u64) -> Result<(), WalError> {
        let keep = keep.min(self.catch_up_entries);
        let Some(snapshot) = self.core.compact_to(index, keep) else {
            return Ok(());
        };
        let meta = snapshot.get_metadata();
        self.snaps.save(&snapshot)?;
        self.wal.save_snapshot_marker(meta.term, meta.index)?;
        self.wal.release_to(meta.index)?;
        self.snaps.purge(SNAPSHOTS_KEPT)?;
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "saved snapshot and released the WAL before it"
        );
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for msg in messages {
            self.core.sent(&msg);
            if Transfers::needs_image(&msg) {
                // Held back until its image has arrived; the image's chunks go first.
                match self.transfers.start(msg) {
                    Ok(chunks) => {
                        for chunk in chunks {
                            by_peer.entry(chunk.to).or_default().push(chunk);
                        }
                    }
                    Err(()) => self.core.forget_offered_snapshot(),
                }
                continue;
            }
            by_peer.entry(msg.to).or_default().push(msg);
        }
        for (to, batch) in by_peer {
            self.transport.send(to, batch);
        }
    }

    /// Handles every ready raft has: persist, send, hand committed entries to the apply loop.
    async fn drive(&mut self) -> Result<(), WalError> {
        while let Some(work) = self.core.take_ready() {
            let ReadyWork {
                messages,
                snapshot,
                entries,
                hard_state,
                must_sync,
                persisted_messages,
                committed,
                read_states,
            } = work;
            // A leader may send appends before its own write is durable (raft counts its own
            // vote only once persisted).
            self.send(messages);
            if let Some(snapshot) = &snapshot {
                self.snaps.save(snapshot)?;
                self.wal.install_snapshot(
                    snapshot.get_metadata().term,
                    snapshot.get_metadata().index,
                )?;
            }
            let hard_state = hard_state.map(|mut hs| {
                if hooks::injected(Bug::ForgetVote) {
                    hs.vote = 0;
                }
                hs
            });
            if !entries.is_empty() || hard_state.is_some() {
                self.wal.append(&entries, hard_state.as_ref())?;
            }
            if must_sync && !hooks::injected(Bug::AckBeforeFsync) {
                self.wal.sync()?;
            }
            if hooks::injected(Bug::ApplyBeforeCommit) {
                let uncommitted: Vec<Entry> = entries
                    .iter()
                    .filter(|e| e.get_entry_type() == EntryType::EntryNormal)
                    .cloned()
                    .collect();
                if !uncommitted.is_empty() {
                    self.hand_to_apply(ApplyBatch::Entries(uncommitted)).await;
                }
            }
            self.send(persisted_messages);
            for state in read_states {
                let Some(seq) = self.own_read_seq(&state.request_ctx) else {
                    continue;
                };
                for reply in self.reads_in_flight.remove(&seq).unwrap_or_default() {
                    let _ = reply.send(state.index);
                }
            }
            if let Some(snapshot) = snapshot {
                self.hand_to_apply(ApplyBatch::Snapshot(snapshot)).await;
            }
            if !committed.is_empty() {
                self.hand_to_apply(ApplyBatch::Entries(committed)).await;
            }
            let persisted = self.core.persisted();
            self.send(persisted.messages);
            if !persisted.committed.is_empty() {
                self.hand_to_apply(ApplyBatch::Entries(persisted.committed))
                    .await;
            }
        }
        let (term, role) = (self.core.term(), self.core.role() as u8);
        hooks::observe(|| Observation::Role {
            node: self.core.id(),
            term,
            role,
        });
        self.status.term.store(term, Ordering::Relaxed);
        let leader = self.core.leader_id();
        let previous = self.status.leader.swap(leader, Ordering::Relaxed);
        if leader != previous && leader != 0 {
            crate::metrics::METRICS.leader_changes_seen.inc();
            tracing::warn!(
                term,
                previous_leader = format!("{previous:x}"),
                leader = format!("{leader:x}"),
                "leader changed"
            );
        } else if leader != previous {
            tracing::warn!(
                term,
                lost_leader = format!("{previous:x}"),
                "no leader: an election is under way"
            );
        }
        self.status
            .commit
            .store(self.core.commit_index(), Ordering::Relaxed);
        Ok(())
    }

    /// `[member id][sequence]`, both big-endian.
    fn read_context(&self, seq: u64) -> Vec<u8> {
        let mut context = self.core.id().to_be_bytes().to_vec();
        context.extend_from_slice(&seq.to_be_bytes());
        context
    }

    fn own_read_seq(&self, context: &[u8]) -> Option<u64> {
        let (id, seq) = context.split_at_checked(8)?;
        if id != self.core.id().to_be_bytes() {
            return None;
        }
        Some(u64::from_be_bytes(seq.try_into().ok()?))
    }

    /// raft drops a ReadIndex it cannot serve yet (no leader, a new leader that has not
    /// committed in its term, a lost message): ask again every few ticks until answered or
    /// until every caller has given up.
    fn retry_reads(&mut self) {
        self.ticks_since_read_retry += 1;
        if self.ticks_since_read_retry < READ_RETRY_TICKS || self.reads_in_flight.is_empty() {
            return;
        }
        self.ticks_since_read_retry = 0;
        self.reads_in_flight.retain(|_, replies| {
            replies.retain(|reply| !reply.is_closed());
            !replies.is_empty()
        });
        // Each retry is a new round with a new context. raft matches heartbeat acks to
        // rounds by context and completes every round queued before the one acked, so an
        // ack to an old round (delayed, or queued while this member was paused) must never
        // match a round queued later: reusing a context lets it, and serves a stale read.
        let pending = std::mem::take(&mut self.reads_in_flight);
        for (_, replies) in pending {
            let seq = self.next_read_seq;
            self.next_read_seq = self.next_read_seq.wrapping_add(1);
            self.reads_in_flight.insert(seq, replies);
            let context = self.read_context(seq);
            self.core.read_index(context);
        }
    }

    /// Queues a batch for the apply loop; while its queue is full, serves the apply loop's
    /// own commands (a configuration change it is applying waits on the node).
    async fn hand_to_apply(&mut self, batch: ApplyBatch) {
        let apply_tx = self.apply_tx.clone();
        loop {
            tokio::select! {
                permit = apply_tx.reserve() => {
                    // Err: the apply loop stopped, and so does the server.
                    if let Ok(permit) = permit {
                        permit.send(batch);
                    }
                    return;
                }
                Some(command) = self.control.recv() => self.handle(command),
            }
        }
    }
}

fn proposal_error(e: raft::Error) -> NodeError {
    match e {
        raft::Error::ProposalDropped => NodeError::NoLeader,
        other => NodeError::Raft(other.to_string()),
    }
}

#[cfg(test)]
mod tests;
