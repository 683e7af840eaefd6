//! What a real process does with a damaged WAL: a torn tail is repaired and logged; corruption
//! before the tail stops the start with the file and offset named.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{etcdctl, ok, Server};

fn segments(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join("member").join("wal");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

/// Offset just past the last written record (records are 8-byte aligned; the rest is zeros).
fn written_end(bytes: &[u8]) -> usize {
    let last = bytes.iter().rposition(|b| *b != 0).expect("some data");
    (last + 1).div_ceil(8) * 8
}

fn write_keys(server: &Server, n: usize) {
    for i in 0..n {
        ok(etcdctl(
            &server.endpoint(),
            &["put", &format!("key{i}"), &format!("value{i}")],
        ));
    }
}

#[test]
fn torn_tail_is_repaired_at_start_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    write_keys(&server, 20);
    assert!(server.terminate().success(), "clean shutdown on SIGTERM");
    let segment = segments(&server.data_dir).pop().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let end = written_end(&bytes);
    // A half record: a header that promises 1000 bytes, then a few bytes of garbage.
    let garbage = [
        0xe8, 0x03, 0, 0, 1, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 9, 9, 9,
    ];
    bytes[end..end + garbage.len()].copy_from_slice(&garbage);
    std::fs::write(&segment, &bytes).expect("write");

    server.spawn();
    server.wait_ready();
    let log = server.log();
    assert!(log.contains("torn"), "the repair is logged:\n{log}");
    for i in 0..20 {
        let out = ok(etcdctl(
            &server.endpoint(),
            &["get", &format!("key{i}"), "--print-value-only"],
        ));
        assert_eq!(out, format!("value{i}\n"));
    }
    ok(etcdctl(&server.endpoint(), &["put", "after", "repair"]));
}

#[test]
fn corruption_before_the_tail_refuses_to_start_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    write_keys(&server, 20);
    assert!(server.terminate().success());
    let segment = segments(&server.data_dir).pop().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let end = written_end(&bytes);
    // Flip a byte in the middle of the log, well before its last record.
    let target = end / 2;
    bytes[target] ^= 0x5a;
    std::fs::write(&segment, &bytes).expect("write");

    let status = server.run_to_exit(Duration::from_secs(20));
    assert!(!status.success(), "must refuse to start");
    let log = server.log();
    let name = segment.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(log.contains(name), "the error names the file:\n{log}");
    assert!(log.contains("offset"), "the error names the offset:\n{log}");
    assert!(log.contains("corrupt"), "{log}");
}

/// etcd's promise after a clean stop: the backend holds every applied entry. So a damaged last
/// WAL record (truncated away at the next start) costs no acknowledged write, and the member
/// takes new writes after it.
#[test]
fn a_clean_stop_leaves_every_applied_entry_in_the_backend_and_a_damaged_last_record_loses_nothing()
{
    use quorumkv::io::SledBackend;
    use quorumkv::mvcc::MvccStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    write_keys(&server, 30);
    let status = ok(etcdctl(
        &server.endpoint(),
        &["endpoint", "status", "-w", "json"],
    ));
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let applied = status[0]["Status"]["raftAppliedIndex"]
        .as_u64()
        .expect("applied");
    let revision = status[0]["Status"]["header"]["revision"]
        .as_i64()
        .expect("revision");
    assert!(server.terminate().success(), "clean shutdown on SIGTERM");
    {
        let backend = std::sync::Arc::new(
            SledBackend::open(&server.data_dir.join("member/db")).expect("open backend"),
        );
        let store = MvccStore::open(backend).expect("store");
        assert!(
            store.consistent_index() >= applied,
            "the backend lags: {} < {applied}",
            store.consistent_index()
        );
        assert_eq!(store.current_rev(), revision);
    }
    // The last record damaged: a byte of its payload flipped.
    let segment = segments(&server.data_dir).pop().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let end = written_end(&bytes);
    bytes[end - 3] ^= 0x5a;
    std::fs::write(&segment, &bytes).expect("write");
    server.spawn();
    server.wait_ready();
    for i in 0..30 {
        let out = ok(etcdctl(
            &server.endpoint(),
            &["get", &format!("key{i}"), "--print-value-only"],
        ));
        assert_eq!(out, format!("value{i}\n"));
    }
    for i in 0..5 {
        ok(etcdctl(
            &server.endpoint(),
            &["put", &format!("after{i}"), "x"],
        ));
        assert_eq!(
            ok(etcdctl(
                &server.endpoint(),
                &["get", &format!("after{i}"), "--print-value-only"]
            )),
            "x\n",
            "a write after the repair is applied"
        );
    }
}

/// A backend or WAL overwritten with garbage: the member refuses to start with one line that
/// names the file and the way to recover; no panic, no backtrace.
#[test]
fn a_backend_or_wal_of_garbage_refuses_to_start_with_one_line_naming_the_file() {
    for target in ["db", "wal"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = Server::start(dir.path(), &[]);
        write_keys(&server, 10);
        assert!(server.terminate().success());
        let damaged: Vec<PathBuf> = if target == "db" {
            std::fs::read_dir(server.data_dir.join("member/db"))
                .expect("db dir")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.is_file())
                .collect()
        } else {
            segments(&server.data_dir)
        };
        assert!(!damaged.is_empty());
        for file in &damaged {
            let len = std::fs::metadata(file).expect("metadata").len() as usize;
            let garbage: Vec<u8> = (0..len.max(4096)).map(|i| (i * 7 + 13) as u8).collect();
            std::fs::write(file, garbage).expect("overwrite");
        }
        std::fs::write(&server.log_path, "").expect("truncate log");
        let status = server.run_to_exit(Duration::from_secs(20));
        assert!(!status.success(), "{target}: must refuse to start");
        let log = server.log();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{target}: one error line:\n{log}");
        let error = errors[0];
        assert!(
            error.contains(&format!("member/{target}")),
            "{target}: the file is named: {error}"
        );
        assert!(error.contains("snapshot restore"), "{target}: {error}");
        assert!(
            !log.contains("panicked") && !log.contains("stack backtrace"),
            "{target}: no panic:\n{log}"
        );
    }
}
