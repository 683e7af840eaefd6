//! Raft safety, from what every node reported while it ran: at most one leader per term; log
//! matching (every node applied the same entry at each index, so no committed entry was lost or
//! replaced, also across restarts that replay the WAL); and the same state at the same applied
//! index on every node.

use super::Verdict;
use crate::recorder::Facts;

pub fn check(facts: &Facts) -> Verdict {
    let terms_with_leader = facts.leaders.len();
    if facts.violations.is_empty() {
        Verdict {
            name: "raft-safety",
            ok: true,
            detail: format!(
                "{} entries applied across nodes, {} indexes, {} state fingerprints compared, {} terms with a leader",
                facts.entries_applied,
                facts.applied.len(),
                facts.states.len(),
                terms_with_leader
            ),
        }
    } else {
        Verdict {
            name: "raft-safety",
            ok: false,
            detail: facts.violations.join("\n"),
        }
    }
}
