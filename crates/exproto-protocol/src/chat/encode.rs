//! Writes server lines into the session's output buffer.
//!
//! Lines are appended to one reused `BytesMut` rather than built one by one,
//! so a batch of replies or messages becomes a single send and costs no
//! allocation per line. Every variable part goes through the escapes.

use std::fmt;

use bytes::{BufMut, BytesMut};

use super::escape::{escape_into, Param};

/// The connection's first line.
pub(crate) const HELLO: &[u8] =
    b"HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]\n";

/// What `HELP` answers: every command, on one line.
pub(crate) const HELP_TEXT: &str = "CONNECT [clientid [username [password]]] (alias LOGIN); \
SUB filter [qos]; UNSUB filter; PUB topic [qos] :message; PING; HELP; QUIT [:reason]; \
WHO [prefix]; HISTORY topic [n]";

pub(crate) fn hello(out: &mut BytesMut) {
    out.put_slice(HELLO);
}

pub(crate) fn pong(out: &mut BytesMut) {
    out.put_slice(b"PONG\n");
}

pub(crate) fn bye(out: &mut BytesMut) {
    out.put_slice(b"BYE\n");
}

pub(crate) fn ok_help(out: &mut BytesMut) {
    out.put_slice(b"OK HELP :");
    escape_into(out, HELP_TEXT.as_bytes(), Param::Trailing);
    out.put_u8(b'\n');
}

/// `ERR <code> :<reason>`, the reason taken as bytes (EMQX's text).
pub(crate) fn err(out: &mut BytesMut, code: u16, reason: &[u8]) {
    err_start(out, code);
    escape_into(out, reason, Param::Trailing);
    out.put_u8(b'\n');
}

/// `ERR <code> :<reason>`, the reason taken from a `Display`.
pub(crate) fn err_display(out: &mut BytesMut, code: u16, reason: &dyn fmt::Display) {
    err_start(out, code);
    // Writing into a BytesMut cannot fail.
    let _ = fmt::write(&mut TrailingWriter(out), format_args!("{reason}"));
    out.put_u8(b'\n');
}

fn err_start(out: &mut BytesMut, code: u16) {
    out.put_slice(b"ERR ");
    push_u64(out, u64::from(code));
    out.put_slice(b" :");
}

/// `OK CONNECT <clientid>`.
pub(crate) fn ok_connect(out: &mut BytesMut, clientid: &str) {
    ok_with(out, b"CONNECT", clientid.as_bytes());
    out.put_u8(b'\n');
}

/// `OK SUB <filter> <qos>`.
pub(crate) fn ok_sub(out: &mut BytesMut, filter: &str, qos: u8) {
    ok_with(out, b"SUB", filter.as_bytes());
    out.put_u8(b' ');
    push_u64(out, u64::from(qos));
    out.put_u8(b'\n');
}

/// `OK UNSUB <filter>`.
pub(crate) fn ok_unsub(out: &mut BytesMut, filter: &str) {
    ok_with(out, b"UNSUB", filter.as_bytes());
    out.put_u8(b'\n');
}

/// `OK PUB <topic>`.
pub(crate) fn ok_pub(out: &mut BytesMut, topic: &[u8]) {
    ok_with(out, b"PUB", topic);
    out.put_u8(b'\n');
}

/// `OK HISTORY <topic> <count>`, after the `HIST` lines.
pub(crate) fn ok_history(out: &mut BytesMut, topic: &[u8], count: usize) {
    ok_with(out, b"HISTORY", topic);
    out.put_u8(b' ');
    push_u64(out, count as u64);
    out.put_u8(b'\n');
}

/// `OK WHO <total> :<id> <id> ...`, each id escaped as a middle parameter
/// so that the list splits on spaces.
pub(crate) fn ok_who<'a>(out: &mut BytesMut, total: u64, ids: impl IntoIterator<Item = &'a str>) {
    out.put_slice(b"OK WHO ");
    push_u64(out, total);
    out.put_slice(b" :");
    for (n, id) in ids.into_iter().enumerate() {
        if n > 0 {
            out.put_u8(b' ');
        }
        escape_into(out, id.as_bytes(), Param::Middle);
    }
    out.put_u8(b'\n');
}

/// `MSG <topic> <from> :<payload>`.
pub(crate) fn msg(out: &mut BytesMut, topic: &[u8], from: &[u8], payload: &[u8]) {
    out.put_slice(b"MSG ");
    delivered(out, topic, from);
    out.put_slice(b" :");
    escape_into(out, payload, Param::Trailing);
    out.put_u8(b'\n');
}

/// `HIST <topic> <from> <timestamp-ms> :<payload>`.
pub(crate) fn hist(
    out: &mut BytesMut,
    topic: &[u8],
    from: &[u8],
    timestamp_ms: u64,
    payload: &[u8],
) {
    out.put_slice(b"HIST ");
    delivered(out, topic, from);
    out.put_u8(b' ');
    push_u64(out, timestamp_ms);
    out.put_slice(b" :");
    escape_into(out, payload, Param::Trailing);
    out.put_u8(b'\n');
}

