//! MQTT mode: pub/sub through a real broker, one MQTT v5 session per
//! authenticated connection (client id = the connection's clientid), so MQTT
//! clients (mosquitto_sub, mosquitto_pub) and chat clients see each other.
//!
//! MQTT v3 carries no publisher id, so sessions put the publishing clientid
//! in the v5 user property `exproto-from`; a message from a plain MQTT client
//! arrives with an empty `from`, as EMQX would give for a publisher without
//! a clientid. Subscribe waits for the SUBACK so a message published right
//! after a successful Subscribe is not missed, and a broker's refusal comes
//! back as PERMISSION_DENY.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{self, QoS};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::config::MqttUrl;
use super::message::{make_message, DeliverTx};

/// The user property that carries the publisher's clientid.
const FROM_PROPERTY: &str = "exproto-from";
/// Largest packet either way; chat lines go up to 64 KiB.
const MAX_PACKET: u32 = 1 << 20;
/// How long connecting, subscribing and a clean disconnect may take.
const MQTT_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests a session buffers before a publish waits.
const REQUEST_CAPACITY: usize = 64;

/// Why a Subscribe through the broker failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubscribeError {
    #[error("refused by the broker: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

type SubWaiters = Arc<Mutex<VecDeque<oneshot::Sender<Result<(), SubscribeError>>>>>;

/// The broker's address and the gateway's own session, used for RawPublish.
pub(crate) struct MqttRouter {
    url: MqttUrl,
    node: String,
    raw: MqttSession,
}

impl MqttRouter {
    /// Connects the gateway's own session, so a broker that is not there
    /// fails the start instead of every later Authenticate.
    ///
    /// # Errors
    /// A bad URL or a broker that cannot be reached.
    pub async fn connect(url: &str, node: &str) -> anyhow::Result<Self> {
        let url = MqttUrl::parse(url)?;
        let clientid = format!("exproto-gateway-{:08x}", rand::random::<u32>());
        let raw = MqttSession::connect(&url, &clientid, node, None, None)
            .await
            .map_err(|e| anyhow::anyhow!("MQTT broker {url:?}: {e}"))?;
        Ok(Self {
            url,
            node: node.to_owned(),
            raw,
        })
    }

    /// Opens the session of one authenticated connection. `lost` runs if
    /// the broker drops the session later (e.g. another client took the
    /// clientid).
    pub async fn session(
        &self,
        clientid: &str,
        deliver: DeliverTx,
        lost: Box<dyn FnOnce() + Send>,
    ) -> Result<MqttSession, String> {
        MqttSession::connect(&self.url, clientid, &self.node, Some(deliver), Some(lost)).await
    }

    pub async fn raw_publish(
        &self,
        topic: &str,
        qos: u32,
        payload: bytes::Bytes,
    ) -> Result<(), String> {
        self.raw.publish("exproto", topic, qos, payload).await
    }
}

/// One MQTT session. Dropping it disconnects cleanly.
pub(crate) struct MqttSession {
    client: AsyncClient,
    waiters: SubWaiters,
    stop: CancellationToken,
}

impl Drop for MqttSession {
    fn drop(&mut self) {
        // The event loop sends the DISCONNECT; the token ends it if the
        // request queue was too full to take it.
        let _ = self.client.try_disconnect();
        self.stop.cancel();
    }
}

