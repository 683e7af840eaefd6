//! The `etcdserverpb.Maintenance` service: Alarm, Status, Defragment, Hash, HashKV, Snapshot
//! and MoveLeader. Downgrade answers `Unimplemented` (the generated default).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::to_status;
use super::ETCD_API_VERSION;
use crate::auth::AuthError;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use crate::server::{KvServer, ServerError};

/// Bytes of the image in each `SnapshotResponse` (etcd sends 32 KiB).
pub const SNAPSHOT_CHUNK_BYTES: usize = 32 << 10;
/// Chunks read ahead of a slow snapshot client: the member's memory stays bounded.
const SNAPSHOT_CHUNKS_QUEUED: usize = 4;

pub struct MaintenanceService {
    server: KvServer,
}

impl MaintenanceService {
    pub fn new(server: KvServer) -> Self {
        MaintenanceService { server }
    }

    /// Alarm's check (GHSA-q8m4-xhhv-38mg: etcd 3.4.23 has none; the fixed releases refuse a
    /// caller without a token as `etcdserver: user name is empty`). A token it does not know
    /// is refused as etcd 3.4 refuses it here: `Unknown`, `auth: invalid auth token`.
    fn require_root_for_alarm<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let who = caller(&self.server, request).map_err(|s| {
            if s.code() == tonic::Code::Unauthenticated {
                Status::unknown("auth: invalid auth token")
            } else {
                s
            }
        })?;
        self.server
            .require_root(&who, AuthError::MaintenanceDenied)
            .map_err(to_status)
    }

    /// Everything but Status and Alarm needs root once auth is on. etcd 3.4 answers these
    /// refusals with its auth package's errors, which have no gRPC code: `Unknown`, `auth: ...`
    /// (`auth: permission denied`, `auth: invalid auth token`, `auth: user name is empty`).
    fn require_root<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let as_auth_package = |s: Status| match s.message().strip_prefix("etcdserver: ") {
            Some(what) => Status::unknown(format!("auth: {what}")),
            None => s,
        };
        let who = caller(&self.server, request).map_err(as_auth_package)?;
        self.server
            .require_root(&who, AuthError::MaintenanceDenied)
            .map_err(to_status)
            .map_err(as_auth_package)
    }

    fn header(&self) -> crate::proto::etcdserverpb::ResponseHeader {
        self.server.header(self.server.status().revision)
    }
}

/// A file name for the image being streamed, unique in this process.
fn scratch_path(dir: &std::path::Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "snapshot-{}-{}.part",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn internal(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("etcdserver: {what} {}: {e}", path.display()))
}

/// Writes a consistent image of the store into a new file at `path` (as a store job: nothing
/// is applied meanwhile) and returns a handle to read it and its size. The name is removed
/// before the job is queued, so nothing is left behind whatever becomes of the call; a file
/// left by a crash is removed at the next start (`remove_stale_images`).
async fn write_image(server: &KvServer, path: PathBuf) -> Result<(std::fs::File, u64), Status> {
    let file = std::fs::File::create(&path).map_err(|e| internal("cannot create", &path, e))?;
    let reader = std::fs::File::open(&path);
    let _ = std::fs::remove_file(&path);
    let reader = reader.map_err(|e| internal("cannot reopen", &path, e))?;
    let bytes = server
        .with_store(move |store| -> Result<u64, ServerError> {
            let mut out = std::io::BufWriter::new(file);
            let bytes = store.write_backup(&mut out)?;
            out.flush().map_err(|e| {
                crate::mvcc::MvccError::Backend(crate::io::BackendError::Store(e.to_string()))
            })?;
            Ok(bytes)
        })
        .await
        .map_err(to_status)?
        .map_err(to_status)?;
    Ok((reader, bytes))
}

