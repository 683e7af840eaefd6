//! Watch guarantees, judged against the final history the converged cluster agrees on: each
//! watcher session receives, from its start revision to the last revision it saw, every
//! revision's changes in its range exactly once, in revision order, each revision whole in one
//! response, each change as the history has it. A progress answer (`RequestProgress`) vouches
//! that every change up to its revision has been received before it: none may come after it,
//! and its revisions never go back within a session.

use std::collections::BTreeMap;

use super::Verdict;
use crate::watches::{Change, Session};

const NAME: &str = "watches";

pub fn check(sessions: &[Session], history: &[Change]) -> Verdict {
    let mut by_rev: BTreeMap<i64, Vec<&Change>> = BTreeMap::new();
    for change in history {
        by_rev.entry(change.revision).or_default().push(change);
    }
    let mut failures = Vec::new();
    let mut delivered = 0;
    for session in sessions {
        let on = match session.node {
            n if n > crate::proxy::PROXY_NODE => format!("proxy p{}", n - crate::proxy::PROXY_NODE),
            n => format!("n{n}"),
        };
        let label = format!(
            "watcher w{} on {on} from revision {} (at {:.3}s)",
            session.watcher,
            session.start_rev,
            session.start_us as f64 / 1e6
        );
        match check_session(session, &by_rev) {
            Ok(n) => delivered += n,
            Err(why) => failures.push(format!("{label}: {why}")),
        }
    }
    let summary = format!(
        "{} watch sessions, {delivered} changes delivered, {} revisions in the final history",
        sessions.len(),
        by_rev.len()
    );
    Verdict::from_failures(NAME, failures, summary)
}

fn check_session(session: &Session, by_rev: &BTreeMap<i64, Vec<&Change>>) -> Result<usize, String> {
    let mut last_rev = session.start_rev - 1;
    let mut received: BTreeMap<i64, Vec<&Change>> = BTreeMap::new();
    for response in &session.responses {
        let Some(first) = response.first() else {
            continue;
        };
        if first.revision <= last_rev {
            return Err(format!(
                "revision {} arrived after revision {last_rev} (out of order, duplicated, or split across responses)",
                first.revision
            ));
        }
        for pair in response.windows(2) {
            if pair[1].revision < pair[0].revision {
                return Err(format!(
                    "revision {} after revision {} in one response",
                    pair[1].revision, pair[0].revision
                ));
            }
        }
        for change in response {
            received.entry(change.revision).or_default().push(change);
        }
        last_rev = response.last().map_or(last_rev, |c| c.revision);
    }
    check_progress(session, by_rev)?;
    if last_rev < session.start_rev {
        return Ok(0); // It saw nothing.
    }
    let mut count = 0;
    for (rev, expected) in by_rev.range(session.start_rev..=last_rev) {
        let got = received.remove(rev).unwrap_or_default();
        if got != *expected {
            return Err(format!(
                "revision {rev}: got {got:?}, the history has {expected:?}"
            ));
        }
        count += got.len();
    }
    if let Some((rev, changes)) = received.into_iter().next() {
        return Err(format!(
            "revision {rev} is not in the history, yet it delivered {changes:?}"
        ));
    }
    Ok(count)
}

/// Each progress answer: not older than the one before it, every change of the history from
/// the session's start up to its revision received before it, and none after it.
fn check_progress(session: &Session, by_rev: &BTreeMap<i64, Vec<&Change>>) -> Result<(), String> {
    let mut previous = 0;
    for &(before, revision) in &session.progress {
        if revision < previous {
            return Err(format!(
                "progress answer at revision {revision} after one at revision {previous}"
            ));
        }
        previous = revision;
        let received: std::collections::BTreeSet<i64> = session.responses
            [..before.min(session.responses.len())]
            .iter()
            .flatten()
            .map(|c| c.revision)
            .collect();
        if let Some(missing) = by_rev
            .range(session.start_rev..)
            .take_while(|(rev, _)| **rev <= revision)
            .map(|(rev, _)| *rev)
            .find(|rev| !received.contains(rev))
        {
            return Err(format!(
                "progress answer at revision {revision}, yet revision {missing} had not been received"
            ));
        }
        if let Some(late) = session.responses[before.min(session.responses.len())..]
            .iter()
            .flatten()
            .find(|c| c.revision <= revision)
        {
            return Err(format!(
                "revision {} arrived after a progress answer at revision {revision}",
                late.revision
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn change(revision: i64, key: &str, value: Option<&str>) -> Change {
        Change {
            revision,
            key: key.into(),
            value: value.map(String::from),
        }
    }

    fn session(start_rev: i64, responses: Vec<Vec<Change>>) -> Session {
        Session {
            watcher: 1,
            node: 1,
            start_rev,
            start_us: 0,
            responses,
            progress: Vec::new(),
        }
    }

    fn history() -> Vec<Change> {
        vec![
            change(2, "k0", Some("a")),
            change(3, "k1", Some("b")),
            change(4, "k0", None),
            change(4, "k1", Some("c")),
            change(5, "k2", Some("d")),
        ]
    }

    #[test]
    fn a_complete_ordered_session_passes_and_one_ending_early_too() {
        let h = history();
        let mut whole = session(2, vec![h[0..2].to_vec(), h[2..4].to_vec(), h[4..].to_vec()]);
        whole.progress = vec![(1, 3), (1, 3), (3, 5)];
        let early = session(3, vec![h[1..4].to_vec()]);
        let verdict = check(&[whole, early], &h);
        assert!(verdict.ok, "{}", verdict.detail);
    }

    #[test]
    fn gaps_duplicates_reordering_and_split_revisions_fail() {
        let h = history();
        let gap = session(2, vec![vec![h[0].clone()], h[2..4].to_vec()]);
        let duplicate = session(
            2,
            vec![vec![h[0].clone()], vec![h[0].clone(), h[1].clone()]],
        );
        let reordered = session(2, vec![vec![h[1].clone(), h[0].clone()]]);
        let split = session(4, vec![vec![h[2].clone()], vec![h[3].clone()]]);
        let wrong_value = session(5, vec![vec![change(5, "k2", Some("x"))]]);
        let mut early_progress = session(2, vec![vec![h[0].clone()], h[1..].to_vec()]);
        early_progress.progress = vec![(1, 3)];
        let mut backwards = session(2, vec![h[0..2].to_vec(), h[2..4].to_vec(), h[4..].to_vec()]);
        backwards.progress = vec![(3, 5), (3, 4)];
        for bad in [
            gap,
            duplicate,
            reordered,
            split,
            wrong_value,
            early_progress,
            backwards,
        ] {
            let verdict = check(std::slice::from_ref(&bad), &h);
            assert!(!verdict.ok, "{bad:?} passed");
        }
    }
}
