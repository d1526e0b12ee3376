//! Splits one complete line into a verb and its parameters.
//!
//! The line has already been framed (no LF, no final CR) and checked to be
//! UTF-8. The parser only finds the pieces; it neither unescapes them nor
//! knows the verbs, so that every check happens in the order the protocol
//! gives (see `command` and `session`). Pieces borrow from the line.
//!
//! Grammar (RFC 5234 ABNF; the IRC convention):
//!
//! ```abnf
//! line     = *WSP verb *( 1*WSP middle ) ( 1*WSP ":" trailing / *WSP )
//! verb     = 1*nonwhite
//! middle   = nocolon *nonwhite
//! trailing = *OCTET      ; the rest of the line, spaces and tabs included
//! nonwhite = %x00-08 / %x0A-1F / %x21-FF   ; any octet but SP and HTAB
//! nocolon  = %x00-08 / %x0A-1F / %x21-39 / %x3B-FF
//! WSP      = SP / HTAB
//! ```
//!
//! A line of only `WSP` (or nothing) has no verb: it is [`ParseError::Blank`].
//! Every other line matches the grammar.

use nom::branch::alt;
use nom::bytes::complete::{tag, take_till1, take_while, take_while1};
use nom::combinator::{eof, rest};
use nom::multi::fold_many0;
use nom::sequence::preceded;
use nom::{IResult, Parser};

/// How many parameters a [`Line`] keeps. No command takes more than three;
/// one more is enough to tell "too many" while counting the rest.
const KEPT: usize = 4;

/// A parsed line. Parameters stay escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line<'a> {
    pub(crate) verb: &'a [u8],
    kept: [&'a [u8]; KEPT],
    /// All parameters, kept or not.
    count: usize,
}

impl<'a> Line<'a> {
    /// The parameters in order, the trailing one last; at most the first
    /// few (see [`Line::count`] for how many there were).
    pub(crate) fn params(&self) -> &[&'a [u8]] {
        &self.kept[..self.count.min(KEPT)]
    }

    /// How many parameters the line has, the trailing one included.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    fn push(mut self, param: &'a [u8]) -> Self {
        if let Some(slot) = self.kept.get_mut(self.count) {
            *slot = param;
        }
        self.count = self.count.saturating_add(1);
        self
    }
}

/// Why a line has no command in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// Nothing but spaces and tabs: the protocol ignores such a line.
    #[error("blank line")]
    Blank,
    /// Does not match the grammar. The grammar accepts every line that is
    /// not blank, so this is a safety net, not an expected outcome.
    #[error("malformed line")]
    Malformed,
}

type Res<'a, O> = IResult<&'a [u8], O, ()>;

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn wsp0(i: &[u8]) -> Res<'_, &[u8]> {
    take_while(is_wsp)(i)
}

/// `verb` and `middle`: a run of non-white octets. A middle that starts with
/// `:` never gets here because [`trailing`] is tried first.
fn word(i: &[u8]) -> Res<'_, &[u8]> {
    take_till1(is_wsp)(i)
}

fn trailing(i: &[u8]) -> Res<'_, &[u8]> {
    preceded(tag(&b":"[..]), rest).parse(i)
}

/// `1*WSP ( ":" trailing / middle )`.
fn param(i: &[u8]) -> Res<'_, &[u8]> {
    preceded(take_while1(is_wsp), alt((trailing, word))).parse(i)
}

/// Parses one complete line.
///
/// # Errors
/// [`ParseError::Blank`] for a line of only spaces and tabs.
pub(crate) fn parse_line(input: &[u8]) -> Result<Line<'_>, ParseError> {
    if input.iter().all(|&b| is_wsp(b)) {
        return Err(ParseError::Blank);
    }
    let (i, verb) = preceded(wsp0, word)
        .parse(input)
        .map_err(|_| ParseError::Malformed)?;
    let empty = Line {
        verb,
        kept: [&[]; KEPT],
        count: 0,
    };
    let (_, (line, _, _)) = (fold_many0(param, move || empty, Line::push), wsp0, eof)
        .parse(i)
        .map_err(|_| ParseError::Malformed)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Verb, kept parameters and parameter count, as text.
    type Parts = Result<(String, Vec<String>, usize), ParseError>;

    fn parts(input: &str) -> Parts {
        let line = parse_line(input.as_bytes())?;
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("utf-8");
        Ok((
            text(line.verb),
            line.params().iter().map(|p| text(p)).collect(),
            line.count(),
        ))
    }

    #[test]
    fn known_answers() {
        let ok = |verb: &str, params: &[&str]| {
            Ok((
                verb.to_string(),
                params.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                params.len(),
            ))
        };
        let cases: &[(&str, Parts)] = &[
            ("PING", ok("PING", &[])),
            ("ping", ok("ping", &[])),
            ("  \tPING", ok("PING", &[])),
            ("PING  \t ", ok("PING", &[])),
            ("PING :", ok("PING", &[""])),
            ("PING : ", ok("PING", &[" "])),
            ("SUB a/b 1", ok("SUB", &["a/b", "1"])),
            ("SUB \t a/b\t\t1  ", ok("SUB", &["a/b", "1"])),
            (
                "PUB t 1 :hello  world ",
                ok("PUB", &["t", "1", "hello  world "]),
            ),
            ("PUB t :: x", ok("PUB", &["t", ": x"])),
            ("PUB t a:b", ok("PUB", &["t", "a:b"])),
            ("PUB t:x", ok("PUB", &["t:x"])),
            ("QUIT :bye :now", ok("QUIT", &["bye :now"])),
            ("PUB t\t:\ttab", ok("PUB", &["t", "\ttab"])),
            (r"PUB a\sb :x\ny", ok("PUB", &[r"a\sb", r"x\ny"])),
            (":verb x", ok(":verb", &["x"])),
            ("a\rb c", ok("a\rb", &["c"])),
            ("", Err(ParseError::Blank)),
            ("   ", Err(ParseError::Blank)),
            ("\t \t", Err(ParseError::Blank)),
        ];
        for (input, want) in cases {
            assert_eq!(&parts(input), want, "input {input:?}");
        }
    }

    #[test]
    fn counts_parameters_beyond_those_kept() {
        let line = parse_line(b"X 1 2 3 4 5 6 :7 8").expect("parses");
        assert_eq!(line.count(), 7);
        assert_eq!(line.params(), &[b"1", b"2", b"3", b"4"]);
    }

    proptest! {
        #[test]
        fn every_line_that_is_not_blank_parses(
            input in proptest::collection::vec(
                prop_oneof![Just(b' '), Just(b'\t'), Just(b':'), Just(b'a'), any::<u8>()], 0..64),
        ) {
            match parse_line(&input) {
                Err(ParseError::Blank) => prop_assert!(input.iter().all(|&b| is_wsp(b))),
                Err(ParseError::Malformed) => prop_assert!(false, "malformed: {:?}", input),
                Ok(line) => {
                    prop_assert!(!line.verb.is_empty());
                    prop_assert!(!line.verb.iter().any(|&b| is_wsp(b)));
                    let n = line.count();
                    for (k, p) in line.params().iter().enumerate() {
                        if k + 1 < n {
                            prop_assert!(!p.is_empty() && !p.starts_with(b":"));
                            prop_assert!(!p.iter().any(|&b| is_wsp(b)));
                        }
                    }
                }
            }
        }
    }
}
