//! The leader's side of leases: when each lease expires. Only the leader (the "primary")
//! keeps deadlines; it renews leases on keep-alive and, once a deadline passes, asks for the
//! lease to be revoked through raft. A new leader starts every lease afresh from its remaining
//! TTL plus an election timeout, so a leader change never expires leases en masse.
//! Sans-IO: time arrives as milliseconds from the caller's Clock.

use std::collections::{HashMap, HashSet};

use super::LeaseTable;
use crate::proto::etcdserverpb::LeaseCheckpoint;

/// How often the leader looks for expired leases (etcd: 500 ms).
pub const EXPIRY_CHECK_INTERVAL_MS: u64 = 500;
/// How often the leader records long leases' remaining TTLs in the log (etcd: 5 minutes).
pub const CHECKPOINT_INTERVAL_MS: u64 = 5 * 60 * 1000;
/// Revokes asked for per check, at most (etcd revokes up to 1000 leases a second).
pub const MAX_REVOKES_PER_CHECK: usize = 500;
/// Checkpoints per log entry, at most (etcd: 1000).
pub const MAX_CHECKPOINTS_PER_ENTRY: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewError {
    /// Unknown, revoked, or past its deadline (its revoke is on the way).
    NotFound,
    /// Only the leader renews leases.
    NotPrimary,
}

#[derive(Debug, Default)]
pub struct Lessor {
    primary: bool,
    /// Each lease's deadline, in the clock's milliseconds.
    deadlines: HashMap<i64, u64>,
    /// Leases whose revoke was asked for and has not yet been applied or failed.
    expiring: HashSet<i64>,
    /// The table generation last looked at.
    seen_generation: Option<u64>,
    next_checkpoint_ms: u64,
}

impl Lessor {
    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// This member became the leader: every lease lives its remaining TTL plus `extend_ms`
    /// from now.
    pub fn promote(&mut self, now_ms: u64, extend_ms: u64, table: &LeaseTable) {
        self.primary = true;
        self.expiring.clear();
        self.deadlines = table
            .iter()
            .map(|lease| {
                (
                    lease.id,
                    now_ms + seconds_ms(lease.restart_ttl()) + extend_ms,
                )
            })
            .collect();
        self.seen_generation = Some(table.generation());
        self.next_checkpoint_ms = now_ms + CHECKPOINT_INTERVAL_MS;
    }

    /// This member is no longer the leader: it keeps no deadlines.
    pub fn demote(&mut self) {
        *self = Lessor::default();
    }

    /// Catches up with leases granted or revoked since the last look: a new lease's clock
    /// starts now.
    pub fn sync(&mut self, now_ms: u64, table: &LeaseTable) {
        if !self.primary || self.seen_generation == Some(table.generation()) {
            return;
        }
        self.seen_generation = Some(table.generation());
        self.deadlines.retain(|id, _| table.contains(*id));
        self.expiring.retain(|id| table.contains(*id));
        for lease in table.iter() {
            self.deadlines
                .entry(lease.id)
                .or_insert_with(|| now_ms + seconds_ms(lease.restart_ttl()));
        }
    }

    /// A keep-alive: the lease lives its full TTL from now. Returns the TTL (seconds), and
    /// whether the lease has a checkpointed remaining TTL that must now be reset (else a later
    /// leader would start it from that smaller number).
    pub fn renew(
        &mut self,
        id: i64,
        now_ms: u64,
        table: &LeaseTable,
    ) -> Result<(i64, bool), RenewError> {
        if !self.primary {
            return Err(RenewError::NotPrimary);
        }
        self.sync(now_ms, table);
        let lease = table.get(id).ok_or(RenewError::NotFound)?;
        if self.expiring.contains(&id) || self.deadlines.get(&id).is_some_and(|d| *d <= now_ms) {
            return Err(RenewError::NotFound);
        }
        self.deadlines.insert(id, now_ms + seconds_ms(lease.ttl));
        Ok((lease.ttl, lease.remaining_ttl > 0))
    }

    /// Milliseconds the lease has left, as the leader sees it; `None` if not the leader or
    /// the lease is unknown.
    pub fn remaining_ms(&self, id: i64, now_ms: u64) -> Option<u64> {
        if !self.primary {
            return None;
        }
        self.deadlines.get(&id).map(|d| d.saturating_sub(now_ms))
    }

    /// Leases past their deadline whose revoke has not been asked for yet, oldest first, at
    /// most `MAX_REVOKES_PER_CHECK`; they are marked as expiring (no more renewals).
    pub fn expired(&mut self, now_ms: u64) -> Vec<i64> {
        if !self.primary {
            return Vec::new();
        }
        let mut due: Vec<(u64, i64)> = self
            .deadlines
            .iter()
            .filter(|(id, deadline)| **deadline <= now_ms && !self.expiring.contains(id))
            .map(|(id, deadline)| (*deadline, *id))
            .collect();
        due.sort_unstable();
        due.truncate(MAX_REVOKES_PER_CHECK);
        let ids: Vec<i64> = due.into_iter().map(|(_, id)| id).collect();
        self.expiring.extend(ids.iter().copied());
        ids
    }

    /// The revoke of `id` did not commit (e.g. leadership was lost meanwhile): ask again at
    /// the next check, if still the leader.
    pub fn revoke_failed(&mut self, id: i64) {
        self.expiring.remove(&id);
    }

