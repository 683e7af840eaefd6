//! The `Backend` port: one ordered key/value tree holding mvcc state and its metadata.
//!
//! A handful of methods in the spirit of redb's storage backend: atomic batches, ordered scans,
//! and an explicit flush that is the only durability point.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend: {0}")]
    Store(String),
}

impl From<sled::Error> for BackendError {
    fn from(e: sled::Error) -> Self {
        BackendError::Store(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// Writes applied together: all or none.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(BatchOp::Put(key, value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push(BatchOp::Delete(key));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Contract:
/// - `apply` is atomic: after a crash, either every op of a batch is there or none is; batches
///   become durable in the order they were applied.
/// - Reads see every applied batch at once, flushed or not.
/// - Applied data is durable only once a later `flush` returns `Ok`.
/// - `scan` visits keys in `[start, end)` (no end: to the last key) in ascending byte order,
///   until the visitor returns `false`.
pub trait Backend: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError>;
    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), BackendError>;
    fn apply(&self, batch: WriteBatch) -> Result<(), BackendError>;
    fn flush(&self) -> Result<(), BackendError>;
    /// Bytes the store takes on disk (or in memory), roughly.
    fn size_bytes(&self) -> u64;
    /// Rewrites the store compactly, giving back the space that deletions left. Durable on
    /// return; a crash during it leaves the store as before or as after, whole. The caller
    /// keeps writes away meanwhile.
    fn defragment(&self) -> Result<(), BackendError>;
}

/// Production backend on sled.
pub struct SledBackend {
    /// Replaced whole by `defragment`.
    db: std::sync::RwLock<sled::Db>,
    path: std::path::PathBuf,
    /// A defragmentation could not put a store back in place: every call fails from now on.
    failed: std::sync::atomic::AtomicBool,
    /// The size on disk as last measured, and when: measuring reads the directory, and the
    /// quota asks before every write.
    size: Mutex<(u64, Option<std::time::Instant>)>,
}

/// How old a measured size on disk may be before it is measured again.
const SIZE_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(100);

/// How long `SledBackend::open` waits for the database's file lock. sled lets it go only when
/// its background threads drop their handles, a moment after the last `Db` handle is dropped,
/// so a reopen right after a close can find it still held.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// `db` + `suffix`: the copy a defragmentation writes, and where the old store waits while
/// the copy takes its place.
fn beside(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    std::path::PathBuf::from(name)
}

const DEFRAG_COPY: &str = ".defrag";
const DEFRAG_OLD: &str = ".old";
/// Keys copied per batch by `defragment`.
const DEFRAG_BATCH_KEYS: usize = 4096;

fn io_error(what: &str, path: &Path, e: std::io::Error) -> BackendError {
    BackendError::Store(format!("{what} {}: {e}", path.display()))
}

impl SledBackend {
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        Self::finish_defragment(path)?;
        Ok(SledBackend {
            db: std::sync::RwLock::new(Self::open_db(path)?),
            path: path.to_path_buf(),
            failed: std::sync::atomic::AtomicBool::new(false),
            size: Mutex::new((0, None)),
        })
    }

    /// Finishes or undoes a defragmentation that a crash interrupted: the old store moved
    /// aside and the copy not yet in its place → the old store goes back; then whatever is
    /// left beside the store is removed.
    fn finish_defragment(path: &Path) -> Result<(), BackendError> {
        let old = beside(path, DEFRAG_OLD);
        if !path.exists() && old.exists() {
            tracing::warn!(path = %path.display(), "an interrupted defragmentation: putting the old backend back");
            std::fs::rename(&old, path).map_err(|e| io_error("cannot rename", &old, e))?;
        }
        for leftover in [old, beside(path, DEFRAG_COPY)] {
            if leftover.exists() {
                std::fs::remove_dir_all(&leftover)
                    .map_err(|e| io_error("cannot remove", &leftover, e))?;
            }
        }
        Ok(())
    }

