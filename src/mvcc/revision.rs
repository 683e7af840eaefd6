//! Revisions and how they are laid out as backend keys.
//!
//! Backend key space (one ordered tree):
//! - `k` + main (8 bytes BE) + sub (8 bytes BE) [+ `t` for a tombstone] → encoded `mvccpb.KeyValue`
//! - `m` + name → metadata (consistent index, term, compaction revisions)

/// A point in the store's history: `main` counts write transactions, `sub` the writes inside one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Revision { main, sub }
    }
}

pub const KEY_PREFIX: u8 = b'k';
pub const META_PREFIX: u8 = b'm';
const TOMBSTONE_MARK: u8 = b't';
/// Length of a revision key without the tombstone mark.
pub const REV_KEY_LEN: usize = 17;

pub fn rev_key(rev: Revision, tombstone: bool) -> Vec<u8> {
    debug_assert!(rev.main >= 0 && rev.sub >= 0);
    let mut key = Vec::with_capacity(REV_KEY_LEN + 1);
    key.push(KEY_PREFIX);
    key.extend_from_slice(&(rev.main as u64).to_be_bytes());
    key.extend_from_slice(&(rev.sub as u64).to_be_bytes());
    if tombstone {
        key.push(TOMBSTONE_MARK);
    }
    key
}

/// Decodes a revision key; `None` when the bytes are not one.
pub fn parse_rev_key(key: &[u8]) -> Option<(Revision, bool)> {
    if key.first() != Some(&KEY_PREFIX) {
        return None;
    }
    let tombstone = match key.len() {
        REV_KEY_LEN => false,
        len if len == REV_KEY_LEN + 1 && key[REV_KEY_LEN] == TOMBSTONE_MARK => true,
        _ => return None,
    };
    let main = u64::from_be_bytes(key[1..9].try_into().ok()?);
    let sub = u64::from_be_bytes(key[9..17].try_into().ok()?);
    Some((Revision::new(main as i64, sub as i64), tombstone))
}

/// The first backend key of revision `main` (any sub, tombstone or not).
pub fn rev_key_start(main: i64) -> Vec<u8> {
    rev_key(Revision::new(main, 0), false)
}

pub fn meta_key(name: &str) -> Vec<u8> {
    let mut key = vec![META_PREFIX];
    key.extend_from_slice(name.as_bytes());
    key
}

pub const META_CONSISTENT_INDEX: &str = "consistent_index";
pub const META_COMPACT_REV: &str = "compact_rev";

pub fn encode_u64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rev_keys_sort_like_revisions_and_round_trip() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(256, 3),
        ];
        let keys: Vec<_> = revs.iter().map(|r| rev_key(*r, false)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for rev in revs {
            assert_eq!(parse_rev_key(&rev_key(rev, false)), Some((rev, false)));
            assert_eq!(parse_rev_key(&rev_key(rev, true)), Some((rev, true)));
        }
        assert_eq!(parse_rev_key(b"m-not-a-rev"), None);
    }
}