    /// Every `CHECKPOINT_INTERVAL_MS`: the remaining TTL of each lease long enough to outlive
    /// the interval, in entries of at most `MAX_CHECKPOINTS_PER_ENTRY`.
    pub fn due_checkpoints(
        &mut self,
        now_ms: u64,
        table: &LeaseTable,
    ) -> Vec<Vec<LeaseCheckpoint>> {
        if !self.primary || now_ms < self.next_checkpoint_ms {
            return Vec::new();
        }
        self.next_checkpoint_ms = now_ms + CHECKPOINT_INTERVAL_MS;
        let checkpoints: Vec<LeaseCheckpoint> = table
            .iter()
            .filter(|lease| seconds_ms(lease.ttl) > CHECKPOINT_INTERVAL_MS)
            .filter_map(|lease| {
                let deadline = self.deadlines.get(&lease.id)?;
                let remaining_ms = deadline.checked_sub(now_ms).filter(|ms| *ms > 0)?;
                Some(LeaseCheckpoint {
                    id: lease.id,
                    remaining_ttl: remaining_ms.div_ceil(1000) as i64,
                })
            })
            .collect();
        checkpoints
            .chunks(MAX_CHECKPOINTS_PER_ENTRY)
            .map(|chunk| chunk.to_vec())
            .collect()
    }
}

fn seconds_ms(seconds: i64) -> u64 {
    (seconds.max(0) as u64).saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(leases: &[(i64, i64)]) -> LeaseTable {
        let mut table = LeaseTable::default();
        table.set_min_ttl(1);
        for (id, ttl) in leases {
            table.grant(*id, *ttl);
        }
        table
    }

    #[test]
    fn only_the_primary_renews_and_a_renewal_restarts_the_full_ttl() {
        let table = table_with(&[(1, 10)]);
        let mut lessor = Lessor::default();
        assert_eq!(lessor.renew(1, 0, &table), Err(RenewError::NotPrimary));
        lessor.promote(0, 0, &table);
        assert_eq!(lessor.remaining_ms(1, 4_000), Some(6_000));
        assert_eq!(lessor.renew(1, 4_000, &table), Ok((10, false)));
        assert_eq!(lessor.remaining_ms(1, 4_000), Some(10_000));
        assert_eq!(lessor.renew(2, 4_000, &table), Err(RenewError::NotFound));
        assert!(lessor.expired(13_999).is_empty());
        assert_eq!(lessor.expired(14_000), vec![1]);
    }

    #[test]
    fn an_expiring_lease_is_not_renewed_and_is_asked_for_once_until_its_revoke_fails() {
        let table = table_with(&[(1, 2), (2, 5)]);
        let mut lessor = Lessor::default();
        lessor.promote(0, 0, &table);
        assert_eq!(lessor.expired(2_000), vec![1]);
        assert!(lessor.expired(2_500).is_empty(), "asked for once");
        assert_eq!(lessor.renew(1, 2_500, &table), Err(RenewError::NotFound));
        lessor.revoke_failed(1);
        assert_eq!(lessor.expired(3_000), vec![1], "asked for again");
        assert_eq!(lessor.expired(6_000), vec![2]);
    }

    #[test]
    fn a_new_leader_gives_every_lease_its_remaining_ttl_plus_the_extension() {
        let mut table = table_with(&[(1, 600), (2, 10)]);
        table.checkpoint(1, 100);
        let mut lessor = Lessor::default();
        lessor.promote(50_000, 1_000, &table);
        assert_eq!(lessor.remaining_ms(1, 50_000), Some(101_000));
        assert_eq!(lessor.remaining_ms(2, 50_000), Some(11_000));
        lessor.demote();
        assert_eq!(lessor.remaining_ms(2, 50_000), None);
        assert!(
            lessor.expired(1_000_000).is_empty(),
            "a follower expires nothing"
        );
    }

    #[test]
    fn leases_granted_and_revoked_later_are_picked_up_by_sync() {
        let mut table = table_with(&[(1, 10)]);
        let mut lessor = Lessor::default();
        lessor.promote(0, 0, &table);
        table.grant(2, 3);
        table.revoke(1);
        lessor.sync(1_000, &table);
        assert_eq!(lessor.remaining_ms(1, 1_000), None);
        assert_eq!(lessor.remaining_ms(2, 1_000), Some(3_000));
    }

    #[test]
    fn checkpoints_cover_long_leases_once_per_interval_and_a_renewal_asks_to_reset_them() {
        let mut table = table_with(&[(1, 3600), (2, 60)]);
        let mut lessor = Lessor::default();
        lessor.promote(0, 0, &table);
        assert!(
            lessor.due_checkpoints(1_000, &table).is_empty(),
            "not due yet"
        );
        let due = lessor.due_checkpoints(CHECKPOINT_INTERVAL_MS, &table);
        assert_eq!(due.len(), 1);
        assert_eq!(
            due[0],
            vec![LeaseCheckpoint {
                id: 1,
                remaining_ttl: 3600 - 300
            }]
        );
        assert!(lessor
            .due_checkpoints(CHECKPOINT_INTERVAL_MS + 1, &table)
            .is_empty());
        table.checkpoint(1, 3300);
        assert_eq!(
            lessor.renew(1, CHECKPOINT_INTERVAL_MS + 1, &table),
            Ok((3600, true))
        );
    }
}
