//! The `lines` protocol: devices that send text records, one per line.
//!
//! A device identifies itself once, then every line it sends is one MQTT
//! message, and every message for it comes back as a line:
//!
//! - **Identity.** On a TLS listener whose client presented a certificate,
//!   the certificate's common name (EMQX's `ConnInfo.peercert.cn`) is the
//!   clientid and the username, with no password, and the device says
//!   nothing to log in. Otherwise its first line is
//!   `ID <clientid> [username] [password]` (parameters separated by spaces
//!   or tabs, no escapes), answered `OK <clientid>` once EMQX has accepted
//!   it. A clientid holding `/`, `+`, `#` or NUL is refused (`ERR 400`):
//!   it becomes a topic level. A refused `ID` may be retried; a refused
//!   certificate closes the connection.
//! - **Up.** After that, each non-empty line, whatever it holds, is
//!   published as it is (no LF, no CR before it) to the up topic,
//!   `devices/<clientid>/up` by default. Success is silent: a fleet of
//!   sensors does not want an acknowledgement per reading. A refusal is an
//!   `ERR` line in that record's place. Empty lines are skipped, so a
//!   device may send one as a heartbeat.
//! - **Down.** Messages on `devices/<clientid>/down` (subscribed at login)
//!   are written to the device as they are, each followed by an LF unless
//!   it ends with one.
//! - **Status.** Once logged in, `online` is published to
//!   `devices/<clientid>/status` with RawPublish (from `exproto`, so no
//!   device can forge another's status), and `offline` once the socket
//!   closes or EMQX's keepalive ends it: a last will that does not depend
//!   on the device. A session handed to a new adapter process stays online;
//!   one lost with a crashed adapter says nothing.
//!
//! The topics are templates (`{clientid}` stands for the clientid) and the
//! qos of every message is a setting ([`LinesConfig`]). Errors are the chat
//! protocol's lines: `ERR 400` malformed, `401` refused login or a record
//! before the `ID`, `403` not authorized, `408` login timeout, `413` line
//! too long, `429` publish rate exceeded, `500` gateway failed, `503` EMQX
//! unreachable. Over UDP and DTLS each datagram holds whole lines, as for
//! every protocol.

use bytes::{Bytes, BytesMut};

use crate::framer::{send_lines, Frame, LineFramer};
use crate::rate::TokenBucket;
use crate::state::{Reader, StateError, Writer};
use crate::{
    keepalive_secs, topic, Action, Call, CallResult, ConnMeta, Event, ProtoVer, Protocol,
    ProtocolConfig, Refusal, Secret, Session, SessionInit, SockType, TimerKind,
};

/// What EMQX is told in `proto_ver`.
const PROTO_VER: ProtoVer = ProtoVer {
    name: "lines",
    version: "1",
};

/// The stand-in for the clientid in [`LinesConfig`]'s topic templates.
pub const CLIENTID: &str = "{clientid}";

/// The `lines` protocol's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinesConfig {
    /// Where each record is published.
    pub up_topic: String,
    /// The filter the device receives lines from.
    pub down_topic: String,
    /// Where `online` and `offline` are published.
    pub status_topic: String,
    /// The qos of records, of the down subscription and of the status.
    pub qos: u8,
}

impl Default for LinesConfig {
    fn default() -> Self {
        Self {
            up_topic: "devices/{clientid}/up".into(),
            down_topic: "devices/{clientid}/down".into(),
            status_topic: "devices/{clientid}/status".into(),
            qos: 0,
        }
    }
}

impl LinesConfig {
    /// Checks the settings before any device comes: each template must make
    /// a valid topic (the down one a valid filter) and the qos be 0 to 2.
    ///
    /// # Errors
    /// What is wrong, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.qos > 2 {
            return Err(format!("lines qos {}: use 0, 1 or 2", self.qos));
        }
        for (what, template, filter) in [
            ("up topic", &self.up_topic, false),
            ("down topic", &self.down_topic, true),
            ("status topic", &self.status_topic, false),
        ] {
            check_template(template, filter).map_err(|e| format!("lines {what} {e}"))?;
        }
        Ok(())
    }
}

/// Checks a topic template: with a clientid in place of `{clientid}` it
/// must be a valid topic name (a valid filter, with `filter`).
///
/// # Errors
/// The template and what is wrong with it.
pub fn check_template(template: &str, filter: bool) -> Result<(), String> {
    let sample = fill(template, "device");
    let checked = if filter {
        topic::validate_filter(&sample)
    } else {
        topic::validate_name(&sample)
    };
    checked.map_err(|e| format!("{template:?}: {e}"))
}

