//! The `Clock` port: monotonic time and sleeping.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Contract: `now_ms` never goes backwards and starts near 0 when the clock is made;
/// `sleep(d)` completes no earlier than `d` after it is called, measured on this clock.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
    fn sleep(&self, duration: Duration) -> Sleep;
    /// Wall-clock time, in nanoseconds since the Unix epoch (the v2 API's expiry times). Not
    /// monotonic.
    fn unix_nanos(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0)
    }
}

/// Production clock on tokio time (madsim's virtual time when built with `--cfg madsim`).
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        TokioClock {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

#[doc(hidden)]
pub mod conformance {
    use super::*;

    /// Run inside the adapter's runtime.
    pub async fn run_all(clock: &dyn Clock) {
        let before = clock.now_ms();
        clock.sleep(Duration::from_millis(20)).await;
        let after = clock.now_ms();
        assert!(
            after >= before + 20,
            "clock conformance: sleep(20ms) returned after {}ms",
            after - before
        );
        let mut last = clock.now_ms();
        for _ in 0..1000 {
            let now = clock.now_ms();
            assert!(now >= last, "clock conformance: time went backwards");
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokio_clock_passes_conformance() {
        conformance::run_all(&TokioClock::new()).await;
    }
}
