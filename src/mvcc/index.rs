//! The in-memory key index: for every key, its revisions grouped into generations.
//!
//! A generation is one life of a key, from its creation to its deletion (tombstone). The index
//! answers "which revision holds key K as of revision R" without touching the backend.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use smallvec::SmallVec;

use super::revision::Revision;

/// A generation's revisions: most keys are written once or a few times between compactions, so
/// the first is stored inline and only a key with more takes an allocation.
type Revs = SmallVec<[Revision; 1]>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Generation {
    /// Number of puts in this generation (the tombstone is not counted).
    version: i64,
    created: Revision,
    /// Ascending; a closed generation ends with its tombstone.
    revs: Revs,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyIndex {
    /// Earlier lives of the key, each ended by a tombstone, oldest first (usually none: only a
    /// key deleted and written again since the last compaction has one).
    closed: Vec<Generation>,
    /// The current life: empty when the key is deleted now (or was never written).
    open: Generation,
}

/// What the index knows about a key at a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAt {
    pub modified: Revision,
    pub created: Revision,
    pub version: i64,
}

impl KeyIndex {
    fn put(&mut self, rev: Revision) {
        let generation = &mut self.open;
        debug_assert!(
            generation.revs.last().is_none_or(|last| *last < rev),
            "revisions must grow"
        );
        if generation.revs.is_empty() {
            generation.created = rev;
        }
        generation.revs.push(rev);
        generation.version += 1;
    }

    fn tombstone(&mut self, rev: Revision) {
        debug_assert!(self.is_live(), "tombstone of a deleted key");
        let mut ended = std::mem::take(&mut self.open);
        ended.revs.push(rev);
        self.closed.push(ended);
    }

    fn is_live(&self) -> bool {
        !self.open.revs.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.closed.is_empty() && self.open.revs.is_empty()
    }

    /// The state of the key as of `at` (main revision), or `None` if it did not exist then.
    pub fn get(&self, at: i64) -> Option<KeyAt> {
        // Newest life first: the open one, then the closed ones.
        let lives =
            std::iter::once((&self.open, false)).chain(self.closed.iter().rev().map(|g| (g, true)));
        for (generation, closed) in lives {
            let Some(first) = generation.revs.first() else {
                continue;
            };
            if first.main > at {
                continue;
            }
            if closed {
                let tombstone = generation.revs.last().expect("closed generation has revs");
                if tombstone.main <= at {
                    return None;
                }
            }
            // The newest revision of this generation at or before `at`.
            let pos = generation.revs.partition_point(|r| r.main <= at);
            debug_assert!(pos > 0);
            let modified = generation.revs[pos - 1];
            let puts_after = generation.revs.len() - pos - usize::from(closed);
            return Some(KeyAt {
                modified,
                created: generation.created,
                version: generation.version - puts_after as i64,
            });
        }
        None
    }

    /// Drops what a compaction at `at` makes unreachable; adds the revisions that must stay in
    /// the backend to `keep`. Returns `true` when nothing of the key is left.
    fn compact(&mut self, at: i64, keep: &mut HashSet<Revision>) -> bool {
        // Whole lives that ended at or before the compaction point go.
        let ended = self
            .closed
            .iter()
            .take_while(|g| g.revs.last().is_some_and(|t| t.main <= at))
            .count();
        self.closed.drain(..ended);
        for generation in self
            .closed
            .iter_mut()
            .chain(std::iter::once(&mut self.open))
        {
            let pos = generation.revs.partition_point(|r| r.main <= at);
            if pos > 0 {
                // Keep the newest revision at or before `at`; drop the older ones.
                keep.insert(generation.revs[pos - 1]);
                generation.revs.drain(..pos - 1);
            }
        }
        if self.closed.is_empty() {
            self.closed.shrink_to_fit();
        }
        if self.open.revs.spilled() && self.open.revs.len() == 1 {
            self.open.revs.shrink_to_fit();
        }
        self.is_empty()
    }

    /// Heap bytes this takes beyond its own size.
    fn heap_bytes(&self) -> usize {
        let spilled = |g: &Generation| {
            if g.revs.spilled() {
                g.revs.capacity() * REVISION_BYTES
            } else {
                0
            }
        };
        self.closed.capacity() * GENERATION_BYTES
            + self.closed.iter().map(spilled).sum::<usize>()
            + spilled(&self.open)
    }
}

/// Keys up to this many bytes are stored inline, in the slots and the tree's nodes.
const INLINE_KEY_BYTES: usize = 30;

