//! The in-memory key index: for every key, its revisions grouped into generations.
//!
//! A generation is one life of a key, from its creation to its deletion (tombstone). The index
//! answers "which revision holds key K as of revision R" without touching the backend.

use std::collections::{BTreeMap, HashSet};
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

/// All keys' indexes, ordered by key.
#[derive(Debug, Default)]
pub struct TreeIndex {
    keys: BTreeMap<Vec<u8>, KeyIndex>,
}

impl TreeIndex {
    pub fn put(&mut self, key: &[u8], rev: Revision) {
        match self.keys.get_mut(key) {
            Some(index) => index.put(rev),
            None => {
                let mut index = KeyIndex::default();
                index.put(rev);
                self.keys.insert(key.to_vec(), index);
            }
        }
    }

    /// The key's state as of `at` (as `get`), then `rev` recorded as its newest put: one lookup.
    pub fn get_then_put(&mut self, key: &[u8], at: i64, rev: Revision) -> Option<KeyAt> {
        match self.keys.get_mut(key) {
            Some(index) => {
                let prev = index.get(at);
                index.put(rev);
                prev
            }
            None => {
                let mut index = KeyIndex::default();
                index.put(rev);
                self.keys.insert(key.to_vec(), index);
                None
            }
        }
    }

    /// Rebuilds from the backend, where compaction may have removed the start of a key's life:
    /// the stored value carries its creation revision and version.
    pub fn restore(&mut self, key: &[u8], rev: Revision, created_main: i64, version: i64) {
        let index = self.keys.entry(key.to_vec()).or_default();
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
        if let Some(index) = self.keys.get_mut(key) {
            if index.is_live() {
                index.tombstone(rev);
            }
        }
    }

    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyAt> {
        self.keys.get(key)?.get(at)
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
        for (key, index) in self.keys.range::<[u8], _>((Bound::Included(start), upper)) {
            if let Some(found) = index.get(at) {
                if !visit(key, found) {
                    return;
                }
            }
        }
    }

    /// Compacts every key at `at`; returns the revisions at or before `at` still needed.
    pub fn compact(&mut self, at: i64) -> HashSet<Revision> {
        let mut keep = HashSet::new();
        self.keys.retain(|_, index| !index.compact(at, &mut keep));
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
}
