//! The `Message`s the gateway delivers and reports, filled as EMQX's exproto
//! channel fills them, and the queue each connection receives them on.
//! Connection processes, the adapter service and the MQTT router all make
//! them, so they stand apart from the routers that carry them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::pb;

/// A connection's delivery queue.
pub(crate) type DeliverTx = mpsc::Sender<pb::Message>;

/// A fresh message id: 128 bits in upper-case hex, like `emqx_guid`.
/// Microseconds, a per-process salt and a counter keep it unique.
fn new_message_id() -> String {
    static SALT: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let salt = *SALT.get_or_init(rand::random);
    let seq = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF;
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default();
    format!("{micros:016X}{salt:08X}{seq:08X}")
}

/// A message as EMQX's exproto channel hands it to `OnReceivedMessages`.
pub(crate) fn make_message(
    node: &str,
    from: &str,
    topic: &str,
    qos: u32,
    payload: bytes::Bytes,
) -> pb::Message {
    pb::Message {
        node: node.to_owned(),
        id: new_message_id(),
        qos,
        from: from.to_owned(),
        topic: topic.to_owned(),
        payload,
        timestamp: crate::store::now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_unique_hex() {
        let a = new_message_id();
        let b = new_message_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()));
    }
}
