//! Durability: no acknowledged write is lost, and no read returned a value nobody wrote. Every
//! acknowledged put, swap and delete must be in the final history at the revision it was
//! acknowledged with; every value any read returned (serializable reads included) must be in
//! that history at the revision the read said it was written.

use std::collections::{BTreeMap, BTreeSet};

use super::Verdict;
use crate::history::{Op, OpKind, OpResult, ReadKv};

/// The final agreed history: (key, revision) → the key's value as of that revision.
pub type FinalReads = BTreeMap<(String, i64), Option<ReadKv>>;

/// The (key, revision) pairs the check needs read from the converged cluster.
pub fn needed_reads(history: &[Op]) -> BTreeSet<(String, i64)> {
    let mut needed = BTreeSet::new();
    for op in history.iter().filter(|op| op.is_ok()) {
        match (&op.kind, &op.result) {
            (OpKind::Put { key, .. }, OpResult::Put { revision })
            | (
                OpKind::Cas { key, .. },
                OpResult::Cas {
                    succeeded: true,
                    revision,
                },
            )
            | (OpKind::Delete { key }, OpResult::Delete { revision, .. }) => {
                needed.insert((key.clone(), *revision));
            }
            (_, OpResult::Get { kv: Some(kv), .. }) => {
                needed.insert((kv.key.clone(), kv.mod_revision));
            }
            (_, OpResult::Range { kvs, .. }) => {
                for kv in kvs {
                    needed.insert((kv.key.clone(), kv.mod_revision));
                }
            }
            _ => {}
        }
    }
    needed
}

pub fn check(history: &[Op], reads: &FinalReads, final_revision: i64) -> Verdict {
    let written: BTreeSet<(&str, &str)> = history
        .iter()
        .filter_map(|op| match &op.kind {
            OpKind::Put { key, value } | OpKind::Cas { key, value, .. } => {
                Some((key.as_str(), value.as_str()))
            }
            _ => None,
        })
        .collect();
    let mut problems = Vec::new();
    let mut checked = 0usize;
    let at = |key: &str, revision: i64| reads.get(&(key.to_string(), revision));
    for op in history.iter().filter(|op| op.is_ok()) {
        let mut expect_value = |key: &str, value: &str, revision: i64, what: &str| {
            checked += 1;
            match at(key, revision) {
                Some(Some(kv)) if kv.value == value && kv.mod_revision == revision => {}
                Some(found) => problems.push(format!(
                    "{what} lost: {} — the final history has {key} at revision {revision} = {}",
                    op.describe(),
                    found.as_ref().map_or("<absent>".to_string(), |kv| format!(
                        "{}@{}",
                        kv.value, kv.mod_revision
                    ))
                )),
                None => problems.push(format!("{what}: no final read for {key}@{revision}")),
            }
        };
        match (&op.kind, &op.result) {
            (OpKind::Put { key, value }, OpResult::Put { revision }) => {
                expect_value(key, value, *revision, "acknowledged put")
            }
            (
                OpKind::Cas { key, value, .. },
                OpResult::Cas {
                    succeeded: true,
                    revision,
                },
            ) => expect_value(key, value, *revision, "acknowledged swap"),
            (_, OpResult::Get { kv: Some(kv), .. }) => {
                expect_value(&kv.key, &kv.value, kv.mod_revision, "value read")
            }
            (_, OpResult::Range { kvs, .. }) => {
                for kv in kvs {
                    expect_value(&kv.key, &kv.value, kv.mod_revision, "value read");
                }
            }
            _ => {}
        }
        match (&op.kind, &op.result) {
            (OpKind::Delete { key }, OpResult::Delete { deleted, revision }) if *deleted > 0 => {
                checked += 1;
                if !matches!(at(key, *revision), Some(None)) {
                    problems.push(format!(
                        "acknowledged delete lost: {} — {key} exists at revision {revision}",
                        op.describe()
                    ));
                }
            }
            _ => {}
        }
        let read_values: Vec<&ReadKv> = match &op.result {
            OpResult::Get { kv: Some(kv), .. } => vec![kv],
            OpResult::Range { kvs, .. } => kvs.iter().collect(),
            _ => vec![],
        };
        for kv in read_values {
            if !written.contains(&(kv.key.as_str(), kv.value.as_str())) {
                problems.push(format!("a value nobody wrote was read: {}", op.describe()));
            }
        }
        let revision = match &op.result {
            OpResult::Put { revision }
            | OpResult::Get { revision, .. }
            | OpResult::Delete { revision, .. }
            | OpResult::Range { revision, .. }
            | OpResult::Cas { revision, .. } => *revision,
            _ => 0,
        };
        if revision > final_revision {
            problems.push(format!(
                "revision {revision} is past the final revision {final_revision}: {}",
                op.describe()
            ));
        }
    }
    if problems.is_empty() {
        Verdict {
            name: "durability",
            ok: true,
            detail: format!("{checked} acknowledged writes and read values found in the final history (revision {final_revision})"),
        }
    } else {
        let total = problems.len();
        problems.truncate(5);
        Verdict {
            name: "durability",
            ok: false,
            detail: format!("{total} problems, first:\n{}", problems.join("\n")),
        }
    }
}
