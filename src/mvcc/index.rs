//! The in-memory key index: for every key, its revisions grouped into generations.
//!
//! A generation is one life of a key, from its creation to its deletion (tombstone). The index
//! answers "which revision holds key K as of revision R" without touching the backend.

use std::collections::HashSet;

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
struct KeyIndex {
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
    fn get(&self, at: i64) -> Option<KeyAt> {
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

/// A revision in one word: `main` in the high bits, `sub` in the low `SUB_BITS`. A revision
/// outside that range (a `sub` of a million or more, a `main` past 2^43) is never packed: its key
/// keeps its lives in the general form instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u64);

const SUB_BITS: u32 = 20;

impl Packed {
    fn new(rev: Revision) -> Option<Packed> {
        let main = u64::try_from(rev.main).ok()?;
        let sub = u64::try_from(rev.sub).ok()?;
        (main < 1 << (63 - SUB_BITS) && sub < 1 << SUB_BITS)
            .then_some(Packed(main << SUB_BITS | sub))
    }

    fn get(self) -> Revision {
        Revision::new(
            (self.0 >> SUB_BITS) as i64,
            (self.0 & ((1 << SUB_BITS) - 1)) as i64,
        )
    }
}

/// A key's lives. Most keys, between compactions, have one life and one revision in it: that
/// is held in the slot, in 24 bytes; a key with more (written again, deleted) has the general
/// form on the heap until a compaction leaves it one revision again.
#[derive(Debug, Clone, Default)]
enum Lives {
    /// A free slot (or one whose key is being added).
    #[default]
    None,
    One {
        created: Packed,
        modified: Packed,
        version: u32,
    },
    Many(Box<KeyIndex>),
}

impl Lives {
    /// `index` in the compact form when it fits, else boxed.
    fn from(index: KeyIndex) -> Lives {
        if index.closed.is_empty() && index.open.revs.len() == 1 {
            if let (Some(created), Some(modified), Ok(version)) = (
                Packed::new(index.open.created),
                Packed::new(index.open.revs[0]),
                u32::try_from(index.open.version),
            ) {
                return Lives::One {
                    created,
                    modified,
                    version,
                };
            }
        }
        if index.is_empty() {
            return Lives::None;
        }
        Lives::Many(Box::new(index))
    }

    /// The general form, to change (boxed from now on; a compaction may make it compact
    /// again).
    fn general(&mut self) -> &mut KeyIndex {
        if !matches!(self, Lives::Many(_)) {
            let index = match std::mem::take(self) {
                Lives::One {
                    created,
                    modified,
                    version,
                } => KeyIndex {
                    closed: Vec::new(),
                    open: Generation {
                        version: i64::from(version),
                        created: created.get(),
                        revs: Revs::from_elem(modified.get(), 1),
                    },
                },
                Lives::None | Lives::Many(_) => KeyIndex::default(),
            };
            *self = Lives::Many(Box::new(index));
        }
        match self {
            Lives::Many(index) => index,
            Lives::None | Lives::One { .. } => unreachable!("made general above"),
        }
    }

    fn put(&mut self, rev: Revision) {
        if let Lives::None = self {
            if let Some(packed) = Packed::new(rev) {
                *self = Lives::One {
                    created: packed,
                    modified: packed,
                    version: 1,
                };
                return;
            }
        }
        self.general().put(rev);
    }

    fn is_live(&self) -> bool {
        match self {
            Lives::None => false,
            Lives::One { .. } => true,
            Lives::Many(index) => index.is_live(),
        }
    }

    fn get(&self, at: i64) -> Option<KeyAt> {
        match self {
            Lives::None => None,
            Lives::One {
                created,
                modified,
                version,
            } => {
                let modified = modified.get();
                (modified.main <= at).then(|| KeyAt {
                    modified,
                    created: created.get(),
                    version: i64::from(*version),
                })
            }
            Lives::Many(index) => index.get(at),
        }
    }

    /// As `KeyIndex::compact`; a key left with one revision goes back to the compact form.
    fn compact(&mut self, at: i64, keep: &mut HashSet<Revision>) -> bool {
        match self {
            Lives::None => true,
            Lives::One { modified, .. } => {
                let modified = modified.get();
                if modified.main <= at {
                    keep.insert(modified);
                }
                false
            }
            Lives::Many(index) => {
                let gone = index.compact(at, keep);
                if !gone && index.closed.is_empty() && index.open.revs.len() == 1 {
                    *self = Lives::from(std::mem::take(index));
                }
                gone
            }
        }
    }

    /// The general form's copy, for saving.
    fn to_general(&self) -> KeyIndex {
        let mut copy = self.clone();
        std::mem::take(copy.general())
    }

    /// Heap bytes this takes beyond its own size.
    fn heap_bytes(&self) -> usize {
        match self {
            Lives::None | Lives::One { .. } => 0,
            Lives::Many(index) => KEY_INDEX_BYTES + index.heap_bytes(),
        }
    }
}

/// Where a slot's key is in the key arena.
#[derive(Debug, Clone, Copy, Default)]
struct KeyRef {
    at: u64,
    len: u32,
}

/// One key of the index: where its bytes are and its lives.
#[derive(Debug, Clone, Default)]
struct Slot {
    key: KeyRef,
    lives: Lives,
}

/// Every key's bytes, end to end in one buffer (a key is one `KeyRef` in its slot, not an
/// allocation of its own). Keys removed by compaction leave their bytes behind until they are
/// half the buffer, then the live keys are copied into a new one, in key order.
#[derive(Default)]
struct Arena {
    bytes: Vec<u8>,
    garbage: usize,
}

/// The slots and the arena, read together: a slot's key.
#[derive(Clone, Copy)]
struct Keys<'a> {
    slots: &'a [Slot],
    arena: &'a [u8],
}

impl<'a> Keys<'a> {
    fn of(&self, slot: u32) -> &'a [u8] {
        let key = self.slots[slot as usize].key;
        let at = key.at as usize;
        &self.arena[at..at + key.len as usize]
    }
}

