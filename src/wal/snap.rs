//! The raft snapshot file store.
//!
//! Once a snapshot is durable here the WAL may release the entries it covers, so a snapshot
//! file must be all there or not there at all (written with `Disk::write_atomic`) and must prove
//! it is intact when read back (a CRC over its contents). A damaged newest snapshot is skipped
//! in favour of an older one; whether the WAL still reaches back far enough is the WAL's
//! `Gap` check.
//!
//! File: `<dir>/<term:016x>-<index:016x>.snap` holding
//! `[magic 8 bytes][payload_len u64 LE][crc32c(payload_len LE ++ payload) u32 LE][4 zero bytes]`
//! followed by the protobuf `eraftpb::Snapshot`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protobuf::Message;
use raft::eraftpb::Snapshot;

use crate::io::Disk;

use super::segment::read_bounded;
use super::WalError;

/// The largest snapshot payload saved or loaded (protobuf messages stay below 2 GiB).
pub const MAX_SNAPSHOT_BYTES: u64 = (2 << 30) - 1;
const MAGIC: &[u8; 8] = b"QKVSNAP1";
const HEADER_BYTES: usize = 24;
const SNAP_SUFFIX: &str = ".snap";
const NAME_DIGITS: usize = 16;

/// Snapshot files in one directory.
pub struct SnapStore {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
}

/// (term, index) parsed from a snapshot file name.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SNAP_SUFFIX)?;
    let (term, index) = stem.split_once('-')?;
    let hex = |s: &str| {
        (s.len() == NAME_DIGITS && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
        u64::from_str_radix(s, 16).ok()
    };
    Some((hex(term)?, hex(index)?))
}

fn file_name(term: u64, index: u64) -> String {
    format!("{term:016x}-{index:016x}{SNAP_SUFFIX}")
}

fn frame_crc(payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&(payload.len() as u64).to_le_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Checks a snapshot file's framing and contents against the (term, index) of its name.
fn decode(bytes: &[u8], term: u64, index: u64) -> Result<Snapshot, String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!(
            "file of {} bytes is shorter than a header",
            bytes.len()
        ));
    }
    let (header, payload) = bytes.split_at(HEADER_BYTES);
    if &header[0..8] != MAGIC {
        return Err("bad magic".to_string());
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&header[8..16]);
    let len = u64::from_le_bytes(word);
    if len != payload.len() as u64 {
        return Err(format!(
            "header says {len} payload bytes, file has {}",
            payload.len()
        ));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&header[16..20]);
    let crc = u32::from_le_bytes(crc);
    if header[20..24] != [0, 0, 0, 0] || crc != frame_crc(payload) {
        return Err("crc mismatch".to_string());
    }
    let snapshot =
        Snapshot::parse_from_bytes(payload).map_err(|e| format!("does not decode: {e}"))?;
    let metadata = snapshot.get_metadata();
    if (metadata.term, metadata.index) != (term, index) {
        return Err(format!(
            "holds term {} index {}, not what its name says",
            metadata.term, metadata.index
        ));
    }
    Ok(snapshot)
}

