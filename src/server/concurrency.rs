//! Locks and elections, as etcd builds them (its `concurrency` recipes): each holder or
//! candidate puts a key `<name>/<lease in hex>` on its lease; the one whose key has the lowest
//! creation revision holds the lock or leads; the others wait for the deletion of the key just
//! older than theirs. Everything here is ordinary transactions, ranges and watches.

use super::error::ServerError;
use super::kv::KvServer;
use crate::hooks::{self, Bug};
use crate::mvcc::MvccError;
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    ResponseHeader, TxnRequest, WatchCreateRequest, WatchResponse,
};
use crate::proto::mvccpb::{event::EventType, KeyValue};
use crate::proto::v3electionpb::LeaderKey;
use crate::watch::WatchHub;

/// The key a holder (or candidate) of `name` puts on `lease`, as etcd names it.
pub fn holder_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix(name);
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

/// The prefix of the keys of lock or election `name` (`name/`).
pub fn prefix(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// The end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // Every key from the prefix on.
}

fn created_at(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

/// A holder's key that goes if its Lock or Campaign is abandoned while it waits (its client
/// went away): etcd's recipes take the key back then (`Unlock`, `Resign`), so a candidate
/// that gave up does not stay in line. They do it through etcd's own client, without the
/// caller's token, which auth refuses once it is on: then the key stays until its lease ends,
/// in etcd 3.4 and here alike.
struct Abandoned {
    server: Option<KvServer>,
    key: Vec<u8>,
}

impl Abandoned {
    fn new(server: &KvServer, key: &[u8]) -> Self {
        Abandoned {
            server: Some(server.clone()),
            key: key.to_vec(),
        }
    }

    /// The key stays.
    fn keep(mut self) {
        self.server = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(server) = self.server.take().filter(|s| !s.auth_view().enabled()) {
            let key = std::mem::take(&mut self.key);
            tokio::spawn(async move {
                if let Err(e) = server.unlock(&key).await {
                    tracing::debug!(error = %e, "cannot take back an abandoned holder's key");
                }
            });
        }
    }
}

/// A watch stream that is closed when dropped (a waiting client may go away at any point).
struct Watching<'a> {
    hub: &'a WatchHub,
    stream: u64,
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.hub.close_stream(self.stream);
    }
}

