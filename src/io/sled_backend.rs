//! The production `Backend` on sled, with a defragmentation that does not stop the member:
//! the store is copied into a new directory while reads and writes go on (the batches written
//! meanwhile are kept and replayed into the copy), then the copy takes the store's place in one
//! short step.
//!
//! On disk: the store is `member/db` until its first defragmentation, then `member/db.<n>`,
//! the n-th copy; `member/db.current` names the directory in use once there is a copy. The
//! pointer is replaced atomically once the copy is whole and durable, so a crash leaves either
//! store, whole; `open` removes whatever directory the pointer does not name.
//!
//! Large values are kept in pieces (`PIECE_BYTES`): sled writes a tree node bigger than a
//! quarter of its 512 KiB segment as a separate blob and counts only the blob's pointer against
//! its cache, so nodes holding a few large values were never evicted, whatever the cache's
//! bound (1M keys held 300 MB of values in memory with a 64 MiB cache). A value longer than a
//! piece is stored as a descriptor under its key and its pieces under keys in a reserved range
//! (`PIECES_PREFIX`) that reads never show; the pieces and the descriptor go in one sled batch.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::{Mutex, RwLock};

use super::backend::{Backend, BackendError, BatchOp, PairSource, StagedContents, WriteBatch};

/// Production backend on sled.
pub struct SledBackend {
    /// The store's name, `member/db` (its first directory).
    base: PathBuf,
    /// The store in use and its directory; replaced whole by `defragment`.
    db: RwLock<(sled::Db, PathBuf)>,
    /// The size on disk as last measured, and when: measuring reads the directory, and the
    /// quota asks before every write.
    size: Mutex<(u64, Option<std::time::Instant>)>,
    /// While a defragmentation copies the store: the batches applied since it began, to
    /// replay into the copy.
    applied_during_copy: Mutex<Option<Vec<WriteBatch>>>,
    /// One defragmentation at a time.
    defragmenting: Mutex<()>,
    /// Contents are staged in the next generation's directory (`stage_replacement`) and not
    /// yet installed or dropped: a defragmentation would take that directory, so it waits.
    staged: Arc<std::sync::atomic::AtomicBool>,
}

