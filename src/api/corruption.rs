//! Corruption detection, as etcd does it: members compare `HashKV` at one revision, which every
//! member that applied the same log must agree on.
//! - `--experimental-initial-corrupt-check`: before serving, a member compares its hash with
//!   its peers'; a mismatch raises the CORRUPT alarm for it and stops the start.
//! - `--experimental-corrupt-check-time`: the leader compares every member's hash at its own
//!   revision periodically; a member that disagrees with the majority gets the CORRUPT alarm.
//! - `--experimental-compact-hash-check-enabled`: the leader does the same at each new
//!   compaction's revision (etcd 3.6's compaction hash check).
//!
//! Peers are asked over their client URLs (`Maintenance.HashKV`). Members that cannot answer
//! for the revision (down, behind, compacted past it) are left out of the comparison.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::Endpoint;

use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::{AlarmRequest, AlarmType, HashKvRequest};
use crate::server::{KvServer, ServerError};

const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// One member's answer: its hash and the compaction revision it was taken under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberHash {
    pub hash: u32,
    pub compact_revision: i64,
}

/// A peer's `HashKV` at `revision`, through its first client URL that answers.
async fn peer_hash(urls: &[String], revision: i64) -> Option<MemberHash> {
    for url in urls {
        let Ok(endpoint) = Endpoint::from_shared(url.clone()) else {
            continue;
        };
        let attempt = async {
            let channel = endpoint
                .connect_timeout(PEER_TIMEOUT)
                .connect()
                .await
                .ok()?;
            let answer = MaintenanceClient::new(channel)
                .hash_kv(HashKvRequest { revision })
                .await
                .ok()?
                .into_inner();
            Some(MemberHash {
                hash: answer.hash,
                // -1 is how the API names "never compacted" (etcd's); the store says 0.
                compact_revision: answer.compact_revision.max(0),
            })
        };
        if let Ok(Some(hash)) = tokio::time::timeout(PEER_TIMEOUT, attempt).await {
            return Some(hash);
        }
    }
    None
}

/// Every member's hash at `revision` that could be had, this member's included.
async fn hashes_at(server: &KvServer, revision: i64) -> BTreeMap<u64, MemberHash> {
    let mut hashes = BTreeMap::new();
    if let Ok(local) = server.hash_kv(revision).await {
        hashes.insert(
            server.member_id(),
            MemberHash {
                hash: local.hash,
                compact_revision: local.compact_revision,
            },
        );
    }
    for member in server.members() {
        if member.id == server.member_id() || member.client_ur_ls.is_empty() {
            continue;
        }
        if let Some(hash) = peer_hash(&member.client_ur_ls, revision).await {
            hashes.insert(member.id, hash);
        }
    }
    hashes
}

/// The members whose hash differs from the one that more than half of the cluster's
/// `members` agree on, among those taken under the same compaction revision. Without such a
/// majority (members down, or several versions), nobody is blamed; a disagreement is logged.
pub fn outliers(hashes: &BTreeMap<u64, MemberHash>, members: usize) -> Vec<u64> {
    let mut votes: BTreeMap<MemberHash, usize> = BTreeMap::new();
    for hash in hashes.values() {
        *votes.entry(*hash).or_default() += 1;
    }
    let Some((&majority, &count)) = votes.iter().max_by_key(|(_, n)| **n) else {
        return vec![];
    };
    if count * 2 <= members {
        if votes.len() > 1 {
            tracing::error!(
                ?hashes,
                members,
                "members' hashes disagree, and no majority of the cluster agrees on one"
            );
        }
        return vec![];
    }
    hashes
        .iter()
        .filter(|(_, h)| h.compact_revision == majority.compact_revision && **h != majority)
        .map(|(id, _)| *id)
        .collect()
}

impl PartialOrd for MemberHash {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MemberHash {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.compact_revision, self.hash).cmp(&(other.compact_revision, other.hash))
    }
}

/// Tries at raising CORRUPT after a failed initial check, and the pause between them.
const RAISE_ATTEMPTS: u32 = 10;
const RAISE_RETRY: Duration = Duration::from_millis(300);

async fn raise_corrupt(server: &KvServer, member_id: u64) -> Result<(), ServerError> {
    server
        .alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id,
            alarm: AlarmType::Corrupt as i32,
        })
        .await
        .map(drop)
}

/// Compares the members' hashes at `revision`; raises CORRUPT for each outlier. Returns them.
pub async fn check_at(server: &KvServer, revision: i64) -> Vec<u64> {
    let hashes = hashes_at(server, revision).await;
    let bad = outliers(&hashes, server.members().len());
    for member in &bad {
        tracing::error!(
            revision,
            member = format!("{member:x}"),
            ?hashes,
            "found data inconsistency: the member's HashKV differs from its peers'; raising the CORRUPT alarm"
        );
        if let Err(e) = raise_corrupt(server, *member).await {
            tracing::error!(error = %e, "cannot raise the CORRUPT alarm");
        }
    }
    bad
}

