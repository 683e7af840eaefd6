//! A cluster of real members (node, WAL, mvcc, apply loop, request path: everything below
//! gRPC) in one simulated process, each on its own madsim node so that a crash or a pause
//! takes all of its tasks, on simulated disk, backend, network and clock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use madsim::rand::Rng;
use madsim::runtime::{Handle, NodeHandle as SimNode};
use quorumkv::io::MemBackend;
use quorumkv::proto::etcdserverpb::Member;
use quorumkv::raft::single_change;
use quorumkv::server::{start_member, KvServer, MemberConfig};
use quorumkv::wal::WalOptions;
use raft::eraftpb::ConfChangeType;

use crate::clock::SimClock;
use crate::disk::SimDisk;
use crate::network::SimNetwork;
use crate::recorder::Recorder;
use crate::trace::EventKind;

/// The members' `--experimental-watch-progress-notify-interval`: short, so that the watch
/// sessions (0.5 to 4 s) get periodic progress notifications for the checker to check.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Timing and sizes of every member (etcd's defaults where they matter for timing).
#[derive(Debug, Clone)]
pub struct MemberSettings {
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub snapshot_count: u64,
    /// Entries kept behind a snapshot: small values make followers catch up from snapshots.
    pub catch_up_entries: u64,
    /// The chunks a snapshot image is sent in: small, so that every transfer takes many and
    /// faults land in the middle of them.
    pub snapshot_chunk_bytes: usize,
    pub segment_bytes: u64,
    /// Largest clock skew, in parts per million either way.
    pub max_skew_ppm: u64,
    /// Tear the last unsynced write on a crash.
    pub torn_writes: bool,
}

pub struct SimMember {
    pub id: u64,
    /// Where it listens for peers.
    pub url: String,
    pub initial_voters: Vec<u64>,
    pub disk: SimDisk,
    pub backend: MemBackend,
    pub node: Option<SimNode>,
    pub kv: Option<KvServer>,
    pub paused: bool,
    /// Removed from the cluster: never restarted, not expected to converge.
    pub removed: bool,
    /// A `start` is under way (its process is being made): another must not make a second.
    pub starting: bool,
    pub incarnation: u64,
}

#[derive(Clone)]
pub struct Cluster {
    members: Arc<Mutex<BTreeMap<u64, SimMember>>>,
    pub network: SimNetwork,
    pub recorder: Recorder,
    pub settings: MemberSettings,
}

pub fn peer_url(id: u64) -> String {
    format!("http://10.0.0.{id}:2380")
}