impl MqttSession {
    async fn connect(
        url: &MqttUrl,
        clientid: &str,
        node: &str,
        deliver: Option<DeliverTx>,
        lost: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<Self, String> {
        let mut opts = MqttOptions::new(clientid, url.host.clone(), url.port);
        opts.set_clean_start(true)
            .set_keep_alive(Duration::from_secs(60))
            .set_max_packet_size(Some(MAX_PACKET))
            .set_connection_timeout(MQTT_TIMEOUT.as_secs());
        if let Some((user, pass)) = &url.credentials {
            opts.set_credentials(user.clone(), pass.clone());
        }
        let (client, eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
        let waiters = SubWaiters::default();
        let stop = CancellationToken::new();
        let (connected_tx, connected_rx) = oneshot::channel();
        tokio::spawn(drive(Driver {
            eventloop,
            connected: Some(connected_tx),
            deliver,
            lost,
            node: node.to_owned(),
            waiters: waiters.clone(),
            stop: stop.clone(),
        }));
        let session = Self {
            client,
            waiters,
            stop,
        };
        match tokio::time::timeout(MQTT_TIMEOUT * 2, connected_rx).await {
            Ok(Ok(Ok(()))) => Ok(session),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err("session ended before CONNACK".to_owned()),
            Err(_) => Err("no CONNACK in time".to_owned()),
        }
    }

    pub async fn publish(
        &self,
        from: &str,
        topic: &str,
        qos: u32,
        payload: bytes::Bytes,
    ) -> Result<(), String> {
        let qos = to_qos(qos)?;
        let props = PublishProperties {
            user_properties: vec![(FROM_PROPERTY.to_owned(), from.to_owned())],
            ..PublishProperties::default()
        };
        let publish = self
            .client
            .publish_with_properties(topic, qos, false, payload, props);
        match tokio::time::timeout(MQTT_TIMEOUT, publish).await {
            Ok(res) => res.map_err(|e| e.to_string()),
            Err(_) => Err("MQTT session stalled".to_owned()),
        }
    }

    pub async fn subscribe(&self, filter: &str, qos: u32) -> Result<(), SubscribeError> {
        let qos = to_qos(qos).map_err(SubscribeError::Failed)?;
        let (tx, rx) = oneshot::channel();
        // Queued before the request, so the event loop finds it when the
        // SUBSCRIBE goes out and learns its packet id.
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(tx);
        let request = tokio::time::timeout(MQTT_TIMEOUT, self.client.subscribe(filter, qos));
        let sent = match request.await {
            Ok(res) => res.map_err(|e| e.to_string()),
            Err(_) => Err("MQTT session stalled".to_owned()),
        };
        if let Err(e) = sent {
            self.waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_back();
            return Err(SubscribeError::Failed(e));
        }
        match tokio::time::timeout(MQTT_TIMEOUT, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(SubscribeError::Failed("session ended".to_owned())),
            Err(_) => Err(SubscribeError::Failed("no SUBACK in time".to_owned())),
        }
    }

    pub async fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        match tokio::time::timeout(MQTT_TIMEOUT, self.client.unsubscribe(filter)).await {
            Ok(res) => res.map_err(|e| e.to_string()),
            Err(_) => Err("MQTT session stalled".to_owned()),
        }
    }
}

fn to_qos(qos: u32) -> Result<QoS, String> {
    u8::try_from(qos)
        .ok()
        .and_then(mqttbytes::qos)
        .ok_or_else(|| format!("bad qos {qos}"))
}

struct Driver {
    eventloop: EventLoop,
    connected: Option<oneshot::Sender<Result<(), String>>>,
    deliver: Option<DeliverTx>,
    lost: Option<Box<dyn FnOnce() + Send>>,
    node: String,
    waiters: SubWaiters,
    stop: CancellationToken,
}

/// Runs one session's event loop until it disconnects or fails.
async fn drive(mut d: Driver) {
    let mut by_pkid: HashMap<u16, oneshot::Sender<Result<(), SubscribeError>>> = HashMap::new();
    loop {
        let event = tokio::select! {
            ev = d.eventloop.poll() => ev,
            _ = d.stop.cancelled() => {
                // Give the DISCONNECT queued by Drop a moment to go out.
                let _ = tokio::time::timeout(MQTT_TIMEOUT, async {
                    while let Ok(ev) = d.eventloop.poll().await {
                        if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                            let _ = tokio::time::timeout(Duration::from_millis(200), d.eventloop.poll()).await;
                            break;
                        }
                    }
                })
                .await;
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if let Some(tx) = d.connected.take() {
                    let res = match ack.code {
                        ConnectReturnCode::Success => Ok(()),
                        code => Err(format!("connection refused: {code:?}")),
                    };
                    let _ = tx.send(res);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => deliver(&d, p),
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                let waiter = d
                    .waiters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                if let Some(w) = waiter {
                    by_pkid.insert(pkid, w);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if let Some(w) = by_pkid.remove(&ack.pkid) {
                    let res = match ack.return_codes.first() {
                        Some(SubscribeReasonCode::Success(_)) => Ok(()),
                        Some(code) => Err(SubscribeError::Refused(format!("{code:?}"))),
                        None => Err(SubscribeError::Failed("empty SUBACK".to_owned())),
                    };
                    let _ = w.send(res);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = tokio::time::timeout(Duration::from_millis(200), d.eventloop.poll()).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                match d.connected.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    None => {
                        tracing::info!(error = %e, "MQTT session lost");
                        if let Some(lost) = d.lost.take() {
                            lost();
                        }
                    }
                }
                return;
            }
        }
    }
}

fn deliver(d: &Driver, p: Publish) {
    let Some(tx) = &d.deliver else { return };
    let from = p
        .properties
        .as_ref()
        .and_then(|props| {
            props
                .user_properties
                .iter()
                .find(|(k, _)| k == FROM_PROPERTY)
                .map(|(_, v)| v.as_str())
        })
        .unwrap_or_default();
    let topic = String::from_utf8_lossy(&p.topic);
    let msg = make_message(&d.node, from, &topic, p.qos as u32, p.payload.clone());
    if tx.try_send(msg).is_err() {
        tracing::warn!("delivery queue full or closed, MQTT message dropped");
    }
}
