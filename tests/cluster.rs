//! A 3-member cluster of real processes talking over TCP on loopback: bootstrap from
//! --initial-cluster, replication, reads on every member, the leader killed under writes and
//! restarted.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn three_members_replicate_survive_a_killed_leader_and_catch_it_up() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    ok(etcdctl(&servers[0].endpoint(), &["put", "k0", "v0"]));
    for server in &servers {
        assert_eq!(
            ok(etcdctl(
                &server.endpoint(),
                &["get", "k0", "--print-value-only"]
            ))
            .trim(),
            "v0",
            "a linearizable read on every member sees the write"
        );
    }
    let first = leader(&servers).expect("one member leads");

    // The leader dies; the others elect a new one and keep taking writes.
    servers[first].kill9();
    let killed_at = Instant::now();
    let mut elected_after = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        if leader(&servers).is_some() {
            elected_after = Some(killed_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elected_after = elected_after.expect("no new leader after the old one died");
    eprintln!("new leader {elected_after:?} after the old one was killed");
    assert!(
        elected_after < Duration::from_secs(3),
        "a new leader took {elected_after:?} (election timeout 1 s)"
    );
    // Writes continue through both remaining endpoints (a write already forwarded to the dead
    // leader may time out, as with etcd: clients retry).
    let others: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    for i in 1..40 {
        let endpoint = servers[others[i % 2]].endpoint();
        let key = format!("k{i}");
        let value = format!("v{i}");
        let mut written = false;
        for _ in 0..5 {
            let out = etcdctl(&endpoint, &["--command-timeout=3s", "put", &key, &value]);
            if out.status.success() {
                written = true;
                break;
            }
        }
        assert!(written, "put {key} kept failing");
    }

    // The old leader restarts from its data dir and catches up.
    servers[first].spawn();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = etcdctl(
            &servers[first].endpoint(),
            &["get", "k39", "--print-value-only", "--consistency=s"],
        );
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "v39" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted member did not catch up; log:\n{}",
            servers[first].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing acknowledged was lost, on any member.
    for server in &servers {
        let keys = ok(etcdctl(
            &server.endpoint(),
            &["get", "k", "--prefix", "--keys-only", "--consistency=s"],
        ));
        assert_eq!(
            keys.split_whitespace().count(),
            40,
            "member {}",
            server.endpoint()
        );
    }
}

#[test]
fn a_member_of_another_cluster_is_refused() {
    // Two single-member clusters pointed at each other's peer URL never exchange messages.
    let dir = tempfile::tempdir().expect("tempdir");
    let one_root = dir.path().join("one");
    std::fs::create_dir_all(&one_root).expect("dir");
    let mut one = Server::start(&one_root, &["--initial-cluster-token", "one"]);
    let log_before = one.log();
    let other_root = dir.path().join("other");
    std::fs::create_dir_all(&other_root).expect("dir");
    let mut other = Server::new(&other_root, &[]);
    // `other` believes `one` is its peer `x`; it cannot win an election, and `one` refuses it.
    let initial_cluster = format!("y={},x={}", other.peer_url(), one.peer_url());
    other.extra_args = vec![
        "--name".into(),
        "y".into(),
        "--initial-cluster".into(),
        initial_cluster,
    ];
    other.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !one.log().contains("cluster ID mismatch") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            one.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!log_before.contains("cluster ID mismatch"));
    ok(etcdctl(&one.endpoint(), &["put", "still", "fine"]));
    other.kill9();
    one.kill9();
}

