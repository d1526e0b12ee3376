//! Client commands, typed, and the reasons a command is refused.
//!
//! [`Command::from_line`] makes only the first round of checks the protocol
//! orders (unknown verb, parameter counts, qos and count ranges: all 400).
//! Values stay escaped and unchecked so that 401 and 501 can answer before
//! a value is even looked at; the session then checks values with
//! [`text_value`] and the topic rules.

use std::borrow::Cow;

use super::escape::unescape;
use super::parser::Line;
use crate::topic::TopicError;

/// The `HISTORY` count when none is given (or the maximum, if lower).
pub(crate) const HISTORY_DEFAULT: usize = 20;

/// A client command. Byte slices are parameters as sent: still escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command<'a> {
    /// `CONNECT` or its alias `LOGIN`; both answer `OK CONNECT`.
    Connect {
        clientid: Option<&'a [u8]>,
        username: Option<&'a [u8]>,
        password: Option<&'a [u8]>,
    },
    Sub {
        filter: &'a [u8],
        qos: u8,
    },
    Unsub {
        filter: &'a [u8],
    },
    Pub {
        topic: &'a [u8],
        qos: u8,
        message: &'a [u8],
    },
    Ping,
    Help,
    Quit,
    Who {
        prefix: Option<&'a [u8]>,
    },
    History {
        topic: &'a [u8],
        count: usize,
    },
}

/// Why a command gets an `ERR` line instead of running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Reject {
    #[error("unknown command")]
    UnknownCommand,
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("qos must be 0, 1 or 2")]
    BadQos,
    #[error("count must be 1 to {0}")]
    BadCount(usize),
    #[error("invalid utf-8")]
    InvalidUtf8,
    #[error("malformed line")]
    Malformed,
    #[error("{0} must be utf-8 without NUL")]
    BadText(&'static str),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("not connected")]
    NotConnected,
    #[error("no subscription matches the topic")]
    NotSubscribed,
    #[error("not enabled")]
    NotEnabled,
    #[error("too many subscriptions")]
    TooManySubscriptions,
    #[error("too many publishes per second")]
    TooManyPublishes,
    #[error("already connected")]
    AlreadyConnected,
    #[error("clientid not allowed for this user")]
    ClientidNotAllowed,
    #[error("line too long")]
    LineTooLong,
    #[error("login timeout")]
    LoginTimeout,
}

