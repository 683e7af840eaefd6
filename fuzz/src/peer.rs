//! `peer_message`: untrusted peer bytes stepped into a raft node.
//!
//! Member 1 of a three-voter cluster starts from a log of a few entries (persisted to a real WAL
//! on the simulator's disk), as a follower or, when the input says so, after winning an
//! election. The input then alternates between raw bytes decoded as a peer batch (the decoder
//! the TCP transport uses), messages assembled from the input near the node's own state (so that
//! terms and indexes are plausible and the fuzzer reaches deep into raft), and ticks. Each
//! message goes through `RaftCore::step_from_peer`, then every ready is persisted as the shell
//! does. After every step:
//! - no panic, anywhere (raft-rs's own fatal checks included);
//! - committed entries never change, the commit index never passes the last entry;
//! - the term never goes back, and a vote once cast in a term is never changed;
//! - what the WAL reads back equals the node's log and hard state.

use std::path::Path;
use std::sync::Arc;

use protobuf::{Message as _, ProtobufEnum as _};
use quorumkv::io::transport::{decode_batch, encode_batch};
use quorumkv::io::Disk;
use quorumkv::raft::{CoreOptions, RaftCore, SnapshotRequests};
use quorumkv::wal::{Wal, WalOptions};
use quorumkv_sim::disk::SimDisk;
use raft::eraftpb::{
    ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot, SnapshotMetadata,
};

use crate::entry;
use crate::input::Input;

const ME: u64 = 1;
const VOTERS: [u64; 3] = [1, 2, 3];
const MAX_STEPS: usize = 64;

struct Node {
    core: RaftCore,
    wal: Wal,
    disk: Arc<dyn Disk>,
    /// The newest snapshot persisted (0: none).
    snapshot_index: u64,
    /// Committed entries seen so far, by index: they must never change.
    committed: Vec<Entry>,
    last_hard_state: HardState,
}

impl Node {
    fn new(input: &mut Input) -> Node {
        let disk: Arc<dyn Disk> = Arc::new(SimDisk::new());
        let (mut wal, _) = Wal::open(
            disk.clone(),
            Path::new("/wal"),
            WalOptions { segment_bytes: 512 },
            0,
        )
        .expect("a new log opens");
        let count = 1 + input.below(6);
        let entries: Vec<Entry> = (1..=count)
            .map(|index| entry(1 + index / 3, index, b"x"))
            .collect();
        let term = entries.last().map_or(1, |e| e.term);
        let hard_state = HardState {
            term,
            vote: 0,
            commit: input.below(count + 1),
            ..Default::default()
        };
        wal.append(&entries, Some(&hard_state)).expect("append");
        wal.sync().expect("sync");
        let options = CoreOptions {
            id: ME,
            election_tick: 10,
            heartbeat_tick: 1,
            applied: 0,
        };
        let core = RaftCore::new(
            &options,
            None,
            &entries,
            hard_state.clone(),
            &VOTERS,
            Arc::new(SnapshotRequests::default()),
        )
        .expect("the node starts");
        let mut node = Node {
            core,
            wal,
            disk,
            snapshot_index: 0,
            committed: Vec::new(),
            last_hard_state: hard_state,
        };
        node.persist_and_check();
        node
    }

    /// Persists every ready as the shell does, then checks the invariants.
    fn persist_and_check(&mut self) {
        while let Some(work) = self.core.take_ready() {
            if let Some(snapshot) = &work.snapshot {
                let meta = snapshot.get_metadata();
                self.wal
                    .install_snapshot(meta.term, meta.index)
                    .expect("snapshot install");
                self.snapshot_index = meta.index;
            }
            if !work.entries.is_empty() || work.hard_state.is_some() {
                self.wal
                    .append(&work.entries, work.hard_state.as_ref())
                    .expect("append what raft handed out");
            }
            if work.must_sync {
                self.wal.sync().expect("sync");
            }
            let _ = self.core.persisted();
        }
        self.check();
    }

    fn check(&mut self) {
        let first = self.core.first_index();
        let last = self.core.last_index();
        let commit = self.core.commit_index();
        assert!(
            commit <= last,
            "commit {commit} beyond the last entry {last}"
        );
        let hard_state = self.core.hard_state();
        assert!(
            hard_state.term >= self.last_hard_state.term,
            "term went back from {} to {}",
            self.last_hard_state.term,
            hard_state.term
        );
        if hard_state.term == self.last_hard_state.term && self.last_hard_state.vote != 0 {
            assert_eq!(
                hard_state.vote, self.last_hard_state.vote,
                "changed its vote within term {}",
                hard_state.term
            );
        }
        self.last_hard_state = hard_state;
        // Committed entries still in the log are the ones seen committed before.
        for seen in &self.committed {
            if seen.index >= first && seen.index <= last {
                let now = self.core.log_entries(seen.index, seen.index + 1);
                assert_eq!(
                    now.first(),
                    Some(seen),
                    "committed entry {} changed",
                    seen.index
                );
            }
        }
        let known = self.committed.last().map_or(0, |e| e.index);
        if commit > known && commit >= first {
            let from = (known + 1).max(first);
            self.committed
                .extend(self.core.log_entries(from, commit + 1));
        }
        let log = self.core.log_entries(first, last + 1);
        assert!(
            log.windows(2)
                .all(|w| w[0].index + 1 == w[1].index && w[0].term <= w[1].term),
            "the log is contiguous with non-decreasing terms"
        );
    }

