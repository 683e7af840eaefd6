//! Forwarded proposals are the one raft message that is not idempotent: a follower forwards a
//! client's proposal to the leader as `MsgPropose`, and a copy delivered twice (a network that
//! duplicates, a retransmit after a reconnect) would be appended, committed and applied twice.
//! Every proposal carries a unique request id, so a node drops a forwarded proposal whose
//! bytes it has already taken recently.
//!
//! A forwarded `MsgReadIndex` is the other: raft matches heartbeat acks to read rounds by
//! context, and a copy queued again after its round completed could be completed by a stale
//! ack to the first copy, taking every round queued before it along. Read contexts are unique
//! per attempt, so the same rule applies.

use std::collections::{HashSet, VecDeque};

use raft::eraftpb::{Message, MessageType};

use crate::hash::fnv1a;

/// Forwarded proposals remembered, at most (several seconds of forwarded writes).
pub const REMEMBERED_PROPOSALS: usize = 16 * 1024;

#[derive(Default)]
pub struct ForwardedProposals {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

impl ForwardedProposals {
    /// `false` when `msg` is a forwarded proposal already taken: drop it.
    pub fn first_time(&mut self, msg: &Message) -> bool {
        let forwarded = matches!(
            msg.get_msg_type(),
            MessageType::MsgPropose | MessageType::MsgReadIndex
        );
        if !forwarded || msg.entries.is_empty() {
            return true;
        }
        let fingerprint = fingerprint(msg);
        if !self.seen.insert(fingerprint) {
            return false;
        }
        self.order.push_back(fingerprint);
        if self.order.len() > REMEMBERED_PROPOSALS {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        true
    }
}

/// FNV-1a over the message type and the entries' types and data (the data holds the unique
/// request id, or the read context).
fn fingerprint(msg: &Message) -> u64 {
    fnv1a(
        std::iter::once(msg.get_msg_type() as u8).chain(msg.entries.iter().flat_map(|entry| {
            std::iter::once(entry.get_entry_type() as u8)
                .chain((entry.data.len() as u64).to_le_bytes())
                .chain(entry.data.iter().copied())
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::Entry;

    fn proposal(data: &[u8]) -> Message {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgPropose);
        let entry = Entry {
            data: data.to_vec().into(),
            ..Default::default()
        };
        msg.set_entries(vec![entry].into());
        msg
    }

    #[test]
    fn a_duplicated_forwarded_proposal_is_taken_once() {
        let mut seen = ForwardedProposals::default();
        assert!(seen.first_time(&proposal(b"request 1")));
        assert!(seen.first_time(&proposal(b"request 2")));
        assert!(!seen.first_time(&proposal(b"request 1")));
    }

    #[test]
    fn a_duplicated_forwarded_read_is_taken_once_and_is_not_a_proposal() {
        let mut seen = ForwardedProposals::default();
        let mut read = proposal(b"context 1");
        read.set_msg_type(MessageType::MsgReadIndex);
        assert!(seen.first_time(&read));
        assert!(!seen.first_time(&read));
        assert!(seen.first_time(&proposal(b"context 1")));
    }

    #[test]
    fn other_messages_are_never_dropped() {
        let mut seen = ForwardedProposals::default();
        let mut append = proposal(b"x");
        append.set_msg_type(MessageType::MsgAppend);
        assert!(seen.first_time(&append));
        assert!(seen.first_time(&append));
    }

    #[test]
    fn memory_is_bounded() {
        let mut seen = ForwardedProposals::default();
        for i in 0..(REMEMBERED_PROPOSALS + 10) {
            assert!(seen.first_time(&proposal(&i.to_le_bytes())));
        }
        assert_eq!(seen.order.len(), REMEMBERED_PROPOSALS);
        assert_eq!(seen.seen.len(), REMEMBERED_PROPOSALS);
        // The oldest was forgotten.
        assert!(seen.first_time(&proposal(&0usize.to_le_bytes())));
    }
}
