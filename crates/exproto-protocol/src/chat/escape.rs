//! The chat protocol's backslash escapes, in both directions.
//!
//! Input accepts `\\ \n \r \t \s \xHH` (hex in either case) and keeps any
//! other backslash literally, so a client typing a stray backslash is not
//! punished. Output escapes whatever could break a line or a parameter, plus
//! bytes that are not UTF-8, so that every payload, topic and clientid
//! survives a trip through the protocol and the line stays valid UTF-8.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};

/// Where a value goes in an output line; a middle parameter must not hold a
/// space nor start with `:`, or it would split or turn into the trailing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Param {
    Middle,
    Trailing,
}

/// Undoes the input escapes. Borrows when there is no backslash, which is
/// the common case, so plain parameters cost no allocation.
pub(crate) fn unescape(raw: &[u8]) -> Cow<'_, [u8]> {
    let Some(first) = memchr::memchr(b'\\', raw) else {
        return Cow::Borrowed(raw);
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw[..first]);
    let mut i = first;
    while i < raw.len() {
        if raw[i] != b'\\' {
            let next = memchr::memchr(b'\\', &raw[i..]).map_or(raw.len(), |n| i + n);
            out.extend_from_slice(&raw[i..next]);
            i = next;
            continue;
        }
        let (byte, used) = match raw.get(i + 1) {
            Some(b'\\') => (b'\\', 2),
            Some(b'n') => (b'\n', 2),
            Some(b'r') => (b'\r', 2),
            Some(b't') => (b'\t', 2),
            Some(b's') => (b' ', 2),
            Some(b'x') => match (
                raw.get(i + 2).and_then(|&h| hex_value(h)),
                raw.get(i + 3).and_then(|&l| hex_value(l)),
            ) {
                (Some(h), Some(l)) => (h << 4 | l, 4),
                // Not an escape after all: the backslash stands for itself.
                _ => (b'\\', 1),
            },
            _ => (b'\\', 1),
        };
        out.push(byte);
        i += used;
    }
    Cow::Owned(out)
}

/// Appends `value` to `out`, escaped for its place in the line.
pub(crate) fn escape_into(out: &mut BytesMut, value: &[u8], param: Param) {
    let middle = param == Param::Middle;
    for (n, chunk) in value.utf8_chunks().enumerate() {
        escape_valid(out, chunk.valid().as_bytes(), middle, n == 0);
        for &b in chunk.invalid() {
            push_hex(out, b);
        }
    }
}

fn escape_valid(out: &mut BytesMut, s: &[u8], middle: bool, at_start: bool) {
    let mut run = 0;
    for (i, &b) in s.iter().enumerate() {
        let short = match b {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            b' ' if middle => b's',
            b':' if middle && at_start && i == 0 => 0,
            0..=0x1f | 0x7f => 0,
            _ => continue,
        };
        out.extend_from_slice(&s[run..i]);
        run = i + 1;
        if short == 0 {
            push_hex(out, b);
        } else {
            out.put_slice(&[b'\\', short]);
        }
    }
    out.extend_from_slice(&s[run..]);
}

fn push_hex(out: &mut BytesMut, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.put_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 0xf)],
    ]);
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn esc(value: &[u8], param: Param) -> String {
        let mut out = BytesMut::new();
        escape_into(&mut out, value, param);
        String::from_utf8(out.to_vec()).expect("escaped output is UTF-8")
    }

    #[test]
    fn unescape_known_answers() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"plain", b"plain"),
            (br"a\\b", br"a\b"),
            (br"\n\r\t\s", b"\n\r\t "),
            (br"\x41\x6a\x6A\x00\xff\xFF", b"Ajj\0\xff\xff"),
            (br"hello\sworld", b"hello world"),
            // Unknown escapes and broken \x stay as they are.
            (br"\q", br"\q"),
            (br"\N", br"\N"),
            (br"\x", br"\x"),
            (br"\x4", br"\x4"),
            (br"\x4g", br"\x4g"),
            (br"\xg4", br"\xg4"),
            (br"end\", br"end\"),
            (br"\\\", br"\\"),
            (br"\\n", br"\n"),
            (br"\\\n", b"\\\n"),
            (br"\x5cn", br"\n"),
            ("é\\sü".as_bytes(), "é ü".as_bytes()),
        ];
        for (input, want) in cases {
            assert_eq!(
                &*unescape(input),
                *want,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn unescape_borrows_without_backslash() {
        assert!(matches!(unescape(b"no escapes here"), Cow::Borrowed(_)));
        assert!(matches!(unescape(br"one\s"), Cow::Owned(_)));
    }

    #[test]
    fn escape_known_answers() {
        use Param::{Middle, Trailing};
        let cases: &[(&[u8], Param, &str)] = &[
            (b"", Middle, ""),
            (b"chat/lobby", Middle, "chat/lobby"),
            (b"a b", Middle, r"a\sb"),
            (b"a b", Trailing, "a b"),
            (b":x", Middle, r"\x3Ax"),
            (b":x", Trailing, ":x"),
            (b"a:b", Middle, "a:b"),
            (b"\\", Middle, r"\\"),
            (b"\\", Trailing, r"\\"),
            (b"\n\r\t", Trailing, r"\n\r\t"),
            (b"\n\r\t", Middle, r"\n\r\t"),
            (b"\x00\x01\x1f\x7f", Trailing, r"\x00\x01\x1F\x7F"),
            (b"\xff\xfe", Trailing, r"\xFF\xFE"),
            ("héllo wörld".as_bytes(), Trailing, "héllo wörld"),
            ("héllo wörld".as_bytes(), Middle, r"héllo\swörld"),
            // A truncated UTF-8 sequence is escaped, the rest kept.
            (b"a\xc3", Trailing, r"a\xC3"),
            (b"\xc3:", Middle, r"\xC3:"),
            (b"-", Middle, "-"),
        ];
        for (value, param, want) in cases {
            assert_eq!(esc(value, *param), *want, "{value:?} as {param:?}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(value in proptest::collection::vec(any::<u8>(), 0..64)) {
            for param in [Param::Middle, Param::Trailing] {
                let escaped = esc(&value, param);
                prop_assert!(!escaped.contains(['\n', '\r', '\t']));
                if param == Param::Middle {
                    prop_assert!(!escaped.contains(' '));
                    prop_assert!(!escaped.starts_with(':'));
                }
                prop_assert_eq!(&*unescape(escaped.as_bytes()), &value[..]);
            }
        }

        #[test]
        fn unescape_never_grows(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert!(unescape(&raw).len() <= raw.len());
        }
    }
}
