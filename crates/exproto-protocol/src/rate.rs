//! A token bucket for per-connection rate limits, driven by time the
//! session is told (see [`crate::Session::set_time`]), so it stays
//! sans-IO and is tested without a clock.

/// Allows `rate` events per second on average, in bursts of up to `rate`.
///
/// Tokens are counted in thousandths so that refilling by whole
/// milliseconds is exact integer arithmetic: every millisecond adds `rate`
/// thousandths, an event costs one thousand.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Events per second, and the burst size.
    rate: u64,
    /// Thousandths of a token available; at most `rate * 1000`.
    milli: u64,
    /// When the bucket was last refilled; `None` until the first event, so
    /// a session that starts late does not start empty.
    last_ms: Option<u64>,
}

impl TokenBucket {
    /// A full bucket for `rate` events per second (`rate` > 0).
    pub fn new(rate: u32) -> Self {
        let rate = u64::from(rate.max(1));
        Self {
            rate,
            milli: rate * 1000,
            last_ms: None,
        }
    }

    /// Writes the bucket's level, for [`TokenBucket::restore`].
    pub fn save(&self, w: &mut crate::state::Writer) {
        w.u64(self.milli);
        w.opt_u64(self.last_ms);
    }

    /// A bucket for `rate` events per second at the level that
    /// [`TokenBucket::save`] wrote (capped, if the rate is now lower).
    ///
    /// # Errors
    /// Saved state that does not read.
    pub fn restore(
        rate: u32,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<Self, crate::state::StateError> {
        let mut bucket = Self::new(rate);
        bucket.milli = r.u64()?.min(bucket.rate * 1000);
        bucket.last_ms = r.opt_u64()?;
        Ok(bucket)
    }

    /// Takes one token at `now_ms`; `false` when the rate is exceeded.
    /// A time earlier than one already seen counts as no time passed.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        let cap = self.rate * 1000;
        if let Some(last) = self.last_ms {
            let gained = now_ms.saturating_sub(last).saturating_mul(self.rate);
            self.milli = self.milli.saturating_add(gained).min(cap);
        }
        self.last_ms = Some(self.last_ms.map_or(now_ms, |l| l.max(now_ms)));
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let mut b = TokenBucket::new(3);
        assert!(b.try_take(0));
        assert!(b.try_take(0));
        assert!(b.try_take(0));
        assert!(!b.try_take(0));
        // One token takes a third of a second.
        assert!(!b.try_take(333));
        assert!(b.try_take(334));
        assert!(!b.try_take(334));
        // A long pause fills the bucket, but only to one second's worth.
        for _ in 0..3 {
            assert!(b.try_take(60_000));
        }
        assert!(!b.try_take(60_000));
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let mut b = TokenBucket::new(1);
        assert!(b.try_take(5_000));
        assert!(!b.try_take(1_000));
        assert!(!b.try_take(5_999));
        assert!(b.try_take(6_000));
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let mut b = TokenBucket::new(u32::MAX);
        assert!(b.try_take(0));
        assert!(b.try_take(u64::MAX));
        assert!(b.try_take(u64::MAX));
    }
}
