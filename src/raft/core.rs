//! The sans-IO raft core: inputs in (tick, message, proposal, read request, ...), work out
//! (entries and hard state to persist, messages to send before and after persisting, committed
//! entries to apply, read states). It does no I/O and reads no clock.

use std::collections::BTreeMap;

use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, HardState, Message,
    MessageType, Snapshot, SnapshotMetadata,
};
use raft::{Config, ProgressState, RawNode, ReadState, SnapshotStatus, StateRole, Storage};

use super::storage::{NodeStorage, SnapshotRequests};
use std::sync::Arc;

/// Largest append message, in bytes.
pub const MAX_SIZE_PER_MSG: u64 = 1 << 20;
/// Append messages in flight to one follower.
pub const MAX_INFLIGHT_MSGS: usize = 256;
/// Committed entries handed out per ready, in bytes.
pub const MAX_COMMITTED_SIZE_PER_READY: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct CoreOptions {
    pub id: u64,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// The index up to which committed entries were applied before this start.
    pub applied: u64,
}

/// The work one raft `Ready` asks for, in the order the shell must do it: send `messages`,
/// persist `snapshot`/`entries`/`hard_state` (synced when `must_sync`), then send
/// `persisted_messages`, then call `RaftCore::persisted`. `committed` can be applied at once.
#[derive(Debug, Default)]
pub struct ReadyWork {
    pub messages: Vec<Message>,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub must_sync: bool,
    pub persisted_messages: Vec<Message>,
    pub committed: Vec<Entry>,
    pub read_states: Vec<ReadState>,
}

/// What becomes possible once a ready is durable.
#[derive(Debug, Default)]
pub struct PersistedWork {
    pub messages: Vec<Message>,
    pub committed: Vec<Entry>,
}

/// One member's log as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: u64,
    /// The highest index known to be in its log.
    pub matched: u64,
    /// Heard from within the last election timeout (always true for the leader itself).
    pub active: bool,
    pub learner: bool,
}

pub struct RaftCore {
    raw: RawNode<NodeStorage>,
    pending: Option<raft::Ready>,
    /// Followers sent a snapshot, with the ticks since: raft waits for a snapshot's outcome
    /// before it sends that follower anything else, so a lost one is reported as failed.
    snapshots_in_flight: BTreeMap<u64, usize>,
}

