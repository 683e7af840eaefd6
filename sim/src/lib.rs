//! quorumkv-sim: the real quorumkv node code (raft node, WAL, mvcc, apply loop, request path)
//! in one deterministic process on simulated disk, network, clock and backend, under faults,
//! with checkers. Built with `--cfg madsim`; `ci/sim` is the entry point.

#[cfg(not(madsim))]
compile_error!("quorumkv-sim builds only with RUSTFLAGS=\"--cfg madsim\": use ci/sim");

pub mod auth;
pub mod backup;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod disk;
pub mod faults;
pub mod history;
pub mod html;
pub mod leases;
pub mod locks;
pub mod network;
pub mod operator;
pub mod proxy;
pub mod recorder;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod trace;
pub mod v2;
pub mod watches;
pub mod workload;
