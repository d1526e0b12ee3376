//! A test kit for protocol authors: drive a [`Session`](crate::Session)
//! through a [`Connection`] with events, answer its calls and queries as a
//! script says, and look at what it sent and asked for. No driver, no
//! EMQX, no sockets.
//!
//! [`assert_same_at_every_split`] is the ready property test: a byte
//! stream cut into two pieces at every possible point, and into single
//! bytes, must give the same output and the same requests as the whole
//! stream, since TCP may deliver it cut anywhere.
//!
//! ```
//! use exproto_protocol::chat::Chat;
//! use exproto_protocol::testing::{assert_same_at_every_split, Harness};
//! use exproto_protocol::ProtocolConfig;
//!
//! let chat = Chat::new(ProtocolConfig::default());
//! let mut h = Harness::new(&chat);
//! assert!(h.take_output_text().starts_with("HELLO "));
//! h.bytes(b"PING\n");
//! assert_eq!(h.take_output_text(), "PONG\n");
//! assert_same_at_every_split(&chat, b"CONNECT a\nSUB t\nPUB t :hi\nPING\n");
//! ```

use bytes::{Bytes, BytesMut};

use crate::connection::{Connection, Request};
use crate::{CallResult, ConnMeta, Event, Protocol, QueryError, SessionInit};

/// How a [`Harness`] answers a request: the event the session gets back.
pub type Script = Box<dyn FnMut(&Request) -> Event>;

/// Every call succeeds; every query finds presence and history off.
pub fn answer_ok(request: &Request) -> Event {
    match request {
        Request::Call(_) => Event::Reply(CallResult::Ok),
        Request::Query(_) => Event::Answer(Err(QueryError::NotEnabled)),
    }
}

/// One connection of `protocol` and what happened to it.
pub struct Harness {
    connection: Connection,
    now_ms: u64,
    script: Script,
    requests: Vec<Request>,
    output: BytesMut,
}

impl Harness {
    /// A connection created on a TCP listener, every request answered by
    /// [`answer_ok`]; what the session said on creation is in the output.
    pub fn new(protocol: &dyn Protocol) -> Self {
        Self::with(protocol, ConnMeta::default(), Box::new(answer_ok))
    }

    /// A connection created with `meta`, its requests answered by `script`.
    pub fn with(protocol: &dyn Protocol, meta: ConnMeta, script: Script) -> Self {
        let session = protocol.new_session(SessionInit { random: 1 });
        let mut h = Self {
            connection: Connection::new(session),
            now_ms: 0,
            script,
            requests: Vec::new(),
            output: BytesMut::new(),
        };
        h.event(Event::Created(meta));
        h
    }

    /// A connection restored from what [`Connection::save`] wrote (e.g.
    /// `h.connection().save(name)` of another harness), its requests
    /// answered by `script`: to check that a session goes on where the
    /// saved one stopped.
    ///
    /// # Errors
    /// State `protocol` cannot read.
    pub fn restored(
        protocol: &dyn Protocol,
        saved: &[u8],
        script: Script,
    ) -> Result<Self, crate::state::StateError> {
        let mut h = Self {
            connection: Connection::restore(protocol, saved)?,
            now_ms: 0,
            script,
            requests: Vec::new(),
            output: BytesMut::new(),
        };
        h.settle();
        Ok(h)
    }

