//! The embedded MQTT broker: MQTT 3.1.1 and 5 over TCP and over WebSocket,
//! as EMQX's `tcp:default` and `ws:default` listeners, so MQTT clients
//! (paho, mosquitto_pub, MQTT.js in a browser) join the chat clients'
//! rooms without a broker of their own.
//!
//! The broker is rmqtt, embedded as a library; the gateway joins it at
//! three points, as EMQX's MQTT and exproto channels share one broker:
//! - its hooks: an MQTT client's connect, disconnect and publish go to the
//!   ExHook server as EMQX reports them (`protocol` `mqtt`), and its
//!   publishes reach the chat clients' subscriptions with the publisher's
//!   clientid as `from`;
//! - its authentication and ACL hooks answer with the gateway's users file
//!   and deny rules, so they bind MQTT clients too;
//! - [`Broker::forward`]: what a chat client publishes reaches MQTT
//!   subscribers. rmqtt runs no publish hook for a forwarded message, so a
//!   message crosses once and never loops back.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError, Weak};

use anyhow::Context as _;
use rmqtt::codec::types::{Publish as CodecPublish, QoS};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::{Builder, Listener};
use rmqtt::server::MqttServer;
use rmqtt::session::Session;
use rmqtt::session::SessionState;
use rmqtt::types::SubscribeAclResult;
use rmqtt::types::{AuthResult, ClientId, From, Id, Publish, PublishAclResult, Reason};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::auth::Access;
use super::config::BrokerListen;
use super::exhook::{self, HookClient};
use super::message::make_message;
use crate::pb;

/// The listener ids rmqtt keys its settings by (its default is the port,
/// which is 0 for every listener a test binds on port 0).
const TCP_ID: u16 = 1;
const WS_ID: u16 = 2;

/// What the broker's hooks need of the gateway they are part of; the
/// gateway's shared state implements it, so this module needs nothing
/// above it.
pub(crate) trait Gateway: Send + Sync {
    fn access(&self) -> &Access;
    fn node(&self) -> &str;
    fn exhook(&self) -> Option<&HookClient>;
    /// Hands an MQTT client's message to the gateway's own subscribers.
    fn route(&self, msg: &pb::Message);
}

/// A running embedded broker.
pub(crate) struct Broker {
    scx: ServerContext,
    node: String,
    pub mqtt_addr: Option<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    /// Bound but not yet accepting: [`Broker::run`] takes them once the
    /// hooks are in place, so no client meets a broker without them.
    pending: Mutex<Option<MqttServer>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Broker {
    /// Binds the listeners. One that cannot be bound (a Mosquitto on
    /// 1883, say) is reported, with the flag that moves it, and left out;
    /// `None` when no listener is left.
    pub async fn bind(
        listen: BrokerListen,
        anonymous: bool,
        node: &str,
    ) -> anyhow::Result<Option<Broker>> {
        let scx = ServerContext::new().build().await;
        let mut server = MqttServer::new(scx.clone());
        let mut bound = 0;
        let mut mqtt_addr = None;
        let mut ws_addr = None;
        let wanted = [
            (listen.mqtt, "tcp", "--mqtt-listen", TCP_ID),
            (listen.ws, "ws", "--ws-listen", WS_ID),
        ];
        for (at, kind, flag, id) in wanted {
            let Some(at) = at else { continue };
            let listener = match bind_one(at, kind, anonymous) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(
                        "the embedded MQTT broker cannot listen for {kind} clients on {at}: {e:#}; \
                         running without that listener (choose another address with {flag} ADDR, \
                         or turn it off with {flag} off)"
                    );
                    continue;
                }
            };
            let addr = listener.local_addr().context("listener address")?;
            match kind {
                "tcp" => mqtt_addr = Some(addr),
                _ => ws_addr = Some(addr),
            }
            server = server.listener_by_id(listener, id);
            bound += 1;
        }
        if bound == 0 {
            return Ok(None);
        }
        Ok(Some(Broker {
            scx,
            node: node.to_owned(),
            mqtt_addr,
            ws_addr,
            pending: Mutex::new(Some(server.build())),
            task: Mutex::new(None),
        }))
    }

    /// Puts the gateway's hooks in and starts accepting until `stop`. The
    /// hooks hold the gateway weakly: the broker is part of it.
    pub async fn run(&self, gateway: Weak<dyn Gateway>, stop: CancellationToken) {
        let Some(server) = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let register = self.scx.extends.hook_mgr().register();
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientSubscribeCheckAcl,
            Type::MessagePublishCheckAcl,
            Type::ClientConnected,
            Type::ClientDisconnected,
            Type::MessagePublish,
        ] {
            register
                .add(
                    typ,
                    Box::new(Hooks {
                        gateway: gateway.clone(),
                    }),
                )
                .await;
        }
        register.start().await;
        // A gateway dropped without `shutdown` stops accepting too.
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                ran = server.run() => {
                    if let Err(e) = ran {
                        tracing::error!(error = %e, "the embedded MQTT broker stopped");
                    }
                }
            }
        });
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        tracing::info!(mqtt = ?self.mqtt_addr, ws = ?self.ws_addr, "embedded MQTT broker listening");
    }

    /// Delivers a message published through the gateway (a chat client's
    /// Publish, a RawPublish) to the broker's subscribers, as from
    /// `msg.from`.
    pub async fn forward(&self, msg: &pb::Message) {
        let qos = match msg.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let publish = Publish::from(CodecPublish {
            dup: false,
            retain: false,
            qos,
            topic: msg.topic.as_str().into(),
            packet_id: None,
            payload: msg.payload.clone(),
            properties: None,
        })
        .create_time(i64::try_from(msg.timestamp).unwrap_or(i64::MAX));
        let from = From::from_custom(Id::new(
            self.scx.node.id(),
            0,
            None,
            None,
            ClientId::from(msg.from.as_str()),
            None,
        ));
        if let Err(e) = SessionState::forwards(&self.scx, from, publish, false, None).await {
            tracing::warn!(topic = %msg.topic, error = %e, "cannot hand a message to the embedded MQTT broker");
        }
    }

    /// Stops accepting and disconnects every MQTT client.
    pub async fn stop(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
        let shared = self.scx.extends.shared().await;
        let mut entries: Vec<_> = shared.iter().collect();
        for entry in &mut entries {
            let _ = entry.kick(true, true, true).await;
        }
        tracing::debug!(node = %self.node, "embedded MQTT broker stopped");
    }
}

