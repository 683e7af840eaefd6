//! Simulated watchers: each watches the whole KV key space on a member of its choosing, for a
//! while, then moves to another member (or is cut off when its member crashes) and resumes
//! from the revision after the last one it saw, as a client reconnecting does. Everything it
//! receives is recorded for the watch checker (`check::watches`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::Rng;
use quorumkv::proto::etcdserverpb::WatchCreateRequest;
use quorumkv::proto::mvccpb::{event::EventType, Event};

use crate::cluster::Cluster;

/// The key space the KV workload writes (`k0`, `k1`, ...).
pub const WATCHED_START: &[u8] = b"k";
pub const WATCHED_END: &[u8] = b"l";

/// One change as a watcher saw it (or as the final history holds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub revision: i64,
    pub key: String,
    /// `None` for a delete.
    pub value: Option<String>,
}

impl Change {
    pub fn of(event: &Event) -> Change {
        let kv = event.kv.clone().unwrap_or_default();
        Change {
            revision: kv.mod_revision,
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: (event.r#type == EventType::Put as i32)
                .then(|| String::from_utf8_lossy(&kv.value).into_owned()),
        }
    }
}

/// One connection of a watcher to a member: where it started and each response's changes.
#[derive(Clone, Debug)]
pub struct Session {
    pub watcher: u64,
    pub node: u64,
    pub start_rev: i64,
    pub start_us: u64,
    pub responses: Vec<Vec<Change>>,
    /// Answers to `RequestProgress`, and periodic progress notifications: (responses with
    /// events received before it, its revision).
    pub progress: Vec<(usize, i64)>,
}

#[derive(Clone, Default)]
pub struct WatchLog {
    sessions: Arc<Mutex<Vec<Session>>>,
}

impl WatchLog {
    pub fn push(&self, session: Session) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(session);
    }

    pub fn sessions(&self) -> Vec<Session> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub async fn watch_client(cluster: Cluster, log: WatchLog, watcher: u64, stop: Arc<AtomicBool>) {
    let mut next_rev = 1;
    while !stop.load(Ordering::Relaxed) {
        let (node, stay) = {
            let mut rng = madsim::rand::thread_rng();
            let up = cluster.up_ids();
            let node = up.get(rng.gen_range(0..up.len().max(1))).copied();
            (node, Duration::from_millis(rng.gen_range(500..=4000)))
        };
        let Some(kv) = node.and_then(|n| cluster.kv(n)) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let hub = kv.watches().clone();
        let (stream, tx, mut rx) = hub.open_stream();
        let created = hub.create(
            stream,
            &tx,
            &WatchCreateRequest {
                key: WATCHED_START.to_vec(),
                range_end: WATCHED_END.to_vec(),
                start_revision: next_rev,
                // Periodic progress notifications (`PROGRESS_INTERVAL`), checked like answers
                // to `RequestProgress`.
                progress_notify: true,
                ..Default::default()
            },
        );
        if created.canceled {
            hub.close_stream(stream);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        hub.activate(stream, created.watch_id);
        let mut session = Session {
            watcher,
            node: node.unwrap_or(0),
            start_rev: next_rev,
            start_us: cluster.recorder.now_us(),
            responses: Vec::new(),
            progress: Vec::new(),
        };
        let until = tokio::time::sleep(stay);
        tokio::pin!(until);
        loop {
            tokio::select! {
                response = rx.recv() => match response {
                    Some(response) if !response.canceled => {
                        let changes: Vec<Change> = response.events.iter().map(Change::of).collect();
                        if let Some(last) = changes.last() {
                            next_rev = next_rev.max(last.revision + 1);
                        }
                        if changes.is_empty() {
                            let revision = response.header.map_or(0, |h| h.revision);
                            session.progress.push((session.responses.len(), revision));
                        } else {
                            session.responses.push(changes);
                        }
                    }
                    _ => break,
                },
                _ = &mut until => break,
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        hub.close_stream(stream);
        log.push(session);
    }
}