/// Contents `stage_replacement` wrote in the next generation's directory.
struct SledStaged {
    /// `None` once installed.
    db: Option<sled::Db>,
    dir: PathBuf,
    staged: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for SledStaged {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            // Never installed: the directory goes (the next open would remove it anyway).
            drop(db);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        self.staged
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// How old a measured size on disk may be before it is measured again.
const SIZE_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(100);

/// How long `SledBackend::open` waits for the database's file lock. sled lets it go only when
/// its background threads drop their handles, a moment after the last `Db` handle is dropped,
/// so a reopen right after a close can find it still held.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Keys copied per batch by `defragment`...
const DEFRAG_BATCH_KEYS: u64 = 4096;
/// ...and bytes copied between two flushes of the copy: one large flush at the end would
/// queue the member's WAL fdatasyncs behind it on the disk.
const DEFRAG_FLUSH_BYTES: u64 = 8 << 20;
/// Bytes of pairs per batch while `replace_all` writes a store (values may be large)...
const REPLACE_BATCH_BYTES: u64 = 4 << 20;
/// ...and between two flushes of it: only the last one makes it the store, so the others only
/// bound what the last one has to sync (a flush every 8 MiB took half of a restore's time).
const REPLACE_FLUSH_BYTES: u64 = 256 << 20;
/// The copy's pace, at most: the disk and the cores stay the member's first.
const DEFRAG_BYTES_PER_SEC: u64 = 100 << 20;

fn io_error(what: &str, path: &Path, e: std::io::Error) -> BackendError {
    BackendError::Store(format!("{what} {}: {e}", path.display()))
}

/// A store's error, with what was done and where: sled's own names neither.
fn store_error(what: &str, path: &Path, e: sled::Error) -> BackendError {
    match e {
        sled::Error::Io(e) => io_error(what, path, e),
        other => BackendError::Store(format!("{what} {}: {other}", path.display())),
    }
}

/// `base` + `suffix`, beside it: `db.current`, `db.3`.
fn beside(base: &Path, suffix: &str) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The generation of a store directory: 0 for `db`, n for `db.<n>`; `None` for other names.
fn generation(base: &Path, dir: &Path) -> Option<u64> {
    let base_name = base.file_name()?.to_str()?;
    let name = dir.file_name()?.to_str()?;
    if name == base_name {
        return Some(0);
    }
    name.strip_prefix(base_name)?
        .strip_prefix('.')?
        .parse()
        .ok()
}

impl SledBackend {
    /// Opens the store named `base` (`member/db`): the directory `db.current` names, or `db`.
    pub fn open(base: &Path) -> Result<Self, BackendError> {
        let current = Self::current_dir(base)?;
        Self::remove_other_generations(base, &current)?;
        Ok(SledBackend {
            base: base.to_path_buf(),
            db: RwLock::new((Self::open_db(&current)?, current)),
            size: Mutex::new((0, None)),
            applied_during_copy: Mutex::new(None),
            defragmenting: Mutex::new(()),
            staged: Arc::default(),
        })
    }

    fn pointer(base: &Path) -> PathBuf {
        beside(base, ".current")
    }

    /// The directory in use: the one the pointer names, else `base`.
    fn current_dir(base: &Path) -> Result<PathBuf, BackendError> {
        let pointer = Self::pointer(base);
        let name = match std::fs::read_to_string(&pointer) {
            Ok(name) => name,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(base.to_path_buf()),
            Err(e) => return Err(io_error("cannot read", &pointer, e)),
        };
        let dir = base.with_file_name(name.trim());
        if generation(base, &dir).is_none() || !dir.is_dir() {
            return Err(BackendError::Store(format!(
                "{} names {:?}, which is not a store directory beside it",
                pointer.display(),
                name.trim()
            )));
        }
        Ok(dir)
    }

    /// Removes the store directories other than `current`: an older store a defragmentation
    /// replaced, or a copy it did not finish.
    fn remove_other_generations(base: &Path, current: &Path) -> Result<(), BackendError> {
        let Some(parent) = base.parent() else {
            return Ok(());
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            return Ok(()); // A new member: nothing there yet.
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path != current && path.is_dir() && generation(base, &path).is_some() {
                tracing::info!(path = %path.display(), "removing a store directory left by a defragmentation");
                std::fs::remove_dir_all(&path).map_err(|e| io_error("cannot remove", &path, e))?;
            }
        }
        Ok(())
    }

    /// Points the store at `dir`, atomically and durably.
    fn set_current(&self, dir: &Path) -> Result<(), BackendError> {
        let pointer = Self::pointer(&self.base);
        let tmp = beside(&pointer, ".tmp");
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BackendError::Store(format!("{} has no name", dir.display())))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, format!("{name}\n").as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &pointer)?;
            if let Some(parent) = pointer.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| io_error("cannot write", &pointer, e))
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
            .cache_capacity(crate::metrics::memory::backend_cache_bytes());
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

