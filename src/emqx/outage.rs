//! When to log that EMQX is unreachable, and that it is back.
//!
//! An outage is logged when it starts and when it ends, not once per call.
//! Under overload EMQX answers some calls and times others out, so "down"
//! and "up" can alternate many times a second; each of those short outages
//! would be two log lines. After a logged outage ends, a new one is only
//! logged once `quiet` has passed since the last warning; the outages in
//! between are counted and reported with the next line.
//!
//! Sans-IO: the caller passes the time and logs what comes back.

use std::time::{Duration, Instant};

/// What to log after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// EMQX became unreachable; `unlogged` earlier outages went unlogged.
    Down { unlogged: u64 },
    /// EMQX answers again after a logged outage.
    Up,
}

#[derive(Debug)]
pub(crate) struct OutageLog {
    quiet: Duration,
    down: bool,
    /// Whether the current outage (while `down`) has been logged.
    logged: bool,
    last_warning: Option<Instant>,
    /// Outages that started and ended without a line.
    unlogged: u64,
}

impl OutageLog {
    pub(crate) fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            down: false,
            logged: false,
            last_warning: None,
            unlogged: 0,
        }
    }

    /// Whether EMQX is down as far as the last call knows.
    pub(crate) fn is_down(&self) -> bool {
        self.down
    }

    /// Records a call's outcome at `now`; says what to log, if anything.
    pub(crate) fn note(&mut self, reachable: bool, now: Instant) -> Option<Line> {
        if reachable {
            if !self.down {
                return None;
            }
            self.down = false;
            if !std::mem::replace(&mut self.logged, false) {
                self.unlogged += 1;
                return None;
            }
            return Some(Line::Up);
        }
        self.down = true;
        // A failure while down is also the moment to log an outage that
        // started inside the quiet time and is still going on.
        let quiet_over = self
            .last_warning
            .is_none_or(|t| now.saturating_duration_since(t) >= self.quiet);
        if self.logged || !quiet_over {
            return None;
        }
        self.logged = true;
        self.last_warning = Some(now);
        Some(Line::Down {
            unlogged: std::mem::take(&mut self.unlogged),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_secs(30);

    #[test]
    fn one_outage_is_two_lines() {
        let t = Instant::now();
        let mut log = OutageLog::new(QUIET);
        assert_eq!(log.note(true, t), None);
        assert_eq!(log.note(false, t), Some(Line::Down { unlogged: 0 }));
        // Every further failed call of the same outage is silent.
        for i in 1..100 {
            assert_eq!(log.note(false, t + Duration::from_millis(i)), None);
        }
        assert_eq!(log.note(true, t + Duration::from_secs(5)), Some(Line::Up));
        assert_eq!(log.note(true, t + Duration::from_secs(6)), None);
    }

    #[test]
    fn flapping_is_counted_not_logged_until_the_quiet_time_passes() {
        let t = Instant::now();
        let mut log = OutageLog::new(QUIET);
        assert_eq!(log.note(false, t), Some(Line::Down { unlogged: 0 }));
        assert_eq!(log.note(true, t), Some(Line::Up));
        // Ten short outages within the quiet time: nothing logged.
        for i in 1..=10 {
            let at = t + Duration::from_secs(i);
            assert_eq!(log.note(false, at), None);
            assert_eq!(log.note(true, at), None);
        }
        // The next one, after the quiet time, is logged with the count.
        let later = t + QUIET + Duration::from_secs(1);
        assert_eq!(log.note(false, later), Some(Line::Down { unlogged: 10 }));
        assert_eq!(log.note(true, later), Some(Line::Up));
    }

    #[test]
    fn an_outage_that_starts_in_the_quiet_time_is_logged_once_it_lasts() {
        let t = Instant::now();
        let mut log = OutageLog::new(QUIET);
        assert!(log.note(false, t).is_some());
        assert!(log.note(true, t).is_some());
        // Down again at once: too soon to warn ...
        assert_eq!(log.note(false, t + Duration::from_secs(1)), None);
        assert!(log.is_down());
        // ... but still down when the quiet time is over: warn now.
        assert_eq!(log.note(false, t + QUIET), Some(Line::Down { unlogged: 0 }));
        assert_eq!(log.note(false, t + QUIET * 2), None);
        assert_eq!(log.note(true, t + QUIET * 2), Some(Line::Up));
    }
}
