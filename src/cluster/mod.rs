//! Cluster membership: each member's id, name, peer and client URLs, and whether it is a
//! learner. It changes only by applying committed log entries (configuration changes, a
//! member's published attributes, a peer URL update), in log order, so every member holds the
//! same table at the same index. It lives in the backend as records, so snapshots carry it.

use std::collections::BTreeMap;

use prost::Message as _;
use raft::eraftpb::{ConfChangeType, ConfChangeV2};

use crate::mvcc::{MvccError, MvccStore};
use crate::proto::etcdserverpb::Member;
use crate::proto::quorumkvpb::{MemberAttributes, MemberPeerUrls};

/// Record names: `members/<id as 16 hex digits>`.
pub const MEMBER_RECORD_PREFIX: &str = "members/";
/// etcd allows one learner at a time.
pub const MAX_LEARNERS: usize = 1;
/// A learner is ready to be promoted once its log matches at least this share of the leader's.
pub const LEARNER_READY_PERCENT: u64 = 90;

/// FNV-1a over `parts`, each ended by a zero byte; never 0 (no member or cluster id is 0).
fn id_of(parts: &[&str]) -> u64 {
    crate::hash::fnv1a(
        parts
            .iter()
            .flat_map(|part| part.bytes().chain(std::iter::once(0))),
    )
    .max(1)
}

/// `--initial-cluster` (`name=url,...`, a name may repeat for more URLs) as (name, peer URLs)
/// in the order given; `local_name` must be among them.
pub fn parse_initial_cluster(
    text: &str,
    local_name: &str,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, url) = item
            .split_once('=')
            .ok_or_else(|| format!("invalid --initial-cluster entry {item:?} (want name=url)"))?;
        match members.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => members.push((name.to_string(), vec![url.to_string()])),
        }
    }
    if !members.iter().any(|(n, _)| n == local_name) {
        return Err(format!(
            "couldn't find local name {local_name:?} in the initial cluster configuration"
        ));
    }
    Ok(members)
}

/// A new cluster's id and members (id, name, peer URLs), the same on every member: each id
/// follows from the member's peer URLs and the cluster token, the cluster's from the ids.
pub fn new_cluster_members(members: &[(String, Vec<String>)], token: &str) -> (u64, Vec<Member>) {
    let list: Vec<Member> = members
        .iter()
        .map(|(name, urls)| {
            let mut sorted = urls.clone();
            sorted.sort();
            Member {
                id: id_of(&[&sorted.join(","), token]),
                name: name.clone(),
                peer_ur_ls: urls.clone(),
                ..Default::default()
            }
        })
        .collect();
    let mut ids: Vec<u64> = list.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    let id_strings: Vec<String> = ids.iter().map(|id| format!("{id:x}")).collect();
    let id_refs: Vec<&str> = id_strings.iter().map(String::as_str).collect();
    (id_of(&id_refs), list)
}

fn record_name(id: u64) -> String {
    format!("{MEMBER_RECORD_PREFIX}{id:016x}")
}

/// One record to write (or delete, `None`) after a change.
pub type RecordChange = (String, Option<Vec<u8>>);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Members {
    by_id: BTreeMap<u64, Member>,
}

impl Members {
    pub fn new(members: impl IntoIterator<Item = Member>) -> Self {
        Members {
            by_id: members.into_iter().map(|m| (m.id, m)).collect(),
        }
    }

    /// The table kept in `store`'s backend.
    pub fn load(store: &MvccStore) -> Result<Self, MvccError> {
        let mut members = Members::default();
        for (name, value) in store.records(MEMBER_RECORD_PREFIX)? {
            let member = Member::decode(value.as_slice()).map_err(|e| MvccError::Corrupt {
                main: -1,
                sub: -1,
                reason: format!("member record {name}: {e}"),
            })?;
            members.by_id.insert(member.id, member);
        }
        Ok(members)
    }

    /// Every record of the table, to write into an empty backend.
    pub fn records(&self) -> Vec<RecordChange> {
        self.by_id
            .values()
            .map(|m| (record_name(m.id), Some(m.encode_to_vec())))
            .collect()
    }

