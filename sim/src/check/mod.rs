//! The checkers, one file per property. Each returns a verdict the run prints; any failure
//! fails the seed.

pub mod durability;
pub mod leases;
pub mod linearizability;
pub mod liveness;
pub mod locks;
pub mod raft_safety;
pub mod watches;

/// One checker's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub name: &'static str,
    pub ok: bool,
    /// A summary when it holds; what broke (first few lines) when not.
    pub detail: String,
}