    /// Opens a fresh store in the generation after `current`'s directory (what an unfinished
    /// copy left there is removed first).
    fn open_next_generation(&self, current: &Path) -> Result<(sled::Db, PathBuf), BackendError> {
        let next = generation(&self.base, current).unwrap_or(0) + 1;
        let dir = beside(&self.base, &format!(".{next}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io_error("cannot remove", &dir, e))?;
        }
        // A fresh directory: no damaged files to guard against (and the process-wide panic hook
        // stays as it is while the member runs).
        Ok((Self::open_db_unguarded(&dir)?, dir))
    }

    /// The directory the store is in now.
    pub fn dir(&self) -> PathBuf {
        self.lock_read().1.clone()
    }

    fn copying(&self) -> std::sync::MutexGuard<'_, Option<Vec<WriteBatch>>> {
        self.applied_during_copy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lock_read(&self) -> std::sync::RwLockReadGuard<'_, (sled::Db, PathBuf)> {
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies the store into `copy`, while batches go on (they are kept meanwhile), at
    /// `DEFRAG_BYTES_PER_SEC` at most, flushing every `DEFRAG_FLUSH_BYTES`.
    fn copy_into(&self, copy: &sled::Db) -> Result<u64, BackendError> {
        let db = self.lock_read();
        let started = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        let (mut keys, mut bytes, mut flushed) = (0u64, 0u64, 0u64);
        for item in db.0.iter() {
            let (key, value) = item?;
            bytes += (key.len() + value.len()) as u64;
            batch.insert(key, value);
            keys += 1;
            if keys.is_multiple_of(DEFRAG_BATCH_KEYS) {
                copy.apply_batch(std::mem::take(&mut batch))?;
            }
            if bytes - flushed >= DEFRAG_FLUSH_BYTES {
                copy.apply_batch(std::mem::take(&mut batch))?;
                copy.flush()?;
                flushed = bytes;
                let due =
                    std::time::Duration::from_secs_f64(bytes as f64 / DEFRAG_BYTES_PER_SEC as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        copy.apply_batch(batch)?;
        Ok(keys)
    }
}

/// Values longer than this are stored in pieces of at most this many bytes. A sled leaf holds
/// up to about 20 entries; 20 pieces and their keys stay under sled's blob threshold (128 KiB
/// less a header), so every node is cached, counted and evicted as its size.
pub(crate) const PIECE_BYTES: usize = 6 << 10;
/// Keys of pieces start with this; the store's own keys may not (`apply` refuses them).
const PIECES_PREFIX: &[u8] = b"\xff\xff";
/// A stored value that starts with this is a descriptor: the value's length and piece count.
/// A value that starts with it is always stored in pieces, so the two never mix up.
const PIECED_MAGIC: &[u8; 8] = b"QKVPIEC1";
const DESCRIPTOR_LEN: usize = PIECED_MAGIC.len() + 8 + 4;
// The store's runs of revisions fit in one piece: only an entry larger than a run is split.
const _: () = assert!(crate::mvcc::RUN_BYTES <= PIECE_BYTES);

fn reserved_key(key: &[u8]) -> bool {
    key.starts_with(PIECES_PREFIX)
}

/// Where piece `i` of `key`'s value is stored. Its index is fixed-width, so two keys' pieces
/// never share a name.
fn piece_key(key: &[u8], i: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(PIECES_PREFIX.len() + key.len() + 4);
    out.extend_from_slice(PIECES_PREFIX);
    out.extend_from_slice(key);
    out.extend_from_slice(&i.to_be_bytes());
    out
}

fn stored_in_pieces(value: &[u8]) -> bool {
    value.len() > PIECE_BYTES || value.starts_with(PIECED_MAGIC)
}

/// The length and piece count a stored value describes, if it is a descriptor.
fn descriptor(key: &[u8], stored: &[u8]) -> Result<Option<(usize, u32)>, BackendError> {
    if !stored.starts_with(PIECED_MAGIC) {
        return Ok(None);
    }
    let damaged = || {
        BackendError::Store(format!(
            "the descriptor of {:?}'s pieces is damaged",
            key.escape_ascii().to_string()
        ))
    };
    if stored.len() != DESCRIPTOR_LEN {
        return Err(damaged());
    }
    let rest = &stored[PIECED_MAGIC.len()..];
    let len = u64::from_be_bytes(rest[..8].try_into().map_err(|_| damaged())?);
    let pieces = u32::from_be_bytes(rest[8..].try_into().map_err(|_| damaged())?);
    let len = usize::try_from(len).map_err(|_| damaged())?;
    if len.div_ceil(PIECE_BYTES) != pieces as usize {
        return Err(damaged());
    }
    Ok(Some((len, pieces)))
}

/// The value a stored value stands for: itself, or its pieces put together.
fn whole<'a>(
    tree: &sled::Tree,
    key: &[u8],
    stored: &'a [u8],
) -> Result<Cow<'a, [u8]>, BackendError> {
    let Some((len, pieces)) = descriptor(key, stored)? else {
        return Ok(Cow::Borrowed(stored));
    };
    let mut value = Vec::with_capacity(len);
    for i in 0..pieces {
        let piece = tree.get(piece_key(key, i))?.ok_or_else(|| {
            BackendError::Store(format!(
                "piece {i} of {:?}'s value is missing",
                key.escape_ascii().to_string()
            ))
        })?;
        value.extend_from_slice(&piece);
    }
    if value.len() != len {
        return Err(BackendError::Store(format!(
            "{:?}'s pieces hold {} bytes, not {len}",
            key.escape_ascii().to_string(),
            value.len()
        )));
    }
    Ok(Cow::Owned(value))
}

/// The sled batch that carries out `batch` on `tree` as it is now: large values split into
/// pieces, and the pieces of values overwritten or deleted removed.
///
/// While no key of the tree is stored in pieces (no value was ever over `PIECE_BYTES`, the
/// common case), no key is looked up: one probe of the pieces' range per batch instead of a
/// read per write. (Batches are applied one at a time, so none adds pieces meanwhile.)
fn sled_batch(tree: &sled::Tree, batch: WriteBatch) -> Result<sled::Batch, BackendError> {
    let has_pieces = tree.scan_prefix(PIECES_PREFIX).next().is_some();
    pieces_batch(has_pieces.then_some(tree), batch, &mut HashMap::new())
}

/// `sled_batch`, knowing from `pieces_now` the pieces of every key written earlier (by this
/// batch, or by earlier ones it was told of). `tree` is asked about the other keys; with no
/// tree (a store being filled from empty, `replace_all`) they have none, and no key is looked
/// up.
fn pieces_batch(
    tree: Option<&sled::Tree>,
    batch: WriteBatch,
    pieces_now: &mut HashMap<Vec<u8>, u32>,
) -> Result<sled::Batch, BackendError> {
    let mut out = sled::Batch::default();
    for op in batch.ops {
        let key = match &op {
            BatchOp::Put(key, _) | BatchOp::Delete(key) => key,
        };
        if reserved_key(key) {
            return Err(BackendError::Store(format!(
                "key {:?} is in the backend's reserved range",
                key.escape_ascii().to_string()
            )));
        }
        let before = match (pieces_now.get(key), tree) {
            (Some(pieces), _) => *pieces,
            (None, None) => 0,
            (None, Some(tree)) => match tree.get(key)? {
                Some(stored) => descriptor(key, &stored)?.map_or(0, |(_, pieces)| pieces),
                None => 0,
            },
        };
        for i in 0..before {
            out.remove(piece_key(key, i));
        }
        match op {
            BatchOp::Put(key, value) if stored_in_pieces(&value) => {
                let mut pieces = 0u32;
                for piece in value.chunks(PIECE_BYTES) {
                    out.insert(piece_key(&key, pieces), piece);
                    pieces += 1;
                }
                let mut stored = Vec::with_capacity(DESCRIPTOR_LEN);
                stored.extend_from_slice(PIECED_MAGIC);
                stored.extend_from_slice(&(value.len() as u64).to_be_bytes());
                stored.extend_from_slice(&pieces.to_be_bytes());
                out.insert(key.as_slice(), stored);
                if pieces > 0 || before > 0 {
                    pieces_now.insert(key, pieces);
                }
            }
            BatchOp::Put(key, value) => {
                out.insert(key.as_slice(), value);
                if before > 0 {
                    pieces_now.insert(key, 0);
                }
            }
            BatchOp::Delete(key) => {
                out.remove(key.as_slice());
                if before > 0 {
                    pieces_now.insert(key, 0);
                }
            }
        }
    }
    Ok(out)
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        if reserved_key(key) {
            return Ok(None);
        }
        let db = self.lock_read();
        match db.0.get(key)? {
            Some(stored) => Ok(Some(whole(&db.0, key, &stored)?.into_owned())),
            None => Ok(None),
        }
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), BackendError> {
        if reserved_key(start) {
            return Ok(());
        }
        // Pieces are not the store's keys: the scan stops before them.
        let end = match end {
            Some(end) if end < PIECES_PREFIX => end,
            _ => PIECES_PREFIX,
        };
        if end <= start {
            return Ok(());
        }
        let db = self.lock_read();
        for item in db.0.range(start..end) {
            let (k, v) = item?;
            if !visit(&k, &whole(&db.0, &k, &v)?) {
                break;
            }
        }
        Ok(())
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), BackendError> {
        // Held across the apply and the note below: the swap of a defragmentation takes it
        // whole, so it sees every batch applied before it.
        let db = self.lock_read();
        if let Some(batches) = self.copying().as_mut() {
            batches.push(batch.clone());
        }
        let started = std::time::Instant::now();
        db.0.apply_batch(sled_batch(&db.0, batch)?)
            .map_err(|e| store_error("write a batch to", &db.1, e))?;
        crate::metrics::METRICS
            .backend_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        let db = self.lock_read();
        db.0.flush().map_err(|e| store_error("flush", &db.1, e))?;
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
            if let Ok(bytes) = self.lock_read().0.size_on_disk() {
                size.0 = bytes;
            }
            size.1 = Some(now);
        }
        size.0
    }

