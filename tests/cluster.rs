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
