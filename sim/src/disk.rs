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

/// One node's disk. Clones share the files.
#[derive(Clone, Default)]
pub struct SimDisk {
    fs: Arc<Mutex<Fs>>,
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
        self.with(|inode| {
            for change in std::mem::take(&mut inode.pending) {
                apply(&mut inode.durable, &change);
            }
            debug_assert!(inode.durable == inode.live);
        })
    }

    fn allocate(&mut self, len: u64) -> io::Result<()> {
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