/// Slot numbers in key order: a sorted sequence cut into chunks of at most `CHUNK_MAX`, found
/// by binary search over the chunks' first keys and then within a chunk (4 to 8 bytes a key;
/// an insert moves at most one chunk's numbers).
#[derive(Default)]
struct Order {
    chunks: Vec<Vec<u32>>,
}

const CHUNK_MAX: usize = 512;

fn chunk() -> Vec<u32> {
    Vec::with_capacity(CHUNK_MAX + 1)
}

impl Order {
    /// Slots already in key order.
    fn from_sorted(slots: impl IntoIterator<Item = u32>) -> Order {
        let mut chunks = Vec::new();
        let mut current = chunk();
        for slot in slots {
            if current.len() == CHUNK_MAX {
                chunks.push(std::mem::replace(&mut current, chunk()));
            }
            current.push(slot);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        Order { chunks }
    }

    /// The chunk and position of the first key at or after `key` (the position may be the
    /// chunk's length: the next chunk's start).
    fn lower_bound(&self, keys: Keys<'_>, key: &[u8]) -> (usize, usize) {
        let after = self.chunks.partition_point(|c| keys.of(c[0]) <= key);
        let Some(c) = after.checked_sub(1) else {
            return (0, 0);
        };
        (c, self.chunks[c].partition_point(|s| keys.of(*s) < key))
    }

    fn insert(&mut self, keys: Keys<'_>, slot: u32, key: &[u8]) {
        if self.chunks.is_empty() {
            let mut first = chunk();
            first.push(slot);
            self.chunks.push(first);
            return;
        }
        let (c, pos) = self.lower_bound(keys, key);
        let current = &mut self.chunks[c];
        current.insert(pos, slot);
        if current.len() > CHUNK_MAX {
            // Keys added in order (a fill, a load, a new prefix) go on at a chunk's end and
            // fill each chunk; others split it in half.
            let cut = if pos + 1 == current.len() {
                current.len() - 1
            } else {
                current.len() / 2
            };
            let mut tail = chunk();
            tail.extend(current.drain(cut..));
            self.chunks.insert(c + 1, tail);
        }
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().flatten().copied()
    }

    fn bytes(&self) -> usize {
        self.chunks.len() * ((CHUNK_MAX + 1) * 4 + 24)
    }
}

/// Keys that name a lease, and the lease.
pub type KeyLeases = Vec<(Vec<u8>, i64)>;

/// All keys' indexes.
#[derive(Default)]
pub struct TreeIndex {
    /// Every key's slot number, found by its key's hash: what a put, a delete and a single-key
    /// read look up. (Found in a tree instead, the search down to a key among 100,000 was 6 to
    /// 9% of the server's CPU in a 64-client put load: a cache miss or more at each level.)
    /// Only the slot number is stored (4 bytes a key); the key is compared in the arena.
    /// Hashed with aHash, keyed at random per process (std's SipHash cost twice as much).
    keys: hashbrown::HashTable<u32>,
    hasher: ahash::RandomState,
    /// The same slots in key order: for ranges, which go from it to the slot without hashing
    /// (a paginated list's walk over a prefix looked every key up in `keys`, most of its CPU).
    order: Order,
    /// The keys' places in the arena and their lives, by slot number.
    slots: Vec<Slot>,
    arena: Arena,
    /// Slots of keys compaction removed, for new keys.
    free: Vec<u32>,
    /// Roughly the bytes the keys and their lives take (`estimate`), kept as it changes; the
    /// order's chunks and the arena's garbage are added when asked.
    bytes: usize,
}

impl std::fmt::Debug for TreeIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeIndex")
            .field("keys", &self.keys.len())
            .field("bytes", &self.approx_bytes())
            .finish()
    }
}

