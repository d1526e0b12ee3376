//! `binproto`: a length-prefixed binary protocol, written only against the
//! library's public `Protocol` and `Session` traits.
//!
//! Every frame is `type (1 byte) | length (2 bytes, big endian) | body`.
//!
//! | type | direction | body | reply |
//! |---|---|---|---|
//! | 0x01 CONNECT | client | clientid (UTF-8) | 0x81 + status |
//! | 0x02 SUB | client | topic filter (UTF-8) | 0x82 + status |
//! | 0x03 PUB | client | topic length (2 bytes) + topic + payload | 0x83 + status |
//! | 0x04 PING | client | empty | 0x84, empty body |
//! | 0x90 MSG | server | topic length (2 bytes) + topic + payload | — |
//!
//! A status is one byte: 0 ok, 1 refused, 2 failed, 3 bad request, 4 not
//! connected. A frame with an unknown type closes the connection: a binary
//! protocol cannot resynchronise. Topics follow MQTT's rules; a PUB to an
//! invalid topic name or a SUB to an invalid filter is a bad request.
//!
//! Frames are cut by tokio-util's `LengthDelimitedCodec`, whose `Decoder`
//! works on the session's own buffer, so the session stays sans-IO.
//!
//! Over UDP and DTLS each datagram holds whole frames: a frame cut short
//! by the end of its datagram is answered `bad request` (or dropped when
//! not even its type came) and the next datagram starts afresh, so a lost
//! datagram costs only its own frames.

use bytes::{BufMut, Bytes, BytesMut};
use exproto_adapter::protocol::{
    topic, Action, Call, CallResult, Event, ProtoVer, Protocol, Secret, Session, SessionInit,
    SockType,
};
use tokio_util::codec::{Decoder as _, LengthDelimitedCodec};

/// EMQX's client list shows `binproto/1` as the protocol version; the
/// protocol name EMQX sees is `exproto`, whatever the protocol.
pub const PROTO_VER: ProtoVer = ProtoVer {
    name: "binproto",
    version: "1",
};

pub const CONNECT: u8 = 0x01;
pub const SUB: u8 = 0x02;
pub const PUB: u8 = 0x03;
pub const PING: u8 = 0x04;
pub const REPLY: u8 = 0x80;
pub const MSG: u8 = 0x90;

pub const OK: u8 = 0;
pub const REFUSED: u8 = 1;
pub const FAILED: u8 = 2;
pub const BAD: u8 = 3;
pub const NOT_CONNECTED: u8 = 4;

/// Type and length.
const HEAD: usize = 3;
/// The largest body, all the length field can say; the decoder refuses a
/// longer one, which closes the connection.
const MAX_BODY: usize = u16::MAX as usize;

/// The protocol's factory, registered with the adapter's server.
pub struct BinProto;

impl Protocol for BinProto {
    fn name(&self) -> &'static str {
        PROTO_VER.name
    }

    fn new_session(&self, _init: SessionInit) -> Box<dyn Session> {
        Box::new(BinSession::default())
    }

    fn lost_session_bytes(&self) -> Bytes {
        frame(REPLY | PING, &[FAILED])
    }
}

/// Encodes one frame.
pub fn frame(kind: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEAD + body.len());
    out.put_u8(kind);
    out.put_u16(u16::try_from(body.len()).unwrap_or(u16::MAX));
    out.put_slice(&body[..body.len().min(MAX_BODY)]);
    out.freeze()
}

/// A topic and a payload, as PUB and MSG carry them.
pub fn topic_payload(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + topic.len() + payload.len());
    b.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(0).to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(payload);
    b
}

/// Cuts whole frames, head included so the type travels with the body.
fn decoder() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_offset(1)
        .length_field_type::<u16>()
        // The length counts the body only; the frame is head and body.
        .length_adjustment(HEAD as isize)
        .num_skip(0)
        .max_frame_length(MAX_BODY)
        .new_codec()
}

