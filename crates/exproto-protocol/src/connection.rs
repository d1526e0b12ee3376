//! One connection's whole state in one value: its protocol session, its
//! deadline, the output not yet sent, the request it waits on, and the
//! listener it came through.
//!
//! This is the adapter's per-connection core, in the manner of
//! quinn-proto's `Connection`: plain data, no task handles, no clock of its
//! own. Time is passed in as milliseconds on the driver's clock, and the
//! driver asks when the connection next needs attention
//! ([`Connection::poll_timeout`]) instead of keeping timers in a map by
//! conn id. A wake-up that comes late, early or twice does no harm:
//! [`Connection::handle_timeout`] acts only on a deadline that is due now,
//! so a timer left over from an earlier state can never fire into a later
//! one.

use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};

use crate::{Action, Call, ConnMeta, Event, Query, Session, SockType};

/// What the session waits on; carried out by the driver, whose outcome
/// goes back in with [`Connection::handle`] as [`Event::Reply`] or
/// [`Event::Answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Call(Call),
    Query(Query),
}

/// Which of EMQX's listeners a connection came through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Listener {
    pub socktype: SockType,
    /// The listener's address; `None` when EMQX sent none that parses.
    pub sockname: Option<std::net::SocketAddr>,
}

/// One connection, driven by events and time that the caller supplies.
///
/// Small on purpose: a node may hold 100k idle connections, so what only
/// a busy connection needs (output, a request) lives in a box that exists
/// while it is busy ([`Connection::park`] frees it).
pub struct Connection {
    session: Box<dyn Session>,
    /// When the session's deadline falls due, on the driver's clock;
    /// `u64::MAX` for none.
    deadline_ms: u64,
    socktype: SockType,
    /// The listener's address, without `SocketAddr`'s IPv6 flow and scope
    /// fields, which EMQX never sends.
    sockname: Option<(IpAddr, u16)>,
    busy: Option<Box<Busy>>,
}

/// What a connection holds only while it is being worked on.
#[derive(Default)]
struct Busy {
    /// Bytes for the client, in order, not yet handed to the driver.
    out: BytesMut,
    request: Option<Request>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("listener", &self.listener())
            .field("deadline_ms", &self.poll_timeout())
            .field("out", &self.busy.as_ref().map_or(0, |b| b.out.len()))
            .field(
                "request",
                &self.busy.as_ref().and_then(|b| b.request.as_ref()),
            )
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection around a new session; nothing has happened to it yet.
    pub fn new(session: Box<dyn Session>) -> Self {
        Self {
            session,
            deadline_ms: u64::MAX,
            socktype: SockType::default(),
            sockname: None,
            busy: None,
        }
    }

    /// Feeds one event at `now_ms`. Afterwards the caller looks at
    /// [`poll_request`](Self::poll_request), the output and
    /// [`poll_timeout`](Self::poll_timeout).
    ///
    /// Contract, as for [`Session::handle`]: after a request, the next
    /// event is its outcome.
    pub fn handle(&mut self, event: Event, now_ms: u64) {
        if let Event::Created(meta) = &event {
            self.listen_at(meta);
        }
        let mut actions = Vec::new();
        self.session.set_time(now_ms);
        self.session.handle(event, &mut actions);
        for action in actions {
            match action {
                Action::Send(bytes) => self.busy().out.extend_from_slice(&bytes),
                Action::SetDeadline(after) => {
                    self.deadline_ms = after.map_or(u64::MAX, |d| {
                        now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    });
                }
                Action::Call(call) => self.busy().request = Some(Request::Call(call)),
                Action::Query(query) => self.busy().request = Some(Request::Query(query)),
            }
        }
    }

    /// When the connection next needs [`handle_timeout`](Self::handle_timeout),
    /// on the driver's clock; `None` when it has no deadline.
    pub fn poll_timeout(&self) -> Option<u64> {
        (self.deadline_ms != u64::MAX).then_some(self.deadline_ms)
    }

    /// Fires the deadline if it is due at `now_ms`; otherwise does nothing.
    /// Returns whether it fired.
    pub fn handle_timeout(&mut self, now_ms: u64) -> bool {
        if self.deadline_ms > now_ms {
            return false;
        }
        self.deadline_ms = u64::MAX;
        self.handle(Event::Deadline, now_ms);
        true
    }

    /// The call or query the session waits on, taken: the caller carries it
    /// out and hands its outcome back to [`handle`](Self::handle).
    pub fn poll_request(&mut self) -> Option<Request> {
        self.busy.as_mut().and_then(|b| b.request.take())
    }

    /// Whether bytes wait to be sent.
    pub fn has_output(&self) -> bool {
        self.busy.as_ref().is_some_and(|b| !b.out.is_empty())
    }

