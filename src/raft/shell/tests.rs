//! The node task's turn: what it takes from its queues before one ready (one fdatasync).

use std::sync::Mutex;

use raft::eraftpb::MessageType;

use super::*;
use crate::io::instrumented_disk::InstrumentedDisk;
use crate::io::TokioClock;

/// How many WAL segment fdatasyncs `events` (from `InstrumentedDisk`) holds.
fn wal_syncs(events: &[String]) -> usize {
    events
        .iter()
        .filter(|e| e.starts_with("sync ") && e.ends_with(".wal"))
        .count()
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
    let sent = Arc::new(Sent::default());
    let (inbox_tx, inbox) = mpsc::channel(64);
    let opts = NodeOptions {
        backend_applied_index: 0,
        id: 2,
        initial_voters: vec![1, 2],
        heartbeat_interval: Duration::from_secs(10),
        election_tick: 10,
        wal_dir: dir.path().join("wal"),
        snap_dir: dir.path().join("snap"),
        wal: WalOptions::default(),
        read_seed: 0,
        snapshot_catch_up_entries: 10,
        snapshot_chunk_bytes: 1024,
    };
    let disk = Arc::new(InstrumentedDisk::default());
    let node = spawn_node(
        opts,
        disk.clone(),
        sent.clone(),
        inbox,
        Arc::new(TokioClock::new()),
    )
    .expect("start");
    // Let the node start and go idle.
    tokio::time::sleep(Duration::from_millis(50)).await;
    disk.take_events();

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
        wal_syncs(&disk.take_events()),
        1,
        "the queued appends should be made durable by one fdatasync"
    );
    node.task.abort();
    drop(node.apply_rx);
}
