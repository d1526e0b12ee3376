//! The driver: runs connections against EMQX.
//!
//! Event flow: a handler service (unary or streaming) calls
//! [`Driver::dispatch`]; the event lands in the connection's mailbox in the
//! registry and the handler call is answered at once. A per-connection
//! worker (`worker`) feeds events to the connection's sans-IO
//! [`Connection`] one at a time, carries out the request it makes (an EMQX
//! call, or a query of our own store), coalesces its output into as few
//! `Send`s as the order allows, and asks for a wake-up when the connection
//! has a deadline.
//!
//! Each concern is its own small part: how many sessions are admitted
//! (`admission`), the bound on queued events (`budget`), EMQX calls in
//! flight and retries (`calls`), store queries (`queries`), wake-ups
//! (`wakeups`); the clock is the crate's `clock`. Work in progress is tracked with a
//! `TaskTracker`, so a shutdown drains: [`Driver::begin_shutdown`] turns new
//! sockets away and [`Driver::drain`] waits until no worker, handler call
//! or notice task is left.

mod admission;
mod budget;
mod calls;
mod handoff;
mod protocols;
mod queries;
mod wakeups;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::emqx::{ConnectionAdapter, EmqxError, Op};
use crate::journal::Journal;
use crate::protocol::{Call, ClientidPolicy, Connection, Event, Protocol, Refusal, SessionInit};
use crate::registry::{Entry, Item, Orphan, Registry};
use crate::telemetry;
use admission::Admission;
use budget::EventBudget;
use calls::Calls;
pub use handoff::{Adopted, Snapshot};
pub use protocols::Protocols;
pub use queries::StoreReader;
use wakeups::Wakeups;

/// The reason of the refusal the driver gives an `Authenticate` that the
/// clientid policy does not allow.
pub const CLIENTID_NOT_ALLOWED: &str = "clientid not allowed for this user";

/// How the driver treats EMQX and connections; see the CLI for each.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// How long a reply that could not reach EMQX is retried (the chat protocol in the README:
    /// the 503 itself travels through EMQX).
    pub send_retry: Duration,
    /// How long events for a conn are held while waiting for its
    /// `OnSocketCreated` (streaming mode only).
    pub created_wait: Duration,
    /// Bytes that may be held for such a conn; past it the session is lost.
    pub max_held_bytes: usize,
    /// Events a connection's mailbox holds before handler calls wait for it
    /// to drain, which pushes back on EMQX instead of growing without bound.
    pub max_queued_events: usize,
    /// Events queued or being handled across all connections before
    /// handler calls wait (see `budget`).
    pub max_pending_events: usize,
    /// A session silent this long is probed with an empty `Send`, so
    /// sessions whose `OnSocketClosed` was lost are reclaimed.
    pub idle_probe: Duration,
    /// Sessions served at once; a new socket over it is told so and closed
    /// without a session. 0 is no limit.
    pub max_sessions: usize,
    /// EMQX calls in flight at once, over all sessions (at least 1).
    pub max_pending_calls: usize,
    /// How long a call waits for one of those places before it fails as
    /// if EMQX were unreachable (the command gets its 503).
    pub pending_wait: Duration,
    /// Which clientids a user may log in as. Protocols check it to word
    /// their refusal; the driver checks it again for every `Authenticate`,
    /// so no protocol can let a user take another's clientid. The server
    /// sets it from the protocol's config, so the two agree.
    pub clientid_policy: ClientidPolicy,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            send_retry: Duration::from_secs(30),
            created_wait: Duration::from_secs(2),
            max_held_bytes: 65_536,
            max_queued_events: 64,
            max_pending_events: 1024,
            idle_probe: Duration::from_secs(120),
            max_sessions: 100_000,
            max_pending_calls: 1024,
            pending_wait: Duration::from_secs(5),
            clientid_policy: ClientidPolicy::default(),
        }
    }
}