/// Removes snapshot images a crash left in `dir` (their names were to be removed at once).
pub fn remove_stale_images(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snapshot-") && name.ends_with(".part") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Sends `file` (`size` bytes) as snapshot chunks, then its SHA-256 as the last chunk, as etcd
/// does: `remaining_bytes` counts the image bytes still to come.
fn stream_image(
    mut file: std::fs::File,
    size: u64,
    header: crate::proto::etcdserverpb::ResponseHeader,
    tx: tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
) {
    let mut digest = Sha256::new();
    let mut sent = 0u64;
    let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
    while sent < size {
        let want = (size - sent).min(SNAPSHOT_CHUNK_BYTES as u64) as usize;
        if let Err(e) = file.read_exact(&mut buf[..want]) {
            let _ = tx.blocking_send(Err(Status::internal(format!(
                "etcdserver: reading the snapshot image: {e}"
            ))));
            return;
        }
        digest.update(&buf[..want]);
        sent += want as u64;
        let chunk = SnapshotResponse {
            header: Some(header),
            remaining_bytes: size - sent,
            blob: buf[..want].to_vec(),
            version: ETCD_API_VERSION.to_string(),
        };
        if tx.blocking_send(Ok(chunk)).is_err() {
            return; // The client went away.
        }
    }
    let _ = tx.blocking_send(Ok(SnapshotResponse {
        header: Some(header),
        remaining_bytes: 0,
        blob: digest.finalize().to_vec(),
        version: ETCD_API_VERSION.to_string(),
    }));
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        self.require_root_for_alarm(&request)?;
        let alarms = self
            .server
            .alarm(request.into_inner())
            .await
            .map_err(to_status)?;
        // etcd 3.4 answers an Alarm request without a header.
        Ok(Response::new(AlarmResponse {
            header: None,
            alarms,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let report = self.server.status();
        // As etcd: no leader first, then the alarms.
        let mut errors = Vec::new();
        if report.leader == 0 {
            errors.push("etcdserver: no leader".to_string());
        }
        errors.extend(report.alarms);
        Ok(Response::new(StatusResponse {
            header: Some(self.server.header(report.revision)),
            version: super::STATUS_VERSION.to_string(),
            db_size: report.db_size,
            leader: report.leader,
            raft_index: report.raft_index,
            raft_term: report.raft_term,
            raft_applied_index: report.raft_applied_index,
            errors,
            db_size_in_use: report.db_size_in_use,
            is_learner: self.server.is_learner(),
        }))
    }

    /// Rewrites this member's backend compactly. Unlike etcd's, reads and writes go on
    /// meanwhile: they wait only for the final swap of the copy into place.
    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.require_root(&request)?;
        let before = self.server.status().db_size;
        // Everything applied so far (a compaction's deletions above all) goes to the backend
        // first, so the copy leaves out what was deleted.
        self.server.with_store(|_| ()).await.map_err(to_status)?;
        let backend = self.server.backend();
        tokio::task::spawn_blocking(move || backend.defragment())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: defragmentation failed: {e}")))?
            .map_err(|e| to_status(ServerError::Mvcc(e.into())))?;
        tracing::info!(
            before_bytes = before,
            after_bytes = self.server.status().db_size,
            "defragmented the backend"
        );
        // etcd 3.4 answers a defragmentation without a header.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.require_root(&request)?;
        let (hash, revision) = self.server.hash_backend().await.map_err(to_status)?;
        Ok(Response::new(HashResponse {
            header: Some(self.server.header(revision)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.require_root(&request)?;
        let hash = self
            .server
            .hash_kv(request.get_ref().revision)
            .await
            .map_err(to_status)?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.header()),
            hash: hash.hash,
            // etcd 3.4 names -1 for a store never compacted.
            compact_revision: if hash.compact_revision == 0 {
                -1
            } else {
                hash.compact_revision
            },
            hash_revision: hash.hash_revision,
        }))
    }

    /// A consistent image of this member's store, streamed in chunks from a file written
    /// first (the member's memory does not grow with the store), SHA-256 last.
    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<BoxStream<SnapshotResponse>>, Status> {
        self.require_root(&request)?;
        let path = scratch_path(&self.server.config().scratch_dir);
        let (file, size) = write_image(&self.server, path).await?;
        tracing::info!(
            bytes = size,
            "sending a snapshot of the backend to a client"
        );
        let header = self.header();
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_CHUNKS_QUEUED);
        std::thread::spawn(move || stream_image(file, size, header, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Must be sent to the leader (etcdctl finds it), as with etcd.
    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.require_root(&request)?;
        self.server
            .move_leader(request.get_ref().target_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(MoveLeaderResponse {
            header: Some(self.header()),
        }))
    }
}