fn bind_one(at: SocketAddr, kind: &str, anonymous: bool) -> anyhow::Result<Listener> {
    let listener = Builder::new()
        .name(kind)
        .laddr(at)
        .allow_anonymous(anonymous)
        // Chat lines go up to 64 KiB; EMQX's default limit is 1 MiB.
        .max_packet_size(1 << 20)
        .bind()?;
    Ok(match kind {
        "tcp" => listener.tcp()?,
        _ => listener.ws()?,
    })
}

/// The gateway's side of rmqtt's hooks, one instance per hook type.
struct Hooks {
    gateway: Weak<dyn Gateway>,
}

#[async_trait::async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let Some(gw) = self.gateway.upgrade() else {
            return (true, acc);
        };
        match param {
            Parameter::ClientAuthenticate(info) => {
                let Some(users) = &gw.access().users else {
                    return (
                        false,
                        Some(HookResult::AuthResult(AuthResult::Allow(false, None))),
                    );
                };
                let username = info.username().map(|u| u.to_string()).unwrap_or_default();
                let password = info
                    .password()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default();
                let result = if users.check(&username, &password) {
                    AuthResult::Allow(false, None)
                } else {
                    tracing::info!(clientid = %info.id().client_id, username, "MQTT client refused: bad username or password");
                    AuthResult::BadUsernameOrPassword
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(_, sub) => {
                if gw.access().subscribe_denied(&sub.topic_filter) {
                    return (
                        false,
                        Some(HookResult::SubscribeAclResult(
                            SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized),
                        )),
                    );
                }
                (true, acc)
            }
            Parameter::MessagePublishCheckAcl(_, publish) => {
                if gw.access().publish_denied(&publish.topic) {
                    return (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            false, None,
                        ))),
                    );
                }
                (true, acc)
            }
            Parameter::ClientConnected(session) => {
                if let Some(hooks) = gw.exhook() {
                    hooks.connected(&client_info(&*gw, session));
                }
                (true, acc)
            }
            Parameter::ClientDisconnected(session, reason) => {
                if let Some(hooks) = gw.exhook() {
                    hooks.disconnected(client_info(&*gw, session), &emqx_reason(reason));
                }
                (true, acc)
            }
            // rmqtt runs this hook before its publish ACL check, EMQX after
            // its authorization: a denied message must not get this far.
            Parameter::MessagePublish(Some(_), _, publish)
                if gw.access().publish_denied(&publish.topic) =>
            {
                (true, acc)
            }
            Parameter::MessagePublish(Some(session), _, publish) => {
                // EMQX runs message.publish before it routes the message.
                let msg = make_message(
                    gw.node(),
                    &session.id.client_id,
                    &publish.topic,
                    u32::from(publish.qos.value()),
                    publish.payload.clone(),
                );
                if let Some(hooks) = gw.exhook() {
                    hooks.message_publish(&msg);
                }
                gw.route(&msg);
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// The `ClientInfo` EMQX's MQTT channel reports.
fn client_info(gw: &dyn Gateway, session: &Session) -> crate::exhook::pb::v3::ClientInfo {
    let id = &session.id;
    let peer = id
        .remote_addr
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut info = exhook::client_info(
        gw.node(),
        &id.client_id,
        id.username_ref(),
        "mqtt",
        peer,
        id.local_addr,
    );
    info.anonymous = id.username.is_none();
    info
}

/// The reason EMQX's MQTT channel gives `client.disconnected`.
fn emqx_reason(reason: &Reason) -> String {
    match reason {
        Reason::ConnectDisconnect(_) => "normal".to_owned(),
        Reason::ConnectRemoteClose => "tcp_closed".to_owned(),
        Reason::ConnectKeepaliveTimeout => "keepalive_timeout".to_owned(),
        Reason::ConnectKicked(_) => "kicked".to_owned(),
        other => other.to_string(),
    }
}
