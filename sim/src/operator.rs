//! The operator: the cluster operations an etcd user runs during the safety phase — add a
//! learner, let it catch up, promote it; remove a member; transfer leadership — under faults.

use std::time::Duration;

use madsim::rand::seq::SliceRandom;
use madsim::rand::Rng;
use raft::eraftpb::ConfChangeType;

use crate::cluster::Cluster;
use crate::trace::EventKind;

/// How long the operator waits for a membership change to be applied.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A learner is promoted once it is this close to the leader's applied index.
pub const CAUGHT_UP_ENTRIES: u64 = 10;

fn note(cluster: &Cluster, description: String) {
    cluster
        .recorder
        .event(EventKind::Membership { description });
}

/// Proposes a change (retrying through whoever leads) and waits until some member applied it.
pub async fn change(cluster: &Cluster, node_id: u64, change: ConfChangeType) -> bool {
    let before = cluster.changes_applied(node_id, change);
    let what = format!("{change:?} {node_id}");
    note(cluster, format!("propose {what}"));
    let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
    let mut proposed = false;
    while tokio::time::Instant::now() < deadline {
        if cluster.changes_applied(node_id, change) > before {
            note(cluster, format!("{what} applied"));
            return true;
        }
        if !proposed {
            let via = cluster
                .leader()
                .or_else(|| cluster.up_ids().first().copied());
            if let Some(via) = via {
                proposed = cluster.propose_change(via, node_id, change).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    note(
        cluster,
        format!("{what} not applied within {CHANGE_TIMEOUT:?}"),
    );
    false
}

/// Adds member `id` as a learner (starting it first, empty, as `etcd --initial-cluster-state
/// existing` would); `false` if it was not added (the id is taken, or the change failed).
pub async fn add_learner(cluster: &Cluster, id: u64) -> bool {
    cluster.add(id, vec![]) && join_as_learner(cluster, id).await
}

/// Starts member `id`, whose host `Cluster::add` made, and adds it as a learner.
pub async fn join_as_learner(cluster: &Cluster, id: u64) -> bool {
    cluster.start(id).await;
    let added = change(cluster, id, ConfChangeType::AddLearnerNode).await;
    if !added && cluster.changes_applied(id, ConfChangeType::AddLearnerNode) == 0 {
        // Never became a member: stop the process an operator would stop.
        cluster.retire(id);
    }
    added
}

/// Waits until learner `id` has applied close to what the leader has.
pub async fn wait_caught_up(cluster: &Cluster, id: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let leader_applied = cluster
            .leader()
            .and_then(|l| cluster.kv(l))
            .map(|kv| kv.status().raft_applied_index);
        let learner_applied = cluster.kv(id).map(|kv| kv.status().raft_applied_index);
        if let (Some(leader), Some(learner)) = (leader_applied, learner_applied) {
            if learner + CAUGHT_UP_ENTRIES >= leader {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub async fn remove(cluster: &Cluster, id: u64) -> bool {
    let removed = change(cluster, id, ConfChangeType::RemoveNode).await;
    if removed {
        cluster.retire(id);
    }
    removed
}

pub async fn transfer_leader(cluster: &Cluster, to: u64) {
    let Some(leader) = cluster.leader() else {
        return;
    };
    if let Some(kv) = cluster.kv(leader) {
        note(cluster, format!("transfer leadership {leader} -> {to}"));
        let _ = kv.node().transfer_leader(to).await;
    }
}

/// Runs random cluster operations until `until` (simulated time since the start).
pub async fn operate(
    cluster: Cluster,
    initial: Vec<u64>,
    membership: bool,
    transfers: bool,
    until: Duration,
) {
    if !membership && !transfers {
        return;
    }
    let max_members = initial.len() + 2;
    loop {
        let wait = Duration::from_millis(madsim::rand::thread_rng().gen_range(500..=3_000));
        tokio::time::sleep(wait).await;
        if Duration::from_micros(cluster.recorder.now_us()) >= until {
            return;
        }
        let (voters, learners) = cluster.configuration(&initial);
        let do_membership = membership && (!transfers || madsim::rand::thread_rng().gen_bool(0.6));
        if !do_membership {
            let target = voters.choose(&mut madsim::rand::thread_rng()).copied();
            if let Some(to) = target {
                transfer_leader(&cluster, to).await;
            }
            continue;
        }
        let active = cluster.active_ids();
        if let Some(learner) = learners.iter().copied().find(|l| active.contains(l)) {
            if wait_caught_up(&cluster, learner, Duration::from_secs(3)).await {
                change(&cluster, learner, ConfChangeType::AddNode).await;
            }
            continue;
        }
        let remove_one = voters.len() > 3 && madsim::rand::thread_rng().gen_bool(0.5);
        if remove_one {
            if let Some(victim) = voters.choose(&mut madsim::rand::thread_rng()).copied() {
                remove(&cluster, victim).await;
            }
        } else if active.len() < max_members {
            let id = cluster.ids().into_iter().max().unwrap_or(0) + 1;
            add_learner(&cluster, id).await;
        }
    }
}
