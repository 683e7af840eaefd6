//! The v2 tree, changed only by applying log entries, in the same order on every member: no
//! clock is read here (a key's expiry time and a SYNC's time come in the entry).
//!
//! Nodes are kept in one map by path (`/a/b`), the root implicit; a directory's children are
//! the paths one segment under it. The tree lives in memory and reaches the backend two ways:
//! - a **checkpoint**: the whole tree at some index, its nodes in path order in records of
//!   about `CHUNK_BYTES` (`v2c/<n>`), and its history (the last `HISTORY_EVENTS` events, one
//!   record `v2h/`);
//! - a **journal** after it: the requests applied since, that changed the tree, as written in
//!   their log entries, in records of at most about `CHUNK_BYTES` (`v2j/<consistent index>-<n>`)
//!   written with each backend batch, staged with the batch's other writes.
//!
//! Loading replays the journal onto the checkpoint: applying is deterministic, so a restart or
//! a snapshot finds the same tree and the same history. Once the journal holds as many bytes
//! as the checkpoint (and at least `CHECKPOINT_MIN_BYTES`), a new checkpoint replaces the old
//! one and the journal in one batch. A set thus costs a part of one record per batch, and the
//! checkpoints a few large records, written about as often as the tree's size in journal has
//! been written: a handful of backend writes where a record per node and per event made three
//! a set. (Older data dirs kept a record per node, `v2k/<path>`, and per event,
//! `v2e/<index>`: they load as a checkpoint, and the next checkpoint replaces them.)

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use serde::{Deserialize, Serialize};

use super::event::{Event, NodeView};
use super::{
    clean_path, V2Error, CHUNK_RECORD_PREFIX, HISTORY_EVENTS, HISTORY_RECORD,
    JOURNAL_RECORD_PREFIX, NODE_RECORD_PREFIX,
};
use super::{
    DIR_NOT_EMPTY, EVENT_INDEX_CLEARED, KEY_NOT_FOUND, NODE_EXIST, NOT_DIR, NOT_FILE,
    ROOT_READ_ONLY, TEST_FAILED,
};
use crate::proto::quorumkvpb::V2Request;

/// Expiry times before 2000-01-01 mean "permanent", as in etcd.
const MIN_EXPIRE_NS: i64 = 946_684_800 * 1_000_000_000;

/// A node as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(rename = "c")]
    pub created: u64,
    #[serde(rename = "m")]
    pub modified: u64,
    /// `None`: a directory.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Unix nanoseconds; `None`: permanent.
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub expire: Option<i64>,
}

impl Node {
    fn is_dir(&self) -> bool {
        self.value.is_none()
    }
}

const ROOT: Node = Node {
    created: 0,
    modified: 0,
    value: None,
    expire: None,
};

/// A node to create: where, a directory or a value, and when it expires.
struct NewNode<'a> {
    path: &'a str,
    dir: bool,
    value: &'a str,
    expire: Option<i64>,
}

/// Backend records to write (`Some`) or remove (`None`), by name.
pub type Records = Vec<(String, Option<Vec<u8>>)>;

/// The journal is folded into a checkpoint once it holds at least this many bytes (and as
/// many as the checkpoint's records): a bound on what a load replays. The
/// simulator's runs write little, so there it is 4 KiB, for their restarts and snapshots to
/// load checkpoints followed by journals.
pub const CHECKPOINT_MIN_BYTES: u64 = if cfg!(madsim) { 4 << 10 } else { 8 << 20 };

/// A checkpoint's nodes, and a batch's journal, are written in records of about this many
/// bytes (a single larger request makes a larger record).
pub const CHUNK_BYTES: usize = 1 << 20;

/// The journal's size that calls for a checkpoint, at least (`CHECKPOINT_MIN_BYTES`; less in
/// tests).
#[derive(Debug, Clone, Copy)]
struct CheckpointBytes(u64);

impl Default for CheckpointBytes {
    fn default() -> Self {
        CheckpointBytes(CHECKPOINT_MIN_BYTES)
    }
}

/// Counts for `/v2/stats/store`, since this member started.
#[derive(Debug, Default)]
pub struct V2Stats {
    pub gets_success: AtomicU64,
    pub gets_fail: AtomicU64,
    pub sets_success: AtomicU64,
    pub sets_fail: AtomicU64,
    pub delete_success: AtomicU64,
    pub delete_fail: AtomicU64,
    pub update_success: AtomicU64,
    pub update_fail: AtomicU64,
    pub create_success: AtomicU64,
    pub create_fail: AtomicU64,
    pub cas_success: AtomicU64,
    pub cas_fail: AtomicU64,
    pub cad_success: AtomicU64,
    pub cad_fail: AtomicU64,
    pub expire_count: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The operations `/v2/stats/store` counts.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Get,
    Set,
    Delete,
    Update,
    Create,
    CompareAndSwap,
    CompareAndDelete,
}

