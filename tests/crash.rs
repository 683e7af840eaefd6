//! SIGKILL under a write load, a torn write at the end of the WAL, restart, and every
//! acknowledged write is there.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use quorumkv::proto::etcdserverpb::{PutRequest, RangeRequest};

const WRITERS: usize = 16;
const LOAD_TIME: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_write_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A small snapshot count so the run also crosses snapshots and WAL release.
    let mut server = Server::start(dir.path(), &["--snapshot-count", "500"]);
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = server.client().await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut i = 0u64;
            // Writes go on until the server dies; bounded by time and count either way.
            while start.elapsed() < LOAD_TIME * 4 && i < 100_000 {
                let key = format!("w{w}/k{}", i % 50);
                let value = format!("v{i}");
                match client
                    .put(PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone().into_bytes(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => {
                        acked.lock().expect("lock").insert(key, value);
                    }
                    Err(_) => break,
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(LOAD_TIME).await;
    server.kill9();
    for writer in writers {
        writer.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > WRITERS * 10,
        "the load ran: {} keys acknowledged",
        acked.len()
    );

    // The kill may have cut a write short; make sure the log ends in a torn record: a header
    // that promises 1000 bytes, then a few bytes of garbage, just past the last record.
    let wal_dir = server.data_dir.join("member").join("wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal_dir)
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    // The newest segment with a record (the kill may land right after a new one was made).
    let (last, mut bytes) = segments
        .iter()
        .rev()
        .map(|path| (path.clone(), std::fs::read(path).expect("read segment")))
        .find(|(_, bytes)| bytes.iter().any(|b| *b != 0))
        .expect("a segment with records");
    let end = (bytes.iter().rposition(|b| *b != 0).expect("records") + 1).div_ceil(8) * 8;
    let torn = [
        0xe8, 0x03, 0, 0, 1, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 9, 9, 9,
    ];
    bytes[end..end + torn.len()].copy_from_slice(&torn);
    std::fs::write(&last, &bytes).expect("write segment");

    server.spawn();
    server.wait_ready();
    assert!(
        server.log().contains("torn"),
        "the torn tail is repaired and logged"
    );
    let mut client = server.client().await;
    let resp = client
        .range(RangeRequest {
            key: b"w".to_vec(),
            range_end: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    let found: HashMap<String, String> = resp
        .kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into(),
                String::from_utf8_lossy(&kv.value).into(),
            )
        })
        .collect();
    for (key, value) in &acked {
        let got = found
            .get(key)
            .unwrap_or_else(|| panic!("acknowledged key {key} lost"));
        // A later write to the key may have been applied but not acknowledged; never an older one.
        let got_n: u64 = got[1..].parse().expect("value");
        let acked_n: u64 = value[1..].parse().expect("value");
        assert!(
            got_n >= acked_n,
            "key {key}: acknowledged {value}, found {got}"
        );
    }
}

/// Every key's revisions, versions, lease and value, as etcdctl prints them.
fn everything(server: &Server) -> String {
    let out = common::ok(common::etcdctl(
        &server.endpoint(),
        &["get", "", "--prefix", "-w", "json"],
    ));
    // The header's raft term changes with every start; the rest may not.
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    format!("{} {}", json["header"]["revision"], json["kvs"])
}

/// A clean stop saves the key index and the next start loads it (no scan of every revision);
/// it is taken once: after a SIGKILL the start scans, and both give the same store.
#[test]
fn a_clean_stop_saves_the_key_index_and_a_start_after_a_crash_scans() {
    if !common::etcdctl_available() {
        eprintln!("skipped: etcdctl not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let e = server.endpoint();
    let lease = common::grant(&e, 600);
    for i in 0..200 {
        common::ok(common::etcdctl(
            &e,
            &["put", &format!("k{i:03}"), &"v".repeat(i * 40)],
        ));
    }
    common::ok(common::etcdctl(
        &e,
        &["put", "leased", "x", "--lease", &lease],
    ));
    common::ok(common::etcdctl(&e, &["del", "k01", "--prefix"]));
    common::ok(common::etcdctl(&e, &["put", "k010", "again"]));
    common::ok(common::etcdctl(&e, &["compact", "150"]));
    common::ok(common::etcdctl(&e, &["put", "k020", "after compaction"]));
    let before = everything(&server);
    let index_file = server.data_dir.join("member").join("index");

    assert!(server.terminate().success());
    assert!(index_file.exists(), "a clean stop saves the index");
    server.spawn();
    server.wait_ready();
    assert!(!index_file.exists(), "the start took it");
    assert!(
        server
            .log()
            .contains("loaded the key index saved at the last clean stop"),
        "{}",
        server.log()
    );
    assert_eq!(everything(&server), before);
    let leased = common::ok(common::etcdctl(
        &e,
        &["lease", "timetolive", &lease, "--keys"],
    ));
    assert!(
        leased.contains("leased"),
        "the key is still on its lease: {leased}"
    );
    common::ok(common::etcdctl(
        &e,
        &["put", "k030", "written after the load"],
    ));
    let after = everything(&server);

    server.kill9();
    server.spawn();
    server.wait_ready();
    assert_eq!(
        everything(&server),
        after,
        "a scan after a crash gives the same store"
    );
    let log = server.log();
    assert_eq!(
        log.matches("loaded the key index").count(),
        1,
        "only the start after the clean stop loaded one"
    );
}
