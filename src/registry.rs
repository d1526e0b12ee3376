//! Which connections the adapter serves: `conn` -> session entry.
//!
//! An entry is a cheap handle: a small mailbox of events and the
//! connection's whole state ([`Connection`]). No task exists for an idle
//! connection; a worker is spawned when an event arrives and exits when the
//! mailbox is empty, so per-conn order holds (one worker at a time) while
//! 100k idle sessions cost only their state. Map guards are never held
//! across an `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::protocol::{Connection, Event};

/// Work for a connection's worker, in arrival order.
#[derive(Debug)]
pub(crate) enum Item {
    Event(Event),
    /// The `Created` event, with when the adapter first heard of the conn
    /// (earlier than now when events were held for it).
    Created(Event, u64),
    /// Ask EMQX whether the connection process still lives (empty `Send`).
    Probe,
    /// A wake-up: the connection's deadline may be due.
    Timeout,
}

/// One live session.
pub(crate) struct Entry {
    pub(crate) conn: Arc<str>,
    /// The name of the protocol the connection speaks (its state is saved
    /// under it).
    pub(crate) protocol: &'static str,
    inner: Mutex<Inner>,
    /// When the last event came, on the driver's clock; the sweeper probes
    /// sessions that have been silent too long.
    last_event_ms: AtomicU64,
    /// The wake-up asked for and not yet come (`u64::MAX`: none), so the
    /// wake-up task is told only when a deadline changes.
    wake_ms: AtomicU64,
    /// Wakes handler calls waiting for room in a full mailbox.
    drained: Notify,
}

pub(crate) struct Inner {
    pub(crate) queue: VecDeque<Item>,
    /// A worker owns the connection right now.
    pub(crate) running: bool,
    /// `None` while a worker has taken it out.
    pub(crate) connection: Option<Connection>,
    /// The session is over; late events are dropped.
    pub(crate) ended: bool,
}

impl Entry {
    pub(crate) fn new(
        conn: Arc<str>,
        protocol: &'static str,
        connection: Connection,
        now_ms: u64,
    ) -> Self {
        Self {
            conn,
            protocol,
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                running: false,
                connection: Some(connection),
                ended: false,
            }),
            last_event_ms: AtomicU64::new(now_ms),
            wake_ms: AtomicU64::new(u64::MAX),
            drained: Notify::new(),
        }
    }

    /// Records the wake-up the connection needs (`None`: none); `true`
    /// when that differs from the one asked for, i.e. worth telling.
    pub(crate) fn wake_at(&self, at_ms: Option<u64>) -> bool {
        let at = at_ms.unwrap_or(u64::MAX);
        self.wake_ms.swap(at, Ordering::AcqRel) != at
    }

    /// A wake-up came: the next deadline needs asking for again.
    pub(crate) fn woken(&self) {
        self.wake_ms.store(u64::MAX, Ordering::Release);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock is a bug elsewhere; the queue is
        // still consistent (every mutation is a single push or pop).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_event_ms.store(now_ms, Ordering::Relaxed);
    }

    pub(crate) fn last_event_ms(&self) -> u64 {
        self.last_event_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn drained(&self) -> &Notify {
        &self.drained
    }
}

/// Events for a conn whose `OnSocketCreated` has not arrived yet (streaming
/// mode can deliver them first).
pub(crate) struct Orphan {
    pub(crate) events: Vec<Event>,
    /// Bytes held, counted against the line limit.
    pub(crate) bytes: usize,
    /// When the wait for `OnSocketCreated` ends, on the driver's clock.
    /// The wait's deadline is its own: a session created later has its own.
    pub(crate) expires_ms: u64,
}

/// Every session the adapter serves, plus events waiting for their session.
pub struct Registry {
    pub(crate) sessions: DashMap<Arc<str>, Arc<Entry>>,
    pub(crate) orphans: DashMap<Arc<str>, Orphan>,
    clock: Clock,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            sessions: DashMap::new(),
            orphans: DashMap::new(),
            clock: Clock::new(),
        }
    }
}

impl Registry {
    /// Sessions currently held.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Conns with events held while waiting for `OnSocketCreated`.
    pub fn orphans(&self) -> usize {
        self.orphans.len()
    }

    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub(crate) fn get(&self, conn: &str) -> Option<Arc<Entry>> {
        self.sessions.get(conn).map(|e| e.value().clone())
    }

    /// Removes `entry` if it is still the one registered for its conn;
    /// `true` when it was.
    pub(crate) fn remove(&self, entry: &Arc<Entry>) -> bool {
        self.sessions
            .remove_if(&entry.conn, |_, e| Arc::ptr_eq(e, entry))
            .is_some()
    }
}
