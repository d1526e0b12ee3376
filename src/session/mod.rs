//! The driver: runs protocol sessions against EMQX.
//!
//! Event flow: a handler service (unary or streaming) calls
//! [`Driver::dispatch`]; the event lands in the connection's mailbox in the
//! registry and the handler call is answered at once. A per-connection
//! worker feeds events to the sans-IO [`Session`] one at a time, carries out
//! the actions it returns (coalescing its output into as few `Send`s as the
//! order allows) and feeds each call's outcome back before the next event.
//!
//! Global limits live here too, since only the driver sees every session:
//! how many sessions are served (`max_sessions`: a new socket over it is
//! turned away without a session) and how many EMQX calls may be pending at
//! once (`max_pending_calls`: a semaphore every call takes a permit from, so
//! a slow EMQX cannot make the adapter pile up work without bound).
//!
//! Shutdown drains: [`Driver::begin_shutdown`] turns new sockets away, and
//! [`Driver::drain`] waits until no worker, handler call or notice task is
//! busy, so commands already taken get their replies.
//! `WHO` and `HISTORY` calls are answered from the store, when the driver
//! has one ([`StoreReader`]), instead of EMQX.

mod timers;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use crate::emqx::{ConnectionAdapter, EmqxError, Op};
use crate::protocol::{
    Action, Call, CallResult, ClientidPolicy, Event, Message, Protocol, Refusal, Session,
    SessionInit,
};
use crate::registry::{Entry, Item, Orphan, Registry};
use crate::store::Store;
use crate::telemetry;
use timers::Timers;

/// The reason of the refusal the driver gives an `Authenticate` that the
/// clientid policy does not allow.
pub const CLIENTID_NOT_ALLOWED: &str = "clientid not allowed for this user";

/// How the driver treats EMQX and connections; see the CLI for each.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// How long a reply that could not reach EMQX is retried (PROTOCOL.md:
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
    /// handler calls wait: the adapter answers before it works, so without
    /// this bound a burst of connections (100k logging in at once) piles up
    /// work, and memory, faster than EMQX answers the calls it makes.
    pub max_pending_events: usize,
    /// A session silent this long is probed with an empty `Send`, so
    /// sessions whose `OnSocketClosed` was lost are reclaimed.
    pub idle_probe: Duration,
    /// Sessions served at once; a new socket over it is told so and closed
    /// without a session. 0 is no limit.
    pub max_sessions: usize,
    /// EMQX calls in flight at once, over all sessions (at least 1). A slow
    /// EMQX then stalls workers, which fills mailboxes, which slows EMQX's
    /// handler calls down, instead of growing work without bound.
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

/// Where the driver reads presence and history for [`Call::Who`] and
/// [`Call::History`].
#[derive(Clone)]
pub struct StoreReader {
    pub store: Arc<dyn Store>,
    /// Bound on each read: a stalled database answers the command with an
    /// error instead of holding the session (and the EMQX connection
    /// behind it) forever.
    pub timeout: Duration,
}

/// Owns the registry and runs every session. Shared by both handler services.
pub struct Driver {
    registry: Registry,
    protocol: Arc<dyn Protocol>,
    emqx: Arc<dyn ConnectionAdapter>,
    timers: Timers,
    config: DriverConfig,
    /// `None` when presence and history are not enabled.
    store: Option<StoreReader>,
    /// Sessions admitted and not yet ended, for `max_sessions`. Counted
    /// apart from the map so that admitting is one atomic step.
    live: AtomicUsize,
    /// Places for EMQX calls in flight (`max_pending_calls`).
    pending: Semaphore,
    /// Set while calls wait too long for a place, so that is logged once
    /// per episode rather than once per call.
    saturated: AtomicBool,
    /// Set while new sockets are being turned away for `max_sessions`, for
    /// the same reason.
    full: AtomicBool,
    /// Set once shutdown begins: new sockets are refused from then on.
    shutting_down: AtomicBool,
    /// Work in progress, so a shutdown knows when it may stop.
    activity: Arc<Activity>,
    /// Events queued or being handled, all connections together
    /// (`max_pending_events`).
    queued: AtomicUsize,
    /// Handler calls waiting for `queued` to drop to its bound, so workers
    /// only wake anyone when someone waits.
    waiting: AtomicUsize,
    /// Wakes them.
    room: tokio::sync::Notify,
}

