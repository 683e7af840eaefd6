//! Named scenarios: known partition stories, scripted, with the workload running throughout and
//! the same liveness phase and checkers afterwards. Timing jitter and the workload still come
//! from the seed.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use raft::eraftpb::ConfChangeType;

use crate::cluster::Cluster;
use crate::faults::{cut, heal, partition};
use crate::operator;
use crate::trace::EventKind;

pub type Script = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    pub nodes: usize,
    pub script: fn(Cluster, Vec<u64>) -> Script,
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "leader-isolated",
        description: "the leader is cut off, the rest elect a new one, the old leader rejoins with a stale term",
        nodes: 5,
        script: |c, _| Box::pin(leader_isolated(c)),
    },
    Scenario {
        name: "split-2-2",
        description: "a 4-member cluster split 2+2: no side has a quorum until the split heals",
        nodes: 4,
        script: |c, _| Box::pin(split_2_2(c)),
    },
    Scenario {
        name: "partition-2-1-add-member",
        description: "a 2+1 partition while a new member is added, catches up and is promoted on the majority side",
        nodes: 3,
        script: |c, _| Box::pin(partition_2_1_add_member(c)),
    },
    Scenario {
        name: "wrong-peer-url",
        description: "a member added with a wrong peer URL: the cluster keeps a quorum without it, then removes it",
        nodes: 3,
        script: |c, _| Box::pin(wrong_peer_url(c)),
    },
    Scenario {
        name: "transfer-during-partition",
        description: "leadership transferred to a follower the leader cannot reach, then to one it can",
        nodes: 5,
        script: |c, _| Box::pin(transfer_during_partition(c)),
    },
    Scenario {
        name: "promote-while-leader-crashes",
        description: "a caught-up learner is promoted and the leader crashes at the same moment",
        nodes: 3,
        script: |c, _| Box::pin(promote_while_leader_crashes(c)),
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

fn step(cluster: &Cluster, description: &str) {
    cluster.recorder.event(EventKind::Fault {
        description: format!("scenario: {description}"),
    });
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn wait_leader(cluster: &Cluster) -> Option<u64> {
    for _ in 0..200 {
        if let Some(leader) = cluster.leader() {
            return Some(leader);
        }
        sleep_ms(50).await;
    }
    None
}

fn others(cluster: &Cluster, except: &[u64]) -> Vec<u64> {
    cluster
        .active_ids()
        .into_iter()
        .filter(|id| !except.contains(id))
        .collect()
}

async fn leader_isolated(cluster: Cluster) {
    sleep_ms(2_000).await;
    let Some(leader) = wait_leader(&cluster).await else {
        return;
    };
    let rest = others(&cluster, &[leader]);
    partition(
        &cluster,
        format!("leader {leader} isolated"),
        cut(&[leader], &rest),
    );
    sleep_ms(5_000).await;
    step(&cluster, &format!("old leader {leader} rejoins"));
    heal(&cluster);
    sleep_ms(3_000).await;
}

async fn split_2_2(cluster: Cluster) {
    sleep_ms(2_000).await;
    wait_leader(&cluster).await;
    partition(&cluster, "[1, 2] | [3, 4]".into(), cut(&[1, 2], &[3, 4]));
    sleep_ms(5_000).await;
    heal(&cluster);
    sleep_ms(3_000).await;
}

async fn partition_2_1_add_member(cluster: Cluster) {
    sleep_ms(2_000).await;
    let Some(leader) = wait_leader(&cluster).await else {
        return;
    };
    let rest = others(&cluster, &[leader]);
    let (with_leader, alone) = (rest[0], rest[1]);
    partition(
        &cluster,
        format!("[{leader}, {with_leader}] | [{alone}]"),
        cut(&[leader, with_leader], &[alone]),
    );
    sleep_ms(1_000).await;
    // The new member reaches the majority side only.
    cluster.network.block(cut(&[4], &[alone]));
    if operator::add_learner(&cluster, 4).await
        && operator::wait_caught_up(&cluster, 4, Duration::from_secs(5)).await
    {
        operator::change(&cluster, 4, ConfChangeType::AddNode).await;
    }
    sleep_ms(2_000).await;
    heal(&cluster);
    sleep_ms(3_000).await;
}

async fn wrong_peer_url(cluster: Cluster) {
    sleep_ms(2_000).await;
    wait_leader(&cluster).await;
    step(
        &cluster,
        "member add 4 with peer URL http://10.0.0.99:2380 (wrong)",
    );
    cluster.add(4, vec![]);
    cluster.start(4).await;
    cluster.set_peer_url(4, "http://10.0.0.99:2380");
    operator::change(&cluster, 4, ConfChangeType::AddNode).await;
    // Four voters, one unreachable: a quorum of three still serves.
    sleep_ms(4_000).await;
    step(&cluster, "member remove 4");
    operator::remove(&cluster, 4).await;
    sleep_ms(3_000).await;
}

async fn transfer_during_partition(cluster: Cluster) {
    sleep_ms(2_000).await;
    let Some(leader) = wait_leader(&cluster).await else {
        return;
    };
    let rest = others(&cluster, &[leader]);
    let unreachable = rest[0];
    partition(
        &cluster,
        format!("{leader} -/- {unreachable}"),
        cut(&[leader], &[unreachable]),
    );
    sleep_ms(500).await;
    operator::transfer_leader(&cluster, unreachable).await;
    sleep_ms(3_000).await;
    if let Some(to) = rest.get(1).copied() {
        operator::transfer_leader(&cluster, to).await;
    }
    sleep_ms(2_000).await;
    heal(&cluster);
    sleep_ms(3_000).await;
}

async fn promote_while_leader_crashes(cluster: Cluster) {
    sleep_ms(2_000).await;
    wait_leader(&cluster).await;
    if !operator::add_learner(&cluster, 4).await {
        return;
    }
    operator::wait_caught_up(&cluster, 4, Duration::from_secs(5)).await;
    let Some(leader) = cluster.leader() else {
        return;
    };
    step(&cluster, &format!("promote 4 and crash leader {leader}"));
    let promote = {
        let cluster = cluster.clone();
        tokio::spawn(async move { operator::change(&cluster, 4, ConfChangeType::AddNode).await })
    };
    sleep_ms(1).await;
    cluster.crash(leader);
    sleep_ms(2_000).await;
    cluster.start(leader).await;
    if !promote.await.unwrap_or(false) {
        operator::change(&cluster, 4, ConfChangeType::AddNode).await;
    }
    sleep_ms(3_000).await;
}
