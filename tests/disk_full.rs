//! A full disk, for real: the data dir on a small tmpfs, written until it is full. The member
//! must exit non-zero within 10 s with a line that names the cause, restart once 8 MiB are
//! freed, keep every acknowledged write and leave no empty WAL segment behind; in a cluster,
//! the other members go on serving and the member recovers. Mounting needs root: without it
//! the tests say so and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{new_cluster, Server};
use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use quorumkv::proto::etcdserverpb::{PutRequest, RangeRequest};

/// The tmpfs: the first WAL segment (64 MiB) and some room for the backend.
const TMPFS_MIB: u64 = 96;
/// What is freed to restart.
const FILLER_BYTES: usize = 8 << 20;
const VALUE_BYTES: usize = 16 << 10;

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// `None` (with the reason printed) where mounting is not allowed.
    fn mount(dir: &Path) -> Option<Tmpfs> {
        let path = dir.join("small");
        std::fs::create_dir_all(&path).expect("dir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs"])
            .arg(&path)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Tmpfs { path }),
            Ok(out) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs (root is needed): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("fill/{i:06}").into_bytes()
}

/// Puts 16 KiB values through `endpoint`, keys `from` on, until one fails or `stop` says so;
/// the indexes acknowledged, and when the first failure came.
async fn fill(
    endpoint: &str,
    from: usize,
    mut stop: impl FnMut(usize) -> bool,
) -> (Vec<usize>, Option<Instant>) {
    let mut client = KvClient::connect(endpoint.to_string())
        .await
        .expect("connect");
    let mut acked = Vec::new();
    for i in from.. {
        if stop(i) {
            return (acked, None);
        }
        let put = PutRequest {
            key: key(i),
            value: vec![b'v'; VALUE_BYTES],
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(5), client.put(put)).await {
            Ok(Ok(_)) => acked.push(i),
            _ => return (acked, Some(Instant::now())),
        }
    }
    unreachable!()
}

/// The `fill/` keys `endpoint` holds (a serializable read: the member's own state).
async fn keys_held(endpoint: &str) -> Vec<Vec<u8>> {
    let mut client = KvClient::connect(endpoint.to_string())
        .await
        .expect("connect");
    let response = client
        .range(RangeRequest {
            key: b"fill/".to_vec(),
            range_end: b"fill0".to_vec(),
            keys_only: true,
            serializable: true,
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    response.kvs.into_iter().map(|kv| kv.key).collect()
}

/// Waits for the process to exit: its status and how long that took.
fn wait_exit(server: &mut Server, within: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    let child = server.child.as_mut().expect("running");
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            server.child = None;
            return (status, started.elapsed());
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!(
                "the member did not exit within {within:?}; log:\n{}",
                server.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The line that says why the member stopped: the first ERROR, naming the device being full.
fn assert_cause_logged(server: &Server) {
    let log = server.log();
    let first_error = log
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no ERROR line; log:\n{log}"));
    assert!(
        first_error.contains("No space left on device") && first_error.contains("/member/"),
        "the first ERROR line does not name the file and the cause: {first_error}\nlog:\n{log}"
    );
}

fn assert_no_empty_segment(data_dir: &Path) {
    for entry in std::fs::read_dir(data_dir.join("member/wal")).expect("wal dir") {
        let entry = entry.expect("entry");
        let len = entry.metadata().expect("metadata").len();
        assert!(len > 0, "an empty WAL segment was left: {:?}", entry.path());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_exits_and_restarts_with_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(tmpfs) = Tmpfs::mount(dir.path()) else {
        return;
    };
    std::fs::write(tmpfs.filler(), vec![0u8; FILLER_BYTES]).expect("filler");
    let mut server = Server::new(&tmpfs.path, &[]);
    server.log_path = dir.path().join("server.log");
    server.spawn();
    server.wait_ready();

    let (acked, failed_at) = fill(&server.endpoint(), 0, |i| i > 20_000).await;
    assert!(failed_at.is_some(), "the disk never filled");
    assert!(
        acked.len() > 100,
        "only {} writes before it filled",
        acked.len()
    );
    let (status, _) = wait_exit(&mut server, Duration::from_secs(10));
    let exit_after = failed_at.map(|at| at.elapsed());
    assert!(!status.success(), "exit status {status}");
    assert!(
        exit_after.is_some_and(|d| d <= Duration::from_secs(10)),
        "{exit_after:?}"
    );
    assert_cause_logged(&server);
    eprintln!(
        "{} writes acknowledged; the member exited {exit_after:?} after the first failure",
        acked.len()
    );

    // 8 MiB freed: the member starts again and holds every acknowledged write.
    std::fs::remove_file(tmpfs.filler()).expect("free");
    server.spawn();
    server.wait_ready();
    let held = keys_held(&server.endpoint()).await;
    for i in &acked {
        assert!(
            held.binary_search(&key(*i)).is_ok(),
            "acknowledged write {i} lost"
        );
    }
    assert_no_empty_segment(&server.data_dir);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_the_others_go_on_and_the_member_whose_disk_filled_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(tmpfs) = Tmpfs::mount(dir.path()) else {
        return;
    };
    std::fs::write(tmpfs.filler(), vec![0u8; FILLER_BYTES]).expect("filler");
    let mut servers = new_cluster(dir.path(), &["a", "b", "c"], &[]);
    servers[2].data_dir = tmpfs.path.join("data");
    for server in servers.iter_mut() {
        server.spawn();
    }
    for server in servers.iter_mut() {
        server.wait_ready();
    }
    let endpoint = servers[0].endpoint();
    // c must not lead: a leader whose disk fills stops, and the writes in flight meanwhile fail
    // with the election (that case is the single member's test).
    common::lead_elsewhere(&servers, 2, 0);

    // Writes through a until c's disk is full and c exits; none of them fails meanwhile.
    let mut c = servers.pop().expect("c");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (acked, failed_at) = fill(&endpoint, 0, |_| {
        assert!(Instant::now() < deadline, "c's disk never filled");
        c.child
            .as_mut()
            .expect("running")
            .try_wait()
            .expect("try_wait")
            .is_some()
    })
    .await;
    assert!(failed_at.is_none(), "a write failed while c's disk filled");
    let (status, _) = wait_exit(&mut c, Duration::from_secs(1));
    assert!(!status.success(), "exit status {status}");
    assert_cause_logged(&c);

    // The two others go on.
    let start = acked.last().map_or(0, |i| i + 1);
    let (more, failed_at) = fill(&endpoint, start, |i| i >= start + 50).await;
    assert!(failed_at.is_none(), "the cluster stopped serving");
    assert_eq!(more.len(), 50);

    // With 8 MiB freed, c starts and catches up.
    std::fs::remove_file(tmpfs.filler()).expect("free");
    c.spawn();
    c.wait_ready();
    let want = keys_held(&endpoint).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = keys_held(&c.endpoint()).await;
        if held == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c holds {} keys of {}",
            held.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_empty_segment(&c.data_dir);
    c.terminate();
    for server in servers.iter_mut() {
        server.terminate();
    }
}