/// Counts work in progress (workers, handler calls, notice tasks) and wakes
/// a drain when it reaches zero.
#[derive(Default)]
struct Activity {
    busy: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One unit of work in progress; dropping it ends it.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Whether a session goes on after an item.
enum Flow {
    Continue,
    End(&'static str),
}

impl Driver {
    /// A driver with its deadline and sweeper tasks. Needs a tokio runtime.
    pub fn new(
        protocol: Arc<dyn Protocol>,
        emqx: Arc<dyn ConnectionAdapter>,
        config: DriverConfig,
    ) -> Arc<Self> {
        Self::with_store(protocol, emqx, config, None)
    }

    /// [`Driver::new`] with the store that answers `WHO` and `HISTORY`.
    pub fn with_store(
        protocol: Arc<dyn Protocol>,
        emqx: Arc<dyn ConnectionAdapter>,
        config: DriverConfig,
        store: Option<StoreReader>,
    ) -> Arc<Self> {
        let driver = Arc::new_cyclic(|weak: &Weak<Driver>| {
            let weak = weak.clone();
            let timers = Timers::start(move |conn| {
                if let Some(d) = weak.upgrade() {
                    d.on_deadline(conn);
                }
            });
            Driver {
                registry: Registry::default(),
                protocol,
                emqx,
                timers,
                live: AtomicUsize::new(0),
                pending: Semaphore::new(config.max_pending_calls.clamp(1, Semaphore::MAX_PERMITS)),
                saturated: AtomicBool::new(false),
                full: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
                activity: Arc::default(),
                queued: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                room: tokio::sync::Notify::new(),
                config,
                store,
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

    /// The protocol every session speaks.
    pub fn protocol(&self) -> &Arc<dyn Protocol> {
        &self.protocol
    }

    /// Starts a shutdown: from now on a new socket gets the protocol's
    /// shutting-down line and is closed without a session. Sessions that
    /// exist are served as before.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether [`begin_shutdown`](Self::begin_shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Waits until no work is in progress (no worker running, no handler
    /// call being dispatched, no notice being delivered), or `grace` has
    /// passed. Returns whether the driver went idle in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.activity.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.activity.busy.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(grace, wait).await.is_ok()
    }

    /// Hands one event from EMQX to its connection, in arrival order.
    ///
    /// Returns once the event is queued (waiting only while the connection's
    /// mailbox is full). `may_reorder` is set by the streaming service, where
    /// events can overtake the conn's `OnSocketCreated`.
    pub async fn dispatch(self: &Arc<Self>, conn: &str, event: Event, may_reorder: bool) {
        let _busy = Busy::new(&self.activity);
        let entry = match event {
            Event::Created(_) => match self.create(conn, event) {
                Ok(entry) => entry,
                Err(refusal) => {
                    // Answered only once the socket is told and closed: in
                    // unary mode EMQX sends this conn nothing more until
                    // then, so no stray `session lost` line can overtake.
                    self.refuse(conn, refusal).await;
                    None
                }
            },
            Event::Closed(_) | Event::TimerFired(_) => match self.registry.get(conn) {
                Some(e) => {
                    self.enqueue(&e, Item::Event(event));
                    Some(e)
                }
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
                    self.enqueue(&e, Item::Event(event));
                    Some(e)
                }
                None if may_reorder => self.hold(conn, event),
                None => {
                    self.lost(conn.into());
                    None
                }
            },
            // Only the driver itself makes these.
            Event::Deadline | Event::Reply(_) => None,
        };
        if let Some(entry) = entry {
            self.wait_for_room(&entry).await;
        }
    }

    /// Registers a session for a new socket, or says why it is refused.
    fn create(self: &Arc<Self>, conn: &str, created: Event) -> Result<Option<Arc<Entry>>, Refusal> {
        let conn: Arc<str> = conn.into();
        // Holding the orphan slot while registering the session makes
        // "held events move to the session" atomic against `hold`.
        let slot = self.registry.orphans.entry(conn.clone());
        if self.registry.sessions.contains_key(&conn) {
            warn!(%conn, "duplicate OnSocketCreated ignored");
            return Ok(None);
        }
        let held = match slot {
            dashmap::Entry::Occupied(o) => o.remove().events,
            dashmap::Entry::Vacant(_) => Vec::new(),
        };
        // The created-wait deadline (if any) is not the session's.
        self.timers.set(&conn, None);
        if self.is_shutting_down() {
            return Err(Refusal::ShuttingDown);
        }
        if !self.admit() {
            // Held events go with the refused socket.
            return Err(Refusal::TooManyConnections);
        }
        let session = self.protocol.new_session(SessionInit {
            random: rand::random(),
        });
        let entry = Arc::new(Entry::new(conn.clone(), session, self.registry.now_ms()));
        {
            let mut inner = entry.lock();
            inner.queue.push_back(Item::Event(created));
            inner.queue.extend(held.into_iter().map(Item::Event));
            self.queued.fetch_add(inner.queue.len(), Ordering::SeqCst);
        }
        self.registry.sessions.insert(conn, entry.clone());
        telemetry::connections(1.0);
        self.start_worker(&entry);
        Ok(Some(entry))
    }

    /// Takes a place for a new session under `max_sessions`.
    fn admit(&self) -> bool {
        let max = self.config.max_sessions;
        let admitted = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            if self.full.load(Ordering::Relaxed) {
                self.full.store(false, Ordering::Relaxed);
            }
        } else if !self.full.swap(true, Ordering::Relaxed) {
            warn!(max, "session limit reached; refusing new sockets");
        }
        admitted
    }

    /// Tells a new socket why it is not served, then closes it. One try
    /// each: a refused socket is not worth retries while EMQX struggles.
    async fn refuse(&self, conn: &str, refusal: Refusal) {
        debug!(%conn, ?refusal, "new socket refused");
        let bytes = self.protocol.refusal_bytes(refusal);
        if !bytes.is_empty() {
            if let Err(EmqxError::Gone) = self.call_emqx(conn, Op::Send(bytes)).await {
                return;
            }
        }
        let _ = self.call_emqx(conn, Op::Call(Call::Close)).await;
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
        let mut slot = slot.or_default();
        let first = slot.events.is_empty();
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
            self.timers.set(&conn, None);
            self.lost(conn);
        } else if first {
            self.timers.set(&conn, Some(self.config.created_wait));
        }
        None
    }