/// What a key takes besides its slot, its bytes and its lives' heap: a slot number in the hash
/// table with its control byte and the table's spare room. An estimate.
const KEY_OVERHEAD_BYTES: usize = 6;
const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
const REVISION_BYTES: usize = std::mem::size_of::<Revision>();
const GENERATION_BYTES: usize = std::mem::size_of::<Generation>();
const KEY_INDEX_BYTES: usize = std::mem::size_of::<KeyIndex>();

/// Roughly the bytes the index takes for a key of `key_len` bytes with `lives`.
fn estimate(key_len: usize, lives: &Lives) -> usize {
    SLOT_BYTES + KEY_OVERHEAD_BYTES + key_len + lives.heap_bytes()
}

impl TreeIndex {
    pub fn put(&mut self, key: &[u8], rev: Revision) {
        self.change(key, |lives| lives.put(rev));
    }

    /// Changes the lives of `key` (added if new) by `change`, and the estimate by what that
    /// allocated or freed.
    fn change<R>(&mut self, key: &[u8], change: impl FnOnce(&mut Lives) -> R) -> R {
        let slot = match self.find(key) {
            Some(slot) => slot,
            None => self.insert_new(key),
        };
        let lives = &mut self.slots[slot as usize].lives;
        let before = lives.heap_bytes();
        let out = change(lives);
        let after = lives.heap_bytes();
        self.bytes = (self.bytes + after).saturating_sub(before);
        out
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn keys(&self) -> Keys<'_> {
        Keys {
            slots: &self.slots,
            arena: &self.arena.bytes,
        }
    }

    /// The slot number of `key`, if the index holds it.
    fn find(&self, key: &[u8]) -> Option<u32> {
        let keys = self.keys();
        self.keys
            .find(self.hash(key), |slot| keys.of(*slot) == key)
            .copied()
    }

    /// Roughly the bytes the index takes in memory.
    pub fn approx_bytes(&self) -> usize {
        self.bytes + self.order.bytes() + self.arena.garbage
    }

    /// The key's state as of `at` (as `get`), then `rev` recorded as its newest put: one lookup.
    pub fn get_then_put(&mut self, key: &[u8], at: i64, rev: Revision) -> Option<KeyAt> {
        self.change(key, |lives| {
            let prev = lives.get(at);
            lives.put(rev);
            prev
        })
    }