    /// Reopens the WAL and compares it with the node's log.
    fn check_wal(mut self) {
        self.wal.sync().expect("sync");
        drop(self.wal);
        let (_, replay) = Wal::open(
            self.disk.clone(),
            Path::new("/wal"),
            WalOptions { segment_bytes: 512 },
            self.snapshot_index,
        )
        .expect("the WAL the node wrote opens");
        let first = self.core.first_index().max(self.snapshot_index + 1);
        let log = self.core.log_entries(first, self.core.last_index() + 1);
        assert_eq!(replay.entries, log, "the WAL holds the node's log");
        let hard_state = self.core.hard_state();
        assert_eq!(
            (replay.hard_state.term, replay.hard_state.vote),
            (hard_state.term, hard_state.vote),
            "the WAL holds the node's term and vote"
        );
    }

    fn step(&mut self, msg: Message) {
        crate::trace!("step {msg:?}");
        let outcome = self.core.step_from_peer(msg);
        crate::trace!(
            " -> {outcome:?}; last {} commit {}",
            self.core.last_index(),
            self.core.commit_index()
        );
        self.persist_and_check();
    }

    /// Ticks until it campaigns, then grants it the (pre-)votes of member 2.
    fn win_election(&mut self) {
        for _ in 0..40 {
            self.core.tick();
            self.persist_and_check();
            if self.core.role() == raft::StateRole::Leader {
                return;
            }
            let term = self.core.term();
            for (kind, reply_term) in [
                (MessageType::MsgRequestPreVoteResponse, term + 1),
                (MessageType::MsgRequestVoteResponse, term),
            ] {
                let mut vote = Message::default();
                vote.set_msg_type(kind);
                vote.from = 2;
                vote.to = ME;
                vote.term = reply_term;
                self.step(vote);
            }
        }
    }
}

const TYPES: [MessageType; 12] = [
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
];

/// A number near `around` (which makes equal, one-off and far values all likely).
fn near(input: &mut Input, around: u64) -> u64 {
    match input.below(8) {
        0 => input.u64(),
        1 => around.saturating_sub(input.below(8)),
        2 => 0,
        _ => around.saturating_add(input.below(4)),
    }
}

/// A message built from the input around the node's state.
fn assembled(input: &mut Input, node: &Node) -> Message {
    let term = node.core.term();
    let last = node.core.last_index();
    let mut msg = Message::default();
    msg.set_msg_type(if input.below(16) == 0 {
        MessageType::from_i32(i32::from(input.byte() % 20)).unwrap_or(MessageType::MsgHup)
    } else {
        TYPES[input.below(TYPES.len() as u64) as usize]
    });
    msg.from = if input.below(8) == 0 {
        input.below(6)
    } else {
        2 + input.below(2)
    };
    msg.to = if input.below(16) == 0 {
        input.below(4)
    } else {
        ME
    };
    msg.term = near(input, term);
    msg.log_term = near(input, term);
    msg.index = near(input, last);
    msg.commit = near(input, node.core.commit_index());
    msg.reject = input.below(4) == 0;
    msg.reject_hint = near(input, last);
    let count = input.below(4);
    let mut index = msg.index.wrapping_add(1);
    let entries: Vec<Entry> = (0..count)
        .map(|_| {
            let e_index = if input.below(8) == 0 {
                near(input, index)
            } else {
                index
            };
            index = e_index.wrapping_add(1);
            let mut e = entry(near(input, msg.term), e_index, input.take(4));
            if input.below(8) == 0 {
                e.set_entry_type(EntryType::EntryConfChangeV2);
            }
            e
        })
        .collect();
    msg.set_entries(entries.into());
    if msg.get_msg_type() == MessageType::MsgSnapshot {
        let mut meta = SnapshotMetadata {
            index: near(input, last),
            term: near(input, term),
            ..Default::default()
        };
        let voters: Vec<u64> = (0..input.below(4)).map(|_| input.below(5)).collect();
        let learners: Vec<u64> = (0..input.below(2)).map(|_| input.below(5)).collect();
        meta.set_conf_state(ConfState::from((voters, learners)));
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(meta);
        snapshot.data = input.take(8).to_vec().into();
        msg.set_snapshot(snapshot);
    }
    let context_len = input.below(4) as usize;
    msg.context = input.take(context_len).to_vec().into();
    msg
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut node = Node::new(&mut input);
    if input.bool() {
        node.win_election();
    }
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.below(8) {
            0 => {
                // Raw bytes, as they would come off a peer connection.
                let len = input.below(input.remaining() as u64 + 1) as usize;
                if let Some(batch) = decode_batch(input.take(len)) {
                    for msg in batch {
                        node.step(msg);
                    }
                }
            }
            1 => {
                for _ in 0..=input.below(12) {
                    node.core.tick();
                }
                node.persist_and_check();
            }
            _ => {
                let msg = assembled(&mut input, &node);
                // Through the wire encoding, as a peer would send it.
                let wire = encode_batch(std::slice::from_ref(&msg));
                let batch = decode_batch(&wire).expect("an encoded batch decodes");
                assert_eq!(batch.len(), 1);
                assert_eq!(
                    batch[0].write_to_bytes().ok(),
                    msg.write_to_bytes().ok(),
                    "a message survives the wire"
                );
                for msg in batch {
                    node.step(msg);
                }
            }
        }
    }
    node.check_wal();
}
