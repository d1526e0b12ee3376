//! The protocol layer of exproto-adapter: a [`Protocol`] turns one
//! connection's socket events into actions, with no IO of its own.
//!
//! Everything here is sans-IO: no socket, no `await`, no clock, no gRPC
//! type, and this crate depends on neither tonic nor a database, so a
//! protocol author compiles only this. The adapter's driver feeds
//! [`Event`]s to a [`Session`] and carries out the [`Action`]s it returns
//! against EMQX. Because nothing here can block or fail on IO, a session is
//! tested with plain function calls and fuzzed with arbitrary byte chunks.
//!
//! Also here, because everything that handles MQTT topics needs them: the
//! topic rules ([`topic`]). Built in: the chat protocol ([`chat`]) and
//! `lines`, text records from devices ([`lines`]).
//!
//! Adding a protocol: a module that implements [`Protocol`] (in this crate
//! plus one line in [`by_name`], or in your own crate handed to the
//! adapter's server builder).

pub mod chat;
pub mod connection;
pub mod framer;
pub mod lines;
pub mod rate;
pub mod state;
pub mod testing;
pub mod topic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use connection::{Connection, Listener, Request};

/// The transport of an EMQX listener (`ConnInfo.socktype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SockType {
    #[default]
    Tcp,
    Ssl,
    Udp,
    Dtls,
}

impl SockType {
    /// Whether each `OnReceivedBytes` is one datagram (UDP, DTLS) rather
    /// than a piece of a byte stream.
    pub fn is_datagram(self) -> bool {
        matches!(self, SockType::Udp | SockType::Dtls)
    }
}

impl std::fmt::Display for SockType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SockType::Tcp => "tcp",
            SockType::Ssl => "ssl",
            SockType::Udp => "udp",
            SockType::Dtls => "dtls",
        })
    }
}

/// What the adapter is told about a new socket (EMQX's `ConnInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnMeta {
    pub socktype: SockType,
    /// The client's address; `None` when EMQX sent none that parses.
    pub peer: Option<SocketAddr>,
    /// The listener's address and port: which of EMQX's listeners the
    /// client came through. `None` when EMQX sent none that parses.
    pub sockname: Option<SocketAddr>,
    /// The client certificate's common name, when the listener has TLS.
    pub cert_cn: Option<String>,
}

/// A message EMQX delivered to one of the connection's subscriptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub node: String,
    /// EMQX's message id, hex.
    pub id: String,
    pub qos: u8,
    /// The publisher's clientid; may be empty.
    pub from: String,
    pub topic: String,
    pub payload: Bytes,
    pub timestamp_ms: u64,
}

/// Timers that EMQX runs for a connection (`StartTimer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    Keepalive,
}

/// Something that happened to a connection, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The socket exists (`OnSocketCreated`). Always a session's first event.
    Created(ConnMeta),
    /// Bytes from the client, split and merged arbitrarily.
    Bytes(Bytes),
    /// Messages delivered to the connection's subscriptions, in order.
    Messages(Vec<Message>),
    /// EMQX's timer fired (`OnTimerTimeout`); EMQX closes the socket itself.
    TimerFired(TimerKind),
    /// The adapter's own timer, armed with [`Action::SetDeadline`], expired.
    Deadline,
    /// The outcome of the [`Action::Call`] the session asked for last.
    Reply(CallResult),
    /// The answer to the [`Action::Query`] the session asked for last.
    Answer(Result<Answer, QueryError>),
    /// The socket is closed (`OnSocketClosed`); the reason is opaque text.
    Closed(String),
}

/// How EMQX answered a call, in the terms a protocol needs to word a reply.
///
/// "The connection is gone" is not here: the driver ends the session itself
/// when EMQX says so, since nothing can reach the client any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallResult {
    Ok,
    /// EMQX refused: authentication or authorization (`PERMISSION_DENY`),
    /// or the driver refused a clientid the policy does not allow. The
    /// text is for logs: EMQX's are printed Erlang terms.
    Denied(String),
    /// EMQX answered with another error code, or the call failed oddly.
    Failed(String),
    /// EMQX's ConnectionAdapter could not be reached in time.
    Unreachable,
}

/// A question for the adapter's own presence and history service, not for
/// EMQX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Online clientids starting with `prefix`, at most `limit` of them.
    Who { prefix: String, limit: usize },
    /// The newest `limit` stored messages of `topic`, oldest first.
    History { topic: String, limit: usize },
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// How many clientids match, and the first of them in byte order.
    Who { total: u64, ids: Vec<String> },
    /// Stored messages, oldest first.
    History(Vec<Message>),
}

/// Why a [`Query`] got no answer. The protocol words it for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The adapter runs without presence and history.
    #[error("not enabled")]
    NotEnabled,
    /// The store failed or did not answer in time (the driver logs why).
    #[error("store unavailable")]
    Unavailable,
}