pub struct BinSession {
    buf: BytesMut,
    decoder: LengthDelimitedCodec,
    connected: bool,
    closing: bool,
    /// The frame type whose call is outstanding; its reply waits for it.
    waiting: Option<u8>,
    /// Set by a successful CONNECT until its reply is written.
    connecting: bool,
    /// Over UDP or DTLS `buf` holds one datagram: the next one comes only
    /// once no call is out, and by then this one is used up.
    datagram: bool,
}

impl Default for BinSession {
    fn default() -> Self {
        Self {
            buf: BytesMut::new(),
            decoder: decoder(),
            connected: false,
            closing: false,
            waiting: None,
            connecting: false,
            datagram: false,
        }
    }
}

impl BinSession {
    /// Handles complete frames until one needs EMQX or the buffer runs dry.
    fn run(&mut self, out: &mut Vec<Action>) {
        let mut reply = BytesMut::new();
        while self.waiting.is_none() && !self.closing {
            let (kind, step) = match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    let frame = frame.freeze();
                    (frame[0], self.command(frame[0], frame.slice(HEAD..)))
                }
                // The end of a datagram ends its frames: one cut short
                // (or announcing more than a datagram holds) is answered,
                // and only it is lost.
                Ok(None) | Err(_) if self.datagram => match self.drop_cut_frame() {
                    Some(kind) => (kind, Step::Reply(&[BAD])),
                    None => break,
                },
                Ok(None) => break,
                // An oversized frame: what follows it cannot be found. A
                // close needs no frame type.
                Err(_) => (0, Step::Close),
            };
            match step {
                Step::Reply(status) => reply.extend_from_slice(&frame(REPLY | kind, status)),
                Step::Call(call) => {
                    self.waiting = Some(kind);
                    flush(&mut reply, out);
                    out.push(Action::Call(call));
                    return;
                }
                Step::Close => {
                    self.closing = true;
                    self.buf.clear();
                    flush(&mut reply, out);
                    out.push(Action::Call(Call::Close));
                    return;
                }
            }
        }
        flush(&mut reply, out);
    }

    /// Drops what is left of the datagram (a frame its end cut short);
    /// returns that frame's type, if any of it came.
    fn drop_cut_frame(&mut self) -> Option<u8> {
        let cut = self.buf.first().copied();
        self.buf.clear();
        // The decoder may have read the cut frame's head already.
        self.decoder = decoder();
        cut
    }

    fn command(&mut self, kind: u8, body: Bytes) -> Step {
        if !matches!(kind, CONNECT | SUB | PUB | PING) {
            return Step::Close;
        }
        if kind == PING {
            return Step::Reply(&[]);
        }
        if kind != CONNECT && !self.connected {
            return Step::Reply(&[NOT_CONNECTED]);
        }
        match kind {
            CONNECT => match std::str::from_utf8(&body) {
                Ok(id) if !id.is_empty() && !self.connected => {
                    self.connecting = true;
                    Step::Call(Call::Authenticate {
                        protocol: PROTO_VER,
                        clientid: id.to_string(),
                        username: String::new(),
                        password: Secret::default(),
                    })
                }
                _ => Step::Reply(&[BAD]),
            },
            SUB => match std::str::from_utf8(&body) {
                Ok(f) if topic::validate_filter(f).is_ok() => Step::Call(Call::Subscribe {
                    filter: f.to_string(),
                    qos: 0,
                }),
                _ => Step::Reply(&[BAD]),
            },
            _ => {
                let Some((topic, payload)) = split_topic(&body) else {
                    return Step::Reply(&[BAD]);
                };
                Step::Call(Call::Publish {
                    topic,
                    qos: 0,
                    payload,
                })
            }
        }
    }
}

enum Step {
    Reply(&'static [u8]),
    Call(Call),
    Close,
}

fn flush(reply: &mut BytesMut, out: &mut Vec<Action>) {
    if !reply.is_empty() {
        out.push(Action::Send(reply.split().freeze()));
    }
}

fn split_topic(body: &Bytes) -> Option<(String, Bytes)> {
    if body.len() < 2 {
        return None;
    }
    let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let name = std::str::from_utf8(body.get(2..2 + n)?).ok()?;
    topic::validate_name(name).ok()?;
    Some((name.to_string(), body.slice(2 + n..)))
}

impl Session for BinSession {
    fn set_transport(&mut self, socktype: SockType) {
        self.datagram = socktype.is_datagram();
    }

