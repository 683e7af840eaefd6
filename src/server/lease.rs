//! Lease requests. Grant, revoke and checkpoints go through the log; keep-alive and
//! time-to-live are answered by the leader's `Lessor` (elsewhere they end with
//! `ServerError::NotLeader` and the API forwards them). The leader's expiry task asks, through
//! the log, for the revoke of each lease whose deadline passed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use super::error::ServerError;
use super::kv::KvServer;
use super::maintenance::LEASE_GRANT_COST_BYTES;
use crate::auth::AuthInfo;
use crate::hooks::{self, Bug};
use crate::io::Clock;
use crate::lease::{Lessor, RenewError, EXPIRY_CHECK_INTERVAL_MS, MAX_LEASE_TTL};
use crate::mvcc::{ApplyOutcome, MvccError, MvccStore};
use crate::proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::proto::quorumkvpb::raft_request::Request;
use crate::raft::NodeHandle;

/// The leader's lease clock, shared by the request path and the expiry task.
#[derive(Clone)]
pub struct LeaseClock {
    inner: Arc<Mutex<PrimaryLessor>>,
    pub(super) clock: Arc<dyn Clock>,
    /// What a new leader adds to every lease's remaining TTL (etcd: one election timeout).
    extend_ms: u64,
}

#[derive(Default)]
pub(super) struct PrimaryLessor {
    lessor: Lessor,
    /// The term this member leads in, while its lessor is primary.
    term: u64,
}

impl LeaseClock {
    pub fn new(clock: Arc<dyn Clock>, election_timeout: Duration) -> Self {
        LeaseClock {
            inner: Arc::default(),
            clock,
            extend_ms: election_timeout.as_millis() as u64,
        }
    }

    /// The lessor brought up to date: primary exactly when `node` leads (promoted afresh for
    /// each term it leads, every inherited lease then living its remaining TTL plus an election
    /// timeout), and knowing every lease of the store's table (a new lease's clock starts now).
    ///
    /// Lock order: the lessor, then the store. The apply loop calls this around each grant, so
    /// that a leader has taken over the leases it inherited before a grant of its term applies
    /// and starts the new lease's clock as it applies.
    pub(super) fn current(
        &self,
        node: &NodeHandle,
        store: &RwLock<MvccStore>,
    ) -> MutexGuard<'_, PrimaryLessor> {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let status = node.status();
        let leading = status.leader.load(Ordering::Relaxed) == node.id();
        let term = status.term.load(Ordering::Relaxed);
        let now_ms = self.clock.now_ms();
        if leading && !(state.lessor.is_primary() && state.term == term) {
            let store = store.read().unwrap_or_else(|p| p.into_inner());
            state.lessor.promote(now_ms, self.extend_ms, store.leases());
            state.term = term;
        } else if !leading && state.lessor.is_primary() {
            state.lessor.demote();
        } else if leading {
            let store = store.read().unwrap_or_else(|p| p.into_inner());
            state.lessor.sync(now_ms, store.leases());
        }
        state
    }
}