/// Owns the registry and runs every connection. Shared by both handler
/// services.
pub struct Driver {
    registry: Registry,
    protocols: Protocols,
    calls: Calls,
    wakeups: Wakeups,
    config: DriverConfig,
    /// `None` when presence and history are not enabled.
    store: Option<StoreReader>,
    /// Where sessions are kept across a crash (`--state-dir`); unset: not.
    /// Set once, possibly after serving began: a successor opens the
    /// journal only once its predecessor has stopped writing it.
    journal: OnceLock<Journal>,
    admission: Admission,
    budget: EventBudget,
    /// Set once shutdown begins: new sockets are refused from then on.
    shutting_down: AtomicBool,
    /// Work in progress (workers, handler calls, notice tasks), so a
    /// shutdown knows when it may stop.
    tasks: TaskTracker,
    /// Cancelled when this process hands its sessions to a successor.
    handing_over: CancellationToken,
    /// While sessions are on their way from a predecessor: until when (on
    /// the driver's clock) events for unknown conns wait for them; 0: not.
    handoff_until: AtomicU64,
    /// Set once this process hands over: handler requests go to the
    /// successor instead of this driver.
    relay: OnceLock<crate::upgrade::Relay>,
    /// Handler requests being answered right now, and a wake-up when that
    /// drops to zero (a handover closes EMQX's connections at such a
    /// moment).
    answering: std::sync::atomic::AtomicUsize,
    /// Handler requests ever started, to tell a quiet moment.
    started: AtomicU64,
    answered: tokio::sync::Notify,
}

impl Driver {
    /// A driver with its wake-up and sweeper tasks. Needs a tokio runtime.
    pub fn new(
        protocol: impl Into<Protocols>,
        emqx: Arc<dyn ConnectionAdapter>,
        config: DriverConfig,
    ) -> Arc<Self> {
        Self::with_store(protocol, emqx, config, None)
    }

    /// [`Driver::new`] with the store that answers `WHO` and `HISTORY`.
    pub fn with_store(
        protocol: impl Into<Protocols>,
        emqx: Arc<dyn ConnectionAdapter>,
        config: DriverConfig,
        store: Option<StoreReader>,
    ) -> Arc<Self> {
        Self::start(protocol, emqx, config, store, None)
    }

