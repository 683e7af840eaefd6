//! Errors a client request can end with.

use crate::mvcc::MvccError;
use crate::raft::NodeError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: server stopped")]
    Stopped,
}
