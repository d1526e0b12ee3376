//! The chat line protocol (see the README's protocol section).

pub mod topic;

use bytes::Bytes;

use super::{Protocol, ProtocolConfig, Session, SessionInit};

/// The chat protocol's factory.
pub struct Chat {
    config: ProtocolConfig,
}

impl Chat {
    pub fn new(config: ProtocolConfig) -> Self {
        Self { config }
    }
}

impl Protocol for Chat {
    fn name(&self) -> &'static str {
        "chat"
    }
    fn new_session(&self, _init: SessionInit) -> Box<dyn Session> {
        let _ = &self.config;
        todo!("chat session")
    }
    fn lost_session_bytes(&self) -> Bytes {
        Bytes::from_static(b"ERR 500 :session lost, reconnect\n")
    }
}
