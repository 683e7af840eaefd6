//! The snapshot tool, etcdutl's verbs: `save` a running member's image to a file, `status` of
//! a file, and `restore` of a file into the data dir of a member of a new cluster.
//!
//! A snapshot file is what `Maintenance.Snapshot` streams (and what `etcdctl snapshot save`
//! writes): the store's image (`mvcc::write_image`, ended and padded to 512 bytes), then the
//! SHA-256 of the image (32 bytes). Every verb checks the hash before it reads the image.

mod cli;

pub use cli::{run as run_cli, SnapshotVerb};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::cluster::{new_cluster_members, Members, MEMBER_RECORD_PREFIX};
use crate::io::{Backend, SledBackend, WriteBatch};
use crate::mvcc::{
    encode_u64, meta_key, parse_run_key, records, ImageReader, MvccStore, IMAGE_ALIGN,
    META_CONSISTENT_INDEX,
};
use crate::raft::BOOTSTRAP_INDEX;

const SHA256_BYTES: u64 = 32;
/// Backend keys written per batch by `restore`.
const RESTORE_BATCH_KEYS: usize = 4096;

/// What `status` reports of a snapshot file (etcdutl's columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStatus {
    /// CRC32C of the image.
    pub hash: u32,
    /// The newest revision in the image.
    pub revision: i64,
    /// Revision records (every version of every key still kept, tombstones included).
    pub total_keys: u64,
    /// The file's size in bytes.
    pub total_size: u64,
}

/// A file that is not a whole snapshot file, named with what is wrong.
fn bad(path: &Path, what: impl std::fmt::Display) -> String {
    format!("snapshot file {}: {what}", path.display())
}

/// Checks the file's length and SHA-256 trailer; returns the image's length.
pub fn verify_file(path: &Path) -> Result<u64, String> {
    let mut file = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    let size = file.metadata().map_err(|e| bad(path, e))?.len();
    if size < SHA256_BYTES || !(size - SHA256_BYTES).is_multiple_of(IMAGE_ALIGN) {
        return Err(bad(
            path,
            format!("{size} bytes is not an image and its SHA-256 (truncated or not a snapshot)"),
        ));
    }
    let image_len = size - SHA256_BYTES;
    let mut digest = Sha256::new();
    let mut left = image_len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..want])
            .map_err(|e| bad(path, e))?;
        digest.update(&buf[..want]);
        left -= want as u64;
    }
    let mut trailer = [0u8; SHA256_BYTES as usize];
    file.read_exact(&mut trailer).map_err(|e| bad(path, e))?;
    if digest.finalize().as_slice() != trailer {
        return Err(bad(path, "SHA-256 mismatch: the file is damaged"));
    }
    Ok(image_len)
}

/// The image's pairs, from a verified file, read a buffer at a time.
fn image_reader(path: &Path, image_len: u64) -> Result<ImageReader<impl Read>, String> {
    let file = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    Ok(ImageReader::new(std::io::BufReader::new(
        file.take(image_len),
    )))
}

/// etcdutl's `snapshot status`: checks the file whole, then counts what it holds.
pub fn status(path: &Path) -> Result<ImageStatus, String> {
    let image_len = verify_file(path)?;
    let mut reader = image_reader(path, image_len)?;
    let mut hash = 0u32;
    let mut revision = 0i64;
    let mut total_keys = 0u64;
    while let Some((key, value)) = reader.next_pair().map_err(|e| bad(path, e))? {
        hash = crc32c::crc32c_append(hash, &key);
        hash = crc32c::crc32c_append(hash, &value);
        if parse_run_key(&key).is_some() {
            for record in records(&value) {
                let (rev, _) = record.map_err(|e| bad(path, e))?;
                revision = revision.max(rev.main);
                total_keys += 1;
            }
        }
    }
    Ok(ImageStatus {
        hash,
        revision,
        total_keys,
        total_size: image_len + SHA256_BYTES,
    })
}