    fn on_deadline(self: &Arc<Self>, conn: Arc<str>) {
        if let Some(e) = self.registry.get(&conn) {
            self.enqueue(&e, Item::Event(Event::Deadline));
        } else if self.registry.orphans.remove(&conn).is_some() {
            debug!(%conn, "no OnSocketCreated in time");
            self.lost(conn);
        }
    }

    /// Tells a client the adapter has no session for it, then closes it.
    fn lost(self: &Arc<Self>, conn: Arc<str>) {
        info!(%conn, "event for a connection without a session; closing it");
        let this = self.clone();
        let busy = Busy::new(&self.activity);
        tokio::spawn(async move {
            let _busy = busy;
            let bytes = this.protocol.lost_session_bytes();
            if this.deliver(&conn, Op::Send(bytes)).await.is_ok() {
                let _ = this.deliver(&conn, Op::Call(Call::Close)).await;
            }
        });
    }

    fn sweep(self: &Arc<Self>) {
        let now = self.registry.now_ms();
        let idle = u64::try_from(self.config.idle_probe.as_millis()).unwrap_or(u64::MAX);
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
        if !matches!(item, Item::Probe) {
            entry.touch(self.registry.now_ms());
        }
        let start = {
            let mut inner = entry.lock();
            if inner.ended {
                return;
            }
            inner.queue.push_back(item);
            self.queued.fetch_add(1, Ordering::SeqCst);
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
        let busy = Busy::new(&self.activity);
        tokio::spawn(async move {
            let _busy = busy;
            this.work(entry).await;
        });
    }

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
        let limit = self.config.max_pending_events;
        if self.queued.load(Ordering::SeqCst) <= limit {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Uncounted on every way out, also when EMQX cancels the call.
        let _counted = Uncount(&self.waiting);
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queued.load(Ordering::SeqCst) <= limit {
                return;
            }
            notified.await;
        }
    }

