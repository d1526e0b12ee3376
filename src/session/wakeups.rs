//! One task that wakes connections when their deadline comes.
//!
//! A wake-up is only a hint: the connection itself knows its deadline
//! ([`crate::protocol::Connection::poll_timeout`]) and acts only if it is
//! due, so one that comes for a deadline that moved, or for a conn that
//! meanwhile became another session, does nothing. The task keeps at most
//! one wake-up per conn, replaced or cancelled when the deadline changes,
//! only so that 100k logged-in connections do not each leave a dead entry
//! behind: the map is bookkeeping of this task, not a connection's state.
//! A single `DelayQueue` instead of a sleeping task per connection keeps an
//! idle session's cost to its map entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::time::{delay_queue, DelayQueue};

/// The longest single wait; a later deadline takes several.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Handle to the wake-up task. Dropping every handle stops the task.
#[derive(Clone)]
pub(crate) struct Wakeups {
    /// Unbounded on purpose: wake-ups are asked for from synchronous code
    /// holding map locks, and a connection asks only when its deadline
    /// changes.
    tx: mpsc::UnboundedSender<(Arc<str>, Option<Duration>)>,
}

impl Wakeups {
    /// Starts the task; `wake` is called with each conn whose time came.
    pub(crate) fn start(wake: impl Fn(Arc<str>) + Send + 'static) -> Self {
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
                        wake(conn);
                    }
                }
            }
        });
        Self { tx }
    }

    /// Wakes `conn` `after` from now, instead of any earlier request;
    /// `None` cancels.
    pub(crate) fn set(&self, conn: &Arc<str>, after: Option<Duration>) {
        // The queue cannot hold a deadline two years out and would panic;
        // a wake-up that comes before a far deadline is due only asks again.
        let after = after.map(|a| a.min(MAX_WAIT));
        // A closed channel means the runtime is shutting down.
        let _ = self.tx.send((conn.clone(), after));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wakes_once_per_conn_replaced_and_cancelled() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = Wakeups::start(move |c| {
            let _ = tx.send(c);
        });
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let c: Arc<str> = "c".into();
        w.set(&a, Some(Duration::from_secs(5)));
        w.set(&b, Some(Duration::from_secs(1)));
        w.set(&a, Some(Duration::from_secs(2))); // replaces the 5 s one
        w.set(&c, Some(Duration::from_secs(1)));
        w.set(&c, None);
        assert_eq!(&*rx.recv().await.unwrap(), "b");
        assert_eq!(&*rx.recv().await.unwrap(), "a");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(rx.try_recv().is_err(), "a replaced or cancelled one came");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_years_away_neither_panics_nor_stops_the_others() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = Wakeups::start(move |c| {
            let _ = tx.send(c);
        });
        let far: Arc<str> = "far".into();
        let near: Arc<str> = "near".into();
        w.set(&far, Some(Duration::from_secs(10_000 * 24 * 3600)));
        w.set(&near, Some(Duration::from_secs(1)));
        assert_eq!(&*rx.recv().await.unwrap(), "near");
        // The far one comes early, once a day, to be asked again.
        assert_eq!(&*rx.recv().await.unwrap(), "far");
    }
}
