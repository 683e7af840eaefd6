//! The ports: every piece of I/O and time the node, WAL, mvcc and server use crosses one of
//! these traits, so that the same code runs on tokio/std/sled in production and on simulated
//! adapters in the simulator.

pub mod backend;
pub mod clock;
pub mod disk;
#[cfg(test)]
pub mod instrumented_disk;
pub mod rng;
mod sled_backend;
#[cfg(not(madsim))]
pub mod stop;
#[cfg(not(madsim))]
pub mod tcp;
pub mod transport;

pub use backend::{Backend, BackendError, BatchOp, MemBackend, StagedContents, WriteBatch};
pub use clock::{Clock, TokioClock};
pub use disk::{Disk, DiskFile, StdDisk};
pub use rng::{os_seed, seeded_rng, SeededRng};
pub use sled_backend::SledBackend;
#[cfg(not(madsim))]
pub use tcp::TcpTransport;
pub use transport::{LocalTransport, Transport};
