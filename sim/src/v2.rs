//! Simulated v2 keys API clients: writers that set (some with TTLs), create, compare-and-swap,
//! delete and queue keys under `/sim`, and waiters that wait for the next change of a key or
//! of the directory. Every answer is recorded for `check::v2`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use madsim::rand::Rng;
use quorumkv::proto::quorumkvpb::V2Request;
use quorumkv::v2::{Event, V2Error};

use crate::cluster::Cluster;
use crate::workload::CLIENT_TIMEOUT;

/// The directory the v2 clients work in.
pub const V2_DIR: &str = "/sim";
const KEYS: u64 = 4;

/// A v2 write a member answered (its event, or the v2 error it applied to).
#[derive(Clone, Debug)]
pub struct V2Op {
    pub client: u64,
    pub node: u64,
    pub request: V2Request,
    pub answer: Result<Event, V2Error>,
    pub call_us: u64,
    pub return_us: u64,
}

/// A wait a member answered with an event, or one it held until the client gave up.
#[derive(Clone, Debug)]
pub struct V2Waited {
    pub client: u64,
    pub node: u64,
    pub path: String,
    pub recursive: bool,
    pub since: u64,
    /// `None`: no event came before the client's timeout...
    pub event: Option<Event>,
    /// ...though the member had applied up to this index by then.
    pub gave_up_at: u64,
}

#[derive(Clone, Default)]
pub struct V2Log {
    ops: Arc<Mutex<Vec<V2Op>>>,
    waits: Arc<Mutex<Vec<V2Waited>>>,
}

impl V2Log {
    pub fn ops(&self) -> Vec<V2Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn waits(&self) -> Vec<V2Waited> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The next request a writer makes.
fn draw(rng: &mut impl Rng, client: u64, n: u64) -> V2Request {
    let key = format!("{V2_DIR}/k{}", rng.gen_range(0..KEYS));
    let value = format!("c{client}-{n}");
    let ttl = |rng: &mut dyn madsim::rand::RngCore| {
        if rng.gen_bool(0.3) {
            now_ns() + rng.gen_range(500..=3000) * 1_000_000
        } else {
            0
        }
    };
    let base = V2Request {
        method: "PUT".into(),
        path: key,
        val: value,
        ..Default::default()
    };
    match rng.gen_range(0..10) {
        0..=3 => V2Request {
            expiration: ttl(rng),
            ..base
        },
        4 => V2Request {
            prev_exist: Some(false),
            expiration: ttl(rng),
            ..base
        },
        5 => V2Request {
            // Another client's value, likely stale: a compare that may fail.
            prev_value: format!(
                "c{}-{}",
                rng.gen_range(1..=2),
                n.saturating_sub(rng.gen_range(1..4))
            ),
            ..base
        },
        6 => V2Request {
            method: "DELETE".into(),
            val: String::new(),
            ..base
        },
        7 => V2Request {
            method: "POST".into(),
            path: format!("{V2_DIR}/q"),
            ..base
        },
        8 => V2Request {
            prev_exist: Some(true),
            refresh: rng.gen_bool(0.5),
            expiration: now_ns() + rng.gen_range(500..=3000) * 1_000_000,
            ..base
        },
        _ => V2Request {
            method: "DELETE".into(),
            path: format!("{V2_DIR}/q"),
            val: String::new(),
            recursive: true,
            ..base
        },
    }
}

pub async fn v2_writer(cluster: Cluster, log: V2Log, client: u64, stop: Arc<AtomicBool>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (node, request, think) = {
            let mut rng = madsim::rand::thread_rng();
            let up = cluster.up_ids();
            let node = up.get(rng.gen_range(0..up.len().max(1))).copied();
            let request = draw(&mut rng, client, n);
            (node, request, Duration::from_millis(rng.gen_range(0..=60)))
        };
        let Some((node, kv)) = node.and_then(|id| cluster.kv(id).map(|kv| (id, kv))) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let call_us = cluster.recorder.now_us();
        if let Ok(Ok(answer)) =
            tokio::time::timeout(CLIENT_TIMEOUT, kv.v2_write(request.clone())).await
        {
            log.ops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(V2Op {
                    client,
                    node,
                    request,
                    answer,
                    call_us,
                    return_us: cluster.recorder.now_us(),
                });
        }
        tokio::time::sleep(think).await;
    }
}

pub async fn v2_waiter(cluster: Cluster, log: V2Log, client: u64, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let (node, path, recursive, back) = {
            let mut rng = madsim::rand::thread_rng();
            let up = cluster.up_ids();
            let node = up.get(rng.gen_range(0..up.len().max(1))).copied();
            let (path, recursive) = if rng.gen_bool(0.3) {
                (V2_DIR.to_string(), true)
            } else {
                (format!("{V2_DIR}/k{}", rng.gen_range(0..KEYS)), false)
            };
            (node, path, recursive, rng.gen_range(0..=20u64))
        };
        let Some((node, kv)) = node.and_then(|id| cluster.kv(id).map(|kv| (id, kv))) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // Sometimes from the history, sometimes the next change.
        let since = (kv.v2_index() + 1).saturating_sub(back).max(1);
        let Ok(wait) = kv.v2_wait(&path, recursive, false, since) else {
            continue; // Cleared from the history: nothing to check.
        };
        let event = match (wait.past.into_iter().next(), wait.waiting) {
            (Some(event), _) => Ok(event),
            (None, Some(mut waiting)) => {
                match tokio::time::timeout(CLIENT_TIMEOUT, waiting.events.recv()).await {
                    Ok(Some(event)) => Ok(event),
                    // The member went (a crash, a restore that ended its waits): nothing to check.
                    Ok(None) => continue,
                    Err(_) => Err(kv.v2_index()),
                }
            }
            (None, None) => continue,
        };
        let (event, gave_up_at) = match event {
            Ok(event) => (Some(event), 0),
            Err(index) => (None, index),
        };
        log.waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(V2Waited {
                client,
                node,
                path,
                recursive,
                since,
                event,
                gave_up_at,
            });
    }
}
