//! Simulated clients: each calls the same request interface the gRPC services call (the
//! member's `KvServer`), on whichever member it picks, and records every call and its result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::Rng;
use quorumkv::mvcc::MvccError;
use quorumkv::proto::etcdserverpb::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use quorumkv::raft::NodeError;
use quorumkv::server::{KvServer, ServerError};

use crate::cluster::Cluster;
use crate::history::{Op, OpKind, OpResult, ReadKv};
use crate::recorder::Recorder;

/// A client gives up on a request after this long: the outcome is then unknown.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct WorkloadShape {
    pub clients: u64,
    pub keys: usize,
    /// Pause between a client's requests, at most.
    pub think_max: Duration,
}

#[derive(Clone, Default)]
pub struct History {
    ops: Arc<Mutex<Vec<Op>>>,
}

impl History {
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn begin(&self, op: Op) -> usize {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let id = ops.len();
        ops.push(Op { id, ..op });
        id
    }

    fn end(&self, id: usize, return_us: u64, result: OpResult) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(op) = ops.get_mut(id) {
            op.return_us = Some(return_us);
            op.result = result;
        }
    }
}

/// How long a client waits after a failed request before the next one.
pub const FAILURE_BACKOFF: Duration = Duration::from_millis(10);

pub fn key_name(i: usize) -> String {
    format!("k{i}")
}

fn read_kv(kv: &quorumkv::proto::mvccpb::KeyValue) -> ReadKv {
    ReadKv {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        mod_revision: kv.mod_revision,
    }
}

/// Was the request surely not applied? (raft dropped the proposal, or it was refused.)
fn surely_not_applied(e: &ServerError) -> bool {
    matches!(
        e,
        ServerError::Node(NodeError::NoLeader) | ServerError::RequestTooLarge
    ) || matches!(e, ServerError::Mvcc(m) if !matches!(m, MvccError::Backend(_) | MvccError::Corrupt { .. }))
}

fn failure(kind: &OpKind, e: ServerError) -> OpResult {
    let is_write = !matches!(kind, OpKind::Get { .. } | OpKind::Range { .. });
    if is_write && !surely_not_applied(&e) {
        OpResult::Unknown(e.to_string())
    } else {
        OpResult::Failed(e.to_string())
    }
}

/// Sends `kind` to member `node` and returns what came back.
pub async fn execute(kv: &KvServer, kind: &OpKind) -> Result<OpResult, ServerError> {
    Ok(match kind {
        OpKind::Put { key, value } => {
            let resp = kv
                .put(PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                })
                .await?;
            OpResult::Put {
                revision: resp.header.map_or(0, |h| h.revision),
            }
        }
        OpKind::Get { key, serializable } => {
            let resp = kv
                .range(RangeRequest {
                    key: key.clone().into_bytes(),
                    serializable: *serializable,
                    ..Default::default()
                })
                .await?;
            OpResult::Get {
                kv: resp.kvs.first().map(read_kv),
                revision: resp.header.map_or(0, |h| h.revision),
            }
        }
        OpKind::Delete { key } => {
            let resp = kv
                .delete_range(DeleteRangeRequest {
                    key: key.clone().into_bytes(),
                    ..Default::default()
                })
                .await?;
            OpResult::Delete {
                deleted: resp.deleted,
                revision: resp.header.map_or(0, |h| h.revision),
            }
        }
        OpKind::Range {
            start,
            end,
            serializable,
        } => {
            let resp = kv
                .range(RangeRequest {
                    key: start.clone().into_bytes(),
                    range_end: end.clone().into_bytes(),
                    serializable: *serializable,
                    ..Default::default()
                })
                .await?;
            OpResult::Range {
                kvs: resp.kvs.iter().map(read_kv).collect(),
                revision: resp.header.map_or(0, |h| h.revision),
            }
        }
        OpKind::Cas { key, expect, value } => {
            let compare = match expect {
                Some(expected) => Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Value as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(compare::TargetUnion::Value(expected.clone().into_bytes())),
                    ..Default::default()
                },
                None => Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Create as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(compare::TargetUnion::CreateRevision(0)),
                    ..Default::default()
                },
            };
            let put = RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                })),
            };
            let resp = kv
                .txn(TxnRequest {
                    compare: vec![compare],
                    success: vec![put],
                    failure: vec![],
                })
                .await?;
            debug_assert!(resp
                .responses
                .iter()
                .all(|r| matches!(r.response, Some(response_op::Response::ResponsePut(_)))));
            OpResult::Cas {
                succeeded: resp.succeeded,
                revision: resp.header.map_or(0, |h| h.revision),
            }
        }
    })
}

