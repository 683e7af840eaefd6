//! Runtime membership with real processes and etcdctl: a learner added, started with
//! --initial-cluster-state existing, promoted; leadership moved; a follower removed (it stops);
//! etcd's refusals; --auto-promote-learners.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// `etcdctl member list` rows: (id, status, name, peer URLs, client URLs, is learner).
fn member_list(endpoint: &str) -> Vec<Vec<String>> {
    ok(etcdctl(endpoint, &["member", "list"]))
        .lines()
        .map(|line| line.split(", ").map(|f| f.trim().to_string()).collect())
        .collect()
}

fn initial_cluster(names: &[&str], servers: &[&Server]) -> String {
    names
        .iter()
        .zip(servers)
        .map(|(name, s)| format!("{name}={}", s.peer_url()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A member that joins the running cluster, as `etcdctl member add` tells the operator to
/// start it. Not waited for.
fn joining_member(name: &str, initial_cluster: &str, server: &mut Server) {
    server.extra_args = vec![
        "--name".into(),
        name.into(),
        "--initial-cluster".into(),
        initial_cluster.into(),
        "--initial-cluster-state".into(),
        "existing".into(),
    ];
    server.spawn();
}

fn new_server(root: &Path, name: &str) -> Server {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    Server::new(&dir, &[])
}

#[test]
fn a_learner_joins_is_promoted_leads_and_a_removed_follower_stops() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    let endpoints = |servers: &[Server]| {
        servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(Server::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    };

    // Every member has published its name and client URL.
    wait_until(
        "three members that published their client URLs",
        Duration::from_secs(10),
        || {
            let rows = member_list(&servers[1].endpoint());
            rows.len() == 3
                && rows
                    .iter()
                    .all(|r| r[1] == "started" && !r[4].is_empty() && r[5] == "false")
        },
    );
    let rows = member_list(&servers[1].endpoint());
    let names: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert!(names.contains(&"a") && names.contains(&"b") && names.contains(&"c"));
    assert!(rows
        .iter()
        .any(|r| r[3] == servers[2].peer_url() && r[4] == servers[2].endpoint()));
    let status = ok(etcdctl(
        &servers[0].endpoint(),
        &["endpoint", "status", "--cluster"],
    ));
    assert_eq!(
        status.lines().count(),
        3,
        "endpoint status --cluster: {status}"
    );
    for i in 0..20 {
        ok(etcdctl(
            &servers[0].endpoint(),
            &["put", &format!("k{i}"), "v"],
        ));
    }

    // A member nobody added cannot join.
    let mut stranger = new_server(dir.path(), "x");
    let stranger_cluster = format!(
        "{},x={}",
        initial_cluster(&["a"], &[&servers[0]]),
        stranger.peer_url()
    );
    joining_member("x", &stranger_cluster, &mut stranger);
    let code = {
        let mut child = stranger.child.take().expect("spawned");
        child.wait().expect("wait")
    };
    assert!(!code.success());
    assert!(
        stranger.log().contains("etcdctl member add"),
        "{}",
        stranger.log()
    );

    // Add d as a learner through a follower: the follower forwards to the leader.
    let leader_index = leader(&servers).expect("a leader");
    let follower = (0..3).find(|i| *i != leader_index).expect("a follower");
    let mut d = new_server(dir.path(), "d");
    let added = ok(etcdctl(
        &servers[follower].endpoint(),
        &[
            "member",
            "add",
            "d",
            "--learner",
            &format!("--peer-urls={}", d.peer_url()),
        ],
    ));
    assert!(
        added.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{added}"
    );
    // A second learner is refused, as etcd refuses it.
    let refused = fails(etcdctl(
        &servers[0].endpoint(),
        &[
            "member",
            "add",
            "e",
            "--learner",
            "--peer-urls=http://127.0.0.1:1",
        ],
    ));
    assert!(
        refused.contains("etcdserver: too many learner members in cluster"),
        "{refused}"
    );
    let refused = fails(etcdctl(
        &servers[0].endpoint(),
        &[
            "member",
            "add",
            "e",
            &format!("--peer-urls={}", servers[1].peer_url()),
        ],
    ));
    assert!(
        refused.contains("etcdserver: Peer URLs already exists"),
        "{refused}"
    );

    let all = initial_cluster(
        &["a", "b", "c", "d"],
        &[&servers[0], &servers[1], &servers[2], &d],
    );
    joining_member("d", &all, &mut d);
    // The learner catches up (by snapshot: its log is empty) and serves serializable reads;
    // it refuses linearizable ones and writes, as etcd's learners do.
    wait_until("the learner has every key", Duration::from_secs(20), || {
        let out = etcdctl(
            &d.endpoint(),
            &["get", "k19", "--consistency=s", "--print-value-only"],
        );
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "v"
    });
    let refused = fails(etcdctl(
        &d.endpoint(),
        &["--command-timeout=1s", "put", "from-learner", "x"],
    ));
    assert!(
        refused.contains("rpc not supported for learner"),
        "{refused}"
    );
    let d_id = d.member_id();
    // Its name is listed once its publish (a proposal of its own, retried) is applied.
    let d_row = || {
        member_list(&servers[0].endpoint())
            .into_iter()
            .find(|r| r[0] == d_id)
            .expect("d listed")
    };
    wait_until("d's name is published", Duration::from_secs(10), || {
        d_row()[2] == "d"
    });
    let row = d_row();
    assert_eq!((row[2].as_str(), row[5].as_str()), ("d", "true"));

    // Promote once in sync (a voter is refused promotion).
    let a_id = servers[0].member_id();
    let refused = fails(etcdctl(
        &servers[0].endpoint(),
        &["member", "promote", &a_id],
    ));
    assert!(
        refused.contains("etcdserver: can only promote a learner member"),
        "{refused}"
    );
    wait_until("d promoted", Duration::from_secs(10), || {
        etcdctl(&servers[follower].endpoint(), &["member", "promote", &d_id])
            .status
            .success()
    });
    let rows = member_list(&d.endpoint());
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r[5] == "false"), "{rows:?}");
    servers.push(d);

    // Leadership moves to d.
    let moved = ok(etcdctl(&endpoints(&servers), &["move-leader", &d_id]));
    assert!(moved.contains("Leadership transferred"), "{moved}");
    assert_eq!(leader(&servers), Some(3));
    ok(etcdctl(&servers[3].endpoint(), &["put", "after-move", "1"]));

    // Remove follower c: it stops, the others go on.
    let c_id = servers[2].member_id();
    let refused = fails(etcdctl(
        &servers[0].endpoint(),
        &["member", "remove", "1234"],
    ));
    assert!(
        refused.contains("etcdserver: member not found"),
        "{refused}"
    );
    ok(etcdctl(
        &servers[0].endpoint(),
        &["member", "remove", &c_id],
    ));
    wait_until("the removed member exits", Duration::from_secs(20), || {
        servers[2]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    });
    assert!(servers[2].log().contains("removed from the cluster"));
    servers[2].child = None;
    let rows = member_list(&servers[0].endpoint());
    assert_eq!(rows.len(), 3);
    assert!(!rows.iter().any(|r| r[0] == c_id));
    ok(etcdctl(
        &servers[1].endpoint(),
        &["put", "after-remove", "1"],
    ));
    assert_eq!(value_of(&servers[3].endpoint(), "after-remove"), "1");

    // A restart ignores --initial-cluster-state existing: the member comes back from its data dir.
    servers[3].kill9();
    servers[3].spawn();
    servers[3].wait_ready();
    assert_eq!(value_of(&servers[3].endpoint(), "after-move"), "1");
}

#[test]
fn auto_promote_learners_promotes_a_learner_once_it_caught_up() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = start_cluster(dir.path(), &["a"], &["--auto-promote-learners"]);
    for i in 0..50 {
        ok(etcdctl(
            &servers[0].endpoint(),
            &["put", &format!("k{i}"), "v"],
        ));
    }
    let mut b = new_server(dir.path(), "b");
    ok(etcdctl(
        &servers[0].endpoint(),
        &[
            "member",
            "add",
            "b",
            "--learner",
            &format!("--peer-urls={}", b.peer_url()),
        ],
    ));
    let all = initial_cluster(&["a", "b"], &[&servers[0], &b]);
    joining_member("b", &all, &mut b);
    wait_until(
        "b promoted without being asked",
        Duration::from_secs(20),
        || {
            let rows = member_list(&servers[0].endpoint());
            rows.len() == 2 && rows.iter().all(|r| r[5] == "false" && r[1] == "started")
        },
    );
    assert!(servers[0]
        .log()
        .contains("promoted a learner that caught up"));
    // A two-voter cluster: writes need both, and work.
    ok(etcdctl(&b.endpoint(), &["put", "both", "1"]));
    assert_eq!(value_of(&servers[0].endpoint(), "both"), "1");
}