/// The `proto_name` of every `Authenticate`, whatever the protocol.
///
/// EMQX chooses the authentication chain by it. Since EMQX 5.8.8 any name
/// but a gateway's own makes that lookup fail inside the authenticate hook,
/// which EMQX logs and then treats as "no authenticator": every password
/// would be accepted. `exproto` selects `gateway.exproto.authentication` on
/// every EMQX version from 5.1.0 on, so no protocol may choose another.
pub const EMQX_PROTO_NAME: &str = "exproto";

/// A protocol's name and version as EMQX's client list shows them: sent as
/// `proto_ver` (`chat/1`), since `proto_name` is always
/// [`EMQX_PROTO_NAME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtoVer {
    pub name: &'static str,
    pub version: &'static str,
}

impl std::fmt::Display for ProtoVer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.name, self.version)
    }
}

/// A call to EMQX's ConnectionAdapter for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// Log in. There is no `proto_name` here on purpose: see
    /// [`EMQX_PROTO_NAME`]. The driver refuses, without asking EMQX, a
    /// clientid that the [`ClientidPolicy`] does not allow.
    Authenticate {
        /// Sent as `proto_ver`.
        protocol: ProtoVer,
        clientid: String,
        username: String,
        password: Secret,
    },
    /// EMQX's keepalive timer, in seconds (never 0).
    StartKeepalive {
        interval_s: u32,
    },
    Subscribe {
        filter: String,
        qos: u8,
    },
    Unsubscribe {
        filter: String,
    },
    Publish {
        topic: String,
        qos: u8,
        payload: Bytes,
    },
    /// Publish without the client's identity (EMQX's `RawPublish`): the
    /// message comes `from` `exproto`, and EMQX checks no authorization
    /// for it. For what the protocol itself says about a client (e.g. a
    /// device's `offline` status after it went away), never for a topic a
    /// client chose: that would let any client publish anywhere.
    RawPublish {
        topic: String,
        qos: u8,
        payload: Bytes,
    },
    /// Close the socket; bytes sent before it are delivered first.
    Close,
}

impl Call {
    /// The ConnectionAdapter method that carries the call, for logs and
    /// metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Call::Authenticate { .. } => "Authenticate",
            Call::StartKeepalive { .. } => "StartTimer",
            Call::Subscribe { .. } => "Subscribe",
            Call::Unsubscribe { .. } => "Unsubscribe",
            Call::Publish { .. } => "Publish",
            Call::RawPublish { .. } => "RawPublish",
            Call::Close => "Close",
        }
    }
}

/// What a session asks the driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Bytes for the client. The driver coalesces consecutive sends into as
    /// few `Send` calls as ordering allows.
    Send(Bytes),
    /// A call whose outcome the session needs. It is always the last action
    /// of a `handle`; the driver feeds its outcome back as [`Event::Reply`]
    /// before any other event.
    Call(Call),
    /// A question for the presence and history service; like a call, the
    /// last action of a `handle`, answered with [`Event::Answer`] before
    /// any other event.
    Query(Query),
    /// Arm (or with `None`, cancel) the session's single deadline, counted
    /// from now; it fires as [`Event::Deadline`].
    SetDeadline(Option<Duration>),
}

/// One connection's protocol state machine.
pub trait Session: Send {
    /// Feeds one event and appends the resulting actions to `out`.
    ///
    /// Contract: when the actions end with [`Action::Call`] (or
    /// [`Action::Query`]), the next event must be its [`Event::Reply`] (or
    /// [`Event::Answer`]).
    fn handle(&mut self, event: Event, out: &mut Vec<Action>);

    /// Tells the session what time it is, right before each
    /// [`handle`](Self::handle): milliseconds on the driver's monotonic
    /// clock, never going backwards.
    ///
    /// The session stays sans-IO: it never reads a clock, it is told. This
    /// is a separate method with a default that ignores the time, rather
    /// than a field on every [`Event`], so that protocols which measure no
    /// rate need not change. A session that is never told stays at 0.
    fn set_time(&mut self, now_ms: u64) {
        let _ = now_ms;
    }

    /// Tells the session its transport, before its first event and again
    /// after a restore. Over a datagram transport (UDP, DTLS) each
    /// `Event::Bytes` is one whole datagram, and the datagram
    /// rules apply: a session framing with [`framer::LineFramer`] passes
    /// this on ([`framer::LineFramer::set_datagram`]) and needs nothing
    /// else; the driver packs the output into datagrams. The default
    /// ignores it.
    fn set_transport(&mut self, socktype: SockType) {
        let _ = socktype;
    }

    /// How many lines or frames this session could not parse so far
    /// (cumulative). The driver exports the count as a metric; a protocol
    /// that does not count keeps the default.
    fn parse_errors(&self) -> u64 {
        0
    }