/// Runs one operation against `node` and records it.
pub async fn record(
    cluster: &Cluster,
    history: &History,
    client: u64,
    node: u64,
    kind: OpKind,
) -> OpResult {
    let recorder: &Recorder = &cluster.recorder;
    let id = history.begin(Op {
        id: 0,
        client,
        node,
        kind: kind.clone(),
        call_us: recorder.now_us(),
        return_us: None,
        result: OpResult::Unknown("pending".into()),
    });
    let result = match cluster.kv(node) {
        None => OpResult::Failed("member is down".into()),
        Some(kv) => match tokio::time::timeout(CLIENT_TIMEOUT, execute(&kv, &kind)).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => failure(&kind, e),
            Err(_) => failure(&kind, ServerError::Timeout),
        },
    };
    history.end(id, recorder.now_us(), result.clone());
    result
}

/// One client: picks a member and an operation at random, until `stop` is set.
pub async fn client(
    cluster: Cluster,
    history: History,
    shape: WorkloadShape,
    client: u64,
    stop: Arc<AtomicBool>,
) {
    let mut seq = 0u64;
    let mut node = 0;
    while !stop.load(Ordering::Relaxed) {
        let (kind, think_us) = {
            let mut rng = madsim::rand::thread_rng();
            let up = cluster.up_ids();
            let all = cluster.active_ids();
            // Mostly a running member; sometimes any (a client does not know who is down).
            if node == 0 || rng.gen_bool(0.2) {
                let pool = if up.is_empty() || rng.gen_bool(0.1) {
                    &all
                } else {
                    &up
                };
                node = pool
                    .get(rng.gen_range(0..pool.len().max(1)))
                    .copied()
                    .unwrap_or(1);
            }
            let key = key_name(rng.gen_range(0..shape.keys));
            seq += 1;
            let value = format!("c{client}.{seq}");
            let kind = match rng.gen_range(0..100) {
                0..=29 => OpKind::Put { key, value },
                30..=49 => OpKind::Get {
                    key,
                    serializable: false,
                },
                50..=57 => OpKind::Get {
                    key,
                    serializable: true,
                },
                58..=63 => OpKind::Delete { key },
                64..=73 => {
                    let a = rng.gen_range(0..shape.keys);
                    let b = rng.gen_range(a + 1..=shape.keys);
                    OpKind::Range {
                        start: key_name(a),
                        end: if b == shape.keys {
                            "l".to_string()
                        } else {
                            key_name(b)
                        },
                        serializable: rng.gen_bool(0.2),
                    }
                }
                _ => {
                    let expect = cluster_guess(&history, &key, &mut rng);
                    OpKind::Cas { key, expect, value }
                }
            };
            let think_us = rng.gen_range(0..=shape.think_max.as_micros() as u64);
            (kind, think_us)
        };
        let result = record(&cluster, &history, client, node, kind).await;
        if matches!(result, OpResult::Failed(_) | OpResult::Unknown(_)) {
            node = 0; // try another member next time
                      // As real clients do: a member that refuses at once (a learner, no leader) must
                      // not be asked again in the same instant, forever.
            tokio::time::sleep(FAILURE_BACKOFF).await;
        }
        tokio::time::sleep(Duration::from_micros(think_us)).await;
    }
}

/// A plausible current value for a compare-and-swap: the last value this history saw for
/// `key`, or absent.
fn cluster_guess(history: &History, key: &str, rng: &mut impl Rng) -> Option<String> {
    if rng.gen_bool(0.2) {
        return None;
    }
    let ops = history.ops.lock().unwrap_or_else(|p| p.into_inner());
    for op in ops.iter().rev().take(200) {
        match (&op.kind, &op.result) {
            (OpKind::Get { key: k, .. }, OpResult::Get { kv, .. }) if k == key => {
                return kv.as_ref().map(|kv| kv.value.clone());
            }
            (OpKind::Put { key: k, value }, OpResult::Put { .. }) if k == key => {
                return Some(value.clone());
            }
            _ => {}
        }
    }
    None
}
