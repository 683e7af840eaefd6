//! Putting a member together from its ports: storage, raft node, apply loop, request path.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::apply::{restore_snapshot, run_apply_loop, ApplyLoop, STORE_JOBS_QUEUED};
use super::kv::{Coordination, KvServer, MembershipView, ServerConfig, Waiters};
use super::lease::LeaseClock;
use crate::cluster::Members;
use crate::io::transport::Inbox;
use crate::io::{Backend, Clock, Disk, Transport};
use crate::mvcc::MvccStore;
use crate::proto::etcdserverpb::Member;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::raft::BOOTSTRAP_INDEX;
use crate::raft::{spawn_node, NodeOptions};
use crate::wal::{WalError, WalOptions};
use crate::watch::{HeaderFn, WatchHub};

/// etcd's default for the entries kept behind a snapshot.
pub const SNAPSHOT_CATCH_UP_ENTRIES: u64 = 5000;

#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub member_id: u64,
    pub cluster_id: u64,
    pub initial_voters: Vec<u64>,
    /// `<data-dir>/member`
    pub member_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub snapshot_count: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub strict_reconfig_check: bool,
    pub wal: WalOptions,
    pub id_seed: u64,
    /// Log entries kept in memory behind a snapshot, for slow followers (etcd: 5000).
    pub snapshot_catch_up_entries: u64,
    /// The chunks a snapshot's image is sent to a follower in (`raft::SNAPSHOT_CHUNK_BYTES`).
    pub snapshot_chunk_bytes: usize,
    /// A new cluster's members (id, name, peer URLs), from --initial-cluster; written once,
    /// into an empty store. A member joining a running cluster learns them by snapshot.
    pub initial_members: Vec<Member>,
    /// Past this many backend bytes the member raises the NOSPACE alarm (etcd's
    /// `--quota-backend-bytes`; 0: etcd's default, 2 GiB).
    pub quota_backend_bytes: u64,
    /// How often watchers that asked for progress notifications get one (etcd: 10 minutes).
    pub watch_progress_notify_interval: Duration,
    /// `--bcrypt-cost`, `--auth-token-ttl`.
    pub auth: super::auth::AuthConfig,
    /// Where a clean stop saves the key index for the next start to load instead of scanning
    /// the whole backend (`None`: every start scans; the simulator).
    pub saved_index: Option<PathBuf>,
}

impl MemberConfig {
    pub fn wal_dir(&self) -> PathBuf {
        self.member_dir.join("wal")
    }

    pub fn snap_dir(&self) -> PathBuf {
        self.member_dir.join("snap")
    }