impl V2Stats {
    pub fn count(&self, op: Op, ok: bool) {
        let (success, fail) = match op {
            Op::Get => (&self.gets_success, &self.gets_fail),
            Op::Set => (&self.sets_success, &self.sets_fail),
            Op::Delete => (&self.delete_success, &self.delete_fail),
            Op::Update => (&self.update_success, &self.update_fail),
            Op::Create => (&self.create_success, &self.create_fail),
            Op::CompareAndSwap => (&self.cas_success, &self.cas_fail),
            Op::CompareAndDelete => (&self.cad_success, &self.cad_fail),
        };
        count(if ok { success } else { fail });
    }

    /// etcd's `/v2/stats/store` body (`watchers` from the caller).
    pub fn to_json(&self, watchers: u64) -> String {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "getsSuccess": n(&self.gets_success),
            "getsFail": n(&self.gets_fail),
            "setsSuccess": n(&self.sets_success),
            "setsFail": n(&self.sets_fail),
            "deleteSuccess": n(&self.delete_success),
            "deleteFail": n(&self.delete_fail),
            "updateSuccess": n(&self.update_success),
            "updateFail": n(&self.update_fail),
            "createSuccess": n(&self.create_success),
            "createFail": n(&self.create_fail),
            "compareAndSwapSuccess": n(&self.cas_success),
            "compareAndSwapFail": n(&self.cas_fail),
            "compareAndDeleteSuccess": n(&self.cad_success),
            "compareAndDeleteFail": n(&self.cad_fail),
            "expireCount": n(&self.expire_count),
            "watchers": watchers,
        })
        .to_string()
    }
}

#[derive(Debug, Default)]
pub struct V2Store {
    nodes: BTreeMap<String, Node>,
    /// The store's index: one more for every change.
    index: u64,
    /// Keys with an expiry time, soonest first.
    expiring: BTreeSet<(i64, String)>,
    /// The last `HISTORY_EVENTS` events, oldest first, one per index.
    history: VecDeque<Event>,
    /// The requests applied since the last batch that changed the tree, each length-delimited:
    /// the next journal records, a new one begun once one holds `CHUNK_BYTES`.
    journal: Vec<Vec<u8>>,
    /// How many requests `journal` holds.
    journal_requests: usize,
    /// The journal records in the backend (oldest first) and their bytes.
    journal_records: Vec<String>,
    journal_bytes: u64,
    checkpoint_bytes: CheckpointBytes,
    /// Events for the watchers, taken by the apply loop.
    published: Vec<Event>,
    pub stats: V2Stats,
    /// Each checkpoint record's bytes (its key, with the backend's prefix byte, and its
    /// value), by record name, and their sum; with `journal_bytes`, the tree's share of
    /// `db_size_in_use`. A checkpoint replaces every record named here.
    record_sizes: HashMap<String, usize>,
    record_bytes: u64,
}

/// Memory a node or an event costs beyond its path and values, about: the map entries and
/// the structs.
const ENTRY_OVERHEAD_BYTES: u64 = 160;

/// The whole store, for comparing members (the simulator's checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Dump {
    pub index: u64,
    pub nodes: Vec<(String, Node)>,
    /// The history, oldest first.
    pub history: Vec<Event>,
}

/// The backend records of the tree, by kind, as (name, value), each kind in name order.
#[derive(Debug, Default)]
pub struct V2Records {
    /// The checkpoint: its nodes (in path order) and its history.
    pub chunks: Vec<(String, Vec<u8>)>,
    pub history: Vec<(String, Vec<u8>)>,
    /// The checkpoint as older data dirs keep it: a record per node, a record per event.
    pub nodes: Vec<(String, Vec<u8>)>,
    pub events: Vec<(String, Vec<u8>)>,
    /// In the order they were written.
    pub journal: Vec<(String, Vec<u8>)>,
}

/// Reads what `encode_node` wrote.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("the record ends inside a node".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }

    fn string(&mut self) -> Result<String, String> {
        let mut len = [0u8; 4];
        len.copy_from_slice(self.take(4)?);
        let bytes = self.take(u32::from_le_bytes(len) as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("bad flag {other}")),
        }
    }

    fn node(&mut self) -> Result<(String, Node), String> {
        let path = self.string()?;
        let created = self.u64()?;
        let modified = self.u64()?;
        let expire = if self.flag()? {
            Some(self.u64()? as i64)
        } else {
            None
        };
        let value = if self.flag()? {
            Some(self.string()?)
        } else {
            None
        };
        let node = Node {
            created,
            modified,
            value,
            expire,
        };
        Ok((path, node))
    }
}

