//! What a connection process's mailbox takes: the adapter's calls, each
//! with the channel its answer goes back on, and control messages from the
//! gateway. The adapter service, the registry and the fault controls write
//! to a mailbox; only the connection process reads one, so none of them
//! needs to know the others.

use tokio::sync::oneshot;

use crate::pb;
use crate::protocol::Secret;

/// Where a connection process answers one adapter call.
pub(crate) type Reply = oneshot::Sender<pb::CodeResponse>;

/// An adapter call or a control message for one connection process.
#[derive(Debug)]
pub(crate) enum ConnCmd {
    Send {
        bytes: bytes::Bytes,
        reply: Reply,
    },
    Close {
        reply: Reply,
    },
    Authenticate {
        clientinfo: pb::ClientInfo,
        password: Secret,
        reply: Reply,
    },
    StartTimer {
        interval: u32,
        reply: Reply,
    },
    Publish {
        topic: String,
        qos: u32,
        payload: bytes::Bytes,
        reply: Reply,
    },
    Subscribe {
        topic: String,
        qos: u32,
        reply: Reply,
    },
    Unsubscribe {
        topic: String,
        reply: Reply,
    },
    /// A newer connection authenticated with this one's clientid.
    Discard {
        done: oneshot::Sender<()>,
    },
    /// Closed from outside: management kick, or the MQTT session was lost.
    Kick,
}
