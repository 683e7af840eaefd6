//! etcd's v2 keys API (`--enable-v2`): a tree of directories and string values with TTLs,
//! compare-and-swap, in-order keys and waits, kept beside the v3 store and changed only through
//! the raft log.
//!
//! - `store`: the tree, applied deterministically from log entries; kept in the backend as a
//!   checkpoint (every node and the last 1,000 events) and a journal of the requests applied
//!   since, so restarts and snapshots carry them.
//! - `event`: what an operation answers, and its JSON as etcd writes it.
//! - `watchers`: `wait=true` requests, woken by the events the apply loop publishes.
//! - `http`: `/v2/keys`, `/v2/members`, `/v2/machines`, `/v2/stats/*` on the client port.
//!
//! A key's expiry time is fixed by the member that takes the request (its clock plus the TTL),
//! and travels in the entry; keys expire when the leader proposes a `SYNC` entry carrying its
//! clock, so every member removes them at the same index.

pub mod event;
/// Not part of the simulated build (the simulator drives `server` directly).
#[cfg(not(madsim))]
pub mod http;
#[cfg(not(madsim))]
mod members;
pub mod store;
pub mod watchers;

#[cfg(test)]
mod tests;

pub use event::{Event, NodeView};
pub use store::{V2Records, V2Store};
pub use watchers::V2Watchers;

/// The record names of the v2 store in the backend's meta space (see `store`): a
/// checkpoint's nodes and history, the journal after it, and the checkpoint as older data
/// dirs kept it.
pub const CHUNK_RECORD_PREFIX: &str = "v2c/";
pub const HISTORY_RECORD_PREFIX: &str = "v2h/";
pub const HISTORY_RECORD: &str = "v2h/history";
pub const JOURNAL_RECORD_PREFIX: &str = "v2j/";
pub const NODE_RECORD_PREFIX: &str = "v2k/";
pub const EVENT_RECORD_PREFIX: &str = "v2e/";

/// Events kept for `waitIndex` (etcd's event history).
pub const HISTORY_EVENTS: usize = 1000;

/// An error of the v2 API, as etcd's `v2error.Error`: a code, its message, a cause and the
/// store's index when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Error {
    pub code: u32,
    pub cause: String,
    pub index: u64,
}

pub const KEY_NOT_FOUND: u32 = 100;
pub const TEST_FAILED: u32 = 101;
pub const NOT_FILE: u32 = 102;
pub const NOT_DIR: u32 = 104;
pub const NODE_EXIST: u32 = 105;
pub const ROOT_READ_ONLY: u32 = 107;
pub const DIR_NOT_EMPTY: u32 = 108;
pub const PREV_VALUE_REQUIRED: u32 = 201;
pub const TTL_NAN: u32 = 202;
pub const INDEX_NAN: u32 = 203;
pub const INVALID_FIELD: u32 = 209;
pub const INVALID_FORM: u32 = 210;
pub const REFRESH_VALUE: u32 = 211;
pub const REFRESH_TTL_REQUIRED: u32 = 212;
pub const RAFT_INTERNAL: u32 = 300;
pub const EVENT_INDEX_CLEARED: u32 = 401;

impl V2Error {
    pub fn new(code: u32, cause: impl Into<String>, index: u64) -> Self {
        V2Error {
            code,
            cause: cause.into(),
            index,
        }
    }

    /// etcd's message for the code.
    pub fn message(&self) -> &'static str {
        match self.code {
            KEY_NOT_FOUND => "Key not found",
            TEST_FAILED => "Compare failed",
            NOT_FILE => "Not a file",
            NOT_DIR => "Not a directory",
            NODE_EXIST => "Key already exists",
            ROOT_READ_ONLY => "Root is read only",
            DIR_NOT_EMPTY => "Directory not empty",
            110 => "The request requires user authentication",
            PREV_VALUE_REQUIRED => "PrevValue is Required in POST form",
            TTL_NAN => "The given TTL in POST form is not a number",
            INDEX_NAN => "The given index in POST form is not a number",
            INVALID_FIELD => "Invalid field",
            INVALID_FORM => "Invalid POST form",
            REFRESH_VALUE => "Value provided on refresh",
            REFRESH_TTL_REQUIRED => "A TTL must be provided on refresh",
            RAFT_INTERNAL => "Raft Internal Error",
            301 => "During Leader Election",
            400 => "watcher is cleared due to etcd recovery",
            EVENT_INDEX_CLEARED => "The event in requested index is outdated and cleared",
            _ => "Client Internal Error",
        }
    }

    /// The HTTP status etcd answers with it (400 for every code it does not list).
    pub fn http_status(&self) -> u16 {
        match self.code {
            KEY_NOT_FOUND => 404,
            NOT_FILE | DIR_NOT_EMPTY => 403,
            110 => 401,
            TEST_FAILED | NODE_EXIST => 412,
            RAFT_INTERNAL | 301 => 500,
            _ => 400,
        }
    }

    /// The error's JSON body, one line.
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            #[serde(rename = "errorCode")]
            code: u32,
            message: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            cause: &'a str,
            index: u64,
        }
        let body = Body {
            code: self.code,
            message: self.message(),
            cause: &self.cause,
            index: self.index,
        };
        serde_json::to_string(&body).unwrap_or_default() + "\n"
    }
}

impl std::fmt::Display for V2Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.cause)
    }
}

/// A v2 path as etcd cleans it (`path.Clean(path.Join("/", p))`): absolute, no empty, `.` or
/// `..` segments, no trailing slash.
pub fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for part in &parts {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}
