//! The run's timeline: what happened to the cluster, in simulated time. Client operations are
//! in the history (`history.rs`); both feed the printed timeline, the HTML picture and the
//! trace hash.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    /// Crashed or not started.
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A node's raft role or term changed.
    Role {
        node: u64,
        term: u64,
        role: Role,
    },
    Crash {
        node: u64,
        detail: String,
    },
    Restart {
        node: u64,
    },
    Pause {
        node: u64,
    },
    Resume {
        node: u64,
    },
    /// The directed links now blocked (from, to); an empty list means the network is whole.
    Partition {
        description: String,
        blocked: Vec<(u64, u64)>,
    },
    /// Any other fault turned on or changed (drop rate, delay, duplication, clock skew).
    Fault {
        description: String,
    },
    /// An operator's action was asked for, or finished: a membership change, a leader
    /// transfer, a backup.
    Membership {
        description: String,
    },
    /// The run moved to another phase ("safety", "liveness", "check").
    Phase {
        name: String,
    },
    /// A checker's verdict.
    Check {
        name: String,
        ok: bool,
        detail: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    pub at_us: u64,
    pub kind: EventKind,
}

/// FNV-1a, 64 bits: the trace hash. Stable across platforms and runs (unlike `DefaultHasher`).
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }

    pub fn write_u64(&mut self, value: u64) {
        self.write(&value.to_le_bytes());
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Role {
    /// From raft-rs's `StateRole as u8`.
    pub fn from_raft(role: u8) -> Role {
        match role {
            1 => Role::Candidate,
            2 => Role::Leader,
            3 => Role::PreCandidate,
            _ => Role::Follower,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
            Role::Down => "down",
        }
    }
}

impl Event {
    /// One line of the printed timeline.
    pub fn describe(&self) -> String {
        let what = match &self.kind {
            EventKind::Role { node, term, role } => {
                format!("n{node} {} (term {term})", role.name())
            }
            EventKind::Crash { node, detail } => format!("n{node} CRASH {detail}"),
            EventKind::Restart { node } => format!("n{node} restarted"),
            EventKind::Pause { node } => format!("n{node} paused"),
            EventKind::Resume { node } => format!("n{node} resumed"),
            EventKind::Partition { description, .. } => format!("network: {description}"),
            EventKind::Fault { description } => format!("fault: {description}"),
            EventKind::Membership { description } => format!("membership: {description}"),
            EventKind::Phase { name } => format!("== phase {name} =="),
            EventKind::Check { name, ok, detail } => {
                format!(
                    "check {name}: {} {detail}",
                    if *ok { "ok" } else { "FAILED" }
                )
            }
        };
        format!("{:>9.3}s  {what}", self.at_us as f64 / 1e6)
    }
}