/// Puts `count` keys `prefix{i}` through `endpoint` over a few concurrent gRPC streams.
async fn put_many(endpoint: &str, prefix: &str, count: usize) {
    use quorumkv::proto::etcdserverpb::kv_client::KvClient;
    use quorumkv::proto::etcdserverpb::PutRequest;
    let client = KvClient::connect(endpoint.to_string())
        .await
        .expect("connect");
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let mut client = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (worker..count).step_by(8) {
                client
                    .put(PutRequest {
                        key: format!("{prefix}{i}").into_bytes(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    })
                    .await
                    .expect("put");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
}

/// A 3-member cluster with a small `--snapshot-count` and catch-up entries, one follower
/// killed: returns the servers, the leader's index and the follower's.
fn cluster_with_a_follower_down(
    root: &std::path::Path,
    snapshot_count: &str,
    catch_up_entries: &str,
) -> (Vec<Server>, usize, usize) {
    let mut servers = start_cluster(
        root,
        &["a", "b", "c"],
        &[
            "--snapshot-count",
            snapshot_count,
            "--experimental-snapshot-catchup-entries",
            catch_up_entries,
        ],
    );
    let leader_index = leader(&servers).expect("a leader");
    let down = (leader_index + 1) % 3;
    servers[down].kill9();
    (servers, leader_index, down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restarted_after_compaction_catches_up_by_snapshot() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut servers, leader_index, down) = cluster_with_a_follower_down(dir.path(), "200", "50");
    // Far more entries than the leader keeps behind its snapshots.
    put_many(&servers[leader_index].endpoint(), "k", 1500).await;
    servers[down].spawn();
    let endpoint = servers[down].endpoint();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(
            &endpoint,
            &[
                "get",
                "k",
                "--prefix",
                "--limit=1",
                "--consistency=s",
                "-w",
                "json",
            ],
        );
        let answer = String::from_utf8_lossy(&out.stdout).to_string();
        if answer.contains("\"count\":1500") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower did not catch up ({answer}); log:\n{}",
            servers[down].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        servers[down]
            .log()
            .contains("restored the state from the leader's snapshot"),
        "the follower caught up without a snapshot; log:\n{}",
        servers[down].log()
    );
    // It is a full member again: a write through it reaches everyone.
    ok(etcdctl(&endpoint, &["put", "after", "1"]));
    for server in &servers {
        assert_eq!(value_of(&server.endpoint(), "after"), "1");
    }
}

/// Peak resident memory of a process, from /proc (kB).
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_from_a_snapshot_image_larger_than_every_buffer() {
    use quorumkv::proto::etcdserverpb::{PutRequest, RangeRequest};
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut servers, leader_index, down) = cluster_with_a_follower_down(dir.path(), "100", "10");
    // 48 MiB of values: six times the transfer window, 48 chunks, 48 image write buffers.
    const VALUES: usize = 96;
    const VALUE_BYTES: usize = 512 * 1024;
    let mut client = servers[leader_index].client().await;
    for i in 0..VALUES {
        client
            .put(PutRequest {
                key: format!("big{i:03}").into_bytes(),
                value: vec![(i % 251) as u8; VALUE_BYTES],
                ..Default::default()
            })
            .await
            .expect("put");
    }
    // More entries than the leader keeps behind its snapshots.
    put_many(&servers[leader_index].endpoint(), "k", 300).await;
    servers[down].spawn();
    servers[down].wait_ready();
    let mut follower = servers[down].client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = follower
            .range(RangeRequest {
                key: b"big".to_vec(),
                range_end: b"bih".to_vec(),
                serializable: true,
                count_only: true,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().count)
            .unwrap_or(0);
        if count == VALUES as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower did not catch up ({count} values); log:\n{}",
            servers[down].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = servers[down].log();
    let received = log
        .lines()
        .find(|l| l.contains("snapshot image received"))
        .unwrap_or_else(|| panic!("no snapshot image received; log:\n{log}"));
    let bytes: u64 = received
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))
        .and_then(|b| b.parse().ok())
        .expect("the image's size in the log");
    assert!(
        bytes > (VALUES * VALUE_BYTES) as u64,
        "the whole store came as an image: {received}"
    );
    // Every value arrived whole.
    for i in [0, VALUES / 2, VALUES - 1] {
        let kv = follower
            .range(RangeRequest {
                key: format!("big{i:03}").into_bytes(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
            .kvs
            .remove(0);
        assert!(kv.value == vec![(i % 251) as u8; VALUE_BYTES], "value {i}");
    }
    // For the record (the scale benchmark measures memory): the follower's peak RSS.
    let pid = servers[down].child.as_ref().expect("running").id();
    let follower_peak_mb = peak_rss_kb(pid) / 1024;
    eprintln!(
        "image {} MiB, follower peak RSS {follower_peak_mb} MiB",
        bytes >> 20
    );
    // A write through it reaches everyone: a full member again.
    ok(etcdctl(&servers[down].endpoint(), &["put", "after", "1"]));
    for server in &servers {
        assert_eq!(value_of(&server.endpoint(), "after"), "1");
    }
}

#[test]
fn a_paused_leader_steps_down_serves_no_stale_read_and_loses_no_write() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    ok(etcdctl(&servers[0].endpoint(), &["put", "x", "before"]));
    let old = leader(&servers).expect("a leader");
    // Paused for three election timeouts.
    servers[old].signal("STOP");
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let paused_at = Instant::now();
    let mut written = false;
    while paused_at.elapsed() < Duration::from_secs(3) || !written {
        assert!(
            paused_at.elapsed() < Duration::from_secs(15),
            "no write succeeded while the leader was paused"
        );
        if !written {
            written = etcdctl(
                &servers[others[0]].endpoint(),
                &["--command-timeout=2s", "put", "x", "after"],
            )
            .status
            .success();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        others.iter().any(|i| is_leader(&servers[*i])),
        "no new leader while the old one was paused"
    );
    servers[old].signal("CONT");
    // The resumed member's first linearizable read must not be the old value.
    let out = etcdctl(
        &servers[old].endpoint(),
        &["--command-timeout=5s", "get", "x", "--print-value-only"],
    );
    if out.status.success() {
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "after",
            "stale read"
        );
    }
    // It no longer leads, and every member holds the write.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = etcdctl(&servers[old].endpoint(), &["endpoint", "status"]);
        if status.status.success() && !is_leader(&servers[old]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed leader did not step down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for server in &servers {
        assert_eq!(
            value_of(&server.endpoint(), "x"),
            "after",
            "member {}",
            server.endpoint()
        );
    }
}
