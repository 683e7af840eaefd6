//! Key ranges and whether a user's permissions cover one.
//!
//! A permission, like a request, names `[key, range_end)`: an empty `range_end` is the single
//! key, `"\0"` everything from `key` on. A user may do an operation on a range when the union of
//! the ranges their roles grant for it covers the whole range (two grants that meet, `[a, b)`
//! and `[b, c)`, cover `[a, c)`).

use crate::proto::authpb::permission::Type as PermType;

/// What an operation needs on a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// Does a permission of type `perm` (READ, WRITE, READWRITE) give this access?
    pub fn granted_by(self, perm: i32) -> bool {
        match PermType::try_from(perm) {
            Ok(PermType::Readwrite) => true,
            Ok(PermType::Read) => self == Access::Read,
            Ok(PermType::Write) => self == Access::Write,
            Err(_) => false,
        }
    }
}

/// `[start, end)`; `end == None`: to the end of the key space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// The range a request or a permission names with `key` and `range_end`.
    pub fn of(key: &[u8], range_end: &[u8]) -> KeyRange {
        let end = match range_end {
            [] => {
                let mut next = key.to_vec();
                next.push(0);
                Some(next)
            }
            [0] => None,
            end => Some(end.to_vec()),
        };
        KeyRange {
            start: key.to_vec(),
            end,
        }
    }

    /// Does this range end at or after `other` ends?
    fn ends_after(&self, other: &KeyRange) -> bool {
        match (&self.end, &other.end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => mine >= theirs,
        }
    }

    /// Does this range reach `key` (is `key` before its end)?
    fn reaches(&self, key: &[u8]) -> bool {
        self.end.as_deref().is_none_or(|end| key <= end)
    }
}

/// A set of ranges merged into disjoint, sorted ones: the coverage of one access for a user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    ranges: Vec<KeyRange>,
}

impl Coverage {
    pub fn new(mut ranges: Vec<KeyRange>) -> Coverage {
        ranges.sort();
        let mut merged: Vec<KeyRange> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match merged.last_mut() {
                Some(last) if last.reaches(&range.start) => {
                    if !last.ends_after(&range) {
                        last.end = range.end;
                    }
                }
                _ => merged.push(range),
            }
        }
        Coverage { ranges: merged }
    }

    /// Is all of `range` inside one merged range? (A backwards range — its end before its
    /// start — names no key; it is covered when its start is.)
    pub fn covers(&self, range: &KeyRange) -> bool {
        // The last merged range starting at or before `range.start`.
        let at = self.ranges.partition_point(|r| r.start <= range.start);
        let Some(candidate) = at.checked_sub(1).map(|i| &self.ranges[i]) else {
            return false;
        };
        let backwards = range.end.as_ref().is_some_and(|end| *end <= range.start);
        if backwards {
            return candidate.end.as_ref().is_none_or(|end| range.start < *end);
        }
        candidate.ends_after(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(key: &str, end: &str) -> KeyRange {
        KeyRange::of(key.as_bytes(), end.as_bytes())
    }

    fn from_key(key: &str) -> KeyRange {
        KeyRange::of(key.as_bytes(), b"\0")
    }

    #[test]
    fn single_keys_ranges_and_open_ends() {
        let c = Coverage::new(vec![r("foo", ""), r("a", "c"), from_key("zz")]);
        assert!(c.covers(&r("foo", "")));
        assert!(!c.covers(&r("fo", "")));
        assert!(
            !c.covers(&r("foo", "fop")),
            "foo\\0.. is past the single key"
        );
        assert!(c.covers(&r("a", "c")));
        assert!(c.covers(&r("b", "")));
        assert!(c.covers(&r("a", "b")));
        assert!(!c.covers(&r("a", "ca")));
        assert!(!c.covers(&r("c", "")));
        assert!(c.covers(&from_key("zz")));
        assert!(c.covers(&from_key("zzz")));
        assert!(!c.covers(&from_key("z")));
        assert!(c.covers(&r("zz", "zzz")));
    }

    #[test]
    fn ranges_that_meet_or_overlap_merge() {
        let c = Coverage::new(vec![r("b", "c"), r("a", "b"), r("c", ""), r("c\0", "d")]);
        assert!(c.covers(&r("a", "d")));
        assert!(!c.covers(&r("a", "d\0")));
        let gap = Coverage::new(vec![r("a", "b"), r("b\0", "c")]);
        assert!(!gap.covers(&r("a", "c")), "the key b is not granted");
    }

    #[test]
    fn a_watch_to_the_end_of_the_key_space_needs_an_open_ended_grant() {
        // GHSA-xg4h-6gfc-h4m8: range_end "\0" is past every finite grant.
        let c = Coverage::new(vec![r("a", "m")]);
        assert!(!c.covers(&from_key("a")));
        assert!(!c.covers(&from_key("b")));
        assert!(Coverage::new(vec![from_key("a")]).covers(&from_key("b")));
    }

    #[test]
    fn nothing_is_covered_by_no_grant() {
        let c = Coverage::new(Vec::new());
        assert!(!c.covers(&r("a", "")));
    }

    #[test]
    fn access_follows_the_permission_type() {
        assert!(Access::Read.granted_by(PermType::Read as i32));
        assert!(!Access::Write.granted_by(PermType::Read as i32));
        assert!(Access::Write.granted_by(PermType::Write as i32));
        assert!(!Access::Read.granted_by(PermType::Write as i32));
        assert!(Access::Read.granted_by(PermType::Readwrite as i32));
        assert!(Access::Write.granted_by(PermType::Readwrite as i32));
        assert!(!Access::Read.granted_by(7));
    }
}
