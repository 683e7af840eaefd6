//! Liveness: once every fault is healed (network whole, crashed members restarted, paused ones
//! resumed), the cluster must agree on a leader, take a write, and bring every member to the
//! same applied index and the same state — within a bound of simulated time.

use std::time::Duration;

use quorumkv::proto::etcdserverpb::RangeRequest;

use super::Verdict;
use crate::cluster::Cluster;
use crate::history::{OpKind, OpResult};
use crate::recorder::Recorder;
use crate::trace::{EventKind, Fnv};
use crate::workload::{self, History};

/// Heals every fault the run injected, and stops members that a removal (applied after the
/// operator stopped waiting for it) took out of the configuration.
pub async fn heal_everything(cluster: &Cluster, initial: &[u64]) {
    retire_non_members(cluster, initial);
    crate::faults::heal(cluster);
    if cluster.network.has_plan() {
        cluster.network.set_plan(None);
        cluster.recorder.event(EventKind::Fault {
            description: "the schedule's network plan ends".into(),
        });
    }
    let faults = cluster.network.faults();
    if faults != crate::network::LinkFaults::default() {
        cluster.network.set_faults(crate::network::LinkFaults {
            delay_min: Duration::from_micros(100),
            delay_max: Duration::from_micros(300),
            ..Default::default()
        });
        cluster.recorder.event(EventKind::Fault {
            description: "link faults off".into(),
        });
    }
    for id in cluster.paused_ids() {
        cluster.resume(id);
    }
    for id in cluster.down_ids() {
        cluster.start(id).await;
    }
}

fn retire_non_members(cluster: &Cluster, initial: &[u64]) {
    let (voters, learners) = cluster.configuration(initial);
    for id in cluster.active_ids() {
        if !voters.contains(&id) && !learners.contains(&id) {
            cluster.recorder.event(EventKind::Membership {
                description: format!("{id} is no longer a member: stopped"),
            });
            cluster.retire(id);
        }
    }
}

/// A member's whole live state and revision, serializably (local) read.
pub async fn state_of(cluster: &Cluster, id: u64) -> Option<(u64, i64)> {
    let kv = cluster.kv(id)?;
    let response = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            serializable: true,
            ..Default::default()
        })
        .await
        .ok()?;
    let mut hash = Fnv::default();
    for kv in &response.kvs {
        hash.write(&kv.key);
        hash.write(&kv.value);
        hash.write_u64(kv.mod_revision as u64);
        hash.write_u64(kv.create_revision as u64);
        hash.write_u64(kv.version as u64);
    }
    let revision = response.header.map_or(0, |h| h.revision);
    hash.write_u64(revision as u64);
    Some((hash.finish(), revision))
}

/// Waits for the cluster to converge; `bound` is simulated time.
pub async fn converge(
    cluster: &Cluster,
    initial: &[u64],
    history: &History,
    bound: Duration,
) -> Verdict {
    let recorder: &Recorder = &cluster.recorder;
    let start_us = recorder.now_us();
    let deadline = tokio::time::Instant::now() + bound;
    let mut stage = "agree on a leader";
    let mut wrote = false;
    while tokio::time::Instant::now() < deadline {
        // A removal applied only now stops its member; members that crashed again (a restart
        // racing the heal) are started again.
        retire_non_members(cluster, initial);
        for id in cluster.down_ids() {
            cluster.start(id).await;
        }
        let active = cluster.active_ids();
        let leader = cluster.leader();
        let agreed = leader.is_some_and(|leader| {
            active.iter().all(|id| {
                cluster
                    .kv(*id)
                    .is_some_and(|kv| kv.status().leader == leader)
            })
        });
        if !agreed {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let Some(leader) = leader else { continue };
        if !wrote {
            stage = "take a write";
            let result = workload::record(
                cluster,
                history,
                0,
                leader,
                OpKind::Put {
                    key: "liveness".into(),
                    value: format!("probe@{}", recorder.now_us()),
                },
            )
            .await;
            wrote = matches!(result, OpResult::Put { .. });
            if !wrote {
                // Refused at once (a transfer under way, say): not again in the same instant
                // (found by fuzzing: millions of probes in 0.6 simulated seconds, a timeout).
                tokio::time::sleep(workload::FAILURE_BACKOFF).await;
            }
            continue;
        }
        stage = "converge";
        let mut states = Vec::new();
        for id in &active {
            states.push(state_of(cluster, *id).await);
        }
        let applied: Vec<Option<u64>> = active
            .iter()
            .map(|id| cluster.kv(*id).map(|kv| kv.status().raft_applied_index))
            .collect();
        let same_state = states.iter().all(|s| s.is_some() && *s == states[0]);
        let same_applied = applied.iter().all(|a| a.is_some() && *a == applied[0]);
        if same_state && same_applied {
            let took_ms = (recorder.now_us() - start_us) / 1000;
            return Verdict {
                name: "liveness",
                ok: true,
                detail: format!(
                    "leader {leader}, {} members at applied index {} with one state, {took_ms} ms after healing",
                    active.len(),
                    applied[0].unwrap_or(0)
                ),
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report: Vec<String> = cluster
        .active_ids()
        .into_iter()
        .map(|id| match cluster.kv(id) {
            Some(kv) => {
                let s = kv.status();
                format!(
                    "n{id}: leader {} term {} commit {} applied {}",
                    s.leader, s.raft_term, s.raft_index, s.raft_applied_index
                )
            }
            None => format!("n{id}: down"),
        })
        .collect();
    Verdict {
        name: "liveness",
        ok: false,
        detail: format!(
            "did not {stage} within {bound:?} of healing; {}",
            report.join("; ")
        ),
    }
}
