//! The `Disk` port: the files the WAL and the snapshot store live in.
//!
//! Everything durable that is not the backend goes through this trait, so that the simulator
//! can keep a `durable` and a `live` image of every file and decide, on a crash, which unsynced
//! bytes survive.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One open file.
///
/// Contract:
/// - `write_at` changes the live contents at once; the bytes are durable only after a
///   `sync_data` that returns `Ok` (a crash before that may keep none, some or all of them, and
///   may tear the last write).
/// - `read_at` sees every completed `write_at`, synced or not.
/// - `allocate` reserves `len` bytes (reading zeros where nothing was written) and makes the
///   size durable with the next `sync_data`.
pub trait DiskFile: Send + Sync {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at the end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
    fn allocate(&mut self, len: u64) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;

    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// A file system.
///
/// Contract: `create_dir_all`, `rename` and `remove` are durable once `sync_dir` of the parent
/// returns `Ok`. `rename` is atomic: after a crash the target holds the old or the new file.
/// `list` returns the names (not paths) of the regular files in a directory, sorted.
pub trait Disk: Send + Sync {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Opens a file for reading and writing, creating it (empty) when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>>;
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;

    /// Reads a whole file.
    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path, false)?;
        let len = file.len()? as usize;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = file.read_at(done as u64, &mut buf[done..])?;
            if n == 0 {
                buf.truncate(done);
                break;
            }
            done += n;
        }
        Ok(buf)
    }

    /// Writes a whole file durably and atomically: temp file, fdatasync, rename, sync dir.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp: PathBuf = dir.join(tmp_name);
        {
            let mut file = self.open(&tmp, true)?;
            file.set_len(0)?;
            file.write_at(0, data)?;
            file.sync_data()?;
        }
        self.rename(&tmp, path)?;
        self.sync_dir(dir)
    }
}

/// An fdatasync longer than this is logged as slow (etcd's threshold).
const SLOW_FDATASYNC: std::time::Duration = std::time::Duration::from_secs(1);

/// The production adapter: std fs, `fdatasync`, `fallocate`.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdDisk;

impl StdDisk {
    pub fn shared() -> Arc<dyn Disk> {
        Arc::new(StdDisk)
    }
}

/// Is `path` a WAL segment (`<seq>-<index>.wal`)?
fn is_wal_segment(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "wal")
}

struct StdFile {
    file: File,
    /// A WAL segment: its fdatasyncs are `etcd_disk_wal_fsync_duration_seconds` (those of
    /// snapshot files and images are not).
    wal: bool,
}

impl DiskFile for StdFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let started = std::time::Instant::now();
        let synced = self.file.sync_data();
        let took = started.elapsed();
        if self.wal {
            crate::metrics::METRICS
                .wal_fsync_seconds
                .observe(took.as_secs_f64());
        }
        if took >= SLOW_FDATASYNC {
            tracing::warn!(
                took = ?took,
                expected_duration = ?SLOW_FDATASYNC,
                "slow fdatasync"
            );
        }
        synced
    }

    fn allocate(&mut self, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let len_off = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "allocation too large"))?;
        // SAFETY: plain syscall on a file descriptor we own.
        let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), 0, len_off) };
        if rc == 0 {
            Ok(())
        } else if rc == libc::EOPNOTSUPP || rc == libc::EINVAL {
            // File systems without fallocate: a sparse file of the right size still works.
            if self.file.metadata()?.len() < len {
                self.file.set_len(len)?;
            }
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl Disk for StdDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Box::new(StdFile {
            file,
            wal: is_wal_segment(path),
        }))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// The conformance suite every `Disk` adapter must pass. `root` is an empty directory.
#[doc(hidden)]
pub mod conformance {
    use super::*;

    fn check(cond: bool, what: &str) {
        assert!(cond, "disk conformance: {what}");
    }

    pub fn run_all(disk: &dyn Disk, root: &Path) {
        write_then_read_sees_bytes(disk, root);
        allocate_reads_zeros(disk, root);
        list_is_sorted_and_files_only(disk, root);
        rename_replaces_target(disk, root);
        write_atomic_round_trips(disk, root);
        remove_deletes(disk, root);
    }

