//! The client history: every operation a simulated client issued, with when it was called,
//! when it returned (simulated time, microseconds) and what it returned.

/// Keys and values are short strings; every value written in a run is unique, so a value
/// names the write that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    Put {
        key: String,
        value: String,
    },
    /// Linearizable (`serializable == false`) or serializable read of one key.
    Get {
        key: String,
        serializable: bool,
    },
    Delete {
        key: String,
    },
    /// Every key in `[start, end)`.
    Range {
        start: String,
        end: String,
        serializable: bool,
    },
    /// Compare-and-swap in one txn: if the key's value is `expect` (`None`: the key does not
    /// exist) then put `value`.
    Cas {
        key: String,
        expect: Option<String>,
        value: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadKv {
    pub key: String,
    pub value: String,
    pub mod_revision: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Put {
        revision: i64,
    },
    Get {
        kv: Option<ReadKv>,
        revision: i64,
    },
    Delete {
        deleted: i64,
        revision: i64,
    },
    Range {
        kvs: Vec<ReadKv>,
        revision: i64,
    },
    Cas {
        succeeded: bool,
        revision: i64,
    },
    /// The operation surely had no effect (a read that failed, a request refused before it was
    /// proposed).
    Failed(String),
    /// The outcome is unknown (timeout, the node stopped after proposing): a write may or may
    /// not have taken effect, at any time after it was called.
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Index in the history.
    pub id: usize,
    pub client: u64,
    /// The member the client sent it to.
    pub node: u64,
    pub kind: OpKind,
    pub call_us: u64,
    /// `None` while pending at the end of the run (treated like `Unknown`).
    pub return_us: Option<u64>,
    pub result: OpResult,
}

impl Op {
    pub fn is_read(&self) -> bool {
        matches!(self.kind, OpKind::Get { .. } | OpKind::Range { .. })
    }

    pub fn is_serializable_read(&self) -> bool {
        matches!(
            self.kind,
            OpKind::Get {
                serializable: true,
                ..
            } | OpKind::Range {
                serializable: true,
                ..
            }
        )
    }

    /// Did it complete with a definite result?
    pub fn is_ok(&self) -> bool {
        self.return_us.is_some()
            && !matches!(self.result, OpResult::Failed(_) | OpResult::Unknown(_))
    }

    /// One line for the timeline and failure reports.
    pub fn describe(&self) -> String {
        let kind = match &self.kind {
            OpKind::Put { key, value } => format!("put {key}={value}"),
            OpKind::Get { key, serializable } => {
                format!(
                    "get {key}{}",
                    if *serializable { " (serializable)" } else { "" }
                )
            }
            OpKind::Delete { key } => format!("delete {key}"),
            OpKind::Range {
                start,
                end,
                serializable,
            } => format!(
                "range [{start},{end}){}",
                if *serializable { " (serializable)" } else { "" }
            ),
            OpKind::Cas { key, expect, value } => format!(
                "cas {key}: {} -> {value}",
                expect.as_deref().unwrap_or("<absent>")
            ),
        };
        let result = match &self.result {
            OpResult::Put { revision } => format!("ok rev={revision}"),
            OpResult::Get {
                kv: Some(kv),
                revision,
            } => {
                format!("{}@{} rev={revision}", kv.value, kv.mod_revision)
            }
            OpResult::Get { kv: None, revision } => format!("<absent> rev={revision}"),
            OpResult::Delete { deleted, revision } => format!("deleted={deleted} rev={revision}"),
            OpResult::Range { kvs, revision } => format!(
                "[{}] rev={revision}",
                kvs.iter()
                    .map(|kv| format!("{}={}@{}", kv.key, kv.value, kv.mod_revision))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            OpResult::Cas {
                succeeded,
                revision,
            } => {
                format!(
                    "{} rev={revision}",
                    if *succeeded { "swapped" } else { "not swapped" }
                )
            }
            OpResult::Failed(e) => format!("failed: {e}"),
            OpResult::Unknown(e) => format!("unknown: {e}"),
        };
        let ret = self
            .return_us
            .map_or("pending".to_string(), |r| format!("{:.3}s", r as f64 / 1e6));
        format!(
            "#{} c{} n{} [{:.3}s..{ret}] {kind} -> {result}",
            self.id,
            self.client,
            self.node,
            self.call_us as f64 / 1e6
        )
    }
}
