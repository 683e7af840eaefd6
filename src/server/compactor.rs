//! Auto-compaction (`--auto-compaction-mode`, `--auto-compaction-retention`), on the leader
//! only, as in etcd. In `periodic` mode the leader notes the revision every tenth of the
//! retention and, as often, compacts to the one it noted a retention ago (etcd samples as
//! often but compacts less often for long retentions); in `revision` mode it compacts every 5
//! minutes to the revision `retention` revisions behind the newest.

use std::collections::VecDeque;
use std::time::Duration;

use super::error::ServerError;
use super::kv::KvServer;
use crate::mvcc::MvccError;
use crate::proto::etcdserverpb::CompactionRequest;

/// How often `revision` mode looks (etcd: 5 minutes).
pub const REVISION_MODE_INTERVAL: Duration = Duration::from_secs(300);
/// Periodic mode notes a revision this many times per retention.
const SAMPLES_PER_RETENTION: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep this much history by time.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

impl AutoCompaction {
    /// From the flags; `None` when the retention is 0 (off).
    pub fn from_flags(mode: &str, retention: &str) -> Result<Option<Self>, String> {
        let retention = retention.trim();
        match mode {
            "periodic" => {
                // A bare number counts hours, as in etcd.
                let span = match retention.parse::<u64>() {
                    Ok(hours) => Duration::from_secs(hours * 3600),
                    Err(_) => crate::config::parse_duration(retention)
                        .map_err(|e| format!("--auto-compaction-retention: {e}"))?,
                };
                Ok((!span.is_zero()).then_some(AutoCompaction::Periodic(span)))
            }
            "revision" => {
                let revisions: i64 = retention.parse().map_err(|_| {
                    format!("--auto-compaction-retention {retention:?}: want a number of revisions")
                })?;
                Ok((revisions > 0).then_some(AutoCompaction::Revision(revisions)))
            }
            other => Err(format!(
                "--auto-compaction-mode {other:?}: want 'periodic' or 'revision'"
            )),
        }
    }

    /// How often the compactor looks.
    pub fn interval(&self) -> Duration {
        match self {
            AutoCompaction::Periodic(span) => {
                (*span / SAMPLES_PER_RETENTION).max(Duration::from_millis(100))
            }
            AutoCompaction::Revision(_) => REVISION_MODE_INTERVAL,
        }
    }
}

/// The compactor's memory: revisions noted (periodic mode) and the last compaction asked for.
#[derive(Debug)]
pub struct Compactor {
    policy: AutoCompaction,
    /// (when, in ms of the compactor's clock; the revision then), oldest first.
    samples: VecDeque<(u64, i64)>,
    last_compacted: i64,
}

impl Compactor {
    pub fn new(policy: AutoCompaction) -> Self {
        Compactor {
            policy,
            samples: VecDeque::new(),
            last_compacted: 0,
        }
    }

    /// One look at `now_ms`: the revision to compact to, if any. A member that does not lead
    /// forgets what it noted (a new leader starts its own window, as etcd's does).
    pub fn tick(&mut self, now_ms: u64, current_rev: i64, leader: bool) -> Option<i64> {
        if !leader {
            self.samples.clear();
            return None;
        }
        let target = match self.policy {
            AutoCompaction::Periodic(span) => {
                self.samples.push_back((now_ms, current_rev));
                let cutoff = now_ms.checked_sub(span.as_millis() as u64)?;
                let mut target = None;
                while let Some(&(at, rev)) = self.samples.front() {
                    if at > cutoff {
                        break;
                    }
                    target = Some(rev);
                    self.samples.pop_front();
                }
                target?
            }
            AutoCompaction::Revision(keep) => current_rev - keep,
        };
        (target > self.last_compacted && target > 0).then(|| {
            self.last_compacted = target;
            target
        })
    }
}

impl KvServer {
    /// Runs the compactor until the member stops.
    pub async fn run_auto_compaction(self, policy: AutoCompaction) {
        let mut compactor = Compactor::new(policy);
        let start = tokio::time::Instant::now();
        let mut every = tokio::time::interval(policy.interval());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stopped() {
            every.tick().await;
            let status = self.status();
            let leader = status.leader == self.member_id() && !self.is_learner();
            let now_ms = start.elapsed().as_millis() as u64;
            let Some(revision) = compactor.tick(now_ms, status.revision, leader) else {
                continue;
            };
            tracing::info!(revision, ?policy, "starting auto-compaction");
            let request = CompactionRequest {
                revision,
                physical: true,
            };
            match self.compact(request).await {
                Ok(_) => tracing::info!(revision, "finished auto-compaction"),
                Err(ServerError::Mvcc(MvccError::Compacted)) => {}
                Err(e) => tracing::warn!(revision, error = %e, "auto-compaction failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_read_as_etcd_reads_them() {
        let periodic = |r: &str| AutoCompaction::from_flags("periodic", r);
        assert_eq!(
            periodic("1"),
            Ok(Some(AutoCompaction::Periodic(Duration::from_secs(3600))))
        );
        assert_eq!(
            periodic("30m"),
            Ok(Some(AutoCompaction::Periodic(Duration::from_secs(1800))))
        );
        assert_eq!(periodic("0"), Ok(None));
        assert_eq!(
            AutoCompaction::from_flags("revision", "1000"),
            Ok(Some(AutoCompaction::Revision(1000)))
        );
        assert!(AutoCompaction::from_flags("revision", "1h").is_err());
        assert!(AutoCompaction::from_flags("hourly", "1").is_err());
    }

    #[test]
    fn periodic_compacts_to_the_revision_noted_a_retention_ago_and_only_on_the_leader() {
        let mut compactor = Compactor::new(AutoCompaction::Periodic(Duration::from_secs(10)));
        // A tick a second, the revision growing by 5 a second.
        let mut compacted = Vec::new();
        for second in 0..=25u64 {
            let rev = 1 + 5 * second as i64;
            if let Some(target) = compactor.tick(second * 1000, rev, true) {
                compacted.push((second, target));
            }
        }
        assert_eq!(
            compacted.first(),
            Some(&(10, 1)),
            "nothing before a retention"
        );
        assert!(compacted
            .iter()
            .all(|(second, target)| *target == 1 + 5 * (*second as i64 - 10)));
        // A follower forgets; once leader again it waits a whole retention.
        assert_eq!(compactor.tick(26_000, 200, false), None);
        assert_eq!(compactor.tick(27_000, 205, true), None);
        assert_eq!(compactor.tick(36_000, 250, true), None);
        assert_eq!(compactor.tick(37_000, 255, true), Some(205));
    }

    #[test]
    fn revision_mode_keeps_the_retention_and_never_compacts_backwards() {
        let mut compactor = Compactor::new(AutoCompaction::Revision(100));
        assert_eq!(compactor.tick(0, 50, true), None);
        assert_eq!(compactor.tick(1, 150, true), Some(50));
        assert_eq!(compactor.tick(2, 150, true), None, "nothing new");
        assert_eq!(compactor.tick(3, 400, true), Some(300));
    }
}