/// Ticks after which a snapshot the follower has not acknowledged counts as lost (3 s at
/// etcd's 100 ms heartbeat); raft then probes the follower and sends a new one if needed.
pub const SNAPSHOT_LOST_TICKS: usize = 30;

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl RaftCore {
    /// Builds the core over a log restored from disk: `snapshot` (if any), then `entries`
    /// after it, then `hard_state`. A brand-new member passes `initial_voters` instead.
    pub fn new(
        opts: &CoreOptions,
        snapshot: Option<Snapshot>,
        entries: &[Entry],
        hard_state: HardState,
        initial_voters: &[u64],
        snapshots: Arc<SnapshotRequests>,
    ) -> Result<Self, raft::Error> {
        let node_storage = NodeStorage::new(snapshots);
        let storage = node_storage.mem.clone();
        match snapshot {
            Some(snap) if snap.get_metadata().index > 0 => storage.wl().apply_snapshot(snap)?,
            Some(snap) => {
                storage.initialize_with_conf_state(snap.get_metadata().get_conf_state().clone())
            }
            None => storage
                .initialize_with_conf_state(ConfState::from((initial_voters.to_vec(), vec![]))),
        }
        let snapshot_index = storage.wl().hard_state().commit;
        storage.wl().append(entries)?;
        if hard_state != HardState::default() {
            let mut hard_state = hard_state;
            // The commit index is written lazily; a snapshot proves it was at least this far.
            hard_state.commit = hard_state.commit.max(snapshot_index);
            storage.wl().set_hardstate(hard_state);
        }
        let config = Config {
            id: opts.id,
            election_tick: opts.election_tick,
            heartbeat_tick: opts.heartbeat_tick,
            applied: opts.applied,
            max_size_per_msg: MAX_SIZE_PER_MSG,
            max_inflight_msgs: MAX_INFLIGHT_MSGS,
            max_committed_size_per_ready: MAX_COMMITTED_SIZE_PER_READY,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let raw = RawNode::new(&config, node_storage, &discard_logger())?;
        Ok(RaftCore {
            raw,
            pending: None,
            snapshots_in_flight: BTreeMap::new(),
        })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn tick(&mut self) {
        self.raw.tick();
        if self.snapshots_in_flight.is_empty() {
            return;
        }
        let mut lost = Vec::new();
        for (to, ticks) in self.snapshots_in_flight.iter_mut() {
            *ticks += 1;
            let waiting = self
                .raw
                .raft
                .prs()
                .get(*to)
                .is_some_and(|pr| pr.state == ProgressState::Snapshot);
            if !waiting || *ticks >= SNAPSHOT_LOST_TICKS {
                lost.push((*to, waiting));
            }
        }
        for (to, waiting) in lost {
            self.snapshots_in_flight.remove(&to);
            if waiting {
                self.raw.report_snapshot(to, SnapshotStatus::Failure);
            }
        }
    }

    /// The shell sent `msg`: a snapshot starts its clock.
    pub fn sent(&mut self, msg: &Message) {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.snapshots_in_flight.insert(msg.to, 0);
        }
    }

    pub fn step(&mut self, msg: Message) -> Result<(), raft::Error> {
        self.raw.step(msg)
    }

    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), raft::Error> {
        self.raw.propose(vec![], data)
    }

    pub fn propose_conf_change(
        &mut self,
        context: Vec<u8>,
        change: ConfChangeV2,
    ) -> Result<(), raft::Error> {
        self.raw.propose_conf_change(context, change)
    }

    /// Applies a committed configuration change; returns the new configuration.
    pub fn apply_conf_change(&mut self, change: &ConfChangeV2) -> Result<ConfState, raft::Error> {
        let conf_state = self.raw.apply_conf_change(change)?;
        self.raw.store().mem.wl().set_conf_state(conf_state.clone());
        if !is_member(&conf_state, self.id()) && self.raw.raft.state == StateRole::Leader {
            // A leader removed from the configuration steps down (raft-rs would otherwise
            // look for its own progress, which is gone); the others elect a new one.
            let term = self.raw.raft.term;
            self.raw.raft.become_follower(term + 1, raft::INVALID_ID);
        }
        Ok(conf_state)
    }

    pub fn read_index(&mut self, context: Vec<u8>) {
        self.raw.read_index(context);
    }

    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// A single-voter member need not wait an election timeout to lead.
    pub fn campaign_if_alone(&mut self) -> Result<(), raft::Error> {
        let voters = self.raw.raft.prs().conf().voters().ids();
        if voters.len() == 1
            && voters.contains(self.id())
            && self.raw.raft.state != StateRole::Leader
        {
            self.raw.campaign()?;
        }
        Ok(())
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// The leader's view of every member's log (`None` on a follower).
    pub fn progress(&self) -> Option<Vec<PeerProgress>> {
        if self.raw.raft.state != StateRole::Leader {
            return None;
        }
        let conf = self.raw.raft.prs().conf();
        let learners = conf.learners();
        Some(
            self.raw
                .raft
                .prs()
                .iter()
                .map(|(id, pr)| PeerProgress {
                    id: *id,
                    matched: pr.matched,
                    active: *id == self.id() || pr.recent_active,
                    learner: learners.contains(id),
                })
                .collect(),
        )
    }

    pub fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    /// Takes the next ready, if any. Its entries and hard state are already in the in-memory
    /// log (raft reads them from there); the shell makes them durable.
    pub fn take_ready(&mut self) -> Option<ReadyWork> {
        assert!(self.pending.is_none(), "a ready is still being persisted");
        if !self.raw.has_ready() {
            return None;
        }
        let mut ready = self.raw.ready();
        let mut work = ReadyWork {
            messages: ready.take_messages(),
            must_sync: ready.must_sync(),
            read_states: ready.take_read_states(),
            committed: ready.take_committed_entries(),
            ..Default::default()
        };
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            if let Err(e) = self.raw.store().mem.wl().apply_snapshot(snapshot.clone()) {
                panic!("raft handed out a snapshot older than the log: {e}");
            }
            work.snapshot = Some(snapshot);
        }
        work.entries = ready.take_entries();
        if !work.entries.is_empty() {
            debug_assert!(work
                .entries
                .windows(2)
                .all(|w| w[1].index == w[0].index + 1));
            if let Err(e) = self.raw.store().mem.wl().append(&work.entries) {
                panic!("raft handed out entries that do not fit the log: {e}");
            }
        }
        if let Some(hs) = ready.hs() {
            self.raw.store().mem.wl().set_hardstate(hs.clone());
            work.hard_state = Some(hs.clone());
        }
        work.persisted_messages = ready.take_persisted_messages();
        self.pending = Some(ready);
        Some(work)
    }

    /// Called once the last taken ready is durable.
    pub fn persisted(&mut self) -> PersistedWork {
        let ready = self.pending.take().expect("persisted without a ready");
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.store().mem.wl().mut_hard_state().commit = commit;
        }
        PersistedWork {
            messages: light.take_messages(),
            committed: light.take_committed_entries(),
        }
    }

    /// Offers a snapshot of the applied state at `index` (`data` from the apply loop) for raft
    /// to send to followers behind the compacted log.
    pub fn offer_snapshot(&mut self, index: u64, data: Vec<u8>) {
        let Some(mut snapshot) = self.describe_snapshot(index) else {
            tracing::warn!(
                index,
                "snapshot data for an index no longer in the log; dropped"
            );
            return;
        };
        snapshot.data = data.into();
        self.raw.store().set_latest(snapshot);
    }

    /// Describes a snapshot at `index` (already applied and flushed to the backend) and drops
    /// the in-memory log before it, but for the last `keep` entries (so that a follower a little
    /// behind catches up from the log, not from a whole snapshot). Returns `None` when `index`
    /// is not in the log.
    pub fn compact_to(&mut self, index: u64, keep: u64) -> Option<Snapshot> {
        let snapshot = self.describe_snapshot(index)?;
        // raft's own applied index lags the apply loop's by up to a ready: it still reads the
        // entries after it (for pending configuration changes when it campaigns).
        let first_kept = index
            .saturating_sub(keep)
            .min(self.raw.raft.raft_log.applied + 1);
        let first_index = self.raw.store().mem.first_index().unwrap_or(0);
        if first_kept <= first_index {
            return Some(snapshot);
        }
        if let Err(e) = self.raw.store().mem.wl().compact(first_kept) {
            tracing::warn!(index, error = %e, "raft log compaction skipped");
            return None;
        }
        Some(snapshot)
    }

    /// A snapshot's metadata at `index`: its term and the current configuration (which is
    /// the configuration at `index`, since both come from the apply loop in order).
    fn describe_snapshot(&self, index: u64) -> Option<Snapshot> {
        let term = self.raw.store().mem.term(index).ok()?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(self.conf_state());
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(meta);
        Some(snapshot)
    }
}

/// Is `id` a voter or a learner (in either half of a joint configuration)?
pub fn is_member(conf_state: &ConfState, id: u64) -> bool {
    conf_state.voters.contains(&id)
        || conf_state.learners.contains(&id)
        || conf_state.voters_outgoing.contains(&id)
        || conf_state.learners_next.contains(&id)
}

/// A configuration change of one member (add a voter, add a learner, remove).
pub fn single_change(node_id: u64, change_type: ConfChangeType) -> ConfChangeV2 {
    let mut single = ConfChangeSingle {
        node_id,
        ..Default::default()
    };
    single.set_change_type(change_type);
    let mut change = ConfChangeV2::default();
    change.set_changes(vec![single].into());
    change
}
