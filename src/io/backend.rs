//! The `Backend` port: one ordered key/value tree holding mvcc state and its metadata.
//!
//! A handful of methods in the spirit of redb's storage backend: atomic batches, ordered scans,
//! and an explicit flush that is the only durability point.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend: {0}")]
    Store(String),
}

impl From<sled::Error> for BackendError {
    fn from(e: sled::Error) -> Self {
        match e {
            // sled shows an I/O error by its Debug form.
            sled::Error::Io(e) => BackendError::Store(format!("I/O error: {e}")),
            other => BackendError::Store(other.to_string()),
        }
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
    /// Rewrites the store compactly, giving back the space that deletions left. Reads and
    /// batches may go on meanwhile (they wait only for a short final step); every batch
    /// applied before it returns is in the rewritten store. Durable on return; a crash during
    /// it leaves the store as before or as after, whole. One at a time.
    fn defragment(&self) -> Result<(), BackendError>;
    /// Replaces the whole contents with the pairs `next` yields (until it yields `None`; of
    /// two pairs with one key, the later wins), atomically: a crash during it leaves the old contents, whole,
    /// and once it returns `Ok` the new ones are durable. The pairs are taken a batch at a
    /// time, so contents of any size go through bounded memory. The caller applies nothing
    /// meanwhile. Returns the number of pairs taken from `next`.
    fn replace_all(&self, next: &mut PairSource<'_>) -> Result<u64, BackendError> {
        let staged = self.stage_replacement(next)?;
        self.install_replacement(staged)
    }
    /// `replace_all` in two steps. This one, the long one, writes the new contents aside,
    /// durably, and leaves the store's own as they are: reads go on seeing them whole. The
    /// caller applies nothing until it installs or drops the result (dropped, it is removed).
    fn stage_replacement(&self, next: &mut PairSource<'_>) -> Result<StagedContents, BackendError>;
    /// Makes staged contents the store's, atomically and durably (a crash leaves the old or
    /// the new contents, whole): a short step. Returns the number of pairs.
    fn install_replacement(&self, staged: StagedContents) -> Result<u64, BackendError>;
}

/// New contents a backend wrote aside (`Backend::stage_replacement`), not yet its own.
pub struct StagedContents {
    /// The backend's own description of them.
    pub(crate) inner: Box<dyn std::any::Any + Send>,
    pub(crate) pairs: u64,
}

impl StagedContents {
    /// The description, if it is `T` (contents staged by this kind of backend).
    pub(crate) fn into_inner<T: 'static>(self) -> Result<(Box<T>, u64), BackendError> {
        let pairs = self.pairs;
        self.inner
            .downcast::<T>()
            .map(|inner| (inner, pairs))
            .map_err(|_| BackendError::Store("contents staged by another kind of backend".into()))
    }
}

/// Yields a backend's new contents a pair at a time (`replace_all`).
pub type PairSource<'a> = dyn FnMut() -> Result<Option<(Vec<u8>, Vec<u8>)>, BackendError> + 'a;

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

    fn stage_replacement(&self, next: &mut PairSource<'_>) -> Result<StagedContents, BackendError> {
        let mut contents: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let (mut bytes, mut pairs) = (0, 0u64);
        while let Some((key, value)) = next()? {
            pairs += 1;
            // A key given twice: the later pair wins, and only its bytes count.
            if let Some(old) = contents.get(&key) {
                bytes -= entry_bytes(&key, old);
            }
            bytes += entry_bytes(&key, &value);
            contents.insert(key, value);
        }
        Ok(StagedContents {
            inner: Box::new((contents, bytes)),
            pairs,
        })
    }

