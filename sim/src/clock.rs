//! The simulated `Clock`: madsim's virtual time, running fast or slow on each node (clock skew:
//! a node whose clock runs fast times out sooner).

use std::time::Duration;

use quorumkv::io::clock::Sleep;
use quorumkv::io::Clock;

pub struct SimClock {
    start: tokio::time::Instant,
    /// This node's seconds per real (simulated) second, in parts per million.
    rate_ppm: u64,
}

impl SimClock {
    pub fn new(rate_ppm: u64) -> Self {
        SimClock {
            start: tokio::time::Instant::now(),
            rate_ppm: rate_ppm.max(1),
        }
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed_us = self.start.elapsed().as_micros() as u64;
        elapsed_us.saturating_mul(self.rate_ppm) / 1_000_000_000
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        // Round up, so that `sleep(d)` never ends before `d` has passed on this clock.
        let real_us = (duration.as_micros() as u64 * 1_000_000).div_ceil(self.rate_ppm);
        Box::pin(tokio::time::sleep(Duration::from_micros(real_us + 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[madsim::test]
    async fn sim_clock_passes_conformance_at_any_rate() {
        for rate_ppm in [900_000, 1_000_000, 1_100_000] {
            quorumkv::io::clock::conformance::run_all(&SimClock::new(rate_ppm)).await;
        }
    }

    #[madsim::test]
    async fn a_fast_clock_sees_more_time_pass() {
        let fast = SimClock::new(1_100_000);
        let normal = SimClock::new(1_000_000);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(normal.now_ms(), 10_000);
        assert_eq!(fast.now_ms(), 11_000);
    }
}
