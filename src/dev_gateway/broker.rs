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
//!   and deny rules, so they bind MQTT clients too (with a users file, an
//!   MQTT client's clientid must be its username or start with
//!   `username/`, the rule chat clients meet, so no one publishes under
//!   another's name; a will to a denied topic refuses the CONNECT, since
//!   rmqtt would send it unchecked);
//! - a takeover (a second client with the same clientid) is reported as
//!   EMQX reports it: the old session's `client.disconnected`
//!   (`takenover`) before the new one's `client.connected`, whatever order
//!   rmqtt's sessions end and start in;
//! - [`Broker::forward`]: what a chat client publishes reaches MQTT
//!   subscribers. rmqtt runs no publish hook for a forwarded message, so a
//!   message crosses once and never loops back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rmqtt::codec::types::{Publish as CodecPublish, QoS};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::{Builder, Listener};
use rmqtt::server::MqttServer;
use rmqtt::session::{Session, SessionState};
use rmqtt::types::{
    AuthResult, ClientId, ConnectInfo, From, Id, LastWill, Publish, PublishAclResult, Reason,
    SubscribeAclResult,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::auth::Access;
use super::config::BrokerListen;
use super::exhook::{self, HookClient};
use super::message::make_message;
use super::registry::Listed;
use crate::exhook::pb::v3 as hpb;
use crate::pb;
use crate::protocol::ClientidPolicy;

/// The listener ids rmqtt keys its settings by (its default is the port,
/// which is 0 for every listener a test binds on port 0).
const TCP_ID: u16 = 1;
const WS_ID: u16 = 2;
/// How long stopping waits for MQTT clients to be disconnected.
const KICK_TIMEOUT: Duration = Duration::from_secs(5);

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

/// An MQTT client as the hooks reported it connected.
struct Reported {
    info: hpb::ClientInfo,
    connected_at: SystemTime,
}

/// Which session holds each clientid, as reported to the hook server
/// (`K` is rmqtt's session id).
struct Holders<K, V> {
    by_clientid: HashMap<String, (K, V)>,
}

impl<K, V> Default for Holders<K, V> {
    fn default() -> Self {
        Self {
            by_clientid: HashMap::new(),
        }
    }
}

impl<K: PartialEq, V> Holders<K, V> {
    /// `session` now holds `clientid`; returns what the session it took
    /// over from had, to be reported gone first.
    fn connect(&mut self, clientid: &str, session: K, v: V) -> Option<V> {
        self.by_clientid
            .insert(clientid.to_owned(), (session, v))
            .map(|(_, old)| old)
    }

    /// `session` ended; returns what it had if it still held its
    /// clientid. A session that was taken over was reported then.
    fn disconnect(&mut self, clientid: &str, session: &K) -> Option<V> {
        match self.by_clientid.get(clientid) {
            Some((holder, _)) if holder == session => {
                self.by_clientid.remove(clientid).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.by_clientid.iter().map(|(c, (_, v))| (c, v))
    }

    fn sessions(&self) -> impl Iterator<Item = (&String, &K)> {
        self.by_clientid.iter().map(|(c, (k, _))| (c, k))
    }
}

/// What every hook instance shares.
#[derive(Default)]
struct State {
    /// Connected MQTT clients by clientid, as reported to the hook server.
    clients: Mutex<Holders<Id, Reported>>,
    /// Set when the gateway stops: like EMQX's node, it then closes its
    /// clients without reporting them.
    closing: AtomicBool,
}

/// A running embedded broker.
pub(crate) struct Broker {
    scx: ServerContext,
    state: Arc<State>,
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
    pub async fn bind(listen: BrokerListen) -> anyhow::Result<Option<Broker>> {
        // rmqtt's busy check refuses every CONNECT while the host's load
        // average is high, which a busy test machine would trip.
        let scx = ServerContext::new().busy_check_enable(false).build().await;
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
            let listener = match bind_one(at, kind) {
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
            state: Arc::default(),
            mqtt_addr,
            ws_addr,
            pending: Mutex::new(Some(server.build())),
            task: Mutex::new(None),
        }))
    }

    /// Puts the gateway's hooks in and starts accepting until `stop`; then
    /// disconnects every MQTT client (unreported, as EMQX's node does when
    /// it stops). The hooks hold the gateway weakly: the broker is part of
    /// it.
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
            let hooks = Hooks {
                gateway: gateway.clone(),
                state: self.state.clone(),
            };
            register.add(typ, Box::new(hooks)).await;
        }
        register.start().await;
        let scx = self.scx.clone();
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            let mut serving = Box::pin(server.run());
            tokio::select! {
                _ = stop.cancelled() => {}
                ran = &mut serving => {
                    if let Err(e) = ran {
                        tracing::error!(error = %e, "the embedded MQTT broker stopped");
                    }
                    stop.cancelled().await;
                }
            }
            // Dropping the listeners' loop stops accepting; the sessions
            // run on tasks of their own, so each is closed.
            drop(serving);
            state.closing.store(true, Ordering::Relaxed);
            kick_all(&scx).await;
        });
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        tracing::info!(mqtt = ?self.mqtt_addr, ws = ?self.ws_addr, "embedded MQTT broker listening");
    }

    /// The MQTT clients connected now, as the hook server was told, by
    /// clientid: for the REST API stand-in's `/api/v5/clients`.
    ///
    /// rmqtt reports a connect before its CONNACK goes out, and a session
    /// that fails in between never runs, so it never reports its end:
    /// such a client is reported gone (`tcp_closed`) here, as EMQX's
    /// connection process would on its way down.
    pub async fn connected_clients(&self, gateway: &dyn Gateway) -> Vec<Listed> {
        let held: Vec<(String, Id)> = self
            .state
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sessions()
            .map(|(c, id)| (c.clone(), id.clone()))
            .collect();
        let mut dead = Vec::new();
        {
            let shared = self.scx.extends.shared().await;
            for (clientid, id) in held {
                let entry = shared.entry(id.clone());
                let alive =
                    entry.id_same() == Some(true) && entry.tx().is_some_and(|tx| !tx.is_closed());
                if !alive {
                    dead.push((clientid, id));
                }
            }
        }
        let mut clients = self
            .state
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (clientid, id) in dead {
            if let Some(gone) = clients.disconnect(&clientid, &id) {
                if let Some(hooks) = gateway.exhook() {
                    hooks.disconnected(gone.info, "tcp_closed");
                }
            }
        }
        let mut listed: Vec<Listed> = clients
            .iter()
            .map(|(clientid, r)| Listed {
                clientid: clientid.clone(),
                username: r.info.username.clone(),
                connected_at: r.connected_at,
            })
            .collect();
        listed.sort_by(|a, b| a.clientid.cmp(&b.clientid));
        listed
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

    /// Waits (bounded) until the broker, told to stop by the gateway's
    /// shutdown token, has closed its listeners and its clients.
    pub async fn stopped(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            if tokio::time::timeout(KICK_TIMEOUT * 2, task).await.is_err() {
                tracing::warn!("the embedded MQTT broker did not stop in time");
            }
        }
    }
}

