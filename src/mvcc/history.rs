//! The store's history as watch events: what each revision changed, read back from the backend
//! and from the writes not yet handed to it; and the events of each newly applied write, for
//! watchers that are keeping up.

use std::collections::BTreeMap;

use super::error::MvccError;
use super::revision::{records, run_key, runs_end, Revision};
use super::store::{bad_run, decode_at, MvccStore};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// The event a write of `kv` makes: a tombstone (version 0) is a delete.
pub(super) fn event_of(kv: KeyValue) -> Event {
    let kind = if kv.version == 0 {
        EventType::Delete
    } else {
        EventType::Put
    };
    Event {
        r#type: kind as i32,
        kv: Some(kv),
        prev_kv: None,
    }
}

/// Is `key` in the watched range `[start, end)` (`end` empty: just `start`; `\0`: everything
/// from `start`)?
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        end => key >= start && key < end,
    }
}

impl MvccStore {
    /// Collect the events of every write applied from now on (`take_published`), or stop.
    pub fn set_publish_events(&mut self, on: bool) {
        self.publish_events = on;
        if !on {
            self.published.clear();
        }
    }

    /// The events of the writes applied since the last call, in revision order.
    pub fn take_published(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.published)
    }

    /// The events in `[start, end)` of revisions `from_rev..=current`, at most `max_revs`
    /// revisions of them (those that touch the range count) and about `max_bytes` of keys
    /// and values (whole revisions, at least one), in order; and the revision to read from
    /// next. `Compacted` if `from_rev` is compacted away.
    pub fn events_since(
        &self,
        from_rev: i64,
        start: &[u8],
        end: &[u8],
        max_revs: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, i64), MvccError> {
        if from_rev < self.compact_rev {
            return Err(MvccError::Compacted);
        }
        let mut changes: BTreeMap<Revision, KeyValue> = BTreeMap::new();
        // The first revision (touching the range) past the `max_revs` wanted, if the scan got
        // that far: the next read starts there.
        let mut stopped_at: Option<i64> = None;
        let (mut mains, mut last_main) = (0, None);
        let mut read_bytes = 0usize;
        let mut failure = None;
        self.backend.scan(
            &run_key(Revision::new(from_rev, 0)),
            Some(&runs_end()),
            &mut |_, run| {
                for record in records(run) {
                    let (rev, bytes) = match record {
                        Ok((rev, _)) if rev.main < from_rev => continue,
                        Ok(record) => record,
                        Err(reason) => {
                            failure = Some(bad_run(reason));
                            return false;
                        }
                    };
                    match decode_at(rev, bytes) {
                        Ok(kv) if in_range(&kv.key, start, end) => {
                            if last_main != Some(rev.main) {
                                // Whole revisions: the limits are looked at between two.
                                if mains == max_revs || (mains > 0 && read_bytes >= max_bytes) {
                                    stopped_at = Some(rev.main);
                                    return false;
                                }
                                mains += 1;
                                last_main = Some(rev.main);
                            }
                            read_bytes += kv.key.len() + kv.value.len();
                            changes.insert(rev, kv);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            failure = Some(e);
                            return false;
                        }
                    }
                }
                true
            },
        )?;
        if let Some(e) = failure {
            return Err(e);
        }
        let limit = stopped_at.unwrap_or(i64::MAX);
        for (rev, kv) in self.staged_values.iter().chain(&self.writing_values) {
            if rev.main >= from_rev && rev.main < limit && in_range(&kv.key, start, end) {
                changes.insert(*rev, kv.clone());
            }
        }
        // The same limits over what was read and what is staged (not in the backend yet).
        let mut events = Vec::new();
        let (mut revs, mut taken_bytes) = (0, 0usize);
        let mut last_main = None;
        for (rev, kv) in changes {
            if last_main != Some(rev.main) {
                if revs == max_revs || (revs > 0 && taken_bytes >= max_bytes) {
                    return Ok((events, rev.main));
                }
                revs += 1;
                last_main = Some(rev.main);
            }
            taken_bytes += kv.key.len() + kv.value.len();
            events.push(event_of(kv));
        }
        if let Some(next) = stopped_at {
            return Ok((events, next));
        }
        // A start beyond the current revision stays where it is.
        Ok((events, (self.current_rev + 1).max(from_rev)))
    }
}