impl Cluster {
    pub fn new(settings: MemberSettings, recorder: Recorder) -> Self {
        let network = SimNetwork::new();
        network.set_recorder(recorder.clone());
        Cluster {
            members: Arc::default(),
            network,
            recorder,
            settings,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, SimMember>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a member that is not running yet. `initial_voters` is empty for one that joins a
    /// running cluster.
    /// Makes a host for member `id`; `false` (and nothing changes) if there is one: a member
    /// id is never reused, and a second host would run a second process with the same id.
    pub fn add(&self, id: u64, initial_voters: Vec<u64>) -> bool {
        let url = peer_url(id);
        let mut members = self.lock();
        if members.contains_key(&id) {
            return false;
        }
        members.insert(
            id,
            SimMember {
                id,
                url,
                initial_voters,
                disk: SimDisk::new(),
                backend: MemBackend::new(),
                node: None,
                kv: None,
                paused: false,
                removed: false,
                starting: false,
                incarnation: 0,
            },
        );
        true
    }

    pub fn ids(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// Members not removed.
    pub fn active_ids(&self) -> Vec<u64> {
        self.lock()
            .values()
            .filter(|m| !m.removed)
            .map(|m| m.id)
            .collect()
    }

    /// Members running and not paused.
    pub fn up_ids(&self) -> Vec<u64> {
        self.lock()
            .values()
            .filter(|m| m.kv.is_some() && !m.paused && !m.removed)
            .map(|m| m.id)
            .collect()
    }

    pub fn down_ids(&self) -> Vec<u64> {
        self.lock()
            .values()
            .filter(|m| m.kv.is_none() && !m.removed)
            .map(|m| m.id)
            .collect()
    }

    pub fn paused_ids(&self) -> Vec<u64> {
        self.lock()
            .values()
            .filter(|m| m.paused)
            .map(|m| m.id)
            .collect()
    }

    pub fn kv(&self, id: u64) -> Option<KvServer> {
        self.lock().get(&id).and_then(|m| m.kv.clone())
    }

    /// The leader most running members agree on, if any.
    pub fn leader(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for id in self.up_ids() {
            if let Some(kv) = self.kv(id) {
                let leader = kv.status().leader;
                if leader != 0 {
                    *votes.entry(leader).or_default() += 1;
                }
            }
        }
        votes
            .into_iter()
            .max_by_key(|(id, n)| (*n, *id))
            .map(|(id, _)| id)
            .filter(|id| self.up_ids().contains(id))
    }

    /// Starts (or restarts) member `id` on a fresh madsim node.
    pub async fn start(&self, id: u64) {
        let (config, disk, backend, url) = {
            let mut members = self.lock();
            let Some(member) = members.get_mut(&id) else {
                return;
            };
            // Found by the `replication` fuzzer: a Restart step ran while the AddLearner
            // before it was still starting the same member, and two processes ran as it.
            if member.kv.is_some() || member.removed || member.starting {
                return;
            }
            member.starting = true;
            member.incarnation += 1;
            let config = MemberConfig {
                auth: Default::default(),
                watch_progress_notify_interval: PROGRESS_INTERVAL,
                quota_backend_bytes: 0,
                member_id: id,
                cluster_id: 0x51_4b_56,
                initial_voters: member.initial_voters.clone(),
                member_dir: PathBuf::from(format!("/n{id}/member")),
                heartbeat_interval: self.settings.heartbeat_interval,
                election_timeout: self.settings.election_timeout,
                snapshot_count: self.settings.snapshot_count,
                max_request_bytes: 1536 * 1024,
                max_txn_ops: 128,
                strict_reconfig_check: true,
                wal: WalOptions {
                    segment_bytes: self.settings.segment_bytes,
                },
                id_seed: madsim::rand::thread_rng().gen(),
                snapshot_catch_up_entries: self.settings.catch_up_entries,
                snapshot_chunk_bytes: self.settings.snapshot_chunk_bytes,
                // The names and URLs `add` gives every member.
                initial_members: member
                    .initial_voters
                    .iter()
                    .map(|voter| Member {
                        id: *voter,
                        name: format!("n{voter}"),
                        peer_ur_ls: vec![peer_url(*voter)],
                        ..Default::default()
                    })
                    .collect(),
                saved_index: None,
            };
            (
                config,
                member.disk.clone(),
                member.backend.clone(),
                member.url.clone(),
            )
        };
        let skew = self.settings.max_skew_ppm;
        let rate_ppm = if skew == 0 {
            1_000_000
        } else {
            madsim::rand::thread_rng().gen_range(1_000_000 - skew..=1_000_000 + skew)
        };
        let inbox = self.network.listen(&url);
        self.network.set_address(id, &url);
        let transport = self.network.transport(id);
        let node = Handle::current()
            .create_node()
            .name(format!("n{id}"))
            .build();
        let recorder = self.recorder.clone();
        let faulty_disk = disk.clone();
        let fault_seen = disk.clone();
        let started = node
            .spawn(async move {
                let running = start_member(
                    &config,
                    Arc::new(disk),
                    Arc::new(backend),
                    transport,
                    inbox,
                    Arc::new(SimClock::new(rate_ppm)),
                );
                match running {
                    Ok(running) => {
                        let kv = running.kv.clone();
                        let recorder_node = recorder.clone();
                        tokio::spawn(async move {
                            if let Ok(Err(e)) = running.node_task.await {
                                // After a disk fault, stopping is what the node must do (the
                                // process exits; the fault injector then crashes it).
                                if faulty_disk.fault_fired().is_some() {
                                    faulty_disk.note_stopped(e.to_string());
                                } else {
                                    recorder_node
                                        .lock()
                                        .violations
                                        .push(format!("node {id} stopped with an error: {e}"));
                                }
                            }
                        });
                        tokio::spawn(async move {
                            if let Ok(Err(e)) = running.apply_task.await {
                                recorder
                                    .lock()
                                    .violations
                                    .push(format!("node {id}'s apply loop failed: {e}"));
                            }
                        });
                        Ok(kv)
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
        let kv = match started {
            Ok(Ok(kv)) => Some(kv),
            // A start on a failed disk must fail (and say why).
            Ok(Err(e)) if fault_seen.fault_fired().is_some() => {
                fault_seen.note_stopped(e);
                None
            }
            Ok(Err(e)) => {
                self.recorder
                    .lock()
                    .violations
                    .push(format!("node {id} failed to start: {e}"));
                None
            }
            Err(e) => {
                self.recorder
                    .lock()
                    .violations
                    .push(format!("node {id} failed to start: {e}"));
                None
            }
        };
        let restarted = {
            let mut members = self.lock();
            let Some(member) = members.get_mut(&id) else {
                return;
            };
            member.starting = false;
            let Some(kv) = kv else {
                return;
            };
            member.node = Some(node);
            member.kv = Some(kv);
            member.incarnation > 1
        };
        if restarted {
            self.recorder.event(EventKind::Restart { node: id });
        }
    }

    /// Member `id`'s disk.
    pub fn disk_of(&self, id: u64) -> Option<SimDisk> {
        self.lock().get(&id).map(|m| m.disk.clone())
    }

    /// Kills member `id` now: its tasks vanish, unsynced disk writes and unflushed backend
    /// writes are lost (the last write possibly torn).
    pub fn crash(&self, id: u64) {
        let mut rng = madsim::rand::thread_rng();
        let report = {
            let mut members = self.lock();
            let Some(member) = members.get_mut(&id) else {
                return;
            };
            let Some(node) = member.node.take() else {
                return;
            };
            member.kv = None;
            member.paused = false;
            Handle::current().kill(node.id());
            self.network.stop_listening(&member.url);
            let report = member.disk.crash(&mut rng, self.settings.torn_writes);
            member.backend = member.backend.crashed_copy();
            report
        };
        self.recorder.node_down(id);
        self.recorder.event(EventKind::Crash {
            node: id,
            detail: format!(
                "({} unsynced disk writes lost, {} torn)",
                report.lost_changes, report.torn_files
            ),
        });
    }

    /// Ends the run: every member's tasks are killed. A madsim task keeps a waker to itself, so
    /// one still waiting when the runtime is dropped is never freed; without this, each run would
    /// leave its members' state behind in the process (about 0.7 MB a run, which long fuzzing
    /// runs of many thousands of schedules cannot afford).
    pub fn kill_all(&self) {
        let mut members = self.lock();
        for member in members.values_mut() {
            if let Some(node) = member.node.take() {
                Handle::current().kill(node.id());
            }
            member.kv = None;
            member.paused = false;
        }
    }

    pub fn pause(&self, id: u64) {
        let mut members = self.lock();
        if let Some(member) = members.get_mut(&id) {
            if let (Some(node), false) = (&member.node, member.paused) {
                Handle::current().pause(node.id());
                member.paused = true;
                drop(members);
                self.recorder.event(EventKind::Pause { node: id });
            }
        }
    }

    pub fn resume(&self, id: u64) {
        let mut members = self.lock();
        if let Some(member) = members.get_mut(&id) {
            if let (Some(node), true) = (&member.node, member.paused) {
                Handle::current().resume(node.id());
                member.paused = false;
                drop(members);
                self.recorder.event(EventKind::Resume { node: id });
            }
        }
    }

    /// Stops a member that left the cluster, for good.
    pub fn retire(&self, id: u64) {
        self.crash(id);
        if let Some(member) = self.lock().get_mut(&id) {
            member.removed = true;
        }
    }

    /// Points the cluster's address of `id` somewhere (a wrong URL makes it unreachable).
    pub fn set_peer_url(&self, id: u64, url: &str) {
        self.network.set_address(id, url);
    }

    /// Proposes one membership change through member `via`; `true` once raft accepted it
    /// (it may still be dropped later: callers wait for it to be applied).
    pub async fn propose_change(&self, via: u64, node_id: u64, change: ConfChangeType) -> bool {
        let Some(kv) = self.kv(via) else {
            return false;
        };
        match kv
            .node()
            .propose_conf_change(single_change(node_id, change))
            .await
        {
            // The receiver closes without a value once raft took the proposal, and yields an
            // error if raft refused it; no answer yet counts as taken.
            Ok(rejected) => {
                matches!(
                    tokio::time::timeout(Duration::from_millis(100), rejected).await,
                    Ok(Err(_)) | Err(_)
                )
            }
            Err(_) => false,
        }
    }

    /// How many times a change of this kind for `node_id` has been applied somewhere.
    pub fn changes_applied(&self, node_id: u64, change: ConfChangeType) -> usize {
        self.recorder
            .lock()
            .changes
            .iter()
            .filter(|c| c.node_id == node_id && c.change == change)
            .count()
    }

    /// Voters and learners, from the membership changes applied so far.
    pub fn configuration(&self, initial: &[u64]) -> (Vec<u64>, Vec<u64>) {
        let mut voters: std::collections::BTreeSet<u64> = initial.iter().copied().collect();
        let mut learners = std::collections::BTreeSet::new();
        for change in &self.recorder.lock().changes {
            match change.change {
                ConfChangeType::AddNode => {
                    learners.remove(&change.node_id);
                    voters.insert(change.node_id);
                }
                ConfChangeType::AddLearnerNode => {
                    if !voters.contains(&change.node_id) {
                        learners.insert(change.node_id);
                    }
                }
                ConfChangeType::RemoveNode => {
                    voters.remove(&change.node_id);
                    learners.remove(&change.node_id);
                }
            }
        }
        (voters.into_iter().collect(), learners.into_iter().collect())
    }
}
