//! Periodic progress notifications (`progress_notify`), compared with etcd 3.4's: both servers
//! started with `--experimental-watch-progress-notify-interval 1s`, the same streams opened on
//! each, the same writes made, and what each stream was sent in 3.6 s compared.
//!
//! What is compared: per stream, the order of its answers (created, events, progress) by watch
//! ID, the events' keys and revisions; the progress notifications of one tick are put in watch
//! ID order (etcd walks a Go map) and their revisions are compared as "the current revision":
//! the writes go on while they are sent, so each one's number depends on the moment.

use std::time::{Duration, Instant};

use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
use quorumkv::proto::etcdserverpb::watch_create_request::FilterType;
use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
use quorumkv::proto::etcdserverpb::*;
use tonic::transport::Channel;

/// The interval both servers are started with.
pub const INTERVAL: &str = "1s";
/// How long each stream is read: three ticks (at 1.0-1.1 s, 2.0-2.2 s and 3.0-3.3 s, with
/// etcd's jitter of up to a tenth), and not a fourth.
const WINDOW: Duration = Duration::from_millis(3600);
/// A put to the busy key this often: more often than the interval, so its watchers are never
/// idle for a whole one.
const BUSY_EVERY: Duration = Duration::from_millis(250);

/// One answer on a stream, as compared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    Created(i64),
    Events(i64, Vec<(String, i64)>),
    /// A progress notification: its watch ID, and whether it named the revision the server
    /// was at when it was read (or the one before, for a put in flight).
    Progress(i64, bool),
    /// Progress notifications more than 300 ms after the last ones: another tick.
    Tick,
    Other(String),
}

fn watch(key: &str, progress_notify: bool) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        progress_notify,
        ..Default::default()
    }
}

async fn put(
    kv: &mut quorumkv::proto::etcdserverpb::kv_client::KvClient<Channel>,
    key: &str,
) -> i64 {
    kv.put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .map_or(0, |h| h.revision)
}

/// Opens a stream with `creates` (one at a time, each after the last one's `created`), reads it
/// for `WINDOW` from its first create, and gives back what it saw. `current` is the server's
/// revision as the writer last saw it.
async fn stream(
    channel: Channel,
    creates: Vec<WatchCreateRequest>,
    current: std::sync::Arc<std::sync::atomic::AtomicI64>,
) -> Vec<Seen> {
    let (requests, inbound) = tokio::sync::mpsc::unbounded_channel();
    let mut creates = creates.into_iter();
    let first = creates.next().expect("a watch");
    let _ = requests.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(first)),
    });
    let start = Instant::now();
    let mut answers = WatchClient::new(channel)
        .watch(super::tokio_stream_of(inbound))
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    let mut last_progress: Option<Instant> = None;
    loop {
        let left = WINDOW.saturating_sub(start.elapsed());
        let answer = match tokio::time::timeout(left, answers.message()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                seen.push(Seen::Other(format!("error {:?} {}", e.code(), e.message())));
                break;
            }
            Ok(Ok(None)) => {
                seen.push(Seen::Other("the stream ended".into()));
                break;
            }
            Ok(Ok(Some(answer))) => answer,
        };
        let revision = answer.header.as_ref().map_or(0, |h| h.revision);
        if answer.created {
            seen.push(Seen::Created(answer.watch_id));
            if let Some(next) = creates.next() {
                let _ = requests.send(WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(next)),
                });
            }
        } else if answer.canceled || answer.compact_revision != 0 {
            seen.push(Seen::Other(format!("{answer:?}")));
        } else if answer.events.is_empty() {
            let now = current.load(std::sync::atomic::Ordering::SeqCst);
            if last_progress.is_none_or(|at| at.elapsed() > Duration::from_millis(300)) {
                seen.push(Seen::Tick);
            }
            last_progress = Some(Instant::now());
            seen.push(Seen::Progress(
                answer.watch_id,
                revision == now || revision == now + 1,
            ));
        } else {
            let events = answer
                .events
                .iter()
                .map(|e| {
                    let kv = e.kv.as_ref().expect("kv");
                    (
                        String::from_utf8_lossy(&kv.key).into_owned(),
                        kv.mod_revision,
                    )
                })
                .collect();
            seen.push(Seen::Events(answer.watch_id, events));
        }
    }
    // The notifications of one tick in watch ID order.
    let mut tidy: Vec<Seen> = Vec::new();
    let mut run: Vec<Seen> = Vec::new();
    for s in seen {
        if matches!(s, Seen::Progress(..)) {
            run.push(s);
        } else {
            run.sort();
            tidy.append(&mut run);
            tidy.push(s);
        }
    }
    run.sort();
    tidy.append(&mut run);
    tidy
}

/// What the two streams of the scenario were sent, on one server.
pub async fn scenario(endpoint: String) -> Vec<Vec<Seen>> {
    let channel = Channel::from_shared(endpoint)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut kv = quorumkv::proto::etcdserverpb::kv_client::KvClient::new(channel.clone());
    let mut last = 0;
    for key in ["k1", "k2", "k3"] {
        last = put(&mut kv, key).await;
    }
    let current = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(last));
    // Stream 1: an idle key with and without notifications, a busy key whose events a filter
    // drops, and a watch that catches up from history first.
    let quiet = stream(
        channel.clone(),
        vec![
            watch("idle", true),
            watch("idle", false),
            WatchCreateRequest {
                filters: vec![FilterType::Noput as i32],
                ..watch("busy", true)
            },
            WatchCreateRequest {
                start_revision: 2,
                ..watch("k1", true)
            },
        ],
        current.clone(),
    );
    // Stream 2: the busy key, sent an event more often than the interval.
    let busy = stream(channel.clone(), vec![watch("busy", true)], current.clone());
    let writer = {
        let current = current.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let start = Instant::now();
            while start.elapsed() < WINDOW - Duration::from_millis(300) {
                let revision = put(&mut kv, "busy").await;
                current.store(revision, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(BUSY_EVERY).await;
            }
        }
    };
    let (quiet, busy, ()) = tokio::join!(quiet, busy, writer);
    // The busy stream's events name revisions that depend on when each put landed between the
    // two streams' reads, and how many there were on the moment: a run of them is kept as one.
    let mut runs: Vec<Seen> = Vec::new();
    for s in busy {
        let s = match s {
            Seen::Events(id, _) => Seen::Events(id, Vec::new()),
            other => other,
        };
        if !(matches!(s, Seen::Events(..)) && runs.last() == Some(&s)) {
            runs.push(s);
        }
    }
    vec![quiet, runs]
}