impl KvServer {
    /// The lessor, up to date (see [`LeaseClock::current`]).
    fn lessor(&self) -> MutexGuard<'_, PrimaryLessor> {
        self.lease_clock.current(self.node(), self.store())
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.lease_clock.clock.now_ms()
    }

    pub async fn lease_grant(
        &self,
        req: LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse, ServerError> {
        self.lease_grant_as(&AuthInfo::INTERNAL, req).await
    }

    pub async fn lease_grant_as(
        &self,
        who: &AuthInfo,
        mut req: LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse, ServerError> {
        self.require_user(who)?;
        if req.ttl > MAX_LEASE_TTL {
            return Err(MvccError::LeaseTtlTooLarge.into());
        }
        self.check_quota(LEASE_GRANT_COST_BYTES)?;
        while req.id == 0 {
            // As etcd: a request id, made positive.
            req.id = (self.next_request_id() & i64::MAX as u64) as i64;
        }
        // The apply loop starts the new lease's clock on the leader (`LeaseClock::current`).
        match self.propose_as(who, Request::LeaseGrant(req)).await? {
            (ApplyOutcome::LeaseGrant(mut resp), revision) => {
                resp.header = Some(self.header(revision));
                crate::metrics::METRICS.lease_granted.inc();
                Ok(resp)
            }
            _ => unreachable!("a grant applies as a grant"),
        }
    }

    pub async fn lease_revoke(
        &self,
        req: LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse, ServerError> {
        self.lease_revoke_as(&AuthInfo::INTERNAL, req).await
    }

    /// A revoke for `who`: they must be allowed to write every key on the lease (checked at
    /// apply, with the keys attached then).
    pub async fn lease_revoke_as(
        &self,
        who: &AuthInfo,
        req: LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse, ServerError> {
        let request = Request::LeaseRevoke(req);
        self.authorize(who, &request)?;
        match self.propose_as(who, request).await? {
            (ApplyOutcome::LeaseRevoke(mut resp), revision) => {
                resp.header = Some(self.header(revision));
                crate::metrics::METRICS.lease_revoked.inc();
                Ok(resp)
            }
            _ => unreachable!("a revoke applies as a revoke"),
        }
    }

    /// A keep-alive, on the leader: the lease's TTL in seconds, or 0 if it is gone (as etcd
    /// answers); `NotLeader` elsewhere.
    ///
    /// The answer waits for a ReadIndex round, which confirms that this member still led after
    /// it renewed the lease: any later leader was elected after the renewal, so starts the
    /// lease's clock later still. (A deposed leader's renewal is never acknowledged.)
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, ServerError> {
        self.refuse_learner()?;
        let mut caught_up = false;
        loop {
            let renewed = {
                let mut state = self.lessor();
                let store = self.read_store();
                if hooks::injected(Bug::LeaseIgnoresKeepAlive) && state.lessor.is_primary() {
                    store
                        .leases()
                        .get(id)
                        .map(|lease| (lease.ttl, false))
                        .ok_or(RenewError::NotFound)
                } else {
                    state.lessor.renew(id, self.now_ms(), store.leases())
                }
            };
            match renewed {
                Ok((ttl, reset_checkpoint)) => {
                    if reset_checkpoint {
                        self.reset_checkpoint(id);
                    }
                    self.linearizable_barrier().await?;
                    // A revoke committed before the barrier (say, proposed by an earlier
                    // leader and committed with this one's first entry) is applied by now.
                    if !self.has_lease(id) {
                        return Ok(0);
                    }
                    crate::metrics::METRICS.lease_renewed.inc();
                    return Ok(ttl);
                }
                Err(RenewError::NotPrimary) => return Err(ServerError::NotLeader),
                // A lease granted through another member may not be applied here yet.
                Err(RenewError::NotFound) if !caught_up && !self.has_lease(id) => {
                    self.linearizable_barrier().await?;
                    caught_up = true;
                }
                Err(RenewError::NotFound) => return Ok(0),
            }
        }
    }

    /// The lease's remaining TTL as the leader sees it (-1 if it is gone); `NotLeader`
    /// elsewhere.
    pub async fn lease_time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, ServerError> {
        self.refuse_learner()?;
        if !self.lessor().lessor.is_primary() {
            return Err(ServerError::NotLeader);
        }
        if !self.has_lease(req.id) {
            self.linearizable_barrier().await?;
        }
        let remaining_ms = self.lessor().lessor.remaining_ms(req.id, self.now_ms());
        let store = self.read_store();
        let header = Some(self.header(store.current_rev()));
        let (Some(lease), Some(remaining_ms)) = (store.leases().get(req.id), remaining_ms) else {
            return Ok(LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                ..Default::default()
            });
        };
        Ok(LeaseTimeToLiveResponse {
            header,
            id: req.id,
            ttl: (remaining_ms / 1000) as i64,
            granted_ttl: lease.ttl,
            keys: if req.keys {
                lease.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    pub async fn lease_leases(&self) -> Result<LeaseLeasesResponse, ServerError> {
        self.linearizable_barrier().await?;
        let store = self.read_store();
        Ok(LeaseLeasesResponse {
            header: Some(self.header(store.current_rev())),
            leases: store
                .leases()
                .iter()
                .map(|lease| LeaseStatus { id: lease.id })
                .collect(),
        })
    }

    fn has_lease(&self, id: i64) -> bool {
        self.read_store().leases().contains(id)
    }

    /// A renewed lease drops its checkpointed remaining TTL, so that a later leader starts it
    /// from the full TTL. Best effort: failing leaves the lease with a shorter restart TTL.
    fn reset_checkpoint(&self, id: i64) {
        let server = self.clone();
        tokio::spawn(async move {
            let checkpoint = LeaseCheckpointRequest {
                checkpoints: vec![LeaseCheckpoint {
                    id,
                    remaining_ttl: 0,
                }],
            };
            if let Err(e) = server.propose(Request::LeaseCheckpoint(checkpoint)).await {
                tracing::debug!(lease = format!("{id:x}"), error = %e, "checkpoint reset not committed");
            }
        });
    }

    /// The leader's expiry task: every `EXPIRY_CHECK_INTERVAL_MS`, asks for the revoke of each
    /// lease past its deadline and, every checkpoint interval, records long leases' remaining
    /// TTLs. Runs on every member (it does nothing on followers) until the member stops.
    pub async fn run_lease_expiry(self) {
        let interval = Duration::from_millis(EXPIRY_CHECK_INTERVAL_MS);
        loop {
            self.lease_clock.clock.sleep(interval).await;
            if self.stopped() {
                return;
            }
            let (term, expired, checkpoints) = {
                let mut state = self.lessor();
                let now_ms = self.now_ms();
                let expired = state.lessor.expired(now_ms);
                let store = self.read_store();
                let checkpoints = state.lessor.due_checkpoints(now_ms, store.leases());
                (state.term, expired, checkpoints)
            };
            // Both are decisions of this term's leader: applied only if appended in its term.
            for id in expired {
                let server = self.clone();
                tokio::spawn(async move { server.expire(id, term).await });
            }
            for checkpoints in checkpoints {
                let request = Request::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints });
                if let Err(e) = self.propose_in_term(request, term).await {
                    tracing::debug!(error = %e, "lease checkpoint not committed");
                }
            }
        }
    }

    async fn expire(&self, id: i64, term: u64) {
        tracing::debug!(lease = format!("{id:x}"), "lease expired; revoking");
        let revoke = Request::LeaseRevoke(LeaseRevokeRequest { id });
        match self.propose_in_term(revoke, term).await {
            Ok(_) | Err(ServerError::Mvcc(MvccError::LeaseNotFound)) => {}
            Err(e) => {
                tracing::debug!(lease = format!("{id:x}"), error = %e, "expiry revoke not committed");
                self.lessor().lessor.revoke_failed(id);
            }
        }
    }
}
