//! Errors of the mvcc layer; the API maps each to etcd's gRPC status and message.

use crate::io::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A request only a leader may make, appended in a later term than it was made in.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// A log request that is not about keys (membership): the apply loop handles those.
    #[error("etcdserver: not a key-value request")]
    NotKeyValue,
    /// The NOSPACE alarm is active: writes that add data are refused until it is disarmed.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// The CORRUPT alarm is active: writes are refused.
    #[error("etcdserver: corrupt cluster")]
    CorruptCluster,
    #[error("mvcc: corrupt record at revision {main}/{sub}: {reason}")]
    Corrupt { main: i64, sub: i64, reason: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Refused by the auth store (a permission, a user, a stale check).
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}
