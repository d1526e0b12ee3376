//! One task that wakes connections when they asked to be woken.
//!
//! A wake-up is only a hint: the connection itself knows its deadline
//! ([`crate::protocol::Connection::poll_timeout`]) and acts only if it is
//! due, so a wake-up is never cancelled, and one that comes for a deadline
//! that moved, or for a conn that meanwhile became another session, does
//! nothing. A single `DelayQueue` instead of a sleeping task per connection
//! keeps an idle session's cost to its map entry.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::time::DelayQueue;

/// Handle to the wake-up task. Dropping every handle stops the task.
#[derive(Clone)]
pub(crate) struct Wakeups {
    /// Unbounded on purpose: wake-ups are asked for from synchronous code
    /// holding map locks, and a connection asks again only for a deadline
    /// earlier than the one it already has.
    tx: mpsc::UnboundedSender<(Arc<str>, Duration)>,
}

impl Wakeups {
    /// Starts the task; `wake` is called with each conn whose time came.
    pub(crate) fn start(wake: impl Fn(Arc<str>) + Send + 'static) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Arc<str>, Duration)>();
        tokio::spawn(async move {
            let mut queue: DelayQueue<Arc<str>> = DelayQueue::new();
            loop {
                tokio::select! {
                    cmd = rx.recv() => {
                        let Some((conn, after)) = cmd else { break };
                        queue.insert(conn, after);
                    }
                    Some(expired) = queue.next(), if !queue.is_empty() => {
                        wake(expired.into_inner());
                    }
                }
            }
        });
        Self { tx }
    }

    /// Wakes `conn` `after` from now.
    pub(crate) fn after(&self, conn: &Arc<str>, after: Duration) {
        // A closed channel means the runtime is shutting down.
        let _ = self.tx.send((conn.clone(), after));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wakes_each_in_time_order_and_every_time_asked() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = Wakeups::start(move |c| {
            let _ = tx.send(c);
        });
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        w.after(&a, Duration::from_secs(5));
        w.after(&b, Duration::from_secs(1));
        w.after(&a, Duration::from_secs(2));
        assert_eq!(&*rx.recv().await.unwrap(), "b");
        assert_eq!(&*rx.recv().await.unwrap(), "a");
        // Not cancelled by the earlier one: the connection decides.
        assert_eq!(&*rx.recv().await.unwrap(), "a");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(rx.try_recv().is_err());
    }
}
