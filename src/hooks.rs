//! Hooks for the deterministic simulator (sim/): bugs that can be planted in the real code
//! path, and observations of the node's internals that the checkers need. Built without
//! `--cfg madsim` (every production build), `injected` is the constant `false` and `observe`
//! is empty, so the switches cost nothing.

/// A known bug the simulator can plant, to prove its checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bug {
    /// Acknowledge appended entries (vote for commit) without fdatasync.
    AckBeforeFsync,
    /// Apply entries as soon as they are appended, before they are committed.
    ApplyBeforeCommit,
    /// Serve linearizable reads from local state without a ReadIndex round.
    ServeStaleRead,
    /// Persist the hard state without the vote.
    ForgetVote,
    /// Leave the last revision out of the snapshot data sent to followers.
    LoseSnapshotTail,
    /// Answer lease keep-alives without extending the lease.
    LeaseIgnoresKeepAlive,
    /// Send a watcher catching up from history its events newest first.
    WatchOutOfOrder,
    /// Grant a lock (or leadership) without waiting for the older holders to go.
    LockSkipsWait,
    /// Leave the last batch of revisions out of a backup (`Maintenance.Snapshot`'s image).
    BackupMissesLastBatch,
    /// Apply a client's request without checking its permissions again at apply.
    SkipAuthCheckAtApply,
    /// Take a failed WAL fdatasync for a successful one and go on.
    IgnoreFsyncError,
    /// The proxy's read cache skips the invalidation of some events (every third revision).
    ProxyMissesInvalidation,
    /// The proxy loses the first events of each watcher it creates again after failover.
    ProxyDropsEventAtFailover,
    /// Each member expires v2 TTL keys by its own clock instead of through the log.
    V2ExpiresLocally,
    /// A v2 wait on a directory (`recursive=true`) is not woken by a change below it.
    V2WaitMissesRecursive,
    /// A v2 checkpoint leaves out the tree's last node (in path order).
    V2CheckpointLosesNode,
}

impl Bug {
    pub const ALL: [Bug; 16] = [
        Bug::AckBeforeFsync,
        Bug::ApplyBeforeCommit,
        Bug::ServeStaleRead,
        Bug::ForgetVote,
        Bug::LoseSnapshotTail,
        Bug::LeaseIgnoresKeepAlive,
        Bug::WatchOutOfOrder,
        Bug::LockSkipsWait,
        Bug::BackupMissesLastBatch,
        Bug::SkipAuthCheckAtApply,
        Bug::IgnoreFsyncError,
        Bug::ProxyMissesInvalidation,
        Bug::ProxyDropsEventAtFailover,
        Bug::V2ExpiresLocally,
        Bug::V2WaitMissesRecursive,
        Bug::V2CheckpointLosesNode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeFsync => "ack-before-fsync",
            Bug::ApplyBeforeCommit => "apply-before-commit",
            Bug::ServeStaleRead => "serve-stale-read",
            Bug::ForgetVote => "forget-vote",
            Bug::LoseSnapshotTail => "lose-snapshot-tail",
            Bug::LeaseIgnoresKeepAlive => "lease-ignores-keepalive",
            Bug::WatchOutOfOrder => "watch-out-of-order",
            Bug::LockSkipsWait => "lock-skips-wait",
            Bug::BackupMissesLastBatch => "backup-misses-last-batch",
            Bug::SkipAuthCheckAtApply => "skip-auth-check-at-apply",
            Bug::IgnoreFsyncError => "ignore-fsync-error",
            Bug::ProxyMissesInvalidation => "proxy-misses-invalidation",
            Bug::ProxyDropsEventAtFailover => "proxy-drops-event-at-failover",
            Bug::V2ExpiresLocally => "v2-expires-locally",
            Bug::V2WaitMissesRecursive => "v2-wait-misses-recursive",
            Bug::V2CheckpointLosesNode => "v2-checkpoint-loses-node",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Bug::AckBeforeFsync => "acknowledge appended entries before they are fsynced",
            Bug::ApplyBeforeCommit => "apply entries when appended, before commit",
            Bug::ServeStaleRead => "answer linearizable reads without ReadIndex",
            Bug::ForgetVote => "do not persist the vote in the hard state",
            Bug::LoseSnapshotTail => "snapshot data sent to followers lacks the last revision",
            Bug::LeaseIgnoresKeepAlive => "answer lease keep-alives without extending the lease",
            Bug::WatchOutOfOrder => {
                "send watchers catching up from history their events newest first"
            }
            Bug::LockSkipsWait => "grant locks without waiting for older holders to go",
            Bug::BackupMissesLastBatch => "a backup (Snapshot RPC image) lacks its last batch",
            Bug::SkipAuthCheckAtApply => {
                "apply a client's request without checking its permissions again at apply"
            }
            Bug::IgnoreFsyncError => "take a failed WAL fdatasync for a successful one",
            Bug::ProxyMissesInvalidation => {
                "the proxy's read cache misses the invalidation of every third revision"
            }
            Bug::ProxyDropsEventAtFailover => {
                "the proxy loses the first events of each watcher it recreates after failover"
            }
            Bug::V2ExpiresLocally => {
                "each member expires v2 TTL keys by its own clock, not through the log"
            }
            Bug::V2WaitMissesRecursive => {
                "a v2 wait on a directory is not woken by a change below it"
            }
            Bug::V2CheckpointLosesNode => "a v2 checkpoint leaves out the tree's last node",
        }
    }

    /// A bug in the gRPC proxy: the simulator puts proxies in the path to plant it.
    pub fn in_proxy(self) -> bool {
        matches!(
            self,
            Bug::ProxyMissesInvalidation | Bug::ProxyDropsEventAtFailover
        )
    }

    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|bug| bug.name() == name)
    }
}

