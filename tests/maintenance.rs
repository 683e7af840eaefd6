//! Operations with etcdctl 3.4 against real processes: snapshot save and restore into a new
//! cluster, HashKV equal on every member, defragmentation, the space quota and its alarm, the
//! health probes, and etcd's version JSON.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    etcdctl, etcdctl_available, fails, http_get, new_cluster, ok, start_cluster, wait_until, Server,
};
use sha2::Digest;

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `etcdctl endpoint status -w json` of one endpoint.
fn status_json(endpoint: &str) -> serde_json::Value {
    let out = ok(etcdctl(endpoint, &["endpoint", "status", "-w", "json"]));
    json(&out)[0]["Status"].clone()
}

fn quorumkv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_quorumkv"))
        .args(args)
        .output()
        .expect("run quorumkv")
}

#[test]
fn probes_answer_etcds_json_and_other_paths_are_404_never_200() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (status, body) = http_get(server.client_port, "/health");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"health": "true", "reason": ""})
    );
    let (status, body) = http_get(
        server.client_port,
        "/health?exclude=NOSPACE&serializable=true",
    );
    assert_eq!(
        (status, json(&body)["health"].clone()),
        (200, "true".into())
    );
    for probe in ["/livez", "/readyz"] {
        let (status, body) = http_get(server.client_port, probe);
        assert_eq!((status, body.as_str()), (200, "ok"), "{probe}");
    }
    let (status, body) = http_get(server.client_port, "/version");
    assert_eq!(status, 200);
    let version = json(&body);
    assert_eq!(version["etcdserver"], "3.5.0");
    assert_eq!(version["etcdcluster"], "3.5.0");
    assert_eq!(version["quorumkv"], env!("CARGO_PKG_VERSION"));
    let status = ok(etcdctl(&server.endpoint(), &["endpoint", "status"]));
    assert!(
        status.contains(&format!(", 3.5.0+quorumkv.{}, ", env!("CARGO_PKG_VERSION"))),
        "endpoint status names both versions: {status}"
    );
    for path in ["/nope", "/v3/kv/nope", "/metricz"] {
        let (status, body) = http_get(server.client_port, path);
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(json(&body)["error"], "Not Found");
    }
    let log = server.log();
    assert!(!log.is_empty());
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file carries no ANSI escapes"
    );
}

