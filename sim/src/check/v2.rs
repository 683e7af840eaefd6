//! The v2 keys API: every member holds the same tree and history at the end; the tree is
//! what replaying the history gives; every answer a client got is the history's event at its
//! index; a wait got the first event at or after its index that concerns its key.

use std::collections::BTreeMap;

use quorumkv::v2::store::{Node, V2Dump};
use quorumkv::v2::Event;

use super::Verdict;
use crate::v2::{V2Op, V2Waited};

const NAME: &str = "v2";

/// The tree a history builds from an empty store.
fn replay(history: &[Event]) -> Result<BTreeMap<String, Node>, String> {
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    for (expected, event) in (1u64..).zip(history) {
        let index = event.index();
        if index != expected {
            return Err(format!(
                "the history skips from {} to {index}",
                expected - 1
            ));
        }
        let key = event.node.key.clone();
        match event.action.as_str() {
            "set" | "create" | "update" | "compareAndSwap" => {
                // Parents made on the way, at this index.
                for (end, _) in key.match_indices('/').skip(1) {
                    tree.entry(key[..end].to_string()).or_insert(Node {
                        created: index,
                        modified: index,
                        value: None,
                        expire: None,
                    });
                }
                let modified = match (event.action.as_str(), tree.get(&key)) {
                    // A directory's update changes only its TTL.
                    ("update", Some(old)) if event.node.dir => old.modified,
                    _ => event.node.modified,
                };
                tree.insert(
                    key,
                    Node {
                        created: event.node.created,
                        modified,
                        value: if event.node.dir {
                            None
                        } else {
                            Some(event.node.value.clone().unwrap_or_default())
                        },
                        expire: event.node.expire,
                    },
                );
            }
            "delete" | "compareAndDelete" | "expire" => {
                let under = format!("{key}/");
                tree.retain(|path, _| *path != key && !path.starts_with(&under));
            }
            other => return Err(format!("unknown action {other} at {index}")),
        }
    }
    Ok(tree)
}

/// Does `event` concern a wait at `key` (etcd's history scan)?
fn concerns(event: &Event, key: &str, recursive: bool) -> bool {
    let under = if key.ends_with('/') {
        key.to_string()
    } else {
        format!("{key}/")
    };
    !event.refresh
        && (event.node.key == key
            || (recursive && event.node.key.starts_with(&under))
            || (matches!(event.action.as_str(), "delete" | "expire")
                && event
                    .prev
                    .as_ref()
                    .is_some_and(|p| p.dir && key.starts_with(&p.key))))
}

/// Two events the same, apart from what an answer adds (the store's index when answered).
fn same(a: &Event, b: &Event) -> bool {
    a.action == b.action && a.node == b.node && a.prev == b.prev && a.refresh == b.refresh
}

pub fn check(dumps: &[(u64, V2Dump)], ops: &[V2Op], waits: &[V2Waited]) -> Verdict {
    let mut failures = Vec::new();
    let Some((first_node, reference)) = dumps.first() else {
        return Verdict::from_failures(NAME, vec!["no member to compare".into()], String::new());
    };
    for (node, dump) in &dumps[1..] {
        if dump.index != reference.index {
            failures.push(format!(
                "n{node} is at v2 index {} and n{first_node} at {}",
                dump.index, reference.index
            ));
        } else if dump != reference {
            let what = if dump.nodes != reference.nodes {
                let differ = dump
                    .nodes
                    .iter()
                    .zip(&reference.nodes)
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| format!("{a:?} vs {b:?}"));
                format!(
                    "trees ({} vs {} nodes; {differ:?})",
                    dump.nodes.len(),
                    reference.nodes.len()
                )
            } else {
                let differ = dump
                    .history
                    .iter()
                    .zip(&reference.history)
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| format!("{a:?} vs {b:?}"));
                format!("histories ({differ:?})")
            };
            failures.push(format!(
                "n{node} and n{first_node} hold different v2 {what} at index {}",
                dump.index
            ));
        }
    }
    let history = &reference.history;
    let start = history.first().map(Event::index).unwrap_or(1);
    if start == 1 {
        match replay(history) {
            Ok(tree) => {
                let held: BTreeMap<String, Node> = reference.nodes.iter().cloned().collect();
                if tree != held {
                    let differ = tree
                        .iter()
                        .find(|(k, v)| held.get(*k) != Some(*v))
                        .map(|(k, _)| k.clone())
                        .or_else(|| held.keys().find(|k| !tree.contains_key(*k)).cloned());
                    failures.push(format!(
                        "the tree is not what its history builds (first at {differ:?})"
                    ));
                }
            }
            Err(e) => failures.push(e),
        }
    }
    let at = |index: u64| -> Option<&Event> {
        index
            .checked_sub(start)
            .and_then(|i| history.get(i as usize))
    };
    let mut answered = 0;
    for op in ops {
        match &op.answer {
            Ok(event) => {
                answered += 1;
                match at(event.index()) {
                    Some(logged) if same(logged, event) => {}
                    Some(logged) => failures.push(format!(
                        "c{} on n{} was answered {} {} at {} but the history holds {} {} there",
                        op.client,
                        op.node,
                        event.action,
                        event.node.key,
                        event.index(),
                        logged.action,
                        logged.node.key
                    )),
                    None if event.index() > reference.index => failures.push(format!(
                        "c{} on n{} was answered index {}, past the final index {}",
                        op.client,
                        op.node,
                        event.index(),
                        reference.index
                    )),
                    None => {} // Before the history kept.
                }
            }
            Err(e) if e.index > reference.index => failures.push(format!(
                "c{} was refused at index {}, past the final index {}",
                op.client, e.index, reference.index
            )),
            Err(_) => {}
        }
    }
    for wait in waits {
        if wait.since < start {
            continue;
        }
        let first = history
            .iter()
            .find(|e| e.index() >= wait.since && concerns(e, &wait.path, wait.recursive));
        let Some(event) = &wait.event else {
            // Held until the client gave up: nothing that concerned it may have applied then.
            if let Some(first) = first.filter(|e| e.index() <= wait.gave_up_at) {
                failures.push(format!(
                    "c{} waiting on n{} at {} from {} got nothing, though {} {} at {} was applied there before it gave up (at {})",
                    wait.client,
                    wait.node,
                    wait.path,
                    wait.since,
                    first.action,
                    first.node.key,
                    first.index(),
                    wait.gave_up_at
                ));
            }
            continue;
        };
        match first {
            Some(first) if same(first, event) => {}
            Some(first) => failures.push(format!(
                "c{} waiting on n{} at {} from {} got {} {} at {}, but the first change was {} {} at {}",
                wait.client,
                wait.node,
                wait.path,
                wait.since,
                event.action,
                event.node.key,
                event.index(),
                first.action,
                first.node.key,
                first.index()
            )),
            None => failures.push(format!(
                "c{} waiting at {} from {} got {} at {}, which the history does not hold",
                wait.client,
                wait.path,
                wait.since,
                event.action,
                event.index()
            )),
        }
    }
    let expired = history.iter().filter(|e| e.action == "expire").count();
    let summary = format!(
        "{} members compared at v2 index {}; {} answers and {} waits checked; {} expiries in the history",
        dumps.len(),
        reference.index,
        answered,
        waits.len(),
        expired
    );
    Verdict::from_failures(NAME, failures, summary)
}