    /// Adds `key`, which the index does not hold, with no revision yet; returns its slot.
    fn insert_new(&mut self, key: &[u8]) -> u32 {
        let slot = self.add_key(key);
        let keys = Keys {
            slots: &self.slots,
            arena: &self.arena.bytes,
        };
        self.order.insert(keys, slot, key);
        slot
    }

    /// Stores `key` (not held) in the arena, a slot and the hash table, with no lives yet and
    /// not in the order; returns its slot.
    fn add_key(&mut self, key: &[u8]) -> u32 {
        self.bytes += estimate(key.len(), &Lives::None);
        let stored = KeyRef {
            at: self.arena.bytes.len() as u64,
            len: u32::try_from(key.len()).expect("a key of 4 GiB or more"),
        };
        self.arena.bytes.extend_from_slice(key);
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        debug_assert!(matches!(self.slots[slot as usize].lives, Lives::None));
        self.slots[slot as usize].key = stored;
        let hash = self.hasher.hash_one(key);
        let (keys, hasher) = (
            Keys {
                slots: &self.slots,
                arena: &self.arena.bytes,
            },
            &self.hasher,
        );
        self.keys
            .insert_unique(hash, slot, |slot| hasher.hash_one(keys.of(*slot)));
        slot
    }

    /// Rebuilds from the backend, where compaction may have removed the start of a key's life:
    /// the stored value carries its creation revision and version.
    pub fn restore(&mut self, key: &[u8], rev: Revision, created_main: i64, version: i64) {
        self.change(key, |lives| {
            if lives.is_live() {
                lives.put(rev);
                debug_assert_eq!(lives.get(i64::MAX).map(|at| at.version), Some(version));
                return;
            }
            // A new life, after the ended ones the key may have.
            let earlier = match std::mem::take(lives) {
                Lives::Many(index) => index.closed,
                Lives::None | Lives::One { .. } => Vec::new(),
            };
            let mut restored = KeyIndex {
                closed: earlier,
                open: Generation::default(),
            };
            restored.open.created = Revision::new(created_main, 0);
            restored.open.revs.push(rev);
            restored.open.version = version;
            *lives = Lives::from(restored);
        });
    }

    pub fn tombstone(&mut self, key: &[u8], rev: Revision) {
        if self.find(key).is_some() {
            self.change(key, |lives| {
                if lives.is_live() {
                    lives.general().tombstone(rev);
                }
            });
        }
    }

    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyAt> {
        self.slots[self.find(key)? as usize].lives.get(at)
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
        if !end.is_empty() && end <= start {
            return;
        }
        let keys = self.keys();
        let (first, mut pos) = self.order.lower_bound(keys, start);
        for chunk in self.order.chunks.iter().skip(first) {
            for slot in chunk.iter().skip(pos) {
                let key = keys.of(*slot);
                if !end.is_empty() && key >= end {
                    return;
                }
                if let Some(found) = self.slots[*slot as usize].lives.get(at) {
                    if !visit(key, found) {
                        return;
                    }
                }
            }
            pos = 0;
        }
    }

    /// Compacts every key at `at`; returns the revisions at or before `at` still needed.
    pub fn compact(&mut self, at: i64) -> HashSet<Revision> {
        let mut keep = HashSet::new();
        let mut bytes = 0;
        let mut gone = Vec::new();
        let mut kept = Vec::with_capacity(self.keys.len());
        for slot in self.order.iter() {
            let Slot { key, lives } = &mut self.slots[slot as usize];
            if lives.compact(at, &mut keep) {
                gone.push(slot);
            } else {
                bytes += estimate(key.len as usize, lives);
                kept.push(slot);
            }
        }
        if !gone.is_empty() {
            self.order = Order::from_sorted(kept);
        }
        for slot in gone {
            let key = self.keys().of(slot);
            let hash = self.hash(key);
            if let Ok(entry) = self.keys.find_entry(hash, |s| *s == slot) {
                entry.remove();
            }
            let Slot { key, lives } = &mut self.slots[slot as usize];
            self.arena.garbage += key.len as usize;
            *key = KeyRef::default();
            *lives = Lives::None;
            self.free.push(slot);
        }
        if self.arena.garbage > self.arena.bytes.len() / 2 {
            self.repack_arena();
        }
        self.bytes = bytes;
        keep
    }

