//! Backups: a backup taken mid-run (the Snapshot RPC's image) and restored into a new store
//! holds exactly the key space the cluster agreed on at the backup's revision: every key, with
//! its value, versions and lease, and nothing else.

use std::collections::BTreeMap;

use super::Verdict;
use quorumkv::proto::mvccpb::KeyValue;

/// A key space: key → (value, create revision, mod revision, version, lease).
pub type KeySpace = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64, i64, i64)>;

pub fn key_space(kvs: &[KeyValue]) -> KeySpace {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                (
                    kv.value.clone(),
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                    kv.lease,
                ),
            )
        })
        .collect()
}

/// `restored`: the new store's keys and revision; `agreed`: a converged member's keys at the
/// backup's revision.
pub fn check(
    revision: i64,
    restored_revision: i64,
    restored: &KeySpace,
    agreed: &KeySpace,
) -> Verdict {
    let mut failures = Vec::new();
    if restored_revision != revision {
        failures.push(format!(
            "the restored store is at revision {restored_revision}, the backup was taken at {revision}"
        ));
    }
    for (key, expected) in agreed {
        match restored.get(key) {
            None => failures.push(format!(
                "key {:?} (mod revision {}) is missing from the restored backup",
                String::from_utf8_lossy(key),
                expected.2
            )),
            Some(got) if got != expected => failures.push(format!(
                "key {:?}: restored {got:?}, the cluster had {expected:?} at revision {revision}",
                String::from_utf8_lossy(key)
            )),
            Some(_) => {}
        }
    }
    for key in restored.keys().filter(|k| !agreed.contains_key(*k)) {
        failures.push(format!(
            "key {:?} is in the restored backup but not in the cluster at revision {revision}",
            String::from_utf8_lossy(key)
        ));
    }
    Verdict::from_failures(
        "backup",
        failures,
        format!("{} keys at revision {revision}", agreed.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, mod_revision: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 2,
            mod_revision,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn a_missing_changed_or_extra_key_or_another_revision_fails() {
        let agreed = key_space(&[kv("a", "1", 2), kv("b", "2", 3)]);
        assert!(check(3, 3, &agreed, &agreed).ok);
        assert!(!check(3, 2, &agreed, &agreed).ok, "another revision");
        let missing = key_space(&[kv("a", "1", 2)]);
        assert!(!check(3, 3, &missing, &agreed).ok);
        let changed = key_space(&[kv("a", "1", 2), kv("b", "x", 3)]);
        assert!(!check(3, 3, &changed, &agreed).ok);
        let extra = key_space(&[kv("a", "1", 2), kv("b", "2", 3), kv("c", "3", 3)]);
        assert!(!check(3, 3, &extra, &agreed).ok);
    }
}
