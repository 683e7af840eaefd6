//! Serializable reads through the proxies (answered from the proxy's cache or by a member),
//! judged against the final history: each read's answer must be the key's state at the
//! revision the answer names, and one client's reads through one proxy (one incarnation of it)
//! never name an older revision than the read before.

use std::collections::BTreeMap;

use super::Verdict;
use crate::proxy::ProxyRead;
use crate::watches::Change;

const NAME: &str = "proxy-reads";

pub fn check(reads: &[ProxyRead], history: &[Change]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for change in history {
        by_key.entry(change.key.as_str()).or_default().push(change);
    }
    let mut failures = Vec::new();
    let mut last: BTreeMap<(u64, u64, u64), i64> = BTreeMap::new();
    for read in reads {
        let label = format!(
            "client {} read {} through proxy p{} at {:.3}s",
            read.client,
            read.key,
            read.proxy,
            read.at_us as f64 / 1e6
        );
        let state = by_key
            .get(read.key.as_str())
            .and_then(|changes| changes.iter().rev().find(|c| c.revision <= read.revision))
            .and_then(|c| c.value.clone().map(|v| (v, c.revision)));
        if state != read.found {
            failures.push(format!(
                "{label}: got {:?} at revision {}, the history has {:?} there",
                read.found, read.revision, state
            ));
        }
        let seen = last
            .entry((read.client, read.proxy, read.incarnation))
            .or_default();
        if read.revision < *seen {
            failures.push(format!(
                "{label}: revision {} after revision {} (went back)",
                read.revision, *seen
            ));
        }
        *seen = (*seen).max(read.revision);
    }
    let summary = format!("{} serializable reads through proxies", reads.len());
    Verdict::from_failures(NAME, failures, summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::watches::tests::change;

    fn read(revision: i64, found: Option<(&str, i64)>) -> ProxyRead {
        ProxyRead {
            client: 1,
            proxy: 1,
            incarnation: 1,
            key: "k0".into(),
            revision,
            found: found.map(|(v, r)| (v.to_string(), r)),
            at_us: 0,
        }
    }

    #[test]
    fn reads_must_match_the_history_at_their_revision_and_not_go_back() {
        let h = vec![
            change(2, "k0", Some("a")),
            change(3, "k1", Some("b")),
            change(4, "k0", None),
            change(5, "k0", Some("c")),
        ];
        let good = [
            read(1, None),
            read(3, Some(("a", 2))),
            read(4, None),
            read(6, Some(("c", 5))),
        ];
        let verdict = check(&good, &h);
        assert!(verdict.ok, "{}", verdict.detail);
        // Stale: the cache kept "a" after its delete at 4.
        assert!(!check(&[read(4, Some(("a", 2)))], &h).ok);
        assert!(!check(&[read(5, Some(("c", 4)))], &h).ok);
        assert!(!check(&[read(3, Some(("a", 2))), read(2, Some(("a", 2)))], &h).ok);
    }
}