/// A key as the index stores it: short keys (the common case) inline, longer ones on the heap,
/// shared by the slot and the tree, so that comparing a short key reads that slot or node,
/// without a pointer to follow (and, with many keys, a cache miss).
#[derive(Clone)]
enum IndexKey {
    Inline {
        len: u8,
        bytes: [u8; INLINE_KEY_BYTES],
    },
    Heap(Arc<[u8]>),
}

impl IndexKey {
    fn new(key: &[u8]) -> IndexKey {
        if key.len() <= INLINE_KEY_BYTES {
            let mut bytes = [0; INLINE_KEY_BYTES];
            bytes[..key.len()].copy_from_slice(key);
            IndexKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            IndexKey::Heap(key.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            IndexKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            IndexKey::Heap(bytes) => bytes,
        }
    }

    /// Heap bytes this takes (the shared allocation, counted once).
    fn heap_bytes(&self) -> usize {
        match self {
            IndexKey::Inline { .. } => 0,
            IndexKey::Heap(bytes) => bytes.len() + ARC_HEADER_BYTES,
        }
    }
}

// Ordered, compared and hashed as its bytes, so that the tree can be searched with a `&[u8]`.
impl std::borrow::Borrow<[u8]> for IndexKey {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for IndexKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for IndexKey {}

impl PartialOrd for IndexKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IndexKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_slice().escape_ascii().to_string())
    }
}

/// One key of the index: its bytes and its lives.
#[derive(Debug, Clone, Default)]
struct Slot {
    /// `None` while the slot is free.
    key: Option<IndexKey>,
    index: KeyIndex,
}

/// Keys that name a lease, and the lease.
pub type KeyLeases = Vec<(Vec<u8>, i64)>;

/// All keys' indexes.
#[derive(Default)]
pub struct TreeIndex {
    /// Every key's slot number, found by its key's hash: what a put, a delete and a single-key
    /// read look up. (Found in a tree instead, the search down to a key among 100,000 was 6 to
    /// 9% of the server's CPU in a 64-client put load: a cache miss or more at each level.)
    /// Only the slot number is stored (4 bytes a key); the key is compared in its slot.
    /// Hashed with aHash, keyed at random per process (std's SipHash cost twice as much).
    keys: hashbrown::HashTable<u32>,
    hasher: ahash::RandomState,
    /// The same keys and slots, in order: for ranges, which go from the tree to the slot
    /// without hashing (a paginated list's walk over a prefix looked every key up in `keys`,
    /// most of its CPU).
    order: BTreeMap<IndexKey, u32>,
    /// The keys and their indexes, by slot number.
    slots: Vec<Slot>,
    /// Slots of keys compaction removed, for new keys.
    free: Vec<u32>,
    /// Roughly the bytes all this takes (`estimate`), kept as it changes.
    bytes: usize,
}

