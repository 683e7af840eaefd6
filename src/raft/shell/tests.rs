//! The node task's turn: what it takes from its queues before one ready (one fdatasync).

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use raft::eraftpb::MessageType;

use super::*;
use crate::io::disk::DiskFile;
use crate::io::{StdDisk, TokioClock};

/// The real disk, counting fdatasyncs of files under `wal/`.
struct CountSyncs {
    syncs: Arc<AtomicUsize>,
}

struct CountedFile {
    inner: Box<dyn DiskFile>,
    syncs: Option<Arc<AtomicUsize>>,
}

impl DiskFile for CountedFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read_at(offset, buf)
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        if let Some(syncs) = &self.syncs {
            syncs.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.sync_data()
    }
    fn allocate(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.allocate(len)
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

impl Disk for CountSyncs {
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        StdDisk.create_dir_all(dir)
    }
    fn open(&self, path: &std::path::Path, create: bool) -> std::io::Result<Box<dyn DiskFile>> {
        let in_wal = path.components().any(|c| c.as_os_str() == "wal");
        Ok(Box::new(CountedFile {
            inner: StdDisk.open(path, create)?,
            syncs: in_wal.then(|| self.syncs.clone()),
        }))
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        StdDisk.list(dir)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        StdDisk.rename(from, to)
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        StdDisk.remove(path)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        StdDisk.sync_dir(dir)
    }
    fn exists(&self, path: &std::path::Path) -> bool {
        StdDisk.exists(path)
    }
}

/// Keeps what the node sends.
#[derive(Default)]
struct Sent(Mutex<Vec<Message>>);

impl Transport for Sent {
    fn send(&self, _to: u64, batch: Vec<Message>) {
        self.0.lock().expect("sent").extend(batch);
    }
}

/// Leader 1's append of entry `index` (term 2) to member 2, right after entry `index - 1`.
fn append(index: u64) -> Message {
    let mut msg = Message::default();
    msg.set_msg_type(MessageType::MsgAppend);
    msg.from = 1;
    msg.to = 2;
    msg.term = 2;
    msg.index = index - 1;
    msg.log_term = if index - 1 == BOOTSTRAP_INDEX {
        BOOTSTRAP_TERM
    } else {
        2
    };
    msg.commit = BOOTSTRAP_INDEX;
    msg.set_entries(
        vec![Entry {
            term: 2,
            index,
            data: b"entry".to_vec().into(),
            ..Default::default()
        }]
        .into(),
    );
    msg
}

#[tokio::test]
async fn appends_queued_while_the_node_was_busy_share_one_fdatasync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let syncs = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(Sent::default());
    let (inbox_tx, inbox) = mpsc::channel(64);
    let opts = NodeOptions {
        id: 2,
        initial_voters: vec![1, 2],
        heartbeat_interval: Duration::from_secs(10),
        election_tick: 10,
        wal_dir: dir.path().join("wal"),
        snap_dir: dir.path().join("snap"),
        wal: WalOptions::default(),
        read_seed: 0,
        snapshot_catch_up_entries: 10,
    };
    let disk = Arc::new(CountSyncs {
        syncs: syncs.clone(),
    });
    let node =
        spawn_node(opts, disk, sent.clone(), inbox, Arc::new(TokioClock::new())).expect("start");
    // Let the node start and go idle.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = syncs.load(Ordering::SeqCst);

    // Eight appends, each its own peer batch, all queued before the node runs again (this
    // test runs on one thread, so the node cannot run until the test awaits).
    const APPENDS: u64 = 8;
    for index in BOOTSTRAP_INDEX + 1..=BOOTSTRAP_INDEX + APPENDS {
        inbox_tx.try_send(vec![append(index)]).expect("inbox");
    }
    let last = BOOTSTRAP_INDEX + APPENDS;
    let acked = |sent: &Sent| {
        sent.0.lock().expect("sent").iter().any(|m| {
            m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject && m.index == last
        })
    };
    for _ in 0..200 {
        if acked(&sent) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(acked(&sent), "entry {last} never acknowledged");
    assert_eq!(
        syncs.load(Ordering::SeqCst) - before,
        1,
        "the queued appends should be made durable by one fdatasync"
    );
    node.task.abort();
    drop(node.apply_rx);
}