#[test]
fn a_start_that_fails_leaves_no_identity_for_a_corrected_retry_to_obey() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // An election timeout under 5 heartbeats is refused at start.
    let mut server = Server::new(dir.path(), &["--election-timeout", "100"]);
    let status = server.run_to_exit(Duration::from_secs(10));
    assert!(!status.success());
    let identity = server.data_dir.join("member").join("identity");
    assert!(!identity.exists(), "a failed start saved an identity");
    server.extra_args.clear();
    server.spawn();
    server.wait_ready();
    let saved = std::fs::read_to_string(&identity).expect("identity saved once started");
    assert!(saved.contains("member-id=") && saved.contains("cluster-id="));
    let listed = member_list(&server.endpoint());
    assert_eq!(listed.len(), 1);
    assert!(
        saved.contains(&format!("member-id={}", listed[0][0])),
        "{saved} vs {listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_member_restarted_with_a_log_still_takes_a_new_member() {
    use quorumkv::proto::etcdserverpb::PutRequest;
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = new_server(dir.path(), "a");
    first.spawn();
    first.wait_ready();
    // More than raft hands out in one ready (16 MiB), so that the replay after the restart
    // commits over several.
    let client = first.client().await;
    let mut writers = Vec::new();
    for worker in 0..16u32 {
        let mut client = client.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..1250u32 {
                client
                    .put(PutRequest {
                        key: format!("k{worker}-{i}").into_bytes(),
                        value: vec![b'v'; 2048],
                        ..Default::default()
                    })
                    .await
                    .expect("put");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    first.terminate();
    first.spawn();
    // Asked as soon as it serves, while it replays its log: the entries since the last
    // snapshot commit again as they are replayed, and raft must count them applied, or it
    // turns the configuration change into an empty entry as if one were still pending.
    wait_until("it serves", Duration::from_secs(20), || {
        etcdctl(&first.endpoint(), &["get", "--consistency=s", "probe"])
            .status
            .success()
    });
    let mut second = new_server(dir.path(), "b");
    let added = etcdctl(
        &first.endpoint(),
        &[
            "member",
            "add",
            "b",
            &format!("--peer-urls={}", second.peer_url()),
        ],
    );
    ok(added);
    let cluster = initial_cluster(&["default", "b"], &[&first, &second]);
    joining_member("b", &cluster, &mut second);
    second.wait_ready();
    wait_until("both members serve", Duration::from_secs(20), || {
        !value_of(&second.endpoint(), "k15-1249").is_empty()
    });
}
