//! The checkers, one file per property. Each returns a verdict the run prints; any failure
//! fails the seed.

pub mod auth;
pub mod backup;
pub mod durability;
pub mod leases;
pub mod linearizability;
pub mod liveness;
pub mod locks;
pub mod proxy_reads;
pub mod raft_safety;
pub mod v2;
pub mod watches;

/// One checker's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub name: &'static str,
    pub ok: bool,
    /// A summary when it holds; what broke (first few lines) when not.
    pub detail: String,
}

impl Verdict {
    /// The verdict of a checker that collected `failures` (the first few are shown, then the
    /// summary of what it looked at).
    pub fn from_failures(name: &'static str, failures: Vec<String>, summary: String) -> Verdict {
        const SHOWN: usize = 3;
        if failures.is_empty() {
            return Verdict {
                name,
                ok: true,
                detail: summary,
            };
        }
        let shown: Vec<String> = failures.into_iter().take(SHOWN).collect();
        Verdict {
            name,
            ok: false,
            detail: format!("{}\n({summary})", shown.join("\n")),
        }
    }
}
