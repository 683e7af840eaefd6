//! Applying committed requests: Put, DeleteRange, Txn, Compaction. Their writes are staged and
//! handed to the backend in batches, each carrying the raft index of its last entry (the
//! consistent index), so that after a crash replay resumes exactly where the backend left off.

use std::collections::HashMap;

use super::error::MvccError;
use super::history::event_of;
use super::revision::{
    encode_u64, meta_key, parse_run_key, push_encoded, push_record, records, runs_end, Revision,
    META_COMPACT_REV, RUN_PREFIX,
};
use super::store::{bad_run, MvccStore, ValueSource};
use crate::alarm::Refusal;
use crate::io::WriteBatch;
use crate::lease::{record_name, MAX_LEASE_TTL};
use crate::proto::etcdserverpb::{
    compare, request_op, response_op, AlarmResponse, CompactionRequest, CompactionResponse,
    Compare, DeleteRangeRequest, DeleteRangeResponse, LeaseCheckpointRequest,
    LeaseCheckpointResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, PutRequest, PutResponse, RangeRequest, ResponseHeader, ResponseOp,
    TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::proto::quorumkvpb::raft_request::Request;

/// What an applied request produced.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseCheckpoint(LeaseCheckpointResponse),
    Alarm(AlarmResponse),
    Auth(crate::auth::AuthApplied),
    /// A v2 request's answer: its event (none for a SYNC) or its v2 error.
    V2(Result<Option<crate::v2::Event>, crate::v2::V2Error>),
}

pub type ApplyResult = Result<ApplyOutcome, MvccError>;

/// The revision being written and what it has written so far.
struct Pending {
    main: i64,
    sub: i64,
    batch: WriteBatch,
    /// The records of the revisions written, encoded for a run.
    records: Vec<u8>,
    values: HashMap<Revision, KeyValue>,
}

impl Pending {
    /// The revision reads inside this write see.
    fn read_rev(&self) -> i64 {
        if self.sub > 0 {
            self.main
        } else {
            self.main - 1
        }
    }

    fn next_rev(&mut self) -> Revision {
        let rev = Revision::new(self.main, self.sub);
        self.sub += 1;
        rev
    }
}

struct Overlay<'a> {
    store: &'a MvccStore,
    pending: &'a Pending,
}

impl ValueSource for Overlay<'_> {
    fn value(&self, rev: Revision) -> Result<KeyValue, MvccError> {
        match self.pending.values.get(&rev) {
            Some(kv) => Ok(kv.clone()),
            None => self.store.read_value(rev),
        }
    }
}

/// Which branch each (nested) transaction takes, decided on the state before the write.
struct TxnPath {
    succeeded: bool,
    nested: Vec<TxnPath>,
}

