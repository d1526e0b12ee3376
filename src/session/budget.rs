//! The bound on events queued or being handled across all connections
//! (`--max-pending-events`).
//!
//! The adapter answers a handler call as soon as its event is queued, so
//! without this bound a burst of connections (100k logging in at once)
//! piles up work, and memory, faster than EMQX answers the calls it makes.
//! Over the bound, handler calls wait before they answer, which slows EMQX
//! down instead.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

pub(crate) struct EventBudget {
    limit: usize,
    queued: AtomicUsize,
    /// Handler calls waiting for room, so releases only wake anyone when
    /// someone waits.
    waiting: AtomicUsize,
    room: Notify,
}

impl EventBudget {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            queued: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            room: Notify::new(),
        }
    }

    /// `n` more events are queued.
    pub(crate) fn take(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` queued events are done with (handled and their output sent, or
    /// dropped).
    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.queued.fetch_sub(n, Ordering::SeqCst).saturating_sub(n);
        if now <= self.limit && self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// Returns once the queued events are within the bound.
    /// Cancel-safe: a dropped wait is uncounted.
    pub(crate) async fn room(&self) {
        if self.queued.load(Ordering::SeqCst) <= self.limit {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _counted = Uncount(&self.waiting);
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queued.load(Ordering::SeqCst) <= self.limit {
                return;
            }
            notified.await;
        }
    }
}

/// Takes one off a count when dropped, also when the future holding it is
/// cancelled.
struct Uncount<'a>(&'a AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_while_over_the_bound_and_wakes_on_release() {
        let b = Arc::new(EventBudget::new(2));
        b.take(2);
        b.room().await; // at the bound: room enough
        b.take(1);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.room().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "over the bound, it waits");
        b.release(1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken by the release")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_is_uncounted() {
        let b = EventBudget::new(0);
        b.take(1);
        let _ = tokio::time::timeout(Duration::from_millis(10), b.room()).await;
        assert_eq!(b.waiting.load(Ordering::SeqCst), 0);
    }
}
