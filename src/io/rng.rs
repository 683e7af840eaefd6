//! Randomness is handed in, never drawn from a global: one seeded RNG per node.

use rand::SeedableRng;

pub type SeededRng = rand::rngs::StdRng;

pub fn seeded_rng(seed: u64) -> SeededRng {
    SeededRng::seed_from_u64(seed)
}

/// A seed from the operating system, for production runs only.
pub fn os_seed() -> u64 {
    rand::random()
}
