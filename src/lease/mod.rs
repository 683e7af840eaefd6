//! Leases: the replicated table (which leases exist, their TTLs, the keys attached to them)
//! and the leader's clock-driven side (`Lessor`: deadlines, renewals, expiry, checkpoints).
//!
//! The table changes only by applying committed entries (grant, revoke, checkpoint, puts and
//! deletes of keys), so every member holds the same table at the same index; it lives in the
//! backend as records, so snapshots carry it. Time never enters it: a lease expires when the
//! leader, whose `Lessor` saw its deadline pass, commits a revoke through raft.

mod lessor;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message as _;

pub use lessor::{Lessor, RenewError, CHECKPOINT_INTERVAL_MS, EXPIRY_CHECK_INTERVAL_MS};

use crate::proto::quorumkvpb::LeaseRecord;

/// etcd's largest TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// Record names: `leases/<id as 16 hex digits>`.
pub const LEASE_RECORD_PREFIX: &str = "leases/";

pub fn record_name(id: i64) -> String {
    format!("{LEASE_RECORD_PREFIX}{:016x}", id as u64)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// The TTL granted, in seconds.
    pub ttl: i64,
    /// The remaining TTL at the last checkpoint, in seconds; 0 when never checkpointed.
    pub remaining_ttl: i64,
    pub keys: BTreeSet<Vec<u8>>,
}

impl Lease {
    /// What a new leader gives the lease: the checkpointed remaining TTL, else the full TTL.
    pub fn restart_ttl(&self) -> i64 {
        if self.remaining_ttl > 0 {
            self.remaining_ttl
        } else {
            self.ttl
        }
    }

    pub fn record(&self) -> Vec<u8> {
        LeaseRecord {
            id: self.id,
            ttl: self.ttl,
            remaining_ttl: self.remaining_ttl,
        }
        .encode_to_vec()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("lease record {name}: {reason}")]
pub struct BadRecord {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    leases: BTreeMap<i64, Lease>,
    /// Each key attached to a lease, and that lease.
    key_lease: HashMap<Vec<u8>, i64>,
    /// TTLs below this are raised to it at grant (etcd: 1.5 election timeouts, in seconds).
    min_ttl: i64,
    /// Bumped by every grant and revoke, so the `Lessor` knows when to look again.
    generation: u64,
}

impl LeaseTable {
    /// The table kept as `records`, with the keys that name a lease (`(key, lease)` pairs).
    pub fn load(
        records: Vec<(String, Vec<u8>)>,
        attached: impl IntoIterator<Item = (Vec<u8>, i64)>,
    ) -> Result<Self, BadRecord> {
        let mut table = LeaseTable::default();
        for (name, value) in records {
            let record = LeaseRecord::decode(value.as_slice()).map_err(|e| BadRecord {
                name: name.clone(),
                reason: e.to_string(),
            })?;
            if record.id == 0 || record.ttl <= 0 {
                return Err(BadRecord {
                    name,
                    reason: format!("id {} ttl {}", record.id, record.ttl),
                });
            }
            table.leases.insert(
                record.id,
                Lease {
                    id: record.id,
                    ttl: record.ttl,
                    remaining_ttl: record.remaining_ttl,
                    keys: BTreeSet::new(),
                },
            );
        }
        for (key, lease) in attached {
            if table.leases.contains_key(&lease) {
                table.attach(&key, lease);
            } else {
                tracing::warn!(
                    lease = format!("{lease:x}"),
                    key = %String::from_utf8_lossy(&key),
                    "a key names a lease that does not exist; left unattached"
                );
            }
        }
        Ok(table)
    }

    pub fn set_min_ttl(&mut self, seconds: i64) {
        self.min_ttl = seconds.max(1);
    }

