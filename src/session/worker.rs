//! A connection's worker: drains its mailbox through its [`Connection`],
//! carries out the requests the connection makes, and sends its output in
//! as few `Send`s as the order allows.

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::{debug, warn};

use super::{queries, Driver, CLIENTID_NOT_ALLOWED};
use crate::emqx::{EmqxError, Op};
use crate::protocol::{Call, CallResult, Connection, Event, QueryError, Request};
use crate::registry::{Entry, Item};
use crate::telemetry;

/// Whether a session goes on after an item.
pub(super) enum Flow {
    Continue,
    End(&'static str),
}

/// The largest datagram the output is packed into, unless one send alone
/// is larger: small enough to pass any path's MTU unfragmented.
const MAX_DATAGRAM: usize = 1200;

/// EMQX says the connection process is gone: nothing can reach the client.
struct Gone;

/// Why a session ended when it has had its last words already.
const TOLD: &str = "gone, last words said";

/// Requests a session may make once its connection is gone, at most: its
/// last words are a few calls (a device's `offline`), not a conversation.
const LAST_WORDS: usize = 16;

impl Driver {
    /// Runs until the mailbox is empty and the output sent, then parks the
    /// connection in its entry.
    pub(super) async fn work(self: Arc<Self>, entry: Arc<Entry>) {
        let Some(mut connection) = entry.lock().connection.take() else {
            return;
        };
        // The session's count is cumulative; each run reports what it added.
        let mut parse_errors = connection.parse_errors();
        // What the journal last got of this session is at least this old.
        let mut kept = connection.generation();
        // Events handled whose output still waits in the connection: they
        // count as pending work until it is sent. An event's output waits
        // while the next event is already queued, so that both go in one
        // `Send` (a reply and the MSG that follows it, say): one call
        // fewer, same order.
        let mut unsent = 0;
        loop {
            let item = {
                let mut inner = entry.lock();
                match inner.queue.pop_front() {
                    Some(item) => Some(item),
                    None if connection.has_output() => None,
                    None => {
                        connection.park();
                        inner.connection = Some(connection);
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
                let flow = self.flush(&entry, &mut connection).await;
                self.budget.release(std::mem::take(&mut unsent));
                if let Flow::End(why) = flow {
                    self.last_words(&entry, &mut connection, None).await;
                    self.end(&entry, why);
                    return;
                }
                continue;
            };
            entry.drained().notify_waiters();
            let flow = self.process(&entry, &mut connection, item).await;
            if let (Some(journal), Flow::Continue) = (self.journal(), &flow) {
                // On disk before the reply that tells the client leaves.
                let now = connection.generation();
                if now != kept {
                    kept = now;
                    match connection.save(entry.protocol) {
                        Ok(state) => journal.put(entry.conn.clone(), state).await,
                        Err(e) => debug!(conn = %entry.conn, error = %e, "session not journaled"),
                    }
                }
            }
            unsent += 1;
            if !connection.has_output() || matches!(flow, Flow::End(_)) {
                self.budget.release(std::mem::take(&mut unsent));
            }
            let now = connection.parse_errors();
            if now > parse_errors {
                telemetry::parse_errors(entry.protocol, now - parse_errors);
                parse_errors = now;
            }
            if let Flow::End(why) = flow {
                if why != "closed" && why != TOLD {
                    self.last_words(&entry, &mut connection, None).await;
                }
                self.end(&entry, why);
                return;
            }
            self.arm(&entry, &connection);
        }
    }

    fn end(&self, entry: &Arc<Entry>, why: &'static str) {
        debug!(conn = %entry.conn, protocol = entry.protocol, why, "session ended");
        // Before the entry leaves the map: a cancel sent after it could
        // cancel the wake-up of a new session of the same conn.
        if entry.wake_at(None) {
            self.wakeups.set(&entry.conn, None);
        }
        if self.registry.remove(entry) {
            if let Some(journal) = self.journal() {
                journal.remove(entry.conn.clone());
            }
            self.admission.leave();
            telemetry::connections(entry.protocol, -1.0);
        }
        let dropped = {
            let mut inner = entry.lock();
            inner.ended = true;
            let dropped = inner.queue.len();
            inner.queue = VecDeque::new();
            inner.running = false;
            dropped
        };
        self.budget.release(dropped);
        entry.drained().notify_waiters();
    }

    /// One mailbox item, with every request it leads to.
    async fn process(&self, entry: &Entry, connection: &mut Connection, item: Item) -> Flow {
        let conn = &entry.conn;
        // Bytes carried over from earlier events go out before this event
        // waits on anything, so they are never held up by a round trip.
        let mut carried = connection.has_output();
        let mut closed = false;
        match item {
            Item::Probe => {
                if let Flow::End(why) = self.flush(entry, connection).await {
                    return Flow::End(why);
                }
                return match self.calls.call(conn, Op::Send(bytes::Bytes::new())).await {
                    Err(EmqxError::Gone) => Flow::End("gone (probe)"),
                    _ => Flow::Continue,
                };
            }
            Item::Timeout => {
                if !connection.handle_timeout(self.registry.now_ms()) {
                    return Flow::Continue;
                }
            }
            Item::Event(event) => {
                closed = matches!(event, Event::Closed(_));
                connection.handle(event, self.registry.now_ms());
            }
            Item::Created(event, heard_ms) => connection.handle(event, heard_ms),
        }
        while let Some(request) = connection.poll_request() {
            // What was said before closing must reach the client first.
            let is_close = request == Request::Call(Call::Close);
            if carried || is_close {
                carried = false;
                if let Flow::End(_) = self.flush(entry, connection).await {
                    self.last_words(entry, connection, Some(request)).await;
                    return Flow::End(TOLD);
                }
            }
            let outcome = match request {
                Request::Query(query) => {
                    Event::Answer(queries::answer(self.store.as_ref(), conn, query).await)
                }
                Request::Call(call) => match self.call(entry, call).await {
                    Ok(result) => Event::Reply(result),
                    Err(Gone) => return Flow::End("gone"),
                },
            };
            connection.handle(outcome, self.registry.now_ms());
        }
        if closed {
            if let Flow::End(why) = self.flush(entry, connection).await {
                return Flow::End(why);
            }
            return Flow::End("closed");
        }
        // Whatever output is left goes with the next queued event's, or
        // alone once the mailbox is empty (see `work`).
        Flow::Continue
    }

    /// The connection is gone (EMQX said so) without the session having
    /// been told: it hears `Closed` now, and what it asks for then is
    /// carried out where no connection is needed (a RawPublish, such as a
    /// device's `offline`), answered as failed otherwise. `held` is a
    /// request taken but not carried out. Nothing it says reaches the
    /// client any more.
    async fn last_words(&self, entry: &Entry, connection: &mut Connection, held: Option<Request>) {
        let mut next = held;
        let mut told = false;
        for _ in 0..LAST_WORDS {
            let now = self.registry.now_ms();
            let request = match next.take().or_else(|| connection.poll_request()) {
                Some(request) => request,
                None if !told => {
                    told = true;
                    connection.handle(Event::Closed("{shutdown,gone}".into()), now);
                    continue;
                }
                None => break,
            };
            let outcome = match request {
                Request::Call(call @ Call::RawPublish { .. }) => {
                    Event::Reply(match self.calls.call(&entry.conn, Op::Call(call)).await {
                        Ok(()) => CallResult::Ok,
                        Err(e) => CallResult::Failed(e.to_string()),
                    })
                }
                Request::Call(_) => Event::Reply(CallResult::Failed("connection gone".into())),
                Request::Query(_) => Event::Answer(Err(QueryError::Unavailable)),
            };
            connection.handle(outcome, now);
        }
        // Whatever it said has nowhere to go.
        let _ = connection.take_output();
    }

    /// One call a session asked for, in the terms it needs for its reply.
    async fn call(&self, entry: &Entry, call: Call) -> Result<CallResult, Gone> {
        let (conn, protocol) = (&*entry.conn, entry.protocol);
        if let Call::Authenticate {
            clientid, username, ..
        } = &call
        {
            if !self.config.clientid_policy.allows(clientid, username) {
                debug!(%conn, protocol, %clientid, %username, "clientid not allowed for this user");
                return Ok(CallResult::Denied(CLIENTID_NOT_ALLOWED.into()));
            }
        }
        // A keepalive that failed to start leaves the client connected
        // without one: worth an operator's attention. Other failures are
        // the client's answer.
        let loud = matches!(call, Call::StartKeepalive { .. });
        let method = call.method();
        let result = if call == Call::Close {
            self.calls.deliver(conn, Op::Call(call)).await
        } else {
            self.calls.call(conn, Op::Call(call)).await
        };
        let reply = match result {
            Ok(()) => CallResult::Ok,
            Err(EmqxError::Gone) => return Err(Gone),
            Err(EmqxError::Denied(m)) => CallResult::Denied(m),
            Err(EmqxError::Rejected { message, .. }) => CallResult::Failed(message),
            Err(EmqxError::Unreachable(_)) => CallResult::Unreachable,
        };
        if reply != CallResult::Ok {
            if loud {
                warn!(%conn, protocol, method, ?reply, "EMQX call failed");
            } else {
                debug!(%conn, protocol, method, ?reply, "EMQX call failed");
            }
        }
        Ok(reply)
    }

    /// Sends the connection's waiting output, if any; ends the session when
    /// EMQX says the connection is gone.
    async fn flush(&self, entry: &Entry, connection: &mut Connection) -> Flow {
        let conn = &*entry.conn;
        if !connection.has_output() {
            return Flow::Continue;
        }
        // Over UDP and DTLS each Send is one datagram (the chat protocol in the README).
        let sends = if connection.is_datagram() {
            connection.take_datagrams(MAX_DATAGRAM)
        } else {
            vec![connection.take_output()]
        };
        for bytes in sends {
            let n = bytes.len();
            match self.calls.deliver(conn, Op::Send(bytes)).await {
                Ok(()) => telemetry::bytes_out(entry.protocol, n),
                Err(EmqxError::Gone) => return Flow::End("gone"),
                Err(_) => {}
            }
        }
        Flow::Continue
    }
}
