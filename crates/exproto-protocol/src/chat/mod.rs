//! The chat line protocol: text commands over raw TCP, one reply per line.
//!
//! Bytes are framed into lines ([`crate::framer`]), each line is
//! parsed (`parser`) into a typed command (`command`), and the session
//! (`session`) turns commands into EMQX calls and reply lines (`encode`,
//! `escape`). Topic rules are the crate's [`crate::topic`].
//!
//! Where the protocol text is silent, this implementation decides:
//! - a wrong number of parameters answers `ERR 400 :usage: <synopsis>`;
//! - a backslash that does not start a known escape (including `\x` not
//!   followed by two hex digits, and a final `\`) stands for itself;
//! - escapes apply to numbers too; a qos or count is decimal digits only,
//!   leading zeros allowed;
//! - spaces and tabs after the last middle parameter are ignored, while a
//!   trailing parameter keeps everything after its `:`;
//! - a CONNECT without a clientid (or with an empty one) authenticates as
//!   `chat-` and 16 hex digits of the session's seed, the same on a retry;
//! - a topic name or filter is at most 65,535 bytes (MQTT's limit);
//! - EMQX's failures are worded by the adapter, not passed on (EMQX's texts
//!   are printed Erlang terms): a refused CONNECT is `ERR 401 :authentication
//!   refused`, a refused SUB/PUB `ERR 403 :not authorized`, other failures
//!   `ERR 500 :gateway failed`, no answer `ERR 503 :emqx unreachable`.

mod command;
mod encode;
mod escape;
pub mod fuzz;
mod parser;
mod session;

use bytes::Bytes;

use super::state::{Reader, StateError};
use super::{ProtoVer, Protocol, ProtocolConfig, Refusal, Session, SessionInit};

/// What EMQX is told in `proto_ver`, and what HELLO names.
pub(crate) const PROTO_VER: ProtoVer = ProtoVer {
    name: "chat",
    version: "1",
};

/// The chat protocol's factory.
pub struct Chat {
    config: ProtocolConfig,
}

impl Chat {
    /// A chat protocol whose sessions follow `config`'s limits and timers.
    pub fn new(config: ProtocolConfig) -> Self {
        Self { config }
    }
}

impl Protocol for Chat {
    fn name(&self) -> &'static str {
        PROTO_VER.name
    }
    fn new_session(&self, init: SessionInit) -> Box<dyn Session> {
        Box::new(session::ChatSession::new(self.config.clone(), init))
    }
    fn restore(&self, r: &mut Reader<'_>) -> Result<Box<dyn Session>, StateError> {
        Ok(Box::new(session::ChatSession::restore(
            self.config.clone(),
            r,
        )?))
    }
    fn lost_session_bytes(&self) -> Bytes {
        Bytes::from_static(crate::LOST_SESSION_LINE)
    }
    fn refusal_bytes(&self, refusal: Refusal) -> Bytes {
        crate::refusal_line(refusal)
    }
}
