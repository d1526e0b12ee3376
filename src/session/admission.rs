//! How many sessions are served at once (`--max-sessions`).
//!
//! Counted apart from the registry's map so that taking a place is one
//! atomic step, whatever else is happening to the map.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tracing::warn;

pub(crate) struct Admission {
    /// 0 is no limit.
    max: usize,
    live: AtomicUsize,
    /// Set while sockets are being turned away, so that is logged once per
    /// episode rather than once per socket.
    full: AtomicBool,
}

impl Admission {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            live: AtomicUsize::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Takes a place for a new session; `false` when none is left.
    pub(crate) fn admit(&self) -> bool {
        let max = self.max;
        let admitted = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            if self.full.load(Ordering::Relaxed) {
                self.full.store(false, Ordering::Relaxed);
            }
        } else if !self.full.swap(true, Ordering::Relaxed) {
            warn!(max, "session limit reached; refusing new sockets");
        }
        admitted
    }

    /// Gives back the place of a session that ended.
    pub(crate) fn leave(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_again_after_one_leaves() {
        let a = Admission::new(2);
        assert!(a.admit());
        assert!(a.admit());
        assert!(!a.admit());
        assert!(!a.admit());
        a.leave();
        assert!(a.admit());
        assert!(!a.admit());
    }

    #[test]
    fn zero_is_no_limit() {
        let a = Admission::new(0);
        assert!((0..10_000).all(|_| a.admit()));
    }
}