/// Disconnects every MQTT client at once, bounded.
async fn kick_all(scx: &ServerContext) {
    let mut entries: Vec<_> = scx.extends.shared().await.iter().collect();
    let kicks = futures::future::join_all(
        entries
            .iter_mut()
            .map(|entry| async move { entry.kick(true, true, true).await.is_ok() }),
    );
    match tokio::time::timeout(KICK_TIMEOUT, kicks).await {
        Ok(done) => tracing::debug!(
            clients = done.len(),
            "embedded MQTT broker closed its clients"
        ),
        Err(_) => tracing::warn!("the embedded MQTT broker's clients did not all close in time"),
    }
}

fn bind_one(at: SocketAddr, kind: &str) -> anyhow::Result<Listener> {
    let listener = Builder::new()
        .name(kind)
        .laddr(at)
        // Every CONNECT meets the authentication hook, which lets anyone
        // in without a users file.
        .allow_anonymous(false)
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
    state: Arc<State>,
}

#[async_trait::async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let Some(gw) = self.gateway.upgrade() else {
            return (true, acc);
        };
        match param {
            Parameter::ClientAuthenticate(info) => {
                let result = if self.state.closing.load(Ordering::Relaxed) {
                    AuthResult::NotAuthorized
                } else {
                    authenticate(gw.access(), info)
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
                self.connected(&*gw, session);
                (true, acc)
            }
            Parameter::ClientDisconnected(session, reason) => {
                self.disconnected(&*gw, session, reason);
                (true, acc)
            }
            // rmqtt runs this hook before its publish ACL check, EMQX after
            // its authorization: a denied message must not get this far.
            // Nor the wills of clients closed because the gateway stops.
            Parameter::MessagePublish(Some(_), _, publish)
                if gw.access().publish_denied(&publish.topic)
                    || self.state.closing.load(Ordering::Relaxed) =>
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

impl Hooks {
    /// Reports a connect; a session that still held the clientid was
    /// taken over, and is reported gone first, as EMQX does.
    fn connected(&self, gw: &dyn Gateway, session: &Session) {
        if self.state.closing.load(Ordering::Relaxed) {
            // Its CONNECT was under way when the gateway began to stop,
            // after the other clients were listed to be closed.
            let scx = session.scx.clone();
            let id = session.id.clone();
            tokio::spawn(async move {
                let mut entry = scx.extends.shared().await.entry(id);
                let _ = tokio::time::timeout(KICK_TIMEOUT, entry.kick(true, true, true)).await;
            });
            return;
        }
        let info = client_info(gw, session);
        let mut clients = self
            .state
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = clients.connect(
            &session.id.client_id,
            session.id.clone(),
            Reported {
                info: info.clone(),
                connected_at: SystemTime::now(),
            },
        );
        // Reported under the lock, so the hook server hears them in the
        // order the table changed.
        if let Some(hooks) = gw.exhook() {
            if let Some(old) = before {
                hooks.disconnected(old.info, "takenover");
            }
            hooks.connected(&info);
        }
    }

    /// Reports a disconnect, unless a later session took the clientid
    /// over (its end was reported then).
    fn disconnected(&self, gw: &dyn Gateway, session: &Session, reason: &Reason) {
        let mut clients = self
            .state
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(gone) = clients.disconnect(&session.id.client_id, &session.id) else {
            return;
        };
        if self.state.closing.load(Ordering::Relaxed) {
            return;
        }
        if let Some(hooks) = gw.exhook() {
            hooks.disconnected(gone.info, &emqx_reason(reason));
        }
    }
}

/// The users file, the clientid rule that goes with it, and the deny
/// rules for a will; without a users file anyone gets in.
fn authenticate(access: &Access, info: &ConnectInfo) -> AuthResult {
    let clientid = info.id().client_id.to_string();
    if let Some(users) = &access.users {
        let username = info.username().map(|u| u.to_string()).unwrap_or_default();
        let password = info.password().map(|p| p.to_vec()).unwrap_or_default();
        if !users.check_bytes(&username, &password) {
            tracing::info!(%clientid, username, "MQTT client refused: bad username or password");
            return AuthResult::BadUsernameOrPassword;
        }
        if !ClientidPolicy::Username.allows(&clientid, &username) {
            tracing::info!(%clientid, username, "MQTT client refused: clientid not allowed for this user");
            return AuthResult::NotAuthorized;
        }
    }
    // Checked only once the client is known, so a stranger learns nothing
    // of the rules.
    if let Some(topic) = info.last_will().map(|w| will_topic(&w)) {
        if access.publish_denied(&topic) {
            tracing::info!(%clientid, topic, "MQTT client refused: its will's topic is denied");
            return AuthResult::NotAuthorized;
        }
    }
    AuthResult::Allow(false, None)
}

fn will_topic(will: &LastWill<'_>) -> String {
    match will {
        LastWill::V3(w) => w.topic.to_string(),
        LastWill::V5(w) => w.topic.to_string(),
    }
}

/// The `ClientInfo` EMQX's MQTT channel reports.
fn client_info(gw: &dyn Gateway, session: &Session) -> hpb::ClientInfo {
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
        Reason::ConnectKicked(true) => "kicked".to_owned(),
        Reason::ConnectKicked(false) => "takenover".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_takeover_reports_the_old_session_first_and_ignores_its_late_end() {
        let mut h: Holders<u32, &str> = Holders::default();
        assert_eq!(h.connect("mo", 1, "first"), None);
        // The second session starts before the first has ended.
        assert_eq!(h.connect("mo", 2, "second"), Some("first"));
        // The first one's end comes late: already reported, nothing to do.
        assert_eq!(h.disconnect("mo", &1), None);
        let held: Vec<_> = h.iter().map(|(c, v)| (c.as_str(), *v)).collect();
        assert_eq!(held, [("mo", "second")]);
        assert_eq!(h.disconnect("mo", &2), Some("second"));
        assert_eq!(h.disconnect("mo", &2), None);
        // The other order: the first ends, then the second starts.
        assert_eq!(h.connect("mo", 3, "third"), None);
        assert_eq!(h.disconnect("mo", &3), Some("third"));
        assert_eq!(h.connect("mo", 4, "fourth"), None);
        assert_eq!(h.disconnect("other", &4), None);
    }

    #[test]
    fn disconnect_reasons_are_emqx_s() {
        assert_eq!(emqx_reason(&Reason::ConnectDisconnect(None)), "normal");
        assert_eq!(emqx_reason(&Reason::ConnectRemoteClose), "tcp_closed");
        assert_eq!(
            emqx_reason(&Reason::ConnectKeepaliveTimeout),
            "keepalive_timeout"
        );
        assert_eq!(emqx_reason(&Reason::ConnectKicked(false)), "takenover");
        assert_eq!(emqx_reason(&Reason::ConnectKicked(true)), "kicked");
    }
}