/// What the node tells the simulator.
pub enum Observation<'a> {
    /// After a ready was handled: the node's term and raft role (`raft::StateRole as u8`:
    /// 0 follower, 1 candidate, 2 leader, 3 pre-candidate).
    Role { node: u64, term: u64, role: u8 },
    /// The apply loop took this committed entry (also when it was already in the backend).
    Applied {
        node: u64,
        entry: &'a raft::eraftpb::Entry,
    },
    /// A snapshot image transfer: the leader `node` started sending one, or resent from the
    /// last acknowledged offset; or the follower `node` received one whole.
    ImageTransfer { node: u64, event: ImageEvent },
    /// The store's state right after applying `index` (or restoring a snapshot at `index`).
    State {
        node: u64,
        index: u64,
        store: &'a crate::mvcc::MvccStore,
    },
}

/// What happened to a snapshot image transfer (`Observation::ImageTransfer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageEvent {
    Started,
    Resent,
    Received,
}

#[cfg(madsim)]
mod switch {
    use super::{Bug, Observation};
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    type Observer = Rc<dyn Fn(&Observation)>;

    thread_local! {
        static BUG: Cell<Option<Bug>> = const { Cell::new(None) };
        static OBSERVER: RefCell<Option<Observer>> = const { RefCell::new(None) };
    }

    pub fn injected(bug: Bug) -> bool {
        BUG.with(|b| b.get() == Some(bug))
    }

    pub fn observing() -> bool {
        OBSERVER.with(|o| o.borrow().is_some())
    }

    pub fn observe<'a>(what: impl FnOnce() -> Observation<'a>) {
        let observer = OBSERVER.with(|o| o.borrow().clone());
        if let Some(observer) = observer {
            observer(&what());
        }
    }

    /// The simulator runs one seed per thread: both settings are per thread.
    pub fn plant(bug: Option<Bug>) {
        BUG.with(|b| b.set(bug));
    }

    pub fn set_observer(observer: Option<Observer>) {
        OBSERVER.with(|o| *o.borrow_mut() = observer);
    }
}

#[cfg(not(madsim))]
mod switch {
    use super::{Bug, Observation};

    #[inline(always)]
    pub fn injected(_bug: Bug) -> bool {
        false
    }

    #[inline(always)]
    pub fn observing() -> bool {
        false
    }

    #[inline(always)]
    pub fn observe<'a>(_what: impl FnOnce() -> Observation<'a>) {}
}

pub use switch::*;
