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
    Disconnected {
        clientid: String,
        node: String,
    },
    Message(StoredMessage),
    /// Every client of `node` that connected before `before_ms` is gone,
    /// though EMQX reported no disconnect for them: why, for the metrics.
    NodeCleared {
        node: String,
        before_ms: u64,
        cause: ClearCause,
    },
}

/// Why the clients of a node were taken for gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClearCause {
    /// The node loaded the provider after a (re)start: no client from
    /// before it can be connected.
    NodeStarted,
    /// The node unloaded the provider and did not load it again within
    /// the grace: it stopped, closing its clients unreported.
    NodeStopped,
}

impl ClearCause {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::NodeStarted => "node_started",
            Self::NodeStopped => "node_stopped",
        }
    }
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
    /// Nodes that unloaded the provider and have not loaded it again, by
    /// the number of that unload: a stop is taken as such only if no load
    /// came within `node_stop_grace`.
    unloaded: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    unloads: AtomicU64,
    node_stop_grace: std::time::Duration,
    /// The EMQX nodes heard from since this hook server started: the ones
    /// whose presence it keeps true.
    nodes: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Asks the reconciler (when there is one) to reconcile a node.
    reconcile: std::sync::OnceLock<mpsc::UnboundedSender<String>>,
    /// Nodes being reconciled, with the clients whose disconnect came
    /// meanwhile: a reconciliation must not add those back.
    passing: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
    /// When a reconciliation last finished, milliseconds since the Unix
    /// epoch; 0 before the first.
    reconciled_ms: AtomicU64,
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
        node_stop_grace: std::time::Duration,
    ) -> Self {
        Self {
            topics,
            tx,
            stats,
            dropping: AtomicBool::new(false),
            unloaded: Default::default(),
            unloads: AtomicU64::new(0),
            node_stop_grace,
            nodes: Default::default(),
            reconcile: std::sync::OnceLock::new(),
            passing: Default::default(),
            reconciled_ms: AtomicU64::new(0),
        }
    }

    /// Notes that `node` spoke. The first word from a node since this
    /// hook server started ends an outage of the hook server as that node
    /// saw it (EMQX does not load the provider again when it comes back:
    /// its hook calls just start to pass), so the node is reconciled.
    fn heard_from(&self, node: &str) {
        if node.is_empty() {
            return;
        }
        let new = {
            let mut nodes = lock(&self.nodes);
            !nodes.contains(node) && nodes.insert(node.to_owned())
        };
        // A node whose hooks still come has not stopped, whatever its
        // last unload said (a settings change whose load came late).
        {
            let mut unloaded = self.unloaded_nodes();
            if !unloaded.is_empty() {
                unloaded.remove(node);
            }
        }
        if new {
            self.ask_reconcile(node);
        }
    }

    /// Asks for `node` to be reconciled with EMQX's client list, if a
    /// reconciler runs.
    pub(crate) fn ask_reconcile(&self, node: &str) {
        if let Some(tx) = self.reconcile.get() {
            let _ = tx.send(node.to_owned());
        }
    }

    /// Makes reconciliation requests go to `tx` from now on.
    pub(crate) fn set_reconciler(&self, tx: mpsc::UnboundedSender<String>) {
        let _ = self.reconcile.set(tx);
    }

    /// The nodes heard from since start.
    pub(crate) fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = lock(&self.nodes).iter().cloned().collect();
        nodes.sort();
        nodes
    }

    /// A reconciliation of `node` starts: its disconnects are noted.
    pub(crate) fn begin_pass(&self, node: &str) {
        lock(&self.passing).insert(node.to_owned(), Default::default());
    }

    /// Whether `clientid` of `node` disconnected since its pass began.
    pub(crate) fn gone_during_pass(&self, node: &str, clientid: &str) -> bool {
        lock(&self.passing)
            .get(node)
            .is_some_and(|gone| gone.contains(clientid))
    }

    /// The reconciliation of `node` is over; `ok` when it completed.
    pub(crate) fn end_pass(&self, node: &str, ok: bool) {
        lock(&self.passing).remove(node);
        if ok {
            self.reconciled_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// When presence was last reconciled with EMQX (milliseconds since the
    /// Unix epoch), if ever.
    pub fn last_reconciled_ms(&self) -> Option<u64> {
        Some(self.reconciled_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    /// `node` loaded the provider; its broker has been up `uptime_ms`
    /// (EMQX's `BrokerInfo.uptime`, the Erlang VM's wall clock; `None`
    /// when not told). Clients of that node from before its start are
    /// gone: their disconnects were never reported if it stopped
    /// unannounced, or after it unloaded the provider.
    pub fn provider_loaded(&self, node: &str, uptime_ms: Option<u64>) {
        self.unloaded_nodes().remove(node);
        if !node.is_empty() {
            lock(&self.nodes).insert(node.to_owned());
            // After its clear below: the pass then finds its rows gone.
            self.ask_reconcile_later(node);
        }
        let Some(uptime_ms) = uptime_ms.filter(|_| !node.is_empty()) else {
            return;
        };
        // No client of the node can have been reported between its start
        // and this load (its hooks were not there yet), so every row
        // older than its start is from before it.
        let before_ms = now_ms().saturating_sub(uptime_ms);
        self.repair(Record::NodeCleared {
            node: node.to_owned(),
            before_ms,
            cause: ClearCause::NodeStarted,
        });
    }

    /// `node` unloaded the provider. EMQX does that first when it stops
    /// (about 0.1 s before it closes its clients, reporting none of their
    /// disconnects), and also when the hook server's settings change
    /// (then it loads it again at once). So the node's clients are taken
    /// for gone only if it has not loaded the provider again within the
    /// grace.
    pub fn provider_unloaded(self: &Arc<Self>, node: &str) {
        if node.is_empty() {
            return;
        }
        let n = self.unloads.fetch_add(1, Ordering::Relaxed) + 1;
        self.unloaded_nodes().insert(node.to_owned(), n);
        let core = Arc::downgrade(self);
        let node = node.to_owned();
        let grace = self.node_stop_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(core) = core.upgrade() else { return };
            let still = core.unloaded_nodes().get(&node) == Some(&n);
            if still {
                core.unloaded_nodes().remove(&node);
                // Heard from again, it is reconciled afresh.
                lock(&core.nodes).remove(&node);
                info!(%node, "EMQX node stopped: its clients are no longer listed as online");
                core.repair(Record::NodeCleared {
                    node,
                    before_ms: now_ms(),
                    cause: ClearCause::NodeStopped,
                });
            }
        });
    }

    fn unloaded_nodes(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        lock(&self.unloaded)
    }

    /// [`ask_reconcile`](Self::ask_reconcile), once what is queued now
    /// has had a moment to be written.
    fn ask_reconcile_later(&self, node: &str) {
        if let Some(tx) = self.reconcile.get() {
            let tx = tx.clone();
            let node = node.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let _ = tx.send(node);
            });
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
        self.heard_from(&node);
        self.offer(Record::Connected(Presence {
            clientid,
            username,
            node,
            connected_at_ms: now_ms(),
        }));
    }

    /// A client's connection ended.
    pub fn client_disconnected(&self, clientid: String, node: String) {
        self.heard_from(&node);
        if let Some(gone) = lock(&self.passing).get_mut(&node) {
            gone.insert(clientid.clone());
        }
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

    /// Queues a repair of the adapter's own making: behind the hook
    /// records before it, so it never overtakes a connect it must not
    /// remove, and not counted as one of EMQX's.
    fn repair(&self, record: Record) {
        if let Err(e) = self.tx.try_send(record) {
            warn!(record = ?e.into_inner(), "hook queue full: a presence repair is dropped");
        }
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

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
