//! The request path shared by the gRPC services (and the simulator's clients).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};

use super::apply::StoreJob;
use super::error::ServerError;
use super::lease::LeaseClock;
use crate::auth::AuthInfo;
use crate::cluster::Members;
use crate::hooks::{self, Bug};
use crate::metrics::METRICS;
use crate::mvcc::{self, ApplyOutcome, ApplyResult, MvccStore};
use crate::proto::etcdserverpb::Member;
use crate::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use crate::proto::quorumkvpb::{raft_request::Request, RaftRequest};
use crate::raft::{Applied, NodeError, NodeHandle};
use crate::watch::WatchHub;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub cluster_id: u64,
    pub member_id: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub request_timeout: Duration,
    /// Refuse membership changes that could cost the cluster its quorum (etcd's default).
    pub strict_reconfig_check: bool,
    /// Random bits that start this run's request ids (ids must not repeat across restarts).
    pub id_seed: u64,
    /// Past this many backend bytes writes raise the NOSPACE alarm (0: etcd's default, 2 GiB).
    pub quota_backend_bytes: u64,
    /// Where maintenance writes files it streams out (snapshot images): the member's dir.
    pub scratch_dir: std::path::PathBuf,
    pub auth: super::auth::AuthConfig,
}

/// What the apply loop sends back: the result and the store's revision after it.
pub type ApplyReply = (ApplyResult, i64);

/// What a membership request gets back once applied: the members after it.
pub type MemberReply = Result<Vec<Member>, NodeError>;

/// Membership as the request path sees it (the apply loop keeps it).
#[derive(Clone)]
pub struct MembershipView {
    pub members: watch::Receiver<Members>,
    pub waiters: Waiters<MemberReply>,
    pub learner: Arc<AtomicBool>,
}

/// Requests waiting for their entry to be applied, by request id.
pub struct Waiters<T = ApplyReply> {
    inner: Arc<Mutex<HashMap<u64, oneshot::Sender<T>>>>,
}

