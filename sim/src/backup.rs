//! The operator's backup: midway through the safety phase, under faults, it takes a backup
//! from a running member (the Snapshot RPC's image, through the same apply-loop job), then,
//! once the cluster has converged, restores it into a new store and has `check::backup` hold
//! it to what the cluster agreed on at the backup's revision.

use std::sync::Arc;
use std::time::Duration;

use madsim::rand::seq::SliceRandom;
use madsim::rand::Rng;
use quorumkv::io::MemBackend;
use quorumkv::mvcc::MvccStore;
use quorumkv::proto::etcdserverpb::RangeRequest;

use crate::check::{backup, Verdict};
use crate::cluster::Cluster;
use crate::trace::EventKind;

/// A backup: the image and the revision its member had when it was written.
#[derive(Clone, Debug)]
pub struct Backup {
    pub image: Vec<u8>,
    pub revision: i64,
    pub node: u64,
}

/// How long one attempt to take a backup may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes one backup at a random time in the middle third of `until`, retrying on another
/// member while a member is down or stops meanwhile.
pub async fn take(cluster: Cluster, until: Duration) -> Option<Backup> {
    let at_ms = madsim::rand::thread_rng()
        .gen_range(until.as_millis() as u64 / 3..=2 * until.as_millis() as u64 / 3);
    tokio::time::sleep(Duration::from_millis(at_ms)).await;
    while Duration::from_micros(cluster.recorder.now_us()) < until {
        let up = cluster.up_ids();
        let Some(node) = up.choose(&mut madsim::rand::thread_rng()).copied() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(kv) = cluster.kv(node) else { continue };
        let job = kv.with_store(|store| {
            let mut image = Vec::new();
            store
                .write_backup(&mut image)
                .map(|_| (image, store.current_rev()))
        });
        if let Ok(Ok(Ok((image, revision)))) = tokio::time::timeout(ATTEMPT_TIMEOUT, job).await {
            cluster.recorder.event(EventKind::Membership {
                description: format!(
                    "backup of n{node} at revision {revision} ({} bytes)",
                    image.len()
                ),
            });
            return Some(Backup {
                image,
                revision,
                node,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Restores `backup` into a new store and compares it with a converged member at its revision.
pub async fn verify(cluster: &Cluster, backup: Option<Backup>) -> Verdict {
    let Some(backup) = backup else {
        return Verdict {
            name: "backup",
            ok: true,
            detail: "no backup taken (no member was up long enough)".into(),
        };
    };
    let fail = |detail: String| Verdict {
        name: "backup",
        ok: false,
        detail,
    };
    let mut restored = match MvccStore::open(Arc::new(MemBackend::new())) {
        Ok(store) => store,
        Err(e) => return fail(format!("cannot open a new store: {e}")),
    };
    if let Err(e) = restored.restore(1, &backup.image) {
        return fail(format!(
            "the backup of n{} does not restore: {e}",
            backup.node
        ));
    }
    let everything = |revision: i64| RangeRequest {
        key: vec![0],
        range_end: vec![0],
        revision,
        serializable: true,
        ..Default::default()
    };
    let restored_kvs = match restored.range(&everything(0)) {
        Ok(response) => response.kvs,
        Err(e) => return fail(format!("cannot read the restored store: {e}")),
    };
    let Some(reader) = cluster
        .leader()
        .or_else(|| cluster.up_ids().first().copied())
        .and_then(|id| cluster.kv(id))
    else {
        return fail("no member up to compare the backup with".into());
    };
    let agreed = match reader.range(everything(backup.revision)).await {
        Ok(response) => response.kvs,
        Err(e) => {
            return fail(format!(
                "cannot read the cluster at revision {}: {e}",
                backup.revision
            ))
        }
    };
    backup::check(
        backup.revision,
        restored.current_rev(),
        &backup::key_space(&restored_kvs),
        &backup::key_space(&agreed),
    )
}
