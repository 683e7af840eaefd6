//! Everything the run observes, in one place: the timeline, the nodes' roles, and what each
//! node applied (log entries and state fingerprints), kept as the facts the Raft-safety checker
//! judges. Fed by `quorumkv::hooks` observations and by the simulator's own actions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use protobuf::Message as _;
use quorumkv::hooks::{ImageEvent, Observation};
use quorumkv::mvcc::MvccStore;
use quorumkv::proto::etcdserverpb::RangeRequest;
use raft::eraftpb::{ConfChangeType, ConfChangeV2, EntryType};

use crate::trace::{Event, EventKind, Fnv, Role};

/// A committed entry as one node applied it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedEntry {
    pub term: u64,
    pub fingerprint: u64,
    pub node: u64,
}

/// A membership change some node applied (the first time it was seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedChange {
    pub index: u64,
    pub node_id: u64,
    pub change: ConfChangeType,
}

#[derive(Default)]
pub struct Facts {
    pub events: Vec<Event>,
    pub roles: HashMap<u64, (u64, Role)>,
    /// Term → the nodes that were leader in it.
    pub leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// Index → the first node's entry; mismatches go to `violations`.
    pub applied: HashMap<u64, AppliedEntry>,
    /// Index → (state fingerprint, first node).
    pub states: HashMap<u64, (u64, u64)>,
    pub changes: Vec<AppliedChange>,
    /// Raft-safety violations, in the order found (kept short).
    pub violations: Vec<String>,
    pub entries_applied: u64,
    /// Snapshot image transfers started, resent from an offset, and received whole.
    pub images_started: u64,
    pub image_resends: u64,
    pub images_received: u64,
    /// Index → the applied entries that change the auth store or carry a user's request
    /// (the first node's), for `check::auth`.
    pub auth_entries: BTreeMap<u64, quorumkv::proto::quorumkvpb::RaftRequest>,
    /// (voter, term) → the candidate it granted its vote to.
    pub votes: HashMap<(u64, u64), u64>,
}

/// Violations kept, at most (the first one matters).
const VIOLATIONS_KEPT: usize = 20;

#[derive(Clone)]
pub struct Recorder {
    facts: Arc<Mutex<Facts>>,
    start: tokio::time::Instant,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            facts: Arc::default(),
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn lock(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn event(&self, kind: EventKind) {
        let at_us = self.now_us();
        self.lock().events.push(Event { at_us, kind });
    }

    fn violation(facts: &mut Facts, at_us: u64, what: String) {
        if facts.violations.len() < VIOLATIONS_KEPT {
            facts
                .violations
                .push(format!("{:.3}s {what}", at_us as f64 / 1e6));
        }
    }

    /// `voter` granted its vote to `candidate` in `term` (seen on the network): a node votes
    /// at most once per term, across restarts too.
    pub fn vote(&self, voter: u64, term: u64, candidate: u64) {
        let at_us = self.now_us();
        let mut facts = self.lock();
        match facts.votes.insert((voter, term), candidate) {
            Some(earlier) if earlier != candidate => Self::violation(
                &mut facts,
                at_us,
                format!("node {voter} voted for both {earlier} and {candidate} in term {term}"),
            ),
            _ => {}
        }
    }

    /// A node went down: its role is `Down` until it reports again.
    pub fn node_down(&self, node: u64) {
        let at_us = self.now_us();
        let mut facts = self.lock();
        let term = facts.roles.get(&node).map_or(0, |(term, _)| *term);
        facts.roles.insert(node, (term, Role::Down));
        facts.events.push(Event {
            at_us,
            kind: EventKind::Role {
                node,
                term,
                role: Role::Down,
            },
        });
    }

    pub fn observe(&self, observation: &Observation) {
        let at_us = self.now_us();
        let mut facts = self.lock();
        match observation {
            Observation::Role { node, term, role } => {
                let role = Role::from_raft(*role);
                if facts.roles.get(node) == Some(&(*term, role)) {
                    return;
                }
                facts.roles.insert(*node, (*term, role));
                facts.events.push(Event {
                    at_us,
                    kind: EventKind::Role {
                        node: *node,
                        term: *term,
                        role,
                    },
                });
                if role == Role::Leader {
                    let leaders = facts.leaders.entry(*term).or_default();
                    leaders.insert(*node);
                    if leaders.len() > 1 {
                        let who = format!("{leaders:?}");
                        Self::violation(
                            &mut facts,
                            at_us,
                            format!("two leaders in term {term}: nodes {who}"),
                        );
                    }
                }
            }
            Observation::ImageTransfer { event, .. } => match event {
                ImageEvent::Started => facts.images_started += 1,
                ImageEvent::Resent => facts.image_resends += 1,
                ImageEvent::Received => facts.images_received += 1,
            },
            Observation::Applied { node, entry } => {
                let mut hash = Fnv::default();
                hash.write_u64(entry.get_entry_type() as u64);
                hash.write(&entry.data);
                let seen = AppliedEntry {
                    term: entry.term,
                    fingerprint: hash.finish(),
                    node: *node,
                };
                facts.entries_applied += 1;
                match facts.applied.get(&entry.index).copied() {
                    None => {
                        facts.applied.insert(entry.index, seen);
                        if entry.get_entry_type() == EntryType::EntryNormal {
                            if let Some(request) = crate::auth::auth_relevant(&entry.data) {
                                facts.auth_entries.insert(entry.index, request);
                            }
                        }
                        if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
                            if let Ok(change) = ConfChangeV2::parse_from_bytes(&entry.data) {
                                for single in change.get_changes() {
                                    facts.changes.push(AppliedChange {
                                        index: entry.index,
                                        node_id: single.node_id,
                                        change: single.get_change_type(),
                                    });
                                }
                            }
                        }
                    }
                    Some(first)
                        if first.term != seen.term || first.fingerprint != seen.fingerprint =>
                    {
                        Self::violation(
                            &mut facts,
                            at_us,
                            format!(
                                "log mismatch at index {}: node {} applied term {} entry {:016x}, node {} applied term {} entry {:016x}",
                                entry.index, first.node, first.term, first.fingerprint, node, seen.term, seen.fingerprint
                            ),
                        );
                    }
                    Some(_) => {}
                }
            }
            Observation::State { node, index, store } => {
                let fingerprint = state_fingerprint(store);
                match facts.states.get(index).copied() {
                    None => {
                        facts.states.insert(*index, (fingerprint, *node));
                    }
                    Some((first, first_node)) if first != fingerprint => {
                        Self::violation(
                            &mut facts,
                            at_us,
                            format!(
                                "state divergence at applied index {index}: node {first_node} has state {first:016x}, node {node} has {fingerprint:016x}"
                            ),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Every live key with its value, versions and revisions, and the store's revision.
pub fn state_fingerprint(store: &MvccStore) -> u64 {
    let mut hash = Fnv::default();
    hash.write_u64(store.current_rev() as u64);
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    match store.range(&all) {
        Ok(response) => {
            for kv in response.kvs {
                hash.write(&kv.key);
                hash.write(&kv.value);
                for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
                    hash.write_u64(n as u64);
                }
            }
        }
        Err(e) => hash.write(e.to_string().as_bytes()),
    }
    hash.finish()
}
