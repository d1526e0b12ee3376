//! Moving every session from one adapter process to its successor (see
//! the crate's `upgrade`), on the driver's side.
//!
//! The predecessor: [`Driver::begin_handover`] ends streaming RPCs and
//! stops wake-ups and probes (a deadline stays in the connection's state,
//! and the successor arms it); once its work has drained,
//! [`Driver::snapshot`] saves every parked connection.
//!
//! The successor: [`Driver::expect_handoff`] makes events for conns it
//! does not know wait (as orphans, bounded in time and bytes) instead of
//! being answered as lost, because their state may still be on its way;
//! [`Driver::adopt`] registers a session from its saved state and gives it
//! the events that waited for it, in their order; [`Driver::end_handoff`]
//! gives what still waits the ordinary wait for `OnSocketCreated`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, warn};

use super::{millis, Driver};
use crate::protocol::{Connection, Event};
use crate::registry::{Entry, Item};

/// A handler request being answered; see [`Driver::answering`].
pub struct Answering<'a>(&'a Driver);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        if self.0.answering.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.answered.notify_waiters();
        }
    }
}

/// What [`Driver::adopt`] made of one saved session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    /// Registered, with this many events that had waited for it.
    Yes(usize),
    /// This build cannot read the state; the client will be told its
    /// session is lost.
    Unreadable,
    /// Over `max_sessions`.
    Full,
    /// A session for that conn already exists here.
    Duplicate,
}

/// What [`Driver::snapshot`] found.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `(conn, state)` of every session that could be saved.
    pub sessions: Vec<(Arc<str>, Vec<u8>)>,
    /// Sessions whose worker still held them (work that did not drain in
    /// time): their clients will be told the session is lost.
    pub busy: usize,
    /// Sessions whose protocol cannot save them.
    pub unsaved: usize,
    /// Conns with events held for an `OnSocketCreated` that had not come.
    pub orphans: usize,
}

impl Driver {
    /// The predecessor's first step after relaying began: no wake-up or
    /// probe starts new work here (deadlines travel with the state).
    pub fn begin_handover(&self) {
        self.handing_over.cancel();
    }

    /// Sends every handler request from now on to the successor.
    pub fn relay_to(&self, relay: crate::upgrade::Relay) {
        let _ = self.relay.set(relay);
    }

    /// Where handler requests go instead of this driver, once handing over.
    pub fn relay(&self) -> Option<&crate::upgrade::Relay> {
        self.relay.get()
    }

