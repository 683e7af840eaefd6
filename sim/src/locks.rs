//! Simulated lock clients: each takes a lease, waits for the lock `lock/m` on a member of its
//! choosing (the `v3lock` recipe the gRPC service runs), holds it a moment, and unlocks. Every
//! acquisition is recorded with the revision the member answered at, for `check::locks`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::Rng;
use quorumkv::proto::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest};

use crate::cluster::Cluster;
use crate::workload::CLIENT_TIMEOUT;

/// The lock every lock client contends for; holders' keys are `lock/m/<lease in hex>`.
pub const LOCK_NAME: &[u8] = b"lock/m";

/// A Lock call that said "you hold it".
#[derive(Clone, Debug)]
pub struct Acquired {
    pub client: u64,
    pub node: u64,
    pub key: Vec<u8>,
    /// The revision the member answered at: the holder's key was the oldest then.
    pub revision: i64,
    pub call_us: u64,
    pub return_us: u64,
}

#[derive(Clone, Default)]
pub struct LockLog {
    acquired: Arc<Mutex<Vec<Acquired>>>,
}

impl LockLog {
    pub fn acquired(&self) -> Vec<Acquired> {
        self.acquired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub async fn lock_client(cluster: Cluster, log: LockLog, client: u64, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let (node, hold) = {
            let mut rng = madsim::rand::thread_rng();
            let up = cluster.up_ids();
            let node = up.get(rng.gen_range(0..up.len().max(1))).copied();
            (node, Duration::from_millis(rng.gen_range(0..=300)))
        };
        let Some((node, kv)) = node.and_then(|n| cluster.kv(n).map(|kv| (n, kv))) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let granted = tokio::time::timeout(
            CLIENT_TIMEOUT,
            kv.lease_grant(LeaseGrantRequest { ttl: 5, id: 0 }),
        )
        .await;
        let Ok(Ok(lease)) = granted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let call_us = cluster.recorder.now_us();
        if let Ok(Ok((header, key))) =
            tokio::time::timeout(CLIENT_TIMEOUT, kv.lock(LOCK_NAME, lease.id)).await
        {
            log.acquired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Acquired {
                    client,
                    node,
                    key: key.clone(),
                    revision: header.revision,
                    call_us,
                    return_us: cluster.recorder.now_us(),
                });
            tokio::time::sleep(hold).await;
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, kv.unlock(&key)).await;
        }
        // Whatever happened, the lease goes (a key left waiting in the queue goes with it).
        let _ = tokio::time::timeout(
            CLIENT_TIMEOUT,
            kv.lease_revoke(LeaseRevokeRequest { id: lease.id }),
        )
        .await;
    }
}
