//! quorumkv: a Raft key/value store that speaks etcd's v3 API.

pub mod api;
pub mod io;
pub mod mvcc;
pub mod proto;
pub mod raft;
pub mod server;
pub mod wal;
