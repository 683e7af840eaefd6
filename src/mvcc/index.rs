//! The in-memory key index: for every key, its revisions grouped into generations.
//!
//! A generation is one life of a key, from its creation to its deletion (tombstone). The index
//! answers "which revision holds key K as of revision R" without touching the backend.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;

use super::revision::Revision;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Generation {
    /// Number of puts in this generation (the tombstone is not counted).
    version: i64,
    created: Revision,
    /// Ascending; a closed generation ends with its tombstone.
    revs: Vec<Revision>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyIndex {
    /// The last generation is the open one (empty when the key is deleted now).
    generations: Vec<Generation>,
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
        if self.generations.is_empty() {
            self.generations.push(Generation::default());
        }
        let generation = self.generations.last_mut().expect("non-empty generations");
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
        let generation = self
            .generations
            .last_mut()
            .expect("live key has a generation");
        generation.revs.push(rev);
        self.generations.push(Generation::default());
    }

    fn is_live(&self) -> bool {
        self.generations.last().is_some_and(|g| !g.revs.is_empty())
    }

    /// The state of the key as of `at` (main revision), or `None` if it did not exist then.
    pub fn get(&self, at: i64) -> Option<KeyAt> {
        let last = self.generations.len().checked_sub(1)?;
        for (i, generation) in self.generations.iter().enumerate().rev() {
            let Some(first) = generation.revs.first() else {
                continue;
            };
            if first.main > at {
                continue;
            }
            let closed = i != last;
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
        let last = self.generations.len() - 1;
        let mut remove_upto = 0;
        for (i, generation) in self.generations.iter_mut().enumerate() {
            let closed = i != last;
            if closed && generation.revs.last().is_some_and(|t| t.main <= at) {
                // The whole life ended before the compaction point.
                remove_upto = i + 1;
                continue;
            }
            let pos = generation.revs.partition_point(|r| r.main <= at);
            if pos > 0 {
                // Keep the newest revision at or before `at`; drop the older ones.
                keep.insert(generation.revs[pos - 1]);
                generation.revs.drain(..pos - 1);
            }
        }
        self.generations.drain(..remove_upto);
        self.generations.iter().all(|g| g.revs.is_empty())
    }
}

/// Keys up to this many bytes are stored inline, in the map's entries and the tree's nodes.
const INLINE_KEY_BYTES: usize = 30;

/// A key as the index stores it: short keys (the common case) inline, longer ones on the heap,
/// so that comparing a key in the hash map or in a tree node reads that entry or node, without a
/// pointer to follow (and, with many keys, a cache miss).
#[derive(Clone)]
enum IndexKey {
    Inline {
        len: u8,
        bytes: [u8; INLINE_KEY_BYTES],
    },
    Heap(Box<[u8]>),
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
}

// Ordered, compared and hashed as its bytes, so that the map and the tree can be searched with
// a `&[u8]`.
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

impl std::hash::Hash for IndexKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

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

/// All keys' indexes.
#[derive(Debug, Default)]
pub struct TreeIndex {
    /// Every key's slot, found by its key's hash: what a put, a delete and a single-key read
    /// look up. (Found in a tree instead, the search down to a key among 100,000 was 6 to 9% of
    /// the server's CPU in a 64-client put load: a cache miss or more at each level.) Hashed
    /// with aHash, keyed at random per process (std's SipHash cost twice as much).
    keys: HashMap<IndexKey, u32, ahash::RandomState>,
    /// The same keys and slots, in order: for ranges, which go from the tree to the slot
    /// without hashing (a paginated list's walk over a prefix looked every key up in `keys`,
    /// most of its CPU).
    order: BTreeMap<IndexKey, u32>,
    /// The keys' indexes, by slot.
    slots: Vec<KeyIndex>,
    /// Slots of keys compaction removed, for new keys.
    free: Vec<u32>,
    /// Roughly the bytes all this takes (`estimate`), kept as it changes.
    bytes: usize,
}

/// What the index takes per key besides the key's bytes and its revisions: its entries in the
/// hash map and the tree, the key's allocation, and the `KeyIndex` (an estimate).
const KEY_OVERHEAD_BYTES: usize = 96;
const REVISION_BYTES: usize = std::mem::size_of::<Revision>();
const GENERATION_BYTES: usize = std::mem::size_of::<Generation>();

/// Roughly the bytes the index takes for `key` and its `index`.
fn estimate(key: &[u8], index: &KeyIndex) -> usize {
    key.len()
        + KEY_OVERHEAD_BYTES
        + index
            .generations
            .iter()
            .map(|g| GENERATION_BYTES + g.revs.len() * REVISION_BYTES)
            .sum::<usize>()
}

impl TreeIndex {
    pub fn put(&mut self, key: &[u8], rev: Revision) {
        self.bytes += REVISION_BYTES;
        self.slot_or_new(key).put(rev);
    }

    /// The index of `key`, a new one if the index does not hold it.
    fn slot_or_new(&mut self, key: &[u8]) -> &mut KeyIndex {
        let slot = match self.keys.get(key) {
            Some(slot) => *slot,
            None => self.insert_new(key),
        };
        &mut self.slots[slot as usize]
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
        self.bytes += key.len() + KEY_OVERHEAD_BYTES + GENERATION_BYTES;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(KeyIndex::default());
                (self.slots.len() - 1) as u32
            }
        };
        debug_assert!(self.slots[slot as usize].generations.is_empty());
        let key = IndexKey::new(key);
        self.order.insert(key.clone(), slot);
        self.keys.insert(key, slot);
        slot
    }

    /// Rebuilds from the backend, where compaction may have removed the start of a key's life:
    /// the stored value carries its creation revision and version.
    pub fn restore(&mut self, key: &[u8], rev: Revision, created_main: i64, version: i64) {
        self.bytes += REVISION_BYTES;
        let index = self.slot_or_new(key);
        if index.is_live() {
            index.put(rev);
            debug_assert_eq!(index.generations.last().map(|g| g.version), Some(version));
        } else {
            if index.generations.is_empty() {
                index.generations.push(Generation::default());
            }
            let generation = index.generations.last_mut().expect("a generation");
            generation.created = Revision::new(created_main, 0);
            generation.revs.push(rev);
            generation.version = version;
        }
    }

    pub fn tombstone(&mut self, key: &[u8], rev: Revision) {
        if let Some(slot) = self.keys.get(key) {
            let index = &mut self.slots[*slot as usize];
            if index.is_live() {
                index.tombstone(rev);
                self.bytes += REVISION_BYTES + GENERATION_BYTES;
            }
        }
    }

    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyAt> {
        self.slots[*self.keys.get(key)? as usize].get(at)
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
            if let Some(found) = self.slots[*slot as usize].get(at) {
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
            let index = &mut self.slots[*slot as usize];
            if index.compact(at, &mut keep) {
                gone.push(key.clone());
            } else {
                bytes += estimate(key.as_slice(), index);
            }
        }
        for key in gone {
            if let Some(slot) = self.order.remove(&key) {
                self.keys.remove(&key);
                self.slots[slot as usize] = KeyIndex::default();
                self.free.push(slot);
            }
        }
        self.bytes = bytes;
        keep
    }

    pub fn len(&self) -> usize {
        self.keys.len()
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
        assert!(after_puts >= 100 * (6 + KEY_OVERHEAD_BYTES + REVISION_BYTES));
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
            .map(|(k, slot)| estimate(k.as_slice(), &index.slots[*slot as usize]))
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
}
