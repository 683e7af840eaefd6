//! Revisions and how they are laid out as backend keys.
//!
//! Backend key space (one ordered tree):
//! - `r` + main (8 bytes BE) + sub (8 bytes BE) → a run: the records of consecutive revisions
//!   up to and including that one (the run's key is its newest revision when written), each
//!   record `main (8 BE) sub (8 BE) length (4 LE)` + encoded `mvccpb.KeyValue`; a tombstone is
//!   a record whose version is 0. Runs do not overlap, so the run holding revision R is the
//!   first one whose key is at or after `r`+R. One run per backend batch (or per
//!   `RUN_BYTES`): the backend pays per key, not per byte.
//! - `m` + name → metadata (consistent index, term, compaction revisions, lease records)
//! - `k` + … was the layout before runs (a key per revision); a store holding such keys is
//!   refused at open.

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

pub const RUN_PREFIX: u8 = b'r';
pub const META_PREFIX: u8 = b'm';
/// The prefix of the older one-key-per-revision layout.
pub const OLD_REV_PREFIX: u8 = b'k';
/// Length of a run key.
pub const RUN_KEY_LEN: usize = 17;
/// A run holds at most this many bytes, unless one entry's records alone are longer: the
/// next entry that would take it past this starts another run. The sled backend stores a
/// longer value in pieces (`PIECE_BYTES`, the same size), so runs up to this stay whole.
pub const RUN_BYTES: usize = 6 << 10;
const RECORD_HEAD: usize = 20;

/// The key of a run whose newest revision is `rev`; also where a scan for revision `rev` starts.
pub fn run_key(rev: Revision) -> Vec<u8> {
    debug_assert!(rev.main >= 0 && rev.sub >= 0);
    let mut key = Vec::with_capacity(RUN_KEY_LEN);
    key.push(RUN_PREFIX);
    key.extend_from_slice(&(rev.main as u64).to_be_bytes());
    key.extend_from_slice(&(rev.sub as u64).to_be_bytes());
    key
}

/// The first key past every run.
pub fn runs_end() -> [u8; 1] {
    [RUN_PREFIX + 1]
}

/// Decodes a run key; `None` when the bytes are not one.
pub fn parse_run_key(key: &[u8]) -> Option<Revision> {
    if key.len() != RUN_KEY_LEN || key[0] != RUN_PREFIX {
        return None;
    }
    let main = u64::from_be_bytes(key[1..9].try_into().ok()?);
    let sub = u64::from_be_bytes(key[9..17].try_into().ok()?);
    Some(Revision::new(main as i64, sub as i64))
}

/// Appends the record of revision `rev` (its encoded `KeyValue`) to a run.
pub fn push_record(run: &mut Vec<u8>, rev: Revision, kv: &impl prost::Message) {
    let len = kv.encoded_len();
    run.reserve(RECORD_HEAD + len);
    run.extend_from_slice(&(rev.main as u64).to_be_bytes());
    run.extend_from_slice(&(rev.sub as u64).to_be_bytes());
    run.extend_from_slice(&(len as u32).to_le_bytes());
    // A Vec grows as needed: encoding into one does not fail.
    let _ = kv.encode(run);
}

/// Appends a record already encoded (as `records` gives it back) to a run.
pub fn push_encoded(run: &mut Vec<u8>, rev: Revision, encoded: &[u8]) {
    run.reserve(RECORD_HEAD + encoded.len());
    run.extend_from_slice(&(rev.main as u64).to_be_bytes());
    run.extend_from_slice(&(rev.sub as u64).to_be_bytes());
    run.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    run.extend_from_slice(encoded);
}

/// The records of a run in order: each revision and its encoded `KeyValue`, or `Err` naming what
/// is wrong with the bytes.
pub fn records(run: &[u8]) -> impl Iterator<Item = Result<(Revision, &[u8]), String>> {
    let mut rest = run;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < RECORD_HEAD {
            rest = &[];
            return Some(Err("run ends inside a record head".into()));
        }
        let (head, tail) = rest.split_at(RECORD_HEAD);
        let word = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().unwrap_or([0; 8]));
        let rev = Revision::new(word(0) as i64, word(8) as i64);
        let len = u32::from_le_bytes(head[16..20].try_into().unwrap_or([0; 4])) as usize;
        if tail.len() < len {
            rest = &[];
            return Some(Err(format!(
                "record of {}/{} runs past the end of its run",
                rev.main, rev.sub
            )));
        }
        let (record, tail) = tail.split_at(len);
        rest = tail;
        Some(Ok((rev, record)))
    })
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
    use crate::proto::mvccpb::KeyValue;

    #[test]
    fn run_keys_sort_like_revisions_and_round_trip() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(256, 3),
        ];
        let keys: Vec<_> = revs.iter().map(|r| run_key(*r)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(keys.iter().all(|k| k.as_slice() < runs_end().as_slice()));
        assert!(meta_key("zzz").as_slice() < run_key(Revision::new(0, 0)).as_slice());
        for rev in revs {
            assert_eq!(parse_run_key(&run_key(rev)), Some(rev));
        }
        assert_eq!(parse_run_key(b"m-not-a-rev"), None);
    }

    #[test]
    fn a_run_gives_back_its_records_and_names_a_cut_one() {
        let kv = |v: &str, version| KeyValue {
            key: b"a".to_vec(),
            value: v.as_bytes().to_vec(),
            version,
            ..Default::default()
        };
        let mut run = Vec::new();
        push_record(&mut run, Revision::new(5, 0), &kv("x", 1));
        push_record(&mut run, Revision::new(5, 1), &kv("", 0));
        push_record(&mut run, Revision::new(6, 0), &kv("yy", 2));
        let got: Vec<_> = records(&run)
            .map(|r| {
                let (rev, bytes) = r.expect("a record");
                (
                    rev,
                    <KeyValue as prost::Message>::decode(bytes).expect("kv"),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Revision::new(5, 0), kv("x", 1)),
                (Revision::new(5, 1), kv("", 0)),
                (Revision::new(6, 0), kv("yy", 2)),
            ]
        );
        for cut in [run.len() - 1, 10] {
            let last = records(&run[..cut]).last().expect("something");
            assert!(last.is_err(), "cut at {cut}: {last:?}");
        }
    }
}
