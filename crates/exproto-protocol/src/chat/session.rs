//! One chat connection's state machine: events in, lines and calls out.
//!
//! Lines are handled strictly in order, one reply each. A command that needs
//! EMQX ends the `handle` with its [`Call`] and leaves the lines after it in
//! the framer; the call's [`Event::Reply`] writes that command's reply and
//! resumes with them. Replies accumulate in one buffer and leave as one
//! [`Action::Send`] per `handle` (or one before each call), so a chunk of a
//! thousand commands costs one send.

use bytes::{Bytes, BytesMut};
use std::borrow::Cow;
use std::collections::HashSet;

use super::command::{text_value, Command, Reject};
use super::encode;
use super::escape::unescape;
use super::parser::{parse_line, ParseError};
use crate::framer::{send_lines, Frame, LineFramer};
use crate::rate::TokenBucket;
use crate::state::{Reader, StateError, Writer};
use crate::topic;
use crate::{
    keepalive_secs, Action, Answer, Call, CallResult, Event, ProtocolConfig, Query, QueryError,
    Secret, Session, SessionInit, TimerKind,
};

/// What came back for the call or query a command waited on.
enum Outcome {
    Call(CallResult),
    Query(Result<Answer, QueryError>),
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No successful CONNECT yet; the login deadline runs.
    LoggingIn,
    Connected,
    /// QUIT, the login timeout or EMQX's keepalive ended it; nothing more
    /// is said or done.
    Closing,
    /// The socket is gone.
    Closed,
}

/// The call in flight, with what its reply needs.
#[derive(Debug)]
enum Pending {
    Authenticate {
        clientid: String,
    },
    /// Started right after a successful Authenticate; CONNECT is answered
    /// once it returns, whatever it returns.
    Keepalive {
        clientid: String,
    },
    Subscribe {
        filter: String,
        qos: u8,
    },
    Unsubscribe {
        filter: String,
    },
    /// The topic as sent (escaped), a slice of the line: publishing is the
    /// busy path, so the reply re-reads it instead of keeping a copy.
    Publish {
        topic: Bytes,
    },
    Who,
    History {
        topic: String,
    },
}

/// The chat protocol's [`Session`].
pub(crate) struct ChatSession {
    config: ProtocolConfig,
    /// Seeds the clientid of a CONNECT that names none.
    random: u64,
    framer: LineFramer,
    /// Lines written but not yet handed out as an [`Action::Send`].
    out: BytesMut,
    phase: Phase,
    /// Set while a call is outstanding; lines wait in the framer meanwhile.
    pending: Option<Pending>,
    /// The login deadline fired while a call was outstanding; it is acted
    /// on once that call's reply is written.
    deadline_due: bool,
    /// Lines refused as malformed or too long, for the metrics.
    parse_errors: u64,
    /// HELLO went out; a repeated `Created` must not say it twice.
    greeted: bool,
    /// Filters held, for the per-connection limit.
    subscriptions: HashSet<String>,
    /// The publish rate limit; `None` when it is off.
    publish_bucket: Option<TokenBucket>,
    /// The driver's clock as last told ([`Session::set_time`]).
    now_ms: u64,
    /// Counts changes of what a journal keeps (login, subscriptions, the
    /// end): see [`Session::generation`].
    generation: u64,
    /// Over UDP or DTLS: each line is its own send, so that the driver can
    /// pack lines into datagrams ([`Session::set_transport`]).
    datagram: bool,
}