impl Reject {
    /// The code on the `ERR` line.
    pub(crate) fn code(&self) -> u16 {
        match self {
            Self::UnknownCommand
            | Self::Usage(_)
            | Self::BadQos
            | Self::BadCount(_)
            | Self::InvalidUtf8
            | Self::Malformed
            | Self::BadText(_)
            | Self::Topic(_) => 400,
            Self::NotConnected => 401,
            Self::NotSubscribed | Self::ClientidNotAllowed => 403,
            Self::LoginTimeout => 408,
            Self::AlreadyConnected => 409,
            Self::LineTooLong => 413,
            Self::TooManySubscriptions | Self::TooManyPublishes => 429,
            Self::NotEnabled => 501,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Connect,
    Sub,
    Unsub,
    Pub,
    Ping,
    Help,
    Quit,
    Who,
    History,
}

impl Verb {
    /// Case-insensitive lookup without allocating: the verb is upper-cased
    /// into a stack buffer as long as the longest verb.
    fn parse(raw: &[u8]) -> Option<Self> {
        let mut buf = [0u8; 7];
        let upper = buf.get_mut(..raw.len())?;
        for (d, s) in upper.iter_mut().zip(raw) {
            *d = s.to_ascii_uppercase();
        }
        Some(match &*upper {
            b"CONNECT" | b"LOGIN" => Self::Connect,
            b"SUB" => Self::Sub,
            b"UNSUB" => Self::Unsub,
            b"PUB" => Self::Pub,
            b"PING" => Self::Ping,
            b"HELP" => Self::Help,
            b"QUIT" => Self::Quit,
            b"WHO" => Self::Who,
            b"HISTORY" => Self::History,
            _ => return None,
        })
    }

    fn usage(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT [clientid [username [password]]]",
            Self::Sub => "SUB filter [qos]",
            Self::Unsub => "UNSUB filter",
            Self::Pub => "PUB topic [qos] :message",
            Self::Ping => "PING",
            Self::Help => "HELP",
            Self::Quit => "QUIT [:reason]",
            Self::Who => "WHO [prefix]",
            Self::History => "HISTORY topic [n]",
        }
    }

    /// How many parameters the verb takes, at least and at most.
    fn arity(self) -> (usize, usize) {
        match self {
            Self::Connect => (0, 3),
            Self::Sub => (1, 2),
            Self::Unsub => (1, 1),
            Self::Pub => (2, 3),
            Self::Ping | Self::Help => (0, 0),
            Self::Quit | Self::Who => (0, 1),
            Self::History => (1, 2),
        }
    }
}

impl<'a> Command<'a> {
    /// The command a parsed line names, after the syntax-level checks.
    /// `history_max` is the largest `HISTORY` count accepted (at least 1).
    ///
    /// # Errors
    /// [`Reject::UnknownCommand`], [`Reject::Usage`] for a wrong number of
    /// parameters, [`Reject::BadQos`], [`Reject::BadCount`].
    pub(crate) fn from_line(line: &Line<'a>, history_max: usize) -> Result<Self, Reject> {
        let verb = Verb::parse(line.verb).ok_or(Reject::UnknownCommand)?;
        let (min, max) = verb.arity();
        if !(min..=max).contains(&line.count()) {
            return Err(Reject::Usage(verb.usage()));
        }
        let p = line.params();
        let get = |i: usize| p.get(i).copied();
        // The arity check guarantees the parameters indexed below exist;
        // `get` keeps that an invariant rather than a panic.
        let first = get(0).unwrap_or_default();
        Ok(match verb {
            Verb::Connect => Self::Connect {
                clientid: get(0),
                username: get(1),
                password: get(2),
            },
            Verb::Sub => Self::Sub {
                filter: first,
                qos: get(1).map_or(Ok(0), qos)?,
            },
            Verb::Unsub => Self::Unsub { filter: first },
            Verb::Pub => match *p {
                // The last parameter is always the message.
                [topic, message] => Self::Pub {
                    topic,
                    qos: 0,
                    message,
                },
                [topic, q, message] => Self::Pub {
                    topic,
                    qos: qos(q)?,
                    message,
                },
                _ => return Err(Reject::Usage(verb.usage())),
            },
            Verb::Ping => Self::Ping,
            Verb::Help => Self::Help,
            Verb::Quit => Self::Quit,
            Verb::Who => Self::Who { prefix: get(0) },
            Verb::History => {
                let max = history_max.max(1);
                Self::History {
                    topic: first,
                    count: match get(1) {
                        None => HISTORY_DEFAULT.min(max),
                        Some(raw) => number(raw)
                            .and_then(|n| usize::try_from(n).ok())
                            .filter(|n| (1..=max).contains(n))
                            .ok_or(Reject::BadCount(max))?,
                    },
                }
            }
        })
    }