    /// Opens sled at `path`. sled panics on some damaged files (`tried to serialize
    /// Uninitialized`) instead of answering an error: the panic is caught, silently, and
    /// becomes an error naming the path.
    fn open_db(path: &Path) -> Result<sled::Db, BackendError> {
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| Self::open_db_unguarded(path));
        std::panic::set_hook(previous_hook);
        match opened {
            Ok(opened) => opened.map_err(|e| match e {
                BackendError::Store(message) => {
                    BackendError::Store(format!("{}: {message}", path.display()))
                }
            }),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unreadable".into());
                Err(BackendError::Store(format!(
                    "{} is damaged (sled: {what})",
                    path.display()
                )))
            }
        }
    }

    fn open_db_unguarded(path: &Path) -> Result<sled::Db, BackendError> {
        let config = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(1000))
            .cache_capacity(256 << 20);
        let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
        loop {
            match config.open() {
                Ok(db) => return Ok(db),
                // sled words it so (an io::Error of kind Other).
                Err(sled::Error::Io(e))
                    if e.to_string().starts_with("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn db(&self) -> Result<std::sync::RwLockReadGuard<'_, sled::Db>, BackendError> {
        if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BackendError::Store(format!(
                "{} could not be reopened after defragmenting it",
                self.path.display()
            )));
        }
        Ok(self.db.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.db()?.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), BackendError> {
        let db = self.db()?;
        let iter = match end {
            Some(end) => db.range(start..end),
            None => db.range(start..),
        };
        for item in iter {
            let (k, v) = item?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let mut sled_batch = sled::Batch::default();
        for op in batch.ops {
            match op {
                BatchOp::Put(k, v) => sled_batch.insert(k, v),
                BatchOp::Delete(k) => sled_batch.remove(k),
            }
        }
        let started = std::time::Instant::now();
        self.db()?.apply_batch(sled_batch)?;
        crate::metrics::METRICS
            .backend_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.db()?.flush()?;
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let mut size = self.size.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if size
            .1
            .is_none_or(|at| now.duration_since(at) >= SIZE_MAX_AGE)
        {
            // Keeps the last size if the directory cannot be read right now.
            if let Ok(bytes) = self.db().and_then(|db| Ok(db.size_on_disk()?)) {
                size.0 = bytes;
            }
            size.1 = Some(now);
        }
        size.0
    }

    /// Copies every key into a new store beside this one, then swaps the two directories:
    /// `db` → `db.old`, `db.defrag` → `db`, and removes `db.old`. `open` finishes or undoes a
    /// swap that a crash interrupted.
    fn defragment(&self) -> Result<(), BackendError> {
        let copy_path = beside(&self.path, DEFRAG_COPY);
        let old_path = beside(&self.path, DEFRAG_OLD);
        if copy_path.exists() {
            std::fs::remove_dir_all(&copy_path)
                .map_err(|e| io_error("cannot remove", &copy_path, e))?;
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let copy = Self::open_db(&copy_path)?;
        let mut batch = sled::Batch::default();
        let mut keys = 0;
        for item in db.iter() {
            let (key, value) = item?;
            batch.insert(key, value);
            keys += 1;
            if keys % DEFRAG_BATCH_KEYS == 0 {
                copy.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        copy.apply_batch(batch)?;
        copy.flush()?;
        drop(copy);
        db.flush()?;
        // sled lets its file lock go once its threads drop their handles: a placeholder
        // store in memory takes the old one's place while the directories are swapped.
        let placeholder = sled::Config::new().temporary(true).open()?;
        drop(std::mem::replace(&mut *db, placeholder));
        let swapped = std::fs::rename(&self.path, &old_path)
            .map_err(|e| io_error("cannot rename", &self.path, e))
            .and_then(|()| {
                std::fs::rename(&copy_path, &self.path)
                    .map_err(|e| io_error("cannot rename", &copy_path, e))
            })
            .and_then(|()| match self.path.parent() {
                Some(parent) => std::fs::File::open(parent)
                    .and_then(|dir| dir.sync_all())
                    .map_err(|e| io_error("cannot sync", parent, e)),
                None => Ok(()),
            });
        // Whatever happened, the store at `path` (old or new, whole) is reopened; if even
        // that fails, every later call fails and the member stops.
        let reopened = match &swapped {
            Ok(()) => Self::open_db(&self.path),
            Err(_) => Self::finish_defragment(&self.path).and_then(|()| Self::open_db(&self.path)),
        };
        match reopened {
            Ok(reopened) => *db = reopened,
            Err(e) => {
                self.failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
        }
        drop(db);
        swapped?;
        std::fs::remove_dir_all(&old_path).map_err(|e| io_error("cannot remove", &old_path, e))?;
        *self.size.lock().unwrap_or_else(|p| p.into_inner()) = (0, None);
        tracing::info!(keys, path = %self.path.display(), "backend defragmented");
        Ok(())
    }
}

/// An in-memory backend: everything applied is kept, and `flush` marks it durable. Used by
/// tests and by the simulator, which keeps the durable image across simulated crashes.
#[derive(Clone, Default)]
pub struct MemBackend {
    inner: Arc<Mutex<MemImages>>,
}

#[derive(Default)]
struct MemImages {
    live: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The keys' and values' bytes in `live`, kept as it changes: the simulator asks each
    /// member's status (which has the size) often, and a sum over every key made long
    /// simulations slow down as their data grew (found by fuzzing: a 60 s timeout).
    live_bytes: u64,
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend holding only what this one had flushed: what a crash leaves.
    pub fn crashed_copy(&self) -> MemBackend {
        let durable = self.lock().durable.clone();
        let live_bytes = durable.iter().map(|(k, v)| entry_bytes(k, v)).sum();
        MemBackend {
            inner: Arc::new(Mutex::new(MemImages {
                live: durable.clone(),
                live_bytes,
                durable,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemImages> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.lock().live.get(key).cloned())
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), BackendError> {
        let images = self.lock();
        let upper = match end {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        if end.is_some_and(|end| end <= start) {
            return Ok(());
        }
        for (k, v) in images
            .live
            .range::<[u8], _>((Bound::Included(start), upper))
        {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let mut images = self.lock();
        let images = &mut *images;
        for op in batch.ops {
            let (added, old) = match op {
                BatchOp::Put(k, v) => {
                    let added = entry_bytes(&k, &v);
                    let key_len = k.len();
                    let old = images
                        .live
                        .insert(k, v)
                        .map(|old| (key_len + old.len()) as u64);
                    (added, old)
                }
                BatchOp::Delete(k) => {
                    let old = images.live.remove(&k).map(|old| entry_bytes(&k, &old));
                    (0, old)
                }
            };
            images.live_bytes = images.live_bytes + added - old.unwrap_or(0);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        let mut images = self.lock();
        images.durable = images.live.clone();
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.lock().live_bytes
    }

    /// Memory holds no free space to give back.
    fn defragment(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[doc(hidden)]
pub mod conformance {
    use super::*;

    /// `open` opens the same store each time it is called (after the previous handle is
    /// dropped); the store starts empty.
    pub fn run_all(open: &dyn Fn() -> Box<dyn Backend>) {
        let backend = open();
        let mut batch = WriteBatch::default();
        for i in [3u8, 1, 2, 5, 4] {
            batch.put(vec![b'k', i], vec![i; 3]);
        }
        backend.apply(batch).expect("apply");
        assert_eq!(
            backend.get(&[b'k', 2]).expect("get"),
            Some(vec![2; 3]),
            "reads see applied batch"
        );
        let mut seen = Vec::new();
        backend
            .scan(&[b'k', 2], Some(&[b'k', 5]), &mut |k, _| {
                seen.push(k[1]);
                true
            })
            .expect("scan");
        assert_eq!(seen, vec![2, 3, 4], "scan is ordered and half-open");
        let mut first = Vec::new();
        backend
            .scan(b"k", None, &mut |k, _| {
                first.push(k[1]);
                first.len() < 2
            })
            .expect("scan");
        assert_eq!(first, vec![1, 2], "scan stops when the visitor says so");
        let mut batch = WriteBatch::default();
        batch.delete(vec![b'k', 1]);
        batch.put(vec![b'k', 9], b"nine".to_vec());
        backend.apply(batch).expect("apply");
        assert_eq!(
            backend.get(&[b'k', 1]).expect("get"),
            None,
            "delete in batch"
        );
        backend.flush().expect("flush");
        drop(backend);
        let reopened = open();
        assert_eq!(
            reopened.get(&[b'k', 9]).expect("get"),
            Some(b"nine".to_vec()),
            "flushed data survives reopen"
        );
        assert_eq!(
            reopened.get(&[b'k', 1]).expect("get"),
            None,
            "flushed delete survives reopen"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_backend_passes_conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        conformance::run_all(&|| Box::new(SledBackend::open(&path).expect("open sled")));
    }

    #[test]
    fn mem_backend_passes_conformance() {
        let backend = MemBackend::new();
        conformance::run_all(&|| Box::new(backend.clone()));
    }

    #[test]
    fn mem_backend_crash_keeps_only_flushed() {
        let backend = MemBackend::new();
        let mut batch = WriteBatch::default();
        batch.put(b"a".to_vec(), b"1".to_vec());
        backend.apply(batch).expect("apply");
        backend.flush().expect("flush");
        let mut batch = WriteBatch::default();
        batch.put(b"b".to_vec(), b"2".to_vec());
        backend.apply(batch).expect("apply");
        let crashed = backend.crashed_copy();
        assert_eq!(crashed.get(b"a").expect("get"), Some(b"1".to_vec()));
        assert_eq!(crashed.get(b"b").expect("get"), None);
    }

    #[test]
    fn mem_backend_size_follows_puts_overwrites_deletes_and_crashes() {
        let backend = MemBackend::new();
        let summed = |b: &MemBackend| -> u64 {
            let mut total = 0;
            b.scan(b"", None, &mut |k, v| {
                total += (k.len() + v.len()) as u64;
                true
            })
            .expect("scan");
            total
        };
        let mut batch = WriteBatch::default();
        batch.put(b"a".to_vec(), b"12345".to_vec());
        batch.put(b"bb".to_vec(), b"1".to_vec());
        backend.apply(batch).expect("apply");
        assert_eq!(backend.size_bytes(), 9);
        backend.flush().expect("flush");
        let mut batch = WriteBatch::default();
        batch.put(b"a".to_vec(), b"1".to_vec()); // Overwritten, shorter.
        batch.delete(b"bb".to_vec());
        batch.delete(b"never".to_vec());
        batch.put(b"c".to_vec(), b"123".to_vec());
        backend.apply(batch).expect("apply");
        assert_eq!(backend.size_bytes(), 6);
        assert_eq!(backend.size_bytes(), summed(&backend));
        let crashed = backend.crashed_copy();
        assert_eq!(crashed.size_bytes(), 9);
        assert_eq!(crashed.size_bytes(), summed(&crashed));
    }
}