impl ChatSession {
    pub(crate) fn new(config: ProtocolConfig, init: SessionInit) -> Self {
        Self {
            framer: LineFramer::new(config.max_line),
            random: init.random,
            out: BytesMut::new(),
            phase: Phase::LoggingIn,
            pending: None,
            deadline_due: false,
            parse_errors: 0,
            greeted: false,
            subscriptions: HashSet::new(),
            publish_bucket: (config.max_publish_rate > 0)
                .then(|| TokenBucket::new(config.max_publish_rate)),
            now_ms: 0,
            generation: 0,
            datagram: false,
            config,
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if self.phase != phase {
            self.phase = phase;
            self.generation += 1;
        }
    }

    fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Closing | Phase::Closed)
    }

    /// Hands the lines written so far to the driver.
    fn flush(&mut self, out: &mut Vec<Action>) {
        send_lines(&mut self.out, self.datagram, out);
    }

    fn call(&mut self, call: Call, out: &mut Vec<Action>) {
        self.ask(Action::Call(call), out);
    }

    /// Ends the handle with a call or query, after the lines so far.
    fn ask(&mut self, action: Action, out: &mut Vec<Action>) {
        self.flush(out);
        out.push(action);
    }

    fn reject(&mut self, reject: Reject) {
        let code = reject.code();
        // Malformed input (400) and overlong lines (413) are what an
        // operator watches as parse errors; refusals are not.
        if matches!(code, 400 | 413) {
            self.parse_errors += 1;
        }
        encode::err_display(&mut self.out, code, &reject);
    }

    /// Ends the connection from our side: a last line, then Close.
    fn close_with(&mut self, out: &mut Vec<Action>) {
        self.set_phase(Phase::Closing);
        self.pending = None;
        self.framer.clear();
        self.call(Call::Close, out);
    }

    /// Handles queued lines until they run out or one needs a call.
    fn drain(&mut self, out: &mut Vec<Action>) {
        while self.pending.is_none() && !self.is_over() {
            let Some(frame) = self.framer.next_frame() else {
                break;
            };
            let ask = match frame {
                Frame::TooLong => {
                    self.reject(Reject::LineTooLong);
                    None
                }
                Frame::Line(line) => match self.line(&line) {
                    Ok(ask) => ask,
                    Err(reject) => {
                        self.reject(reject);
                        None
                    }
                },
            };
            if let Some(ask) = ask {
                self.ask(ask, out);
                return;
            }
        }
        self.flush(out);
    }

    /// One line: its reply is written, or the call or query it needs is
    /// returned (with `pending` set, or the phase closing).
    fn line(&mut self, line: &Bytes) -> Result<Option<Action>, Reject> {
        if std::str::from_utf8(line).is_err() {
            return Err(Reject::InvalidUtf8);
        }
        let parsed = match parse_line(line) {
            Ok(parsed) => parsed,
            Err(ParseError::Blank) => return Ok(None),
            Err(ParseError::Malformed) => return Err(Reject::Malformed),
        };
        let command = Command::from_line(&parsed, self.config.history_max)?;
        if command.needs_connection() && self.phase != Phase::Connected {
            return Err(Reject::NotConnected);
        }
        match command {
            Command::Connect {
                clientid,
                username,
                password,
            } => self
                .connect(clientid, username, password)
                .map(|c| Some(Action::Call(c))),
            Command::Sub { filter, qos } => {
                let filter = text_value(filter, "filter")?;
                topic::validate_filter(&filter)?;
                if !self.subscriptions.contains(&*filter)
                    && self.subscriptions.len() >= self.config.max_subscriptions
                {
                    return Err(Reject::TooManySubscriptions);
                }
                let filter = filter.into_owned();
                self.pending = Some(Pending::Subscribe {
                    filter: filter.clone(),
                    qos,
                });
                Ok(Some(Action::Call(Call::Subscribe { filter, qos })))
            }
            Command::Unsub { filter } => {
                let filter = text_value(filter, "filter")?;
                topic::validate_filter(&filter)?;
                let filter = filter.into_owned();
                self.pending = Some(Pending::Unsubscribe {
                    filter: filter.clone(),
                });
                Ok(Some(Action::Call(Call::Unsubscribe { filter })))
            }
            Command::Pub {
                topic: raw_topic,
                qos,
                message,
            } => {
                let topic = text_value(raw_topic, "topic")?;
                topic::validate_name(&topic)?;
                // After the topic rules (400), as the chat protocol orders; only
                // a publish that goes to EMQX takes a token.
                if let Some(bucket) = &mut self.publish_bucket {
                    if !bucket.try_take(self.now_ms) {
                        return Err(Reject::TooManyPublishes);
                    }
                }
                let payload = match unescape(message) {
                    Cow::Borrowed(plain) => line.slice_ref(plain),
                    Cow::Owned(unescaped) => Bytes::from(unescaped),
                };
                let topic = topic.into_owned();
                self.pending = Some(Pending::Publish {
                    topic: line.slice_ref(raw_topic),
                });
                Ok(Some(Action::Call(Call::Publish {
                    topic,
                    qos,
                    payload,
                })))
            }
            Command::Ping => {
                encode::pong(&mut self.out);
                Ok(None)
            }
            Command::Help => {
                encode::ok_help(&mut self.out);
                Ok(None)
            }
            Command::Quit => {
                encode::bye(&mut self.out);
                self.set_phase(Phase::Closing);
                self.framer.clear();
                Ok(Some(Action::Call(Call::Close)))
            }
            Command::Who { prefix } => {
                if !self.config.presence_history {
                    return Err(Reject::NotEnabled);
                }
                let prefix = match prefix {
                    Some(raw) => text_value(raw, "prefix")?.into_owned(),
                    None => String::new(),
                };
                self.pending = Some(Pending::Who);
                Ok(Some(Action::Query(Query::Who {
                    prefix,
                    limit: self.config.who_max,
                })))
            }
            Command::History {
                topic: raw_topic,
                count,
            } => {
                if !self.config.presence_history {
                    return Err(Reject::NotEnabled);
                }
                let topic = text_value(raw_topic, "topic")?;
                topic::validate_name(&topic)?;
                // History shows only what EMQX already let this client
                // subscribe to.
                if !self
                    .subscriptions
                    .iter()
                    .any(|f| topic::subscription_matches(f, &topic))
                {
                    return Err(Reject::NotSubscribed);
                }
                let topic = topic.into_owned();
                self.pending = Some(Pending::History {
                    topic: topic.clone(),
                });
                Ok(Some(Action::Query(Query::History {
                    topic,
                    limit: count,
                })))
            }
        }
    }

    fn connect(
        &mut self,
        clientid: Option<&[u8]>,
        username: Option<&[u8]>,
        password: Option<&[u8]>,
    ) -> Result<Call, Reject> {
        let clientid = clientid.map(|c| text_value(c, "clientid")).transpose()?;
        let username = username.map(|u| text_value(u, "username")).transpose()?;
        let password = password.map(|p| text_value(p, "password")).transpose()?;
        if self.phase == Phase::Connected {
            return Err(Reject::AlreadyConnected);
        }
        let clientid = match clientid {
            Some(id) if !id.is_empty() => id.into_owned(),
            // Derived from the session's seed, so a retried CONNECT keeps
            // the same made-up id.
            _ => format!("chat-{:016x}", self.random),
        };
        let username = username.map(Cow::into_owned).unwrap_or_default();
        // Checked here, before EMQX is asked, so the client hears why; the
        // driver checks again for every protocol.
        if !self.config.clientid_policy.allows(&clientid, &username) {
            return Err(Reject::ClientidNotAllowed);
        }
        self.pending = Some(Pending::Authenticate {
            clientid: clientid.clone(),
        });
        Ok(Call::Authenticate {
            protocol: super::PROTO_VER,
            clientid,
            username,
            password: Secret::new(password.map(Cow::into_owned).unwrap_or_default()),
        })
    }

    /// Writes the reply of the command whose call just returned. Returns
    /// `true` when it issued a follow-up call instead.
    fn reply(&mut self, pending: Pending, outcome: Outcome, out: &mut Vec<Action>) -> bool {
        let (result, answer) = match outcome {
            Outcome::Call(result) => (result, None),
            // A query's answer where a call's was due is a driver bug;
            // the command still gets a reply line.
            Outcome::Query(answer) => (CallResult::Failed(String::new()), Some(answer)),
        };
        match pending {
            Pending::Authenticate { clientid } => {
                if result != CallResult::Ok {
                    self.call_failed(result, 401);
                    return false;
                }
                self.set_phase(Phase::Connected);
                self.deadline_due = false;
                self.flush(out);
                out.push(Action::SetDeadline(None));
                match keepalive_secs(self.config.keepalive) {
                    Some(interval_s) => {
                        self.pending = Some(Pending::Keepalive { clientid });
                        self.call(Call::StartKeepalive { interval_s }, out);
                        return true;
                    }
                    None => encode::ok_connect(&mut self.out, &clientid),
                }
            }
            // A keepalive that failed to start is the driver's to log; the
            // client is connected either way.
            Pending::Keepalive { clientid } => encode::ok_connect(&mut self.out, &clientid),
            Pending::Subscribe { filter, qos } => match result {
                CallResult::Ok => {
                    encode::ok_sub(&mut self.out, &filter, qos);
                    if self.subscriptions.insert(filter) {
                        self.generation += 1;
                    }
                }
                other => self.call_failed(other, 403),
            },
            Pending::Unsubscribe { filter } => match result {
                CallResult::Ok => {
                    encode::ok_unsub(&mut self.out, &filter);
                    if self.subscriptions.remove(&filter) {
                        self.generation += 1;
                    }
                }
                other => self.call_failed(other, 403),
            },
            Pending::Publish { topic } => match result {
                CallResult::Ok => encode::ok_pub(&mut self.out, &unescape(&topic)),
                other => self.call_failed(other, 403),
            },
            Pending::Who => match answer {
                Some(Ok(Answer::Who { total, ids })) => {
                    encode::ok_who(&mut self.out, total, ids.iter().map(String::as_str));
                }
                other => self.query_failed(other),
            },
            Pending::History { topic } => match answer {
                Some(Ok(Answer::History(messages))) => {
                    for m in &messages {
                        encode::hist(
                            &mut self.out,
                            m.topic.as_bytes(),
                            m.from.as_bytes(),
                            m.timestamp_ms,
                            &m.payload,
                        );
                    }
                    encode::ok_history(&mut self.out, topic.as_bytes(), messages.len());
                }
                other => self.query_failed(other),
            },
        }
        false
    }

    /// The `ERR` line for a `WHO` or `HISTORY` the store could not answer:
    /// the error's own words (`store unavailable`), which are ours, not
    /// EMQX's.
    fn query_failed(&mut self, answer: Option<Result<Answer, QueryError>>) {
        match answer {
            Some(Err(e)) => encode::err_display(&mut self.out, 500, &e),
            // An answer of the wrong kind, or a call's reply: a driver bug,
            // still worth a reply line.
            _ => encode::err(&mut self.out, 500, b"gateway failed"),
        }
    }

    /// The `ERR` line for a call EMQX did not carry out; `denied` is the
    /// code for a refusal, which depends on the command.
    ///
    /// The reasons are our own words: EMQX's texts are Erlang terms printed
    /// as text (`<<"Authorization deny">>`), noise to a client. The driver
    /// logs them.
    fn call_failed(&mut self, result: CallResult, denied: u16) {
        let (code, reason) = match &result {
            CallResult::Denied(_) if denied == 401 => (401, "authentication refused"),
            CallResult::Denied(_) => (denied, "not authorized"),
            CallResult::Failed(_) => (500, "gateway failed"),
            CallResult::Unreachable => (503, "emqx unreachable"),
            // Callers pass failures only; an `Ok` here would be a bug of
            // ours, and still deserves a reply line.
            CallResult::Ok => (500, "gateway failed"),
        };
        encode::err(&mut self.out, code, reason.as_bytes());
    }

    fn login_timeout(&mut self, out: &mut Vec<Action>) {
        self.reject(Reject::LoginTimeout);
        self.close_with(out);
    }
}

/// The version of the chat session's saved state; a new build reads every
/// earlier one.
const STATE_VERSION: u8 = 1;