/// What `restore` built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub member_id: u64,
    pub cluster_id: u64,
    pub revision: i64,
}

/// etcdutl's `snapshot restore`: a data dir at `data_dir` (which must not exist) for member
/// `name` of a new cluster of `members` (`--initial-cluster`) and `token`: the file's keys,
/// leases and revisions; the new membership; no alarms. The members start with the same
/// `--name`, `--initial-cluster` and `--initial-cluster-token`, and serve the file's revision.
/// The file is checked whole first; on any failure nothing is left at `data_dir`.
pub fn restore(
    path: &Path,
    data_dir: &Path,
    name: &str,
    members: &[(String, Vec<String>)],
    token: &str,
) -> Result<Restored, String> {
    if data_dir.exists() {
        return Err(format!("data-dir {:?} exists", data_dir.display()));
    }
    let (cluster_id, initial) = new_cluster_members(members, token);
    let member_id = initial
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.id)
        .ok_or_else(|| format!("couldn't find local name {name:?} in --initial-cluster"))?;
    let image_len = verify_file(path)?;
    let staging = staging_dir(data_dir);
    let built = build_data_dir(path, image_len, &staging, Members::new(initial));
    let revision = match built {
        Ok(revision) => revision,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    std::fs::rename(&staging, data_dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        format!(
            "cannot move {} to {}: {e}",
            staging.display(),
            data_dir.display()
        )
    })?;
    Ok(Restored {
        member_id,
        cluster_id,
        revision,
    })
}

fn staging_dir(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(format!(".restoring-{}", std::process::id()));
    PathBuf::from(name)
}

/// Writes the backend at `<staging>/member/db`; returns the revision it serves.
fn build_data_dir(
    path: &Path,
    image_len: u64,
    staging: &Path,
    members: Members,
) -> Result<i64, String> {
    let db_path = staging.join("member").join("db");
    std::fs::create_dir_all(staging.join("member"))
        .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
    let backend = Arc::new(
        SledBackend::open(&db_path).map_err(|e| format!("cannot create the backend: {e}"))?,
    );
    let skipped = [
        meta_key(MEMBER_RECORD_PREFIX),
        meta_key(crate::alarm::ALARM_RECORD_PREFIX),
    ];
    let consistent_index = meta_key(META_CONSISTENT_INDEX);
    let mut reader = image_reader(path, image_len)?;
    let mut batch = WriteBatch::default();
    while let Some((key, value)) = reader.next_pair().map_err(|e| bad(path, e))? {
        if key == consistent_index || skipped.iter().any(|prefix| key.starts_with(prefix)) {
            continue;
        }
        batch.put(key, value);
        if batch.ops.len() >= RESTORE_BATCH_KEYS {
            backend
                .apply(std::mem::take(&mut batch))
                .map_err(|e| e.to_string())?;
        }
    }
    for (name, value) in members.records() {
        if let Some(value) = value {
            batch.put(meta_key(&name), value);
        }
    }
    batch.put(meta_key(META_CONSISTENT_INDEX), encode_u64(BOOTSTRAP_INDEX));
    backend.apply(batch).map_err(|e| e.to_string())?;
    backend.flush().map_err(|e| e.to_string())?;
    // Opening the store reads every revision record back: a damaged image fails here.
    let store = MvccStore::open(backend).map_err(|e| bad(path, e))?;
    Ok(store.current_rev())
}

