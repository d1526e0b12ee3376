//! Calls to EMQX's ConnectionAdapter: a bounded number in flight, and
//! retries for the calls that must get through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::emqx::{ConnectionAdapter, EmqxError, Op};

pub(crate) struct Calls {
    emqx: Arc<dyn ConnectionAdapter>,
    /// Places for calls in flight (`max_pending_calls`), so a slow EMQX
    /// stalls workers, which fills mailboxes, which slows EMQX's handler
    /// calls down, instead of growing work without bound.
    places: Semaphore,
    max: usize,
    /// How long a call waits for a place before it fails as unreachable.
    place_wait: Duration,
    /// How long [`Calls::deliver`] retries.
    retry_for: Duration,
    /// Set while calls wait too long for a place, so that is logged once
    /// per episode rather than once per call.
    saturated: AtomicBool,
}

impl Calls {
    pub(crate) fn new(
        emqx: Arc<dyn ConnectionAdapter>,
        max: usize,
        place_wait: Duration,
        retry_for: Duration,
    ) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            emqx,
            places: Semaphore::new(max),
            max,
            place_wait,
            retry_for,
            saturated: AtomicBool::new(false),
        }
    }

    /// One call, in one of the places. Waiting for a place is bounded by
    /// `place_wait`; past it the call fails as unreachable, which a
    /// command reports as 503.
    pub(crate) async fn call(&self, conn: &str, op: Op) -> Result<(), EmqxError> {
        let permit = match tokio::time::timeout(self.place_wait, self.places.acquire()).await {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; treat it like a full one.
            Ok(Err(_)) | Err(_) => {
                if !self.saturated.swap(true, Ordering::Relaxed) {
                    warn!(
                        max = self.max,
                        "too many EMQX calls pending; failing calls that wait too long"
                    );
                }
                return Err(EmqxError::Unreachable("too many pending calls".into()));
            }
        };
        if self.saturated.load(Ordering::Relaxed) && self.saturated.swap(false, Ordering::Relaxed) {
            info!("EMQX calls flow again");
        }
        let result = self.emqx.call(conn, op).await;
        drop(permit);
        result
    }

    /// A call that must get through: retried with backoff while EMQX is
    /// unreachable, for at most `retry_for`. Giving up drops it.
    pub(crate) async fn deliver(&self, conn: &str, op: Op) -> Result<(), EmqxError> {
        let give_up = Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.call(conn, op.clone()).await {
                Err(EmqxError::Unreachable(e)) => {
                    if Instant::now() + backoff >= give_up {
                        warn!(%conn, method = op.method(), error = %e, "gave up delivering to EMQX");
                        return Err(EmqxError::Unreachable(e));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use futures::future::BoxFuture;

    use super::*;

    /// Unreachable for the first `fail` calls, then fine; each call takes
    /// `takes`.
    struct Flaky {
        fail: AtomicUsize,
        calls: AtomicUsize,
        takes: Duration,
    }

    impl ConnectionAdapter for Flaky {
        fn call(&self, _: &str, _: Op) -> BoxFuture<'static, Result<(), EmqxError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let failing = self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let takes = self.takes;
            Box::pin(async move {
                tokio::time::sleep(takes).await;
                if failing {
                    Err(EmqxError::Unreachable("down".into()))
                } else {
                    Ok(())
                }
            })
        }
    }

    fn flaky(fail: usize, takes: Duration) -> Arc<Flaky> {
        Arc::new(Flaky {
            fail: AtomicUsize::new(fail),
            calls: AtomicUsize::new(0),
            takes,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn deliver_retries_while_unreachable_and_gives_up_in_time() {
        let emqx = flaky(3, Duration::ZERO);
        let calls = Calls::new(
            emqx.clone(),
            8,
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        assert_eq!(calls.deliver("c", Op::Send(Bytes::new())).await, Ok(()));
        assert_eq!(emqx.calls.load(Ordering::SeqCst), 4);

        let emqx = flaky(usize::MAX, Duration::ZERO);
        let calls = Calls::new(emqx, 8, Duration::from_secs(5), Duration::from_secs(3));
        let started = Instant::now();
        let r = calls.deliver("c", Op::Send(Bytes::new())).await;
        assert!(matches!(r, Err(EmqxError::Unreachable(_))));
        assert!(started.elapsed() <= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_too_long_for_a_place_fails_as_unreachable() {
        let emqx = flaky(0, Duration::from_secs(60));
        let calls = Arc::new(Calls::new(emqx, 1, Duration::from_secs(1), Duration::ZERO));
        let busy = tokio::spawn({
            let calls = calls.clone();
            async move { calls.call("a", Op::Send(Bytes::new())).await }
        });
        tokio::task::yield_now().await;
        let r = calls.call("b", Op::Send(Bytes::new())).await;
        assert_eq!(
            r,
            Err(EmqxError::Unreachable("too many pending calls".into()))
        );
        assert_eq!(busy.await.unwrap(), Ok(()));
    }
}