    /// Copies every key into the next generation's directory while reads and writes go on
    /// (the batches applied meanwhile are kept), and makes the copy durable; then, holding
    /// everyone off for a moment, replays those batches into it, makes them durable, points
    /// `db.current` at it and serves from it. The old directory is removed afterwards.
    fn defragment(&self) -> Result<(), BackendError> {
        let _one_at_a_time = self
            .defragmenting
            .try_lock()
            .map_err(|_| BackendError::Store("a defragmentation is already running".into()))?;
        if self.staged.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BackendError::Store(
                "a snapshot is being restored; defragment when it is done".into(),
            ));
        }
        let old_dir = self.dir();
        let (copy, copy_dir) = self.open_next_generation(&old_dir)?;
        {
            // Under the write lock: every batch applied before this is in the store the scan
            // below reads; every batch after it is kept too. The scan may or may not see a kept
            // batch, and replaying it gives the same result either way (puts and deletes, in
            // order).
            let _no_batch_in_flight = self.db.write().unwrap_or_else(|p| p.into_inner());
            *self.copying() = Some(Vec::new());
        }
        let copied = self
            .copy_into(&copy)
            .and_then(|keys| Ok(copy.flush().map(|_| keys)?));
        let keys = match copied {
            Ok(keys) => keys,
            Err(e) => {
                *self.copying() = None;
                drop(copy);
                let _ = std::fs::remove_dir_all(&copy_dir);
                return Err(e);
            }
        };
        // The short step: nobody reads or writes until the copy is in place.
        let swap_started = std::time::Instant::now();
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let during = self.copying().take().unwrap_or_default();
        let replayed = during.len();
        let switched = (|| {
            for batch in during {
                copy.apply_batch(sled_batch(&copy, batch)?)?;
            }
            copy.flush()?;
            self.set_current(&copy_dir)
        })();
        if let Err(e) = switched {
            drop(db);
            drop(copy);
            let _ = std::fs::remove_dir_all(&copy_dir);
            return Err(e);
        }
        let old = std::mem::replace(&mut *db, (copy, copy_dir.clone()));
        drop(db);
        let swap = swap_started.elapsed();
        drop(old);
        *self.size.lock().unwrap_or_else(|p| p.into_inner()) = (0, None);
        if let Err(e) = std::fs::remove_dir_all(&old_dir) {
            // The next start removes it.
            tracing::warn!(path = %old_dir.display(), error = %e, "cannot remove the store a defragmentation replaced");
        }
        tracing::info!(keys, replayed_batches = replayed, swap = ?swap, path = %copy_dir.display(), "backend defragmented");
        Ok(())
    }

    /// Writes the pairs into the next generation's directory, a batch at a time, and makes it
    /// durable; `install_replacement` then points `db.current` at it (the atomic step) and
    /// removes the old directory.
    fn stage_replacement(&self, next: &mut PairSource<'_>) -> Result<StagedContents, BackendError> {
        let _no_defragmentation = self.defragmenting.lock().unwrap_or_else(|p| p.into_inner());
        if self.staged.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Err(BackendError::Store(
                "contents are already staged to replace the store".into(),
            ));
        }
        // From here, dropping `staged` (on any error) lowers the flag again.
        let mut staged = SledStaged {
            db: None,
            dir: PathBuf::new(),
            staged: self.staged.clone(),
        };
        let (new, new_dir) = self.open_next_generation(&self.dir())?;
        staged.db = Some(new.clone());
        staged.dir = new_dir;
        let filled = (|| -> Result<u64, BackendError> {
            let mut batch = WriteBatch::default();
            // The new store starts empty: only keys written here can have pieces.
            let mut pieced = HashMap::new();
            let (mut keys, mut batch_bytes, mut unflushed) = (0u64, 0u64, 0u64);
            while let Some((key, value)) = next()? {
                let bytes = (key.len() + value.len()) as u64;
                batch.put(key, value);
                keys += 1;
                batch_bytes += bytes;
                unflushed += bytes;
                if keys.is_multiple_of(DEFRAG_BATCH_KEYS) || batch_bytes >= REPLACE_BATCH_BYTES {
                    new.apply_batch(pieces_batch(None, std::mem::take(&mut batch), &mut pieced)?)?;
                    batch_bytes = 0;
                }
                if unflushed >= REPLACE_FLUSH_BYTES {
                    new.flush()?;
                    unflushed = 0;
                }
            }
            new.apply_batch(pieces_batch(None, batch, &mut pieced)?)?;
            new.flush()?;
            Ok(keys)
        })();
        drop(new);
        // On an error, dropping `staged` removes what was written.
        let pairs = filled?;
        Ok(StagedContents {
            inner: Box::new(staged),
            pairs,
        })
    }

    fn install_replacement(&self, staged: StagedContents) -> Result<u64, BackendError> {
        let (mut staged, keys) = staged.into_inner::<SledStaged>()?;
        let old_dir = self.dir();
        let new_dir = staged.dir.clone();
        // An error leaves the old contents, and dropping `staged` removes the new ones.
        self.set_current(&new_dir)?;
        let Some(new) = staged.db.take() else {
            return Err(BackendError::Store(
                "staged contents installed twice".into(),
            ));
        };
        let old = {
            let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *db, (new, new_dir.clone()))
        };
        drop(old);
        *self.size.lock().unwrap_or_else(|p| p.into_inner()) = (0, None);
        if let Err(e) = std::fs::remove_dir_all(&old_dir) {
            tracing::warn!(path = %old_dir.display(), error = %e, "cannot remove the store a snapshot replaced");
        }
        // Only now may a defragmentation take the next generation's directory.
        drop(staged);
        Ok(keys)
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

    /// Every pair sled itself holds, pieces included.
    fn raw(backend: &SledBackend) -> Vec<(Vec<u8>, usize)> {
        let db = backend.lock_read();
        db.0.iter()
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.len())).expect("raw"))
            .collect()
    }

    #[test]
    fn staged_contents_hold_off_defragmentation_and_go_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = SledBackend::open(&dir.path().join("db")).expect("open");
        let mut batch = WriteBatch::default();
        batch.put(b"old".to_vec(), b"1".to_vec());
        backend.apply(batch).expect("apply");
        let entries = || std::fs::read_dir(dir.path()).expect("ls").count();
        let before = entries();
        let mut pairs = std::iter::once((b"new".to_vec(), b"2".to_vec()));
        let staged = backend
            .stage_replacement(&mut || Ok(pairs.next()))
            .expect("stage");
        assert_eq!(entries(), before + 1, "the next generation's directory");
        assert!(
            backend.defragment().is_err(),
            "a defragmentation would take the staged directory"
        );
        let mut pairs = std::iter::empty();
        assert!(
            backend.stage_replacement(&mut || Ok(pairs.next())).is_err(),
            "one staging at a time"
        );
        drop(staged);
        assert_eq!(entries(), before, "dropped staged contents are removed");
        assert_eq!(backend.get(b"old").expect("get"), Some(b"1".to_vec()));
        backend
            .defragment()
            .expect("defragment once nothing is staged");
        assert_eq!(backend.get(b"old").expect("get"), Some(b"1".to_vec()));
    }

    #[test]
    fn large_values_are_stored_in_pieces_no_node_can_outgrow_and_deletes_take_the_pieces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = SledBackend::open(&dir.path().join("db")).expect("open");
        let mut batch = WriteBatch::default();
        batch.put(b"small".to_vec(), vec![1; 100]);
        backend.apply(batch).expect("apply");
        let before = raw(&backend).len();
        let mut batch = WriteBatch::default();
        batch.put(b"big".to_vec(), vec![2; (1 << 20) + 5]);
        backend.apply(batch).expect("apply");
        let stored = raw(&backend);
        assert!(
            stored.iter().all(|(_, len)| *len <= PIECE_BYTES),
            "sled holds no value longer than a piece"
        );
        assert_eq!(
            stored.len(),
            before + 1 + ((1 << 20) + 5usize).div_ceil(PIECE_BYTES)
        );
        assert_eq!(
            backend.get(b"big").expect("get").map(|v| v.len()),
            Some((1 << 20) + 5)
        );
        // Overwritten by a shorter value in pieces, then deleted: no piece is left behind.
        let mut batch = WriteBatch::default();
        batch.put(b"big".to_vec(), vec![3; 3 * PIECE_BYTES]);
        backend.apply(batch).expect("apply");
        assert_eq!(raw(&backend).len(), before + 1 + 3);
        assert_eq!(
            backend.get(b"big").expect("get"),
            Some(vec![3; 3 * PIECE_BYTES])
        );
        let mut batch = WriteBatch::default();
        batch.delete(b"big".to_vec());
        backend.apply(batch).expect("apply");
        assert_eq!(raw(&backend).len(), before);
        // The pieces' range is the backend's own.
        let mut batch = WriteBatch::default();
        batch.put(b"\xff\xffmine".to_vec(), vec![1]);
        assert!(backend.apply(batch).is_err());
        assert_eq!(backend.get(b"small").expect("get"), Some(vec![1; 100]));
        // A defragmented copy keeps values in pieces whole.
        let mut batch = WriteBatch::default();
        batch.put(b"big2".to_vec(), vec![4; 40 << 10]);
        backend.apply(batch).expect("apply");
        backend.defragment().expect("defragment");
        assert_eq!(backend.get(b"big2").expect("get"), Some(vec![4; 40 << 10]));
        assert_eq!(contents(&backend).len(), 2);
        // Replaced by pairs where one key comes twice, large then smaller: the later wins and
        // the earlier one's pieces are gone.
        let mut pairs = vec![
            (b"a".to_vec(), vec![5; 10 * PIECE_BYTES]),
            (b"b".to_vec(), vec![6; 2 * PIECE_BYTES]),
            (b"a".to_vec(), vec![7; 3 * PIECE_BYTES]),
        ]
        .into_iter();
        assert_eq!(
            backend
                .replace_all(&mut || Ok(pairs.next()))
                .expect("replace"),
            3
        );
        assert_eq!(
            backend.get(b"a").expect("get"),
            Some(vec![7; 3 * PIECE_BYTES])
        );
        assert_eq!(
            raw(&backend).len(),
            2 + 3 + 2,
            "two descriptors and their pieces only"
        );
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
        assert_eq!(backend.dir(), beside(&path, ".1"));
        assert!(!path.exists(), "the old store is gone");
        drop(backend);
        let reopened = SledBackend::open(&path).expect("reopen");
        assert_eq!(reopened.dir(), beside(&path, ".1"));
        assert!(contents(&reopened) == model, "the copy is durable");
        reopened.defragment().expect("a second defragmentation");
        assert_eq!(reopened.dir(), beside(&path, ".2"));
        assert!(contents(&reopened) == model);
    }

    #[test]
    fn a_copy_left_by_a_crash_is_removed_and_the_store_the_pointer_names_is_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let backend = SledBackend::open(&path).expect("open");
            let mut batch = WriteBatch::default();
            batch.put(b"k".to_vec(), b"v".to_vec());
            backend.apply(batch).expect("apply");
            backend.flush().expect("flush");
        }
        // Crashed while copying: the copy is there, the pointer not yet.
        std::fs::create_dir_all(beside(&path, ".1")).expect("a partial copy");
        {
            let backend = SledBackend::open(&path).expect("open");
            assert_eq!(backend.get(b"k").expect("get"), Some(b"v".to_vec()));
            assert!(
                !beside(&path, ".1").exists(),
                "the unfinished copy is removed"
            );
            backend.defragment().expect("defragment");
        }
        // Crashed after the pointer moved, before the old store was removed.
        std::fs::create_dir_all(&path).expect("a stale old store");
        let backend = SledBackend::open(&path).expect("open");
        assert_eq!(backend.dir(), beside(&path, ".1"));
        assert!(!path.exists(), "the replaced store is removed");
        assert_eq!(backend.get(b"k").expect("get"), Some(b"v".to_vec()));
        // A pointer to nowhere is refused, naming it.
        drop(backend);
        std::fs::write(beside(&path, ".current"), "db.7\n").expect("write");
        let e = SledBackend::open(&path).err().expect("refused").to_string();
        assert!(e.contains("db.current") && e.contains("db.7"), "{e}");
    }
}