#[test]
fn snapshot_save_by_etcdctl_restores_into_a_new_three_member_cluster_at_the_same_revision() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut source = start_cluster(&dir.path().join("source"), &["a", "b", "c"], &[]);
    let endpoint = source[0].endpoint();
    for i in 0..200 {
        ok(etcdctl(
            &endpoint,
            &["put", &format!("key{i:03}"), &format!("value{i}")],
        ));
    }
    ok(etcdctl(&endpoint, &["del", "key007"]));
    let lease = common::grant(&endpoint, 3600);
    ok(etcdctl(
        &endpoint,
        &["put", "leased", "x", "--lease", &lease],
    ));
    let revision = status_json(&endpoint)["header"]["revision"]
        .as_i64()
        .expect("revision");
    let file = dir.path().join("backup.db");
    let saved = etcdctl(
        &endpoint,
        &["snapshot", "save", file.to_str().expect("path")],
    );
    ok(saved);
    // etcd's framing: the image padded to 512 bytes, then its SHA-256.
    let bytes = std::fs::read(&file).expect("read snapshot");
    assert_eq!(bytes.len() % 512, 32);
    let (image, sha) = bytes.split_at(bytes.len() - 32);
    assert_eq!(sha2::Sha256::digest(image).as_slice(), sha);
    let status = ok(quorumkv(&[
        "snapshot",
        "status",
        file.to_str().expect("path"),
        "-w",
        "json",
    ]));
    assert_eq!(json(&status)["revision"], revision);
    for server in source.iter_mut() {
        server.kill9();
    }

    // A new cluster of three restored from the file, started with the flags it was restored
    // with.
    let mut servers = new_cluster(
        &dir.path().join("restored"),
        &["x", "y", "z"],
        &["--initial-cluster-token", "restored"],
    );
    for server in servers.iter_mut() {
        let mut restore = vec![
            "snapshot".to_string(),
            "restore".into(),
            file.to_str().expect("path").into(),
            "--data-dir".into(),
            server.data_dir.to_str().expect("path").into(),
            "--initial-advertise-peer-urls".into(),
            server.peer_url(),
        ];
        restore.extend(server.extra_args.iter().cloned());
        let args: Vec<&str> = restore.iter().map(String::as_str).collect();
        ok(quorumkv(&args));
        server.spawn();
    }
    for server in servers.iter_mut() {
        server.wait_ready();
    }
    for server in &servers {
        let endpoint = server.endpoint();
        assert_eq!(
            ok(etcdctl(&endpoint, &["get", "key123", "--print-value-only"])).trim(),
            "value123"
        );
        assert_eq!(
            ok(etcdctl(&endpoint, &["get", "key007", "--print-value-only"])).trim(),
            "",
            "the delete came along"
        );
        assert_eq!(
            status_json(&endpoint)["header"]["revision"].as_i64(),
            Some(revision),
            "the same revision"
        );
        let members = ok(etcdctl(&endpoint, &["member", "list"]));
        assert_eq!(members.lines().count(), 3, "the new membership: {members}");
        assert!(members.contains(", x, ") && members.contains(", z, "));
    }
    let ttl = ok(etcdctl(
        &servers[1].endpoint(),
        &["lease", "timetolive", &lease, "--keys"],
    ));
    assert!(
        ttl.contains("leased"),
        "the lease and its key came along: {ttl}"
    );
    ok(etcdctl(
        &servers[2].endpoint(),
        &["put", "after", "restore"],
    ));
    assert_eq!(
        status_json(&servers[0].endpoint())["header"]["revision"].as_i64(),
        Some(revision + 1)
    );
}

#[test]
fn hashkv_is_equal_on_every_member_and_defrag_keeps_every_key() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    let endpoint = servers[0].endpoint();
    for i in 0..100 {
        ok(etcdctl(
            &endpoint,
            &["put", &format!("k{}", i % 30), &format!("v{i}")],
        ));
    }
    ok(etcdctl(&endpoint, &["compaction", "50"]));
    ok(etcdctl(&endpoint, &["put", "last", "one"]));
    let endpoints = servers
        .iter()
        .map(|s| s.endpoint())
        .collect::<Vec<_>>()
        .join(",");
    // Every member has applied the last write once a linearizable read on each sees it.
    for server in &servers {
        assert_eq!(
            ok(etcdctl(
                &server.endpoint(),
                &["get", "last", "--print-value-only"]
            ))
            .trim(),
            "one"
        );
    }
    let hashes = |what: &str| -> Vec<u64> {
        let out = ok(etcdctl(&endpoints, &["endpoint", "hashkv", "-w", "json"]));
        let answers = json(&out);
        let hashes: Vec<u64> = answers
            .as_array()
            .expect("array")
            .iter()
            .map(|a| a["HashKV"]["hash"].as_u64().expect("hash"))
            .collect();
        assert_eq!(hashes.len(), 3, "{what}: {out}");
        for answer in answers.as_array().expect("array") {
            assert_eq!(answer["HashKV"]["compact_revision"], 50, "{what}");
        }
        hashes
    };
    let before = hashes("before defrag");
    assert!(
        before.iter().all(|h| *h == before[0]),
        "HashKV differs between members: {before:?}"
    );
    let out = ok(etcdctl(&endpoints, &["defrag"]));
    assert_eq!(out.matches("Finished defragmenting").count(), 3, "{out}");
    assert_eq!(hashes("after defrag"), before, "defrag changes no key");
    // An older revision hashes differently from the newest and the same on every member.
    let out = ok(etcdctl(
        &endpoints,
        &["endpoint", "hashkv", "--rev", "60", "-w", "json"],
    ));
    let at_60: Vec<u64> = json(&out)
        .as_array()
        .expect("array")
        .iter()
        .map(|a| a["HashKV"]["hash"].as_u64().expect("hash"))
        .collect();
    assert!(at_60.iter().all(|h| *h == at_60[0]) && at_60[0] != before[0]);
    let compacted = fails(etcdctl(&endpoint, &["endpoint", "hashkv", "--rev", "10"]));
    assert!(
        compacted.contains("required revision has been compacted"),
        "{compacted}"
    );
}

