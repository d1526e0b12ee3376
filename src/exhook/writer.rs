//! The writer task: drains the hook queue into the store, and the
//! retention task that trims history in the background.
//!
//! A record taken from the queue is written before the next one, in order,
//! and retried for as long as the database fails in a way that may pass
//! (unreachable, stalled, locked): the queue then fills and new records are
//! dropped and counted at the door, but nothing already accepted is lost.
//! Only data the database refuses outright is given up, one record at a
//! time, and counted. At shutdown the writer gets a bounded grace to empty
//! the queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::core::{ClearCause, HookStats, Outcome, Record};
use crate::store::{now_ms, Presence, Retention, Store, StoreError, StoredMessage};

/// First pause after a failed write; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One store call, borrowed from the records it writes.
enum Write<'a> {
    Connected(&'a Presence),
    Disconnected(&'a str, &'a str),
    Messages(&'a [StoredMessage]),
    ClearNode(&'a str, u64, ClearCause),
}

impl Write<'_> {
    async fn apply(&self, store: &dyn Store) -> Result<u64, StoreError> {
        match self {
            Write::Connected(p) => store.presence_upsert((*p).clone()).await.map(|()| 0),
            Write::Disconnected(id, node) => store.presence_remove(id, node).await.map(|()| 0),
            Write::Messages(batch) => store.history_insert(batch).await,
            Write::ClearNode(node, before_ms, cause) => {
                let gone = store.presence_clear_node(node, *before_ms).await?;
                if gone > 0 {
                    info!(%node, clients = gone, cause = cause.label(), "presence repaired");
                }
                crate::telemetry::presence_repaired(cause.label(), gone);
                // Not messages: nothing stored.
                Ok(0)
            }
        }
    }

    /// How many of EMQX's hook records the write carries (a repair is
    /// the adapter's own).
    fn records(&self) -> u64 {
        match self {
            Write::Messages(batch) => batch.len() as u64,
            Write::ClearNode(..) => 0,
            _ => 1,
        }
    }
}

/// Why a write did not happen.
enum Failed {
    /// The database refused this data; retrying cannot help.
    Rejected(StoreError),
    /// Shutdown's grace ran out first.
    Abandoned,
}

pub(crate) struct Writer {
    store: Arc<dyn Store>,
    stats: Arc<HookStats>,
    /// Records written in one transaction at most.
    batch: usize,
    /// Set (to the moment to give up) when shutdown begins.
    shutdown: watch::Receiver<Option<Instant>>,
    /// Set while the store fails, so an outage is logged once each way.
    failing: bool,
}

impl Writer {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        stats: Arc<HookStats>,
        batch: usize,
        shutdown: watch::Receiver<Option<Instant>>,
    ) -> Self {
        Self {
            store,
            stats,
            batch: batch.max(1),
            shutdown,
            failing: false,
        }
    }

    /// Runs until the queue is closed and empty, or shutdown's grace ends.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Record>) {
        let mut records = Vec::with_capacity(self.batch);
        // Cleared if the shutdown signal's sender goes away without a
        // word; the writer then ends when every queue sender is gone.
        let mut watching = true;
        loop {
            let closing = self.shutdown.borrow().is_some();
            if closing {
                // No new records from now on; what is queued still goes.
                rx.close();
            }
            let got = tokio::select! {
                n = rx.recv_many(&mut records, self.batch) => n,
                r = self.shutdown.changed(), if watching && !closing => {
                    watching = r.is_ok();
                    continue;
                }
            };
            if got == 0 {
                break;
            }
            if let Err(unwritten) = self.write_all(&records).await {
                // Grace is over: count what will never be written.
                let left = unwritten as u64 + rx.len() as u64;
                self.stats.add(Outcome::Abandoned, left);
                warn!(
                    records = left,
                    "store still failing at shutdown; unwritten hook records abandoned"
                );
                break;
            }
            records.clear();
        }
        debug!("hook writer stopped");
    }

    /// Writes `records` in order: runs of messages as one batch, presence
    /// changes one by one. When shutdown's grace runs out, `Err` says how
    /// many of `records` were not written (those written are counted).
    async fn write_all(&mut self, records: &[Record]) -> Result<(), usize> {
        let mut at = 0;
        while at < records.len() {
            let left = records.len() - at;
            match &records[at] {
                Record::Connected(p) => {
                    if self.write_or_reject(Write::Connected(p)).await.is_err() {
                        return Err(left);
                    }
                    at += 1;
                }
                Record::Disconnected { clientid, node } => {
                    let w = Write::Disconnected(clientid, node);
                    if self.write_or_reject(w).await.is_err() {
                        return Err(left);
                    }
                    at += 1;
                }
                Record::NodeCleared {
                    node,
                    before_ms,
                    cause,
                } => {
                    let w = Write::ClearNode(node, *before_ms, *cause);
                    if self.write_or_reject(w).await.is_err() {
                        return Err(left);
                    }
                    at += 1;
                }
                Record::Message(_) => {
                    let run: Vec<StoredMessage> = records[at..]
                        .iter()
                        .map_while(|r| match r {
                            Record::Message(m) => Some(m.clone()),
                            _ => None,
                        })
                        .collect();
                    at += run.len();
                    if let Err(unwritten) = self.write_messages(&run).await {
                        return Err(unwritten + (records.len() - at));
                    }
                }
            }
        }
        Ok(())
    }

    /// One run of messages; `Err` says how many of them were not written.
    async fn write_messages(&mut self, run: &[StoredMessage]) -> Result<(), usize> {
        match self.write(&Write::Messages(run)).await {
            Ok(()) => Ok(()),
            Err(Failed::Abandoned) => Err(run.len()),
            // One bad message must not sink the others: one by one, so
            // that only the refused ones are given up.
            Err(Failed::Rejected(_)) if run.len() > 1 => {
                for (i, m) in run.iter().enumerate() {
                    let one = Write::Messages(std::slice::from_ref(m));
                    if self.write_or_reject(one).await.is_err() {
                        return Err(run.len() - i);
                    }
                }
                Ok(())
            }
            Err(Failed::Rejected(e)) => {
                self.reject(&Write::Messages(run), &e);
                Ok(())
            }
        }
    }

    /// One write; a refusal is counted and passes, `Err` is abandonment.
    async fn write_or_reject(&mut self, w: Write<'_>) -> Result<(), ()> {
        match self.write(&w).await {
            Ok(()) => Ok(()),
            Err(Failed::Rejected(e)) => {
                self.reject(&w, &e);
                Ok(())
            }
            Err(Failed::Abandoned) => Err(()),
        }
    }

    fn reject(&self, w: &Write<'_>, e: &StoreError) {
        self.stats.add(Outcome::Rejected, w.records());
        // Topic and id say which message it was; the payload stays out of
        // the log.
        match w {
            Write::Messages(batch) => {
                for m in *batch {
                    warn!(topic = %m.topic, id = %m.id, error = %e, "store refused a message; dropped");
                }
            }
            Write::Connected(p) => {
                warn!(clientid = %p.clientid, error = %e, "store refused a presence change; dropped");
            }
            Write::Disconnected(id, _) => {
                warn!(clientid = %id, error = %e, "store refused a presence change; dropped");
            }
            Write::ClearNode(node, ..) => {
                warn!(%node, error = %e, "store refused a presence repair; dropped");
            }
        }
    }

    /// One write, retried while the failure may pass.
    async fn write(&mut self, w: &Write<'_>) -> Result<(), Failed> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match w.apply(&*self.store).await {
                Ok(new) => {
                    if std::mem::replace(&mut self.failing, false) {
                        info!("store writable again");
                    }
                    self.stats.add(Outcome::Written, w.records());
                    self.stats.add(Outcome::Stored, new);
                    return Ok(());
                }
                Err(e) if e.is_rejection() => return Err(Failed::Rejected(e)),
                Err(e) => {
                    if !std::mem::replace(&mut self.failing, true) {
                        warn!(error = %e, "store write failed; retrying until it passes");
                    }
                }
            }
            let give_up = *self.shutdown.borrow();
            if give_up.is_some_and(|at| Instant::now() + backoff > at) {
                return Err(Failed::Abandoned);
            }
            // A shutdown that begins during the pause is seen at the next
            // failure; the pause is short.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Trims history every `every` until the store is gone.
pub(crate) async fn retention(store: Arc<dyn Store>, retention: Retention, every: Duration) {
    if retention == Retention::default() {
        return;
    }
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.prune(retention, now_ms()).await {
            Ok(0) => {}
            Ok(n) => debug!(deleted = n, "history retention"),
            Err(e) => warn!(error = %e, "history retention failed; next try later"),
        }
    }
}