fn push_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A node as a checkpoint's chunk holds it: its path, its indexes, its expiry and its value.
fn encode_node(out: &mut Vec<u8>, path: &str, node: &Node) {
    push_string(out, path);
    out.extend_from_slice(&node.created.to_le_bytes());
    out.extend_from_slice(&node.modified.to_le_bytes());
    match node.expire {
        Some(at) => {
            out.push(1);
            out.extend_from_slice(&at.to_le_bytes());
        }
        None => out.push(0),
    }
    match &node.value {
        Some(value) => {
            out.push(1);
            push_string(out, value);
        }
        None => out.push(0),
    }
}

impl V2Store {
    /// The store its records keep: the checkpoint's nodes and events, then the journal
    /// replayed onto them.
    pub fn from_records(records: V2Records) -> Result<Self, String> {
        let V2Records {
            chunks,
            history,
            nodes,
            events,
            journal,
        } = records;
        let mut store = V2Store::default();
        for (name, value) in chunks {
            let mut reader = Reader { bytes: &value };
            while !reader.bytes.is_empty() {
                let (path, node) = reader
                    .node()
                    .map_err(|e| format!("v2 checkpoint record {name}: {e}"))?;
                store.load_node(path, node);
            }
            store.account(&name, Some(&value));
        }
        for (name, value) in history {
            let mut reader = Reader { bytes: &value };
            while !reader.bytes.is_empty() {
                let event: Event = reader
                    .string()
                    .and_then(|json| serde_json::from_str(&json).map_err(|e| e.to_string()))
                    .map_err(|e| format!("v2 history record {name}: {e}"))?;
                store.index = store.index.max(event.index());
                store.history.push_back(event);
            }
            store.account(&name, Some(&value));
        }
        for (name, value) in nodes {
            let path = name[NODE_RECORD_PREFIX.len().min(name.len())..].to_string();
            let node: Node = serde_json::from_slice(&value)
                .map_err(|e| format!("v2 node record {name}: {e}"))?;
            store.load_node(path, node);
            store.account(&name, Some(&value));
        }
        // Record names sort by index.
        for (name, value) in events {
            let event: Event = serde_json::from_slice(&value)
                .map_err(|e| format!("v2 event record {name}: {e}"))?;
            store.index = store.index.max(event.index());
            store.account(&name, Some(&value));
            store.history.push_back(event);
        }
        for (name, value) in journal {
            let mut requests = value.as_slice();
            while !requests.is_empty() {
                let req = V2Request::decode_length_delimited(&mut requests)
                    .map_err(|e| format!("v2 journal record {name}: {e}"))?;
                // Its answer was given when it was first applied.
                let _ = store.apply_request(&req);
            }
            store.journal_bytes += (1 + name.len() + value.len()) as u64;
            store.journal_records.push(name);
        }
        // Replaying is not serving: nothing to publish, nothing counted.
        store.published.clear();
        store.stats = V2Stats::default();
        Ok(store)
    }

    /// A node of a checkpoint, as it was.
    fn load_node(&mut self, path: String, node: Node) {
        self.index = self.index.max(node.modified).max(node.created);
        if let Some(expire) = node.expire {
            self.expiring.insert((expire, path.clone()));
        }
        self.nodes.insert(path, node);
    }

    /// A store that checkpoints once its journal holds `bytes` (tests).
    #[cfg(test)]
    pub fn with_checkpoint_bytes(bytes: u64) -> Self {
        V2Store {
            checkpoint_bytes: CheckpointBytes(bytes),
            ..V2Store::default()
        }
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn dump(&self) -> V2Dump {
        V2Dump {
            index: self.index,
            nodes: self
                .nodes
                .iter()
                .map(|(path, node)| (path.clone(), node.clone()))
                .collect(),
            history: self.history.iter().cloned().collect(),
        }
    }

    /// The history, oldest first.
    pub fn history(&self) -> Vec<Event> {
        self.history.iter().cloned().collect()
    }

    /// Expires keys by a member's own clock, outside the log: only for the simulator's planted
    /// bug (`Bug::V2ExpiresLocally`), which must make members disagree.
    pub fn expire_outside_log(&mut self, now_ns: i64) {
        self.expire(now_ns);
        self.published.clear();
    }

    /// How many keys and directories it holds.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The soonest expiry time of a key, if any key has one.
    pub fn next_expiry(&self) -> Option<i64> {
        self.expiring.first().map(|(at, _)| *at)
    }

    /// The events applied since the last call, for the watchers.
    pub fn take_published(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.published)
    }