impl std::fmt::Debug for TreeIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeIndex")
            .field("keys", &self.keys.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// What a key takes besides its slot and its heap allocations: a slot number in the hash table
/// (with its control byte and the table's spare room) and an entry in the tree's nodes (with
/// their spare room). An estimate.
const KEY_OVERHEAD_BYTES: usize = 16 + 64;
const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
const REVISION_BYTES: usize = std::mem::size_of::<Revision>();
const GENERATION_BYTES: usize = std::mem::size_of::<Generation>();
/// An `Arc`'s counts, before its bytes.
const ARC_HEADER_BYTES: usize = 16;

/// Roughly the bytes the index takes for `key` and its `index`.
fn estimate(key: &IndexKey, index: &KeyIndex) -> usize {
    SLOT_BYTES + KEY_OVERHEAD_BYTES + key.heap_bytes() + index.heap_bytes()
}

impl TreeIndex {
    pub fn put(&mut self, key: &[u8], rev: Revision) {
        self.bytes += REVISION_BYTES;
        self.slot_or_new(key).put(rev);
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The slot number of `key`, if the index holds it.
    fn find(&self, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.keys
            .find(self.hash(key), |slot| {
                slots[*slot as usize]
                    .key
                    .as_ref()
                    .is_some_and(|k| k.as_slice() == key)
            })
            .copied()
    }

    /// The index of `key`, a new one if the index does not hold it.
    fn slot_or_new(&mut self, key: &[u8]) -> &mut KeyIndex {
        let slot = match self.find(key) {
            Some(slot) => slot,
            None => self.insert_new(key),
        };
        &mut self.slots[slot as usize].index
    }

    /// Roughly the bytes the index takes in memory.
    pub fn approx_bytes(&self) -> usize {
        self.bytes
    }

    /// The key's state as of `at` (as `get`), then `rev` recorded as its newest put: one lookup.
    pub fn get_then_put(&mut self, key: &[u8], at: i64, rev: Revision) -> Option<KeyAt> {
        self.bytes += REVISION_BYTES;
        let index = self.slot_or_new(key);
        let prev = index.get(at);
        index.put(rev);
        prev
    }

    /// Adds `key`, which the index does not hold, with no revision yet; returns its slot.
    fn insert_new(&mut self, key: &[u8]) -> u32 {
        let stored = IndexKey::new(key);
        self.bytes += SLOT_BYTES + KEY_OVERHEAD_BYTES + stored.heap_bytes();
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        debug_assert!(self.slots[slot as usize].index.is_empty());
        self.order.insert(stored.clone(), slot);
        self.slots[slot as usize].key = Some(stored);
        let hash = self.hash(key);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.keys.insert_unique(hash, slot, |slot| {
            let key = slots[*slot as usize].key.as_ref().map(IndexKey::as_slice);
            hasher.hash_one(key.unwrap_or_default())
        });
        slot
    }

    /// Rebuilds from the backend, where compaction may have removed the start of a key's life:
    /// the stored value carries its creation revision and version.
    pub fn restore(&mut self, key: &[u8], rev: Revision, created_main: i64, version: i64) {
        self.bytes += REVISION_BYTES;
        let index = self.slot_or_new(key);
        if index.is_live() {
            index.put(rev);
            debug_assert_eq!(index.open.version, version);
        } else {
            let generation = &mut index.open;
            generation.created = Revision::new(created_main, 0);
            generation.revs.push(rev);
            generation.version = version;
        }
    }

    pub fn tombstone(&mut self, key: &[u8], rev: Revision) {
        if let Some(slot) = self.find(key) {
            let index = &mut self.slots[slot as usize].index;
            if index.is_live() {
                index.tombstone(rev);
                self.bytes += REVISION_BYTES + GENERATION_BYTES;
            }
        }
    }

    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyAt> {
        self.slots[self.find(key)? as usize].index.get(at)
    }

    /// Keys in `[start, end)` (`end` `None`: the single key `start`; empty `end`: no upper
    /// bound) alive at `at`, in key order; visits until `visit` returns `false`.
    pub fn range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        at: i64,
        visit: &mut dyn FnMut(&[u8], KeyAt) -> bool,
    ) {
        let Some(end) = end else {
            if let Some(found) = self.get(start, at) {
                visit(start, found);
            }
            return;
        };
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else if end <= start {
            return;
        } else {
            Bound::Excluded(end)
        };
        for (key, slot) in self.order.range::<[u8], _>((Bound::Included(start), upper)) {
            let key = key.as_slice();
            if let Some(found) = self.slots[*slot as usize].index.get(at) {
                if !visit(key, found) {
                    return;
                }
            }
        }
    }

    /// Compacts every key at `at`; returns the revisions at or before `at` still needed.
    pub fn compact(&mut self, at: i64) -> HashSet<Revision> {
        let mut keep = HashSet::new();
        let mut bytes = 0;
        let mut gone = Vec::new();
        for (key, slot) in &self.order {
            let index = &mut self.slots[*slot as usize].index;
            if index.compact(at, &mut keep) {
                gone.push(*slot);
            } else {
                bytes += estimate(key, index);
            }
        }
        for slot in gone {
            let Some(key) = self.slots[slot as usize].key.take() else {
                continue;
            };
            self.order.remove(key.as_slice());
            let hash = self.hash(key.as_slice());
            if let Ok(entry) = self.keys.find_entry(hash, |s| *s == slot) {
                entry.remove();
            }
            self.slots[slot as usize].index = KeyIndex::default();
            self.free.push(slot);
        }
        self.bytes = bytes;
        keep
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Appends every key, in key order, with its lives and `lease_of` it, to `out`, for
    /// `decode_saved`.
    pub fn encode_saved(&self, out: &mut Vec<u8>, lease_of: &dyn Fn(&[u8]) -> i64) {
        fn generation(out: &mut Vec<u8>, g: &Generation) {
            out.extend_from_slice(&g.version.to_le_bytes());
            out.extend_from_slice(&g.created.main.to_le_bytes());
            out.extend_from_slice(&g.created.sub.to_le_bytes());
            out.extend_from_slice(&(g.revs.len() as u32).to_le_bytes());
            for rev in &g.revs {
                out.extend_from_slice(&rev.main.to_le_bytes());
                out.extend_from_slice(&rev.sub.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.order.len() as u64).to_le_bytes());
        for (key, slot) in &self.order {
            let key = key.as_slice();
            let index = &self.slots[*slot as usize].index;
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&lease_of(key).to_le_bytes());
            out.extend_from_slice(&(index.closed.len() as u32).to_le_bytes());
            for g in &index.closed {
                generation(out, g);
            }
            generation(out, &index.open);
        }
    }

    /// The index `encode_saved` wrote, and the keys that name a lease; the rest of `bytes`.
    pub fn decode_saved(mut bytes: &[u8]) -> Result<(TreeIndex, KeyLeases), String> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if bytes.len() < n {
                return Err("the saved index ends early".into());
            }
            let (head, rest) = bytes.split_at(n);
            *bytes = rest;
            Ok(head)
        }
        fn u32_(bytes: &mut &[u8]) -> Result<u32, String> {
            let mut b = [0; 4];
            b.copy_from_slice(take(bytes, 4)?);
            Ok(u32::from_le_bytes(b))
        }
        fn i64_(bytes: &mut &[u8]) -> Result<i64, String> {
            let mut b = [0; 8];
            b.copy_from_slice(take(bytes, 8)?);
            Ok(i64::from_le_bytes(b))
        }
        fn generation(bytes: &mut &[u8]) -> Result<Generation, String> {
            let version = i64_(bytes)?;
            let created = Revision::new(i64_(bytes)?, i64_(bytes)?);
            let n = u32_(bytes)? as usize;
            if n > bytes.len() / 16 {
                return Err("a generation longer than the saved index".into());
            }
            let mut revs = Revs::with_capacity(n);
            for _ in 0..n {
                let rev = Revision::new(i64_(bytes)?, i64_(bytes)?);
                if revs.last().is_some_and(|last| *last >= rev) {
                    return Err("a generation's revisions out of order".into());
                }
                revs.push(rev);
            }
            Ok(Generation {
                version,
                created,
                revs,
            })
        }
        let keys = i64_(&mut bytes)? as u64;
        let mut index = TreeIndex::default();
        let mut leases = Vec::new();
        let mut previous: Option<&[u8]> = None;
        for _ in 0..keys {
            let len = u32_(&mut bytes)? as usize;
            let key = take(&mut bytes, len)?;
            if previous.is_some_and(|p| p >= key) {
                return Err("the saved index's keys are out of order".into());
            }
            let lease = i64_(&mut bytes)?;
            let closed_count = u32_(&mut bytes)? as usize;
            let mut closed = Vec::with_capacity(closed_count.min(bytes.len()));
            for _ in 0..closed_count {
                closed.push(generation(&mut bytes)?);
            }
            let open = generation(&mut bytes)?;
            let loaded = KeyIndex { closed, open };
            if loaded.is_empty() {
                return Err("a key with no revision in the saved index".into());
            }
            let slot = index.insert_new(key);
            index.bytes += loaded.heap_bytes();
            index.slots[slot as usize].index = loaded;
            if lease != 0 {
                leases.push((key.to_vec(), lease));
            }
            previous = Some(key);
        }
        if !bytes.is_empty() {
            return Err("bytes after the saved index's last key".into());
        }
        Ok((index, leases))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    #[test]
    fn slots_freed_by_compaction_serve_new_keys_without_mixing_them_up() {
        let mut index = TreeIndex::default();
        for i in 0..10i64 {
            index.put(format!("old{i}").as_bytes(), rev(i + 1));
        }
        for i in 0..10i64 {
            index.tombstone(format!("old{i}").as_bytes(), rev(20 + i));
        }
        index.compact(100);
        assert_eq!(index.len(), 0);
        assert_eq!(index.free.len(), 10, "every slot is free again");
        for i in 0..12i64 {
            index.put(format!("new{i}").as_bytes(), rev(200 + i));
        }
        assert_eq!(index.slots.len(), 12, "ten slots reused, two added");
        for i in 0..12i64 {
            let found = index.get(format!("new{i}").as_bytes(), 1000).expect("live");
            assert_eq!(found.modified, rev(200 + i));
            assert_eq!(found.version, 1);
            assert!(index.get(format!("old{i}").as_bytes(), 1000).is_none());
        }
        let mut seen = Vec::new();
        index.range(b"new", Some(b"nex"), 1000, &mut |key, at| {
            seen.push((key.to_vec(), at.modified.main));
            true
        });
        assert_eq!(seen.len(), 12);
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
    }

    #[test]
    fn the_size_estimate_follows_puts_deletes_and_compaction() {
        let mut index = TreeIndex::default();
        assert_eq!(index.approx_bytes(), 0);
        for i in 0..100i64 {
            index.put(format!("key{i:03}").as_bytes(), rev(i + 1));
        }
        let after_puts = index.approx_bytes();
        assert!(after_puts >= 100 * (SLOT_BYTES + KEY_OVERHEAD_BYTES + REVISION_BYTES));
        for i in 0..100i64 {
            index.put(format!("key{i:03}").as_bytes(), rev(200 + i));
        }
        assert_eq!(index.approx_bytes(), after_puts + 100 * REVISION_BYTES);
        for i in 0..50i64 {
            index.tombstone(format!("key{i:03}").as_bytes(), rev(400 + i));
        }
        // Compaction forgets the deleted keys and the old revisions: the estimate is then
        // exactly the sum over what is left.
        index.compact(1000);
        let left: usize = index
            .order
            .iter()
            .map(|(k, slot)| estimate(k, &index.slots[*slot as usize].index))
            .sum();
        assert_eq!(index.approx_bytes(), left);
        assert!(index.approx_bytes() < after_puts / 2 + 50 * REVISION_BYTES);
    }

    #[test]
    fn get_follows_generations_versions_and_tombstones() {
        let mut index = TreeIndex::default();
        index.put(b"a", rev(2));
        index.put(b"a", rev(4));
        index.tombstone(b"a", rev(6));
        index.put(b"a", rev(8));
        assert_eq!(index.get(b"a", 1), None);
        let at3 = index.get(b"a", 3).expect("alive at 3");
        assert_eq!(
            (at3.modified, at3.created, at3.version),
            (rev(2), rev(2), 1)
        );
        let at5 = index.get(b"a", 5).expect("alive at 5");
        assert_eq!(
            (at5.modified, at5.created, at5.version),
            (rev(4), rev(2), 2)
        );
        assert_eq!(index.get(b"a", 6), None, "deleted at its tombstone");
        assert_eq!(index.get(b"a", 7), None);
        let at9 = index.get(b"a", 9).expect("recreated");
        assert_eq!(
            (at9.modified, at9.created, at9.version),
            (rev(8), rev(8), 1)
        );
    }

    #[test]
    fn get_then_put_answers_as_get_and_records_as_put() {
        let mut one = TreeIndex::default();
        let mut two = TreeIndex::default();
        let steps = [
            (b"a", 2, false),
            (b"a", 3, false),
            (b"a", 4, true),
            (b"a", 5, false),
        ];
        for (key, main, delete) in steps {
            let rev = Revision::new(main, 0);
            if delete {
                one.tombstone(key, rev);
                two.tombstone(key, rev);
                continue;
            }
            let expected = two.get(key, main - 1);
            two.put(key, rev);
            assert_eq!(one.get_then_put(key, main - 1, rev), expected, "at {main}");
            assert_eq!(one.get(key, main), two.get(key, main));
        }
        assert_eq!(one.get_then_put(b"new", 5, Revision::new(6, 0)), None);
        assert_eq!(one.get(b"new", 6).map(|at| at.version), Some(1));
    }

    #[test]
    fn range_respects_bounds_and_liveness() {
        let mut index = TreeIndex::default();
        for (i, key) in [b"a", b"b", b"c", b"d"].iter().enumerate() {
            index.put(*key, rev(i as i64 + 2));
        }
        index.tombstone(b"c", rev(10));
        let mut seen = Vec::new();
        index.range(b"b", Some(b"d"), 20, &mut |k, _| {
            seen.push(k.to_vec());
            true
        });
        assert_eq!(seen, vec![b"b".to_vec()], "c is deleted, d is outside");
        seen.clear();
        index.range(b"a", Some(b""), 9, &mut |k, _| {
            seen.push(k.to_vec());
            true
        });
        assert_eq!(
            seen.len(),
            4,
            "empty end means no upper bound; c alive at 9"
        );
    }

    #[test]
    fn compaction_keeps_newest_revision_at_or_before_and_drops_dead_lives() {
        let mut index = TreeIndex::default();
        index.put(b"a", rev(2));
        index.put(b"a", rev(3));
        index.put(b"b", rev(4));
        index.tombstone(b"b", rev(5));
        index.put(b"a", rev(7));
        let keep = index.compact(6);
        assert!(
            keep.contains(&rev(3)) && !keep.contains(&rev(2)),
            "a keeps rev 3 only"
        );
        assert!(
            !keep.contains(&rev(4)) && !keep.contains(&rev(5)),
            "b's life ended"
        );
        assert_eq!(index.get(b"b", 10), None);
        assert_eq!(index.len(), 1, "b removed from the index");
        let at6 = index.get(b"a", 6).expect("a alive at 6");
        assert_eq!(at6.modified, rev(3));
        assert_eq!(at6.version, 2, "version survives compaction");
        assert_eq!(index.get(b"a", 8).expect("a at 8").version, 3);
    }

    fn keys_in_range(index: &TreeIndex, at: i64) -> Vec<Vec<u8>> {
        let mut seen = Vec::new();
        index.range(b"", Some(b""), at, &mut |k, _| {
            seen.push(k.to_vec());
            true
        });
        seen
    }

    #[test]
    fn inline_and_heap_keys_range_in_byte_order_and_compaction_drops_them_from_both_maps() {
        let mut index = TreeIndex::default();
        let edge = vec![b'b'; INLINE_KEY_BYTES];
        let long = vec![b'b'; INLINE_KEY_BYTES + 1];
        let longer = [long.as_slice(), b"\0"].concat();
        // Put out of order: the range must still come out in byte order.
        for (main, key) in [(2, &longer), (3, &long), (4, &b"c".to_vec()), (5, &edge)] {
            index.put(key, rev(main));
        }
        index.put(b"", rev(6));
        index.put(b"a", rev(7));
        let all = vec![
            b"".to_vec(),
            b"a".to_vec(),
            edge.clone(),
            long.clone(),
            longer.clone(),
            b"c".to_vec(),
        ];
        assert_eq!(keys_in_range(&index, 7), all);
        assert_eq!(index.get(&long, 7).map(|at| at.modified), Some(rev(3)));
        assert_eq!(index.get(&edge, 7).map(|at| at.modified), Some(rev(5)));
        let mut from_long = Vec::new();
        index.range(&long, Some(b"c"), 7, &mut |k, _| {
            from_long.push(k.to_vec());
            true
        });
        assert_eq!(from_long, vec![long.clone(), longer.clone()]);

        index.tombstone(&long, rev(8));
        index.tombstone(b"a", rev(9));
        index.compact(9);
        assert_eq!(index.len(), 4, "a and the long key are gone");
        assert_eq!(
            keys_in_range(&index, 9),
            vec![b"".to_vec(), edge.clone(), longer.clone(), b"c".to_vec()]
        );
        // A removed key comes back as a new key: in the range, at version 1.
        assert_eq!(index.get_then_put(&long, 9, rev(10)), None);
        assert_eq!(index.get(&long, 10).map(|at| at.version), Some(1));
        assert_eq!(keys_in_range(&index, 10).len(), 5);
    }

    #[test]
    fn a_saved_index_loads_as_it_was_and_damage_is_refused() {
        let mut index = TreeIndex::default();
        index.put(b"a", rev(2));
        index.put(b"a", rev(3));
        index.tombstone(b"a", rev(4));
        index.put(b"a", rev(5));
        let long = vec![b'z'; INLINE_KEY_BYTES + 9];
        index.put(&long, rev(6));
        index.put(b"b", rev(7));
        index.tombstone(b"b", rev(8));
        let mut bytes = Vec::new();
        index.encode_saved(&mut bytes, &|key| if key == b"a" { 42 } else { 0 });
        let (loaded, leases) = TreeIndex::decode_saved(&bytes).expect("loads");
        assert_eq!(leases, vec![(b"a".to_vec(), 42)]);
        assert_eq!(loaded.len(), 3);
        for at in 1..10 {
            for key in [b"a".as_slice(), b"b", &long, b"c"] {
                assert_eq!(loaded.get(key, at), index.get(key, at), "{key:?} at {at}");
            }
        }
        assert_eq!(keys_in_range(&loaded, 9), keys_in_range(&index, 9));
        assert!(loaded.approx_bytes() > 3 * SLOT_BYTES);
        // Every cut, and bytes past the end, are refused.
        for cut in [1, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                TreeIndex::decode_saved(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(TreeIndex::decode_saved(&longer).is_err());
    }
}