impl SnapStore {
    /// A store in `dir`, created (durably) when missing.
    pub fn new(disk: Arc<dyn Disk>, dir: &Path) -> Result<SnapStore, WalError> {
        let io = |source| WalError::Io {
            op: "create directory",
            file: dir.to_path_buf(),
            source,
        };
        if !disk.exists(dir) {
            disk.create_dir_all(dir).map_err(io)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                disk.sync_dir(parent).map_err(|source| WalError::Io {
                    op: "fsync directory",
                    file: parent.to_path_buf(),
                    source,
                })?;
            }
        }
        Ok(SnapStore {
            disk,
            dir: dir.to_path_buf(),
        })
    }

    /// Writes the snapshot durably and atomically as `<term>-<index>.snap`. Index 0 is allowed
    /// only for a new member's bootstrap configuration (a snapshot with voters and no data).
    pub fn save(&self, snapshot: &Snapshot) -> Result<(), WalError> {
        let metadata = snapshot.get_metadata();
        let (term, index) = (metadata.term, metadata.index);
        if index == 0 && metadata.get_conf_state().voters.is_empty() {
            debug_assert!(false, "saving an empty snapshot");
            return Err(WalError::Invalid {
                reason: "snapshot at index 0".to_string(),
            });
        }
        let mut bytes = vec![0u8; HEADER_BYTES];
        snapshot
            .write_to_vec(&mut bytes)
            .map_err(|e| WalError::Invalid {
                reason: format!("snapshot does not encode: {e}"),
            })?;
        let payload_len = (bytes.len() - HEADER_BYTES) as u64;
        if payload_len > MAX_SNAPSHOT_BYTES {
            return Err(WalError::TooLarge {
                what: "snapshot",
                bytes: payload_len,
                max: MAX_SNAPSHOT_BYTES,
            });
        }
        let crc = frame_crc(&bytes[HEADER_BYTES..]);
        bytes[0..8].copy_from_slice(MAGIC);
        bytes[8..16].copy_from_slice(&payload_len.to_le_bytes());
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
        debug_assert!(decode(&bytes, term, index).is_ok(), "snapshot reads back");
        let path = self.dir.join(file_name(term, index));
        self.disk
            .write_atomic(&path, &bytes)
            .map_err(|source| WalError::Io {
                op: "write",
                file: path,
                source,
            })
    }

    /// The newest snapshot that reads back intact; broken ones are logged and skipped.
    pub fn load_newest(&self) -> Result<Option<Snapshot>, WalError> {
        for (term, index) in self.newest_first()? {
            let path = self.dir.join(file_name(term, index));
            let file = self
                .disk
                .open(&path, false)
                .map_err(|source| WalError::Io {
                    op: "open",
                    file: path.clone(),
                    source,
                })?;
            let decoded = match read_bounded(
                file.as_ref(),
                &path,
                HEADER_BYTES as u64 + MAX_SNAPSHOT_BYTES,
            ) {
                Ok(bytes) => decode(&bytes, term, index),
                Err(WalError::Corrupt { reason, .. }) => Err(reason),
                Err(other) => return Err(other),
            };
            match decoded {
                Ok(snapshot) => return Ok(Some(snapshot)),
                Err(reason) => tracing::warn!(
                    file = %path.display(),
                    %reason,
                    "wal: skipping a broken snapshot file"
                ),
            }
        }
        Ok(None)
    }

    /// Removes all but the newest `keep` snapshot files.
    pub fn purge(&self, keep: usize) -> Result<(), WalError> {
        debug_assert!(
            keep > 0,
            "purging every snapshot loses what the WAL released"
        );
        let names = self.newest_first()?;
        if names.len() <= keep {
            return Ok(());
        }
        for (term, index) in &names[keep..] {
            let path = self.dir.join(file_name(*term, *index));
            self.disk.remove(&path).map_err(|source| WalError::Io {
                op: "remove",
                file: path,
                source,
            })?;
        }
        self.disk
            .sync_dir(&self.dir)
            .map_err(|source| WalError::Io {
                op: "fsync directory",
                file: self.dir.clone(),
                source,
            })
    }

    /// (term, index) of every snapshot file, newest (highest index, then term) first.
    fn newest_first(&self) -> Result<Vec<(u64, u64)>, WalError> {
        let names = self.disk.list(&self.dir).map_err(|source| WalError::Io {
            op: "list",
            file: self.dir.clone(),
            source,
        })?;
        let mut snaps: Vec<(u64, u64)> = names.iter().filter_map(|n| parse_name(n)).collect();
        snaps.sort_by_key(|(term, index)| std::cmp::Reverse((*index, *term)));
        Ok(snaps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::StdDisk;

    fn snapshot(term: u64, index: u64, data: &[u8]) -> Snapshot {
        let mut snapshot = Snapshot {
            data: data.to_vec().into(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.term = term;
        metadata.index = index;
        metadata.mut_conf_state().voters = vec![1, 2, 3];
        snapshot
    }

    fn store(dir: &Path) -> SnapStore {
        SnapStore::new(StdDisk::shared(), &dir.join("snap")).unwrap()
    }

    #[test]
    fn saved_snapshots_load_back_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path());
        assert_eq!(store.load_newest().unwrap(), None);
        store.save(&snapshot(1, 10, b"old")).unwrap();
        store.save(&snapshot(2, 20, b"new")).unwrap();
        store.save(&snapshot(1, 15, b"mid")).unwrap();
        assert_eq!(store.load_newest().unwrap(), Some(snapshot(2, 20, b"new")));
        assert!(tmp
            .path()
            .join("snap/0000000000000002-0000000000000014.snap")
            .exists());
    }

    #[test]
    fn purge_keeps_only_the_newest_snapshots() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path());
        for index in 1..=5 {
            store.save(&snapshot(1, index * 10, b"x")).unwrap();
        }
        store.purge(2).unwrap();
        assert_eq!(store.newest_first().unwrap(), [(1, 50), (1, 40)]);
        store.purge(2).unwrap();
        assert_eq!(store.load_newest().unwrap(), Some(snapshot(1, 50, b"x")));
    }

    #[test]
    fn corrupted_newest_snapshot_falls_back_to_the_older_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path());
        store.save(&snapshot(1, 10, b"older state")).unwrap();
        store.save(&snapshot(1, 20, b"newer state")).unwrap();
        let newest = tmp.path().join("snap").join(file_name(1, 20));
        let pristine = std::fs::read(&newest).unwrap();
        for at in 0..pristine.len() {
            let mut bytes = pristine.clone();
            bytes[at] ^= 0x40;
            std::fs::write(&newest, &bytes).unwrap();
            assert_eq!(
                store.load_newest().unwrap(),
                Some(snapshot(1, 10, b"older state")),
                "flip at byte {at} not detected"
            );
        }
        std::fs::write(&newest, &pristine[..pristine.len() - 1]).unwrap();
        assert_eq!(
            store.load_newest().unwrap(),
            Some(snapshot(1, 10, b"older state"))
        );
    }

    #[test]
    fn snapshot_file_renamed_to_another_index_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path());
        store.save(&snapshot(1, 10, b"a")).unwrap();
        let dir = tmp.path().join("snap");
        std::fs::copy(dir.join(file_name(1, 10)), dir.join(file_name(1, 30))).unwrap();
        assert_eq!(store.load_newest().unwrap(), Some(snapshot(1, 10, b"a")));
    }
}
