//! The driver's clock: milliseconds since the Unix epoch, moving at the
//! pace of tokio's monotonic clock.
//!
//! Connections keep their deadlines as numbers on this clock rather than as
//! `Instant`s, which mean nothing to another process; a wall-clock origin
//! lets a deadline saved by one adapter mean the same to the next. Time is
//! read from tokio, so tests with paused time control it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
    start_unix_ms: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            start: Instant::now(),
            start_unix_ms,
        }
    }

    /// Now, in milliseconds since the Unix epoch; never goes backwards.
    pub(crate) fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.start_unix_ms.saturating_add(elapsed)
    }

    /// How long from now until `at_ms` (zero if it has passed).
    pub(crate) fn until(&self, at_ms: u64) -> Duration {
        Duration::from_millis(at_ms.saturating_sub(self.now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn moves_with_tokio_time_from_the_wall_clock() {
        let clock = Clock::new();
        let t0 = clock.now_ms();
        // 2020-01-01 in Unix milliseconds: a wall-clock origin, not zero.
        assert!(t0 > 1_577_836_800_000);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), t0 + 1500);
        assert_eq!(clock.until(t0 + 2000), Duration::from_millis(500));
        assert_eq!(clock.until(t0), Duration::ZERO);
    }
}