impl<T> Clone for Waiters<T> {
    fn clone(&self) -> Self {
        Waiters {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters {
            inner: Arc::default(),
        }
    }
}

impl<T> Waiters<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<T>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn register(&self, id: u64) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        let previous = self.lock().insert(id, tx);
        debug_assert!(previous.is_none(), "request id {id} reused");
        rx
    }

    pub fn take(&self, id: u64) -> Option<oneshot::Sender<T>> {
        self.lock().remove(&id)
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The lease clock and the watchers, for `KvServer::new`.
pub struct Coordination {
    pub leases: LeaseClock,
    pub watches: WatchHub,
    /// Jobs for the apply loop to run with the whole store (hashes, snapshot images).
    pub jobs: mpsc::Sender<StoreJob>,
    /// The simple tokens this member knows (the apply loop learns them).
    pub tokens: Arc<crate::auth::TokenTable>,
    /// The v2 API's waiting requests (the apply loop tells them of v2 events).
    pub v2_watchers: Arc<crate::v2::V2Watchers>,
}

/// Numbers for `Maintenance.Status`.
#[derive(Debug, Clone, Default)]
pub struct StatusReport {
    pub leader: u64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub raft_applied_index: u64,
    pub db_size: i64,
    /// Bytes of the backend in use (keys and values).
    pub db_size_in_use: i64,
    pub revision: i64,
    /// The active alarms, as etcd's `Status.errors` words them (`memberID:<id> alarm:<type> `).
    pub alarms: Vec<String>,
}

#[derive(Clone)]
pub struct KvServer {
    config: Arc<ServerConfig>,
    node: NodeHandle,
    store: Arc<RwLock<MvccStore>>,
    waiters: Waiters,
    applied: Applied,
    next_id: Arc<AtomicU64>,
    pub(super) membership: MembershipView,
    pub(super) lease_clock: LeaseClock,
    watches: WatchHub,
    pub(super) jobs: mpsc::Sender<StoreJob>,
    /// The store's backend, the same for the member's life (a restore and a defragmentation
    /// change what is in it, not which it is): the quota asks its size before every write
    /// without taking the store's lock.
    pub(super) backend: Arc<dyn crate::io::Backend>,
    /// The auth store as the store publishes it (read without the store's lock).
    pub(super) auth: Arc<crate::auth::AuthView>,
    /// The simple tokens this member knows.
    pub(super) tokens: Arc<crate::auth::TokenTable>,
    pub(super) v2_watchers: Arc<crate::v2::V2Watchers>,
}

impl KvServer {
    pub fn new(
        config: ServerConfig,
        node: NodeHandle,
        store: Arc<RwLock<MvccStore>>,
        waiters: Waiters,
        applied: Applied,
        membership: MembershipView,
        coordination: Coordination,
    ) -> Self {
        // Ids must not collide across members (each applies everyone's entries) nor across
        // restarts: the member's low 16 bits, then a counter from a random start.
        let first_id = ((config.member_id & 0xffff) << 48) | (config.id_seed & ((1 << 47) - 1));
        let (backend, auth) = {
            let store = store.read().unwrap_or_else(|p| p.into_inner());
            (store.backend().clone(), store.auth().clone())
        };
        KvServer {
            backend,
            auth,
            tokens: coordination.tokens,
            v2_watchers: coordination.v2_watchers,
            config: Arc::new(config),
            node,
            store,
            waiters,
            applied,
            next_id: Arc::new(AtomicU64::new(first_id)),
            membership,
            lease_clock: coordination.leases,
            watches: coordination.watches,
            jobs: coordination.jobs,
        }
    }

    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// The events in `[start, end)` of every revision from `from_rev` on, from this member's
    /// store (serializable: what it has applied).
    pub fn history(
        &self,
        from_rev: i64,
        start: &[u8],
        end: &[u8],
    ) -> Result<Vec<crate::proto::mvccpb::Event>, ServerError> {
        Ok(self
            .read_store()
            .events_since(from_rev, start, end, usize::MAX, usize::MAX)?
            .0)
    }

    /// The watchers of this member's store.
    pub fn watches(&self) -> &WatchHub {
        &self.watches
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub(super) fn store(&self) -> &RwLock<MvccStore> {
        &self.store
    }

    /// Saves the key index for the next start (`MvccStore::save_index`): at a clean stop, once
    /// the apply loop has ended and the backend is flushed.
    pub fn save_index(&self, path: &std::path::Path) -> std::io::Result<u64> {
        self.read_store().save_index(path)
    }

    pub(super) fn read_store(&self) -> std::sync::RwLockReadGuard<'_, MvccStore> {
        self.store.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.config.cluster_id,
            member_id: self.config.member_id,
            revision,
            raft_term: self.node.status().term.load(Ordering::Relaxed),
        }
    }

    /// Waits until this member has applied everything committed when the read arrived.
    pub async fn linearizable_barrier(&self) -> Result<(), ServerError> {
        self.refuse_learner()?;
        if hooks::injected(Bug::ServeStaleRead) {
            return Ok(());
        }
        let timeout = self.config.request_timeout;
        let index = tokio::time::timeout(timeout, self.node.read_index())
            .await
            .map_err(|_| ServerError::Timeout)??;
        let mut applied = self.applied.clone();
        tokio::time::timeout(timeout, applied.wait_for(|a| *a >= index))
            .await
            .map_err(|_| ServerError::Timeout)?
            .map_err(|_| ServerError::Stopped)?;
        Ok(())
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, ServerError> {
        self.range_as(&AuthInfo::INTERNAL, req).await
    }

    /// A range for `who`: they must be allowed to read all of it.
    pub async fn range_as(
        &self,
        who: &AuthInfo,
        req: RangeRequest,
    ) -> Result<RangeResponse, ServerError> {
        req.precheck(self)?;
        self.range_checked(who, req).await
    }

    /// `range_as` for a request whose `Precheck` the caller has made (the API makes it
    /// before it looks at the token).
    pub async fn range_checked(
        &self,
        who: &AuthInfo,
        req: RangeRequest,
    ) -> Result<RangeResponse, ServerError> {
        METRICS.mvcc_range.inc();
        if !req.serializable {
            self.linearizable_barrier().await?;
        }
        self.authorize_read(who, &req)?;
        let store = self.read_store();
        let mut resp = store.range(&req)?;
        resp.header = Some(self.header(store.current_rev()));
        Ok(resp)
    }

    pub async fn put(&self, req: PutRequest) -> Result<PutResponse, ServerError> {
        self.put_as(&AuthInfo::INTERNAL, req).await
    }

    pub async fn put_as(
        &self,
        who: &AuthInfo,
        req: PutRequest,
    ) -> Result<PutResponse, ServerError> {
        req.precheck(self)?;
        self.put_checked(who, req).await
    }

    /// `put_as` for a request whose `Precheck` the caller has made (the API makes it
    /// before it looks at the token).
    pub async fn put_checked(
        &self,
        who: &AuthInfo,
        req: PutRequest,
    ) -> Result<PutResponse, ServerError> {
        let request = Request::Put(req);
        self.authorize(who, &request)?;
        if let Request::Put(req) = &request {
            self.check_quota(req.key.len() + req.value.len())?;
        }
        METRICS.mvcc_put.inc();
        match self.propose_as(who, request).await? {
            (ApplyOutcome::Put(mut resp), revision) => {
                resp.header = Some(self.header(revision));
                Ok(resp)
            }
            _ => unreachable!("a put applies as a put"),
        }
    }

    pub async fn delete_range(
        &self,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, ServerError> {
        self.delete_range_as(&AuthInfo::INTERNAL, req).await
    }

    pub async fn delete_range_as(
        &self,
        who: &AuthInfo,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, ServerError> {
        req.precheck(self)?;
        self.delete_range_checked(who, req).await
    }

    /// `delete_range_as` for a request whose `Precheck` the caller has made (the API makes it
    /// before it looks at the token).
    pub async fn delete_range_checked(
        &self,
        who: &AuthInfo,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, ServerError> {
        let request = Request::DeleteRange(req);
        self.authorize(who, &request)?;
        METRICS.mvcc_delete.inc();
        match self.propose_as(who, request).await? {
            (ApplyOutcome::DeleteRange(mut resp), revision) => {
                resp.header = Some(self.header(revision));
                Ok(resp)
            }
            _ => unreachable!("a delete applies as a delete"),
        }
    }

    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, ServerError> {
        self.txn_as(&AuthInfo::INTERNAL, req).await
    }

    pub async fn txn_as(
        &self,
        who: &AuthInfo,
        req: TxnRequest,
    ) -> Result<TxnResponse, ServerError> {
        req.precheck(self)?;
        self.txn_checked(who, req).await
    }

    /// `txn_as` for a request whose `Precheck` the caller has made (the API makes it
    /// before it looks at the token).
    pub async fn txn_checked(
        &self,
        who: &AuthInfo,
        req: TxnRequest,
    ) -> Result<TxnResponse, ServerError> {
        let request = Request::Txn(req);
        self.authorize(who, &request)?;
        METRICS.mvcc_txn.inc();
        if let Request::Txn(req) = &request {
            if crate::alarm::txn_puts(req) {
                self.check_quota(req.encoded_len())?;
            }
        }
        match self.propose_as(who, request).await? {
            (ApplyOutcome::Txn(mut resp), revision) => {
                resp.header = Some(self.header(revision));
                Ok(resp)
            }
            _ => unreachable!("a txn applies as a txn"),
        }
    }

    pub async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse, ServerError> {
        self.compact_as(&AuthInfo::INTERNAL, req).await
    }

    pub async fn compact_as(
        &self,
        who: &AuthInfo,
        req: CompactionRequest,
    ) -> Result<CompactionResponse, ServerError> {
        let request = Request::Compaction(req);
        self.authorize(who, &request)?;
        match self.propose_as(who, request).await? {
            (ApplyOutcome::Compaction(mut resp), revision) => {
                resp.header = Some(self.header(revision));
                Ok(resp)
            }
            _ => unreachable!("a compaction applies as a compaction"),
        }
    }

    pub fn is_learner(&self) -> bool {
        self.membership.learner.load(Ordering::Relaxed)
    }

    /// A learner serves serializable reads and status only, as etcd's do.
    pub fn refuse_learner(&self) -> Result<(), ServerError> {
        if self.is_learner() {
            return Err(ServerError::NotSupportedForLearner);
        }
        Ok(())
    }

    /// Proposals waiting to be applied.
    pub fn pending_requests(&self) -> usize {
        self.waiters.len()
    }

    pub(super) fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Has the member stopped (its apply loop is gone)?
    pub fn stopped(&self) -> bool {
        self.applied.has_changed().is_err()
    }

    /// Proposes the member's own `request` (not checked against the auth store).
    pub(super) async fn propose(
        &self,
        request: Request,
    ) -> Result<(ApplyOutcome, i64), ServerError> {
        self.propose_full(&AuthInfo::INTERNAL, request, 0).await
    }

    /// Proposes `who`'s `request`, checked again at apply against the auth store then.
    pub(super) async fn propose_as(
        &self,
        who: &AuthInfo,
        request: Request,
    ) -> Result<(ApplyOutcome, i64), ServerError> {
        self.propose_full(who, request, 0).await
    }

    /// Proposes `request`, to be applied only if appended in `leader_term` (0: in any term).
    pub(super) async fn propose_in_term(
        &self,
        request: Request,
        leader_term: u64,
    ) -> Result<(ApplyOutcome, i64), ServerError> {
        self.propose_full(&AuthInfo::INTERNAL, request, leader_term)
            .await
    }

    async fn propose_full(
        &self,
        who: &AuthInfo,
        request: Request,
        leader_term: u64,
    ) -> Result<(ApplyOutcome, i64), ServerError> {
        self.refuse_learner()?;
        let id = self.next_request_id();
        let data = RaftRequest {
            id,
            request: Some(request),
            leader_term,
            username: who.user.clone(),
            auth_revision: who.revision,
        }
        .encode_to_vec();
        if data.len() > self.config.max_request_bytes {
            return Err(ServerError::RequestTooLarge);
        }
        let applied = self.waiters.register(id);
        let outcome = async {
            let rejected = self.node.propose(data).await?;
            tokio::select! {
                result = applied => result.map_err(|_| ServerError::Stopped),
                Ok(e) = rejected => Err(ServerError::Node(e)),
            }
        };
        let result = tokio::time::timeout(self.config.request_timeout, outcome).await;
        match result {
            Ok(Ok((result, revision))) => Ok((result?, revision)),
            Ok(Err(e)) => {
                self.waiters.take(id);
                METRICS.proposals_failed.inc();
                Err(e)
            }
            Err(_) => {
                self.waiters.take(id);
                METRICS.proposals_failed.inc();
                Err(ServerError::Timeout)
            }
        }
    }

    pub fn status(&self) -> StatusReport {
        let status = self.node.status();
        let store = self.read_store();
        StatusReport {
            leader: status.leader.load(Ordering::Relaxed),
            raft_term: status.term.load(Ordering::Relaxed),
            raft_index: status.commit.load(Ordering::Relaxed),
            raft_applied_index: *self.applied.borrow(),
            db_size: store.backend().size_bytes() as i64,
            db_size_in_use: store.in_use_bytes() as i64,
            revision: store.current_rev(),
            alarms: store
                .alarms()
                .list(crate::proto::etcdserverpb::AlarmType::None as i32)
                .iter()
                .map(|a| {
                    let name = crate::proto::etcdserverpb::AlarmType::try_from(a.alarm)
                        .map(|t| t.as_str_name())
                        .unwrap_or("UNKNOWN");
                    // etcd prints the alarm in protobuf's text format, which leaves NONE out.
                    if a.alarm == crate::proto::etcdserverpb::AlarmType::None as i32 {
                        format!("memberID:{} ", a.member_id)
                    } else {
                        format!("memberID:{} alarm:{name} ", a.member_id)
                    }
                })
                .collect(),
        }
    }
}

/// A KV request's checks that need no state: made before its caller's token is looked at, as
/// etcd 3.4 makes them (a malformed put is refused as such, whatever its token).
pub trait Precheck {
    fn precheck(&self, server: &KvServer) -> Result<(), ServerError>;
}

impl Precheck for RangeRequest {
    fn precheck(&self, _: &KvServer) -> Result<(), ServerError> {
        Ok(mvcc::check_range(self)?)
    }
}

impl Precheck for PutRequest {
    fn precheck(&self, _: &KvServer) -> Result<(), ServerError> {
        Ok(mvcc::check_put(self)?)
    }
}

impl Precheck for DeleteRangeRequest {
    fn precheck(&self, _: &KvServer) -> Result<(), ServerError> {
        Ok(mvcc::check_delete(self)?)
    }
}

impl Precheck for TxnRequest {
    fn precheck(&self, server: &KvServer) -> Result<(), ServerError> {
        Ok(mvcc::check_txn(self, server.config.max_txn_ops)?)
    }
}

impl Precheck for CompactionRequest {
    fn precheck(&self, _: &KvServer) -> Result<(), ServerError> {
        Ok(())
    }
}
