//! Locks and elections against a real quorumkv process: the `v3lockpb.Lock` and
//! `v3electionpb.Election` services over gRPC, and etcdctl 3.4's `lock` and `elect` (which run
//! etcd's client-side recipes on KV, leases and watches).

mod common;

use std::time::{Duration, Instant};

use common::{etcdctl, ok, Server};
use quorumkv::proto::etcdserverpb::lease_client::LeaseClient;
use quorumkv::proto::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest};
use quorumkv::proto::v3electionpb::election_client::ElectionClient;
use quorumkv::proto::v3electionpb::{
    CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest,
};
use quorumkv::proto::v3lockpb::lock_client::LockClient;
use quorumkv::proto::v3lockpb::{LockRequest, UnlockRequest};
use tonic::transport::Channel;

async fn lease(channel: &Channel, ttl: i64) -> i64 {
    LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id
}

#[test]
fn a_lock_is_held_by_one_at_a_time_and_passes_on_unlock_or_when_the_lease_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let channel = Channel::from_shared(server.endpoint())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let (a, b, c) = (
            lease(&channel, 60).await,
            lease(&channel, 60).await,
            lease(&channel, 60).await,
        );
        let mut locks = LockClient::new(channel.clone());
        let held = locks
            .lock(LockRequest {
                name: b"jobs".to_vec(),
                lease: a,
            })
            .await
            .expect("lock a")
            .into_inner();
        assert_eq!(held.key, format!("jobs/{a:x}").into_bytes());
        // b waits while a holds the lock.
        let mut waiting = LockClient::new(channel.clone());
        let b_lock = tokio::spawn(async move {
            let started = Instant::now();
            let key = waiting
                .lock(LockRequest {
                    name: b"jobs".to_vec(),
                    lease: b,
                })
                .await
                .expect("lock b")
                .into_inner()
                .key;
            (key, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!b_lock.is_finished(), "b got a lock a holds");
        locks
            .unlock(UnlockRequest { key: held.key })
            .await
            .expect("unlock");
        let (b_key, waited) = b_lock.await.expect("b");
        assert_eq!(b_key, format!("jobs/{b:x}").into_bytes());
        assert!(waited >= Duration::from_millis(700), "{waited:?}");
        // c waits behind b; revoking b's lease releases the lock to c.
        let mut waiting = LockClient::new(channel.clone());
        let c_lock = tokio::spawn(async move {
            waiting
                .lock(LockRequest {
                    name: b"jobs".to_vec(),
                    lease: c,
                })
                .await
                .expect("lock c")
                .into_inner()
                .key
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!c_lock.is_finished());
        LeaseClient::new(channel.clone())
            .lease_revoke(LeaseRevokeRequest { id: b })
            .await
            .expect("revoke");
        let c_key = tokio::time::timeout(Duration::from_secs(5), c_lock)
            .await
            .expect("c in time")
            .expect("c");
        assert_eq!(c_key, format!("jobs/{c:x}").into_bytes());
        // A lock on a lease that does not exist is refused, as etcd 3.4 refuses it (its lock
        // service's errors come back as `Unknown`).
        let refused = locks
            .lock(LockRequest {
                name: b"jobs".to_vec(),
                lease: 12345,
            })
            .await
            .expect_err("no such lease");
        assert_eq!(
            (refused.code(), refused.message()),
            (
                tonic::Code::Unknown,
                "etcdserver: requested lease not found"
            )
        );
    });
}

#[test]
fn election_campaign_proclaim_observe_and_resign() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let channel = Channel::from_shared(server.endpoint())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut election = ElectionClient::new(channel.clone());
        let none = election
            .leader(LeaderRequest {
                name: b"db".to_vec(),
            })
            .await
            .expect_err("no leader yet");
        assert_eq!(none.message(), "election: no leader");
        let mut observed = election
            .observe(LeaderRequest {
                name: b"db".to_vec(),
            })
            .await
            .expect("observe")
            .into_inner();
        let (a, b) = (lease(&channel, 60).await, lease(&channel, 60).await);
        let alice = election
            .campaign(CampaignRequest {
                name: b"db".to_vec(),
                lease: a,
                value: b"alice".to_vec(),
            })
            .await
            .expect("campaign a")
            .into_inner()
            .leader
            .expect("leader key");
        let mut bob_client = ElectionClient::new(channel.clone());
        let bob = tokio::spawn(async move {
            bob_client
                .campaign(CampaignRequest {
                    name: b"db".to_vec(),
                    lease: b,
                    value: b"bob".to_vec(),
                })
                .await
                .expect("campaign b")
                .into_inner()
                .leader
                .expect("leader key")
        });
        election
            .proclaim(ProclaimRequest {
                leader: Some(alice.clone()),
                value: b"alice v2".to_vec(),
            })
            .await
            .expect("proclaim");
        let leader = election
            .leader(LeaderRequest {
                name: b"db".to_vec(),
            })
            .await
            .expect("leader")
            .into_inner()
            .kv
            .expect("kv");
        assert_eq!(leader.value, b"alice v2");
        assert!(!bob.is_finished(), "bob leads while alice does");
        election
            .resign(ResignRequest {
                leader: Some(alice.clone()),
            })
            .await
            .expect("resign");
        let bob = tokio::time::timeout(Duration::from_secs(5), bob)
            .await
            .expect("bob in time")
            .expect("bob");
        assert_eq!(bob.key, format!("db/{b:x}").into_bytes());
        // Alice's old key no longer leads: proclaiming with it is refused.
        let stale = election
            .proclaim(ProclaimRequest {
                leader: Some(alice),
                value: b"late".to_vec(),
            })
            .await
            .expect_err("not leader");
        assert_eq!(stale.message(), "election: not leader");
        // Observe saw alice, her new value, then bob.
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let response = tokio::time::timeout(Duration::from_secs(5), observed.message())
                .await
                .expect("in time")
                .expect("stream")
                .expect("open");
            seen.push(String::from_utf8(response.kv.expect("kv").value).expect("utf8"));
        }
        assert_eq!(seen, vec!["alice", "alice v2", "bob"]);
    });
}

#[test]
fn etcdctl_lock_excludes_and_elect_names_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    assert_eq!(
        ok(etcdctl(&ep, &["lock", "mylock", "echo", "inside"])),
        "inside\n"
    );
    // Two holders in turn: the second starts only after the first is done.
    let first = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &ep, "lock", "mylock", "sleep", "1.5"])
        .spawn()
        .expect("etcdctl");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    ok(etcdctl(&ep, &["lock", "mylock", "true"]));
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "the lock was shared"
    );
    let _ = first.wait_with_output();
    let mut candidate = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &ep, "elect", "myelection", "alice"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("etcdctl");
    std::thread::sleep(Duration::from_millis(800));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let leader = runtime.block_on(async {
        ElectionClient::connect(ep.clone())
            .await
            .expect("connect")
            .leader(LeaderRequest {
                name: b"myelection".to_vec(),
            })
            .await
            .expect("leader")
            .into_inner()
            .kv
            .expect("kv")
    });
    assert_eq!(
        leader.value, b"alice",
        "etcdctl's candidate, seen through the Election service"
    );
    let _ = candidate.kill();
    let _ = candidate.wait();
}