fn fill(template: &str, clientid: &str) -> String {
    template.replace(CLIENTID, clientid)
}

/// Whether `id` can stand in a topic level: not empty, no separator, no
/// wildcard, no NUL.
fn usable_clientid(id: &str) -> bool {
    !id.is_empty() && !id.contains(['/', '+', '#', '\0'])
}

/// The `lines` protocol's factory.
pub struct Lines {
    config: ProtocolConfig,
}

impl Lines {
    /// A `lines` protocol with `config`'s limits, timers and
    /// [`ProtocolConfig::lines`] topics.
    pub fn new(config: ProtocolConfig) -> Self {
        Self { config }
    }
}

impl Protocol for Lines {
    fn name(&self) -> &'static str {
        PROTO_VER.name
    }
    fn new_session(&self, _init: SessionInit) -> Box<dyn Session> {
        Box::new(LinesSession::new(self.config.clone()))
    }
    fn restore(&self, r: &mut Reader<'_>) -> Result<Box<dyn Session>, StateError> {
        Ok(Box::new(LinesSession::restore(self.config.clone(), r)?))
    }
    fn lost_session_bytes(&self) -> Bytes {
        Bytes::from_static(crate::LOST_SESSION_LINE)
    }
    fn refusal_bytes(&self, refusal: Refusal) -> Bytes {
        crate::refusal_line(refusal)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not logged in; the login deadline runs.
    Anonymous,
    /// Logged in: lines are records.
    Online,
    /// The connection is ending: nothing more is said.
    Closing,
    Closed,
}

/// The call in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Authenticate,
    Keepalive,
    Subscribe,
    Online,
    Record,
    Offline,
    Close,
}

/// One `lines` connection.
struct LinesSession {
    config: ProtocolConfig,
    framer: LineFramer,
    out: BytesMut,
    phase: Phase,
    pending: Option<Pending>,
    /// Empty until an identity is claimed.
    clientid: String,
    /// The identity came from the client certificate.
    by_cert: bool,
    /// `online` was published and `offline` is still owed.
    online: bool,
    deadline_due: bool,
    parse_errors: u64,
    created: bool,
    publish_bucket: Option<TokenBucket>,
    now_ms: u64,
    generation: u64,
    datagram: bool,
}

/// The version of the saved state.
const STATE_VERSION: u8 = 1;

impl LinesSession {
    fn new(config: ProtocolConfig) -> Self {
        Self {
            framer: LineFramer::new(config.max_line),
            out: BytesMut::new(),
            phase: Phase::Anonymous,
            pending: None,
            clientid: String::new(),
            by_cert: false,
            online: false,
            deadline_due: false,
            parse_errors: 0,
            created: false,
            publish_bucket: (config.max_publish_rate > 0)
                .then(|| TokenBucket::new(config.max_publish_rate)),
            now_ms: 0,
            generation: 0,
            datagram: false,
            config,
        }
    }

    fn restore(config: ProtocolConfig, r: &mut Reader<'_>) -> Result<Self, StateError> {
        let version = r.u8()?;
        if version != STATE_VERSION {
            return Err(StateError::Version {
                found: u16::from(version),
                supported: u16::from(STATE_VERSION),
            });
        }
        let mut s = Self::new(config);
        s.phase = match r.u8()? {
            0 => Phase::Anonymous,
            1 => Phase::Online,
            2 => Phase::Closing,
            3 => Phase::Closed,
            _ => return Err(StateError::Invalid("unknown lines phase")),
        };
        s.clientid = r.str()?.to_owned();
        s.by_cert = r.bool()?;
        s.online = r.bool()?;
        s.deadline_due = r.bool()?;
        s.parse_errors = r.u64()?;
        s.created = r.bool()?;
        s.now_ms = r.u64()?;
        if r.bool()? {
            let bucket = TokenBucket::restore(s.config.max_publish_rate.max(1), r)?;
            if s.config.max_publish_rate > 0 {
                s.publish_bucket = Some(bucket);
            }
        }
        s.framer = LineFramer::restore(s.config.max_line, r)?;
        Ok(s)
    }

    fn set_phase(&mut self, phase: Phase) {
        if self.phase != phase {
            self.phase = phase;
            self.generation += 1;
        }
    }

    fn flush(&mut self, out: &mut Vec<Action>) {
        send_lines(&mut self.out, self.datagram, out);
    }

    /// Ends the handle with `call`, after the lines written so far.
    fn call(&mut self, pending: Pending, call: Call, out: &mut Vec<Action>) {
        self.flush(out);
        self.pending = Some(pending);
        out.push(Action::Call(call));
    }