    /// `n` queued events are done with (handled and their output sent, or
    /// dropped).
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.queued.fetch_sub(n, Ordering::SeqCst).saturating_sub(n);
        if now <= self.config.max_pending_events && self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// The connection's worker: drains its mailbox, then parks the session.
    async fn work(self: Arc<Self>, entry: Arc<Entry>) {
        let Some(mut session) = entry.lock().session.take() else {
            return;
        };
        let mut actions = Vec::with_capacity(8);
        // The session's count is cumulative; each run reports what it added.
        let mut parse_errors = session.parse_errors();
        // Output not sent yet: an event's bytes wait here while the next
        // event is already queued, so that both go in one `Send` (a reply
        // and the MSG that follows it, say): one call fewer, same order.
        let mut out = BytesMut::new();
        // Events handled whose output is still in `out`: they count as
        // pending work until it is sent.
        let mut unsent = 0;
        loop {
            let item = {
                let mut inner = entry.lock();
                match inner.queue.pop_front() {
                    Some(item) => Some(item),
                    None if !out.is_empty() => None,
                    None => {
                        inner.session = Some(session);
                        inner.running = false;
                        // An idle connection keeps no mailbox buffer: with
                        // 100k connections its few hundred bytes add up.
                        inner.queue = VecDeque::new();
                        return;
                    }
                }
            };
            let Some(item) = item else {
                // Nothing more to merge with: send, then look again.
                let flow = self.flush(&entry.conn, &mut out).await;
                self.release(std::mem::take(&mut unsent));
                if let Flow::End(why) = flow {
                    self.end(&entry, why);
                    return;
                }
                continue;
            };
            entry.drained().notify_waiters();
            let flow = self
                .process(&entry, &mut *session, item, &mut actions, &mut out)
                .await;
            unsent += 1;
            if out.is_empty() || matches!(flow, Flow::End(_)) {
                self.release(std::mem::take(&mut unsent));
            }
            let now = session.parse_errors();
            if now > parse_errors {
                telemetry::parse_errors(now - parse_errors);
                parse_errors = now;
            }
            if let Flow::End(why) = flow {
                self.end(&entry, why);
                return;
            }
        }
    }

    fn end(&self, entry: &Arc<Entry>, why: &'static str) {
        debug!(conn = %entry.conn, why, "session ended");
        if self.registry.remove(entry) {
            self.live.fetch_sub(1, Ordering::AcqRel);
            telemetry::connections(-1.0);
        }
        self.timers.set(&entry.conn, None);
        let dropped = {
            let mut inner = entry.lock();
            inner.ended = true;
            let dropped = inner.queue.len();
            inner.queue = VecDeque::new();
            inner.running = false;
            dropped
        };
        self.release(dropped);
        entry.drained().notify_waiters();
    }

    async fn process(
        &self,
        entry: &Entry,
        session: &mut dyn Session,
        item: Item,
        actions: &mut Vec<Action>,
        out: &mut BytesMut,
    ) -> Flow {
        let conn = &entry.conn;
        let event = match item {
            Item::Probe => {
                if let Flow::End(why) = self.flush(conn, out).await {
                    return Flow::End(why);
                }
                return match self.call_emqx(conn, Op::Send(Bytes::new())).await {
                    Err(EmqxError::Gone) => Flow::End("gone (probe)"),
                    _ => Flow::Continue,
                };
            }
            Item::Event(e) => e,
        };
        let closed = matches!(event, Event::Closed(_));
        session.set_time(self.registry.now_ms());
        session.handle(event, actions);
        // Bytes carried over from earlier events go out before this event
        // waits on anything, so they are never held up by a round trip.
        let mut carried = !out.is_empty();
        loop {
            let mut call = None;
            for action in actions.drain(..) {
                match action {
                    Action::Send(b) => out.extend_from_slice(&b),
                    Action::SetDeadline(after) => self.timers.set(conn, after),
                    Action::Call(c) => call = Some(c),
                }
            }
            let Some(call) = call else { break };
            let is_close = call == Call::Close;
            // What was said before closing must reach the client first.
            if carried || is_close {
                carried = false;
                if let Flow::End(why) = self.flush(conn, out).await {
                    return Flow::End(why);
                }
            }
            if let Call::Authenticate {
                clientid, username, ..
            } = &call
            {
                if !self.config.clientid_policy.allows(clientid, username) {
                    info!(%conn, %clientid, %username, "clientid not allowed for this user");
                    session.set_time(self.registry.now_ms());
                    let refused = CallResult::Denied(CLIENTID_NOT_ALLOWED.into());
                    session.handle(Event::Reply(refused), actions);
                    continue;
                }
            }
            if matches!(call, Call::Who { .. } | Call::History { .. }) {
                let reply = self.lookup(conn, call).await;
                session.set_time(self.registry.now_ms());
                session.handle(Event::Reply(reply), actions);
                continue;
            }
            let op = Op::Call(call);
            let method = op.method();
            let result = if is_close {
                self.deliver(conn, op).await
            } else {
                self.call_emqx(conn, op).await
            };
            let reply = match result {
                Ok(()) => CallResult::Ok,
                Err(EmqxError::Gone) => return Flow::End("gone"),
                Err(EmqxError::Denied(m)) => CallResult::Denied(m),
                Err(EmqxError::Rejected { message, .. }) => CallResult::Failed(message),
                Err(EmqxError::Unreachable(_)) => CallResult::Unreachable,
            };
            if reply != CallResult::Ok {
                let level_warn = method == "StartTimer";
                if level_warn {
                    warn!(%conn, method, ?reply, "EMQX call failed");
                } else {
                    debug!(%conn, method, ?reply, "EMQX call failed");
                }
            }
            session.set_time(self.registry.now_ms());
            session.handle(Event::Reply(reply), actions);
        }
        if closed {
            if let Flow::End(why) = self.flush(conn, out).await {
                return Flow::End(why);
            }
            return Flow::End("closed");
        }
        // Whatever is left in `out` goes with the next queued event's
        // output, or alone once the mailbox is empty (see `work`).
        Flow::Continue
    }

