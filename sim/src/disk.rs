//! The simulated `Disk`: files in memory with a live and a durable image, so that a crash can
//! keep exactly what was fsynced, plus (as a real page cache may) a prefix of the writes made
//! since, the last of them possibly torn. Names (create, rename, remove) become durable with
//! `sync_dir` of their directory, as the port's contract says.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use quorumkv::io::{Disk, DiskFile};
use rand::Rng;

type Ino = u64;

/// A change not yet synced: replayed in order on a crash, up to a random point.
#[derive(Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

#[derive(Default)]
struct Fs {
    live_names: BTreeMap<PathBuf, Ino>,
    durable_names: BTreeMap<PathBuf, Ino>,
    dirs: BTreeSet<PathBuf>,
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
}

/// What a crash did to one node's disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// Unsynced changes thrown away.
    pub lost_changes: usize,
    /// Files whose last surviving write was torn.
    pub torn_files: usize,
}

/// An operation the disk can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Write,
    Sync,
    Rename,
}

/// How it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// ENOSPC: the device is full.
    NoSpace,
    /// EIO: the device failed.
    Io,
}

impl FaultError {
    fn to_io(self) -> io::Error {
        // Linux's numbers, so that the node reads them as it reads the real ones.
        match self {
            FaultError::NoSpace => io::Error::from_raw_os_error(28),
            FaultError::Io => io::Error::from_raw_os_error(5),
        }
    }
}

/// A fault armed on a disk: every `op` on a file of the durable log (a WAL segment or a
/// snapshot) fails with `error` until cleared, as a full or broken device does.
#[derive(Default)]
struct Faults {
    armed: Option<(FaultOp, FaultError)>,
    /// What failed first, once something did.
    fired: Option<String>,
    /// The error the node stopped with, once it did.
    stopped: Option<String>,
}

/// One node's disk. Clones share the files.
#[derive(Clone, Default)]
pub struct SimDisk {
    fs: Arc<Mutex<Fs>>,
    faults: Arc<Mutex<Faults>>,
}

/// Whether `path` is a file of the durable log: the files whose failures must stop a node.
fn in_durable_log(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext == "wal" || ext == "snap")
}

fn check_fault(faults: &Mutex<Faults>, op: FaultOp, path: &Path) -> io::Result<()> {
    let mut faults = faults.lock().unwrap_or_else(|p| p.into_inner());
    match faults.armed {
        Some((armed, error)) if armed == op && in_durable_log(path) => {
            let e = error.to_io();
            if faults.fired.is_none() {
                faults.fired = Some(format!("{op:?} of {}: {e}", path.display()));
            }
            Err(e)
        }
        _ => Ok(()),
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

fn apply(image: &mut Vec<u8>, change: &Pending) {
    match change {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*offset as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => image.resize(*len as usize, 0),
    }
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Fs> {
        self.fs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on every `op` on the durable log fails with `error`, until [`Self::clear_fault`].
    /// Refused (`false`) while an earlier fault is armed: one at a time, each seen through.
    pub fn arm_fault(&self, op: FaultOp, error: FaultError) -> bool {
        let mut faults = self.faults();
        if faults.armed.is_some() || faults.stopped.is_some() {
            return false;
        }
        *faults = Faults {
            armed: Some((op, error)),
            ..Faults::default()
        };
        true
    }

    /// The device works again (space was freed, the disk replaced).
    pub fn clear_fault(&self) {
        *self.faults() = Faults::default();
    }

    /// What failed, once an armed fault did.
    pub fn fault_fired(&self) -> Option<String> {
        self.faults().fired.clone()
    }

    /// The node stopped with `error` after a fault fired.
    pub fn note_stopped(&self, error: String) {
        self.faults().stopped = Some(error);
    }

    /// The error the node stopped with after a fault, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.faults().stopped.clone()
    }

    /// A power loss: every file keeps its durable image plus a random prefix of the changes
    /// made since its last sync, the last kept write possibly cut short (`tear`); names go
    /// back to their durable state.
    pub fn crash(&self, rng: &mut impl Rng, tear: bool) -> CrashReport {
        let mut fs = self.lock();
        let mut report = CrashReport::default();
        let mut inos: Vec<Ino> = fs.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(inode) = fs.inodes.get_mut(&ino) else {
                continue;
            };
            let pending = std::mem::take(&mut inode.pending);
            let kept = if pending.is_empty() {
                0
            } else {
                rng.gen_range(0..=pending.len())
            };
            report.lost_changes += pending.len() - kept;
            let mut image = std::mem::take(&mut inode.durable);
            for change in &pending[..kept] {
                apply(&mut image, change);
            }
            if tear && kept < pending.len() && rng.gen_bool(0.5) {
                if let Pending::Write { offset, data } = &pending[kept] {
                    let cut = rng.gen_range(0..data.len().max(1));
                    apply(
                        &mut image,
                        &Pending::Write {
                            offset: *offset,
                            data: data[..cut].to_vec(),
                        },
                    );
                    report.torn_files += 1;
                }
            }
            inode.live = image.clone();
            inode.durable = image;
        }
        fs.live_names = fs.durable_names.clone();
        let referenced: BTreeSet<Ino> = fs.live_names.values().copied().collect();
        fs.inodes.retain(|ino, _| referenced.contains(ino));
        report
    }
}

struct SimFile {
    fs: Arc<Mutex<Fs>>,
    faults: Arc<Mutex<Faults>>,
    path: PathBuf,
    ino: Ino,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut Inode) -> T) -> io::Result<T> {
        let mut fs = self.fs.lock().unwrap_or_else(|p| p.into_inner());
        let inode = fs
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "file lost in a crash"))?;
        Ok(f(inode))
    }
}