#[test]
fn quota_raises_nospace_then_compact_defrag_and_disarm_bring_writes_back_losing_nothing() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = start_cluster(
        dir.path(),
        &["a", "b", "c"],
        &["--quota-backend-bytes", "3000000"],
    );
    let endpoint = servers[0].endpoint();
    let all = servers
        .iter()
        .map(|s| s.endpoint())
        .collect::<Vec<_>>()
        .join(",");
    let value = "x".repeat(20_000);
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for i in 0..1_000 {
        let key = format!("key{}", i % 10);
        let out = etcdctl(&endpoint, &["put", &key, &format!("{i}{value}")]);
        if out.status.success() {
            acknowledged.push((key, i));
        } else {
            refusal = Some(String::from_utf8_lossy(&out.stderr).to_string());
            break;
        }
    }
    let refusal = refusal.expect("the quota refused a put");
    assert!(
        refusal.contains("etcdserver: mvcc: database space exceeded"),
        "{refusal}"
    );
    wait_until("the NOSPACE alarm", Duration::from_secs(10), || {
        ok(etcdctl(&endpoint, &["alarm", "list"])).contains("alarm:NOSPACE")
    });
    // The alarm is the cluster's: every member reports it (once it has applied it) and
    // refuses puts.
    for server in &servers {
        wait_until(
            "the member applied the alarm",
            Duration::from_secs(10),
            || {
                status_json(&server.endpoint())["errors"]
                    .to_string()
                    .contains("alarm:NOSPACE")
            },
        );
        let (status, body) = http_get(server.client_port, "/health");
        assert_eq!(status, 503);
        assert_eq!(json(&body)["reason"], "ALARM NOSPACE");
        let (status, _) = http_get(server.client_port, "/health?exclude=NOSPACE");
        assert_eq!(status, 200, "kubeadm's probe excludes NOSPACE");
        let put = fails(etcdctl(&server.endpoint(), &["put", "more", "x"]));
        assert!(put.contains("database space exceeded"), "{put}");
    }
    // Refused: puts, writing txns, lease grants. Served: reads, deletes, compaction.
    let txn = fails(common::etcdctl_stdin(
        &endpoint,
        &["txn"],
        "\n\nput t 1\n\n",
    ));
    assert!(txn.contains("database space exceeded"), "{txn}");
    // A transaction that only deletes frees space: it passes, as with etcd.
    ok(common::etcdctl_stdin(
        &endpoint,
        &["txn"],
        "\n\ndel key9\n\n",
    ));
    let grant = fails(etcdctl(&endpoint, &["lease", "grant", "60"]));
    assert!(grant.contains("database space exceeded"), "{grant}");
    let (key, last) = acknowledged.last().expect("some puts").clone();
    let got = ok(etcdctl(&endpoint, &["get", &key, "--print-value-only"]));
    assert!(got.starts_with(&last.to_string()), "reads are served");
    ok(etcdctl(&endpoint, &["del", "key9"]));
    let revision = status_json(&endpoint)["header"]["revision"]
        .as_i64()
        .expect("revision");
    ok(etcdctl(&endpoint, &["compaction", &revision.to_string()]));
    // Each member compacts as it applies the compaction; defragment once all have.
    for server in &servers {
        wait_until("the compaction applied", Duration::from_secs(10), || {
            let old = (revision - 1).to_string();
            let out = etcdctl(
                &server.endpoint(),
                &["get", "key0", "--rev", &old, "--consistency", "s"],
            );
            String::from_utf8_lossy(&out.stderr).contains("required revision has been compacted")
        });
    }
    let out = ok(etcdctl(&all, &["defrag"]));
    assert_eq!(out.matches("Finished defragmenting").count(), 3, "{out}");
    for server in &servers {
        let size = status_json(&server.endpoint())["dbSize"]
            .as_i64()
            .expect("size");
        assert!(size < 3_000_000, "defrag gave the space back: {size}");
    }
    ok(etcdctl(&endpoint, &["alarm", "disarm"]));
    assert_eq!(ok(etcdctl(&endpoint, &["alarm", "list"])).trim(), "");
    ok(etcdctl(&endpoint, &["put", "more", "x"]));
    // Nothing acknowledged is lost: each key holds its last acknowledged value.
    for i in 0..9 {
        let key = format!("key{i}");
        if let Some((_, n)) = acknowledged.iter().rev().find(|(k, _)| *k == key) {
            let got = ok(etcdctl(&endpoint, &["get", &key, "--print-value-only"]));
            assert!(got.starts_with(&format!("{n}x")), "{key}: {}", &got[..20]);
        }
    }
    for server in &servers {
        ok(etcdctl(&server.endpoint(), &["put", "again", "x"]));
        assert_eq!(http_get(server.client_port, "/health").0, 200);
    }
}