impl ChatSession {
    /// A session from what [`Session::save`] wrote; `config` is this
    /// process's (a takeover may come with new limits).
    pub(crate) fn restore(config: ProtocolConfig, r: &mut Reader<'_>) -> Result<Self, StateError> {
        let version = r.u8()?;
        if version != STATE_VERSION {
            return Err(StateError::Version {
                found: u16::from(version),
                supported: u16::from(STATE_VERSION),
            });
        }
        let random = r.u64()?;
        let phase = match r.u8()? {
            0 => Phase::LoggingIn,
            1 => Phase::Connected,
            2 => Phase::Closing,
            3 => Phase::Closed,
            _ => return Err(StateError::Invalid("unknown chat phase")),
        };
        let greeted = r.bool()?;
        let deadline_due = r.bool()?;
        let parse_errors = r.u64()?;
        let now_ms = r.u64()?;
        let count = r.u32()?;
        let mut subscriptions = HashSet::new();
        for _ in 0..count {
            subscriptions.insert(r.str()?.to_owned());
        }
        let saved_bucket = r.bool()?;
        let publish_bucket = match (saved_bucket, config.max_publish_rate) {
            (true, rate) if rate > 0 => Some(TokenBucket::restore(rate, r)?),
            (true, _) => {
                // Rate limits are off now: read past the saved level.
                TokenBucket::restore(1, r)?;
                None
            }
            (false, rate) => (rate > 0).then(|| TokenBucket::new(rate)),
        };
        let framer = LineFramer::restore(config.max_line, r)?;
        Ok(Self {
            config,
            random,
            framer,
            out: BytesMut::new(),
            phase,
            pending: None,
            deadline_due,
            parse_errors,
            greeted,
            subscriptions,
            publish_bucket,
            now_ms,
            generation: 0,
            // Told again by the connection after a restore.
            datagram: false,
        })
    }
}