    fn err(&mut self, code: u16, text: &str) {
        if matches!(code, 400 | 413) {
            self.parse_errors += 1;
        }
        self.out
            .extend_from_slice(format!("ERR {code} :{text}\n").as_bytes());
    }

    fn failed(&mut self, result: &CallResult, denied: (u16, &str)) {
        let (code, text) = match result {
            CallResult::Denied(_) => denied,
            CallResult::Unreachable => (503, "emqx unreachable"),
            CallResult::Failed(_) | CallResult::Ok => (500, "gateway failed"),
        };
        self.err(code, text);
    }

    /// A last line, then Close; nothing after.
    fn close_with(&mut self, code: u16, text: &str, out: &mut Vec<Action>) {
        self.err(code, text);
        self.set_phase(Phase::Closing);
        self.framer.clear();
        self.call(Pending::Close, Call::Close, out);
    }

    /// Publishes `offline` if `online` went out: the session is ending.
    fn go_offline(&mut self, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.online) {
            self.generation += 1;
            let call = Call::RawPublish {
                topic: fill(&self.config.lines.status_topic, &self.clientid),
                qos: self.config.lines.qos,
                payload: Bytes::from_static(b"offline"),
            };
            self.call(Pending::Offline, call, out);
        }
    }

    fn created(&mut self, meta: ConnMeta, out: &mut Vec<Action>) {
        if self.created {
            return;
        }
        self.created = true;
        self.generation += 1;
        out.push(Action::SetDeadline(Some(self.config.login_timeout)));
        let Some(cn) = meta.cert_cn.filter(|cn| !cn.is_empty()) else {
            return;
        };
        if !usable_clientid(&cn) {
            self.close_with(400, "certificate CN is not a usable clientid", out);
            return;
        }
        self.by_cert = true;
        self.clientid = cn.clone();
        let call = Call::Authenticate {
            protocol: PROTO_VER,
            clientid: cn.clone(),
            username: cn,
            password: Secret::default(),
        };
        self.call(Pending::Authenticate, call, out);
    }

    /// Handles queued lines until they run out or one needs a call.
    fn drain(&mut self, out: &mut Vec<Action>) {
        while self.pending.is_none() && matches!(self.phase, Phase::Anonymous | Phase::Online) {
            let Some(frame) = self.framer.next_frame() else {
                break;
            };
            let line = match frame {
                Frame::TooLong => {
                    self.err(413, "line too long");
                    continue;
                }
                Frame::Line(line) if line.is_empty() => continue,
                Frame::Line(line) => line,
            };
            if let Some((pending, call)) = self.line(line) {
                self.call(pending, call, out);
                return;
            }
        }
        self.flush(out);
    }

    fn line(&mut self, line: Bytes) -> Option<(Pending, Call)> {
        if self.phase == Phase::Online {
            if let Some(bucket) = &mut self.publish_bucket {
                if !bucket.try_take(self.now_ms) {
                    self.err(429, "publish rate exceeded");
                    return None;
                }
            }
            let call = Call::Publish {
                topic: fill(&self.config.lines.up_topic, &self.clientid),
                qos: self.config.lines.qos,
                payload: line,
            };
            return Some((Pending::Record, call));
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            self.err(400, "not UTF-8");
            return None;
        };
        let mut words = text.split([' ', '\t']).filter(|w| !w.is_empty());
        if words.next() != Some("ID") {
            self.err(401, "identify first: ID <clientid> [username] [password]");
            return None;
        }
        let params: Vec<&str> = words.collect();
        let (clientid, username, password) = match params[..] {
            [c] => (c, "", ""),
            [c, u] => (c, u, ""),
            [c, u, p] => (c, u, p),
            _ => {
                self.err(400, "usage: ID <clientid> [username] [password]");
                return None;
            }
        };
        if !usable_clientid(clientid) {
            self.err(400, "clientid must not hold / + # or NUL");
            return None;
        }
        if !self.config.clientid_policy.allows(clientid, username) {
            self.err(403, "clientid not allowed for this user");
            return None;
        }
        self.clientid = clientid.to_owned();
        let call = Call::Authenticate {
            protocol: PROTO_VER,
            clientid: clientid.to_owned(),
            username: username.to_owned(),
            password: Secret::new(password),
        };
        Some((Pending::Authenticate, call))
    }

    /// The login's next call after `done` returned: keepalive (if on),
    /// the down subscription, then `online`.
    fn login_step(&mut self, done: Pending, out: &mut Vec<Action>) {
        let lines = &self.config.lines;
        let (pending, call) = match (done, keepalive_secs(self.config.keepalive)) {
            (Pending::Authenticate, Some(interval_s)) => {
                (Pending::Keepalive, Call::StartKeepalive { interval_s })
            }
            (Pending::Authenticate | Pending::Keepalive, _) => (
                Pending::Subscribe,
                Call::Subscribe {
                    filter: fill(&lines.down_topic, &self.clientid),
                    qos: lines.qos,
                },
            ),
            _ => (
                Pending::Online,
                Call::RawPublish {
                    topic: fill(&lines.status_topic, &self.clientid),
                    qos: lines.qos,
                    payload: Bytes::from_static(b"online"),
                },
            ),
        };
        self.call(pending, call, out);
    }

    fn reply(&mut self, result: CallResult, out: &mut Vec<Action>) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        match pending {
            Pending::Authenticate if result != CallResult::Ok => {
                self.failed(&result, (401, "authentication refused"));
                if self.by_cert {
                    self.set_phase(Phase::Closing);
                    self.framer.clear();
                    self.call(Pending::Close, Call::Close, out);
                    return;
                }
                self.clientid.clear();
            }
            Pending::Authenticate => {
                self.set_phase(Phase::Online);
                self.deadline_due = false;
                self.flush(out);
                out.push(Action::SetDeadline(None));
                self.login_step(pending, out);
                return;
            }
            // The device is logged in whatever these return: a keepalive
            // that did not start is the driver's to log; a down topic it
            // may not read is said, and records still go up.
            Pending::Keepalive => {
                self.login_step(pending, out);
                return;
            }
            Pending::Subscribe => {
                if result != CallResult::Ok {
                    self.failed(&result, (403, "not authorized to receive"));
                }
                self.login_step(pending, out);
                return;
            }
            Pending::Online => {
                // An `online` that did not go out needs no `offline`.
                if result == CallResult::Ok {
                    self.online = true;
                    self.generation += 1;
                }
                if !self.by_cert {
                    let ok = format!("OK {}\n", self.clientid);
                    self.out.extend_from_slice(ok.as_bytes());
                }
            }
            Pending::Record if result != CallResult::Ok => {
                self.failed(&result, (403, "not authorized"));
            }
            Pending::Record | Pending::Offline | Pending::Close => {}
        }
        if self.deadline_due && self.phase == Phase::Anonymous {
            self.close_with(408, "login timeout", out);
        } else {
            self.drain(out);
        }
    }
}