    /// Applies a log entry's request: its answer (`None` for a SYNC). A request that changed
    /// the tree (every change takes an index) joins the journal.
    pub fn apply(&mut self, req: &V2Request) -> Result<Option<Event>, V2Error> {
        let before = self.index;
        let answer = self.apply_request(req);
        if self.index != before {
            if self
                .journal
                .last()
                .is_none_or(|piece| piece.len() >= CHUNK_BYTES)
            {
                self.journal.push(Vec::new());
            }
            if let Some(piece) = self.journal.last_mut() {
                // Writing to a Vec cannot fail.
                let _ = req.encode_length_delimited(piece);
            }
            self.journal_requests += 1;
        }
        answer
    }

    /// How many applied requests the backend does not hold yet.
    pub fn unwritten(&self) -> usize {
        self.journal_requests
    }

    /// The records to write with a backend batch that ends at raft index `consistent_index`:
    /// the journal of the requests applied since the last batch, or, once the journal is as
    /// large as the checkpoint, a new checkpoint and the old journal's removal. None when
    /// nothing changed.
    pub fn take_batch_records(&mut self, consistent_index: u64) -> Records {
        if self.journal.is_empty() {
            return Records::new();
        }
        self.journal_requests = 0;
        // Names sort in the order the pieces were written.
        let pieces: Records = std::mem::take(&mut self.journal)
            .into_iter()
            .enumerate()
            .map(|(n, piece)| {
                let name = format!("{JOURNAL_RECORD_PREFIX}{consistent_index:020}-{n:06}");
                (name, Some(piece))
            })
            .collect();
        let added: usize = pieces
            .iter()
            .map(|(name, piece)| 1 + name.len() + piece.as_ref().map_or(0, Vec::len))
            .sum();
        let journal_bytes = self.journal_bytes + added as u64;
        if journal_bytes < self.checkpoint_bytes.0.max(self.record_bytes) {
            self.journal_bytes = journal_bytes;
            self.journal_records
                .extend(pieces.iter().map(|(name, _)| name.clone()));
            return pieces;
        }
        let mut records = self.take_records();
        records.extend(
            std::mem::take(&mut self.journal_records)
                .into_iter()
                .map(|name| (name, None)),
        );
        self.journal_bytes = 0;
        records
    }

    fn apply_request(&mut self, req: &V2Request) -> Result<Option<Event>, V2Error> {
        let expire = (req.expiration != 0).then_some(req.expiration);
        let conditional = req.prev_index > 0 || !req.prev_value.is_empty();
        let (result, op) = match req.method.as_str() {
            "SYNC" => {
                self.expire(req.time);
                return Ok(None);
            }
            "POST" => (
                self.create(&req.path, req.dir, &req.val, true, expire),
                Op::Create,
            ),
            "PUT" => match req.prev_exist {
                Some(true) if !conditional => (
                    self.update(&req.path, &req.val, expire, req.refresh),
                    Op::Update,
                ),
                Some(true) => (self.compare_and_swap(req, expire), Op::CompareAndSwap),
                Some(false) => (
                    self.create(&req.path, req.dir, &req.val, false, expire),
                    Op::Create,
                ),
                None if conditional => (self.compare_and_swap(req, expire), Op::CompareAndSwap),
                None => (self.set(req, expire), Op::Set),
            },
            "DELETE" if conditional => (self.compare_and_delete(req), Op::CompareAndDelete),
            "DELETE" => (self.delete(&req.path, req.dir, req.recursive), Op::Delete),
            other => {
                return Err(V2Error::new(
                    super::RAFT_INTERNAL,
                    format!("unknown method {other}"),
                    self.index,
                ))
            }
        };
        self.stats.count(op, result.is_ok());
        result.map(Some)
    }

    /// The node at a clean `path`, walking it as etcd does: a file on the way is `Not a
    /// directory`, a missing segment `Key not found`.
    fn lookup(&self, path: &str) -> Result<&Node, V2Error> {
        if path == "/" {
            return Ok(&ROOT);
        }
        let mut node = &ROOT;
        let mut parent = "/";
        for (end, _) in path
            .match_indices('/')
            .skip(1)
            .chain(std::iter::once((path.len(), "")))
        {
            if !node.is_dir() {
                return Err(V2Error::new(NOT_DIR, parent, self.index));
            }
            let here = &path[..end];
            node = self
                .nodes
                .get(here)
                .ok_or_else(|| V2Error::new(KEY_NOT_FOUND, here, self.index))?;
            parent = here;
        }
        Ok(node)
    }

