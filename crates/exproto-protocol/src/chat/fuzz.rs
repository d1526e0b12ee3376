//! Entry points for fuzzing the chat protocol, and for replaying a fuzz
//! corpus in ordinary tests.
//!
//! The fuzz crate (`fuzz/`, built with cargo-fuzz) and `tests/fuzz_corpus.rs`
//! call the same two functions, so every corpus file is also a regression
//! test on stable Rust. They take arbitrary bytes and panic when an
//! invariant breaks; that panic is the finding. Keeping them here, rather
//! than making the decoder's internals public, leaves the parser, escapes
//! and framer `pub(crate)`.
//!
//! Not a stable API: the byte formats below may change with the targets.

use std::collections::HashSet;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::command::{text_value, Command};
use super::encode;
use super::escape::{escape_into, unescape, Param};
use super::parser::{parse_line, ParseError};
use super::Chat;
use crate::framer::{Frame, LineFramer};
use crate::topic;
use crate::{
    Action, Answer, Call, CallResult, ClientidPolicy, ConnMeta, Event, Message, Protocol,
    ProtocolConfig, QueryError, SessionInit, TimerKind,
};

/// Decodes `data` as a client's byte stream: framer, parser, command and
/// value checks, unescaping; re-encodes what it decoded and decodes that
/// again.
///
/// Layout: the first byte picks the line limit (1 to 256) and where the
/// stream is split in two; the rest is the stream.
///
/// # Panics
/// When an invariant breaks: framing depends on how the stream is split, a
/// line is over the limit or holds an LF, the framer holds more than the
/// limit, an escape does not round-trip, or a re-encoded line parses into
/// other values.
pub fn decode_line(data: &[u8]) {
    let Some((&head, stream)) = data.split_first() else {
        return;
    };
    let max = usize::from(head) + 1;

    let mut whole = LineFramer::new(max);
    whole.push(Bytes::copy_from_slice(stream));
    let frames: Vec<Frame> = whole.by_ref().collect();
    assert!(whole.buffered() <= max, "framer holds more than the limit");

    // The same stream in two pieces must frame the same.
    let cut = (usize::from(head) * 7919) % (stream.len() + 1);
    let mut split = LineFramer::new(max);
    let mut again = Vec::new();
    for piece in [&stream[..cut], &stream[cut..]] {
        split.push(Bytes::copy_from_slice(piece));
        again.extend(split.by_ref());
        assert!(split.buffered() <= max, "framer holds more than the limit");
    }
    assert_eq!(frames, again, "framing depends on the split");

    for frame in &frames {
        if let Frame::Line(line) = frame {
            assert!(line.len() <= max, "line over the limit");
            assert!(!line.contains(&b'\n'), "line holds an LF");
            decode_one(line);
        }
    }
    // Values the protocol writes out (MSG lines) round-trip too.
    let third = stream.len() / 3;
    let (topic, rest) = stream.split_at(third);
    let (from, payload) = rest.split_at(third.min(rest.len()));
    msg_round_trip(topic, from, payload);
    escape_round_trip(stream);
}

/// One framed line, as the session would see it.
fn decode_one(line: &[u8]) {
    if std::str::from_utf8(line).is_err() {
        return;
    }
    let parsed = match parse_line(line) {
        Ok(parsed) => parsed,
        Err(ParseError::Blank) => {
            assert!(line.iter().all(|&b| b == b' ' || b == b'\t'));
            return;
        }
        Err(ParseError::Malformed) => panic!("the grammar accepts every non-blank line"),
    };
    // The typed command and every value check must not panic.
    if let Ok(Command::Sub { filter, .. } | Command::Unsub { filter }) =
        Command::from_line(&parsed, 100)
    {
        if let Ok(f) = text_value(filter, "filter") {
            let _ = topic::validate_filter(&f);
        }
    }
    for &raw in parsed.params() {
        escape_round_trip(raw);
        if let Ok(text) = text_value(raw, "value") {
            let name_ok = topic::validate_name(&text).is_ok();
            let filter_ok = topic::validate_filter(&text).is_ok();
            // A valid topic name is a valid filter that matches itself.
            if name_ok {
                assert!(filter_ok, "valid name {text:?} is not a valid filter");
                assert!(
                    topic::matches(&text, &text),
                    "{text:?} does not match itself"
                );
            }
        }
    }
    // Re-encode: verb, middles, the last parameter as the trailing one.
    let params = parsed.params();
    if parsed.count() > params.len() {
        return;
    }
    let values: Vec<Vec<u8>> = params.iter().map(|p| unescape(p).into_owned()).collect();
    let mut out = BytesMut::new();
    out.extend_from_slice(parsed.verb);
    for (i, v) in values.iter().enumerate() {
        let last = i + 1 == values.len();
        out.extend_from_slice(if last { b" :" } else { b" " });
        escape_into(
            &mut out,
            v,
            if last { Param::Trailing } else { Param::Middle },
        );
    }
    // Only the verb goes out as it came, and it may hold a CR (a CR that
    // is not right before the LF belongs to the line).
    assert!(
        !out[parsed.verb.len()..].contains(&b'\n') && !out[parsed.verb.len()..].contains(&b'\r')
    );
    let text = std::str::from_utf8(&out).expect("an encoded line is UTF-8");
    let reparsed = parse_line(text.as_bytes()).expect("an encoded line parses");
    assert_eq!(reparsed.verb, parsed.verb);
    assert_eq!(reparsed.count(), parsed.count(), "re-encoded {text:?}");
    for (raw, want) in reparsed.params().iter().zip(&values) {
        assert_eq!(&*unescape(raw), &want[..], "re-encoded {text:?}");
    }
}