    /// Counts a handler request until the guard drops.
    pub fn answering(&self) -> Answering<'_> {
        self.answering.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::Relaxed);
        Answering(self)
    }

    /// Waits until no handler request has been answered, or come, for
    /// `settle`: EMQX then has nothing in flight here and most likely
    /// nothing on its way. At most `within`; `false` when no such moment
    /// came.
    pub async fn quiet(&self, settle: std::time::Duration, within: std::time::Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let notified = self.answered.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.answering.load(Ordering::SeqCst) != 0 {
                    notified.await;
                    continue;
                }
                let before = self.started.load(Ordering::Relaxed);
                tokio::time::sleep(settle).await;
                if self.started.load(Ordering::Relaxed) == before
                    && self.answering.load(Ordering::SeqCst) == 0
                {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Whether [`begin_handover`](Self::begin_handover) was called.
    pub fn is_handing_over(&self) -> bool {
        self.handing_over.is_cancelled()
    }

    /// Every parked session's saved state, for the successor. Call once
    /// the driver has drained ([`Driver::drain`]); a session still held by
    /// a worker then is counted as busy, not saved.
    pub fn snapshot(&self) -> Snapshot {
        let entries: Vec<Arc<Entry>> = self
            .registry
            .sessions
            .iter()
            .map(|e| e.value().clone())
            .collect();
        let mut snap = Snapshot {
            sessions: Vec::with_capacity(entries.len()),
            orphans: self.registry.orphans.len(),
            ..Snapshot::default()
        };
        for entry in entries {
            let inner = entry.lock();
            let Some(connection) = &inner.connection else {
                snap.busy += 1;
                continue;
            };
            match connection.save(entry.protocol) {
                Ok(state) => snap.sessions.push((entry.conn.clone(), state)),
                Err(e) => {
                    debug!(conn = %entry.conn, error = %e, "session not handed over");
                    snap.unsaved += 1;
                }
            }
        }
        snap
    }

    /// The successor's first step, before it serves: events for an unknown
    /// conn wait for its state until `adopt` brings it or `end_handoff`
    /// is called, and at most `wait` (then the session is lost).
    pub fn expect_handoff(&self, wait: std::time::Duration) {
        let until = self.registry.now_ms().saturating_add(millis(wait));
        self.handoff_until.store(until, Ordering::SeqCst);
    }

    /// Whether events for unknown conns wait for a handoff now.
    pub(super) fn awaiting_handoff(&self) -> Option<u64> {
        match self.handoff_until.load(Ordering::SeqCst) {
            0 => None,
            until => Some(until),
        }
    }

    /// Serves the session that `state` (from [`Connection::save`]) holds
    /// for `conn`, with any events that waited for it.
    pub fn adopt(self: &Arc<Self>, conn: &str, state: &[u8]) -> Adopted {
        let restored = Connection::saved_protocol(state).and_then(|name| {
            let protocol = self.protocols.by_name(name).ok_or_else(|| {
                crate::protocol::state::StateError::OtherProtocol {
                    found: name.to_owned(),
                    expected: self.protocols.default().name().to_owned(),
                }
            })?;
            Ok((
                protocol.name(),
                Connection::restore(protocol.as_ref(), state)?,
            ))
        });
        let (protocol, connection) = match restored {
            Ok(r) => r,
            Err(e) => {
                warn!(%conn, error = %e, "cannot restore a saved session");
                return Adopted::Unreadable;
            }
        };
        let conn: Arc<str> = conn.into();
        // As in `create`: the orphan slot stays locked until the session is
        // registered, so no event can fall between the two.
        let mut slot = self.registry.orphans.entry(conn.clone());
        if self.registry.sessions.contains_key(&conn) {
            return Adopted::Duplicate;
        }
        if !self.admission.admit() {
            warn!(%conn, "session limit reached while restoring");
            return Adopted::Full;
        }
        let held = match &mut slot {
            dashmap::Entry::Occupied(o) => std::mem::take(&mut o.get_mut().events),
            dashmap::Entry::Vacant(_) => Vec::new(),
        };
        let waited = held.len();
        let entry = Arc::new(Entry::new(
            conn.clone(),
            protocol,
            connection,
            self.registry.now_ms(),
        ));
        {
            let mut inner = entry.lock();
            if let Some(c) = &inner.connection {
                self.arm(&entry, c);
            }
            inner.queue.extend(held.into_iter().map(Item::Event));
            self.budget.take(inner.queue.len());
        }
        self.register(slot, &entry);
        if waited > 0 {
            self.start_worker(&entry);
        }
        Adopted::Yes(waited)
    }

    /// Every saved state has come (or none will): a conn whose events still
    /// wait gets the ordinary wait for its `OnSocketCreated` (streaming
    /// mode may yet bring it), then counts as lost; one that EMQX closed
    /// meanwhile is forgotten.
    pub fn end_handoff(self: &Arc<Self>) {
        self.handoff_until.store(0, Ordering::SeqCst);
        let wait = self.config.created_wait;
        let until = self.registry.now_ms().saturating_add(millis(wait));
        let waiting: Vec<Arc<str>> = self
            .registry
            .orphans
            .iter()
            .map(|o| o.key().clone())
            .collect();
        for conn in waiting {
            let closed = self
                .registry
                .orphans
                .remove_if(&conn, |_, o| {
                    matches!(o.events.last(), Some(Event::Closed(_)))
                })
                .is_some();
            if closed {
                continue;
            }
            if let Some(mut o) = self.registry.orphans.get_mut(&conn) {
                o.expires_ms = o.expires_ms.min(until);
            }
            self.wakeups.set(&conn, Some(wait));
        }
    }
}
