//! Members in one process over `LocalTransport`: the node API with more than one voter
//! (elections, forwarding, ReadIndex on followers, leader transfer, restart).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::io::{LocalTransport, MemBackend, StdDisk, TokioClock};
use crate::proto::etcdserverpb::{PutRequest, RangeRequest};
use crate::raft::single_change;
use crate::wal::WalOptions;
use raft::eraftpb::ConfChangeType;

fn config(id: u64, voters: &[u64], root: &std::path::Path) -> MemberConfig {
    MemberConfig {
        auth: Default::default(),
        watch_progress_notify_interval: crate::watch::PROGRESS_NOTIFY_INTERVAL,
        quota_backend_bytes: 0,
        member_id: id,
        cluster_id: 7,
        initial_voters: voters.to_vec(),
        member_dir: root.join(format!("m{id}")).join("member"),
        heartbeat_interval: Duration::from_millis(10),
        election_timeout: Duration::from_millis(100),
        snapshot_count: 50,
        max_request_bytes: 1 << 20,
        max_txn_ops: 128,
        strict_reconfig_check: true,
        wal: WalOptions {
            segment_bytes: 1 << 20,
        },
        id_seed: id * 1000,
        snapshot_catch_up_entries: 10,
        snapshot_chunk_bytes: 4096,
        initial_members: vec![],
        saved_index: None,
    }
}

fn start(
    id: u64,
    voters: &[u64],
    root: &std::path::Path,
    transport: &LocalTransport,
    backend: MemBackend,
) -> RunningMember {
    let inbox = transport.register(id);
    start_member(
        &config(id, voters, root),
        StdDisk::shared(),
        Arc::new(backend),
        Arc::new(transport.clone()),
        inbox,
        Arc::new(TokioClock::new()),
    )
    .expect("start member")
}

async fn wait_leader(members: &[&RunningMember]) -> u64 {
    for _ in 0..500 {
        let leaders: Vec<u64> = members.iter().map(|m| m.kv.status().leader).collect();
        if leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]) {
            return leaders[0];
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no agreed leader");
}

/// Members 1, 2 and 3 of a new cluster, once they agree on a leader.
async fn three_members(
    root: &std::path::Path,
    transport: &LocalTransport,
) -> (Vec<RunningMember>, u64) {
    let voters = [1, 2, 3];
    let members: Vec<RunningMember> = voters
        .iter()
        .map(|id| start(*id, &voters, root, transport, MemBackend::new()))
        .collect();
    let refs: Vec<&RunningMember> = members.iter().collect();
    let leader = wait_leader(&refs).await;
    (members, leader)
}

fn the_leader(members: &[RunningMember], leader: u64) -> &RunningMember {
    members
        .iter()
        .find(|m| m.kv.config().member_id == leader)
        .expect("the leader")
}