    /// The bytes waiting to be sent, taken in order.
    pub fn take_output(&mut self) -> Bytes {
        match &mut self.busy {
            Some(b) => b.out.split().freeze(),
            None => Bytes::new(),
        }
    }

    /// Frees what only a busy connection needs, if nothing waits in it: for
    /// a connection about to sit idle. Its buffer is kept between events
    /// while it is busy, so a burst reuses one allocation.
    pub fn park(&mut self) {
        if self
            .busy
            .as_ref()
            .is_some_and(|b| b.out.is_empty() && b.request.is_none())
        {
            self.busy = None;
        }
    }

    /// The listener the connection came through (known once `Created`
    /// was handled).
    pub fn listener(&self) -> Listener {
        Listener {
            socktype: self.socktype,
            sockname: self.sockname.map(|(ip, port)| SocketAddr::new(ip, port)),
        }
    }

    fn listen_at(&mut self, meta: &ConnMeta) {
        self.socktype = meta.socktype;
        self.sockname = meta.sockname.map(|a| (a.ip(), a.port()));
    }

    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    /// Lines or frames the session could not parse so far (cumulative).
    pub fn parse_errors(&self) -> u64 {
        self.session.parse_errors()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{CallResult, ProtocolConfig, SessionInit};

    fn chat(config: ProtocolConfig) -> Connection {
        let chat = crate::chat::Chat::new(config);
        Connection::new(crate::Protocol::new_session(
            &chat,
            SessionInit { random: 1 },
        ))
    }

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn the_deadline_is_asked_for_and_fires_only_when_due() {
        let mut c = chat(ProtocolConfig {
            login_timeout: Duration::from_secs(30),
            ..ProtocolConfig::default()
        });
        let meta = ConnMeta {
            socktype: SockType::Udp,
            sockname: Some("127.0.0.1:7993".parse().unwrap()),
            ..ConnMeta::default()
        };
        c.handle(Event::Created(meta), 1_000);
        assert!(text(c.take_output()).starts_with("HELLO "));
        assert_eq!(c.poll_timeout(), Some(31_000));
        assert_eq!(c.listener().socktype, SockType::Udp);
        // Early and stale wake-ups do nothing.
        assert!(!c.handle_timeout(30_999));
        assert!(!c.has_output());
        assert!(c.handle_timeout(31_000));
        assert_eq!(text(c.take_output()), "ERR 408 :login timeout\n");
        assert_eq!(c.poll_request(), Some(Request::Call(Call::Close)));
        assert_eq!(c.poll_timeout(), None);
        assert!(!c.handle_timeout(40_000), "fires once");
    }

    #[test]
    fn a_deadline_cancelled_by_a_login_never_fires() {
        let mut c = chat(ProtocolConfig {
            keepalive: Duration::ZERO,
            ..ProtocolConfig::default()
        });
        c.handle(Event::Created(ConnMeta::default()), 0);
        c.take_output();
        c.handle(Event::Bytes(Bytes::from_static(b"CONNECT a\nPING\n")), 10);
        assert!(matches!(
            c.poll_request(),
            Some(Request::Call(Call::Authenticate { .. }))
        ));
        c.handle(Event::Reply(CallResult::Ok), 20);
        assert_eq!(text(c.take_output()), "OK CONNECT a\nPONG\n");
        assert_eq!(c.poll_timeout(), None);
        // A wake-up armed for the old deadline comes anyway: nothing.
        assert!(!c.handle_timeout(60_000));
        assert!(!c.has_output());
        assert_eq!(c.poll_request(), None);
    }

    #[test]
    fn an_idle_connection_is_small_and_keeps_no_buffers() {
        // The session box, the deadline, the listener and the busy box:
        // what 100k idle connections pay for each, beside their session.
        assert!(std::mem::size_of::<Connection>() <= 64);
        let mut c = chat(ProtocolConfig::default());
        c.handle(Event::Created(ConnMeta::default()), 0);
        c.park();
        assert!(c.busy.is_some(), "output waiting: kept");
        c.take_output();
        c.park();
        assert!(c.busy.is_none());
        assert!(!c.has_output());
        assert_eq!(c.take_output(), Bytes::new());
    }

    #[test]
    fn output_gathers_across_events_until_taken() {
        let mut c = chat(ProtocolConfig::default());
        c.handle(Event::Created(ConnMeta::default()), 0);
        c.handle(Event::Bytes(Bytes::from_static(b"PING\n")), 1);
        c.handle(Event::Bytes(Bytes::from_static(b"PI")), 2);
        c.handle(Event::Bytes(Bytes::from_static(b"NG\n")), 3);
        let all = text(c.take_output());
        assert!(
            all.starts_with("HELLO ") && all.ends_with("\nPONG\nPONG\n"),
            "{all}"
        );
        assert!(!c.has_output());
    }
}