    pub fn list(&self) -> Vec<Member> {
        self.by_id.values().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<&Member> {
        self.by_id.get(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn learners(&self) -> usize {
        self.by_id.values().filter(|m| m.is_learner).count()
    }

    /// The member (other than `except`) that already uses one of `urls` as a peer URL.
    pub fn peer_url_owner(&self, urls: &[String], except: u64) -> Option<u64> {
        self.by_id
            .values()
            .find(|m| m.id != except && m.peer_ur_ls.iter().any(|u| urls.contains(u)))
            .map(|m| m.id)
    }

    /// Applies a committed configuration change. `added` describes the member an add carries
    /// (its peer URLs); a change without one (the simulator's operator) still records the id.
    pub fn apply_conf_change(
        &mut self,
        change: &ConfChangeV2,
        added: Option<&Member>,
    ) -> Vec<RecordChange> {
        let mut changed = Vec::new();
        for single in change.get_changes() {
            let id = single.node_id;
            match single.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    let learner = single.get_change_type() == ConfChangeType::AddLearnerNode;
                    let member = self.by_id.entry(id).or_insert_with(|| Member {
                        id,
                        ..Default::default()
                    });
                    if let Some(added) = added.filter(|a| a.id == id) {
                        if !added.peer_ur_ls.is_empty() {
                            member.peer_ur_ls = added.peer_ur_ls.clone();
                        }
                    }
                    member.is_learner = learner;
                    changed.push((record_name(id), Some(member.encode_to_vec())));
                }
                ConfChangeType::RemoveNode => {
                    if self.by_id.remove(&id).is_some() {
                        changed.push((record_name(id), None));
                    }
                }
            }
        }
        changed
    }

    /// A member published its name and client URLs.
    pub fn set_attributes(&mut self, attributes: &MemberAttributes) -> Vec<RecordChange> {
        let Some(member) = self.by_id.get_mut(&attributes.member_id) else {
            return vec![]; // removed meanwhile
        };
        member.name = attributes.name.clone();
        member.client_ur_ls = attributes.client_urls.clone();
        vec![(record_name(member.id), Some(member.encode_to_vec()))]
    }

    /// MemberUpdate: a member's new peer URLs.
    pub fn set_peer_urls(&mut self, update: &MemberPeerUrls) -> Vec<RecordChange> {
        let Some(member) = self.by_id.get_mut(&update.member_id) else {
            return vec![];
        };
        member.peer_ur_ls = update.peer_urls.clone();
        vec![(record_name(member.id), Some(member.encode_to_vec()))]
    }
}

/// Is a learner whose log matches up to `learner_match` in sync with a leader at `leader_match`?
pub fn learner_ready(learner_match: u64, leader_match: u64) -> bool {
    learner_match.saturating_mul(100) >= leader_match.saturating_mul(LEARNER_READY_PERCENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::single_change;

    fn member(id: u64, url: &str) -> Member {
        Member {
            id,
            peer_ur_ls: vec![url.to_string()],
            ..Default::default()
        }
    }

    #[test]
    fn adding_promoting_and_removing_changes_the_table_and_its_records() {
        let mut members = Members::new([member(1, "http://a:2380")]);
        let added = member(2, "http://b:2380");
        let records = members.apply_conf_change(
            &single_change(2, ConfChangeType::AddLearnerNode),
            Some(&added),
        );
        assert_eq!(records.len(), 1);
        assert!(members.get(2).is_some_and(|m| m.is_learner));
        assert_eq!(members.learners(), 1);
        assert_eq!(
            members.peer_url_owner(&["http://b:2380".into()], 0),
            Some(2)
        );
        assert_eq!(members.peer_url_owner(&["http://b:2380".into()], 2), None);
        // Promotion: AddNode of a learner keeps its URLs.
        members.apply_conf_change(&single_change(2, ConfChangeType::AddNode), None);
        let promoted = members.get(2).cloned().unwrap_or_default();
        assert!(!promoted.is_learner);
        assert_eq!(promoted.peer_ur_ls, vec!["http://b:2380".to_string()]);
        let records =
            members.apply_conf_change(&single_change(1, ConfChangeType::RemoveNode), None);
        assert_eq!(records, vec![(record_name(1), None)]);
        assert_eq!(members.list().len(), 1);
    }

    #[test]
    fn attributes_and_peer_urls_update_a_member_and_ignore_removed_ones() {
        let mut members = Members::new([member(1, "http://a:2380")]);
        members.set_attributes(&MemberAttributes {
            member_id: 1,
            name: "infra1".into(),
            client_urls: vec!["http://a:2379".into()],
        });
        members.set_peer_urls(&MemberPeerUrls {
            member_id: 1,
            peer_urls: vec!["http://a2:2380".into()],
        });
        let m = members.get(1).cloned().unwrap_or_default();
        assert_eq!(m.name, "infra1");
        assert_eq!(m.client_ur_ls, vec!["http://a:2379".to_string()]);
        assert_eq!(m.peer_ur_ls, vec!["http://a2:2380".to_string()]);
        assert!(members
            .set_attributes(&MemberAttributes {
                member_id: 9,
                ..Default::default()
            })
            .is_empty());
    }

    #[test]
    fn the_table_round_trips_through_the_backend() {
        let backend = std::sync::Arc::new(crate::io::MemBackend::new());
        let mut store = MvccStore::open(backend.clone()).expect("open");
        let members = Members::new([member(1, "http://a:2380"), member(7, "http://b:2380")]);
        for (name, value) in members.records() {
            store.stage_record(1, &name, value);
        }
        store.flush_staged().expect("flush");
        let reopened = MvccStore::open(backend).expect("reopen");
        assert_eq!(Members::load(&reopened).expect("load"), members);
        assert_eq!(reopened.consistent_index(), 1);
    }

    #[test]
    fn learner_readiness_is_ninety_percent_of_the_leader_log() {
        assert!(learner_ready(90, 100));
        assert!(!learner_ready(89, 100));
        assert!(learner_ready(0, 0));
    }
}