    /// A number that changes whenever the part of the session's state worth
    /// keeping across a crash changes (for chat: the login, the
    /// subscriptions, the end), so the driver saves the session then and
    /// not after every message. The default never changes: such a
    /// protocol's sessions are saved only when handed to a successor.
    fn generation(&self) -> u64 {
        0
    }

    /// Writes the session's state, so that [`Protocol::restore`] in this
    /// or another process (a newer build, too) makes a session that goes
    /// on where this one stopped: for handing sessions to a successor, or
    /// a journal to restore them after a crash. Called between events,
    /// never while a call's outcome is due. The default: this protocol's
    /// sessions cannot be saved (they are lost with their process).
    ///
    /// # Errors
    /// [`state::StateError::Unsupported`] for a protocol that does not save.
    fn save(&self, w: &mut state::Writer) -> Result<(), state::StateError> {
        let _ = w;
        Err(state::StateError::Unsupported)
    }
}

/// EMQX's keepalive (`StartTimer`) in whole seconds, rounded up so it is never 0 (which
/// EMQX refuses); `None` when keepalive is off.
pub fn keepalive_secs(keepalive: Duration) -> Option<u32> {
    if keepalive.is_zero() {
        return None;
    }
    let secs = keepalive
        .as_secs()
        .saturating_add(u64::from(keepalive.subsec_nanos() > 0));
    Some(u32::try_from(secs).unwrap_or(u32::MAX))
}

/// Seed data the driver gives a new session, so the session itself needs no
/// randomness or clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionInit {
    /// A random number, e.g. for a clientid the protocol makes up.
    pub random: u64,
}

/// Settings every protocol gets; each uses what applies to it.
#[derive(Debug, Clone)]
pub struct ProtocolConfig {
    /// Longest line (or frame) in bytes, terminator excluded.
    pub max_line: usize,
    /// A connection that has not authenticated by then is closed.
    pub login_timeout: Duration,
    /// EMQX keepalive after authentication; zero disables it.
    pub keepalive: Duration,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Publishes per second one connection may make; 0 is no limit (the
    /// default, as the chat protocol says). Bursts up to one second's worth.
    pub max_publish_rate: u32,
    /// Whether the presence and history service is there to answer
    /// [`Query`]s; without it protocols refuse the commands that need it.
    pub presence_history: bool,
    /// Clientids one `WHO` lists at most.
    pub who_max: usize,
    /// Messages one `HISTORY` replays at most.
    pub history_max: usize,
    /// Which clientids a user may take (`--clientid-policy`).
    pub clientid_policy: ClientidPolicy,
    /// The `lines` protocol's topics and qos.
    pub lines: lines::LinesConfig,
}

/// Which clientid a logged-in user may take. EMQX discards the older
/// connection of a clientid that logs in again, and in a chat the clientid
/// is the name others see: without a rule, any user could pose as another
/// and kick them off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientidPolicy {
    /// With a username, the clientid is the username, or the username, `/`
    /// and a suffix (`alice`, `alice/phone`), so one user may hold several
    /// sessions. Without a username any clientid goes. A username holding
    /// `/` is refused: `alice` could otherwise take `alice/bob`, the own
    /// clientid of a user called `alice/bob`.
    #[default]
    Username,
    /// Any clientid: for anonymous listeners, or when EMQX binds the
    /// identity itself (e.g. authentication with `user_id_type = clientid`).
    Any,
}

impl ClientidPolicy {
    /// The names `--clientid-policy` takes.
    pub const NAMES: &'static [&'static str] = &["username", "any"];

    /// Whether a user who logs in as `username` (empty: none) may take
    /// `clientid`.
    pub fn allows(self, clientid: &str, username: &str) -> bool {
        match self {
            ClientidPolicy::Any => true,
            ClientidPolicy::Username if username.is_empty() => true,
            ClientidPolicy::Username if username.contains('/') => false,
            ClientidPolicy::Username => match clientid.strip_prefix(username) {
                Some("") => true,
                Some(rest) => rest.len() > 1 && rest.starts_with('/'),
                None => false,
            },
        }
    }
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        Self {
            max_line: 65_536,
            login_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(60),
            max_subscriptions: 100,
            max_publish_rate: 0,
            presence_history: false,
            who_max: 100,
            history_max: 100,
            clientid_policy: ClientidPolicy::Username,
            lines: lines::LinesConfig::default(),
        }
    }
}