    fn handle(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Bytes(b) if !self.closing => {
                // A peer that announces a frame and never sends it is held
                // to one frame's worth of memory.
                if self.buf.len() + b.len() > 2 * (HEAD + MAX_BODY) {
                    self.closing = true;
                    out.push(Action::Call(Call::Close));
                    return;
                }
                self.buf.extend_from_slice(&b);
                self.run(out);
            }
            Event::Messages(msgs) if !self.closing => {
                let mut b = BytesMut::new();
                for m in msgs {
                    b.extend_from_slice(&frame(MSG, &topic_payload(&m.topic, &m.payload)));
                }
                flush(&mut b, out);
            }
            Event::Reply(result) => {
                let Some(kind) = self.waiting.take() else {
                    return;
                };
                let status = match result {
                    CallResult::Ok => OK,
                    CallResult::Denied(_) => REFUSED,
                    _ => FAILED,
                };
                if std::mem::take(&mut self.connecting) && status == OK {
                    self.connected = true;
                }
                out.push(Action::Send(frame(REPLY | kind, &[status])));
                self.run(out);
            }
            Event::TimerFired(_) | Event::Closed(_) => self.closing = true,
            // Created, Deadline, and whatever later versions of the trait
            // add: nothing to say.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut BinSession, ev: Event, answers: &[CallResult]) -> (Vec<u8>, Vec<Call>) {
        let mut out = Vec::new();
        let mut wire = Vec::new();
        let mut calls = Vec::new();
        let mut answers = answers.iter().cloned();
        s.handle(ev, &mut out);
        loop {
            let mut call = None;
            for a in out.drain(..) {
                match a {
                    Action::Send(b) => wire.extend_from_slice(&b),
                    Action::Call(c) => call = Some(c),
                    Action::SetDeadline(_) | Action::Query(_) => {}
                }
            }
            let Some(c) = call else { break };
            calls.push(c);
            let r = answers.next().unwrap_or(CallResult::Ok);
            s.handle(Event::Reply(r), &mut out);
        }
        (wire, calls)
    }

    #[test]
    fn over_udp_a_cut_frame_costs_only_its_datagram() {
        use exproto_adapter::protocol::testing::{answer_ok, Harness};
        use exproto_adapter::protocol::ConnMeta;
        let udp = ConnMeta {
            socktype: SockType::Udp,
            ..ConnMeta::default()
        };
        let mut h = Harness::with(&BinProto, udp, Box::new(answer_ok));
        // A whole CONNECT, then a SUB that the datagram's end cuts short.
        let sub = frame(SUB, b"a/b");
        h.bytes(&[frame(CONNECT, b"dev1"), sub.slice(..4)].concat());
        // The rest of that SUB would have been the next datagram; it was
        // lost, and the next one starts with a frame of its own.
        h.bytes(&frame(PING, &[]));
        // A datagram announcing more than it holds.
        h.bytes(&[PUB, 0xff, 0xff, 0]);
        h.bytes(&[PING]);
        assert_eq!(
            h.take_output(),
            [
                frame(REPLY | CONNECT, &[OK]),
                frame(REPLY | SUB, &[BAD]),
                frame(REPLY | PING, &[]),
                frame(REPLY | PUB, &[BAD]),
                frame(REPLY | PING, &[BAD]),
            ]
            .concat()
        );
        assert_eq!(h.requests().len(), 1, "only the CONNECT reached EMQX");
    }

