//! Maintenance on the request path: the space quota and its alarm, alarms through the log,
//! jobs that need the whole store (hashes, snapshot images), and the health check.

use tokio::sync::oneshot;

use super::error::ServerError;
use super::kv::KvServer;
use crate::mvcc::{ApplyOutcome, KvHash, MvccError, MvccStore};
use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::{AlarmMember, AlarmRequest, AlarmType, RangeRequest};
use crate::proto::quorumkvpb::raft_request::Request;

/// etcd's default space quota, used when `--quota-backend-bytes` is 0.
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 << 30;
/// etcd warns when the quota is set above this.
pub const MAX_SUGGESTED_QUOTA_BACKEND_BYTES: u64 = 8 << 30;
/// What the quota counts a lease grant as (its record and the lease's bookkeeping).
pub const LEASE_GRANT_COST_BYTES: usize = 64;

/// Why `/health` says a member is not healthy, as etcd words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unhealthy {
    /// An alarm that the probe did not exclude: `ALARM NOSPACE`.
    Alarm(String),
    /// `RAFT NO LEADER`
    NoLeader,
    /// The probe's read failed: `QGET ERROR:<message>` (etcd's wording).
    Read(String),
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::Alarm(name) => write!(f, "ALARM {name}"),
            Unhealthy::NoLeader => f.write_str("RAFT NO LEADER"),
            Unhealthy::Read(error) => write!(f, "QGET ERROR:{error}"),
        }
    }
}

impl KvServer {
    /// The space quota in bytes.
    pub fn quota_bytes(&self) -> u64 {
        match self.config().quota_backend_bytes {
            0 => DEFAULT_QUOTA_BACKEND_BYTES,
            quota => quota,
        }
    }

    /// Refuses a write of about `cost` bytes that would take the backend past its quota, and
    /// raises the NOSPACE alarm for this member (through the log), as etcd does.
    pub(super) fn check_quota(&self, cost: usize) -> Result<(), ServerError> {
        let size = self.backend.size_bytes();
        if size.saturating_add(cost as u64) <= self.quota_bytes() {
            return Ok(());
        }
        let active = self
            .read_store()
            .alarms()
            .list(AlarmType::Nospace as i32)
            .iter()
            .any(|a| a.member_id == self.member_id());
        if !active {
            let server = self.clone();
            tracing::warn!(
                quota_bytes = self.quota_bytes(),
                backend_bytes = size,
                "the backend is past its space quota; raising the NOSPACE alarm"
            );
            tokio::spawn(async move {
                let raise = AlarmRequest {
                    action: AlarmAction::Activate as i32,
                    member_id: server.member_id(),
                    alarm: AlarmType::Nospace as i32,
                };
                if let Err(e) = server.alarm(raise).await {
                    tracing::warn!(error = %e, "cannot raise the NOSPACE alarm yet");
                }
            });
        }
        Err(MvccError::NoSpace.into())
    }

    /// `Maintenance.Alarm`: every action goes through the log, as in etcd.
    pub async fn alarm(&self, request: AlarmRequest) -> Result<Vec<AlarmMember>, ServerError> {
        match self.propose(Request::Alarm(request)).await? {
            (ApplyOutcome::Alarm(response), _) => Ok(response.alarms),
            _ => unreachable!("an alarm request applies as one"),
        }
    }