fn escape_round_trip(value: &[u8]) {
    for place in [Param::Middle, Param::Trailing] {
        let mut out = BytesMut::new();
        escape_into(&mut out, value, place);
        assert!(std::str::from_utf8(&out).is_ok(), "escaped value not UTF-8");
        assert!(!out.iter().any(|&b| b < 0x20 || b == 0x7f));
        if place == Param::Middle {
            assert!(!out.contains(&b' ') && out.first() != Some(&b':'));
        }
        assert_eq!(&*unescape(&out), value, "escape does not round-trip");
    }
}

fn msg_round_trip(topic: &[u8], from: &[u8], payload: &[u8]) {
    // EMQX never delivers an empty topic, and an empty middle parameter
    // cannot be written.
    if topic.is_empty() {
        return;
    }
    let mut out = BytesMut::new();
    encode::msg(&mut out, topic, from, payload);
    let line = out.strip_suffix(b"\n").expect("MSG ends with LF");
    let parsed = parse_line(line).expect("MSG parses");
    assert_eq!(parsed.verb, b"MSG");
    let [t, f, p] = parsed.params() else {
        panic!("MSG has three parameters: {line:?}")
    };
    assert_eq!(&*unescape(t), topic);
    let from_back: &[u8] = if *f == b"-" { b"" } else { &unescape(f) };
    assert_eq!(from_back, from);
    assert_eq!(&*unescape(p), payload);
}

/// Plays `data` as a script against one chat session through the public
/// [`Protocol`] trait, answering its EMQX calls as the script says.
///
/// Layout: four bytes of configuration (line limit, subscription limit,
/// publish rate, keepalive on or off), then operations, each a byte and
/// its arguments: bytes from the client (a length, then that many bytes),
/// a batch of messages, the login deadline, EMQX's keepalive timer, the
/// socket closing, time passing, a repeated `Created`. Each call the
/// session makes is answered with a result the next byte picks.
///
/// # Panics
/// When an invariant breaks: a call that is not the last action, an empty
/// or unterminated send, a line that is not a server line, HELLO not first
/// or twice, anything after Close, a Subscribe, Unsubscribe or Publish
/// before a successful Authenticate, a second successful Authenticate, an
/// Authenticate for a clientid the policy does not allow, more
/// subscriptions held than allowed, or more publishes than the rate allows.
///
/// Returns what the client was sent.
pub fn run_session(data: &[u8]) -> Vec<u8> {
    let mut s = Script { data, at: 0 };
    // The bytes are read in this order, whatever the fields' order, so
    // that the corpora keep their meaning.
    let max_line = 16 + usize::from(s.byte());
    let max_subscriptions = usize::from(s.byte() % 4);
    let max_publish_rate = u32::from(s.byte() % 4);
    let keepalive = if s.byte() & 1 == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs(60)
    };
    let flags = s.byte();
    let config = ProtocolConfig {
        max_line,
        max_subscriptions,
        max_publish_rate,
        keepalive,
        login_timeout: Duration::from_secs(30),
        presence_history: flags & 1 == 1,
        clientid_policy: if flags & 2 == 0 {
            ClientidPolicy::Username
        } else {
            ClientidPolicy::Any
        },
        who_max: 1 + usize::from(s.byte() % 4),
        history_max: 1 + usize::from(s.byte() % 4),
        lines: crate::lines::LinesConfig::default(),
    };
    let chat = Chat::new(config.clone());
    let mut session = chat.new_session(SessionInit { random: 42 });
    let mut check = Checker::new(config);
    let mut now_ms = 0u64;
    let mut next = Some(Event::Created(ConnMeta::default()));
    while let Some(event) = next.take().or_else(|| s.event(&mut now_ms)) {
        let mut out = Vec::new();
        session.set_time(now_ms);
        check.now_ms = now_ms;
        let reply_to = check.pending.take();
        session.handle(event.clone(), &mut out);
        check.after(&event, reply_to, &out);
        if let Some(Action::Call(_) | Action::Query(_)) = out.last() {
            next = Some(s.result());
        }
    }
    check.finish();
    check.wire
}

