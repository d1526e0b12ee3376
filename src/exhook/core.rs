//! What the hook server does with each hook, whatever the ExHook version:
//! turn it into a [`Record`] and offer it to the writer's bounded queue.
//!
//! Nothing here waits. EMQX calls `client.connected` and `message.publish`
//! inline, in the client's own connection process, so a hook that waited
//! for the database would stall every publisher while it is slow. A record
//! that does not fit in the queue is dropped and counted instead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::protocol::topic;
use crate::store::{now_ms, Presence, StoredMessage};

/// One write for the store, in the order the hooks came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Connected(Presence),
    Disconnected { clientid: String, node: String },
    Message(StoredMessage),
}

/// Counters of what the hook server did with what EMQX reported.
#[derive(Debug, Default)]
pub struct HookStats {
    pub(crate) queued: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) written: AtomicU64,
    pub(crate) stored: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) abandoned: AtomicU64,
}

/// Which of the [`HookStats`] counters a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Queued,
    Dropped,
    Written,
    Stored,
    Rejected,
    Abandoned,
}

impl HookStats {
    /// Counts `n` records, here and in the exported metrics.
    pub(crate) fn add(&self, outcome: Outcome, n: u64) {
        let (counter, label) = match outcome {
            Outcome::Queued => (&self.queued, "queued"),
            Outcome::Dropped => (&self.dropped, "dropped"),
            Outcome::Written => (&self.written, "written"),
            Outcome::Stored => (&self.stored, "stored"),
            Outcome::Rejected => (&self.rejected, "rejected"),
            Outcome::Abandoned => (&self.abandoned, "abandoned"),
        };
        counter.fetch_add(n, Ordering::Relaxed);
        crate::telemetry::hook_records(label, n);
    }
}

/// A snapshot of [`HookStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Records (presence changes and messages) accepted into the queue.
    pub queued: u64,
    /// Records that found the queue full and were not stored.
    pub dropped: u64,
    /// Queued records the store has taken (duplicates included).
    pub written: u64,
    /// Messages stored as new (not duplicates).
    pub stored: u64,
    /// Queued records the database refused (bad data): retrying cannot help.
    pub rejected: u64,
    /// Queued records still unwritten when shutdown's grace ran out.
    pub abandoned: u64,
    /// Records waiting in the queue now.
    pub pending: u64,
}

impl StatsSnapshot {
    /// Every record accepted into the queue has been dealt with.
    pub fn settled(&self) -> bool {
        self.pending == 0 && self.written + self.rejected + self.abandoned == self.queued
    }
}

/// The version-independent hook server: the history topics, the queue to
/// the writer and the counters.
pub struct HookCore {
    /// Topic filters whose messages are stored; EMQX is asked to send only
    /// these, and the core checks again (a broker may not filter).
    topics: Vec<String>,
    tx: mpsc::Sender<Record>,
    stats: Arc<HookStats>,
    /// Set while records are being dropped, so that an overload is logged
    /// when it starts and when it ends, not once per record.
    dropping: AtomicBool,
}

/// A hook EMQX should call, with the topic filters for message hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub name: &'static str,
    pub topics: Vec<String>,
}

impl HookCore {
    pub(crate) fn new(
        topics: Vec<String>,
        tx: mpsc::Sender<Record>,
        stats: Arc<HookStats>,
    ) -> Self {
        Self {
            topics,
            tx,
            stats,
            dropping: AtomicBool::new(false),
        }
    }

    /// The hooks to register in `OnProviderLoaded`: only those used.
    pub fn hooks(&self) -> Vec<HookSpec> {
        vec![
            HookSpec {
                name: "client.connected",
                topics: Vec::new(),
            },
            HookSpec {
                name: "client.disconnected",
                topics: Vec::new(),
            },
            HookSpec {
                name: "message.publish",
                topics: self.topics.clone(),
            },
        ]
    }

    /// A client (MQTT or any gateway's) is connected.
    pub fn client_connected(&self, clientid: String, username: String, node: String) {
        self.offer(Record::Connected(Presence {
            clientid,
            username,
            node,
            connected_at_ms: now_ms(),
        }));
    }

    /// A client's connection ended.
    pub fn client_disconnected(&self, clientid: String, node: String) {
        self.offer(Record::Disconnected { clientid, node });
    }

    /// A message is being published; it is kept when its topic is a
    /// history topic. Returns whether it was queued.
    pub fn message_published(&self, message: StoredMessage) -> bool {
        if !self.is_history_topic(&message.topic) {
            return false;
        }
        self.offer(Record::Message(message))
    }

    /// Whether messages on `topic` are stored.
    pub fn is_history_topic(&self, name: &str) -> bool {
        self.topics.iter().any(|f| topic::matches(f, name))
    }

    /// The counters as they are now.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        StatsSnapshot {
            queued: s.queued.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            written: s.written.load(Ordering::Relaxed),
            stored: s.stored.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            abandoned: s.abandoned.load(Ordering::Relaxed),
            pending: (self.tx.max_capacity() - self.tx.capacity()) as u64,
        }
    }

    pub(crate) fn count_abandoned(&self, n: u64) {
        self.stats.add(Outcome::Abandoned, n);
    }

    fn offer(&self, record: Record) -> bool {
        match self.tx.try_send(record) {
            Ok(()) => {
                self.stats.add(Outcome::Queued, 1);
                if self.dropping.load(Ordering::Relaxed)
                    && self.dropping.swap(false, Ordering::Relaxed)
                {
                    info!(
                        dropped_total = self.stats.dropped.load(Ordering::Relaxed),
                        "history queue has room again"
                    );
                }
                true
            }
            Err(_) => {
                // Full (the database is slow or down) or closed (shutting
                // down): either way EMQX is not kept waiting.
                self.stats.add(Outcome::Dropped, 1);
                if !self.dropping.swap(true, Ordering::Relaxed) {
                    warn!(
                        capacity = self.tx.max_capacity(),
                        "history queue full: presence changes and messages are dropped until the store catches up"
                    );
                }
                false
            }
        }
    }
}