    /// [`Driver::with_store`] with a journal that keeps every session's
    /// state across a crash; restore what it held with
    /// [`Driver::restore`] before serving.
    pub fn start(
        protocol: impl Into<Protocols>,
        emqx: Arc<dyn ConnectionAdapter>,
        config: DriverConfig,
        store: Option<StoreReader>,
        journal: Option<Journal>,
    ) -> Arc<Self> {
        let protocols = protocol.into();
        let driver = Arc::new_cyclic(|weak: &Weak<Driver>| {
            let weak = weak.clone();
            let wakeups = Wakeups::start(move |conn| {
                if let Some(d) = weak.upgrade() {
                    d.on_wake(conn);
                }
            });
            Driver {
                registry: Registry::default(),
                protocols,
                calls: Calls::new(
                    emqx,
                    config.max_pending_calls,
                    config.pending_wait,
                    config.send_retry,
                ),
                wakeups,
                admission: Admission::new(config.max_sessions),
                budget: EventBudget::new(config.max_pending_events),
                shutting_down: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                handing_over: CancellationToken::new(),
                handoff_until: AtomicU64::new(0),
                relay: OnceLock::new(),
                answering: Default::default(),
                started: AtomicU64::new(0),
                answered: tokio::sync::Notify::new(),
                config,
                store,
                journal: journal.map(OnceLock::from).unwrap_or_default(),
            }
        });
        let weak = Arc::downgrade(&driver);
        let period = (driver.config.idle_probe / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(d) = weak.upgrade() else { break };
                d.sweep();
            }
        });
        driver
    }

    /// The sessions this driver holds.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The protocol of listeners not mapped to another.
    pub fn protocol(&self) -> &Arc<dyn Protocol> {
        self.protocols.default()
    }

    /// Every protocol served, and which listener speaks which.
    pub fn protocols(&self) -> &Protocols {
        &self.protocols
    }

    /// Starts a shutdown: from now on a new socket gets the protocol's
    /// shutting-down line and is closed without a session. Sessions that
    /// exist are served as before.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Serves again the sessions a journal kept: each goes on where it
    /// stopped when its conn's next event comes. A saved state this build
    /// cannot read is logged and dropped (its client then gets the
    /// protocol's lost-session answer). Sessions whose connections EMQX
    /// closed meanwhile are reclaimed by the idle probe. Returns how many
    /// were restored.
    pub fn restore(self: &Arc<Self>, saved: crate::journal::Saved) -> usize {
        let mut restored = 0;
        for (conn, state) in saved {
            match self.adopt(&conn, &state) {
                Adopted::Yes(_) => restored += 1,
                Adopted::Unreadable => {
                    if let Some(j) = self.journal() {
                        j.remove(conn.as_str().into());
                    }
                }
                Adopted::Full | Adopted::Duplicate => {}
            }
        }
        restored
    }

    /// The journal, when sessions are kept across a crash.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.get()
    }

    /// Journals sessions from now on (a successor, once its predecessor
    /// has flushed the journal). `false` when one was already set.
    pub fn set_journal(&self, journal: Journal) -> bool {
        self.journal.set(journal).is_ok()
    }

    /// Whether [`begin_shutdown`](Self::begin_shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Waits until no work is in progress (no worker running, no handler
    /// call being dispatched, no notice being delivered), or `grace` has
    /// passed. Returns whether the driver went idle in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        // Closing only lets `wait` finish once the count reaches zero; work
        // that starts later is still tracked.
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }

    /// Hands one event from EMQX to its connection, in arrival order.
    ///
    /// Returns once the event is queued (waiting only while the connection's
    /// mailbox is full, or too many events are queued overall).
    /// `may_reorder` is set by the streaming service, where events can
    /// overtake the conn's `OnSocketCreated`.
    pub async fn dispatch(self: &Arc<Self>, conn: &str, event: Event, may_reorder: bool) {
        let _busy = self.tasks.token();
        let kind = telemetry::event_kind(&event);
        let bytes_in = match &event {
            Event::Bytes(b) => b.len(),
            _ => 0,
        };
        // The session's protocol, for the metrics; `none` for an event of a
        // conn without one (held for its OnSocketCreated, or lost).
        let mut protocol_name = "none";
        let entry = match event {
            Event::Created(ref meta) => {
                let protocol = self.protocols.for_listener(meta.sockname).clone();
                protocol_name = protocol.name();
                match self.create(conn, event, &protocol) {
                    Ok(entry) => entry,
                    Err(refusal) => {
                        // Answered only once the socket is told and closed:
                        // in unary mode EMQX sends this conn nothing more
                        // until then, so no stray `session lost` line can
                        // overtake.
                        self.refuse(conn, refusal, protocol.as_ref()).await;
                        None
                    }
                }
            }
            Event::Closed(_) | Event::TimerFired(_) => match self.registry.get(conn) {
                Some(e) => {
                    protocol_name = e.protocol;
                    self.enqueue(&e, Item::Event(event));
                    Some(e)
                }
                // Its session may be on its way from the predecessor.
                None if self.awaiting_handoff().is_some() => self.hold(conn, event),
                None => {
                    // A close for a conn never created just drops what was
                    // held for it; a timer for an unknown conn is ignored.
                    if matches!(event, Event::Closed(_)) {
                        self.registry.orphans.remove(conn);
                    }
                    None
                }
            },
            Event::Bytes(_) | Event::Messages(_) => match self.registry.get(conn) {
                Some(e) => {
                    protocol_name = e.protocol;
                    self.enqueue(&e, Item::Event(event));
                    Some(e)
                }
                None if may_reorder || self.awaiting_handoff().is_some() => self.hold(conn, event),
                None => {
                    self.lost(conn.into());
                    None
                }
            },
            // Only the driver itself makes these.
            Event::Deadline | Event::Reply(_) | Event::Answer(_) => None,
        };
        telemetry::event(kind, protocol_name, bytes_in);
        if let Some(entry) = entry {
            self.wait_for_room(&entry).await;
        }
    }

    /// Registers a session for a new socket, or says why it is refused.
    fn create(
        self: &Arc<Self>,
        conn: &str,
        created: Event,
        protocol: &Arc<dyn Protocol>,
    ) -> Result<Option<Arc<Entry>>, Refusal> {
        let conn: Arc<str> = conn.into();
        // The orphan slot stays locked until the session is registered, so
        // an event that `hold` takes meanwhile (streaming mode delivers
        // them concurrently) waits and then finds the session: moving the
        // held events is atomic against `hold`. Lock order as in `hold`:
        // orphans, then sessions.
        let mut slot = self.registry.orphans.entry(conn.clone());
        if self.registry.sessions.contains_key(&conn) {
            warn!(%conn, "duplicate OnSocketCreated ignored");
            return Ok(None);
        }
        let now = self.registry.now_ms();
        // The login deadline runs from the moment the adapter first heard
        // of the conn (the chat protocol in the README), which for held events is the first of
        // them. The wait's own deadline goes with the orphan.
        let (held, heard_ms) = match &mut slot {
            dashmap::Entry::Occupied(o) => {
                let orphan = o.get_mut();
                let heard = orphan
                    .expires_ms
                    .saturating_sub(millis(self.config.created_wait))
                    .min(now);
                (std::mem::take(&mut orphan.events), heard)
            }
            dashmap::Entry::Vacant(_) => (Vec::new(), now),
        };
        // Held events go with a refused socket.
        let refusal = if self.is_shutting_down() {
            Some(Refusal::ShuttingDown)
        } else if !self.admission.admit() {
            Some(Refusal::TooManyConnections)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            if let dashmap::Entry::Occupied(o) = slot {
                o.remove();
            }
            return Err(refusal);
        }
        debug!(%conn, protocol = protocol.name(), "session started");
        let session = protocol.new_session(SessionInit {
            random: rand::random(),
        });
        let entry = Arc::new(Entry::new(
            conn.clone(),
            protocol.name(),
            Connection::new(session),
            now,
        ));
        {
            let mut inner = entry.lock();
            inner.queue.push_back(Item::Created(created, heard_ms));
            inner.queue.extend(held.into_iter().map(Item::Event));
            self.budget.take(inner.queue.len());
        }
        self.register(slot, &entry);
        self.start_worker(&entry);
        Ok(Some(entry))
    }

    /// Serves `entry` from now on and lets go of its conn's orphan slot,
    /// held until now so that no event can fall between the two.
    fn register(&self, slot: dashmap::Entry<'_, Arc<str>, Orphan>, entry: &Arc<Entry>) {
        self.registry
            .sessions
            .insert(entry.conn.clone(), entry.clone());
        if let dashmap::Entry::Occupied(o) = slot {
            o.remove();
        }
        telemetry::connections(entry.protocol, 1.0);
    }

    /// Tells a new socket why it is not served, then closes it. One try
    /// each: a refused socket is not worth retries while EMQX struggles.
    async fn refuse(&self, conn: &str, refusal: Refusal, protocol: &dyn Protocol) {
        debug!(%conn, protocol = protocol.name(), ?refusal, "new socket refused");
        let bytes = protocol.refusal_bytes(refusal);
        if !bytes.is_empty() {
            let n = bytes.len();
            match self.calls.call(conn, Op::Send(bytes)).await {
                Err(EmqxError::Gone) => return,
                Ok(()) => telemetry::bytes_out(protocol.name(), n),
                Err(_) => {}
            }
        }
        let _ = self.calls.call(conn, Op::Call(Call::Close)).await;
    }

    /// Keeps an event for a conn that is not created yet, for a bounded time
    /// and size; past either the session counts as lost.
    fn hold(self: &Arc<Self>, conn: &str, event: Event) -> Option<Arc<Entry>> {
        let conn: Arc<str> = conn.into();
        let slot = self.registry.orphans.entry(conn.clone());
        // `create` may have won the race since our lookup.
        if let Some(e) = self.registry.get(&conn) {
            drop(slot);
            self.enqueue(&e, Item::Event(event));
            return Some(e);
        }
        let mut first = false;
        // Waiting for a predecessor's handoff lasts as long as that may.
        let now = self.registry.now_ms();
        let expires_ms = self
            .awaiting_handoff()
            .unwrap_or_else(|| now.saturating_add(millis(self.config.created_wait)));
        let mut slot = slot.or_insert_with(|| {
            first = true;
            Orphan {
                events: Vec::new(),
                bytes: 0,
                expires_ms,
            }
        });
        let orphan: &mut Orphan = &mut slot;
        orphan.bytes += match &event {
            Event::Bytes(b) => b.len(),
            _ => 0,
        };
        orphan.events.push(event);
        let over = orphan.bytes > self.config.max_held_bytes;
        drop(slot);
        if over {
            self.registry.orphans.remove(&conn);
            self.lost(conn);
        } else if first {
            let wait = self.registry.clock().until(expires_ms);
            self.wakeups.set(&conn, Some(wait));
        }
        None
    }

    /// A wake-up came for `conn`: its session's deadline may be due, or
    /// the wait for its `OnSocketCreated` may be over. Which one is decided
    /// by each one's own deadline, never by the wake-up: a wake-up meant
    /// for the wait that comes after the session was created does nothing.
    pub(crate) fn on_wake(self: &Arc<Self>, conn: Arc<str>) {
        // Deadlines are part of what is handed over; the successor keeps them.
        if self.is_handing_over() {
            return;
        }
        if let Some(e) = self.registry.get(&conn) {
            e.woken();
            self.enqueue(&e, Item::Timeout);
            return;
        }
        let now = self.registry.now_ms();
        if self
            .registry
            .orphans
            .remove_if(&conn, |_, o| o.expires_ms <= now)
            .is_some()
        {
            debug!(%conn, "no OnSocketCreated in time");
            self.lost(conn);
        }
    }

    /// Tells a client the adapter has no session for it, then closes it.
    fn lost(self: &Arc<Self>, conn: Arc<str>) {
        info!(%conn, "event for a connection without a session; closing it");
        let this = self.clone();
        self.tasks.spawn(async move {
            // Which listener the conn came through is not known here.
            let protocol = this.protocols.default();
            let bytes = protocol.lost_session_bytes();
            let n = bytes.len();
            if this.calls.deliver(&conn, Op::Send(bytes)).await.is_ok() {
                telemetry::bytes_out(protocol.name(), n);
                let _ = this.calls.deliver(&conn, Op::Call(Call::Close)).await;
            }
        });
    }

    /// Probes the sessions that have been silent for `idle_probe`.
    fn sweep(self: &Arc<Self>) {
        if self.is_handing_over() {
            return;
        }
        let now = self.registry.now_ms();
        let idle = millis(self.config.idle_probe);
        let stale: Vec<Arc<Entry>> = self
            .registry
            .sessions
            .iter()
            .filter(|e| now.saturating_sub(e.last_event_ms()) >= idle)
            .map(|e| e.value().clone())
            .collect();
        for e in stale {
            e.touch(now);
            self.enqueue(&e, Item::Probe);
        }
    }

    fn enqueue(self: &Arc<Self>, entry: &Arc<Entry>, item: Item) {
        if matches!(item, Item::Event(_)) {
            entry.touch(self.registry.now_ms());
        }
        let start = {
            let mut inner = entry.lock();
            if inner.ended {
                return;
            }
            inner.queue.push_back(item);
            self.budget.take(1);
            !std::mem::replace(&mut inner.running, true)
        };
        if start {
            self.spawn_worker(entry);
        }
    }

    fn start_worker(self: &Arc<Self>, entry: &Arc<Entry>) {
        let start = !std::mem::replace(&mut entry.lock().running, true);
        if start {
            self.spawn_worker(entry);
        }
    }

    fn spawn_worker(self: &Arc<Self>, entry: &Arc<Entry>) {
        let this = self.clone();
        let entry = entry.clone();
        self.tasks.spawn(async move {
            this.work(entry).await;
        });
    }

    /// Waits while the connection's mailbox is full, then while too many
    /// events are queued overall.
    async fn wait_for_room(&self, entry: &Entry) {
        loop {
            let notified = entry.drained().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let inner = entry.lock();
                if inner.ended || inner.queue.len() <= self.config.max_queued_events {
                    break;
                }
            }
            notified.await;
        }
        self.budget.room().await;
    }

    /// Asks for a wake-up at the connection's deadline, or cancels the one
    /// asked for, when the deadline changed.
    fn arm(&self, entry: &Entry, connection: &Connection) {
        let due = connection.poll_timeout();
        if entry.wake_at(due) {
            let after = due.map(|at| self.registry.clock().until(at));
            self.wakeups.set(&entry.conn, after);
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