/// etcdctl's `snapshot save` against `endpoint`: streams the member's image into `path`
/// (through `<path>.part`, renamed once whole, synced and its SHA-256 checked).
pub async fn save(endpoint: &str, path: &Path) -> Result<u64, String> {
    use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use crate::proto::etcdserverpb::SnapshotRequest;
    let endpoint = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let mut client = MaintenanceClient::connect(endpoint.clone())
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?
        .max_decoding_message_size(usize::MAX);
    let mut stream = client
        .snapshot(SnapshotRequest {})
        .await
        .map_err(|e| format!("{endpoint}: {}", e.message()))?
        .into_inner();
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut file = std::fs::File::create(&part).map_err(|e| bad(&part, e))?;
    let mut size = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                file.write_all(&chunk.blob).map_err(|e| bad(&part, e))?;
                size += chunk.blob.len() as u64;
            }
            Ok(None) => break,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(format!("{endpoint}: {}", e.message()));
            }
        }
    }
    file.sync_all().map_err(|e| bad(&part, e))?;
    drop(file);
    if let Err(e) = verify_file(&part) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, path).map_err(|e| bad(path, e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{PutRequest, RangeRequest};
    use crate::proto::quorumkvpb::raft_request::Request;

    /// A snapshot file of a store with `keys` keys, as the Snapshot RPC writes it.
    fn snapshot_file(dir: &Path, keys: usize) -> PathBuf {
        let backend = Arc::new(crate::io::MemBackend::new());
        let mut store = MvccStore::open(backend).expect("open");
        for i in 0..keys {
            let put = PutRequest {
                key: format!("key{i}").into_bytes(),
                value: vec![b'v'; 100],
                ..Default::default()
            };
            store.apply(i as u64 + 2, &Request::Put(put)).expect("put");
        }
        let mut image = Vec::new();
        store.flush_staged().expect("flush");
        store.write_backup(&mut image).expect("image");
        let sha = Sha256::digest(&image);
        image.extend_from_slice(&sha);
        let path = dir.join("snap.db");
        std::fs::write(&path, &image).expect("write");
        path
    }

    fn one_member() -> Vec<(String, Vec<String>)> {
        vec![("a".into(), vec!["http://127.0.0.1:2380".into()])]
    }

    #[test]
    fn restore_builds_a_store_at_the_files_revision_with_the_new_membership() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = snapshot_file(dir.path(), 50);
        let report = status(&file).expect("status");
        assert_eq!((report.revision, report.total_keys), (51, 50));
        let data_dir = dir.path().join("restored");
        let restored = restore(&file, &data_dir, "a", &one_member(), "tok").expect("restore");
        assert_eq!(restored.revision, 51);
        let backend = Arc::new(SledBackend::open(&data_dir.join("member/db")).expect("open"));
        let store = MvccStore::open(backend).expect("store");
        assert_eq!(store.consistent_index(), BOOTSTRAP_INDEX);
        let members = Members::load(&store).expect("members");
        assert_eq!(members.list().len(), 1);
        assert_eq!(members.list()[0].id, restored.member_id);
        let got = store
            .range(&RangeRequest {
                key: b"key7".to_vec(),
                ..Default::default()
            })
            .expect("range");
        assert_eq!(got.kvs[0].value, vec![b'v'; 100]);
    }

    #[test]
    fn a_truncated_or_damaged_file_is_refused_by_name_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = snapshot_file(dir.path(), 20);
        let bytes = std::fs::read(&file).expect("read");
        let data_dir = dir.path().join("restored");
        let truncated = dir.path().join("truncated.db");
        std::fs::write(&truncated, &bytes[..bytes.len() - 100]).expect("write");
        let e = restore(&truncated, &data_dir, "a", &one_member(), "tok").expect_err("refused");
        assert!(e.contains("truncated.db") && e.contains("truncated"), "{e}");
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        let damaged = dir.path().join("damaged.db");
        std::fs::write(&damaged, &flipped).expect("write");
        let e = restore(&damaged, &data_dir, "a", &one_member(), "tok").expect_err("refused");
        assert!(e.contains("damaged.db") && e.contains("SHA-256"), "{e}");
        assert!(!data_dir.exists(), "nothing written");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("restoring"))
            .collect();
        assert!(leftovers.is_empty());
        let e = restore(&file, &data_dir, "b", &one_member(), "tok").expect_err("no such name");
        assert!(e.contains("\"b\""), "{e}");
    }
}