    /// The children of directory `dir`, in key order, hidden ones (`_name`) left out.
    fn children<'a>(&'a self, dir: &str) -> impl Iterator<Item = (&'a String, &'a Node)> + 'a {
        let prefix = if dir == "/" {
            "/".to_string()
        } else {
            format!("{dir}/")
        };
        let len = prefix.len();
        self.nodes
            .range(prefix.clone()..)
            .take_while(move |(path, _)| path.starts_with(&prefix))
            .filter(move |(path, _)| {
                let name = &path[len..];
                !name.contains('/') && !name.starts_with('_')
            })
    }

    /// The node as an answer shows it; a directory's children (and theirs) when `recursive`.
    fn view(&self, path: &str, node: &Node, recursive: bool) -> NodeView {
        NodeView {
            key: path.to_string(),
            value: node.value.clone(),
            expire: node.expire,
            nodes: (recursive && node.is_dir()).then(|| self.listing(path, true)),
            modified: node.modified,
            created: node.created,
            dir: node.is_dir(),
        }
    }

    fn listing(&self, dir: &str, recursive: bool) -> Vec<NodeView> {
        self.children(dir)
            .map(|(path, node)| self.view(path, node, recursive))
            .collect()
    }

    /// A read (etcd's `Get`): a directory lists its children (theirs too when `recursive`).
    /// Answers are always sorted: etcd's unsorted order is any order.
    pub fn get(&self, path: &str, recursive: bool) -> Result<Event, V2Error> {
        let path = clean_path(path);
        let node = self.lookup(&path)?;
        let mut view = self.view(&path, node, false);
        if node.is_dir() {
            view.nodes = Some(self.listing(&path, recursive));
        }
        Ok(Event {
            action: "get".into(),
            node: view,
            prev: None,
            refresh: false,
            etcd_index: self.index,
            removed: Vec::new(),
        })
    }

    /// The event for `waitIndex` `since` on `key` from the history: the first at or after it
    /// that concerns the key; `None` if there is none yet; `401` if the history no longer
    /// reaches back to it.
    pub fn scan(&self, key: &str, recursive: bool, since: u64) -> Result<Option<Event>, V2Error> {
        let start = self.history.front().map(Event::index).unwrap_or(0);
        if since < start {
            return Err(V2Error::new(
                EVENT_INDEX_CLEARED,
                format!("the requested history has been cleared [{start}/{since}]"),
                self.index,
            ));
        }
        let under = if key.ends_with('/') {
            key.to_string()
        } else {
            format!("{key}/")
        };
        let found = self
            .history
            .iter()
            // One event per index from `start` on.
            .skip(since.saturating_sub(start) as usize)
            .filter(|e| !e.refresh)
            .find(|e| {
                e.node.key == key
                    || (recursive && e.node.key.starts_with(&under))
                    || (matches!(e.action.as_str(), "delete" | "expire")
                        && e.prev
                            .as_ref()
                            .is_some_and(|p| p.dir && key.starts_with(&p.key)))
            });
        Ok(found.map(|e| Event {
            etcd_index: self.index,
            ..e.clone()
        }))
    }

    /// Creates the missing directories of `dir` (at the next index); a file on the way is
    /// `Not a directory`.
    fn make_dirs(&mut self, dir: &str) -> Result<(), V2Error> {
        if dir == "/" {
            return Ok(());
        }
        for (end, _) in dir
            .match_indices('/')
            .skip(1)
            .chain(std::iter::once((dir.len(), "")))
        {
            let here = &dir[..end];
            match self.nodes.get(here) {
                Some(node) if node.is_dir() => {}
                Some(_) => return Err(V2Error::new(NOT_DIR, here, self.index)),
                None => {
                    let next = self.index + 1;
                    self.nodes.insert(
                        here.to_string(),
                        Node {
                            created: next,
                            modified: next,
                            value: None,
                            expire: None,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn set_expiry(&mut self, path: &str, expire: Option<i64>) {
        let Some(node) = self.nodes.get_mut(path) else {
            return;
        };
        if let Some(old) = node.expire {
            self.expiring.remove(&(old, path.to_string()));
        }
        node.expire = expire;
        if let Some(new) = expire {
            self.expiring.insert((new, path.to_string()));
        }
    }

    /// Removes `path` and everything under it; the paths removed, children first.
    fn remove(&mut self, path: &str) -> Vec<String> {
        let under = format!("{path}/");
        let mut doomed: Vec<String> = self
            .nodes
            .range(under.clone()..)
            .take_while(|(p, _)| p.starts_with(&under))
            .map(|(p, _)| p.clone())
            .collect();
        // Deepest first, then the node itself.
        doomed.reverse();
        doomed.push(path.to_string());
        for p in &doomed {
            if let Some(node) = self.nodes.remove(p) {
                if let Some(at) = node.expire {
                    self.expiring.remove(&(at, p.clone()));
                }
            }
        }
        doomed
    }

    /// etcd's `internalCreate`: a new node at `path` (under it, named by the next index and
    /// zero-padded, when `unique`), replacing a file there when `replace`.
    fn create_node(
        &mut self,
        new: NewNode<'_>,
        unique: bool,
        replace: bool,
        action: &str,
    ) -> Result<Event, V2Error> {
        let NewNode {
            path,
            dir,
            value,
            expire,
        } = new;
        let current = self.index;
        let next = current + 1;
        let path = if unique {
            clean_path(&format!("{path}/{next:020}"))
        } else {
            clean_path(path)
        };
        if path == "/" {
            return Err(V2Error::new(ROOT_READ_ONLY, "/", current));
        }
        let expire = expire.filter(|at| *at >= MIN_EXPIRE_NS);
        let parent = match path.rfind('/') {
            Some(0) | None => "/".to_string(),
            Some(at) => path[..at].to_string(),
        };
        self.make_dirs(&parent).map_err(|e| V2Error {
            index: current,
            ..e
        })?;
        let mut prev = None;
        if let Some(existing) = self.nodes.get(&path) {
            if !replace {
                return Err(V2Error::new(NODE_EXIST, path, current));
            }
            if existing.is_dir() {
                return Err(V2Error::new(NOT_FILE, path, current));
            }
            prev = Some(self.view(&path, existing, false));
            // A file has nothing under it: replacing it is taking its expiry off the list (the
            // insert below replaces the node itself).
            if let Some(at) = existing.expire {
                self.expiring.remove(&(at, path.clone()));
            }
        }
        let node = Node {
            created: next,
            modified: next,
            value: (!dir).then(|| value.to_string()),
            expire,
        };
        let view = self.view(&path, &node, false);
        if let Some(at) = expire {
            self.expiring.insert((at, path.clone()));
        }
        self.nodes.insert(path.clone(), node);
        self.index = next;
        Ok(Event {
            action: action.into(),
            node: NodeView { expire, ..view },
            prev,
            refresh: false,
            etcd_index: next,
            removed: Vec::new(),
        })
    }

    /// `POST` (in order, `unique`) and `PUT` with `prevExist=false`.
    fn create(
        &mut self,
        path: &str,
        dir: bool,
        value: &str,
        unique: bool,
        expire: Option<i64>,
    ) -> Result<Event, V2Error> {
        let new = NewNode {
            path,
            dir,
            value,
            expire,
        };
        let event = self.create_node(new, unique, false, "create")?;
        self.record(event.clone());
        Ok(event)
    }

    /// A plain `PUT`.
    fn set(&mut self, req: &V2Request, expire: Option<i64>) -> Result<Event, V2Error> {
        let path = clean_path(&req.path);
        let prev = match self.lookup(&path) {
            Ok(node) => Some(node.clone()),
            Err(e) if e.code == KEY_NOT_FOUND => {
                if req.refresh {
                    return Err(e);
                }
                None
            }
            Err(e) => return Err(e),
        };
        let value = match (&prev, req.refresh) {
            (Some(node), true) => node.value.clone().unwrap_or_default(),
            _ => req.val.clone(),
        };
        let new = NewNode {
            path: &path,
            dir: req.dir,
            value: &value,
            expire,
        };
        let mut event = self.create_node(new, false, true, "set")?;
        if let Some(prev) = prev {
            event.prev = Some(self.view(&path, &prev, false));
        }
        event.refresh = req.refresh;
        self.record(event.clone());
        Ok(event)
    }

    /// `PUT` with `prevExist=true` and no other condition.
    fn update(
        &mut self,
        path: &str,
        value: &str,
        expire: Option<i64>,
        refresh: bool,
    ) -> Result<Event, V2Error> {
        let path = clean_path(path);
        let current = self.index;
        if path == "/" {
            return Err(V2Error::new(ROOT_READ_ONLY, "/", current));
        }
        let node = self.lookup(&path)?.clone();
        if node.is_dir() && !value.is_empty() {
            return Err(V2Error::new(NOT_FILE, path, current));
        }
        let next = current + 1;
        let prev = self.view(&path, &node, false);
        let value = if refresh {
            node.value.clone().unwrap_or_default()
        } else {
            value.to_string()
        };
        if let Some(stored) = self.nodes.get_mut(&path) {
            // As in etcd, a directory keeps its modified index (only its TTL changes).
            if !stored.is_dir() {
                stored.value = Some(value.clone());
                stored.modified = next;
            }
        }
        self.set_expiry(&path, expire);
        self.index = next;
        let event = Event {
            action: "update".into(),
            node: NodeView {
                key: path,
                value: (!node.is_dir()).then_some(value),
                expire,
                nodes: None,
                modified: next,
                created: node.created,
                dir: node.is_dir(),
            },
            prev: Some(prev),
            refresh,
            etcd_index: next,
            removed: Vec::new(),
        };
        self.record(event.clone());
        Ok(event)
    }

    /// Does `node` pass `prevValue` and `prevIndex`? The cause of the failure if not.
    fn compare(node: &Node, prev_value: &str, prev_index: u64) -> Result<(), String> {
        let value = node.value.as_deref().unwrap_or_default();
        let index_ok = prev_index == 0 || node.modified == prev_index;
        let value_ok = prev_value.is_empty() || value == prev_value;
        match (value_ok, index_ok) {
            (true, true) => Ok(()),
            (true, false) => Err(format!("[{prev_index} != {}]", node.modified)),
            (false, true) => Err(format!("[{prev_value} != {value}]")),
            (false, false) => Err(format!(
                "[{prev_value} != {value}] [{prev_index} != {}]",
                node.modified
            )),
        }
    }

    fn compare_and_swap(&mut self, req: &V2Request, expire: Option<i64>) -> Result<Event, V2Error> {
        let path = clean_path(&req.path);
        if path == "/" {
            return Err(V2Error::new(ROOT_READ_ONLY, "/", self.index));
        }
        let node = self.lookup(&path)?.clone();
        if node.is_dir() {
            return Err(V2Error::new(NOT_FILE, path, self.index));
        }
        Self::compare(&node, &req.prev_value, req.prev_index)
            .map_err(|cause| V2Error::new(TEST_FAILED, cause, self.index))?;
        let value = if req.refresh {
            node.value.clone().unwrap_or_default()
        } else {
            req.val.clone()
        };
        self.index += 1;
        let next = self.index;
        let prev = self.view(&path, &node, false);
        if let Some(stored) = self.nodes.get_mut(&path) {
            stored.value = Some(value.clone());
            stored.modified = next;
        }
        self.set_expiry(&path, expire);
        let event = Event {
            action: "compareAndSwap".into(),
            node: NodeView {
                key: path,
                value: Some(value),
                expire,
                nodes: None,
                modified: next,
                created: node.created,
                dir: false,
            },
            prev: Some(prev),
            refresh: req.refresh,
            etcd_index: next,
            removed: Vec::new(),
        };
        self.record(event.clone());
        Ok(event)
    }

    fn delete(&mut self, path: &str, dir: bool, recursive: bool) -> Result<Event, V2Error> {
        let path = clean_path(path);
        if path == "/" {
            return Err(V2Error::new(ROOT_READ_ONLY, "/", self.index));
        }
        let dir = dir || recursive;
        let node = self.lookup(&path)?.clone();
        if node.is_dir() {
            if !dir {
                return Err(V2Error::new(NOT_FILE, path, self.index));
            }
            let has_children = self
                .nodes
                .range(format!("{path}/")..)
                .next()
                .is_some_and(|(p, _)| p.starts_with(&format!("{path}/")));
            if has_children && !recursive {
                return Err(V2Error::new(DIR_NOT_EMPTY, path, self.index));
            }
        }
        Ok(self.remove_with_event(path, &node, "delete"))
    }

    fn compare_and_delete(&mut self, req: &V2Request) -> Result<Event, V2Error> {
        let path = clean_path(&req.path);
        let node = self.lookup(&path)?.clone();
        if node.is_dir() {
            // etcd names the node by its path in its store (the keys under `/1`) and trims
            // that prefix from the cause: the root's is empty, and left out. Every other
            // request on the root is refused before (`Root is read only`, cause "/" in etcd
            // too), so this is the one cause that can name the root.
            let cause = if path == "/" { String::new() } else { path };
            return Err(V2Error::new(NOT_FILE, cause, self.index));
        }
        Self::compare(&node, &req.prev_value, req.prev_index)
            .map_err(|cause| V2Error::new(TEST_FAILED, cause, self.index))?;
        Ok(self.remove_with_event(path, &node, "compareAndDelete"))
    }

    /// Removes every key whose expiry time is at or before `now_ns` (a SYNC entry), each at
    /// its own index, soonest first.
    fn expire(&mut self, now_ns: i64) {
        while let Some((at, path)) = self.expiring.first().cloned() {
            if at > now_ns {
                break;
            }
            let Some(node) = self.nodes.get(&path).cloned() else {
                self.expiring.remove(&(at, path));
                continue;
            };
            count(&self.stats.expire_count);
            self.remove_with_event(path, &node, "expire");
        }
    }

    /// Removes `node` at `path` (and what is under it) at the next index: the event (`delete`,
    /// `compareAndDelete`, `expire`), recorded.
    fn remove_with_event(&mut self, path: String, node: &Node, action: &str) -> Event {
        self.index += 1;
        let next = self.index;
        let prev = self.view(&path, node, false);
        let removed = self.remove(&path);
        let event = Event {
            action: action.into(),
            node: NodeView {
                key: path,
                value: None,
                expire: None,
                nodes: None,
                modified: next,
                created: node.created,
                dir: node.is_dir(),
            },
            prev: Some(prev),
            refresh: false,
            etcd_index: next,
            removed,
        };
        self.record(event.clone());
        event
    }

    /// Keeps an applied change's event in the history and for the watchers.
    fn record(&mut self, event: Event) {
        // As the records keep it (a member that loads it from them holds the same).
        self.history.push_back(Event {
            removed: Vec::new(),
            etcd_index: 0,
            ..event.clone()
        });
        while self.history.len() > HISTORY_EVENTS {
            self.history.pop_front();
        }
        self.published.push(event);
    }

    /// The record `name` now holds `value` (none: it is deleted): its bytes counted again.
    fn account(&mut self, name: &str, value: Option<&[u8]>) {
        let old = match value {
            Some(value) => self
                .record_sizes
                .insert(name.to_string(), 1 + name.len() + value.len()),
            None => self.record_sizes.remove(name),
        };
        self.record_bytes = self.record_bytes - old.unwrap_or(0) as u64
            + value.map_or(0, |v| 1 + name.len() + v.len()) as u64;
    }

    /// The bytes of the tree's records in the backend: its checkpoint and its journal.
    pub fn record_bytes(&self) -> u64 {
        self.record_bytes + self.journal_bytes
    }

    /// The tree and its history in memory, about (`quorumkv_memory_bytes{part="v2"}`): paths
    /// and values, and a fixed overhead for each node and event. It walks the tree.
    pub fn memory_bytes(&self) -> u64 {
        let nodes: usize = self
            .nodes
            .iter()
            .map(|(path, node)| path.len() + node.value.as_ref().map_or(0, String::len))
            .sum();
        let events: usize = self.history.iter().map(Event::value_bytes).sum();
        let entries = (self.nodes.len() + self.history.len()) as u64;
        let journal: usize = self.journal.iter().map(Vec::len).sum();
        (nodes + events + journal) as u64 + entries * ENTRY_OVERHEAD_BYTES
    }

    /// A checkpoint of the tree as it is now: the records that replace the last one's.
    fn take_records(&mut self) -> Records {
        let mut records: Records = self
            .record_sizes
            .keys()
            .map(|name| (name.clone(), None))
            .collect();
        let mut chunk = Vec::new();
        let mut chunks = 0;
        let mut push_chunk = |records: &mut Records, chunk: &mut Vec<u8>| {
            let name = format!("{CHUNK_RECORD_PREFIX}{chunks:08}");
            records.push((name, Some(std::mem::take(chunk))));
            chunks += 1;
        };
        // The planted bug leaves out the last node.
        let lost = usize::from(crate::hooks::injected(
            crate::hooks::Bug::V2CheckpointLosesNode,
        ));
        for (path, node) in self
            .nodes
            .iter()
            .take(self.nodes.len().saturating_sub(lost))
        {
            encode_node(&mut chunk, path, node);
            if chunk.len() >= CHUNK_BYTES {
                push_chunk(&mut records, &mut chunk);
            }
        }
        if !chunk.is_empty() {
            push_chunk(&mut records, &mut chunk);
        }
        if !self.history.is_empty() {
            let mut history = Vec::new();
            for event in &self.history {
                push_string(
                    &mut history,
                    &serde_json::to_string(event).unwrap_or_default(),
                );
            }
            records.push((HISTORY_RECORD.to_string(), Some(history)));
        }
        for (name, value) in &records {
            self.account(name, value.as_deref());
        }
        records
    }
}