impl DiskFile for SimFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        check_fault(&self.faults, FaultOp::Write, &self.path)?;
        self.with(|inode| {
            let change = Pending::Write {
                offset,
                data: data.to_vec(),
            };
            apply(&mut inode.live, &change);
            inode.pending.push(change);
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|inode| {
            let start = (offset as usize).min(inode.live.len());
            let n = buf.len().min(inode.live.len() - start);
            buf[..n].copy_from_slice(&inode.live[start..start + n]);
            n
        })
    }

    fn sync_data(&mut self) -> io::Result<()> {
        // The changes stay unsynced: a crash may drop them.
        check_fault(&self.faults, FaultOp::Sync, &self.path)?;
        self.with(|inode| {
            for change in std::mem::take(&mut inode.pending) {
                apply(&mut inode.durable, &change);
            }
            debug_assert!(inode.durable == inode.live);
        })
    }

    fn allocate(&mut self, len: u64) -> io::Result<()> {
        // A device that cannot take writes cannot take a preallocation either.
        check_fault(&self.faults, FaultOp::Write, &self.path)?;
        self.with(|inode| {
            if (inode.live.len() as u64) < len {
                let change = Pending::SetLen(len);
                apply(&mut inode.live, &change);
                inode.pending.push(change);
            }
        })
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.with(|inode| {
            let change = Pending::SetLen(len);
            apply(&mut inode.live, &change);
            inode.pending.push(change);
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|inode| inode.live.len() as u64)
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        for ancestor in dir.ancestors() {
            if !ancestor.as_os_str().is_empty() {
                fs.dirs.insert(ancestor.to_path_buf());
            }
        }
        Ok(())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        let mut fs = self.lock();
        let ino = match fs.live_names.get(path) {
            Some(ino) => *ino,
            None if create => {
                let parent = path.parent().unwrap_or(Path::new(""));
                if !parent.as_os_str().is_empty() && !fs.dirs.contains(parent) {
                    return Err(not_found(parent));
                }
                fs.next_ino += 1;
                let ino = fs.next_ino;
                fs.inodes.insert(ino, Inode::default());
                fs.live_names.insert(path.to_path_buf(), ino);
                ino
            }
            None => return Err(not_found(path)),
        };
        Ok(Box::new(SimFile {
            fs: self.fs.clone(),
            faults: self.faults.clone(),
            path: path.to_path_buf(),
            ino,
        }))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let fs = self.lock();
        if !fs.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(fs
            .live_names
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        check_fault(&self.faults, FaultOp::Rename, to)?;
        let mut fs = self.lock();
        let ino = fs.live_names.remove(from).ok_or_else(|| not_found(from))?;
        fs.live_names.insert(to.to_path_buf(), ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        fs.live_names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        let fs = &mut *fs;
        fs.durable_names
            .retain(|path, _| path.parent() != Some(dir));
        for (path, ino) in &fs.live_names {
            if path.parent() == Some(dir) {
                fs.durable_names.insert(path.clone(), *ino);
            }
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let fs = self.lock();
        fs.live_names.contains_key(path) || fs.dirs.contains(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sim_disk_passes_conformance() {
        let disk = SimDisk::new();
        let root = Path::new("/sim");
        disk.create_dir_all(root).expect("root");
        quorumkv::io::disk::conformance::run_all(&disk, root);
    }

    #[test]
    fn an_armed_fault_fails_the_durable_log_only_until_cleared() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).expect("dir");
        let mut wal = disk.open(&dir.join("1.wal"), true).expect("open");
        let mut other = disk.open(&dir.join("image.part"), true).expect("open");
        wal.write_at(0, b"before").expect("write");
        assert!(disk.arm_fault(FaultOp::Sync, FaultError::NoSpace));
        assert!(
            !disk.arm_fault(FaultOp::Write, FaultError::Io),
            "one at a time"
        );
        let e = wal.sync_data().expect_err("armed");
        assert_eq!(e.raw_os_error(), Some(28));
        assert!(disk.fault_fired().is_some_and(|f| f.contains("1.wal")));
        other.write_at(0, b"x").expect("other files work");
        other.sync_data().expect("other files work");
        // What the failed sync left unsynced is lost in a crash.
        disk.crash(&mut rand::rngs::StdRng::seed_from_u64(3), false);
        assert!(
            !disk.exists(&dir.join("1.wal")),
            "its name was never synced"
        );
        disk.clear_fault();
        let mut wal = disk.open(&dir.join("1.wal"), true).expect("open");
        wal.write_at(0, b"after").expect("write");
        wal.sync_data().expect("mended");
        assert!(disk.arm_fault(FaultOp::Rename, FaultError::Io));
        let e = disk
            .rename(&dir.join("image.part"), &dir.join("2.snap"))
            .expect_err("armed");
        assert_eq!(e.raw_os_error(), Some(5));
    }

    #[test]
    fn a_crash_keeps_synced_bytes_and_drops_unsynced_names() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).expect("dir");
        let mut file = disk.open(&dir.join("a"), true).expect("open");
        file.write_at(0, b"synced").expect("write");
        file.sync_data().expect("sync");
        disk.sync_dir(dir).expect("sync dir");
        file.write_at(6, b" and not").expect("write");
        drop(disk.open(&dir.join("b"), true).expect("create b"));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        // Try until a crash drops the unsynced write (a prefix may survive).
        let mut dropped = false;
        for _ in 0..20 {
            let copy = SimDisk::new();
            {
                let mut fs = copy.lock();
                let src = disk.lock();
                fs.live_names = src.live_names.clone();
                fs.durable_names = src.durable_names.clone();
                fs.dirs = src.dirs.clone();
                for (ino, inode) in &src.inodes {
                    fs.inodes.insert(
                        *ino,
                        Inode {
                            live: inode.live.clone(),
                            durable: inode.durable.clone(),
                            pending: inode.pending.clone(),
                        },
                    );
                }
            }
            copy.crash(&mut rng, true);
            assert!(!copy.exists(&dir.join("b")), "an unsynced name survived");
            let bytes = copy.read_all(&dir.join("a")).expect("a survives");
            assert!(bytes.starts_with(b"synced"), "synced bytes lost");
            dropped |= bytes == b"synced";
        }
        assert!(dropped, "no crash ever dropped the unsynced write");
    }
}