    fn install_replacement(&self, staged: StagedContents) -> Result<u64, BackendError> {
        type Contents = (BTreeMap<Vec<u8>, Vec<u8>>, u64);
        let (contents, pairs) = staged.into_inner::<Contents>()?;
        let (contents, bytes) = *contents;
        let mut images = self.lock();
        images.durable = contents.clone();
        images.live = contents;
        images.live_bytes = bytes;
        Ok(pairs)
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
        // Values of every size, and ones that look like the sled backend's own records.
        let big = |n: usize, seed: u8| {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect::<Vec<u8>>()
        };
        let looks_like_descriptor = [b"QKVPIEC1".as_slice(), &[0u8; 12]].concat();
        let sizes = [0usize, 1, 6 << 10, (6 << 10) + 1, 100 << 10, (1 << 20) + 3];
        let mut batch = WriteBatch::default();
        for (i, n) in sizes.iter().enumerate() {
            batch.put(format!("v{i}").into_bytes(), big(*n, i as u8));
        }
        batch.put(b"v9".to_vec(), looks_like_descriptor.clone());
        // One key written twice in a batch: large, then small.
        batch.put(b"w".to_vec(), big(50 << 10, 1));
        batch.put(b"w".to_vec(), b"small".to_vec());
        reopened.apply(batch).expect("apply");
        for (i, n) in sizes.iter().enumerate() {
            let got = reopened.get(format!("v{i}").as_bytes()).expect("get");
            assert_eq!(
                got,
                Some(big(*n, i as u8)),
                "a value of {n} bytes reads back whole"
            );
        }
        assert_eq!(
            reopened.get(b"v9").expect("get"),
            Some(looks_like_descriptor.clone())
        );
        assert_eq!(reopened.get(b"w").expect("get"), Some(b"small".to_vec()));
        let mut scanned = Vec::new();
        reopened
            .scan(b"v", Some(b"x"), &mut |k, v| {
                scanned.push((k.to_vec(), v.len()));
                true
            })
            .expect("scan");
        let expected: Vec<(Vec<u8>, usize)> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("v{i}").into_bytes(), *n))
            .chain([(b"v9".to_vec(), 20), (b"w".to_vec(), 5)])
            .collect();
        assert_eq!(
            scanned, expected,
            "a scan shows each key once, with its whole value"
        );
        // Overwrites both ways and deletes.
        let mut batch = WriteBatch::default();
        batch.put(b"v4".to_vec(), b"now small".to_vec());
        batch.put(b"v1".to_vec(), big(300 << 10, 7));
        batch.delete(b"v5".to_vec());
        reopened.apply(batch).expect("apply");
        reopened.flush().expect("flush");
        drop(reopened);
        let reopened = open();
        assert_eq!(
            reopened.get(b"v4").expect("get"),
            Some(b"now small".to_vec())
        );
        assert_eq!(reopened.get(b"v1").expect("get"), Some(big(300 << 10, 7)));
        assert_eq!(reopened.get(b"v5").expect("get"), None);
        assert_eq!(
            reopened.get(b"v3").expect("get"),
            Some(big((6 << 10) + 1, 3))
        );
        let mut all = Vec::new();
        reopened
            .scan(&[], None, &mut |k, _| {
                all.push(k.to_vec());
                true
            })
            .expect("scan");
        assert!(
            all.iter().all(|k| k.first() != Some(&0xff)),
            "no key but the store's: {all:?}"
        );
        // Replacing everything: only the new pairs are left, durably.
        let mut left = (0..10_000u32)
            .map(|i| (format!("r{i:05}").into_bytes(), vec![7u8; 100]))
            .chain([(b"s-big".to_vec(), vec![8u8; 200 << 10])]);
        let pairs = reopened
            .replace_all(&mut || Ok(left.next()))
            .expect("replace_all");
        assert_eq!(pairs, 10_001);
        assert_eq!(
            reopened.get(&[b'k', 9]).expect("get"),
            None,
            "the old contents go"
        );
        drop(reopened);
        let reopened = open();
        let mut count = 0;
        reopened
            .scan(&[], None, &mut |k, v| {
                if k == b"s-big" {
                    assert_eq!(v, vec![8u8; 200 << 10].as_slice());
                } else {
                    assert!(k.starts_with(b"r") && v == [7u8; 100]);
                }
                count += 1;
                true
            })
            .expect("scan");
        assert_eq!(count, 10_001, "replaced contents survive reopen");
        // A source that fails leaves the contents as they were.
        let mut failing = {
            let mut n = 0;
            move || {
                n += 1;
                if n > 5 {
                    Err(BackendError::Store("the image is damaged".into()))
                } else {
                    Ok(Some((vec![n as u8], vec![n as u8])))
                }
            }
        };
        assert!(reopened.replace_all(&mut failing).is_err());
        assert_eq!(
            reopened.get(b"r00000").expect("get"),
            Some(vec![7u8; 100]),
            "a failed replacement changes nothing"
        );
        // In two steps: staged contents are not the store's until installed, and staged
        // contents dropped change nothing.
        let mut pairs = (0..3u8).map(|i| (vec![b'n', i], vec![i; 10]));
        let staged = reopened
            .stage_replacement(&mut || Ok(pairs.next()))
            .expect("stage");
        assert_eq!(
            reopened.get(b"r00000").expect("get"),
            Some(vec![7u8; 100]),
            "reads see the old contents while new ones are staged"
        );
        assert_eq!(reopened.get(&[b'n', 1]).expect("get"), None);
        drop(staged);
        assert_eq!(reopened.get(b"r00000").expect("get"), Some(vec![7u8; 100]));
        let mut pairs = (0..3u8).map(|i| (vec![b'n', i], vec![i; 10]));
        let staged = reopened
            .stage_replacement(&mut || Ok(pairs.next()))
            .expect("stage");
        assert_eq!(reopened.install_replacement(staged).expect("install"), 3);
        assert_eq!(
            reopened.get(b"r00000").expect("get"),
            None,
            "the old contents go"
        );
        assert_eq!(reopened.get(&[b'n', 1]).expect("get"), Some(vec![1; 10]));
        drop(reopened);
        assert_eq!(
            open().get(&[b'n', 2]).expect("get"),
            Some(vec![2; 10]),
            "installed contents survive reopen"
        );
        // A key given twice: both pairs are counted as taken, and the later one wins.
        let again = open();
        let mut twice = vec![(b"t".to_vec(), vec![1; 50]), (b"t".to_vec(), vec![2; 5])].into_iter();
        assert_eq!(
            again
                .replace_all(&mut || Ok(twice.next()))
                .expect("replace_all"),
            2
        );
        assert_eq!(again.get(b"t").expect("get"), Some(vec![2; 5]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::SledBackend;

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
