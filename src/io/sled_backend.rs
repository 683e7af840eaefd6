//! The production `Backend` on sled, with a defragmentation that does not stop the member:
//! the store is copied while reads and writes go on (the batches written meanwhile are kept
//! and replayed into the copy), then the copy takes the store's place in one short step.

use std::path::Path;
use std::sync::Mutex;

use super::backend::{Backend, BackendError, BatchOp, WriteBatch};

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
    /// While a defragmentation copies the store: the batches applied since it began, to
    /// replay into the copy.
    applied_during_copy: Mutex<Option<Vec<WriteBatch>>>,
    /// One defragmentation at a time.
    defragmenting: Mutex<()>,
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
const DEFRAG_BATCH_KEYS: u64 = 4096;

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
            applied_during_copy: Mutex::new(None),
            defragmenting: Mutex::new(()),
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

    fn copying(&self) -> std::sync::MutexGuard<'_, Option<Vec<WriteBatch>>> {
        self.applied_during_copy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
        // Held across the apply and the note below: the swap of a defragmentation takes it
        // whole, so it sees every batch applied before it.
        let db = self.db()?;
        {
            let mut copying = self
                .applied_during_copy
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(batches) = copying.as_mut() {
                batches.push(batch.clone());
            }
        }
        let mut sled_batch = sled::Batch::default();
        for op in batch.ops {
            match op {
                BatchOp::Put(k, v) => sled_batch.insert(k, v),
                BatchOp::Delete(k) => sled_batch.remove(k),
            }
        }
        let started = std::time::Instant::now();
        db.apply_batch(sled_batch)?;
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

    /// Copies every key into a new store beside this one while reads and writes go on (the
    /// batches applied meanwhile are kept); then, holding everyone off for a moment, replays
    /// those batches into the copy and swaps the two directories: `db` → `db.old`,
    /// `db.defrag` → `db`, and removes `db.old`. `open` finishes or undoes a swap that a crash
    /// interrupted.
    fn defragment(&self) -> Result<(), BackendError> {
        let _one_at_a_time = self
            .defragmenting
            .try_lock()
            .map_err(|_| BackendError::Store("a defragmentation is already running".into()))?;
        let copy_path = beside(&self.path, DEFRAG_COPY);
        let old_path = beside(&self.path, DEFRAG_OLD);
        if copy_path.exists() {
            std::fs::remove_dir_all(&copy_path)
                .map_err(|e| io_error("cannot remove", &copy_path, e))?;
        }
        let copy = Self::open_db(&copy_path)?;
        // From here on every batch is kept; the scan below may or may not see it, and
        // replaying it later gives the same result either way (puts and deletes, in order).
        *self.copying() = Some(Vec::new());
        let copied = (|| -> Result<u64, BackendError> {
            let db = self.db()?;
            let mut batch = sled::Batch::default();
            let mut keys = 0u64;
            for item in db.iter() {
                let (key, value) = item?;
                batch.insert(key, value);
                keys += 1;
                if keys.is_multiple_of(DEFRAG_BATCH_KEYS) {
                    copy.apply_batch(std::mem::take(&mut batch))?;
                }
            }
            copy.apply_batch(batch)?;
            Ok(keys)
        })();
        let keys = match copied {
            Ok(keys) => keys,
            Err(e) => {
                *self.copying() = None;
                drop(copy);
                let _ = std::fs::remove_dir_all(&copy_path);
                return Err(e);
            }
        };
        // The short step: nobody reads or writes until the copy is in place.
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let during = self.copying().take().unwrap_or_default();
        let replayed = during.len();
        for batch in during {
            let mut sled_batch = sled::Batch::default();
            for op in batch.ops {
                match op {
                    BatchOp::Put(k, v) => sled_batch.insert(k, v),
                    BatchOp::Delete(k) => sled_batch.remove(k),
                }
            }
            copy.apply_batch(sled_batch)?;
        }
        copy.flush()?;
        drop(copy);
        db.flush()?;
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
        tracing::info!(keys, replayed_batches = replayed, path = %self.path.display(), "backend defragmented");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    fn contents(backend: &dyn Backend) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut all = BTreeMap::new();
        backend
            .scan(&[], None, &mut |k, v| {
                all.insert(k.to_vec(), v.to_vec());
                true
            })
            .expect("scan");
        all
    }

    #[test]
    fn defragment_keeps_every_batch_written_while_it_copies_and_does_not_stop_writers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let backend = Arc::new(SledBackend::open(&path).expect("open"));
        let mut model = BTreeMap::new();
        for chunk in 0..20u32 {
            let mut batch = WriteBatch::default();
            for i in 0..500u32 {
                let key = (chunk * 500 + i).to_be_bytes().to_vec();
                batch.put(key.clone(), vec![chunk as u8; 1024]);
                model.insert(key, vec![chunk as u8; 1024]);
            }
            backend.apply(batch).expect("apply");
        }
        // A writer overwrites and deletes keys while the defragmentation runs.
        let done = Arc::new(AtomicBool::new(false));
        let during = Arc::new(AtomicU64::new(0));
        let writer = {
            let (backend, done, during) = (backend.clone(), done.clone(), during.clone());
            std::thread::spawn(move || {
                let mut model = BTreeMap::new();
                let mut n = 0u32;
                while !done.load(Ordering::Relaxed) {
                    let mut batch = WriteBatch::default();
                    let key = (n % 10_000).to_be_bytes().to_vec();
                    if n.is_multiple_of(3) {
                        batch.delete(key.clone());
                        model.insert(key, None);
                    } else {
                        batch.put(key.clone(), n.to_le_bytes().to_vec());
                        model.insert(key, Some(n.to_le_bytes().to_vec()));
                    }
                    backend.apply(batch).expect("apply during defragmentation");
                    during.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                model
            })
        };
        while during.load(Ordering::Relaxed) < 10 {
            std::thread::yield_now();
        }
        let before = during.load(Ordering::Relaxed);
        backend.defragment().expect("defragment");
        let while_defragmenting = during.load(Ordering::Relaxed) - before;
        done.store(true, Ordering::Relaxed);
        let changes = writer.join().expect("writer");
        for (key, value) in changes {
            match value {
                Some(value) => model.insert(key, value),
                None => model.remove(&key),
            };
        }
        assert!(
            while_defragmenting > 0,
            "writers went on while the store was copied"
        );
        assert!(
            contents(backend.as_ref()) == model,
            "every batch is in the copy"
        );
        assert!(!beside(&path, DEFRAG_COPY).exists() && !beside(&path, DEFRAG_OLD).exists());
        drop(backend);
        let reopened = SledBackend::open(&path).expect("reopen");
        assert!(contents(&reopened) == model, "the copy is durable");
    }

    #[test]
    fn an_interrupted_swap_is_undone_or_finished_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let backend = SledBackend::open(&path).expect("open");
            let mut batch = WriteBatch::default();
            batch.put(b"k".to_vec(), b"v".to_vec());
            backend.apply(batch).expect("apply");
            backend.flush().expect("flush");
        }
        // Crashed after moving the store aside, before the copy took its place.
        std::fs::rename(&path, beside(&path, DEFRAG_OLD)).expect("rename");
        std::fs::create_dir_all(beside(&path, DEFRAG_COPY)).expect("a partial copy");
        let backend = SledBackend::open(&path).expect("open");
        assert_eq!(backend.get(b"k").expect("get"), Some(b"v".to_vec()));
        assert!(!beside(&path, DEFRAG_COPY).exists() && !beside(&path, DEFRAG_OLD).exists());
    }
}