    /// Feeds bytes from the client (one read, or one datagram).
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.event(Event::Bytes(Bytes::copy_from_slice(bytes)));
    }

    /// Feeds `event`, then answers every request it leads to.
    pub fn event(&mut self, event: Event) {
        self.connection.handle(event, self.now_ms);
        self.settle();
    }

    /// Moves the clock to `now_ms` and fires the deadline if it is due;
    /// `true` when it fired.
    pub fn advance_to(&mut self, now_ms: u64) -> bool {
        self.now_ms = self.now_ms.max(now_ms);
        let fired = self.connection.handle_timeout(self.now_ms);
        self.settle();
        fired
    }

    /// When the connection's deadline is, if it has one.
    pub fn deadline(&self) -> Option<u64> {
        self.connection.poll_timeout()
    }

    fn settle(&mut self) {
        while let Some(request) = self.connection.poll_request() {
            let answer = (self.script)(&request);
            self.requests.push(request);
            self.connection.handle(answer, self.now_ms);
        }
        if self.connection.has_output() {
            let out = self.connection.take_output();
            self.output.extend_from_slice(&out);
        }
    }

    /// Every request made so far, in order.
    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    /// What the session sent since the last take.
    pub fn take_output(&mut self) -> Bytes {
        self.output.split().freeze()
    }

    /// [`take_output`](Self::take_output) as text (lossy).
    pub fn take_output_text(&mut self) -> String {
        String::from_utf8_lossy(&self.take_output()).into_owned()
    }

    /// The connection, e.g. to save it.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }
}

/// What a fresh connection of `protocol` says and asks for when `chunks`
/// arrive one after another, every request answered by [`answer_ok`].
pub fn transcript(protocol: &dyn Protocol, chunks: &[&[u8]]) -> (Bytes, Vec<Request>) {
    let mut h = Harness::new(protocol);
    for chunk in chunks {
        h.bytes(chunk);
    }
    (h.take_output(), h.requests)
}

/// Asserts that `stream` gives the same output and requests whole, cut in
/// two at every point, and byte by byte.
///
/// # Panics
/// At the first cut that differs, naming it.
pub fn assert_same_at_every_split(protocol: &dyn Protocol, stream: &[u8]) {
    let whole = transcript(protocol, &[stream]);
    for at in 0..=stream.len() {
        let (a, b) = stream.split_at(at);
        assert_eq!(
            transcript(protocol, &[a, b]),
            whole,
            "{} cut at byte {at}",
            protocol.name()
        );
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(
        transcript(protocol, &bytes),
        whole,
        "{} fed byte by byte",
        protocol.name()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Chat;
    use crate::{Call, ProtocolConfig};

    #[test]
    fn chat_is_the_same_however_its_stream_is_cut() {
        let chat = Chat::new(ProtocolConfig::default());
        assert_same_at_every_split(
            &chat,
            b"CONNECT a\r\nSUB t/+ 1\nPUB t/x 1 :hello world\n\nPING\nbogus\nUNSUB t/+\nQUIT\n",
        );
    }

    #[test]
    fn a_script_answers_the_calls() {
        let chat = Chat::new(ProtocolConfig::default());
        let mut h = Harness::with(
            &chat,
            ConnMeta::default(),
            Box::new(|r| match r {
                Request::Call(Call::Authenticate { .. }) => {
                    Event::Reply(CallResult::Denied("no".into()))
                }
                other => answer_ok(other),
            }),
        );
        h.take_output();
        h.bytes(b"CONNECT b b secret\n");
        assert!(h.take_output_text().starts_with("ERR 401"));
        assert!(matches!(
            h.requests(),
            [Request::Call(Call::Authenticate { .. })]
        ));
    }

    #[test]
    fn the_kit_catches_a_protocol_that_depends_on_how_bytes_are_cut() {
        // A protocol that answers every read, whatever it holds.
        struct PerRead;
        struct PerReadSession;
        impl Protocol for PerRead {
            fn name(&self) -> &'static str {
                "per-read"
            }
            fn new_session(&self, _: SessionInit) -> Box<dyn crate::Session> {
                Box::new(PerReadSession)
            }
            fn lost_session_bytes(&self) -> Bytes {
                Bytes::new()
            }
            fn refusal_bytes(&self, _: crate::Refusal) -> Bytes {
                Bytes::new()
            }
        }
        impl crate::Session for PerReadSession {
            fn handle(&mut self, event: Event, out: &mut Vec<crate::Action>) {
                if let Event::Bytes(_) = event {
                    out.push(crate::Action::Send(Bytes::from_static(b"got\n")));
                }
            }
        }
        let caught = std::panic::catch_unwind(|| assert_same_at_every_split(&PerRead, b"ab"));
        assert!(caught.is_err());
    }
}