impl MvccStore {
    /// Applies the request of raft entry `index`. The caller skips entries at or below
    /// `consistent_index()` (already in the backend).
    pub fn apply(&mut self, index: u64, request: &Request) -> ApplyResult {
        debug_assert!(index > self.consistent_index, "entry {index} applied twice");
        match self.alarms.refusal(request) {
            Some(Refusal::NoSpace) => return Err(MvccError::NoSpace),
            Some(Refusal::Corrupt) => return Err(MvccError::CorruptCluster),
            None => {}
        }
        let mut pending = Pending {
            main: self.current_rev + 1,
            sub: 0,
            batch: WriteBatch::default(),
            records: Vec::new(),
            values: HashMap::new(),
        };
        let outcome = match request {
            Request::Put(req) => {
                self.check_put_state(req, false)?;
                ApplyOutcome::Put(self.put(&mut pending, req)?)
            }
            Request::DeleteRange(req) => {
                ApplyOutcome::DeleteRange(self.delete_range(&mut pending, req)?)
            }
            Request::Txn(req) => {
                let path = self.decide(req, self.current_rev)?;
                self.check_path(req, &path)?;
                ApplyOutcome::Txn(self.txn(&mut pending, req, &path)?)
            }
            Request::Compaction(req) => ApplyOutcome::Compaction(self.compact(&mut pending, req)?),
            Request::LeaseGrant(req) => ApplyOutcome::LeaseGrant(self.grant(&mut pending, req)?),
            Request::LeaseRevoke(req) => ApplyOutcome::LeaseRevoke(self.revoke(&mut pending, req)?),
            Request::LeaseCheckpoint(req) => {
                ApplyOutcome::LeaseCheckpoint(self.checkpoint(&mut pending, req))
            }
            Request::Alarm(req) => {
                let (alarms, records) = self.alarms.apply(req);
                if let Some(alarm) = alarms.first().filter(|_| !records.is_empty()) {
                    // Raised or cleared: worth a warning on every member.
                    let name = crate::proto::etcdserverpb::AlarmType::try_from(alarm.alarm)
                        .map(|a| a.as_str_name())
                        .unwrap_or("UNKNOWN");
                    let member = format!("{:x}", alarm.member_id);
                    match records[0].1 {
                        Some(_) => tracing::warn!(alarm = name, member, "alarm raised"),
                        None => tracing::warn!(alarm = name, member, "alarm cleared"),
                    }
                }
                for (name, value) in records {
                    match value {
                        Some(value) => pending.batch.put(meta_key(&name), value),
                        None => pending.batch.delete(meta_key(&name)),
                    }
                }
                ApplyOutcome::Alarm(AlarmResponse {
                    header: None,
                    alarms,
                })
            }
            Request::Auth(change) => {
                let mut next = (*self.auth.current()).clone();
                let applied = next.apply(change)?;
                for (name, value) in &applied.records {
                    match value {
                        Some(value) => pending.batch.put(meta_key(name), value.clone()),
                        None => pending.batch.delete(meta_key(name)),
                    }
                }
                self.commit(index, pending)?;
                if !applied.records.is_empty() {
                    self.auth.publish(next);
                }
                return Ok(ApplyOutcome::Auth(applied));
            }
            // Journaled by the tree, written with the next batch (`take_staged`).
            Request::V2(req) => ApplyOutcome::V2(self.v2.apply(req)),
            Request::MemberAttributes(_) | Request::MemberPeerUrls(_) => {
                return Err(MvccError::NotKeyValue)
            }
        };
        self.commit(index, pending)?;
        Ok(outcome)
    }

    /// May `who` make `request`, with the auth store and the leases as they are now (at its
    /// apply)? A request checked at an older auth revision is refused.
    pub fn authorize(
        &self,
        who: &crate::auth::AuthInfo,
        request: &Request,
    ) -> Result<(), MvccError> {
        // As etcd 3.4: an alarm refuses what it refuses before auth is asked (`apply`
        // answers with the alarm).
        if who.is_internal() || !self.auth.enabled() || self.alarms.refusal(request).is_some() {
            return Ok(());
        }
        let state = self.auth.current();
        crate::auth::check_request(&state, who, request, Some(&self.leases))?;
        Ok(())
    }

    /// Records that entry `index` was applied without changing state (a failed request, an
    /// empty entry, a configuration change). Kept in memory only: replaying it is harmless.
    pub fn skip(&mut self, index: u64) {
        self.consistent_index = self.consistent_index.max(index);
    }

    /// Stages the entry's writes; `flush_staged` hands them to the backend.
    fn commit(&mut self, index: u64, pending: Pending) -> Result<(), MvccError> {
        if self.publish_events && !pending.values.is_empty() {
            let mut changes: Vec<_> = pending.values.iter().collect();
            changes.sort_unstable_by_key(|(rev, _)| **rev);
            self.published
                .extend(changes.into_iter().map(|(_, kv)| event_of(kv.clone())));
        }
        self.staged.ops.extend(pending.batch.ops);
        if pending.sub > 0 {
            self.stage_records(
                Revision::new(pending.main, pending.sub - 1),
                &pending.records,
            );
        }
        self.staged_values.extend(pending.values);
        if pending.sub > 0 {
            self.current_rev = pending.main;
        }
        self.consistent_index = index;
        Ok(())
    }