    /// Copies the live keys into a new arena, in key order, leaving the removed ones' bytes.
    fn repack_arena(&mut self) {
        let live = self.arena.bytes.len() - self.arena.garbage;
        let mut bytes = Vec::with_capacity(live);
        for slot in self.order.iter() {
            let key = &mut self.slots[slot as usize].key;
            let at = key.at as usize;
            let old = &self.arena.bytes[at..at + key.len as usize];
            key.at = bytes.len() as u64;
            bytes.extend_from_slice(old);
        }
        self.arena = Arena { bytes, garbage: 0 };
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
        let keys = self.keys();
        out.extend_from_slice(&(self.keys.len() as u64).to_le_bytes());
        for slot in self.order.iter() {
            let key = keys.of(slot);
            let general;
            let index = match &self.slots[slot as usize].lives {
                Lives::Many(index) => index,
                compact => {
                    general = compact.to_general();
                    &general
                }
            };
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
        let mut sorted = Vec::new();
        for _ in 0..keys {
            let len = u32_(&mut bytes)? as usize;
            let key = take(&mut bytes, len)?;
            if previous.is_some_and(|p| p >= key) {
                return Err("the saved index's keys are out of order".into());
            }
            let lease = i64_(&mut bytes)?;
            let closed_count = u32_(&mut bytes)? as usize;
            // A generation takes 28 bytes at least.
            let mut closed = Vec::with_capacity(closed_count.min(bytes.len() / 28));
            for _ in 0..closed_count {
                closed.push(generation(&mut bytes)?);
            }
            let open = generation(&mut bytes)?;
            let loaded = KeyIndex { closed, open };
            if loaded.is_empty() {
                return Err("a key with no revision in the saved index".into());
            }
            // In key order: the order is built from them at the end, in one pass.
            let lives = Lives::from(loaded);
            let slot = index.add_key(key);
            index.bytes += lives.heap_bytes();
            index.slots[slot as usize].lives = lives;
            sorted.push(slot);
            if lease != 0 {
                leases.push((key.to_vec(), lease));
            }
            previous = Some(key);
        }
        if !bytes.is_empty() {
            return Err("bytes after the saved index's last key".into());
        }
        index.order = Order::from_sorted(sorted);
        Ok((index, leases))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    /// Keys around a length the layout once treated apart.
    const INLINE_KEY_BYTES: usize = 30;

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
        // What the estimate should be: the sum over the keys, the order's chunks and the
        // arena's garbage.
        let exact = |index: &TreeIndex| {
            let keys: usize = index
                .order
                .iter()
                .map(|slot| {
                    let slot = &index.slots[slot as usize];
                    estimate(slot.key.len as usize, &slot.lives)
                })
                .sum();
            keys + index.order.bytes() + index.arena.garbage
        };
        let mut index = TreeIndex::default();
        assert_eq!(index.approx_bytes(), 0);
        for i in 0..100i64 {
            index.put(format!("key{i:03}").as_bytes(), rev(i + 1));
        }
        let after_puts = index.approx_bytes();
        assert_eq!(after_puts, exact(&index));
        assert!(after_puts >= 100 * (SLOT_BYTES + KEY_OVERHEAD_BYTES + 6));
        for i in 0..100i64 {
            index.put(format!("key{i:03}").as_bytes(), rev(200 + i));
        }
        // Written twice: each key's lives are boxed now, and counted.
        assert_eq!(index.approx_bytes(), exact(&index));
        assert!(index.approx_bytes() >= after_puts + 100 * (KEY_INDEX_BYTES + REVISION_BYTES));
        for i in 0..50i64 {
            index.tombstone(format!("key{i:03}").as_bytes(), rev(400 + i));
        }
        index.restore(b"key000", rev(500), 500, 1);
        assert_eq!(index.approx_bytes(), exact(&index));
        // Compaction forgets the deleted keys and the old revisions: the estimate is then
        // exactly the sum over what is left.
        index.compact(1000);
        assert_eq!(index.approx_bytes(), exact(&index));
        assert!(
            index.approx_bytes() < after_puts,
            "51 keys, compact again, take less than 100"
        );
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
    fn keys_of_every_length_range_in_byte_order_and_compaction_drops_them_from_both_maps() {
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

    /// A xorshift generator: the same keys every run.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn random_key(state: &mut u64) -> Vec<u8> {
        let len = (next(state) % 40) as usize;
        (0..len)
            .map(|_| b"abc/\0\xff"[(next(state) % 6) as usize])
            .collect()
    }

    #[test]
    fn keys_in_random_order_range_as_a_sorted_map_through_splits_compaction_and_repacking() {
        use std::collections::BTreeMap;
        let mut index = TreeIndex::default();
        let mut model = BTreeMap::new();
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let mut main = 1;
        let check = |index: &TreeIndex, model: &BTreeMap<Vec<u8>, i64>, state: &mut u64| {
            let all: Vec<(Vec<u8>, i64)> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let mut seen = Vec::new();
            index.range(b"", Some(b""), i64::MAX, &mut |k, at| {
                seen.push((k.to_vec(), at.modified.main));
                true
            });
            assert_eq!(seen, all);
            for _ in 0..200 {
                let (a, b) = (random_key(state), random_key(state));
                let mut got = Vec::new();
                index.range(&a, Some(&b), i64::MAX, &mut |k, _| {
                    got.push(k.to_vec());
                    true
                });
                let want: Vec<Vec<u8>> = if b.is_empty() {
                    model.range(a.clone()..).map(|(k, _)| k.clone()).collect()
                } else if b <= a {
                    Vec::new()
                } else {
                    model
                        .range(a.clone()..b.clone())
                        .map(|(k, _)| k.clone())
                        .collect()
                };
                assert_eq!(got, want, "[{a:?}, {b:?})");
            }
            assert_eq!(index.len(), model.len());
            assert!(index
                .order
                .chunks
                .iter()
                .all(|c| !c.is_empty() && c.len() <= CHUNK_MAX));
        };
        for _ in 0..6000 {
            let key = random_key(&mut state);
            main += 1;
            index.put(&key, rev(main));
            model.insert(key, main);
        }
        assert!(
            index.order.chunks.len() > 4,
            "{} chunks",
            index.order.chunks.len()
        );
        check(&index, &model, &mut state);
        // Delete two keys in three, compact: they leave the hash table, the order and the
        // arena, which is packed again once half of it is theirs.
        let keys: Vec<Vec<u8>> = model.keys().cloned().collect();
        for (i, key) in keys.iter().enumerate() {
            if i % 3 != 0 {
                main += 1;
                index.tombstone(key, rev(main));
                model.remove(key);
            }
        }
        index.compact(main);
        assert_eq!(index.arena.garbage, 0, "packed again");
        let live: usize = model.keys().map(Vec::len).sum();
        assert_eq!(index.arena.bytes.len(), live);
        check(&index, &model, &mut state);
        for (key, main) in &model {
            let at = index.get(key, i64::MAX).expect("live");
            assert_eq!(at.modified, rev(*main));
        }
        // New keys take the freed slots.
        for _ in 0..3000 {
            let key = random_key(&mut state);
            main += 1;
            index.put(&key, rev(main));
            model.insert(key, main);
        }
        check(&index, &model, &mut state);
    }

    #[test]
    fn lives_that_do_not_fit_the_compact_form_keep_the_general_one_until_compaction_fits_them() {
        let mut index = TreeIndex::default();
        let big_main = Revision::new(1 << 44, 0);
        let big_sub = Revision::new(3, 1 << SUB_BITS);
        index.put(b"main", big_main);
        index.put(b"sub", big_sub);
        index.restore(b"version", rev(5), 4, i64::from(u32::MAX) + 5);
        index.put(b"twice", rev(6));
        index.put(b"twice", rev(7));
        index.put(b"once", rev(8));
        let lives = |index: &TreeIndex, key: &[u8]| {
            index.slots[index.find(key).expect("held") as usize]
                .lives
                .clone()
        };
        for key in [b"main".as_slice(), b"sub", b"version", b"twice"] {
            assert!(matches!(lives(&index, key), Lives::Many(_)), "{key:?}");
        }
        assert!(matches!(lives(&index, b"once"), Lives::One { .. }));
        assert_eq!(
            index.get(b"main", i64::MAX).map(|at| at.modified),
            Some(big_main)
        );
        assert_eq!(index.get(b"sub", 3).map(|at| at.created), Some(big_sub));
        let version = index.get(b"version", 5).expect("restored");
        assert_eq!(
            (version.version, version.created, version.modified),
            (i64::from(u32::MAX) + 5, rev(4), rev(5))
        );
        let twice = index.get(b"twice", 7).expect("live");
        assert_eq!((twice.version, twice.created), (2, rev(6)));
        assert_eq!(index.get(b"twice", 6).map(|at| at.version), Some(1));
        // Compaction leaves "twice" one revision: compact again, and read the same.
        let keep = index.compact(7);
        assert!(keep.contains(&rev(7)) && !keep.contains(&rev(6)));
        assert!(matches!(lives(&index, b"twice"), Lives::One { .. }));
        assert_eq!(index.get(b"twice", 7), Some(twice));
        assert!(
            matches!(lives(&index, b"version"), Lives::Many(_)),
            "too big still"
        );
    }

    #[test]
    fn a_life_restored_after_a_tombstone_keeps_the_ended_one() {
        let mut index = TreeIndex::default();
        index.restore(b"k", rev(5), 5, 1);
        index.tombstone(b"k", rev(55));
        index.restore(b"k", rev(56), 56, 1);
        assert_eq!(index.get(b"k", 20).map(|at| at.modified), Some(rev(5)));
        assert_eq!(index.get(b"k", 55), None);
        let now = index.get(b"k", 56).expect("live again");
        assert_eq!((now.created, now.version), (rev(56), 1));
    }

    #[test]
    fn keys_added_in_order_fill_their_chunks_at_the_end_and_in_the_middle_of_the_key_space() {
        let mut index = TreeIndex::default();
        let mut main = 1;
        let mut put = |index: &mut TreeIndex, key: String| {
            main += 1;
            index.put(key.as_bytes(), rev(main));
        };
        for i in 0..2048 {
            put(&mut index, format!("b{i:05}"));
        }
        put(&mut index, "z".to_string());
        assert_eq!(index.order.chunks.len(), 5, "four full chunks and z's");
        // A new prefix between existing keys, written in order.
        for i in 0..2048 {
            put(&mut index, format!("c{i:05}"));
        }
        assert!(
            index.order.chunks.len() <= 10,
            "{} chunks",
            index.order.chunks.len()
        );
        assert_eq!(keys_in_range(&index, i64::MAX).len(), 4097);
    }

    #[test]
    fn the_compact_form_answers_as_the_general_one() {
        // The same history twice: once left compact by compaction, once kept general by a
        // later revision it cannot pack.
        let mut index = TreeIndex::default();
        for key in [b"k".as_slice(), b"g"] {
            index.put(key, Revision::new(2, 1));
            index.put(key, Revision::new(3, 0));
            index.put(key, Revision::new(4, 7));
        }
        index.put(b"g", Revision::new(1 << 44, 0));
        index.compact(10);
        let lives = |key: &[u8]| {
            index.slots[index.find(key).expect("held") as usize]
                .lives
                .clone()
        };
        assert!(matches!(lives(b"k"), Lives::One { .. }));
        assert!(matches!(lives(b"g"), Lives::Many(_)));
        for at in [1, 2, 3, 4, 5, 10] {
            assert_eq!(index.get(b"k", at), index.get(b"g", at), "at {at}");
        }
        let at4 = index.get(b"k", 4).expect("live");
        assert_eq!(
            (at4.modified, at4.created, at4.version),
            (Revision::new(4, 7), Revision::new(2, 1), 3)
        );
        assert_eq!(index.get(b"k", 3), None, "compacted away");
    }
}