    /// Sends the output gathered in `out`, if any; ends the session when
    /// EMQX says the connection is gone.
    async fn flush(&self, conn: &str, out: &mut BytesMut) -> Flow {
        if out.is_empty() {
            return Flow::Continue;
        }
        match self.deliver(conn, Op::Send(out.split().freeze())).await {
            Err(EmqxError::Gone) => Flow::End("gone"),
            _ => Flow::Continue,
        }
    }

    /// One call to EMQX, in one of the `max_pending_calls` places. Waiting
    /// for a place is bounded by `pending_wait`; past it the call fails as
    /// unreachable, which a command reports as 503.
    async fn call_emqx(&self, conn: &str, op: Op) -> Result<(), EmqxError> {
        let permit =
            match tokio::time::timeout(self.config.pending_wait, self.pending.acquire()).await {
                Ok(Ok(permit)) => permit,
                // The semaphore is never closed; treat it like a full one.
                Ok(Err(_)) | Err(_) => {
                    if !self.saturated.swap(true, Ordering::Relaxed) {
                        warn!(
                            max = self.config.max_pending_calls,
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

    /// Answers `WHO` and `HISTORY` from the store, within its timeout.
    async fn lookup(&self, conn: &str, call: Call) -> CallResult {
        let Some(reader) = &self.store else {
            // A protocol asked although the service is off: its config
            // and the driver disagree, which is ours to fix, not EMQX's.
            warn!(%conn, "WHO/HISTORY asked of a driver without a store");
            return CallResult::Failed("not enabled".into());
        };
        let store = &*reader.store;
        let outcome = match call {
            Call::Who { prefix, limit } => {
                tokio::time::timeout(reader.timeout, store.presence_list(&prefix, limit))
                    .await
                    .map(|r| {
                        r.map(|page| CallResult::Who {
                            total: page.total,
                            ids: page.ids,
                        })
                    })
            }
            Call::History { topic, limit } => {
                tokio::time::timeout(reader.timeout, store.history_newest(&topic, limit))
                    .await
                    .map(|r| {
                        r.map(|stored| {
                            CallResult::History(
                                stored
                                    .into_iter()
                                    .map(|m| Message {
                                        node: String::new(),
                                        id: m.id,
                                        qos: m.qos,
                                        from: m.from,
                                        topic: m.topic,
                                        payload: m.payload,
                                        timestamp_ms: m.timestamp_ms,
                                    })
                                    .collect(),
                            )
                        })
                    })
            }
            _ => return CallResult::Failed("not a store call".into()),
        };
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => {
                warn!(%conn, error = %e, "store read failed");
                CallResult::Failed("store unavailable".into())
            }
            Err(_) => {
                warn!(%conn, timeout = ?reader.timeout, "store read timed out");
                CallResult::Failed("store unavailable".into())
            }
        }
    }

    /// A call that must get through: retried with backoff while EMQX is
    /// unreachable, for at most `send_retry`. Giving up drops it.
    async fn deliver(&self, conn: &str, op: Op) -> Result<(), EmqxError> {
        let give_up = Instant::now() + self.config.send_retry;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.call_emqx(conn, op.clone()).await {
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

/// Takes one off a count when dropped, also when the future holding it is
/// cancelled.
struct Uncount<'a>(&'a AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests;
