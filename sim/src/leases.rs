//! Simulated lease clients, as a service registering itself would: grant a lease, put a key on
//! it, keep it alive for a while (reading the key now and then), sometimes revoke it, then
//! watch the key go. Every call is recorded for the lease checker (`check::leases`). Lease keys
//! live under `lease/` and are written only here, so the KV checkers never see them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::Rng;
use quorumkv::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
};
use quorumkv::server::ServerError;

use crate::cluster::Cluster;
use crate::workload::CLIENT_TIMEOUT;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseCall {
    Grant {
        ttl: i64,
    },
    Attach {
        key: String,
    },
    KeepAlive,
    /// A linearizable read of the lease's key.
    Read {
        key: String,
    },
    Revoke,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// Grant, attach or revoke took effect.
    Done,
    /// A keep-alive was acknowledged: the lease lives `ttl` seconds from (at least) the call.
    Renewed {
        ttl: i64,
    },
    /// A keep-alive found the lease gone.
    Gone,
    Present,
    Absent,
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct LeaseOp {
    pub client: u64,
    pub node: u64,
    pub lease: i64,
    pub call: LeaseCall,
    pub call_us: u64,
    pub return_us: u64,
    pub outcome: LeaseOutcome,
}

impl LeaseOp {
    pub fn describe(&self) -> String {
        format!(
            "c{} n{} [{:.3}s..{:.3}s] lease {:x} {:?} -> {:?}",
            self.client,
            self.node,
            self.call_us as f64 / 1e6,
            self.return_us as f64 / 1e6,
            self.lease,
            self.call,
            self.outcome
        )
    }
}

#[derive(Clone, Default)]
pub struct LeaseLog {
    ops: Arc<Mutex<Vec<LeaseOp>>>,
}

impl LeaseLog {
    pub fn ops(&self) -> Vec<LeaseOp> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn push(&self, op: LeaseOp) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }
}

/// Waits between reads of a lease's key, and between keep-alives at most.
const READ_EVERY: Duration = Duration::from_millis(250);

struct LeaseClient {
    cluster: Cluster,
    log: LeaseLog,
    client: u64,
}

impl LeaseClient {
    fn pick(&self) -> u64 {
        let up = self.cluster.up_ids();
        let mut rng = madsim::rand::thread_rng();
        up.get(rng.gen_range(0..up.len().max(1)))
            .copied()
            .unwrap_or(1)
    }

    /// Calls `call` on member `node` and records it; `outcome` maps the answer.
    async fn record(&self, node: u64, lease: i64, call: LeaseCall) -> LeaseOutcome {
        let call_us = self.cluster.recorder.now_us();
        let outcome = match self.cluster.kv(node) {
            None => LeaseOutcome::Failed("member is down".into()),
            Some(kv) => {
                let answer = tokio::time::timeout(CLIENT_TIMEOUT, async {
                    Ok::<_, ServerError>(match &call {
                        LeaseCall::Grant { ttl } => {
                            let resp = kv
                                .lease_grant(LeaseGrantRequest {
                                    ttl: *ttl,
                                    id: lease,
                                })
                                .await?;
                            LeaseOutcome::Renewed { ttl: resp.ttl }
                        }
                        LeaseCall::Attach { key } => {
                            kv.put(PutRequest {
                                key: key.clone().into_bytes(),
                                value: b"up".to_vec(),
                                lease,
                                ..Default::default()
                            })
                            .await?;
                            LeaseOutcome::Done
                        }
                        LeaseCall::KeepAlive => match kv.lease_keep_alive(lease).await? {
                            0 => LeaseOutcome::Gone,
                            ttl => LeaseOutcome::Renewed { ttl },
                        },
                        LeaseCall::Read { key } => {
                            let resp = kv
                                .range(RangeRequest {
                                    key: key.clone().into_bytes(),
                                    ..Default::default()
                                })
                                .await?;
                            if resp.kvs.is_empty() {
                                LeaseOutcome::Absent
                            } else {
                                LeaseOutcome::Present
                            }
                        }
                        LeaseCall::Revoke => {
                            kv.lease_revoke(LeaseRevokeRequest { id: lease }).await?;
                            LeaseOutcome::Done
                        }
                    })
                })
                .await;
                match answer {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(e)) => LeaseOutcome::Failed(e.to_string()),
                    Err(_) => LeaseOutcome::Failed("client timeout".into()),
                }
            }
        };
        self.log.push(LeaseOp {
            client: self.client,
            node,
            lease,
            call,
            call_us,
            return_us: self.cluster.recorder.now_us(),
            outcome: outcome.clone(),
        });
        outcome
    }

    /// A keep-alive, tried on each running member until one leads.
    async fn keep_alive(&self, lease: i64) -> LeaseOutcome {
        let mut last = LeaseOutcome::Failed("no member up".into());
        for node in self.cluster.up_ids() {
            last = self.record(node, lease, LeaseCall::KeepAlive).await;
            if !matches!(last, LeaseOutcome::Failed(_)) {
                break;
            }
        }
        last
    }

    async fn read(&self, lease: i64, key: &str) -> LeaseOutcome {
        let node = self.pick();
        self.record(node, lease, LeaseCall::Read { key: key.into() })
            .await
    }

    /// One lease's life.
    async fn one_lease(&self, n: u64, stop: &AtomicBool) {
        let (ttl, keep_ms, revoke) = {
            let mut rng = madsim::rand::thread_rng();
            let ttl = rng.gen_range(2..=4i64);
            (
                ttl,
                rng.gen_range(0..=3 * ttl as u64 * 1000),
                rng.gen_bool(0.2),
            )
        };
        // Ids chosen by the client keep the log readable; the id space is the client's.
        let lease = ((self.client as i64) << 32) | n as i64;
        let granted = self
            .record(self.pick(), lease, LeaseCall::Grant { ttl })
            .await;
        let LeaseOutcome::Renewed { ttl } = granted else {
            tokio::time::sleep(READ_EVERY).await;
            return;
        };
        let key = format!("lease/{}.{n}", self.client);
        let attached = self
            .record(self.pick(), lease, LeaseCall::Attach { key: key.clone() })
            .await;
        if attached != LeaseOutcome::Done {
            return;
        }
        let now = || self.cluster.recorder.now_us();
        let keep_until = now() + keep_ms * 1000;
        let renew_every_us = ttl as u64 * 1_000_000 / 3;
        let mut next_renew = now() + renew_every_us;
        while now() < keep_until && !stop.load(Ordering::Relaxed) {
            if now() >= next_renew {
                if self.keep_alive(lease).await == LeaseOutcome::Gone {
                    break;
                }
                next_renew = now() + renew_every_us;
            }
            self.read(lease, &key).await;
            tokio::time::sleep(READ_EVERY).await;
        }
        if revoke {
            self.record(self.pick(), lease, LeaseCall::Revoke).await;
        }
        // Watch the key go (or give up after a while: a partition may hold the expiry back).
        let give_up = now() + (2 * ttl as u64 + 3) * 1_000_000;
        while now() < give_up && !stop.load(Ordering::Relaxed) {
            if self.read(lease, &key).await == LeaseOutcome::Absent {
                break;
            }
            tokio::time::sleep(READ_EVERY).await;
        }
    }
}

/// A lease client, until `stop` is set.
pub async fn lease_client(cluster: Cluster, log: LeaseLog, client: u64, stop: Arc<AtomicBool>) {
    let me = LeaseClient {
        cluster,
        log,
        client,
    };
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        me.one_lease(n, &stop).await;
    }
}