impl Session for ChatSession {
    fn set_time(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    fn set_transport(&mut self, socktype: crate::SockType) {
        self.datagram = socktype.is_datagram();
        self.framer.set_datagram(self.datagram);
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn save(&self, w: &mut Writer) -> Result<(), StateError> {
        // A reply owed to EMQX's answer cannot travel: save between calls.
        // Lines written but not yet handed out are the driver's to send.
        if self.pending.is_some() {
            return Err(StateError::Busy);
        }
        w.u8(STATE_VERSION);
        w.u64(self.random);
        w.u8(match self.phase {
            Phase::LoggingIn => 0,
            Phase::Connected => 1,
            Phase::Closing => 2,
            Phase::Closed => 3,
        });
        w.bool(self.greeted);
        w.bool(self.deadline_due);
        w.u64(self.parse_errors);
        w.u64(self.now_ms);
        let mut subscriptions: Vec<&String> = self.subscriptions.iter().collect();
        subscriptions.sort();
        w.u32(u32::try_from(subscriptions.len()).unwrap_or(u32::MAX));
        for f in subscriptions {
            w.str(f);
        }
        match &self.publish_bucket {
            Some(bucket) => {
                w.bool(true);
                bucket.save(w);
            }
            None => w.bool(false),
        }
        self.framer.save(w);
        Ok(())
    }

    fn parse_errors(&self) -> u64 {
        self.parse_errors
    }

    fn handle(&mut self, event: Event, out: &mut Vec<Action>) {
        self.handle_event(event, out);
        // Idle between events: `split` left the output buffer holding its
        // allocation (shared with the last Send) for the next line. Reusing
        // it within an event saves an allocation per reply; between events
        // an idle connection, most of them most of the time, keeps none.
        if self.pending.is_none() && self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
    }
}

impl ChatSession {
    /// The call or query a command waited on came back: its reply, then the
    /// lines that waited behind it.
    fn resume(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        if self.reply(pending, outcome, out) {
            return;
        }
        if self.deadline_due && self.phase == Phase::LoggingIn {
            self.login_timeout(out);
        } else {
            self.drain(out);
        }
    }

    fn handle_event(&mut self, event: Event, out: &mut Vec<Action>) {
        if self.is_over() {
            if let Event::Closed(_) = event {
                self.set_phase(Phase::Closed);
            }
            return;
        }
        match event {
            Event::Created(_) => {
                if !self.greeted {
                    self.greeted = true;
                    // A session that exists is worth keeping, logged in or
                    // not: its client has not lost it.
                    self.generation += 1;
                    encode::hello(&mut self.out);
                    self.flush(out);
                    out.push(Action::SetDeadline(Some(self.config.login_timeout)));
                }
            }
            Event::Bytes(bytes) => {
                self.framer.push(bytes);
                if self.pending.is_none() {
                    self.drain(out);
                }
            }
            Event::Messages(messages) => {
                for m in &messages {
                    encode::msg(
                        &mut self.out,
                        m.topic.as_bytes(),
                        m.from.as_bytes(),
                        &m.payload,
                    );
                }
                self.flush(out);
            }
            Event::TimerFired(TimerKind::Keepalive) => {
                // EMQX closes the socket in the same step: nothing we send
                // would arrive.
                self.set_phase(Phase::Closing);
                self.pending = None;
                self.framer.clear();
            }
            Event::Deadline => {
                if self.phase == Phase::LoggingIn {
                    if self.pending.is_some() {
                        self.deadline_due = true;
                    } else {
                        self.login_timeout(out);
                    }
                }
            }
            Event::Reply(result) => self.resume(Outcome::Call(result), out),
            Event::Answer(answer) => self.resume(Outcome::Query(answer), out),
            Event::Closed(_) => {
                self.set_phase(Phase::Closed);
                self.pending = None;
                self.framer.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::{ClientidPolicy, ConnMeta, Message};

    const HELLO: &str = "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]\n";
    const RANDOM: u64 = 0x0123_4567_89ab_cdef;
    const MADE_UP_ID: &str = "chat-0123456789abcdef";

    /// The EMQX side and the driver, scripted: every call is answered with
    /// the next scripted result, or `Ok` when the script has run out.
    struct Harness {
        session: ChatSession,
        script: VecDeque<CallResult>,
        /// Answers for queries, apart from the calls' replies.
        answers: VecDeque<Result<Answer, QueryError>>,
        calls: Vec<Call>,
        queries: Vec<Query>,
        wire: Vec<u8>,
        sends: usize,
        deadlines: Vec<Option<Duration>>,
    }

    impl Harness {
        fn new(config: ProtocolConfig) -> Self {
            Self {
                session: ChatSession::new(config, SessionInit { random: RANDOM }),
                script: VecDeque::new(),
                answers: VecDeque::new(),
                calls: Vec::new(),
                queries: Vec::new(),
                wire: Vec::new(),
                sends: 0,
                deadlines: Vec::new(),
            }
        }

        /// A session that has said HELLO, with its output taken.
        fn created(config: ProtocolConfig) -> Self {
            let mut h = Self::new(config);
            h.feed(Event::Created(ConnMeta::default()));
            assert_eq!(h.take(), HELLO);
            h
        }

        fn connected(config: ProtocolConfig) -> Self {
            let mut h = Self::created(config);
            assert_eq!(h.say("CONNECT alice\n"), "OK CONNECT alice\n");
            h.calls.clear();
            h.deadlines.clear();
            h
        }

        fn answer(&mut self, results: impl IntoIterator<Item = CallResult>) -> &mut Self {
            self.script.extend(results);
            self
        }

        /// Scripts the answers of the next queries; an empty script answers
        /// with nothing found.
        fn answers(
            &mut self,
            answers: impl IntoIterator<Item = Result<Answer, QueryError>>,
        ) -> &mut Self {
            self.answers.extend(answers);
            self
        }

        /// Feeds one event, then keeps answering calls like a driver.
        fn feed(&mut self, event: Event) {
            let mut next = Some(event);
            while let Some(event) = next.take() {
                let mut out = Vec::new();
                self.session.handle(event, &mut out);
                let last = out.len().saturating_sub(1);
                for (i, action) in out.into_iter().enumerate() {
                    match action {
                        Action::Send(bytes) => {
                            assert!(!bytes.is_empty(), "empty send");
                            self.wire.extend_from_slice(&bytes);
                            self.sends += 1;
                        }
                        Action::SetDeadline(d) => self.deadlines.push(d),
                        Action::Call(call) => {
                            assert_eq!(i, last, "a call must be the last action");
                            self.calls.push(call);
                            let result = self.script.pop_front().unwrap_or(CallResult::Ok);
                            next = Some(Event::Reply(result));
                        }
                        Action::Query(query) => {
                            assert_eq!(i, last, "a query must be the last action");
                            let nothing = match query {
                                Query::Who { .. } => Answer::Who {
                                    total: 0,
                                    ids: vec![],
                                },
                                Query::History { .. } => Answer::History(vec![]),
                            };
                            self.queries.push(query);
                            let answer = self.answers.pop_front().unwrap_or(Ok(nothing));
                            next = Some(Event::Answer(answer));
                        }
                    }
                }
            }
        }

        fn bytes(&mut self, bytes: &[u8]) {
            self.feed(Event::Bytes(Bytes::copy_from_slice(bytes)));
        }

        /// Sends `input` as one chunk and returns what the client gets.
        fn say(&mut self, input: &str) -> String {
            self.bytes(input.as_bytes());
            self.take()
        }

        fn take(&mut self) -> String {
            String::from_utf8(std::mem::take(&mut self.wire)).expect("output is UTF-8")
        }
    }

    fn config() -> ProtocolConfig {
        ProtocolConfig::default()
    }

    fn no_keepalive() -> ProtocolConfig {
        ProtocolConfig {
            keepalive: Duration::ZERO,
            ..ProtocolConfig::default()
        }
    }

    fn denied(reason: &str) -> CallResult {
        CallResult::Denied(reason.to_string())
    }

    fn message(topic: &str, from: &str, payload: &[u8]) -> Message {
        Message {
            topic: topic.to_string(),
            from: from.to_string(),
            payload: Bytes::copy_from_slice(payload),
            ..Message::default()
        }
    }

    #[test]
    fn created_says_hello_and_arms_the_login_deadline() {
        let mut h = Harness::new(config());
        h.feed(Event::Created(ConnMeta::default()));
        assert_eq!(h.take(), HELLO);
        assert_eq!(h.sends, 1);
        assert_eq!(h.deadlines, vec![Some(Duration::from_secs(30))]);
        // Said once only.
        h.feed(Event::Created(ConnMeta::default()));
        assert_eq!(h.take(), "");
        assert_eq!(h.deadlines.len(), 1);
    }

    #[test]
    fn connect_authenticates_then_starts_keepalive() {
        let mut h = Harness::created(config());
        assert_eq!(
            h.say("CONNECT alice/laptop alice s3cret\n"),
            "OK CONNECT alice/laptop\n"
        );
        assert_eq!(
            h.calls,
            vec![
                Call::Authenticate {
                    protocol: crate::chat::PROTO_VER,
                    clientid: "alice/laptop".into(),
                    username: "alice".into(),
                    password: Secret::new("s3cret"),
                },
                Call::StartKeepalive { interval_s: 60 },
            ]
        );
        assert_eq!(h.deadlines, vec![Some(Duration::from_secs(30)), None]);
    }

    #[test]
    fn connect_answers_only_after_the_keepalive_call_returns() {
        let mut h = Harness::created(config());
        let mut out = Vec::new();
        h.session.handle(
            Event::Bytes(Bytes::from_static(b"CONNECT a\nPING\n")),
            &mut out,
        );
        assert!(matches!(
            out.as_slice(),
            [Action::Call(Call::Authenticate { .. })]
        ));
        out.clear();
        h.session.handle(Event::Reply(CallResult::Ok), &mut out);
        assert_eq!(
            out,
            vec![
                Action::SetDeadline(None),
                Action::Call(Call::StartKeepalive { interval_s: 60 })
            ]
        );
        out.clear();
        h.session
            .handle(Event::Reply(CallResult::Failed("timer".into())), &mut out);
        assert_eq!(
            out,
            vec![Action::Send(Bytes::from_static(b"OK CONNECT a\nPONG\n"))]
        );
    }

    #[test]
    fn connect_without_a_clientid_makes_one_up() {
        for line in ["CONNECT\n", "CONNECT :\n", "login\n", "CONNECT :  \n"] {
            let mut h = Harness::created(no_keepalive());
            let want = if line.contains("  ") {
                // A clientid of spaces is a clientid.
                "OK CONNECT \\s\\s\n".to_string()
            } else {
                format!("OK CONNECT {MADE_UP_ID}\n")
            };
            assert_eq!(h.say(line), want, "{line:?}");
            let Some(Call::Authenticate {
                clientid,
                username,
                password,
                ..
            }) = h.calls.first()
            else {
                panic!("no Authenticate for {line:?}")
            };
            assert_eq!(username, "");
            assert_eq!(password.expose(), "");
            assert!(!clientid.is_empty());
        }
    }

    #[test]
    fn connect_values_are_unescaped_and_checked() {
        let any = ProtocolConfig {
            clientid_policy: ClientidPolicy::Any,
            ..no_keepalive()
        };
        let mut h = Harness::created(any);
        assert_eq!(
            h.say("CONNECT a\\sb \\x3Au :p\\x41ss word\n"),
            "OK CONNECT a\\sb\n"
        );
        assert_eq!(
            h.calls,
            vec![Call::Authenticate {
                protocol: crate::chat::PROTO_VER,
                clientid: "a b".into(),
                username: ":u".into(),
                password: Secret::new("pAss word"),
            }]
        );
        let mut h = Harness::created(no_keepalive());
        assert_eq!(
            h.say("CONNECT a\\x00\nCONNECT a \\xFF\nCONNECT a b \\x00\n"),
            "ERR 400 :clientid must be utf-8 without NUL\n\
             ERR 400 :username must be utf-8 without NUL\n\
             ERR 400 :password must be utf-8 without NUL\n"
        );
        assert!(h.calls.is_empty());
    }

    #[test]
    fn the_clientid_rule_refuses_other_users_ids_without_asking_emqx() {
        let mut h = Harness::created(no_keepalive());
        assert_eq!(
            h.say(
                "CONNECT alice bob hunter2\nCONNECT alicebob alice pw\n\
                 CONNECT bob/alice alice pw\nCONNECT alice/ alice pw\n"
            ),
            "ERR 403 :clientid not allowed for this user\n".repeat(4)
        );
        assert!(h.calls.is_empty(), "EMQX was asked: {:?}", h.calls);
        // A refusal is like any failed CONNECT: it may be retried.
        assert_eq!(
            h.say("CONNECT alice/phone alice pw\n"),
            "OK CONNECT alice/phone\n"
        );
        // Anonymous clients are not bound to a name.
        let mut h = Harness::created(no_keepalive());
        assert_eq!(h.say("CONNECT alice\n"), "OK CONNECT alice\n");
        // `any` lets a user take any clientid; EMQX decides alone.
        let any = ProtocolConfig {
            clientid_policy: ClientidPolicy::Any,
            ..no_keepalive()
        };
        let mut h = Harness::created(any);
        assert_eq!(h.say("CONNECT alice bob hunter2\n"), "OK CONNECT alice\n");
        assert_eq!(h.calls.len(), 1);
    }

    #[test]
    fn keepalive_is_whole_seconds_rounded_up_or_off() {
        assert_eq!(keepalive_secs(Duration::ZERO), None);
        assert_eq!(keepalive_secs(Duration::from_millis(1)), Some(1));
        assert_eq!(keepalive_secs(Duration::from_millis(1500)), Some(2));
        assert_eq!(keepalive_secs(Duration::from_secs(60)), Some(60));
        assert_eq!(keepalive_secs(Duration::MAX), Some(u32::MAX));

        let mut h = Harness::created(no_keepalive());
        assert_eq!(h.say("CONNECT a\n"), "OK CONNECT a\n");
        assert_eq!(h.calls.len(), 1);
        assert_eq!(h.deadlines.last(), Some(&None));

        let mut h = Harness::created(ProtocolConfig {
            keepalive: Duration::from_millis(200),
            ..config()
        });
        h.say("CONNECT a\n");
        assert_eq!(h.calls[1], Call::StartKeepalive { interval_s: 1 });
    }

    #[test]
    fn a_refused_connect_grants_nothing_and_may_be_retried() {
        let mut h = Harness::created(config());
        h.answer([denied("<<\"not_authorized\">>")]);
        assert_eq!(
            h.say("CONNECT alice alice wrong\n"),
            "ERR 401 :authentication refused\n"
        );
        // The login deadline is neither cancelled nor restarted.
        assert_eq!(h.deadlines, vec![Some(Duration::from_secs(30))]);
        assert_eq!(h.say("SUB a\n"), "ERR 401 :not connected\n");
        h.answer([denied("")]);
        assert_eq!(h.say("CONNECT\n"), "ERR 401 :authentication refused\n");
        h.answer([CallResult::Unreachable]);
        assert_eq!(h.say("CONNECT a\n"), "ERR 503 :emqx unreachable\n");
        h.answer([CallResult::Failed("{error,'UNKNOWN'}".into())]);
        assert_eq!(h.say("CONNECT a\n"), "ERR 500 :gateway failed\n");
        assert_eq!(h.say("CONNECT alice alice right\n"), "OK CONNECT alice\n");
        assert_eq!(h.deadlines, vec![Some(Duration::from_secs(30)), None]);
        assert_eq!(h.say("SUB a\n"), "OK SUB a 0\n");
        // The made-up id stays the same across retries.
        let ids: Vec<_> = h
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Authenticate { clientid, .. } => Some(clientid.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, vec!["alice", MADE_UP_ID, "a", "a", "alice"]);
    }

    #[test]
    fn the_login_deadline_closes_a_connection_that_never_connected() {
        let mut h = Harness::created(config());
        h.say("PING\n");
        h.feed(Event::Deadline);
        assert_eq!(h.take(), "ERR 408 :login timeout\n");
        assert_eq!(h.calls, vec![Call::Close]);
        // Everything after is ignored.
        assert_eq!(h.say("CONNECT a\nPING\n"), "");
        h.feed(Event::Deadline);
        h.feed(Event::Messages(vec![message("t", "", b"x")]));
        h.feed(Event::Closed("{shutdown,normal}".into()));
        assert_eq!(h.take(), "");
        assert_eq!(h.calls, vec![Call::Close]);
    }

    #[test]
    fn the_login_deadline_does_nothing_once_connected() {
        let mut h = Harness::connected(config());
        h.feed(Event::Deadline);
        assert_eq!(h.take(), "");
        assert!(h.calls.is_empty());
        assert_eq!(h.say("PING\n"), "PONG\n");
    }

    #[test]
    fn a_deadline_during_a_call_waits_for_its_reply() {
        // Not expected from a driver that keeps the contract, but handled.
        let mut h = Harness::created(config());
        let mut out = Vec::new();
        h.session.handle(
            Event::Bytes(Bytes::from_static(b"CONNECT a\nPING\n")),
            &mut out,
        );
        out.clear();
        h.session.handle(Event::Deadline, &mut out);
        assert!(out.is_empty());
        h.session.handle(Event::Reply(denied("no")), &mut out);
        assert_eq!(
            out,
            vec![
                Action::Send(Bytes::from_static(
                    b"ERR 401 :authentication refused\nERR 408 :login timeout\n"
                )),
                Action::Call(Call::Close)
            ]
        );

        // A deadline beaten by a successful CONNECT is void.
        let mut h = Harness::created(no_keepalive());
        let mut out = Vec::new();
        h.session.handle(
            Event::Bytes(Bytes::from_static(b"CONNECT a\nPING\n")),
            &mut out,
        );
        h.session.handle(Event::Deadline, &mut out);
        out.clear();
        h.session.handle(Event::Reply(CallResult::Ok), &mut out);
        assert_eq!(
            out,
            vec![
                Action::SetDeadline(None),
                Action::Send(Bytes::from_static(b"OK CONNECT a\nPONG\n"))
            ]
        );
    }

    /// Every command in every state: before CONNECT, after a refused
    /// CONNECT, once connected, after QUIT.
    #[test]
    fn every_command_in_every_state() {
        // (line, before CONNECT (also after a refused one), connected)
        let not_connected = "ERR 401 :not connected\n";
        let cases: &[(&str, &str, &str)] = &[
            (
                "CONNECT x",
                "OK CONNECT x\n",
                "ERR 409 :already connected\n",
            ),
            ("LOGIN x", "OK CONNECT x\n", "ERR 409 :already connected\n"),
            ("SUB a/b", not_connected, "OK SUB a/b 0\n"),
            ("SUB a/b 2", not_connected, "OK SUB a/b 2\n"),
            ("UNSUB a/b", not_connected, "OK UNSUB a/b\n"),
            ("PUB a/b :hi there", not_connected, "OK PUB a/b\n"),
            ("PING", "PONG\n", "PONG\n"),
            ("WHO", not_connected, "ERR 501 :not enabled\n"),
            ("WHO al", not_connected, "ERR 501 :not enabled\n"),
            ("HISTORY a/b", not_connected, "ERR 501 :not enabled\n"),
            ("HISTORY a/b 5", not_connected, "ERR 501 :not enabled\n"),
            // 400s come first in every state.
            (
                "NOPE",
                "ERR 400 :unknown command\n",
                "ERR 400 :unknown command\n",
            ),
            ("PING x", "ERR 400 :usage: PING\n", "ERR 400 :usage: PING\n"),
            (
                "SUB a 3",
                "ERR 400 :qos must be 0, 1 or 2\n",
                "ERR 400 :qos must be 0, 1 or 2\n",
            ),
            (
                "HISTORY t 0",
                "ERR 400 :count must be 1 to 100\n",
                "ERR 400 :count must be 1 to 100\n",
            ),
            (
                "UNSUB",
                "ERR 400 :usage: UNSUB filter\n",
                "ERR 400 :usage: UNSUB filter\n",
            ),
            // Topic rules are a command's own check: after 401 and 501.
            (
                "SUB a/#/b",
                not_connected,
                "ERR 400 :'+' and '#' must fill a whole level, and '#' must be last\n",
            ),
            (
                "UNSUB a+",
                not_connected,
                "ERR 400 :'+' and '#' must fill a whole level, and '#' must be last\n",
            ),
            (
                "PUB a/+ :x",
                not_connected,
                "ERR 400 :a topic name takes no '+' or '#'\n",
            ),
            ("HISTORY a/+", not_connected, "ERR 501 :not enabled\n"),
            (
                "SUB a\\x00",
                not_connected,
                "ERR 400 :filter must be utf-8 without NUL\n",
            ),
            (
                "PUB \\xC3 :x",
                not_connected,
                "ERR 400 :topic must be utf-8 without NUL\n",
            ),
            // The clientid rule is CONNECT's own check: after 409.
            (
                "CONNECT bob alice pw",
                "ERR 403 :clientid not allowed for this user\n",
                "ERR 409 :already connected\n",
            ),
            // Values before 409.
            (
                "CONNECT \\x00",
                "ERR 400 :clientid must be utf-8 without NUL\n",
                "ERR 400 :clientid must be utf-8 without NUL\n",
            ),
        ];
        for &(line, before, connected) in cases {
            let input = format!("{line}\n");
            let mut fresh = Harness::created(no_keepalive());
            assert_eq!(fresh.say(&input), before, "{line} before CONNECT");

            let mut refused = Harness::created(no_keepalive());
            refused.answer([denied("no")]);
            assert_eq!(
                refused.say("CONNECT r\n"),
                "ERR 401 :authentication refused\n"
            );
            assert_eq!(
                refused.say(&input),
                before,
                "{line} after a refused CONNECT"
            );

            let mut on = Harness::connected(no_keepalive());
            assert_eq!(on.say(&input), connected, "{line} when connected");

            for mut h in [fresh, refused, on] {
                assert_eq!(h.say("QUIT\n"), "BYE\n");
                assert_eq!(h.say(&input), "", "{line} after QUIT");
            }
        }
        // HELP and QUIT answer alike everywhere.
        for mut h in [
            Harness::created(no_keepalive()),
            Harness::connected(no_keepalive()),
        ] {
            let help = h.say("help\n");
            assert!(help.starts_with("OK HELP :CONNECT"), "{help}");
            assert_eq!(h.say("QUIT :see you\n"), "BYE\n");
            assert_eq!(h.calls.last(), Some(&Call::Close));
            assert_eq!(h.say("HELP\n"), "");
        }
    }

    #[test]
    fn calls_carry_the_unescaped_values() {
        let mut h = Harness::connected(no_keepalive());
        assert_eq!(
            h.say("SUB a\\sb/+ 1\nUNSUB \\x3Ax\nPUB \\x3At 2 :hi\\x00\\xFF\\n\n"),
            "OK SUB a\\sb/+ 1\nOK UNSUB \\x3Ax\nOK PUB \\x3At\n"
        );
        assert_eq!(
            h.calls,
            vec![
                Call::Subscribe {
                    filter: "a b/+".into(),
                    qos: 1
                },
                Call::Unsubscribe {
                    filter: ":x".into()
                },
                Call::Publish {
                    topic: ":t".into(),
                    qos: 2,
                    payload: Bytes::from_static(b"hi\0\xff\n"),
                },
            ]
        );
    }

    #[test]
    fn pub_parameter_rules() {
        let mut h = Harness::connected(no_keepalive());
        h.say("PUB t 1\nPUB t 1 :hi\nPUB t 1 hi\nPUB t :\nPUB t hello world\nPUB t\n");
        let published: Vec<_> = h
            .calls
            .iter()
            .map(|c| match c {
                Call::Publish { qos, payload, .. } => (*qos, payload.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            published,
            vec![
                (0, Bytes::from_static(b"1")),
                (1, Bytes::from_static(b"hi")),
                (1, Bytes::from_static(b"hi")),
                (0, Bytes::new()),
            ]
        );
    }

    #[test]
    fn a_plain_payload_is_not_copied() {
        let mut h = Harness::connected(no_keepalive());
        let chunk = Bytes::from_static(b"PUB t :payload\n");
        let range = chunk.as_ptr_range();
        h.feed(Event::Bytes(chunk));
        let Some(Call::Publish { payload, .. }) = h.calls.first() else {
            panic!("no publish")
        };
        assert_eq!(&payload[..], b"payload");
        assert!(range.contains(&payload.as_ptr()));
    }

    #[test]
    fn emqx_refusals_map_to_codes() {
        let mut h = Harness::connected(no_keepalive());
        h.answer([
            denied("Authorization deny"),
            CallResult::Unreachable,
            CallResult::Failed("".into()),
            denied(""),
            CallResult::Failed("boom\r\n".into()),
        ]);
        assert_eq!(
            h.say("SUB a\nSUB a\nUNSUB a\nPUB a :x\nPUB a :x\n"),
            "ERR 403 :not authorized\n\
             ERR 503 :emqx unreachable\n\
             ERR 500 :gateway failed\n\
             ERR 403 :not authorized\n\
             ERR 500 :gateway failed\n"
        );
    }

    #[test]
    fn the_subscription_limit_counts_distinct_filters_held() {
        let mut h = Harness::connected(ProtocolConfig {
            max_subscriptions: 2,
            ..no_keepalive()
        });
        assert_eq!(h.say("SUB a\nSUB b\n"), "OK SUB a 0\nOK SUB b 0\n");
        assert_eq!(h.say("SUB c\n"), "ERR 429 :too many subscriptions\n");
        // Topic rules come before the limit.
        assert_eq!(
            h.say("SUB c#\n"),
            "ERR 400 :'+' and '#' must fill a whole level, and '#' must be last\n"
        );
        // Subscribing again to a held filter takes no new place.
        assert_eq!(h.say("SUB a 1\n"), "OK SUB a 1\n");
        // A failed UNSUB frees nothing, a successful one frees a place.
        h.answer([denied("no")]);
        assert_eq!(
            h.say("UNSUB a\nSUB c\n"),
            "ERR 403 :not authorized\nERR 429 :too many subscriptions\n"
        );
        assert_eq!(h.say("UNSUB a\nSUB c\n"), "OK UNSUB a\nOK SUB c 0\n");
        // A failed SUB takes no place.
        assert_eq!(h.say("UNSUB c\n"), "OK UNSUB c\n");
        h.answer([denied("no")]);
        assert_eq!(
            h.say("SUB d\nSUB e\n"),
            "ERR 403 :not authorized\nOK SUB e 0\n"
        );
        assert_eq!(h.say("SUB f\n"), "ERR 429 :too many subscriptions\n");
        let subscribes = h
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Subscribe { .. }))
            .count();
        assert_eq!(subscribes, 6);
    }

    #[test]
    fn the_publish_rate_limit_answers_429_and_refills_with_time() {
        let mut h = Harness::connected(ProtocolConfig {
            max_publish_rate: 2,
            ..no_keepalive()
        });
        h.session.set_time(1_000);
        assert_eq!(
            h.say("PUB t :1\nPUB t :2\nPUB t :3\n"),
            "OK PUB t\nOK PUB t\nERR 429 :too many publishes per second\n"
        );
        // Topic rules come first, and a refused PUB takes no token.
        assert_eq!(
            h.say("PUB t/+ :x\n"),
            "ERR 400 :a topic name takes no '+' or '#'\n"
        );
        // Half a second later one token is back, not two.
        h.session.set_time(1_500);
        assert_eq!(
            h.say("PUB t :4\nPUB t :5\n"),
            "OK PUB t\nERR 429 :too many publishes per second\n"
        );
        // Other commands are not limited.
        assert_eq!(h.say("SUB a\nPING\n"), "OK SUB a 0\nPONG\n");
        let publishes = h
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Publish { .. }))
            .count();
        assert_eq!(publishes, 3);

        // Off by default: a thousand at one instant all go through.
        let mut h = Harness::connected(no_keepalive());
        let replies = h.say(&"PUB t :x\n".repeat(1000));
        assert_eq!(replies, "OK PUB t\n".repeat(1000));
    }

    #[test]
    fn replies_keep_command_order_around_calls() {
        let mut h = Harness::connected(no_keepalive());
        assert_eq!(
            h.say("PING\nSUB a\nPING\nPUB a :x\nHELP x\nUNSUB a\nPING\n"),
            "PONG\nOK SUB a 0\nPONG\nOK PUB a\nERR 400 :usage: HELP\nOK UNSUB a\nPONG\n"
        );

        // Lines after a call wait for its reply.
        let mut h = Harness::connected(no_keepalive());
        let mut out = Vec::new();
        h.session.handle(
            Event::Bytes(Bytes::from_static(b"PING\nSUB a\nPING\nNOPE")),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Action::Send(Bytes::from_static(b"PONG\n")),
                Action::Call(Call::Subscribe {
                    filter: "a".into(),
                    qos: 0
                })
            ]
        );
        out.clear();
        h.session.handle(Event::Reply(CallResult::Ok), &mut out);
        assert_eq!(
            out,
            vec![Action::Send(Bytes::from_static(b"OK SUB a 0\nPONG\n"))]
        );
        out.clear();
        h.session
            .handle(Event::Bytes(Bytes::from_static(b"\n")), &mut out);
        assert_eq!(
            out,
            vec![Action::Send(Bytes::from_static(
                b"ERR 400 :unknown command\n"
            ))]
        );
    }

    #[test]
    fn a_thousand_pings_in_one_chunk_make_one_send() {
        let mut h = Harness::connected(config());
        let sends = h.sends;
        let reply = h.say(&"PING\r\n".repeat(1000));
        assert_eq!(h.sends - sends, 1);
        assert_eq!(reply, "PONG\n".repeat(1000));
    }

    #[test]
    fn over_long_lines_get_413_in_their_place() {
        let small = ProtocolConfig {
            max_line: 8,
            ..no_keepalive()
        };
        let mut h = Harness::created(small.clone());
        assert_eq!(
            h.say("PING\nPING 123456789\nPING\n"),
            "PONG\nERR 413 :line too long\nPONG\n"
        );
        // Exactly the limit is a line; the CR counts.
        assert_eq!(h.say("PING   :\n"), "ERR 400 :usage: PING\n");
        assert_eq!(h.say("PING    \r\n"), "ERR 413 :line too long\n");
        // Reported before any LF, once, and the stream goes on.
        assert_eq!(h.say("123456789"), "ERR 413 :line too long\n");
        assert_eq!(h.say("0123456789".repeat(100).as_str()), "");
        assert_eq!(h.say("end\nPING\n"), "PONG\n");
        // Lines after a call wait behind it, a 413 included.
        let mut h = Harness::created(ProtocolConfig {
            max_line: 9,
            ..small
        });
        assert_eq!(h.say("CONNECT a\n"), "OK CONNECT a\n");
        assert_eq!(
            h.say("SUB a\n1234567890\nPING\n"),
            "OK SUB a 0\nERR 413 :line too long\nPONG\n"
        );
    }

    #[test]
    fn blank_lines_are_ignored_and_bad_utf8_is_400() {
        let mut h = Harness::created(no_keepalive());
        assert_eq!(h.say("\n\r\n  \t \r\n\t\n"), "");
        assert_eq!(h.say("  \tping\t \r\n"), "PONG\n");
        assert_eq!(h.sends, 2);
        assert_eq!(
            h.say("PUB t :\u{e9}\nPING\n"),
            "ERR 401 :not connected\nPONG\n"
        );
        h.bytes(b"PING \xff\nPING\n");
        assert_eq!(h.take(), "ERR 400 :invalid utf-8\nPONG\n");
        h.bytes(b"\xc3\n");
        assert_eq!(h.take(), "ERR 400 :invalid utf-8\n");
    }

    #[test]
    fn messages_become_msg_lines_in_order() {
        let mut h = Harness::connected(no_keepalive());
        let sends = h.sends;
        h.feed(Event::Messages(vec![
            message("chat/lobby", "alice", b"hello everyone"),
            message("a b", "", b"line1\nline2"),
            message("t", "-", b"\x00\xff"),
        ]));
        assert_eq!(
            h.take(),
            "MSG chat/lobby alice :hello everyone\n\
             MSG a\\sb - :line1\\nline2\n\
             MSG t \\x2D :\\x00\\xFF\n"
        );
        assert_eq!(h.sends - sends, 1, "one send for the batch");
        h.feed(Event::Messages(Vec::new()));
        assert_eq!(h.sends - sends, 1);
    }

    #[test]
    fn quit_ends_everything() {
        let mut h = Harness::connected(no_keepalive());
        assert_eq!(h.say("PING\nQUIT :bye now\nPING\nSUB a\n"), "PONG\nBYE\n");
        assert_eq!(h.calls, vec![Call::Close]);
        h.feed(Event::Messages(vec![message("t", "x", b"y")]));
        h.feed(Event::Deadline);
        h.feed(Event::Reply(CallResult::Ok));
        h.feed(Event::TimerFired(TimerKind::Keepalive));
        h.feed(Event::Closed("{shutdown,normal}".into()));
        h.feed(Event::Bytes(Bytes::from_static(b"PING\n")));
        assert_eq!(h.take(), "");
        assert_eq!(h.calls, vec![Call::Close]);
    }

    #[test]
    fn keepalive_timeout_and_close_silence_the_session() {
        let mut h = Harness::connected(config());
        h.feed(Event::TimerFired(TimerKind::Keepalive));
        assert_eq!(h.say("PING\n"), "");
        h.feed(Event::Messages(vec![message("t", "x", b"y")]));
        assert_eq!(h.take(), "");
        assert!(h.calls.is_empty());

        let mut h = Harness::created(config());
        h.feed(Event::Closed("{shutdown,tcp_closed}".into()));
        h.feed(Event::Deadline);
        assert_eq!(h.say("PING\n"), "");
        assert!(h.calls.is_empty());
    }

    #[test]
    fn a_reply_without_a_call_is_ignored() {
        let mut h = Harness::created(config());
        h.feed(Event::Reply(CallResult::Ok));
        h.feed(Event::Reply(denied("x")));
        assert_eq!(h.take(), "");
        assert_eq!(h.say("SUB a\n"), "ERR 401 :not connected\n");
    }

    fn enabled() -> ProtocolConfig {
        ProtocolConfig {
            presence_history: true,
            ..no_keepalive()
        }
    }

    fn stored(topic: &str, from: &str, ts: u64, payload: &[u8]) -> Message {
        Message {
            timestamp_ms: ts,
            ..message(topic, from, payload)
        }
    }

    #[test]
    fn who_and_history_are_501_without_the_service_after_400_and_401() {
        let mut h = Harness::created(no_keepalive());
        assert_eq!(
            h.say("WHO a b\nHISTORY t 0\nWHO\nHISTORY t\n"),
            "ERR 400 :usage: WHO [prefix]\nERR 400 :count must be 1 to 100\n\
             ERR 401 :not connected\nERR 401 :not connected\n"
        );
        assert_eq!(h.say("CONNECT a\n"), "OK CONNECT a\n");
        // Not enabled comes before the command's own checks.
        assert_eq!(
            h.say("WHO\nWHO \\xFF\nHISTORY t/#\nHISTORY t 101\n"),
            "ERR 501 :not enabled\nERR 501 :not enabled\nERR 501 :not enabled\n\
             ERR 400 :count must be 1 to 100\n"
        );
        assert_eq!(h.calls.len(), 1, "only the Authenticate");
    }

    #[test]
    fn who_lists_what_the_service_answers() {
        let mut h = Harness::connected(enabled());
        h.answers([Ok(Answer::Who {
            total: 3,
            ids: vec!["alice".into(), "b c".into(), ":x".into()],
        })]);
        assert_eq!(h.say("WHO\n"), "OK WHO 3 :alice b\\sc \\x3Ax\n");
        assert_eq!(
            h.queries,
            vec![Query::Who {
                prefix: String::new(),
                limit: 100
            }]
        );
        // The prefix is unescaped and checked like any text value.
        assert_eq!(h.say("who al\\x69\n"), "OK WHO 0 :\n");
        assert_eq!(
            h.queries[1],
            Query::Who {
                prefix: "ali".into(),
                limit: 100
            }
        );
        assert_eq!(
            h.say("WHO \\xFF\n"),
            "ERR 400 :prefix must be utf-8 without NUL\n"
        );
        h.answers([Err(QueryError::Unavailable)]);
        assert_eq!(h.say("WHO\n"), "ERR 500 :store unavailable\n");
        // The configured maximum goes to the service.
        let mut h = Harness::connected(ProtocolConfig {
            who_max: 7,
            ..enabled()
        });
        h.say("WHO a\n");
        assert_eq!(
            h.queries,
            vec![Query::Who {
                prefix: "a".into(),
                limit: 7
            }]
        );
    }

    #[test]
    fn history_needs_a_matching_subscription() {
        let mut h = Harness::connected(enabled());
        assert_eq!(
            h.say("HISTORY chat/a\n"),
            "ERR 403 :no subscription matches the topic\n"
        );
        // Topic rules come first.
        assert_eq!(
            h.say("HISTORY chat/#\nHISTORY :\n"),
            "ERR 400 :a topic name takes no '+' or '#'\nERR 400 :empty topic\n"
        );
        assert!(h.calls.is_empty());
        // A refused SUB grants nothing.
        h.answer([denied("Authorization deny")]);
        assert_eq!(
            h.say("SUB chat/+\nHISTORY chat/a\n"),
            "ERR 403 :not authorized\nERR 403 :no subscription matches the topic\n"
        );
        h.answer([CallResult::Ok]);
        assert_eq!(
            h.say("SUB chat/+\nHISTORY chat/a\nHISTORY chat/a/b\n"),
            "OK SUB chat/+ 0\nOK HISTORY chat/a 0\n\
             ERR 403 :no subscription matches the topic\n"
        );
        // UNSUB takes the right away again; a shared subscription grants it.
        h.answer([CallResult::Ok, CallResult::Ok]);
        assert_eq!(
            h.say("UNSUB chat/+\nHISTORY chat/a\nSUB $share/g/chat/#\nHISTORY chat/a/b\n"),
            "OK UNSUB chat/+\nERR 403 :no subscription matches the topic\n\
             OK SUB $share/g/chat/# 0\nOK HISTORY chat/a/b 0\n"
        );
    }

    #[test]
    fn history_replays_hist_lines_then_ok() {
        let mut h = Harness::connected(enabled());
        h.answer([CallResult::Ok]);
        h.answers([Ok(Answer::History(vec![
            stored("chat/a", "alice", 1_700_000_000_000, b"hello"),
            stored("chat/a", "", 1_700_000_000_001, b"x\ny"),
            stored("chat/a", "-", 1_700_000_000_002, b"\xff"),
        ]))]);
        assert_eq!(
            h.say("SUB chat/#\nHISTORY chat/a 3\nPING\n"),
            "OK SUB chat/# 0\n\
             HIST chat/a alice 1700000000000 :hello\n\
             HIST chat/a - 1700000000001 :x\\ny\n\
             HIST chat/a \\x2D 1700000000002 :\\xFF\n\
             OK HISTORY chat/a 3\nPONG\n"
        );
        assert_eq!(
            h.queries[0],
            Query::History {
                topic: "chat/a".into(),
                limit: 3
            }
        );
        // The default count, capped by the configured maximum.
        h.say("HISTORY chat/b\n");
        assert_eq!(
            h.queries[1],
            Query::History {
                topic: "chat/b".into(),
                limit: 20
            }
        );
        h.answers([Err(QueryError::Unavailable)]);
        assert_eq!(h.say("HISTORY chat/a\n"), "ERR 500 :store unavailable\n");
        let mut h = Harness::connected(ProtocolConfig {
            history_max: 5,
            ..enabled()
        });
        assert_eq!(
            h.say("SUB #\nHISTORY t 6\nHISTORY t\n"),
            "OK SUB # 0\nERR 400 :count must be 1 to 5\nOK HISTORY t 0\n"
        );
        assert_eq!(
            h.queries[0],
            Query::History {
                topic: "t".into(),
                limit: 5
            }
        );
    }

    #[test]
    fn lines_after_who_or_history_wait_for_its_answer() {
        let mut h = Harness::connected(enabled());
        let mut out = Vec::new();
        h.session
            .handle(Event::Bytes(Bytes::from_static(b"WHO\nPING\n")), &mut out);
        assert_eq!(
            out,
            vec![Action::Query(Query::Who {
                prefix: String::new(),
                limit: 100
            })]
        );
        out.clear();
        h.session.handle(
            Event::Answer(Ok(Answer::Who {
                total: 1,
                ids: vec!["alice".into()],
            })),
            &mut out,
        );
        assert_eq!(
            out,
            vec![Action::Send(Bytes::from_static(b"OK WHO 1 :alice\nPONG\n"))]
        );
        // An outcome of the wrong kind is a bug of ours: still a reply,
        // either way round.
        out.clear();
        h.session
            .handle(Event::Bytes(Bytes::from_static(b"SUB a\nWHO\n")), &mut out);
        out.clear();
        h.session
            .handle(Event::Answer(Ok(Answer::History(vec![]))), &mut out);
        assert!(
            matches!(&out[..], [Action::Send(_), Action::Query(_)]),
            "{out:?}"
        );
        out.clear();
        h.session.handle(Event::Reply(CallResult::Ok), &mut out);
        assert_eq!(
            out,
            vec![Action::Send(Bytes::from_static(
                b"ERR 500 :gateway failed\n"
            ))]
        );
    }

    /// A session of commands that touch every path, for split tests.
    const SCRIPT: &[u8] = b"  ping\r\nHELP\nNOPE x\nSUB a\n\
        CONNECT alice alice p\r\nCONNECT bob\nSUB a/+ 1\nSUB \\x3Ab\n\
        PUB a/b 1 :hello\\sworld \\x00\nPUB a/b :\n\n \t\nUNSUB a/+\n\
        PUB a/b 1 :this line is far too long for the limit\nWHO\n\
        HISTORY a/b 3\nPING :\nPUB\xff\nSUB #\nSUB x\nSUB y\nPING\nQUIT :done\nPING\n";

    fn run_split(pieces: &[&[u8]]) -> (String, Vec<Call>, usize) {
        let mut h = Harness::created(ProtocolConfig {
            max_line: 40,
            max_subscriptions: 2,
            ..config()
        });
        h.answer([
            CallResult::Ok,
            CallResult::Ok,
            CallResult::Ok,
            denied("Authorization deny"),
        ]);
        for p in pieces {
            h.bytes(p);
        }
        let wire = h.take();
        (wire, h.calls, h.sends)
    }

    #[test]
    fn chunks_split_at_every_byte_give_the_same_output() {
        let input = SCRIPT;
        let (whole, calls, _) = run_split(&[input]);
        assert_eq!(
            whole,
            "PONG\nOK HELP :CONNECT [clientid [username [password]]] (alias LOGIN); \
             SUB filter [qos]; UNSUB filter; PUB topic [qos] :message; PING; HELP; \
             QUIT [:reason]; WHO [prefix]; HISTORY topic [n]\n\
             ERR 400 :unknown command\nERR 401 :not connected\n\
             OK CONNECT alice\nERR 409 :already connected\nOK SUB a/+ 1\n\
             ERR 403 :not authorized\nOK PUB a/b\nOK PUB a/b\nOK UNSUB a/+\n\
             ERR 413 :line too long\nERR 501 :not enabled\nERR 501 :not enabled\n\
             ERR 400 :usage: PING\nERR 400 :invalid utf-8\nOK SUB # 0\nOK SUB x 0\n\
             ERR 429 :too many subscriptions\nPONG\nBYE\n"
        );
        assert_eq!(calls.len(), 10);
        assert_eq!(calls.last(), Some(&Call::Close));
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let (wire, c, _) = run_split(&[a, b]);
            assert_eq!(
                (wire.as_str(), &c),
                (whole.as_str(), &calls),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let (wire, c, _) = run_split(&bytes);
        assert_eq!((wire, c), (whole, calls));
    }

    fn arbitrary_result() -> impl Strategy<Value = CallResult> {
        prop_oneof![
            3 => Just(CallResult::Ok),
            1 => Just(CallResult::Unreachable),
            1 => ".{0,8}".prop_map(CallResult::Denied),
            1 => ".{0,8}".prop_map(CallResult::Failed),
        ]
    }

    fn arbitrary_answer() -> impl Strategy<Value = Result<Answer, QueryError>> {
        prop_oneof![
            (0u64..5, proptest::collection::vec(".{0,4}", 0..3))
                .prop_map(|(total, ids)| Ok(Answer::Who { total, ids })),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 0..3).prop_map(
                |ps| Ok(Answer::History(
                    ps.iter().map(|p| message("t", "f", p)).collect()
                ))
            ),
            Just(Err(QueryError::Unavailable)),
        ]
    }

    /// Replies and answers as events of their own, whether or not anything
    /// was asked, and of the right kind or not.
    fn arbitrary_outcome() -> impl Strategy<Value = Event> {
        prop_oneof![
            arbitrary_result().prop_map(Event::Reply),
            arbitrary_answer().prop_map(Event::Answer),
        ]
    }

    fn arbitrary_event() -> impl Strategy<Value = Event> {
        const WORDS: &[&[u8]] = &[
            b"CONNECT", b"SUB", b"UNSUB", b"PUB", b"PING", b"QUIT", b"WHO", b"HISTORY", b" ", b":",
            b"\\", b"\r\n", b"\n", b"1", b"a/+",
        ];
        let word = proptest::sample::select(WORDS);
        let chunk = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(word, 0..16).prop_map(|w| w.concat()),
        ];
        prop_oneof![
            8 => chunk.prop_map(|c| Event::Bytes(Bytes::from(c))),
            1 => Just(Event::Deadline),
            1 => Just(Event::TimerFired(TimerKind::Keepalive)),
            1 => Just(Event::Closed(String::new())),
            1 => arbitrary_outcome(),
            1 => proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|p| Event::Messages(vec![message("t", "f", &p)])),
        ]
    }

