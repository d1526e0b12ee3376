//! One task that owns every per-connection deadline the adapter runs itself
//! (login timeout, waiting for a late `OnSocketCreated`).
//!
//! A single `DelayQueue` instead of a sleeping task per connection keeps an
//! idle session's cost to one map entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::time::{delay_queue, DelayQueue};

/// Handle to the deadline task. Dropping every handle stops the task.
#[derive(Clone)]
pub(crate) struct Timers {
    /// Unbounded on purpose: commands are sent from synchronous code holding
    /// map locks, and there is at most one live deadline per connection.
    tx: mpsc::UnboundedSender<(Arc<str>, Option<Duration>)>,
}

impl Timers {
    /// Starts the task; `fire` is called with each conn whose deadline passed.
    pub(crate) fn start(fire: impl Fn(Arc<str>) + Send + 'static) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Arc<str>, Option<Duration>)>();
        tokio::spawn(async move {
            let mut queue: DelayQueue<Arc<str>> = DelayQueue::new();
            let mut keys: HashMap<Arc<str>, delay_queue::Key> = HashMap::new();
            loop {
                tokio::select! {
                    cmd = rx.recv() => {
                        let Some((conn, after)) = cmd else { break };
                        if let Some(key) = keys.remove(&conn) {
                            queue.remove(&key);
                        }
                        if let Some(after) = after {
                            let key = queue.insert(conn.clone(), after);
                            keys.insert(conn, key);
                        }
                    }
                    Some(expired) = queue.next(), if !queue.is_empty() => {
                        let conn = expired.into_inner();
                        keys.remove(&conn);
                        fire(conn);
                    }
                }
            }
        });
        Self { tx }
    }

    /// Arms `conn`'s deadline `after` from now, replacing any earlier one;
    /// `None` cancels it.
    pub(crate) fn set(&self, conn: &Arc<str>, after: Option<Duration>) {
        // A closed channel means the runtime is shutting down; nothing to arm.
        let _ = self.tx.send((conn.clone(), after));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_once_replaces_and_cancels() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Timers::start(move |c| {
            let _ = tx.send(c);
        });
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        t.set(&a, Some(Duration::from_secs(5)));
        t.set(&b, Some(Duration::from_secs(1)));
        t.set(&a, Some(Duration::from_secs(2))); // replaces the 5 s deadline
        let c: Arc<str> = "c".into();
        t.set(&c, Some(Duration::from_secs(1)));
        t.set(&c, None);
        assert_eq!(&*rx.recv().await.unwrap(), "b");
        assert_eq!(&*rx.recv().await.unwrap(), "a");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            rx.try_recv().is_err(),
            "a cancelled or replaced deadline fired"
        );
    }
}