    /// Runs `job` between two entries: every write applied so far is in the backend, nothing is
    /// applied until it returns, and reads go on meanwhile (it runs on a blocking thread).
    pub async fn with_store<T: Send + 'static>(
        &self,
        job: impl FnOnce(&MvccStore) -> T + Send + 'static,
    ) -> Result<T, ServerError> {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(move |store: &MvccStore| {
            let _ = tx.send(job(store));
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| ServerError::Stopped)?;
        rx.await.map_err(|_| ServerError::Stopped)
    }

    /// `Maintenance.HashKV` on this member's store (serializable, as in etcd).
    pub async fn hash_kv(&self, revision: i64) -> Result<KvHash, ServerError> {
        Ok(self
            .with_store(move |store| store.hash_kv(revision))
            .await??)
    }

    /// `Maintenance.Hash`: the whole backend, this member's metadata included.
    pub async fn hash_backend(&self) -> Result<(u32, i64), ServerError> {
        Ok(self
            .with_store(|store| store.hash_backend().map(|h| (h, store.current_rev())))
            .await??)
    }

    /// etcd's health check: no alarm (but those in `exclude`), a leader, and a read of the key
    /// `health` (linearizable unless `serializable`) that answers in time.
    pub async fn health(&self, serializable: bool, exclude: &[String]) -> Result<(), Unhealthy> {
        for alarm in self.read_store().alarms().list(AlarmType::None as i32) {
            let name = AlarmType::try_from(alarm.alarm)
                .map(|t| t.as_str_name())
                .unwrap_or("UNKNOWN");
            if !exclude.iter().any(|e| e == name) {
                return Err(Unhealthy::Alarm(name.to_string()));
            }
        }
        if self.status().leader == 0 {
            return Err(Unhealthy::NoLeader);
        }
        self.probe_read(serializable).await
    }

    /// The backend under the store.
    pub fn backend(&self) -> std::sync::Arc<dyn crate::io::Backend> {
        self.backend.clone()
    }

    /// The revision of the last compaction.
    pub fn compact_revision(&self) -> i64 {
        self.read_store().compact_rev()
    }

    /// Brings the metrics that mirror this member's state up to date (before a scrape).
    pub fn refresh_metrics(&self) {
        use crate::metrics::METRICS;
        let status = self.status();
        let me = self.member_id();
        METRICS.has_leader.set(i64::from(status.leader != 0));
        METRICS
            .is_leader
            .set(i64::from(status.leader == me && me != 0));
        METRICS.server_id.reset();
        METRICS
            .server_id
            .with_label_values(&[&format!("{me:x}")])
            .set(1.0);
        METRICS
            .server_version
            .with_label_values(&[crate::server::ETCD_VERSION])
            .set(1.0);
        METRICS.proposals_committed.set(status.raft_index as i64);
        METRICS
            .proposals_applied
            .set(status.raft_applied_index as i64);
        METRICS
            .proposals_pending
            .set(self.pending_requests() as i64);
        METRICS.quota_backend_bytes.set(self.quota_bytes() as i64);
        METRICS.db_total_size_bytes.set(status.db_size);
        METRICS
            .db_total_size_in_use_bytes
            .set(status.db_size_in_use);
        METRICS.current_revision.set(status.revision);
        let (keys, compact_rev, index_bytes, v2_bytes) = {
            let store = self.read_store();
            (
                store.key_count(),
                store.compact_rev(),
                store.index_bytes(),
                store.v2().memory_bytes(),
            )
        };
        METRICS.keys_total.set(keys as i64);
        METRICS.compact_revision.set(compact_rev);
        let (streams, watchers) = self.watches().counts();
        METRICS.watch_streams.set(streams as i64);
        METRICS.watchers.set(watchers as i64);
        use crate::metrics::memory::{backend_cache_bytes, MEMORY};
        let followers = self.members().len().saturating_sub(1) as u64;
        let memory = [
            (
                "backend_cache",
                (status.db_size.max(0) as u64).min(backend_cache_bytes()),
                backend_cache_bytes(),
            ),
            (
                "raft_log",
                MEMORY.raft_log.get() as u64,
                super::apply::LOG_MEMORY_BYTES + super::apply::KEPT_LOG_BYTES,
            ),
            // Bounded through the backend's quota: every revision it holds is in the backend.
            ("key_index", index_bytes as u64, 0),
            // The v2 tree and its history (`--enable-v2`): each node and event is a backend
            // record too, so the quota bounds it as well.
            ("v2", v2_bytes, 0),
            (
                "watch_queues",
                self.watches().memory_bytes() as u64,
                (crate::watch::PENDING_BYTES + streams * crate::watch::STREAM_QUEUE_BYTES) as u64,
            ),
            (
                "snapshot_transfer",
                MEMORY.snapshot_transfer.get() as u64,
                crate::raft::SNAPSHOT_TRANSFER_BYTES_PER_FOLLOWER * followers.max(1),
            ),
        ];
        for (part, bytes, limit) in memory {
            METRICS
                .memory_bytes
                .with_label_values(&[part])
                .set(bytes as f64);
            METRICS
                .memory_limit_bytes
                .with_label_values(&[part])
                .set(limit as f64);
        }
    }

    /// A read of the key `health` (linearizable unless `serializable`) that answers in time.
    pub async fn probe_read(&self, serializable: bool) -> Result<(), Unhealthy> {
        let read = RangeRequest {
            key: b"health".to_vec(),
            serializable,
            ..Default::default()
        };
        match tokio::time::timeout(self.config().request_timeout, self.range(read)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Unhealthy::Read(e.to_string())),
            Err(_) => Err(Unhealthy::Read(ServerError::Timeout.to_string())),
        }
    }
}