    /// A put's lease must exist, and so must its key when it keeps its value or lease; when
    /// both are missing, etcd 3.4 names the lease for a put alone and the key for a put in a
    /// transaction (`in_txn`).
    fn check_put_state(&self, req: &PutRequest, in_txn: bool) -> Result<(), MvccError> {
        let lease = || {
            if req.lease != 0 && !self.leases.contains(req.lease) {
                return Err(MvccError::LeaseNotFound);
            }
            Ok(())
        };
        if !in_txn {
            lease()?;
        }
        if (req.ignore_value || req.ignore_lease)
            && self.index.get(&req.key, self.current_rev).is_none()
        {
            return Err(MvccError::KeyNotFound);
        }
        lease()
    }

    fn put(&mut self, pending: &mut Pending, req: &PutRequest) -> Result<PutResponse, MvccError> {
        let at = pending.read_rev();
        // The previous value is read only when the request needs it. Most puts don't, and for
        // them the index is looked up once.
        let needs_prev = req.prev_kv || req.ignore_value || req.ignore_lease;
        let (prev, prev_kv, rev) = if needs_prev {
            let prev = self.index.get(&req.key, at);
            let prev_kv = match prev {
                Some(prev) => Some(
                    Overlay {
                        store: self,
                        pending,
                    }
                    .value(prev.modified)?,
                ),
                None => None,
            };
            let rev = pending.next_rev();
            self.index.put(&req.key, rev);
            (prev, prev_kv, rev)
        } else {
            let rev = pending.next_rev();
            (self.index.get_then_put(&req.key, at, rev), None, rev)
        };
        let value = match &prev_kv {
            Some(kv) if req.ignore_value => kv.value.clone(),
            _ => req.value.clone(),
        };
        let lease = match &prev_kv {
            Some(kv) if req.ignore_lease => kv.lease,
            _ => req.lease,
        };
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.map_or(rev.main, |at| at.created.main),
            mod_revision: rev.main,
            version: prev.map_or(1, |at| at.version + 1),
            value,
            lease,
        };
        self.leases.attach(&req.key, lease);
        push_record(&mut pending.records, rev, &kv);
        pending.values.insert(rev, kv);
        Ok(PutResponse {
            header: None,
            prev_kv: if req.prev_kv { prev_kv } else { None },
        })
    }

    fn delete_range(
        &mut self,
        pending: &mut Pending,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, MvccError> {
        let range = RangeRequest {
            key: req.key.clone(),
            range_end: req.range_end.clone(),
            ..Default::default()
        };
        let keys = self.range_keys(&range, pending.read_rev());
        let mut prev_kvs = Vec::new();
        for (key, at) in &keys {
            if req.prev_kv {
                prev_kvs.push(
                    Overlay {
                        store: self,
                        pending,
                    }
                    .value(at.modified)?,
                );
            }
            self.delete_key(pending, key);
        }
        Ok(DeleteRangeResponse {
            header: None,
            deleted: keys.len() as i64,
            prev_kvs,
        })
    }

    /// Writes the tombstone of `key` (which exists) at the next revision.
    fn delete_key(&mut self, pending: &mut Pending, key: &[u8]) {
        let rev = pending.next_rev();
        self.index.tombstone(key, rev);
        self.leases.attach(key, 0);
        let tombstone = KeyValue {
            key: key.to_vec(),
            mod_revision: rev.main,
            ..Default::default()
        };
        // A tombstone is a record of version 0. Kept with the puts, so history reads see it
        // before the backend has it.
        push_record(&mut pending.records, rev, &tombstone);
        pending.values.insert(rev, tombstone);
    }

    fn grant(
        &mut self,
        pending: &mut Pending,
        req: &LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse, MvccError> {
        // The request path checks these too; an entry from elsewhere is checked again here.
        if req.ttl > MAX_LEASE_TTL {
            return Err(MvccError::LeaseTtlTooLarge);
        }
        if req.id == 0 {
            return Err(MvccError::LeaseNotFound); // The proposer picks an id for 0.
        }
        let lease = self
            .leases
            .grant(req.id, req.ttl)
            .ok_or(MvccError::LeaseExists)?;
        let (id, ttl, record) = (lease.id, lease.ttl, lease.record());
        pending.batch.put(meta_key(&record_name(id)), record);
        Ok(LeaseGrantResponse {
            header: None,
            id,
            ttl,
            error: String::new(),
        })
    }

    /// Deletes the lease's keys, all in one revision, and the lease.
    fn revoke(
        &mut self,
        pending: &mut Pending,
        req: &LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse, MvccError> {
        let lease = self.leases.revoke(req.id).ok_or(MvccError::LeaseNotFound)?;
        for key in &lease.keys {
            debug_assert!(self.index.get(key, pending.read_rev()).is_some());
            self.delete_key(pending, key);
        }
        pending.batch.delete(meta_key(&record_name(req.id)));
        Ok(LeaseRevokeResponse { header: None })
    }

    /// Records remaining TTLs (of leases that still exist).
    fn checkpoint(
        &mut self,
        pending: &mut Pending,
        req: &LeaseCheckpointRequest,
    ) -> LeaseCheckpointResponse {
        for checkpoint in &req.checkpoints {
            if self
                .leases
                .checkpoint(checkpoint.id, checkpoint.remaining_ttl)
            {
                if let Some(lease) = self.leases.get(checkpoint.id) {
                    pending
                        .batch
                        .put(meta_key(&record_name(lease.id)), lease.record());
                }
            }
        }
        LeaseCheckpointResponse { header: None }
    }

    fn compare_holds(&self, compare: &Compare, at: i64) -> Result<bool, MvccError> {
        use compare::{CompareResult, CompareTarget, TargetUnion};
        let range = RangeRequest {
            key: compare.key.clone(),
            range_end: compare.range_end.clone(),
            ..Default::default()
        };
        let keys = self.range_keys(&range, at);
        let target = CompareTarget::try_from(compare.target).unwrap_or(CompareTarget::Version);
        let mut kvs = Vec::with_capacity(keys.len().max(1));
        if keys.is_empty() {
            if target == CompareTarget::Value {
                return Ok(false);
            }
            kvs.push(KeyValue::default());
        }
        for (_, key_at) in &keys {
            kvs.push(self.read_value(key_at.modified)?);
        }
        let result = CompareResult::try_from(compare.result).unwrap_or(CompareResult::Equal);
        Ok(kvs.iter().all(|kv| {
            let ordering = match (target, &compare.target_union) {
                (CompareTarget::Value, Some(TargetUnion::Value(v))) => {
                    kv.value.as_slice().cmp(v.as_slice())
                }
                (CompareTarget::Value, _) => kv.value.as_slice().cmp(&[][..]),
                (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.version.cmp(v),
                (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => {
                    kv.create_revision.cmp(v)
                }
                (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
                (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => kv.lease.cmp(v),
                (CompareTarget::Version, _) => kv.version.cmp(&0),
                (CompareTarget::Create, _) => kv.create_revision.cmp(&0),
                (CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
                (CompareTarget::Lease, _) => kv.lease.cmp(&0),
            };
            match result {
                CompareResult::Equal => ordering.is_eq(),
                CompareResult::Greater => ordering.is_gt(),
                CompareResult::Less => ordering.is_lt(),
                CompareResult::NotEqual => ordering.is_ne(),
            }
        }))
    }

    fn decide(&self, req: &TxnRequest, at: i64) -> Result<TxnPath, MvccError> {
        let mut succeeded = true;
        for compare in &req.compare {
            if !self.compare_holds(compare, at)? {
                succeeded = false;
                break;
            }
        }
        let branch = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut nested = Vec::new();
        for op in branch {
            if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
                nested.push(self.decide(inner, at)?);
            }
        }
        Ok(TxnPath { succeeded, nested })
    }

    /// Everything that could fail on the chosen path fails here, before anything is written:
    /// as etcd 3.4 checks it, every put of the path first (a key to keep the value or lease of),
    /// then every range (a revision compacted or in the future).
    fn check_path(&self, req: &TxnRequest, path: &TxnPath) -> Result<(), MvccError> {
        self.check_ops(req, path, true)?;
        self.check_ops(req, path, false)
    }

    /// The puts (`puts`) or the ranges of the path.
    fn check_ops(&self, req: &TxnRequest, path: &TxnPath, puts: bool) -> Result<(), MvccError> {
        let branch = if path.succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut nested = path.nested.iter();
        for op in branch {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) if !puts => {
                    self.check_read_rev(r.revision, self.current_rev)?;
                }
                Some(request_op::Request::RequestPut(r)) if puts => {
                    self.check_put_state(r, true)?
                }
                Some(request_op::Request::RequestTxn(inner)) => {
                    let inner_path = nested.next().expect("a path per nested txn");
                    self.check_ops(inner, inner_path, puts)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn txn(
        &mut self,
        pending: &mut Pending,
        req: &TxnRequest,
        path: &TxnPath,
    ) -> Result<TxnResponse, MvccError> {
        let branch = if path.succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut nested = path.nested.iter();
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    let read_rev = pending.read_rev();
                    let mut resp = self.range_with(
                        r,
                        read_rev,
                        &Overlay {
                            store: self,
                            pending,
                        },
                    )?;
                    resp.header = Some(ResponseHeader {
                        revision: read_rev,
                        ..Default::default()
                    });
                    Some(response_op::Response::ResponseRange(resp))
                }
                // As etcd: a nested put names the revision it wrote; a nested delete the
                // revision reads see after it (the one being written once anything was); a
                // nested transaction an empty header.
                Some(request_op::Request::RequestPut(r)) => {
                    let mut resp = self.put(pending, r)?;
                    resp.header = Some(ResponseHeader {
                        revision: pending.main,
                        ..Default::default()
                    });
                    Some(response_op::Response::ResponsePut(resp))
                }
                Some(request_op::Request::RequestDeleteRange(r)) => {
                    let mut resp = self.delete_range(pending, r)?;
                    resp.header = Some(ResponseHeader {
                        revision: pending.read_rev(),
                        ..Default::default()
                    });
                    Some(response_op::Response::ResponseDeleteRange(resp))
                }
                Some(request_op::Request::RequestTxn(inner)) => {
                    let inner_path = nested.next().expect("a path per nested txn");
                    let mut resp = self.txn(pending, inner, inner_path)?;
                    resp.header = Some(ResponseHeader::default());
                    Some(response_op::Response::ResponseTxn(resp))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            header: None,
            succeeded: path.succeeded,
            responses,
        })
    }

    fn compact(
        &mut self,
        pending: &mut Pending,
        req: &CompactionRequest,
    ) -> Result<CompactionResponse, MvccError> {
        if req.revision <= self.compact_rev {
            return Err(MvccError::Compacted);
        }
        if req.revision > self.current_rev {
            return Err(MvccError::FutureRev);
        }
        // The scan below must see every revision in the backend.
        self.flush_staged()?;
        let keep = self.index.compact(req.revision);
        let mut failure = None;
        // Every run holding a revision at or below the compaction's: those up to its key, and
        // the first one past it, which may straddle it.
        let last = Revision::new(req.revision, i64::MAX);
        let mut freed = 0u64;
        self.backend
            .scan(&[RUN_PREFIX], Some(&runs_end()), &mut |key, run| {
                let Some(newest) = parse_run_key(key) else {
                    failure = Some(bad_run("bad run key".into()));
                    return false;
                };
                let kept = |rev: &Revision| *rev > last || keep.contains(rev);
                let mut dropped = false;
                for record in records(run) {
                    match record {
                        Ok((rev, _)) => dropped |= !kept(&rev),
                        Err(reason) => {
                            failure = Some(bad_run(reason));
                            return false;
                        }
                    }
                }
                // A run that loses nothing is left as it is, uncopied.
                if dropped {
                    let mut rest = Vec::new();
                    for (rev, bytes) in records(run).flatten().filter(|(rev, _)| kept(rev)) {
                        push_encoded(&mut rest, rev, bytes);
                    }
                    freed += (run.len() - rest.len()) as u64;
                    if rest.is_empty() {
                        freed += key.len() as u64;
                        pending.batch.delete(key.to_vec());
                    } else {
                        pending.batch.put(key.to_vec(), rest);
                    }
                }
                newest <= last
            })?;
        if let Some(e) = failure {
            return Err(e);
        }
        pending
            .batch
            .put(meta_key(META_COMPACT_REV), encode_u64(req.revision as u64));
        self.compact_rev = req.revision;
        self.in_use_bytes = self.in_use_bytes.saturating_sub(freed);
        Ok(CompactionResponse { header: None })
    }
}