    pub fn write_then_read_sees_bytes(disk: &dyn Disk, root: &Path) {
        let path = root.join("a");
        let mut file = disk.open(&path, true).expect("open");
        file.write_at(0, b"hello").expect("write");
        file.write_at(3, b"p!").expect("overwrite");
        file.sync_data().expect("sync");
        let mut buf = [0u8; 8];
        let n = file.read_at(0, &mut buf).expect("read");
        check(
            n == 5 && &buf[..5] == b"help!",
            "read sees completed writes",
        );
        check(file.len().expect("len") == 5, "len follows writes");
        drop(file);
        check(
            disk.read_all(&path).expect("read_all") == b"help!",
            "reopen sees synced bytes",
        );
    }

    pub fn allocate_reads_zeros(disk: &dyn Disk, root: &Path) {
        let path = root.join("prealloc");
        let mut file = disk.open(&path, true).expect("open");
        file.allocate(4096).expect("allocate");
        file.write_at(10, b"x").expect("write");
        file.sync_data().expect("sync");
        check(file.len().expect("len") == 4096, "allocate sets the size");
        let mut buf = vec![1u8; 4096];
        check(
            file.read_at(0, &mut buf).expect("read") == 4096,
            "full read",
        );
        check(
            buf[10] == b'x' && buf.iter().filter(|b| **b != 0).count() == 1,
            "zeros elsewhere",
        );
        file.set_len(5).expect("truncate");
        check(file.len().expect("len") == 5, "set_len truncates");
    }

    pub fn list_is_sorted_and_files_only(disk: &dyn Disk, root: &Path) {
        let dir = root.join("dir");
        disk.create_dir_all(&dir.join("sub")).expect("mkdir");
        for name in ["c", "a", "b"] {
            disk.open(&dir.join(name), true).expect("create");
        }
        disk.sync_dir(&dir).expect("sync dir");
        check(
            disk.list(&dir).expect("list") == vec!["a", "b", "c"],
            "list sorted, files only",
        );
        check(
            disk.exists(&dir.join("a")) && !disk.exists(&dir.join("z")),
            "exists",
        );
    }

    pub fn rename_replaces_target(disk: &dyn Disk, root: &Path) {
        let from = root.join("from");
        let to = root.join("to");
        disk.write_atomic(&to, b"old").expect("write old");
        let mut file = disk.open(&from, true).expect("create");
        file.write_at(0, b"new").expect("write");
        file.sync_data().expect("sync");
        drop(file);
        disk.rename(&from, &to).expect("rename");
        disk.sync_dir(root).expect("sync dir");
        check(!disk.exists(&from), "source gone after rename");
        check(
            disk.read_all(&to).expect("read") == b"new",
            "target replaced",
        );
    }

    pub fn write_atomic_round_trips(disk: &dyn Disk, root: &Path) {
        let path = root.join("atomic");
        disk.write_atomic(&path, b"first version").expect("write");
        disk.write_atomic(&path, b"second").expect("rewrite");
        check(
            disk.read_all(&path).expect("read") == b"second",
            "atomic rewrite shrinks",
        );
    }

    pub fn remove_deletes(disk: &dyn Disk, root: &Path) {
        let path = root.join("gone");
        disk.write_atomic(&path, b"x").expect("write");
        disk.remove(&path).expect("remove");
        check(!disk.exists(&path), "removed");
        check(
            disk.open(&path, false).is_err(),
            "open without create fails",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wal_segments_count_as_wal_fsyncs() {
        assert!(is_wal_segment(Path::new(
            "d/member/wal/0000000000000001-0000000000000000.wal"
        )));
        for other in [
            "d/member/snap/0000000000000002-0000000000000010.snap",
            "d/member/snap/0000000000000010.image",
            "d/member/snap/0000000000000010.image.part",
            "d/member/wal/0.tmp",
        ] {
            assert!(!is_wal_segment(Path::new(other)), "{other}");
        }
    }

    #[test]
    fn std_disk_passes_conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        conformance::run_all(&StdDisk, dir.path());
    }
}