    /// Whether the command is refused before a successful CONNECT.
    pub(crate) fn needs_connection(&self) -> bool {
        !matches!(
            self,
            Self::Connect { .. } | Self::Ping | Self::Help | Self::Quit
        )
    }
}

fn qos(raw: &[u8]) -> Result<u8, Reject> {
    match number(raw) {
        Some(n @ 0..=2) => Ok(n as u8),
        _ => Err(Reject::BadQos),
    }
}

/// A decimal number. Escapes apply to every parameter, numbers included.
fn number(raw: &[u8]) -> Option<u64> {
    let digits = unescape(raw);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

/// An unescaped parameter that must be text (topic, filter, clientid,
/// username, password): UTF-8 and no NUL.
///
/// # Errors
/// [`Reject::BadText`] naming `what`.
pub(crate) fn text_value<'a>(raw: &'a [u8], what: &'static str) -> Result<Cow<'a, str>, Reject> {
    let bad = || Reject::BadText(what);
    let text = match unescape(raw) {
        Cow::Borrowed(b) => Cow::Borrowed(std::str::from_utf8(b).map_err(|_| bad())?),
        Cow::Owned(v) => Cow::Owned(String::from_utf8(v).map_err(|_| bad())?),
    };
    if text.contains('\0') {
        return Err(bad());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::parser::parse_line;

    fn cmd(input: &str) -> Result<Command<'_>, Reject> {
        Command::from_line(&parse_line(input.as_bytes()).expect("not blank"), 100)
    }

    #[test]
    fn known_answers() {
        use Command::*;
        let cases: &[(&str, Result<Command<'_>, Reject>)] = &[
            (
                "CONNECT",
                Ok(Connect {
                    clientid: None,
                    username: None,
                    password: None,
                }),
            ),
            (
                "login alice",
                Ok(Connect {
                    clientid: Some(b"alice"),
                    username: None,
                    password: None,
                }),
            ),
            (
                "Connect a u :p w",
                Ok(Connect {
                    clientid: Some(b"a"),
                    username: Some(b"u"),
                    password: Some(b"p w"),
                }),
            ),
            (
                "CONNECT a u p x",
                Err(Reject::Usage("CONNECT [clientid [username [password]]]")),
            ),
            (
                "SUB a/b",
                Ok(Sub {
                    filter: b"a/b",
                    qos: 0,
                }),
            ),
            (
                "sub a/b 2",
                Ok(Sub {
                    filter: b"a/b",
                    qos: 2,
                }),
            ),
            (
                "SUB a/b :1",
                Ok(Sub {
                    filter: b"a/b",
                    qos: 1,
                }),
            ),
            (
                "SUB a/b 02",
                Ok(Sub {
                    filter: b"a/b",
                    qos: 2,
                }),
            ),
            (
                r"SUB a/b \x31",
                Ok(Sub {
                    filter: b"a/b",
                    qos: 1,
                }),
            ),
            ("SUB a/b 3", Err(Reject::BadQos)),
            ("SUB a/b -1", Err(Reject::BadQos)),
            ("SUB a/b x", Err(Reject::BadQos)),
            ("SUB a/b :", Err(Reject::BadQos)),
            ("SUB a/b 99999999999999999999999", Err(Reject::BadQos)),
            ("SUB", Err(Reject::Usage("SUB filter [qos]"))),
            ("SUB a 1 2", Err(Reject::Usage("SUB filter [qos]"))),
            ("UNSUB a", Ok(Unsub { filter: b"a" })),
            ("UNSUB", Err(Reject::Usage("UNSUB filter"))),
            ("UNSUB a b", Err(Reject::Usage("UNSUB filter"))),
            (
                "PUB t 1",
                Ok(Pub {
                    topic: b"t",
                    qos: 0,
                    message: b"1",
                }),
            ),
            (
                "PUB t 1 :hi",
                Ok(Pub {
                    topic: b"t",
                    qos: 1,
                    message: b"hi",
                }),
            ),
            (
                "PUB t 1 hi",
                Ok(Pub {
                    topic: b"t",
                    qos: 1,
                    message: b"hi",
                }),
            ),
            (
                "PUB t :",
                Ok(Pub {
                    topic: b"t",
                    qos: 0,
                    message: b"",
                }),
            ),
            (
                "PUB t :hello world",
                Ok(Pub {
                    topic: b"t",
                    qos: 0,
                    message: b"hello world",
                }),
            ),
            ("PUB t hello world", Err(Reject::BadQos)),
            ("PUB t 3 :x", Err(Reject::BadQos)),
            ("PUB t", Err(Reject::Usage("PUB topic [qos] :message"))),
            ("PUB", Err(Reject::Usage("PUB topic [qos] :message"))),
            (
                "PUB t 1 2 3",
                Err(Reject::Usage("PUB topic [qos] :message")),
            ),
            ("PING", Ok(Ping)),
            ("pInG", Ok(Ping)),
            ("PING :", Err(Reject::Usage("PING"))),
            ("PING x", Err(Reject::Usage("PING"))),
            ("HELP", Ok(Help)),
            ("HELP x", Err(Reject::Usage("HELP"))),
            ("QUIT", Ok(Quit)),
            ("QUIT :bye all", Ok(Quit)),
            ("QUIT a b", Err(Reject::Usage("QUIT [:reason]"))),
            ("WHO", Ok(Who { prefix: None })),
            (
                "WHO al",
                Ok(Who {
                    prefix: Some(b"al"),
                }),
            ),
            ("WHO a b", Err(Reject::Usage("WHO [prefix]"))),
            (
                "HISTORY t",
                Ok(History {
                    topic: b"t",
                    count: 20,
                }),
            ),
            (
                "HISTORY t 1",
                Ok(History {
                    topic: b"t",
                    count: 1,
                }),
            ),
            (
                "HISTORY t 100",
                Ok(History {
                    topic: b"t",
                    count: 100,
                }),
            ),
            ("HISTORY t 0", Err(Reject::BadCount(100))),
            ("HISTORY t 101", Err(Reject::BadCount(100))),
            ("HISTORY t 256", Err(Reject::BadCount(100))),
            ("HISTORY t x", Err(Reject::BadCount(100))),
            (
                "HISTORY t 99999999999999999999999",
                Err(Reject::BadCount(100)),
            ),
            ("HISTORY", Err(Reject::Usage("HISTORY topic [n]"))),
            ("NOPE", Err(Reject::UnknownCommand)),
            ("PINGS", Err(Reject::UnknownCommand)),
            ("CONNECTX", Err(Reject::UnknownCommand)),
            ("P", Err(Reject::UnknownCommand)),
            ("PİNG", Err(Reject::UnknownCommand)),
        ];
        for (input, want) in cases {
            assert_eq!(&cmd(input), want, "input {input:?}");
        }
    }

    #[test]
    fn the_history_maximum_is_configurable() {
        fn history(input: &str, max: usize) -> Result<Command<'_>, Reject> {
            Command::from_line(&parse_line(input.as_bytes()).expect("not blank"), max)
        }
        assert_eq!(
            history("HISTORY t 500", 500),
            Ok(Command::History {
                topic: b"t",
                count: 500
            })
        );
        assert_eq!(history("HISTORY t 501", 500), Err(Reject::BadCount(500)));
        // The default count never exceeds the maximum.
        assert_eq!(
            history("HISTORY t", 5),
            Ok(Command::History {
                topic: b"t",
                count: 5
            })
        );
        assert_eq!(history("HISTORY t 6", 5), Err(Reject::BadCount(5)));
    }

    #[test]
    fn codes() {
        assert_eq!(Reject::UnknownCommand.code(), 400);
        assert_eq!(Reject::Topic(TopicError::Empty).code(), 400);
        assert_eq!(Reject::NotConnected.code(), 401);
        assert_eq!(Reject::NotSubscribed.code(), 403);
        assert_eq!(Reject::BadCount(100).code(), 400);
        assert_eq!(Reject::BadCount(100).to_string(), "count must be 1 to 100");
        assert_eq!(Reject::LoginTimeout.code(), 408);
        assert_eq!(Reject::AlreadyConnected.code(), 409);
        assert_eq!(Reject::LineTooLong.code(), 413);
        assert_eq!(Reject::TooManySubscriptions.code(), 429);
        assert_eq!(Reject::NotEnabled.code(), 501);
    }

    #[test]
    fn text_values() {
        assert_eq!(text_value(b"alice", "clientid"), Ok(Cow::Borrowed("alice")));
        assert_eq!(
            text_value(br"a\sb\xC3\xA9", "clientid"),
            Ok(Cow::Owned("a bé".to_string()))
        );
        assert_eq!(
            text_value(br"a\x00", "topic"),
            Err(Reject::BadText("topic"))
        );
        assert_eq!(text_value(br"\xFF", "topic"), Err(Reject::BadText("topic")));
        assert_eq!(
            Reject::BadText("filter").to_string(),
            "filter must be utf-8 without NUL"
        );
    }

    #[test]
    fn needs_connection() {
        for (input, needs) in [
            ("CONNECT", false),
            ("LOGIN", false),
            ("PING", false),
            ("HELP", false),
            ("QUIT", false),
            ("SUB a", true),
            ("UNSUB a", true),
            ("PUB a b", true),
            ("WHO", true),
            ("HISTORY a", true),
        ] {
            assert_eq!(
                cmd(input).expect("valid").needs_connection(),
                needs,
                "{input}"
            );
        }
    }
}