/// Reads a script; past its end every read is zero and no event is left.
struct Script<'a> {
    data: &'a [u8],
    at: usize,
}

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let start = self.at.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.at = end;
        &self.data[start..end]
    }

    /// The outcome of a call or query. Outcomes of the wrong kind (a Who
    /// answer for a Publish, a call's reply for a query) are included on
    /// purpose: the session must survive them too.
    fn result(&mut self) -> Event {
        match self.byte() % 8 {
            0..=2 => Event::Reply(CallResult::Ok),
            3 => Event::Reply(CallResult::Denied("Authorization deny".into())),
            4 => Event::Reply(CallResult::Failed("Unknown crashes".into())),
            5 => Event::Answer(Ok(Answer::Who {
                total: u64::from(self.byte()),
                ids: vec!["a b".into(), "-".into(), String::new()],
            })),
            6 => Event::Answer(Ok(Answer::History(vec![crate::Message {
                topic: "chat/x".into(),
                from: "\\x".into(),
                payload: Bytes::copy_from_slice(self.take(4)),
                ..Default::default()
            }]))),
            _ if self.byte() & 1 == 0 => Event::Reply(CallResult::Unreachable),
            _ => Event::Answer(Err(QueryError::Unavailable)),
        }
    }

    fn event(&mut self, now_ms: &mut u64) -> Option<Event> {
        if self.at >= self.data.len() {
            return None;
        }
        Some(match self.byte() % 10 {
            0..=4 => {
                let n = usize::from(self.byte());
                Event::Bytes(Bytes::copy_from_slice(self.take(n)))
            }
            5 => {
                let n = self.byte() % 4;
                let batch = (0..n)
                    .map(|_| {
                        let len = usize::from(self.byte() % 16);
                        let bytes = self.take(len).to_vec();
                        let text = String::from_utf8_lossy(&bytes).into_owned();
                        Message {
                            topic: text.clone(),
                            from: text,
                            payload: Bytes::from(bytes),
                            ..Message::default()
                        }
                    })
                    .collect();
                Event::Messages(batch)
            }
            6 => Event::Deadline,
            7 => Event::TimerFired(TimerKind::Keepalive),
            8 => {
                // Time passes; also the only way the rate limit refills.
                *now_ms = now_ms.saturating_add(u64::from(self.byte()) * 20);
                return self.event(now_ms);
            }
            _ => {
                if self.byte() % 8 == 0 {
                    Event::Closed("{shutdown,tcp_closed}".into())
                } else {
                    Event::Created(ConnMeta::default())
                }
            }
        })
    }
}

/// What the session has done so far, to check each step against.
struct Checker {
    config: ProtocolConfig,
    /// Everything sent, in order.
    wire: Vec<u8>,
    /// The call awaiting its reply.
    pending: Option<Call>,
    authenticated: bool,
    closed: bool,
    /// Filters EMQX accepted and not yet unsubscribed.
    held: HashSet<String>,
    publishes: u64,
    first_ms: Option<u64>,
    now_ms: u64,
}

impl Checker {
    fn new(config: ProtocolConfig) -> Self {
        Self {
            config,
            wire: Vec::new(),
            pending: None,
            authenticated: false,
            closed: false,
            held: HashSet::new(),
            publishes: 0,
            first_ms: None,
            now_ms: 0,
        }
    }