impl KvServer {
    /// Puts `key` on `lease` with `value` unless it exists: the key as it is (its creation
    /// revision), and the header of that transaction.
    async fn enqueue(
        &self,
        key: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<(KeyValue, ResponseHeader), ServerError> {
        let resp = self
            .txn(TxnRequest {
                compare: vec![created_at(key, 0)],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.to_vec(),
                        value: value.to_vec(),
                        lease,
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: key.to_vec(),
                        ..Default::default()
                    })),
                }],
            })
            .await?;
        let header = resp.header.unwrap_or_default();
        let revision = header.revision;
        if resp.succeeded {
            let created = KeyValue {
                key: key.to_vec(),
                value: value.to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease,
            };
            return Ok((created, header));
        }
        let existing = resp.responses.into_iter().find_map(|r| match r.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        });
        // Deleted between the compare and now cannot happen inside one txn.
        existing
            .map(|kv| (kv, header))
            .ok_or(ServerError::Mvcc(MvccError::KeyNotFound))
    }

    /// Waits until no key under `name/` was created before `my_rev`.
    async fn wait_turn(&self, name: &[u8], my_rev: i64) -> Result<(), ServerError> {
        if hooks::injected(Bug::LockSkipsWait) {
            return Ok(());
        }
        let prefix = prefix(name);
        loop {
            let older = self
                .range(RangeRequest {
                    key: prefix.clone(),
                    range_end: prefix_end(&prefix),
                    max_create_revision: my_rev - 1,
                    sort_order: SortOrder::Descend as i32,
                    sort_target: SortTarget::Create as i32,
                    limit: 1,
                    ..Default::default()
                })
                .await?;
            let Some(ahead) = older.kvs.first() else {
                return Ok(());
            };
            let seen = older.header.as_ref().map_or(0, |h| h.revision);
            self.wait_deleted(&ahead.key, seen + 1).await?;
        }
    }

    /// Waits until the watch of `[key, end)` from `from_rev` sends a response that `done`
    /// accepts, or is cancelled (compacted away: the caller looks again).
    async fn wait_for_change(
        &self,
        key: &[u8],
        end: &[u8],
        from_rev: i64,
        done: impl Fn(&WatchResponse) -> bool,
    ) -> Result<(), ServerError> {
        let hub = self.watches();
        let (stream, tx, mut rx) = hub.open_stream();
        let _closing = Watching { hub, stream };
        let created = hub.create(
            stream,
            &tx,
            &WatchCreateRequest {
                key: key.to_vec(),
                range_end: end.to_vec(),
                start_revision: from_rev,
                ..Default::default()
            },
        );
        hub.activate(stream, created.watch_id);
        while let Some(response) = rx.recv().await {
            if response.canceled || done(&response) {
                return Ok(());
            }
        }
        Err(ServerError::Stopped)
    }

    /// Waits for a delete of `key` at `from_rev` or later.
    async fn wait_deleted(&self, key: &[u8], from_rev: i64) -> Result<(), ServerError> {
        self.wait_for_change(key, b"", from_rev, |response| {
            response
                .events
                .iter()
                .any(|e| e.r#type == EventType::Delete as i32)
        })
        .await
    }

    /// The holder's key still exists (its lease is alive), as of a linearizable read.
    async fn still_held(&self, key: &[u8]) -> Result<ResponseHeader, ServerError> {
        let resp = self
            .range(RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })
            .await?;
        if resp.kvs.is_empty() {
            // Its lease ended while it waited.
            return Err(ServerError::Mvcc(MvccError::LeaseNotFound));
        }
        Ok(resp.header.unwrap_or_default())
    }

    /// `v3lock.Lock`: waits until the caller holds lock `name`; the ownership key.
    pub async fn lock(
        &self,
        name: &[u8],
        lease: i64,
    ) -> Result<(ResponseHeader, Vec<u8>), ServerError> {
        let key = holder_key(name, lease);
        let (mine, _) = self.enqueue(&key, lease, b"").await?;
        // Abandoned, or the wait failed: the key goes, as etcd's mutex unlocks then.
        let abandoned = Abandoned::new(self, &key);
        self.wait_turn(name, mine.create_revision).await?;
        abandoned.keep();
        Ok((self.still_held(&key).await?, key))
    }

    /// `v3lock.Unlock`: deletes the ownership key.
    pub async fn unlock(&self, key: &[u8]) -> Result<ResponseHeader, ServerError> {
        let resp = self
            .delete_range(DeleteRangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(resp.header.unwrap_or_default())
    }

    /// `v3election.Campaign`: waits until the caller leads `name`; its leader key.
    pub async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<(ResponseHeader, LeaderKey), ServerError> {
        let key = holder_key(name, lease);
        let (mine, header) = self.enqueue(&key, lease, value).await?;
        let leader = LeaderKey {
            name: name.to_vec(),
            key: key.clone(),
            rev: mine.create_revision,
            lease,
        };
        // Abandoned, or its proclamation failed: the key goes, as etcd's election resigns then.
        let abandoned = Abandoned::new(self, &key);
        if mine.value != value {
            // Campaigning again with a new value: proclaim it.
            self.proclaim(&leader, value).await?;
        }
        let waited = self.wait_turn(name, mine.create_revision).await;
        // A wait that failed (not abandoned) leaves the key, as etcd's does.
        abandoned.keep();
        waited?;
        self.still_held(&key).await?;
        // As etcd's recipe answers: the header of the campaign's own transaction (not of the
        // proclamation or the wait after it).
        Ok((header, leader))
    }

    /// `v3election.Proclaim`: the leader's new value; refused unless `leader` still leads.
    pub async fn proclaim(
        &self,
        leader: &LeaderKey,
        value: &[u8],
    ) -> Result<ResponseHeader, ServerError> {
        let resp = self
            .txn(TxnRequest {
                compare: vec![created_at(&leader.key, leader.rev)],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: leader.key.clone(),
                        value: value.to_vec(),
                        ignore_lease: true,
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(ServerError::ElectionNotLeader);
        }
        Ok(resp.header.unwrap_or_default())
    }

    /// `v3election.Leader`: the leader's key and value (`ElectionNoLeader` if none).
    pub async fn election_leader(
        &self,
        name: &[u8],
    ) -> Result<(ResponseHeader, KeyValue), ServerError> {
        let prefix = prefix(name);
        let resp = self
            .range(RangeRequest {
                key: prefix.clone(),
                range_end: prefix_end(&prefix),
                sort_order: SortOrder::Ascend as i32,
                sort_target: SortTarget::Create as i32,
                limit: 1,
                ..Default::default()
            })
            .await?;
        let header = resp.header.unwrap_or_default();
        let kv = resp
            .kvs
            .into_iter()
            .next()
            .ok_or(ServerError::ElectionNoLeader)?;
        Ok((header, kv))
    }

    /// Waits for any change under election `name` from `from_rev` on.
    pub async fn election_changed(&self, name: &[u8], from_rev: i64) -> Result<(), ServerError> {
        let prefix = prefix(name);
        self.wait_for_change(&prefix, &prefix_end(&prefix), from_rev, |response| {
            !response.events.is_empty()
        })
        .await
    }

    /// `v3election.Resign`: deletes the leader key if it still is the one `leader` names.
    pub async fn resign(&self, leader: &LeaderKey) -> Result<ResponseHeader, ServerError> {
        let resp = self
            .txn(TxnRequest {
                compare: vec![created_at(&leader.key, leader.rev)],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestDeleteRange(
                        DeleteRangeRequest {
                            key: leader.key.clone(),
                            ..Default::default()
                        },
                    )),
                }],
                failure: vec![],
            })
            .await?;
        Ok(resp.header.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_keys_and_prefix_ends_are_etcds() {
        assert_eq!(holder_key(b"mylock", 0x694d), b"mylock/694d".to_vec());
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
