//! What a v2 operation answers: an event (its action, the node after it, the node before it),
//! and the JSON etcd writes for it, with the TTL left counted from the time it is written.

use serde::{Deserialize, Serialize};

/// A node as an answer shows it. `key` is the user's path (`/` for the root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub key: String,
    /// `None` for a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Unix nanoseconds; `None`: permanent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire: Option<i64>,
    /// A directory's children, when listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeView>>,
    pub modified: u64,
    pub created: u64,
    /// A directory (etcd's `dir: true`); kept apart from `value` for an updated directory.
    #[serde(default)]
    pub dir: bool,
}

/// One applied v2 change (or a read), as etcd's `Event`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub action: String,
    pub node: NodeView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<NodeView>,
    /// A TTL refresh: kept in the history, but no watcher is told of it.
    #[serde(default)]
    pub refresh: bool,
    /// The store's index when the answer was made (`X-Etcd-Index`).
    #[serde(skip)]
    pub etcd_index: u64,
    /// The paths a delete or an expiry removed (watchers there are told), not stored.
    #[serde(skip)]
    pub removed: Vec<String>,
}

impl Event {
    /// The index the event happened at (its node's modified index).
    pub fn index(&self) -> u64 {
        self.node.modified
    }

    /// The bytes of its keys and values (its node's and its previous node's), about what it
    /// holds in memory beyond its structs.
    pub fn value_bytes(&self) -> usize {
        let node = |n: &NodeView| n.key.len() + n.value.as_ref().map_or(0, String::len);
        node(&self.node) + self.prev.as_ref().map_or(0, node)
    }

    /// Did it create its node (HTTP 201)?
    pub fn created(&self) -> bool {
        self.action == "create" || (self.action == "set" && self.prev.is_none())
    }

    /// The event's JSON line as etcd writes it, TTLs counted from `now_ns`; without its nodes
    /// when `no_value` (etcd's `noValueOnSuccess`).
    pub fn to_json(&self, now_ns: i64, no_value: bool) -> String {
        let hide = no_value
            && matches!(
                self.action.as_str(),
                "set" | "compareAndSwap" | "create" | "update"
            );
        let body = EventJson {
            action: &self.action,
            node: (!hide).then(|| NodeJson::of(&self.node, now_ns)),
            prev_node: self
                .prev
                .as_ref()
                .filter(|_| !hide)
                .map(|p| NodeJson::of(p, now_ns)),
        };
        serde_json::to_string(&body).unwrap_or_default() + "\n"
    }
}

#[derive(Serialize)]
struct EventJson<'a> {
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<NodeJson<'a>>,
    #[serde(rename = "prevNode", skip_serializing_if = "Option::is_none")]
    prev_node: Option<NodeJson<'a>>,
}

/// etcd's `NodeExtern`, field for field and in its order.
#[derive(Serialize)]
struct NodeJson<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dir: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    ttl: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    nodes: Vec<NodeJson<'a>>,
    #[serde(rename = "modifiedIndex", skip_serializing_if = "is_zero_u64")]
    modified: u64,
    #[serde(rename = "createdIndex", skip_serializing_if = "is_zero_u64")]
    created: u64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

impl<'a> NodeJson<'a> {
    fn of(node: &'a NodeView, now_ns: i64) -> Self {
        NodeJson {
            // The root has no key in etcd's answers.
            key: if node.key == "/" { "" } else { &node.key },
            value: node.value.as_deref(),
            dir: node.dir,
            expiration: node.expire.map(rfc3339_nanos),
            // A key past its time (an expiry's previous node) shows none, as in etcd.
            ttl: node.expire.map(|e| ttl_left(e, now_ns).max(0)).unwrap_or(0),
            nodes: node
                .nodes
                .iter()
                .flatten()
                .map(|n| NodeJson::of(n, now_ns))
                .collect(),
            modified: node.modified,
            created: node.created,
        }
    }
}

/// The whole seconds left until `expire_ns`, rounded up (etcd's TTL in answers).
pub fn ttl_left(expire_ns: i64, now_ns: i64) -> i64 {
    let left = expire_ns.saturating_sub(now_ns);
    let mut ttl = left / 1_000_000_000;
    if left % 1_000_000_000 > 0 {
        ttl += 1;
    }
    ttl
}

/// Unix nanoseconds as Go's `time.Time` writes them in JSON (RFC 3339 in UTC, the fraction's
/// trailing zeros dropped).
pub fn rfc3339_nanos(unix_ns: i64) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    );
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// The proleptic Gregorian date of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