fn a_follower(members: &[RunningMember], leader: u64) -> &RunningMember {
    members
        .iter()
        .find(|m| m.kv.config().member_id != leader)
        .expect("a follower")
}

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_replicate_forward_and_read_linearizably_on_followers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let (members, leader) = three_members(dir.path(), &transport).await;
    let follower = a_follower(&members, leader);
    // A write sent to a follower is forwarded by raft to the leader.
    for i in 0..120 {
        follower
            .kv
            .put(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .expect("put via follower");
    }
    // Every member answers a linearizable read with the last write.
    for member in &members {
        let resp = member
            .kv
            .range(RangeRequest {
                key: b"k119".to_vec(),
                ..Default::default()
            })
            .await
            .expect("range");
        assert_eq!(
            resp.kvs[0].value,
            b"v119",
            "member {}",
            member.kv.config().member_id
        );
        assert_eq!(resp.header.expect("header").revision, 121);
    }
    // Leader transfer moves leadership to the chosen member.
    let target = members
        .iter()
        .map(|m| m.kv.config().member_id)
        .find(|id| *id != leader)
        .expect("target");
    members[0]
        .kv
        .node()
        .transfer_leader(target)
        .await
        .expect("transfer");
    let leader_member = the_leader(&members, leader);
    leader_member
        .kv
        .node()
        .transfer_leader(target)
        .await
        .expect("transfer");
    let mut moved = false;
    for _ in 0..300 {
        if members.iter().all(|m| m.kv.status().leader == target) {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(moved, "leadership moved to {target}");
    let term = members[0].kv.node().status().term.load(Ordering::Relaxed);
    assert!(term >= 2, "a transfer starts a new term");
    members[1]
        .kv
        .put(put("after", "transfer"))
        .await
        .expect("put after transfer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_restart_replays_the_wal_past_the_flushed_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let backend = MemBackend::new();
    let member = start(1, &[1], dir.path(), &transport, backend.clone());
    for i in 0..180 {
        member
            .kv
            .put(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .expect("put");
    }
    // Crash: the backend keeps only what was flushed (at the snapshots every 50 entries).
    member.node_task.abort();
    member.apply_task.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    transport.unregister(1);
    let restarted = start(1, &[1], dir.path(), &transport, backend.crashed_copy());
    for _ in 0..200 {
        if restarted.kv.status().leader == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = restarted
        .kv
        .range(RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("range");
    assert_eq!(resp.count, 180, "every acknowledged put is back");
    let resp = restarted
        .kv
        .range(RangeRequest {
            key: b"k179".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range");
    assert_eq!(resp.kvs[0].value, b"v179");
    assert_eq!(resp.kvs[0].mod_revision, 181);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_the_compacted_log_catches_up_from_a_snapshot_with_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let (members, leader) = three_members(dir.path(), &transport).await;
    let leader_member = the_leader(&members, leader);
    let lagging = a_follower(&members, leader);
    let lagging_id = lagging.kv.config().member_id;
    leader_member
        .kv
        .put(put("before", "cut"))
        .await
        .expect("put");
    transport.set_isolated(lagging_id, true);
    // Far more than --snapshot-count (50): the leader compacts its log past the follower.
    for i in 0..300 {
        leader_member
            .kv
            .put(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .expect("put");
    }
    transport.set_isolated(lagging_id, false);
    let read = RangeRequest {
        key: b"k299".to_vec(),
        serializable: true,
        ..Default::default()
    };
    let mut caught_up = false;
    for _ in 0..500 {
        if let Ok(resp) = lagging.kv.range(read.clone()).await {
            if resp.kvs.first().is_some_and(|kv| kv.value == b"v299") {
                caught_up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(caught_up, "the lagging follower caught up");
    let snap_dir = dir.path().join(format!("m{lagging_id}/member/snap"));
    // raft's snapshot names an image (the image itself is gone once the backend holds it).
    let names_an_image = std::fs::read_dir(&snap_dir)
        .expect("snap dir")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
        .any(|bytes| bytes.windows(8).any(|w| w == b"QKVIMG01"));
    assert!(
        names_an_image,
        "it caught up through a snapshot with an image"
    );
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        count_only: true,
        serializable: true,
        ..Default::default()
    };
    assert_eq!(
        lagging.kv.range(all).await.expect("range").count,
        301,
        "every key, the early one too"
    );
    let history = RangeRequest {
        key: b"k0".to_vec(),
        revision: 3,
        serializable: true,
        ..Default::default()
    };
    assert_eq!(
        lagging.kv.range(history).await.expect("range").kvs[0].value,
        b"v0",
        "history came along"
    );
    // And it keeps following afterwards.
    leader_member
        .kv
        .put(put("after", "catch-up"))
        .await
        .expect("put");
    for _ in 0..300 {
        let resp = lagging
            .kv
            .range(RangeRequest {
                key: b"after".to_vec(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("range");
        if !resp.kvs.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the follower stopped following after the snapshot");
}

async fn change(member: &RunningMember, node_id: u64, change_type: ConfChangeType) {
    let rejected = member
        .kv
        .node()
        .propose_conf_change(single_change(node_id, change_type))
        .await
        .expect("propose");
    assert!(rejected.await.is_err(), "raft accepted the change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_added_catches_up_is_promoted_and_a_member_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let (members, leader) = three_members(dir.path(), &transport).await;
    let leader_member = the_leader(&members, leader);
    for i in 0..20 {
        leader_member
            .kv
            .put(put(&format!("k{i}"), "v"))
            .await
            .expect("put");
    }
    // A new member starts with no configuration and joins as a learner.
    let learner = start(4, &[], dir.path(), &transport, MemBackend::new());
    change(leader_member, 4, ConfChangeType::AddLearnerNode).await;
    let read = RangeRequest {
        key: b"k19".to_vec(),
        serializable: true,
        ..Default::default()
    };
    let mut caught_up = false;
    for _ in 0..500 {
        if learner
            .kv
            .range(read.clone())
            .await
            .is_ok_and(|r| !r.kvs.is_empty())
        {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(caught_up, "the learner replicated the log");
    // Promote it, then remove one of the others: the voters are now the leader, one old
    // follower and member 4. With that old follower cut off, writes need member 4's vote.
    change(leader_member, 4, ConfChangeType::AddNode).await;
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    change(leader_member, others[0], ConfChangeType::RemoveNode).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    transport.set_isolated(others[1], true);
    leader_member
        .kv
        .put(put("needs", "member 4"))
        .await
        .expect("a write commits with the promoted learner's vote");
    transport.set_isolated(4, true);
    let stuck = tokio::time::timeout(
        Duration::from_millis(500),
        leader_member.kv.put(put("no", "quorum")),
    )
    .await;
    assert!(
        stuck.is_err() || stuck.is_ok_and(|r| r.is_err()),
        "without member 4 there is no quorum"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_read_during_a_leader_change_is_answered_once_a_new_leader_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let (members, leader) = three_members(dir.path(), &transport).await;
    let follower = a_follower(&members, leader);
    follower.kv.put(put("k", "before")).await.expect("put");
    // Cut the leader off: the follower's read finds no leader, then a new one that has not yet
    // committed in its term; raft drops the ReadIndex in both cases and the node must ask again.
    transport.set_isolated(leader, true);
    let read = follower.kv.range(RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    });
    let resp = tokio::time::timeout(Duration::from_secs(4), read)
        .await
        .expect("answered in time")
        .expect("range");
    assert_eq!(resp.kvs[0].value, b"before");
    let new_leader = follower.kv.status().leader;
    assert!(
        new_leader != 0 && new_leader != leader,
        "a new leader ({new_leader}) served the read"
    );
}

/// Grants a 60 s lease through `granting`, then asks `leader` for its TTL a moment later:
/// (granted TTL, remaining TTL).
async fn fresh_lease_ttl(granting: &RunningMember, leader: &RunningMember) -> (i64, i64) {
    use crate::proto::etcdserverpb::{LeaseGrantRequest, LeaseTimeToLiveRequest};
    let granted = granting
        .kv
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .expect("grant");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let ttl = leader
        .kv
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: granted.id,
            keys: false,
        })
        .await
        .expect("time to live");
    (ttl.granted_ttl, ttl.ttl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_first_thing_in_a_term_lives_its_ttl_and_no_longer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let member = start(1, &[1], dir.path(), &transport, MemBackend::new());
    wait_leader(&[&member]).await;
    // The first lease request of the term. etcd truncates: a 60 s lease a moment old has 59 s
    // left. A lease the lease clock only met when it started (it adds an election timeout to
    // the leases it inherits) would show 60.
    assert_eq!(fresh_lease_ttl(&member, &member).await, (60, 59));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_through_a_follower_first_thing_in_a_term_lives_its_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let (members, leader) = three_members(dir.path(), &transport).await;
    // The follower proposes the grant through raft: the leader only applies it.
    let follower = a_follower(&members, leader);
    let ttl = fresh_lease_ttl(follower, the_leader(&members, leader)).await;
    assert_eq!(ttl, (60, 59));
}