#[test]
fn health_is_503_with_two_of_three_members_down_and_200_once_they_are_back() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    let port = servers[0].client_port;
    assert_eq!(http_get(port, "/health").0, 200);
    servers[1].kill9();
    servers[2].kill9();
    let mut reason = String::new();
    wait_until("/health says 503", Duration::from_secs(30), || {
        let (status, body) = http_get(port, "/health");
        reason = json(&body)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        status == 503
    });
    assert!(
        reason == "RAFT NO LEADER" || reason.starts_with("QGET ERROR:"),
        "{reason}"
    );
    let (status, body) = http_get(port, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(http_get(port, "/livez").0, 200, "alive without a quorum");
    servers[1].spawn();
    servers[2].spawn();
    wait_until("/health says 200", Duration::from_secs(30), || {
        http_get(port, "/health").0 == 200
    });
}

#[test]
fn snapshot_tool_refuses_a_damaged_file_naming_it_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("garbage.db");
    std::fs::write(&file, vec![7u8; 544]).expect("write");
    let data_dir = dir.path().join("restored");
    let out = quorumkv(&[
        "snapshot",
        "restore",
        file.to_str().expect("path"),
        "--data-dir",
        data_dir.to_str().expect("path"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("garbage.db") && stderr.contains("SHA-256"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!data_dir.exists());
    assert!(!Path::new(&data_dir).exists());
}

/// Changes one stored value of a stopped member's backend in place (the same length, still
/// decodable): silent corruption, as a bad disk would leave it.
fn corrupt_a_value(data_dir: &Path, from: &[u8], to: &[u8]) {
    use quorumkv::io::{Backend, SledBackend, WriteBatch};
    assert_eq!(from.len(), to.len());
    let backend = SledBackend::open(&data_dir.join("member/db")).expect("open backend");
    let mut changed = None;
    backend
        .scan(b"r", Some(b"s"), &mut |key, run| {
            if let Some(at) = run.windows(from.len()).position(|w| w == from) {
                let mut run = run.to_vec();
                run[at..at + to.len()].copy_from_slice(to);
                changed = Some((key.to_vec(), run));
                return false;
            }
            true
        })
        .expect("scan");
    let (key, run) = changed.expect("the value is in a run");
    let mut batch = WriteBatch::default();
    batch.put(key, run);
    backend.apply(batch).expect("apply");
    backend.flush().expect("flush");
}

/// A 3-member cluster with `flags` and 20 keys (`k<i>` = `value<ii>`), and the index of a
/// follower that was stopped and had its stored `value07` changed to `VALUE07` on disk.
fn a_follower_corrupted_while_down(root: &Path, flags: &[&str]) -> (Vec<Server>, usize) {
    let mut servers = start_cluster(root, &["a", "b", "c"], flags);
    let endpoint = servers[0].endpoint();
    for i in 0..20 {
        ok(etcdctl(
            &endpoint,
            &["put", &format!("k{i}"), &format!("value{i:02}")],
        ));
    }
    // Every member has applied the writes before the follower stops.
    for server in &servers {
        ok(etcdctl(&server.endpoint(), &["get", "k19"]));
    }
    let leader = common::leader(&servers).expect("a leader");
    let follower = (0..servers.len())
        .find(|i| *i != leader)
        .expect("a follower");
    assert!(servers[follower].terminate().success());
    corrupt_a_value(&servers[follower].data_dir, b"value07", b"VALUE07");
    (servers, follower)
}

#[test]
fn a_follower_whose_backend_changed_while_down_fails_the_initial_check_and_raises_corrupt() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut servers, follower) =
        a_follower_corrupted_while_down(dir.path(), &["--experimental-initial-corrupt-check=true"]);
    let status = servers[follower].run_to_exit(Duration::from_secs(40));
    assert!(!status.success(), "the corrupt member must not serve");
    let log = servers[follower].log();
    assert!(log.contains("found data inconsistency with peers"), "{log}");
    let healthy = (0..3).find(|i| *i != follower).expect("a healthy member");
    let endpoint = servers[healthy].endpoint();
    wait_until("the CORRUPT alarm", Duration::from_secs(10), || {
        ok(etcdctl(&endpoint, &["alarm", "list"])).contains("alarm:CORRUPT")
    });
    let refused = fails(etcdctl(&endpoint, &["put", "more", "x"]));
    assert!(refused.contains("etcdserver: corrupt cluster"), "{refused}");
    assert_eq!(
        ok(etcdctl(&endpoint, &["get", "k7", "--print-value-only"])).trim(),
        "value07",
        "reads are served"
    );
    let (status, body) = http_get(servers[healthy].client_port, "/health");
    assert_eq!(
        (status, json(&body)["reason"].clone()),
        (503, "ALARM CORRUPT".into())
    );
}