/// `--experimental-initial-corrupt-check`: this member's hash against each peer's at its own
/// revision; `Err` (after raising CORRUPT for this member) on a mismatch with any peer under
/// the same compaction.
pub async fn initial_check(server: &KvServer) -> Result<(), String> {
    let local = server
        .hash_kv(0)
        .await
        .map_err(|e| format!("initial corruption check: {e}"))?;
    let mut checked = 0;
    for member in server.members() {
        if member.id == server.member_id() || member.client_ur_ls.is_empty() {
            continue;
        }
        let Some(peer) = peer_hash(&member.client_ur_ls, local.hash_revision).await else {
            tracing::warn!(
                peer = format!("{:x}", member.id),
                "initial corruption check: cannot get the peer's hash; skipped"
            );
            continue;
        };
        checked += 1;
        if peer.compact_revision == local.compact_revision && peer.hash != local.hash {
            tracing::error!(
                revision = local.hash_revision,
                local_hash = local.hash,
                peer = format!("{:x}", member.id),
                peer_hash = peer.hash,
                "initial corruption check: this member's data differs from its peer's"
            );
            // A member that has just started may not know its leader yet: a few tries.
            for attempt in 1..=RAISE_ATTEMPTS {
                match raise_corrupt(server, server.member_id()).await {
                    Ok(()) => break,
                    Err(e) if attempt == RAISE_ATTEMPTS => tracing::error!(
                        error = %e,
                        "initial corruption check: cannot raise the CORRUPT alarm"
                    ),
                    Err(_) => tokio::time::sleep(RAISE_RETRY).await,
                }
            }
            return Err(format!(
                "member {:x} found data inconsistency with peers at revision {}: restore its data dir from a snapshot or remove the member and add it back",
                server.member_id(),
                local.hash_revision
            ));
        }
    }
    tracing::info!(
        revision = local.hash_revision,
        peers_checked = checked,
        "initial corruption check passed"
    );
    Ok(())
}

/// The leader's periodic checks: every `period` (if not zero) at its newest revision, and every
/// `compaction_period` (if set) at a compaction revision not checked yet. Runs until the
/// member stops.
pub async fn run_checks(
    server: KvServer,
    period: Option<Duration>,
    compaction_period: Option<Duration>,
) {
    let tick = [period, compaction_period]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::ZERO);
    if tick.is_zero() {
        return;
    }
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = tokio::time::Instant::now();
    let (mut next_full, mut next_compaction) = (period, compaction_period);
    let mut last_compaction_checked = 0;
    while !server.stopped() {
        every.tick().await;
        let status = server.status();
        if status.leader != server.member_id() {
            continue;
        }
        let elapsed = start.elapsed();
        if let Some(at) = next_full.filter(|at| elapsed >= *at) {
            check_at(&server, status.revision).await;
            next_full = period.map(|p| at + p);
        }
        if let Some(at) = next_compaction.filter(|at| elapsed >= *at) {
            let compacted = server.compact_revision();
            if compacted > last_compaction_checked {
                check_at(&server, compacted).await;
                last_compaction_checked = compacted;
            }
            next_compaction = compaction_period.map(|p| at + p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(hash: u32, compact_revision: i64) -> MemberHash {
        MemberHash {
            hash,
            compact_revision,
        }
    }

    #[test]
    fn the_member_that_disagrees_with_the_majority_is_the_outlier() {
        let agree: BTreeMap<u64, MemberHash> =
            [(1, hash(7, 0)), (2, hash(7, 0)), (3, hash(7, 0))].into();
        assert!(outliers(&agree, 3).is_empty());
        let one_off: BTreeMap<u64, MemberHash> =
            [(1, hash(7, 0)), (2, hash(9, 0)), (3, hash(7, 0))].into();
        assert_eq!(outliers(&one_off, 3), vec![2]);
        // A member under another compaction is not comparable: not blamed.
        let other_compaction: BTreeMap<u64, MemberHash> =
            [(1, hash(7, 5)), (2, hash(9, 0)), (3, hash(7, 5))].into();
        assert!(outliers(&other_compaction, 3).is_empty());
        // Two members that disagree: no majority, nobody blamed.
        let tie: BTreeMap<u64, MemberHash> = [(1, hash(7, 0)), (2, hash(9, 0))].into();
        assert!(outliers(&tie, 3).is_empty());
        // A plurality is not a majority: of five, two agreeing blame nobody.
        let plurality: BTreeMap<u64, MemberHash> = [
            (1, hash(7, 0)),
            (2, hash(7, 0)),
            (3, hash(8, 0)),
            (4, hash(9, 0)),
        ]
        .into();
        assert!(outliers(&plurality, 5).is_empty());
        // Three of five agreeing do.
        let mut majority = plurality.clone();
        majority.insert(5, hash(7, 0));
        assert_eq!(outliers(&majority, 5), vec![3, 4]);
    }
}