    proptest! {
        /// Arbitrary events (contract-breaking ones included) never panic
        /// the session, and every reply is one well-formed line.
        #[test]
        fn arbitrary_events_never_panic(
            events in proptest::collection::vec(arbitrary_event(), 0..24),
            results in proptest::collection::vec(arbitrary_result(), 0..8),
            answers in proptest::collection::vec(arbitrary_answer(), 0..4),
            max_line in 0usize..64,
            presence_history in any::<bool>(),
        ) {
            let mut h = Harness::new(ProtocolConfig {
                max_line,
                max_subscriptions: 2,
                presence_history,
                ..config()
            });
            h.feed(Event::Created(ConnMeta::default()));
            h.answer(results);
            h.answers(answers);
            for event in events {
                h.feed(event);
            }
            let wire = h.take();
            prop_assert!(wire.is_empty() || wire.ends_with('\n'));
            for line in wire.lines() {
                let verb = line.split(' ').next().unwrap_or_default();
                prop_assert!(
                    ["HELLO", "OK", "ERR", "PONG", "BYE", "MSG", "HIST"].contains(&verb),
                    "unexpected line {:?}", line
                );
            }
        }

        /// Splitting the input anywhere changes nothing.
        #[test]
        fn any_split_gives_the_same_output(
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let input = SCRIPT;
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for p in points {
                pieces.push(&input[at..p]);
                at = p;
            }
            pieces.push(&input[at..]);
            let (whole, calls, _) = run_split(&[input]);
            let (wire, c, _) = run_split(&pieces);
            prop_assert_eq!((wire, c), (whole, calls));
        }
    }
}
