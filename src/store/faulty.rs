//! A [`Store`] wrapper that can be made to fail or stall on demand, for the
//! tests and benchmarks that show what the adapter does while its database
//! is down or hangs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{HistoryCursor, Presence, Retention, Store, StoreError, StoredMessage, WhoPage};

/// What the wrapped database does right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Calls pass through.
    None,
    /// Calls fail at once, as with a database that refuses connections.
    Down,
    /// Calls wait until the fault changes, as with a hung database.
    Stalled,
}

/// Wraps a store and injects [`Fault`]s into every call.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    fault: watch::Sender<Fault>,
    /// Calls made, whatever their outcome.
    calls: AtomicU64,
}

impl FaultyStore {
    /// `inner`, healthy for now.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            fault: watch::Sender::new(Fault::None),
            calls: AtomicU64::new(0),
        }
    }

    /// Changes the fault; stalled calls go on (or fail) at once.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// How many calls reached the wrapper.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn gate(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rx = self.fault.subscribe();
        loop {
            match *rx.borrow_and_update() {
                Fault::None => return Ok(()),
                Fault::Down => return Err(StoreError::Unavailable("down (injected)".into())),
                Fault::Stalled => {}
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Unavailable("closed".into()));
            }
        }
    }
}

impl Store for FaultyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn presence_upsert(&self, p: Presence) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.presence_upsert(p).await
        })
    }

    fn presence_remove<'a>(
        &'a self,
        clientid: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.presence_remove(clientid, node).await
        })
    }

    fn presence_clear_node<'a>(
        &'a self,
        node: &'a str,
        before_ms: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.presence_clear_node(node, before_ms).await
        })
    }

    fn presence_of_node<'a>(
        &'a self,
        node: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Presence>, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.presence_of_node(node, limit).await
        })
    }

    fn presence_remove_before<'a>(
        &'a self,
        clientid: &'a str,
        node: &'a str,
        before_ms: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner
                .presence_remove_before(clientid, node, before_ms)
                .await
        })
    }

    fn presence_insert_absent(&self, p: Presence) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.presence_insert_absent(p).await
        })
    }

    fn presence_list<'a>(
        &'a self,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<WhoPage, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.presence_list(prefix, limit).await
        })
    }

    fn history_insert<'a>(
        &'a self,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.history_insert(batch).await
        })
    }

    fn history_newest<'a>(
        &'a self,
        topic: &'a str,
        n: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.history_newest(topic, n).await
        })
    }

    fn history_before<'a>(
        &'a self,
        topic: &'a str,
        n: usize,
        before: &'a HistoryCursor,
    ) -> BoxFuture<'a, Result<Option<Vec<StoredMessage>>, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.history_before(topic, n, before).await
        })
    }

    fn prune(&self, retention: Retention, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.prune(retention, now_ms).await
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
}