    pub fn db_path(&self) -> PathBuf {
        self.member_dir.join("db")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("mvcc: {0}")]
    Mvcc(#[from] crate::mvcc::MvccError),
    #[error("{0}")]
    Membership(String),
}

pub struct RunningMember {
    pub kv: KvServer,
    /// Ends when the node stops; `Err` on a fatal storage error.
    pub node_task: tokio::task::JoinHandle<Result<(), WalError>>,
    /// Ends when the node stops; `Err` when the backend failed.
    pub apply_task: tokio::task::JoinHandle<Result<(), crate::mvcc::MvccError>>,
}

pub fn start_member(
    config: &MemberConfig,
    disk: Arc<dyn Disk>,
    backend: Arc<dyn Backend>,
    transport: Arc<dyn Transport>,
    inbox: Inbox,
    clock: Arc<dyn Clock>,
) -> Result<RunningMember, StartError> {
    let store = MvccStore::open_with_saved_index(backend, config.saved_index.as_deref())?;
    let consistent_index = store.consistent_index();
    tracing::info!(
        revision = store.current_rev(),
        consistent_index,
        keys = store.key_count(),
        "mvcc store opened"
    );
    let election_tick = (config.election_timeout.as_millis()
        / config.heartbeat_interval.as_millis().max(1))
    .max(2) as usize;
    let node_options = NodeOptions {
        id: config.member_id,
        initial_voters: config.initial_voters.clone(),
        heartbeat_interval: config.heartbeat_interval,
        election_tick,
        wal_dir: config.wal_dir(),
        snap_dir: config.snap_dir(),
        wal: config.wal,
        read_seed: config.id_seed.rotate_left(32),
        snapshot_catch_up_entries: config.snapshot_catch_up_entries,
        snapshot_chunk_bytes: config.snapshot_chunk_bytes,
        backend_applied_index: consistent_index,
    };
    let started = spawn_node(node_options, disk, transport, inbox, clock.clone())?;
    let mut store = store;
    // As etcd: 1.5 election timeouts, rounded up to whole seconds.
    let min_lease_ttl = (config.election_timeout.as_millis() as i64 * 3 / 2 + 999) / 1000;
    store.set_min_lease_ttl(min_lease_ttl);
    if let Some(snapshot) = started.snapshot.as_ref().filter(|s| !s.data.is_empty()) {
        let index = snapshot.get_metadata().index;
        if index > store.consistent_index() {
            // A leader's snapshot was saved but the backend did not take it before a crash.
            restore_snapshot(&mut store, &started.images, snapshot)?;
            tracing::info!(index, "restored the backend from the saved snapshot");
        }
    }
    // Images at or below what the backend holds are of no more use.
    started.images.remove_through(store.consistent_index());
    let mut members = Members::load(&store)?;
    if !members.is_empty()
        && !config.initial_members.is_empty()
        && store.consistent_index() <= BOOTSTRAP_INDEX
        && members.get(config.member_id).is_none()
    {
        // A data dir restored from a snapshot for another --initial-cluster or token.
        return Err(StartError::Membership(format!(
            "the backend holds a new cluster's membership (restored from a snapshot?) without this member {:x}: start it with the --name, --initial-cluster and --initial-cluster-token it was restored with",
            config.member_id
        )));
    }
    if members.is_empty()
        && !config.initial_members.is_empty()
        && store.consistent_index() <= BOOTSTRAP_INDEX
    {
        // A new cluster's first start: its members as --initial-cluster names them.
        members = Members::new(config.initial_members.iter().cloned());
        for (name, value) in members.records() {
            store.stage_record(BOOTSTRAP_INDEX, &name, value);
        }
        store.flush_staged()?;
        store
            .backend()
            .flush()
            .map_err(crate::mvcc::MvccError::from)?;
    }
    let learner = Arc::new(AtomicBool::new(
        members.get(config.member_id).is_some_and(|m| m.is_learner),
    ));
    let (members_tx, members_rx) = watch::channel(members);
    let member_waiters = Waiters::default();
    let consistent_index = store.consistent_index();
    let store = Arc::new(RwLock::new(store));
    let waiters = Waiters::default();
    let (applied_tx, applied_rx) = watch::channel(consistent_index.max(started.snapshot_index));
    let header_node = started.handle.clone();
    let (cluster_id, member_id) = (config.cluster_id, config.member_id);
    let header: HeaderFn = Arc::new(move |revision| ResponseHeader {
        cluster_id,
        member_id,
        revision,
        raft_term: header_node.status().term.load(Ordering::Relaxed),
    });
    let watches = WatchHub::new(
        store.clone(),
        header,
        clock.clone(),
        config.max_request_bytes,
    );
    let leases = LeaseClock::new(clock.clone(), config.election_timeout);
    let (jobs_tx, jobs_rx) = tokio::sync::mpsc::channel(STORE_JOBS_QUEUED);
    let tokens = Arc::new(crate::auth::TokenTable::new(config.auth.token_ttl));
    let v2_watchers = Arc::new(crate::v2::V2Watchers::default());
    let apply = ApplyLoop {
        store: store.clone(),
        waiters: waiters.clone(),
        node: started.handle.clone(),
        applied_tx,
        snapshot_count: config.snapshot_count.max(1),
        last_snapshot_index: started.snapshot_index,
        clock: clock.clone(),
        snapshot_requests: started.snapshot_requests.clone(),
        images: started.images.clone(),
        writing: None,
        members: members_tx,
        member_waiters: member_waiters.clone(),
        learner: learner.clone(),
        watches: watches.clone(),
        events: Vec::new(),
        v2_watchers: v2_watchers.clone(),
        v2_events: Vec::new(),
        acks: Vec::new(),
        leases: leases.clone(),
        jobs: jobs_rx,
        halted: false,
        tokens: tokens.clone(),
        log_bytes: 0,
        kept_log_bytes: 0,
        recent_sizes: std::collections::VecDeque::new(),
        catch_up_entries: config.snapshot_catch_up_entries,
    };
    let apply_task = tokio::spawn(run_apply_loop(apply, started.apply_rx));
    let server_config = ServerConfig {
        cluster_id: config.cluster_id,
        member_id: config.member_id,
        max_request_bytes: config.max_request_bytes,
        max_txn_ops: config.max_txn_ops,
        strict_reconfig_check: config.strict_reconfig_check,
        id_seed: config.id_seed,
        // As etcd: 5 s plus two election timeouts.
        request_timeout: Duration::from_secs(5) + 2 * config.election_timeout,
        quota_backend_bytes: config.quota_backend_bytes,
        scratch_dir: config.member_dir.clone(),
        auth: config.auth.clone(),
    };
    let kv = KvServer::new(
        server_config,
        started.handle,
        store,
        waiters,
        applied_rx,
        MembershipView {
            members: members_rx,
            waiters: member_waiters,
            learner,
        },
        Coordination {
            leases,
            watches: watches.clone(),
            jobs: jobs_tx,
            tokens,
            v2_watchers,
        },
    );
    tokio::spawn(kv.clone().run_lease_expiry());
    tokio::spawn(kv.clone().run_v2_expiry());
    let watching = kv.clone();
    tokio::spawn(watches.run(
        move || watching.stopped(),
        config.watch_progress_notify_interval,
    ));
    Ok(RunningMember {
        kv,
        node_task: started.task,
        apply_task,
    })
}