    fn after(&mut self, event: &Event, reply_to: Option<Call>, out: &[Action]) {
        if let (Some(call), Event::Reply(result)) = (reply_to, event) {
            self.outcome(call, result);
        }
        if self.closed {
            assert!(out.is_empty(), "actions after Close: {out:?}");
        }
        for (i, action) in out.iter().enumerate() {
            match action {
                Action::Send(b) => {
                    assert!(!b.is_empty(), "empty send");
                    assert!(b.ends_with(b"\n"), "send without a final LF");
                    self.wire.extend_from_slice(b);
                }
                Action::SetDeadline(_) => {}
                Action::Call(call) => {
                    assert_eq!(i + 1, out.len(), "a call that is not the last action");
                    self.call(call);
                }
                Action::Query(query) => {
                    assert_eq!(i + 1, out.len(), "a query that is not the last action");
                    assert!(self.authenticated, "{query:?} before a successful CONNECT");
                    assert!(self.config.presence_history, "{query:?} while not enabled");
                }
            }
        }
    }

    fn call(&mut self, call: &Call) {
        match call {
            Call::Subscribe { .. } | Call::Unsubscribe { .. } | Call::Publish { .. } => {
                assert!(self.authenticated, "{call:?} before a successful CONNECT");
            }
            Call::Authenticate {
                clientid, username, ..
            } => {
                assert!(!self.authenticated, "Authenticate when connected");
                assert!(
                    self.config.clientid_policy.allows(clientid, username),
                    "Authenticate as {clientid:?} for user {username:?}"
                );
            }
            Call::StartKeepalive { .. } => {}
            // Chat never publishes without the client's identity: a client
            // could otherwise publish where EMQX would not let it.
            Call::RawPublish { .. } => panic!("chat made a RawPublish: {call:?}"),
            Call::Close => self.closed = true,
        }
        if let Call::Publish { .. } = call {
            self.publishes += 1;
            let rate = u64::from(self.config.max_publish_rate);
            if rate > 0 {
                let first = *self.first_ms.get_or_insert(self.now_ms);
                let elapsed = self.now_ms - first;
                // A full bucket at first, then `rate` per second.
                assert!(
                    self.publishes * 1000 <= rate * (1000 + elapsed),
                    "{} publishes in {elapsed} ms at {rate}/s",
                    self.publishes
                );
            }
        }
        self.pending = Some(call.clone());
    }

    fn outcome(&mut self, call: Call, result: &CallResult) {
        if *result != CallResult::Ok {
            return;
        }
        match call {
            Call::Authenticate { .. } => self.authenticated = true,
            Call::Subscribe { filter, .. } => {
                self.held.insert(filter);
                assert!(
                    self.held.len() <= self.config.max_subscriptions,
                    "{} subscriptions held",
                    self.held.len()
                );
            }
            Call::Unsubscribe { filter } => {
                self.held.remove(&filter);
            }
            _ => {}
        }
    }

    fn finish(&self) {
        let text = std::str::from_utf8(&self.wire).expect("the session writes UTF-8");
        let mut lines = text.lines();
        if let Some(first) = lines.next() {
            assert!(first.starts_with("HELLO "), "first line {first:?}");
        }
        for line in lines {
            let verb = line.split(' ').next().unwrap_or_default();
            assert!(
                ["OK", "ERR", "PONG", "BYE", "MSG", "HIST"].contains(&verb),
                "unexpected line {line:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_tiny_inputs() {
        decode_line(b"");
        decode_line(b"\x00");
        decode_line(b"\x05PING\r\nSUB a/+ 1\n");
        run_session(b"");
        run_session(b"\x00\x02\x01\x01");
    }

    #[test]
    fn a_scripted_session_runs() {
        // Config, then: bytes "CONNECT a\n" (answered Ok, keepalive Ok),
        // bytes "SUB t\nPUB t :x\n" (both Ok).
        let mut script = vec![40, 2, 0, 1, 0, 0, 0];
        script.extend([0, 10]);
        script.extend(b"CONNECT a\n");
        script.extend([0, 0]);
        script.extend([0, 15]);
        script.extend(b"SUB t\nPUB t :x\n");
        script.extend([0, 0]);
        let wire = run_session(&script);
        let text = String::from_utf8(wire).unwrap();
        assert!(
            text.ends_with("\nOK CONNECT a\nOK SUB t 0\nOK PUB t\n"),
            "{text}"
        );
    }
}