/// `<topic> <from>` of MSG and HIST. An empty publisher is written `-`; a
/// publisher whose clientid is `-` is escaped so the two stay apart.
fn delivered(out: &mut BytesMut, topic: &[u8], from: &[u8]) {
    escape_into(out, topic, Param::Middle);
    out.put_u8(b' ');
    match from {
        b"" => out.put_u8(b'-'),
        b"-" => out.put_slice(br"\x2D"),
        _ => escape_into(out, from, Param::Middle),
    }
}

fn ok_with(out: &mut BytesMut, verb: &[u8], middle: &[u8]) {
    out.put_slice(b"OK ");
    out.put_slice(verb);
    out.put_u8(b' ');
    escape_into(out, middle, Param::Middle);
}

fn push_u64(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

/// Escapes formatted text as a trailing parameter on its way into the line.
struct TrailingWriter<'a>(&'a mut BytesMut);

impl fmt::Write for TrailingWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s.as_bytes(), Param::Trailing);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::escape::unescape;
    use crate::chat::parser::parse_line;
    use proptest::prelude::*;

    fn text(f: impl FnOnce(&mut BytesMut)) -> String {
        let mut out = BytesMut::new();
        f(&mut out);
        String::from_utf8(out.to_vec()).expect("lines are UTF-8")
    }

    #[test]
    fn known_answers() {
        let cases: Vec<(String, &str)> = vec![
            (
                text(hello),
                "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]\n",
            ),
            (text(pong), "PONG\n"),
            (text(bye), "BYE\n"),
            (
                text(|o| err(o, 401, b"not authorized\nreally")),
                "ERR 401 :not authorized\\nreally\n",
            ),
            (
                text(|o| err_display(o, 413, &"line too long")),
                "ERR 413 :line too long\n",
            ),
            (text(|o| err(o, 500, b"")), "ERR 500 :\n"),
            (text(|o| ok_connect(o, "alice")), "OK CONNECT alice\n"),
            (text(|o| ok_connect(o, ":a b")), "OK CONNECT \\x3Aa\\sb\n"),
            (text(|o| ok_sub(o, "chat/+", 2)), "OK SUB chat/+ 2\n"),
            (text(|o| ok_sub(o, "a b", 0)), "OK SUB a\\sb 0\n"),
            (text(|o| ok_unsub(o, "#")), "OK UNSUB #\n"),
            (text(|o| ok_pub(o, b"t/1")), "OK PUB t/1\n"),
            (
                text(|o| msg(o, b"chat/lobby", b"alice", b"hello everyone")),
                "MSG chat/lobby alice :hello everyone\n",
            ),
            (text(|o| msg(o, b"t", b"", b"x")), "MSG t - :x\n"),
            (text(|o| msg(o, b"t", b"-", b"x")), "MSG t \\x2D :x\n"),
            (text(|o| msg(o, b"t", b"--", b"")), "MSG t -- :\n"),
            (
                text(|o| msg(o, b"a b", b":x", b"\xff\n:\\ ")),
                "MSG a\\sb \\x3Ax :\\xFF\\n:\\\\ \n",
            ),
            (
                text(|o| hist(o, b"t", b"", 1_700_000_000_123, b"hi")),
                "HIST t - 1700000000123 :hi\n",
            ),
            (text(|o| ok_history(o, b"t", 0)), "OK HISTORY t 0\n"),
            (text(|o| ok_who(o, 3, ["a", "b c"])), "OK WHO 3 :a b\\sc\n"),
            (text(|o| ok_who(o, 0, [])), "OK WHO 0 :\n"),
            (text(|o| push_u64(o, 0)), "0"),
            (text(|o| push_u64(o, u64::MAX)), "18446744073709551615"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn help_names_every_command() {
        let help = text(ok_help);
        assert!(help.starts_with("OK HELP :") && help.ends_with('\n'));
        assert_eq!(help.matches('\n').count(), 1);
        for verb in [
            "CONNECT", "LOGIN", "SUB", "UNSUB", "PUB", "PING", "HELP", "QUIT", "WHO", "HISTORY",
        ] {
            assert!(help.contains(verb), "{verb} missing from HELP");
        }
    }

    proptest! {
        /// A MSG line, read back with the client's own rules, gives the same
        /// topic, publisher and payload.
        #[test]
        fn msg_round_trips(
            topic in proptest::collection::vec(any::<u8>(), 1..32),
            from in proptest::collection::vec(any::<u8>(), 0..16),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let line = text(|o| msg(o, &topic, &from, &payload));
            let body = line.strip_suffix('\n').expect("ends with LF");
            prop_assert!(!body.contains('\n'));
            let parsed = parse_line(body.as_bytes()).expect("parses");
            prop_assert_eq!(parsed.verb, b"MSG");
            prop_assert_eq!(parsed.count(), 3);
            let p = parsed.params();
            prop_assert_eq!(&*unescape(p[0]), &topic[..]);
            let got_from = if p[1] == b"-" { Vec::new() } else { unescape(p[1]).into_owned() };
            prop_assert_eq!(got_from, from);
            prop_assert_eq!(&*unescape(p[2]), &payload[..]);
        }
    }
}