impl Session for LinesSession {
    fn handle(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Reply(result) => self.reply(result, out),
            Event::Closed(_) => {
                self.set_phase(Phase::Closed);
                self.pending = None;
                self.framer.clear();
                self.go_offline(out);
            }
            _ if matches!(self.phase, Phase::Closing | Phase::Closed) => {}
            Event::Created(meta) => self.created(meta, out),
            Event::Bytes(bytes) => {
                self.framer.push(bytes);
                if self.pending.is_none() {
                    self.drain(out);
                }
            }
            Event::Messages(messages) => {
                for m in &messages {
                    self.out.extend_from_slice(&m.payload);
                    if !m.payload.ends_with(b"\n") {
                        self.out.extend_from_slice(b"\n");
                    }
                }
                self.flush(out);
            }
            Event::TimerFired(TimerKind::Keepalive) => {
                // EMQX closes the socket in the same step.
                self.set_phase(Phase::Closing);
                self.pending = None;
                self.framer.clear();
                self.go_offline(out);
            }
            Event::Deadline => {
                if self.phase == Phase::Anonymous {
                    if self.pending.is_some() {
                        self.deadline_due = true;
                    } else {
                        self.close_with(408, "login timeout", out);
                    }
                }
            }
            // Nothing is queried: no presence or history here.
            Event::Answer(_) => {}
        }
        if self.pending.is_none() && self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
    }

    fn set_time(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    fn set_transport(&mut self, socktype: SockType) {
        self.datagram = socktype.is_datagram();
        self.framer.set_datagram(self.datagram);
    }

    fn parse_errors(&self) -> u64 {
        self.parse_errors
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn save(&self, w: &mut Writer) -> Result<(), StateError> {
        if self.pending.is_some() {
            return Err(StateError::Busy);
        }
        w.u8(STATE_VERSION);
        w.u8(match self.phase {
            Phase::Anonymous => 0,
            Phase::Online => 1,
            Phase::Closing => 2,
            Phase::Closed => 3,
        });
        w.str(&self.clientid);
        w.bool(self.by_cert);
        w.bool(self.online);
        w.bool(self.deadline_due);
        w.u64(self.parse_errors);
        w.bool(self.created);
        w.u64(self.now_ms);
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{answer_ok, assert_same_at_every_split, Harness, Script};
    use crate::{ClientidPolicy, Message, Request};

    fn lines() -> Lines {
        Lines::new(ProtocolConfig::default())
    }

    fn calls(h: &Harness) -> Vec<Call> {
        h.requests()
            .iter()
            .map(|r| match r {
                Request::Call(c) => c.clone(),
                Request::Query(q) => panic!("lines asked {q:?}"),
            })
            .collect()
    }

    fn publish(topic: &str, payload: &'static [u8]) -> Call {
        Call::Publish {
            topic: topic.into(),
            qos: 0,
            payload: Bytes::from_static(payload),
        }
    }

    fn status(id: &str, what: &'static [u8]) -> Call {
        Call::RawPublish {
            topic: format!("devices/{id}/status"),
            qos: 0,
            payload: Bytes::from_static(what),
        }
    }

    fn login(id: &str, username: &str, password: &str) -> Vec<Call> {
        vec![
            Call::Authenticate {
                protocol: PROTO_VER,
                clientid: id.into(),
                username: username.into(),
                password: Secret::new(password),
            },
            Call::StartKeepalive { interval_s: 60 },
            Call::Subscribe {
                filter: format!("devices/{id}/down"),
                qos: 0,
            },
            status(id, b"online"),
        ]
    }

    /// Answers `method` calls with `result`, every other request with
    /// [`answer_ok`].
    fn failing(method: &'static str, result: CallResult) -> Script {
        Box::new(move |r| match r {
            Request::Call(c) if c.method() == method => Event::Reply(result.clone()),
            other => answer_ok(other),
        })
    }

    fn tls(cn: &str) -> ConnMeta {
        ConnMeta {
            socktype: SockType::Ssl,
            cert_cn: Some(cn.into()),
            ..ConnMeta::default()
        }
    }

    #[test]
    fn an_id_line_logs_in_subscribes_and_announces_online() {
        let mut h = Harness::new(&lines());
        assert_eq!(h.take_output_text(), "", "a device is not greeted");
        assert_eq!(h.deadline(), Some(30_000), "the login deadline runs");
        h.bytes(b"ID alice/dev1 alice secret\n");
        assert_eq!(
            h.take_output_text(),
            "ERR 400 :clientid must not hold / + # or NUL\n"
        );
        h.bytes(b"ID dev1 dev1 secret\n");
        assert_eq!(h.take_output_text(), "OK dev1\n");
        assert_eq!(calls(&h), login("dev1", "dev1", "secret"));
        assert_eq!(h.deadline(), None, "logged in: no login deadline");
        h.bytes(b"ID\tdev2  \n");
        assert_eq!(
            calls(&h).last(),
            Some(&publish("devices/dev1/up", b"ID\tdev2  ")),
            "once logged in, every line is a record"
        );
    }

    #[test]
    fn records_go_up_silently_and_empty_lines_are_heartbeats() {
        let mut h = Harness::new(&lines());
        h.bytes(b"ID d\nt=21.5\n\n\r\nhum=40 %\r\n");
        assert_eq!(h.take_output_text(), "OK d\n");
        assert_eq!(
            calls(&h)[4..],
            [
                publish("devices/d/up", b"t=21.5"),
                publish("devices/d/up", b"hum=40 %")
            ]
        );
        // Records are bytes: not UTF-8 goes up as it is.
        h.bytes(b"\xff\x00\n");
        assert_eq!(calls(&h)[6], publish("devices/d/up", b"\xff\x00"));
        assert_eq!(h.take_output_text(), "");
    }

    #[test]
    fn down_messages_are_written_as_lines() {
        let mut h = Harness::new(&lines());
        h.bytes(b"ID d\n");
        h.take_output();
        let m = |payload: &'static [u8]| Message {
            topic: "devices/d/down".into(),
            payload: Bytes::from_static(payload),
            ..Message::default()
        };
        h.event(Event::Messages(vec![m(b"led on"), m(b"a\nb\n"), m(b"")]));
        assert_eq!(h.take_output_text(), "led on\na\nb\n\n");
    }

    #[test]
    fn the_end_of_the_socket_publishes_offline_once() {
        let mut h = Harness::new(&lines());
        h.bytes(b"ID d\n");
        h.event(Event::Closed("normal".into()));
        h.event(Event::Closed("normal".into()));
        assert_eq!(calls(&h)[4..], [status("d", b"offline")]);

        let mut h = Harness::new(&lines());
        h.bytes(b"ID d\n");
        h.event(Event::TimerFired(TimerKind::Keepalive));
        h.bytes(b"late\n");
        h.event(Event::Closed("keepalive_timeout".into()));
        assert_eq!(calls(&h)[4..], [status("d", b"offline")]);

        // Never online: nothing to take back.
        let mut h = Harness::new(&lines());
        h.event(Event::Closed("normal".into()));
        assert!(h.requests().is_empty());
    }

    #[test]
    fn a_certificate_names_the_device() {
        let mut h = Harness::with(&lines(), tls("sensor-7"), Box::new(answer_ok));
        assert_eq!(calls(&h), login("sensor-7", "sensor-7", ""));
        assert_eq!(h.take_output_text(), "", "nothing to acknowledge");
        h.bytes(b"ID other\n");
        assert_eq!(
            calls(&h)[4],
            publish("devices/sensor-7/up", b"ID other"),
            "no ID line on a certificate"
        );
    }

    #[test]
    fn a_refused_or_unusable_certificate_closes() {
        let refuse = failing("Authenticate", CallResult::Denied("no".into()));
        let mut h = Harness::with(&lines(), tls("sensor-7"), refuse);
        assert_eq!(h.take_output_text(), "ERR 401 :authentication refused\n");
        assert_eq!(calls(&h).last(), Some(&Call::Close));
        h.bytes(b"rec\n");
        assert_eq!(calls(&h).len(), 2, "nothing after the close");

        let mut h = Harness::with(&lines(), tls("a/b"), Box::new(answer_ok));
        assert_eq!(
            h.take_output_text(),
            "ERR 400 :certificate CN is not a usable clientid\n"
        );
        assert_eq!(calls(&h), [Call::Close], "EMQX is not asked");
    }

    #[test]
    fn before_the_id_line_everything_else_is_refused() {
        let mut h = Harness::new(&lines());
        h.bytes(b"t=1\nID\nID a b c d\nID a/b\nID a+\n\xff\nid a\n");
        assert_eq!(
            h.take_output_text(),
            "ERR 401 :identify first: ID <clientid> [username] [password]\n\
             ERR 400 :usage: ID <clientid> [username] [password]\n\
             ERR 400 :usage: ID <clientid> [username] [password]\n\
             ERR 400 :clientid must not hold / + # or NUL\n\
             ERR 400 :clientid must not hold / + # or NUL\n\
             ERR 400 :not UTF-8\n\
             ERR 401 :identify first: ID <clientid> [username] [password]\n"
        );
        assert!(h.requests().is_empty());
        assert_eq!(h.connection().parse_errors(), 5);
    }

    #[test]
    fn the_clientid_rule_is_checked_before_emqx_is_asked() {
        let mut h = Harness::new(&lines());
        h.bytes(b"ID bob alice pw\n");
        assert_eq!(
            h.take_output_text(),
            "ERR 403 :clientid not allowed for this user\n"
        );
        assert!(h.requests().is_empty());
        let any = ProtocolConfig {
            clientid_policy: ClientidPolicy::Any,
            ..ProtocolConfig::default()
        };
        let mut h = Harness::new(&Lines::new(any));
        h.bytes(b"ID bob alice pw\n");
        assert_eq!(h.take_output_text(), "OK bob\n");
    }

    #[test]
    fn a_refused_id_may_be_retried_and_records_wait_for_the_login() {
        let mut refused = true;
        let script: Script = Box::new(move |r| match r {
            Request::Call(Call::Authenticate { .. }) if std::mem::take(&mut refused) => {
                Event::Reply(CallResult::Denied("bad password".into()))
            }
            other => answer_ok(other),
        });
        let mut h = Harness::with(&lines(), ConnMeta::default(), script);
        h.bytes(b"ID d d wrong\nrec0\nID d d right\nrec1\n");
        assert_eq!(
            h.take_output_text(),
            "ERR 401 :authentication refused\n\
             ERR 401 :identify first: ID <clientid> [username] [password]\n\
             OK d\n"
        );
        assert_eq!(calls(&h).last(), Some(&publish("devices/d/up", b"rec1")));
    }

    #[test]
    fn the_login_deadline_closes_a_silent_device() {
        let mut h = Harness::new(&lines());
        assert!(h.advance_to(30_000));
        assert_eq!(h.take_output_text(), "ERR 408 :login timeout\n");
        assert_eq!(calls(&h), [Call::Close]);

        // Due during the login's call: a refused login then closes.
        let mut h = Harness::with(
            &lines(),
            ConnMeta::default(),
            failing("Authenticate", CallResult::Unreachable),
        );
        h.advance_to(29_999);
        h.event(Event::Deadline);
        assert_eq!(h.take_output_text(), "ERR 408 :login timeout\n");
        let mut h = Harness::with(
            &lines(),
            ConnMeta::default(),
            failing("Authenticate", CallResult::Unreachable),
        );
        h.bytes(b"ID d\n");
        assert_eq!(h.take_output_text(), "ERR 503 :emqx unreachable\n");
    }

    #[test]
    fn emqx_refusals_of_records_and_of_the_down_topic_are_said() {
        let mut h = Harness::with(
            &lines(),
            ConnMeta::default(),
            failing("Publish", CallResult::Denied("acl".into())),
        );
        h.bytes(b"ID d\nrec\n");
        assert_eq!(h.take_output_text(), "OK d\nERR 403 :not authorized\n");
        let mut h = Harness::with(
            &lines(),
            ConnMeta::default(),
            failing("Publish", CallResult::Failed("crash".into())),
        );
        h.bytes(b"ID d\nrec\n");
        assert_eq!(h.take_output_text(), "OK d\nERR 500 :gateway failed\n");
        let mut h = Harness::with(
            &lines(),
            ConnMeta::default(),
            failing("Subscribe", CallResult::Denied("acl".into())),
        );
        h.bytes(b"ID d\nrec\n");
        assert_eq!(
            h.take_output_text(),
            "ERR 403 :not authorized to receive\nOK d\n",
            "still logged in: records go up"
        );
        assert_eq!(calls(&h).last(), Some(&publish("devices/d/up", b"rec")));
    }

    #[test]
    fn over_long_lines_and_the_rate_limit_answer_in_place() {
        let config = ProtocolConfig {
            max_line: 8,
            max_publish_rate: 2,
            keepalive: Duration::ZERO,
            ..ProtocolConfig::default()
        };
        let mut h = Harness::new(&Lines::new(config));
        h.bytes(b"ID d\n123456789\na\nb\nc\n");
        assert_eq!(
            h.take_output_text(),
            "OK d\nERR 413 :line too long\nERR 429 :publish rate exceeded\n"
        );
        assert!(!calls(&h).contains(&Call::StartKeepalive { interval_s: 60 }));
        assert_eq!(calls(&h).len(), 5, "login without keepalive, a and b");
        h.advance_to(1_000);
        h.bytes(b"d\n");
        assert_eq!(calls(&h).last(), Some(&publish("devices/d/up", b"d")));
    }

    #[test]
    fn topics_and_qos_follow_the_settings() {
        let config = ProtocolConfig {
            lines: LinesConfig {
                up_topic: "fleet/up/{clientid}".into(),
                down_topic: "fleet/down/{clientid}/#".into(),
                status_topic: "fleet/status".into(),
                qos: 1,
            },
            ..ProtocolConfig::default()
        };
        let mut h = Harness::new(&Lines::new(config));
        h.bytes(b"ID d\nx\n");
        h.event(Event::Closed("normal".into()));
        let c = calls(&h);
        assert_eq!(
            c[2],
            Call::Subscribe {
                filter: "fleet/down/d/#".into(),
                qos: 1
            }
        );
        assert_eq!(
            c[4],
            Call::Publish {
                topic: "fleet/up/d".into(),
                qos: 1,
                payload: Bytes::from_static(b"x")
            }
        );
        assert_eq!(
            c[5],
            Call::RawPublish {
                topic: "fleet/status".into(),
                qos: 1,
                payload: Bytes::from_static(b"offline")
            }
        );
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(LinesConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut LinesConfig)| {
            let mut c = LinesConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.qos = 3).contains("qos 3"));
        assert!(bad(|c| c.up_topic = "devices/+/up".into()).contains("up topic"));
        assert!(bad(|c| c.status_topic = "s/#".into()).contains("status topic"));
        assert!(bad(|c| c.down_topic = "a/#/b".into()).contains("down topic"));
        assert!(bad(|c| c.up_topic = String::new()).contains("up topic"));
        assert_eq!(check_template("d/{clientid}/+", true), Ok(()));
    }

    #[test]
    fn over_udp_each_datagram_holds_whole_records() {
        let meta = ConnMeta {
            socktype: SockType::Udp,
            ..ConnMeta::default()
        };
        let mut h = Harness::with(&lines(), meta, Box::new(answer_ok));
        h.bytes(b"ID d\nt=1");
        h.bytes(b"t=2\n");
        assert_eq!(
            calls(&h)[4..],
            [
                publish("devices/d/up", b"t=1"),
                publish("devices/d/up", b"t=2")
            ]
        );
    }

    #[test]
    fn over_dtls_the_certificate_and_the_datagrams_both_count() {
        let meta = ConnMeta {
            socktype: SockType::Dtls,
            cert_cn: Some("s1".into()),
            ..ConnMeta::default()
        };
        let mut h = Harness::with(&lines(), meta, Box::new(answer_ok));
        h.bytes(b"a=1\na=2");
        h.bytes(b"a=3");
        assert_eq!(
            calls(&h)[4..],
            [
                publish("devices/s1/up", b"a=1"),
                publish("devices/s1/up", b"a=2"),
                publish("devices/s1/up", b"a=3")
            ]
        );
    }

    #[test]
    fn a_saved_session_goes_on_where_it_stopped() {
        let protocol = lines();
        let mut h = Harness::new(&protocol);
        h.bytes(b"ID d\npar");
        let saved = h.connection().save("lines").unwrap();
        let mut h = Harness::restored(&protocol, &saved, Box::new(answer_ok)).unwrap();
        h.bytes(b"tial\n");
        h.event(Event::Closed("normal".into()));
        assert_eq!(
            calls(&h),
            [publish("devices/d/up", b"partial"), status("d", b"offline")],
            "still online after the move: offline is owed"
        );
        let chat = crate::chat::Chat::new(ProtocolConfig::default());
        assert!(Harness::restored(&chat, &saved, Box::new(answer_ok)).is_err());
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_calls() {
        assert_same_at_every_split(&lines(), b"t=0\nID dev1 u p\nrec1\n\nrec2\r\nID x\n");
    }

    fn arbitrary_result() -> impl proptest::strategy::Strategy<Value = CallResult> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(CallResult::Ok),
            1 => Just(CallResult::Denied("no".into())),
            1 => Just(CallResult::Failed("crash".into())),
            1 => Just(CallResult::Unreachable),
        ]
    }

    fn arbitrary_event() -> impl proptest::strategy::Strategy<Value = Event> {
        use proptest::prelude::*;
        let chunk = prop_oneof![
            Just(b"ID dev\n".to_vec()),
            Just(b"ID a/b\n".to_vec()),
            Just(b"rec\n".to_vec()),
            Just(b"\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ];
        prop_oneof![
            6 => chunk.prop_map(|b| Event::Bytes(Bytes::from(b))),
            1 => Just(Event::Messages(vec![Message {
                payload: Bytes::from_static(b"down"),
                ..Message::default()
            }])),
            1 => Just(Event::TimerFired(TimerKind::Keepalive)),
            1 => Just(Event::Deadline),
            1 => Just(Event::Closed("normal".into())),
        ]
    }

    proptest::proptest! {
        /// Whatever arrives and whatever EMQX answers: no panic, no record
        /// goes up before a login was asked for, status only to the
        /// device's own topic, `online` at most once and `offline` never
        /// before it, and every line sent is one of the protocol's.
        #[test]
        fn arbitrary_events_keep_the_rules(
            udp in proptest::bool::ANY,
            cert in proptest::bool::ANY,
            events in proptest::collection::vec(arbitrary_event(), 0..24),
            results in proptest::collection::vec(arbitrary_result(), 0..12),
        ) {
            let mut results = results.into_iter();
            let script: Script = Box::new(move |r| match r {
                Request::Call(_) => Event::Reply(results.next().unwrap_or(CallResult::Ok)),
                other => answer_ok(other),
            });
            let meta = ConnMeta {
                socktype: if udp { SockType::Udp } else { SockType::Tcp },
                cert_cn: cert.then(|| "dev".to_owned()),
                ..ConnMeta::default()
            };
            let config = ProtocolConfig { max_line: 8, ..ProtocolConfig::default() };
            let mut h = Harness::with(&Lines::new(config), meta, script);
            for event in events {
                h.event(event);
            }
            let calls = calls(&h);
            let mut authenticated = false;
            let (mut online, mut offline) = (0, 0);
            for c in &calls {
                match c {
                    Call::Authenticate { .. } => authenticated = true,
                    Call::Publish { topic, .. } => {
                        proptest::prop_assert!(authenticated, "{calls:?}");
                        proptest::prop_assert_eq!(topic, "devices/dev/up");
                    }
                    Call::RawPublish { topic, payload, .. } => {
                        proptest::prop_assert_eq!(topic, "devices/dev/status");
                        if payload.as_ref() == b"online" { online += 1 } else { offline += 1 }
                        proptest::prop_assert!(offline <= online, "{calls:?}");
                    }
                    _ => {}
                }
            }
            proptest::prop_assert!(online <= 1 && offline <= 1, "{calls:?}");
            let wire = h.take_output_text();
            for line in wire.lines() {
                proptest::prop_assert!(
                    line.starts_with("OK ") || line.starts_with("ERR ") || line == "down",
                    "unexpected line {:?}", line
                );
            }
        }
    }
}