/// A protocol: a factory of sessions plus the words for edge cases the
/// driver handles without a session.
///
/// Its sessions log in with [`Call::Authenticate`], which carries the
/// protocol's name and version as EMQX's `proto_ver`; the `proto_name` is
/// always [`EMQX_PROTO_NAME`], and a protocol cannot choose another.
pub trait Protocol: Send + Sync + 'static {
    /// The name used with `--protocol`.
    fn name(&self) -> &'static str;
    /// A session for a socket that was just created.
    fn new_session(&self, init: SessionInit) -> Box<dyn Session>;
    /// Bytes sent to a connection the adapter has no session for, right
    /// before the driver closes it.
    fn lost_session_bytes(&self) -> Bytes;
    /// A session from what [`Session::save`] wrote, by this build or an
    /// older one.
    ///
    /// # Errors
    /// State this build cannot read, or a protocol that does not save.
    fn restore(&self, r: &mut state::Reader<'_>) -> Result<Box<dyn Session>, state::StateError> {
        let _ = r;
        Err(state::StateError::Unsupported)
    }

    /// Bytes sent to a new socket the driver will not serve, right before it
    /// closes it; no session is made for it. The default says nothing.
    fn refusal_bytes(&self, refusal: Refusal) -> Bytes {
        let _ = refusal;
        Bytes::new()
    }
}

/// The `ERR` line a line protocol (chat, lines) sends a socket it will not
/// serve ([`Protocol::refusal_bytes`]).
pub fn refusal_line(refusal: Refusal) -> Bytes {
    match refusal {
        Refusal::TooManyConnections => Bytes::from_static(b"ERR 429 :too many connections\n"),
        Refusal::ShuttingDown => Bytes::from_static(b"ERR 503 :shutting down\n"),
    }
}

/// The `ERR` line a line protocol sends a client whose session the
/// adapter does not have ([`Protocol::lost_session_bytes`]).
pub const LOST_SESSION_LINE: &[u8] = b"ERR 500 :session lost, reconnect\n";

/// Why the driver turns a new socket away without making a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The adapter serves `--max-sessions` sessions already.
    TooManyConnections,
    /// The adapter is shutting down.
    ShuttingDown,
}

impl std::str::FromStr for ClientidPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "username" => Ok(Self::Username),
            "any" => Ok(Self::Any),
            _ => Err(format!("{s:?}: use `username` or `any`")),
        }
    }
}

impl std::fmt::Display for ClientidPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Username => "username",
            Self::Any => "any",
        })
    }
}

/// Names accepted by [`by_name`].
pub const NAMES: &[&str] = &["chat", "lines"];

/// The built-in protocol called `name`, or `None`.
pub fn by_name(name: &str, config: &ProtocolConfig) -> Option<Arc<dyn Protocol>> {
    match name {
        "chat" => Some(Arc::new(chat::Chat::new(config.clone()))),
        "lines" => Some(Arc::new(lines::Lines::new(config.clone()))),
        _ => None,
    }
}

/// A string that must never reach a log: its `Debug` is redacted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is the secret, in a time that depends on the
    /// lengths only, so a caller cannot learn it byte by byte.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        same_bytes(self.0.as_bytes(), candidate)
    }
}

/// Equality in a time that depends on the lengths only, for credentials
/// (a secret's, or a user name checked beside one).
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_themselves() {
        let s = Secret::new("pa55");
        assert!(s.matches(b"pa55"));
        assert!(!s.matches(b"pa5"));
        assert!(!s.matches(b"pa555"));
        assert!(!s.matches(b"pa56"));
        assert!(Secret::new("").matches(b""));
    }

    #[test]
    fn the_username_policy_allows_the_username_and_its_suffixes() {
        let p = ClientidPolicy::Username;
        assert!(p.allows("alice", "alice"));
        assert!(p.allows("alice/phone", "alice"));
        assert!(p.allows("alice/a/b", "alice"));
        assert!(!p.allows("alice/", "alice"), "an empty suffix is no suffix");
        assert!(!p.allows("alicex", "alice"));
        assert!(!p.allows("alic", "alice"));
        assert!(!p.allows("bob", "alice"));
        assert!(!p.allows("x/alice", "alice"));
        assert!(!p.allows("", "alice"));
        // Names with `/` would overlap another user's suffixes.
        assert!(!p.allows("alice/bob", "alice/bob"));
        assert!(ClientidPolicy::Any.allows("alice/bob", "alice/bob"));
        // Anonymous: nothing to bind the clientid to.
        assert!(p.allows("alice", ""));
        assert!(ClientidPolicy::Any.allows("alice", "bob"));
    }

    #[test]
    fn policy_names_round_trip() {
        for name in ClientidPolicy::NAMES {
            let p: ClientidPolicy = name.parse().unwrap();
            assert_eq!(p.to_string(), *name);
        }
        assert!("Username".parse::<ClientidPolicy>().is_err());
        assert_eq!(ClientidPolicy::default(), ClientidPolicy::Username);
    }

    #[test]
    fn proto_ver_names_protocol_and_version() {
        let v = ProtoVer {
            name: "chat",
            version: "1",
        };
        assert_eq!(v.to_string(), "chat/1");
    }
}
