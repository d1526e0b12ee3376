//! Pub/sub: the in-memory router (the default) or a real MQTT broker (see
//! `mqtt.rs`).
//!
//! Delivery is into each subscriber's bounded delivery queue; a full queue
//! drops the message with a warning, like EMQX's bounded message queue,
//! rather than making the publisher wait on a slow subscriber.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use tokio::sync::mpsc;

use super::message::DeliverTx;
use super::mqtt::MqttRouter;
use crate::pb;
use crate::protocol::topic;

pub(crate) enum Router {
    Memory(MemoryRouter),
    Mqtt(MqttRouter),
}

/// EMQX's exproto channel delivers with the publish qos, so only the
/// queue is kept per subscription.
struct Subscriber {
    tx: DeliverTx,
}

/// Subscriptions by filter, then by connection sequence number.
#[derive(Default)]
pub(crate) struct MemoryRouter {
    table: RwLock<HashMap<String, HashMap<u64, Subscriber>>>,
}

impl MemoryRouter {
    pub fn subscribe(&self, conn: u64, filter: &str, tx: DeliverTx) {
        self.table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(filter.to_owned())
            .or_default()
            .insert(conn, Subscriber { tx });
    }

    pub fn unsubscribe(&self, conn: u64, filter: &str) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(subs) = table.get_mut(filter) {
            subs.remove(&conn);
            if subs.is_empty() {
                table.remove(filter);
            }
        }
    }

    pub fn unsubscribe_all<'a>(&self, conn: u64, filters: impl IntoIterator<Item = &'a String>) {
        for f in filters {
            self.unsubscribe(conn, f);
        }
    }

    /// Delivers one copy per matching subscription (EMQX delivers a copy
    /// for each of a client's overlapping subscriptions). Returns how many
    /// copies were queued.
    pub fn publish(&self, msg: &pb::Message) -> usize {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let mut queued = 0;
        for (filter, subs) in table.iter() {
            if !topic::matches(filter, &msg.topic) {
                continue;
            }
            for (conn, sub) in subs {
                match sub.tx.try_send(msg.clone()) {
                    Ok(()) => queued += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(conn, filter, "delivery queue full, message dropped");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        queued
    }

    #[cfg(test)]
    fn filters(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_gateway::message::make_message;

    #[tokio::test]
    async fn routes_by_filter_with_one_copy_per_subscription() {
        let r = MemoryRouter::default();
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        r.subscribe(1, "chat/#", tx1.clone());
        r.subscribe(1, "chat/+", tx1);
        r.subscribe(2, "other", tx2);
        let m = make_message(
            "n",
            "alice",
            "chat/lobby",
            1,
            bytes::Bytes::from_static(b"hi"),
        );
        assert_eq!(r.publish(&m), 2);
        assert_eq!(rx1.recv().await.unwrap().payload, &b"hi"[..]);
        assert_eq!(rx1.recv().await.unwrap().from, "alice");
        assert!(rx2.try_recv().is_err());
        r.unsubscribe_all(1, &["chat/#".to_owned(), "chat/+".to_owned()]);
        assert_eq!(r.publish(&m), 0);
        assert_eq!(r.filters(), 1);
    }

    #[test]
    fn delivers_by_mqtt_matching_rules() {
        let table = [
            ("a/b/c", "a/b/c", true),
            ("a/b/c", "a/+/c", true),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/b/c", "#", true),
            ("a/b/c", "+/+/+", true),
            ("a/b/c", "+/+", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("a/b/c", "a/+", false),
            ("/finance", "+/+", true),
            ("/finance", "/+", true),
            ("/finance", "+", false),
            ("a//c", "a/+/c", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("$SYS/x", "$SYS/+", true),
            ("a/$b", "a/+", true),
            ("chat/lobby", "chat/lobby/", false),
            ("Chat", "chat", false),
        ];
        for (name, filter, want) in table {
            let r = MemoryRouter::default();
            let (tx, _rx) = mpsc::channel(1);
            r.subscribe(1, filter, tx);
            let m = make_message("n", "", name, 0, bytes::Bytes::new());
            assert_eq!(r.publish(&m), usize::from(want), "{name} vs {filter}");
        }
    }

    #[test]
    fn full_queues_drop_instead_of_blocking() {
        let r = MemoryRouter::default();
        let (tx, _rx) = mpsc::channel(1);
        r.subscribe(1, "t", tx);
        let m = make_message("n", "", "t", 0, bytes::Bytes::new());
        assert_eq!(r.publish(&m), 1);
        assert_eq!(r.publish(&m), 0);
    }
}
