//! Locks: no two holders at once, as judged by revisions. A Lock answered at revision `r` says
//! its key was then the oldest live key of the lock; in the final history, at `r`, that key
//! must exist and no live key of the lock may be older. (Two holders at once would need two
//! oldest keys.)

use std::collections::BTreeMap;

use super::Verdict;
use crate::locks::Acquired;

const NAME: &str = "locks";

/// `history`: every change under the lock's prefix, in revision order: (revision, key, put?).
pub fn check(acquired: &[Acquired], history: &[(i64, Vec<u8>, bool)]) -> Verdict {
    // Each key's lives: (created at, deleted at or i64::MAX).
    let mut lives: BTreeMap<&[u8], Vec<(i64, i64)>> = BTreeMap::new();
    for (revision, key, put) in history {
        let key_lives = lives.entry(key.as_slice()).or_default();
        match (put, key_lives.last_mut()) {
            (true, Some((_, end))) if *end == i64::MAX => {} // An update: still the same life.
            (true, _) => key_lives.push((*revision, i64::MAX)),
            (false, Some((_, end))) if *end == i64::MAX => *end = *revision,
            (false, _) => {}
        }
    }
    let live_at = |key: &[u8], revision: i64| -> Option<i64> {
        lives.get(key)?.iter().find_map(|(created, deleted)| {
            (*created <= revision && revision < *deleted).then_some(*created)
        })
    };
    let mut failures = Vec::new();
    for holder in acquired {
        let label = format!(
            "c{} on n{} [{:.3}s..{:.3}s] holding {} at revision {}",
            holder.client,
            holder.node,
            holder.call_us as f64 / 1e6,
            holder.return_us as f64 / 1e6,
            String::from_utf8_lossy(&holder.key),
            holder.revision
        );
        let Some(mine) = live_at(&holder.key, holder.revision) else {
            failures.push(format!("{label}: its key did not exist then"));
            continue;
        };
        let older: Vec<String> = lives
            .keys()
            .filter(|key| **key != holder.key.as_slice())
            .filter(|key| live_at(key, holder.revision).is_some_and(|created| created < mine))
            .map(|key| String::from_utf8_lossy(key).into_owned())
            .collect();
        if !older.is_empty() {
            failures.push(format!(
                "{label}: older holders were still there: {older:?}"
            ));
        }
    }
    let summary = format!(
        "{} acquisitions, {} lock keys in the final history",
        acquired.len(),
        lives.len()
    );
    Verdict::from_failures(NAME, failures, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquired(key: &str, revision: i64) -> Acquired {
        Acquired {
            client: 1,
            node: 1,
            key: key.as_bytes().to_vec(),
            revision,
            call_us: 0,
            return_us: 0,
        }
    }

    fn history() -> Vec<(i64, Vec<u8>, bool)> {
        vec![
            (2, b"lock/m/a".to_vec(), true),
            (3, b"lock/m/b".to_vec(), true),
            (4, b"lock/m/a".to_vec(), false),
            (5, b"lock/m/b".to_vec(), false),
        ]
    }

    #[test]
    fn holders_in_turn_pass() {
        let verdict = check(
            &[acquired("lock/m/a", 3), acquired("lock/m/b", 4)],
            &history(),
        );
        assert!(verdict.ok, "{}", verdict.detail);
    }

    #[test]
    fn a_holder_behind_an_older_live_key_or_without_its_key_fails() {
        assert!(
            !check(&[acquired("lock/m/b", 3)], &history()).ok,
            "a still held"
        );
        assert!(
            !check(&[acquired("lock/m/a", 4)], &history()).ok,
            "a was gone"
        );
    }
}