    #[test]
    fn a_session_answers_in_order_however_its_stream_is_cut() {
        use exproto_adapter::protocol::testing::{assert_same_at_every_split, transcript};
        use exproto_adapter::protocol::Request;
        let mut input = Vec::new();
        input.extend_from_slice(&frame(PING, &[]));
        input.extend_from_slice(&frame(SUB, b"a/b"));
        input.extend_from_slice(&frame(CONNECT, b"dev1"));
        input.extend_from_slice(&frame(SUB, b"a/b"));
        input.extend_from_slice(&frame(PUB, &topic_payload("a/b", b"\x00\x01")));
        let want = [
            frame(REPLY | PING, &[]),
            frame(REPLY | SUB, &[NOT_CONNECTED]),
            frame(REPLY | CONNECT, &[OK]),
            frame(REPLY | SUB, &[OK]),
            frame(REPLY | PUB, &[OK]),
        ]
        .concat();
        // The library's test kit: whole, cut in two at every byte, and
        // byte by byte, the same answers and calls.
        assert_same_at_every_split(&BinProto, &input);
        let (wire, requests) = transcript(&BinProto, &[&input]);
        assert_eq!(wire, want);
        assert_eq!(requests.len(), 3);
        assert_eq!(
            requests[2],
            Request::Call(Call::Publish {
                topic: "a/b".into(),
                qos: 0,
                payload: Bytes::from_static(b"\x00\x01")
            })
        );
    }

    #[test]
    fn a_refused_connect_grants_nothing() {
        let mut s = BinSession::default();
        let input = [frame(CONNECT, b"x"), frame(SUB, b"t")].concat();
        let (wire, calls) = run(
            &mut s,
            Event::Bytes(input.into()),
            &[CallResult::Denied("no".into())],
        );
        assert_eq!(
            wire,
            [
                frame(REPLY | CONNECT, &[REFUSED]),
                frame(REPLY | SUB, &[NOT_CONNECTED])
            ]
            .concat()
        );
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn messages_become_msg_frames_and_junk_closes() {
        let mut s = BinSession::default();
        let (wire, _) = run(
            &mut s,
            Event::Messages(vec![exproto_adapter::protocol::Message {
                topic: "t".into(),
                payload: Bytes::from_static(b"p"),
                ..Default::default()
            }]),
            &[],
        );
        assert_eq!(wire, frame(MSG, &topic_payload("t", b"p")).to_vec());
        let (_, calls) = run(&mut s, Event::Bytes(frame(0x7f, b"?")), &[]);
        assert_eq!(calls, vec![Call::Close]);
    }

    #[test]
    fn topics_follow_mqtt_rules() {
        let mut s = BinSession::default();
        let input = [
            frame(CONNECT, b"dev1"),
            frame(PUB, &topic_payload("a/+", b"x")),
            frame(PUB, &topic_payload("a\0b", b"x")),
            frame(SUB, b"a/#/b"),
            frame(SUB, b"a+"),
            frame(SUB, b"a/+/#"),
        ]
        .concat();
        let (wire, calls) = run(&mut s, Event::Bytes(input.into()), &[]);
        assert_eq!(
            wire,
            [
                frame(REPLY | CONNECT, &[OK]),
                frame(REPLY | PUB, &[BAD]),
                frame(REPLY | PUB, &[BAD]),
                frame(REPLY | SUB, &[BAD]),
                frame(REPLY | SUB, &[BAD]),
                frame(REPLY | SUB, &[OK]),
            ]
            .concat()
        );
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn a_peer_that_floods_a_waiting_session_is_closed() {
        let mut s = BinSession::default();
        let mut out = Vec::new();
        // CONNECT's call stays unanswered, so nothing after it is read.
        s.handle(Event::Bytes(frame(CONNECT, b"dev1")), &mut out);
        assert_eq!(out.len(), 1);
        out.clear();
        let big = frame(PUB, &topic_payload("t", &vec![0; MAX_BODY - 3]));
        s.handle(Event::Bytes(big.clone()), &mut out);
        s.handle(Event::Bytes(big.clone()), &mut out);
        assert!(out.is_empty());
        s.handle(Event::Bytes(big), &mut out);
        assert!(matches!(out.as_slice(), [Action::Call(Call::Close)]));
    }
}
