//! Multi-version state: every write creates a revision; reads can ask for any revision not yet
//! compacted. Values live in the `Backend` in runs of revision records; an in-memory index maps
//! user keys to their revisions. Applying is deterministic: no clock, no randomness, only the backend.

mod check;
mod error;
mod hash;
mod history;
mod index;
mod revision;
mod snapshot;
mod store;
mod write;

pub use check::{check_delete, check_put, check_range, check_txn};
pub use error::MvccError;
pub use hash::KvHash;
pub use history::in_range;
pub use revision::{
    decode_u64, encode_u64, meta_key, parse_run_key, records, Revision, META_CONSISTENT_INDEX,
    RUN_BYTES,
};
pub use snapshot::{ImageReader, StagedRestore, IMAGE_ALIGN};
pub use store::MvccStore;
pub use write::{ApplyOutcome, ApplyResult};

#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod tests;