    pub fn min_ttl(&self) -> i64 {
        self.min_ttl
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The lease `key` is attached to, if any.
    pub fn lease_of(&self, key: &[u8]) -> Option<i64> {
        self.key_lease.get(key).copied()
    }

    /// Adds a lease (the TTL raised to the minimum); `None` if the id is taken.
    pub fn grant(&mut self, id: i64, ttl: i64) -> Option<&Lease> {
        debug_assert!(id != 0 && ttl <= MAX_LEASE_TTL);
        if self.leases.contains_key(&id) {
            return None;
        }
        self.generation += 1;
        let lease = Lease {
            id,
            ttl: ttl.max(self.min_ttl),
            remaining_ttl: 0,
            keys: BTreeSet::new(),
        };
        Some(self.leases.entry(id).or_insert(lease))
    }

    /// Removes a lease, returning it with the keys that were attached (now detached).
    pub fn revoke(&mut self, id: i64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.generation += 1;
        for key in &lease.keys {
            self.key_lease.remove(key);
        }
        Some(lease)
    }

    /// Records a lease's remaining TTL (seconds); `false` if the lease is gone.
    pub fn checkpoint(&mut self, id: i64, remaining_ttl: i64) -> bool {
        match self.leases.get_mut(&id) {
            Some(lease) => {
                lease.remaining_ttl = remaining_ttl.max(0);
                true
            }
            None => false,
        }
    }

    /// `key` is now attached to `lease` (0: to none), detached from any lease it had.
    pub fn attach(&mut self, key: &[u8], lease: i64) {
        if self.key_lease.is_empty() && lease == 0 {
            return; // The common case: no leased keys at all.
        }
        if let Some(old) = self.key_lease.remove(key) {
            if let Some(old) = self.leases.get_mut(&old) {
                old.keys.remove(key);
            }
        }
        if lease != 0 {
            if let Some(new) = self.leases.get_mut(&lease) {
                new.keys.insert(key.to_vec());
                self.key_lease.insert(key.to_vec(), lease);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LeaseTable {
        let mut table = LeaseTable::default();
        table.set_min_ttl(2);
        table
    }

    #[test]
    fn grant_raises_short_ttls_to_the_minimum_and_refuses_a_taken_id() {
        let mut table = table();
        assert_eq!(table.grant(7, 1).map(|l| l.ttl), Some(2));
        assert_eq!(table.grant(8, 60).map(|l| l.ttl), Some(60));
        assert!(table.grant(7, 60).is_none(), "id 7 is taken");
        assert_eq!(
            table.get(7).map(|l| l.ttl),
            Some(2),
            "the first grant stands"
        );
    }

    #[test]
    fn attaching_moves_a_key_between_leases_and_revoke_returns_the_attached_keys() {
        let mut table = table();
        table.grant(1, 10);
        table.grant(2, 10);
        table.attach(b"a", 1);
        table.attach(b"b", 1);
        table.attach(b"a", 2);
        table.attach(b"c", 0);
        table.attach(b"d", 99); // no such lease: stays unattached
        assert_eq!(table.lease_of(b"a"), Some(2));
        assert_eq!(table.lease_of(b"d"), None);
        let revoked = table.revoke(1).expect("lease 1");
        assert_eq!(
            revoked.keys.into_iter().collect::<Vec<_>>(),
            vec![b"b".to_vec()]
        );
        assert_eq!(table.lease_of(b"b"), None);
        assert!(table.revoke(1).is_none());
        table.attach(b"a", 0);
        assert!(table.get(2).expect("lease 2").keys.is_empty());
    }

    #[test]
    fn a_table_loads_from_its_records_and_the_keys_that_name_its_leases() {
        let mut table = table();
        table.grant(5, 30);
        table.checkpoint(5, 12);
        let records = vec![(record_name(5), table.get(5).expect("5").record())];
        let loaded =
            LeaseTable::load(records, vec![(b"k".to_vec(), 5), (b"x".to_vec(), 6)]).expect("load");
        let lease = loaded.get(5).expect("lease 5");
        assert_eq!(
            (lease.ttl, lease.remaining_ttl, lease.restart_ttl()),
            (30, 12, 12)
        );
        assert_eq!(loaded.lease_of(b"k"), Some(5));
        assert_eq!(loaded.lease_of(b"x"), None);
        let bad = LeaseTable::load(vec![(record_name(1), vec![0xff])], vec![]);
        assert!(bad.is_err());
    }
}
