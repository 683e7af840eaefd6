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

    /// Does raft still wait on the snapshot it sent `to`?
    pub fn awaits_snapshot(&self, to: u64) -> bool {
        self.snapshots_in_flight.contains_key(&to)
            && self
                .raw
                .raft
                .prs()
                .get(to)
                .is_some_and(|pr| pr.state == ProgressState::Snapshot)
    }

    /// The snapshot to `to` is on its way (its image's transfer progressed): its clock starts
    /// again.
    pub fn snapshot_progressed(&mut self, to: u64) {
        if let Some(ticks) = self.snapshots_in_flight.get_mut(&to) {
            *ticks = 0;
        }
    }

    /// The shell sent `msg`: a snapshot starts its clock.
    pub fn sent(&mut self, msg: &Message) {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.snapshots_in_flight.insert(msg.to, 0);
        }
    }

    /// Steps a message that arrived from a peer. Peer bytes are untrusted: a message that no
    /// correct member could have sent is refused here, before raft sees it, because raft-rs
    /// treats some such messages as fatal (it panics). Refusing is always safe: to raft it is a
    /// message lost on the network.
    pub fn step_from_peer(&mut self, msg: Message) -> Result<(), PeerMessageRefused> {
        check_peer_message(&msg, self.id()).map_err(PeerMessageRefused)?;
        self.check_against_log(&msg).map_err(PeerMessageRefused)?;
        self.raw
            .step(msg)
            .map_err(|e| PeerMessageRefused(e.to_string()))
    }

    /// Checks what a correct peer's message satisfies given this node's own log.
    fn check_against_log(&self, msg: &Message) -> Result<(), String> {
        let log = &self.raw.raft.raft_log;
        if msg.get_msg_type() == MessageType::MsgTransferLeader
            && self.raw.raft.state != StateRole::Leader
        {
            // Followers forward a transfer request only after raft stamped their term on it,
            // which a follower here could not forward again (raft-rs panics).
            return Err("a leadership transfer request to a member that does not lead".into());
        }
        if msg.get_msg_type() == MessageType::MsgHeartbeat && msg.commit > log.last_index() {
            // A leader's heartbeat carries at most what this member acknowledged having.
            return Err(format!(
                "heartbeat commits {} beyond this member's last entry {}",
                msg.commit,
                log.last_index()
            ));
        }
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            let meta = msg.get_snapshot().get_metadata();
            let ours = log.term(meta.index).ok().filter(|term| *term != 0);
            if meta.index <= log.committed && ours.is_some_and(|term| term != meta.term) {
                // Committed entries are the same on every member: this contradicts ours.
                return Err(format!(
                    "snapshot at committed index {} claims term {}, this member has term {:?}",
                    meta.index, meta.term, ours
                ));
            }
        }
        Ok(())
    }

    /// The index of the first entry still in the in-memory log.
    pub fn first_index(&self) -> u64 {
        self.raw.store().mem.first_index().unwrap_or(1)
    }

    /// The index of the last entry in the in-memory log.
    pub fn last_index(&self) -> u64 {
        self.raw.store().mem.last_index().unwrap_or(0)
    }

    /// Entries `low..high` of the in-memory log (empty when they are not all there).
    pub fn log_entries(&self, low: u64, high: u64) -> Vec<Entry> {
        if low >= high || low < self.first_index() || high > self.last_index() + 1 {
            return Vec::new();
        }
        self.raw
            .store()
            .mem
            .entries(low, high, None, raft::GetEntriesContext::empty(false))
            .unwrap_or_default()
    }

    /// The hard state as raft last handed it out to persist.
    pub fn hard_state(&self) -> HardState {
        self.raw.store().mem.rl().hard_state().clone()
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
        let committed = light.take_committed_entries();
        if let Some(last) = committed.last() {
            // Handed to the apply loop now, as the ready's own committed entries are (which
            // `advance` counts applied). Without this, raft's applied index stayed behind on a
            // member whose entries commit as they are persisted (a single member): after a
            // restart it never passed the configuration-change guard raft sets when it becomes
            // leader, and refused every membership change.
            self.raw.advance_apply_to(last.index);
        }
        PersistedWork {
            messages: light.take_messages(),
            committed,
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

    /// The snapshot offered cannot be sent (its image is gone): the next one raft asks for is
    /// built anew.
    pub fn forget_offered_snapshot(&mut self) {
        self.raw.store().forget_latest();
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

/// The largest term or index a peer's message may carry (2^62).
pub const MAX_PEER_NUMBER: u64 = 1 << 62;

/// Why a message from a peer was not stepped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer message refused: {0}")]
pub struct PeerMessageRefused(pub String);

/// Checks what a correct peer's message always satisfies, whatever the state of this node.
fn check_peer_message(msg: &Message, own_id: u64) -> Result<(), String> {
    if msg.to != own_id {
        return Err(format!(
            "addressed to {}, not to this member {own_id}",
            msg.to
        ));
    }
    if msg.from == own_id || msg.from == raft::INVALID_ID {
        return Err(format!("claims to come from member {}", msg.from));
    }
    // No real cluster reaches such terms or indexes; raft-rs adds to them unchecked.
    let meta = msg.get_snapshot().get_metadata();
    let numbers = [
        msg.term,
        msg.log_term,
        msg.index,
        msg.commit,
        msg.reject_hint,
    ]
    .into_iter()
    .chain([meta.term, meta.index])
    .chain(msg.get_entries().iter().flat_map(|e| [e.term, e.index]));
    if let Some(too_big) = numbers.into_iter().find(|n| *n > MAX_PEER_NUMBER) {
        return Err(format!(
            "a term or index of {too_big} is beyond any real log"
        ));
    }
    let kind = msg.get_msg_type();
    // raft sends every message with its term but forwarded proposals and read requests; to
    // raft-rs a message without one is local, exempt from the term checks.
    let forwarded = matches!(kind, MessageType::MsgPropose | MessageType::MsgReadIndex);
    if (msg.term == 0) != forwarded {
        return Err(format!("{kind:?} in term {}", msg.term));
    }
    if kind == MessageType::MsgPropose && msg.get_entries().is_empty() {
        return Err("a forwarded proposal without entries".to_string());
    }
    let is_read = matches!(
        kind,
        MessageType::MsgReadIndex | MessageType::MsgReadIndexResp
    );
    if is_read && msg.get_entries().len() != 1 {
        // The one entry carries the read request's context.
        return Err(format!("{kind:?} with {} entries", msg.get_entries().len()));
    }
    if kind == MessageType::MsgAppend {
        check_appended_entries(msg)?;
    }
    if kind == MessageType::MsgSnapshot {
        check_snapshot(msg)?;
    }
    Ok(())
}

/// An append's entries continue its (index, log term) contiguously, in terms that never go
/// back and never pass the sender's own term.
fn check_appended_entries(msg: &Message) -> Result<(), String> {
    if (msg.index == 0) != (msg.log_term == 0) {
        // raft reads the term of an index past its log as 0: such an append would "match".
        return Err(format!(
            "append after index {} of term {}",
            msg.index, msg.log_term
        ));
    }
    let mut expected_index = msg.index;
    let mut floor_term = msg.log_term;
    for entry in msg.get_entries() {
        expected_index = expected_index
            .checked_add(1)
            .ok_or("entry index overflows")?;
        if entry.index != expected_index {
            return Err(format!(
                "entry {} where entry {expected_index} belongs",
                entry.index
            ));
        }
        if entry.term < floor_term || entry.term > msg.term {
            return Err(format!(
                "entry {} of term {} out of order (previous term {floor_term}, sender's term {})",
                entry.index, entry.term, msg.term
            ));
        }
        floor_term = entry.term;
    }
    Ok(())
}

/// A snapshot names a real (term, index) and a configuration raft can restore.
fn check_snapshot(msg: &Message) -> Result<(), String> {
    let meta = msg.get_snapshot().get_metadata();
    if meta.index == 0 || meta.term == 0 || meta.term > msg.term {
        return Err(format!(
            "snapshot at index {} of term {} from a sender in term {}",
            meta.index, meta.term, msg.term
        ));
    }
    let conf = meta.get_conf_state();
    let lists = [
        &conf.voters,
        &conf.learners,
        &conf.voters_outgoing,
        &conf.learners_next,
    ];
    let mut seen = std::collections::BTreeSet::new();
    for id in conf.voters.iter().chain(&conf.learners) {
        if *id == raft::INVALID_ID || !seen.insert(*id) {
            return Err(format!(
                "snapshot configuration {conf:?} repeats or zeroes member {id}"
            ));
        }
    }
    let outgoing: std::collections::BTreeSet<u64> = conf.voters_outgoing.iter().copied().collect();
    let well_formed = !conf.voters.is_empty()
        && lists.iter().all(|ids| {
            let unique: std::collections::BTreeSet<_> = ids.iter().collect();
            unique.len() == ids.len() && !unique.contains(&raft::INVALID_ID)
        })
        && conf
            .learners_next
            .iter()
            .all(|id| outgoing.contains(id) && !conf.voters.contains(id))
        && conf.learners.iter().all(|id| !outgoing.contains(id));
    if !well_formed {
        return Err(format!("snapshot configuration {conf:?} is malformed"));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    //! Peer messages the `peer_message` fuzz target found to crash raft-rs (it panics on them)
    //! or to corrupt the log; each is now refused by `step_from_peer`.

    use super::*;

    /// Member 1 of three, a follower in term 2 with entries 1..=4 (entry 4 committed).
    fn follower() -> RaftCore {
        let entries: Vec<Entry> = (1..=4)
            .map(|index| Entry {
                term: 1 + index / 3,
                index,
                ..Default::default()
            })
            .collect();
        let hard_state = HardState {
            term: 2,
            commit: 4,
            ..Default::default()
        };
        let options = CoreOptions {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 1,
            applied: 0,
        };
        RaftCore::new(
            &options,
            None,
            &entries,
            hard_state,
            &[1, 2, 3],
            Arc::new(SnapshotRequests::default()),
        )
        .unwrap()
    }

    fn message(kind: MessageType, term: u64) -> Message {
        let mut msg = Message::default();
        msg.set_msg_type(kind);
        msg.from = 2;
        msg.to = 1;
        msg.term = term;
        msg
    }

    fn refused(msg: Message) {
        let mut core = follower();
        let before = (core.term(), core.last_index(), core.commit_index());
        let result = core.step_from_peer(msg.clone());
        assert!(result.is_err(), "{msg:?} was stepped");
        while core.take_ready().is_some() {
            core.persisted();
        }
        let after = (core.term(), core.last_index(), core.commit_index());
        assert_eq!(before, after, "a refused message changed nothing");
    }

    #[test]
    fn vote_request_without_term_is_refused() {
        refused(message(MessageType::MsgRequestVote, 0));
    }

    #[test]
    fn heartbeat_without_term_is_refused() {
        refused(message(MessageType::MsgHeartbeat, 0));
    }

    #[test]
    fn heartbeat_committing_past_the_log_is_refused() {
        let mut msg = message(MessageType::MsgHeartbeat, 2);
        msg.commit = 7;
        refused(msg);
    }

    #[test]
    fn append_after_an_index_past_the_log_with_term_zero_is_refused() {
        let mut msg = message(MessageType::MsgAppend, 5);
        msg.index = 7;
        msg.commit = 53_201;
        refused(msg);
    }

    #[test]
    fn append_with_entries_out_of_place_or_order_is_refused() {
        let mut msg = message(MessageType::MsgAppend, 3);
        msg.index = 4;
        msg.log_term = 2;
        msg.set_entries(
            vec![Entry {
                term: 3,
                index: 3,
                ..Default::default()
            }]
            .into(),
        );
        refused(msg.clone());
        msg.set_entries(
            vec![Entry {
                term: 4,
                index: 5,
                ..Default::default()
            }]
            .into(),
        );
        refused(msg);
    }

    #[test]
    fn empty_forwarded_proposal_is_refused() {
        refused(message(MessageType::MsgPropose, 0));
    }

    #[test]
    fn read_index_with_a_term_or_without_its_context_entry_is_refused() {
        let mut msg = message(MessageType::MsgReadIndex, 3);
        msg.set_entries(vec![Entry::default()].into());
        refused(msg);
        refused(message(MessageType::MsgReadIndex, 0));
    }

    #[test]
    fn snapshot_with_a_malformed_configuration_is_refused() {
        let mut msg = message(MessageType::MsgSnapshot, 3);
        let mut meta = SnapshotMetadata {
            index: 9,
            term: 3,
            ..Default::default()
        };
        meta.set_conf_state(ConfState::from((vec![1, 1, 2], vec![2])));
        msg.mut_snapshot().set_metadata(meta);
        refused(msg);
    }

    #[test]
    fn snapshot_contradicting_a_committed_entry_is_refused() {
        let mut msg = message(MessageType::MsgSnapshot, 3);
        let mut meta = SnapshotMetadata {
            index: 4,
            term: 3,
            ..Default::default()
        };
        meta.set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        msg.mut_snapshot().set_metadata(meta);
        refused(msg);
    }

    #[test]
    fn terms_and_indexes_near_the_end_of_u64_are_refused() {
        let mut msg = message(MessageType::MsgRequestPreVoteResponse, u64::MAX);
        refused(msg.clone());
        msg.term = 3;
        msg.commit = u64::MAX - 7;
        refused(msg);
    }

    #[test]
    fn transfer_request_to_a_follower_is_refused() {
        refused(message(MessageType::MsgTransferLeader, 7));
    }

    #[test]
    fn a_good_append_is_stepped() {
        let mut core = follower();
        let mut msg = message(MessageType::MsgAppend, 2);
        msg.index = 4;
        msg.log_term = 2;
        msg.commit = 5;
        msg.set_entries(
            vec![Entry {
                term: 2,
                index: 5,
                ..Default::default()
            }]
            .into(),
        );
        core.step_from_peer(msg).unwrap();
        while core.take_ready().is_some() {
            core.persisted();
        }
        assert_eq!((core.last_index(), core.commit_index()), (5, 5));
    }
}
