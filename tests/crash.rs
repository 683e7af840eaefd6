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