#[test]
fn the_leaders_periodic_check_raises_corrupt_for_a_member_whose_data_diverged() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut servers, follower) =
        a_follower_corrupted_while_down(dir.path(), &["--experimental-corrupt-check-time=1s"]);
    let healthy = (0..3).find(|i| *i != follower).expect("a healthy member");
    let endpoint = servers[healthy].endpoint();
    // The members that agree raise nothing, checking every second.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ok(etcdctl(&endpoint, &["alarm", "list"])).trim(), "");
    servers[follower].spawn();
    servers[follower].wait_ready();
    let id = u64::from_str_radix(&servers[follower].member_id(), 16).expect("hex id");
    wait_until("the CORRUPT alarm", Duration::from_secs(30), || {
        let alarms = ok(etcdctl(&endpoint, &["alarm", "list"]));
        alarms.contains(&format!("memberID:{id} alarm:CORRUPT"))
    });
    let refused = fails(etcdctl(&endpoint, &["put", "more", "x"]));
    assert!(refused.contains("etcdserver: corrupt cluster"), "{refused}");
}

#[test]
fn periodic_auto_compaction_compacts_to_the_revision_a_retention_ago() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "2s",
        ],
    );
    let endpoint = server.endpoint();
    for i in 0..10 {
        ok(etcdctl(&endpoint, &["put", "k", &format!("v{i}")]));
    }
    assert!(etcdctl(&endpoint, &["get", "k", "--rev", "2"])
        .status
        .success());
    wait_until("an auto-compaction", Duration::from_secs(20), || {
        let out = etcdctl(&endpoint, &["get", "k", "--rev", "2"]);
        String::from_utf8_lossy(&out.stderr).contains("required revision has been compacted")
    });
    assert_eq!(
        ok(etcdctl(&endpoint, &["get", "k", "--print-value-only"])).trim(),
        "v9"
    );
    assert!(server.log().contains("finished auto-compaction"));
}
