//! The gateway's ExHook client: it reports its own clients to a
//! `HookProvider` (the adapter's `--exhook-listen`, or any other) the way
//! EMQX's `emqx_exhook` does, so presence and history work end to end
//! without EMQX.
//!
//! It speaks `emqx.exhook.v3`, the version EMQX 5.9 and later call, and
//! fills each request as `emqx_exhook_handler` does:
//! - `OnProviderLoaded` once at start, with the broker's info and the
//!   request meta. Only the hooks the provider registers are called, and
//!   `message.publish` only for topics matching its filters (none: every
//!   topic); `$SYS/` topics never. Until a load succeeds nothing is
//!   reported; a failed load is tried again every [`RELOAD_EVERY`] (EMQX's
//!   `auto_reconnect`).
//! - `client.connected` after a successful Authenticate, and
//!   `client.disconnected` with the reason when an authenticated
//!   connection's socket closes (`tcp_closed`, `normal` after Close,
//!   `kicked`, `keepalive_timeout`, ...). As in EMQX's exproto channel, a
//!   connection stopped without its socket closing first (discarded by a
//!   newer login with its clientid, a failed handler call) reports no
//!   disconnect.
//! - `message.publish` for every message published through the gateway,
//!   Publish and RawPublish (`from` is `exproto`), with the id, timestamp
//!   and node of the message subscribers receive.
//! - `OnProviderUnloaded` when the gateway stops.
//!
//! Two deliberate differences. EMQX makes these calls inside the client's
//! connection process and waits for each answer (up to its
//! `request_timeout`); here they go through a bounded queue to one task,
//! so a slow or absent hook server never holds up a connection: when the
//! queue is full, calls are dropped and counted, logged when dropping
//! starts and ends. The order of calls is kept, so a client's connect
//! always comes before its disconnect. And `ClientInfo.password` stays
//! empty: EMQX may send the password it authenticated with, the stand-in
//! keeps secrets to itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::faults::FaultState;
use crate::exhook::pb::v3 as hpb;
use crate::pb;
use crate::protocol::topic;

/// Bound on each hook call (EMQX's `request_timeout` default).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a failed `OnProviderLoaded` is tried again. EMQX's
/// `auto_reconnect` defaults to 60 s; a development tool started before
/// its hook server should not keep its user waiting that long.
pub(crate) const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// Calls waiting for the hook server at most.
pub(crate) const QUEUE: usize = 10_000;
/// How long stopping waits for `OnProviderUnloaded`.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(1);

/// EMQX's hook names; a provider registering another fails to load.
const AVAILABLE_HOOKS: [&str; 19] = [
    "client.connect",
    "client.connack",
    "client.connected",
    "client.disconnected",
    "client.authenticate",
    "client.authorize",
    "client.subscribe",
    "client.unsubscribe",
    "session.created",
    "session.subscribed",
    "session.unsubscribed",
    "session.resumed",
    "session.discarded",
    "session.takenover",
    "session.terminated",
    "message.publish",
    "message.delivered",
    "message.acked",
    "message.dropped",
];

/// What the gateway's hook client has done, for tests and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExhookStats {
    /// `OnProviderLoaded` succeeded; hooks are being reported.
    pub loaded: bool,
    /// The hooks the provider registered, sorted.
    pub hooks: Vec<String>,
    /// Calls the hook server answered.
    pub sent: u64,
    /// Calls that failed or timed out (EMQX's `failed_action = ignore`:
    /// the client carries on).
    pub failed: u64,
    /// Calls dropped because the queue was full.
    pub dropped: u64,
}

/// The hooks a provider registered: name -> topic filters (message hooks
/// only; empty means every topic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Registered(HashMap<String, Vec<String>>);

impl Registered {
    /// Reads a `LoadedResponse` as EMQX's `resolve_hookspec` does.
    fn resolve(specs: Vec<hpb::HookSpec>) -> Result<Self, String> {
        let mut hooks = HashMap::new();
        for spec in specs {
            if !AVAILABLE_HOOKS.contains(&spec.name.as_str()) {
                return Err(format!("unknown hookpoint {:?}", spec.name));
            }
            let topics = if spec.name.starts_with("message.") {
                spec.topics
            } else {
                Vec::new()
            };
            hooks.insert(spec.name, topics);
        }
        Ok(Self(hooks))
    }

    fn has(&self, hook: &str) -> bool {
        self.0.contains_key(hook)
    }

    /// Whether `message.publish` is wanted for `topic`.
    fn wants_publish(&self, topic_name: &str) -> bool {
        if topic_name.starts_with("$SYS/") {
            return false;
        }
        match self.0.get("message.publish") {
            None => false,
            Some(filters) if filters.is_empty() => true,
            Some(filters) => filters.iter().any(|f| topic::matches(f, topic_name)),
        }
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.keys().cloned().collect();
        v.sort();
        v
    }
}

/// One hook call waiting for the hook server.
#[derive(Debug)]
enum Call {
    Connected(hpb::ClientInfo),
    Disconnected(hpb::ClientInfo, String),
    Publish(hpb::Message),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Self::Connected(_) => "client.connected",
            Self::Disconnected(..) => "client.disconnected",
            Self::Publish(_) => "message.publish",
        }
    }
}

/// What the node tells the calling task, besides hook calls.
#[derive(Debug)]
enum Ctl {
    /// The node stops: send what is queued, then `OnProviderUnloaded`
    /// (unless it crashes: `false`), then say so.
    Unload(oneshot::Sender<()>, bool),
    /// The node started again: load the provider.
    Load,
}

/// What the queue side and the calling task share.
#[derive(Debug)]
struct State {
    node: String,
    /// When the node started: `BrokerInfo.uptime` counts from here.
    started: Mutex<Instant>,
    /// Set by a successful load, cleared when the node unloads the
    /// provider.
    registered: RwLock<Option<Arc<Registered>>>,
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    /// Set while calls are dropped, so that is logged once per episode.
    dropping: AtomicBool,
}

/// The gateway's handle: queue a hook, read the counters. Cheap to call
/// from any connection; never waits.
#[derive(Debug)]
pub(crate) struct HookClient {
    tx: mpsc::Sender<Call>,
    ctl: mpsc::Sender<Ctl>,
    state: Arc<State>,
    faults: Arc<FaultState>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl HookClient {
    /// Checks `url` and starts the calling task, which loads the provider
    /// and then makes the queued calls until `shutdown`.
    ///
    /// # Errors
    /// `url` is not a plain `http://` endpoint URL.
    pub fn start(
        url: &str,
        tls: &crate::tls::EmqxTlsFiles,
        node: &str,
        faults: Arc<FaultState>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let channel = channel(url, tls)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ctl, ctl_rx) = mpsc::channel(4);
        let state = Arc::new(State {
            node: node.to_owned(),
            started: Mutex::new(Instant::now()),
            registered: RwLock::new(None),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dropping: AtomicBool::new(false),
        });
        let caller = Caller {
            client: hpb::hook_provider_client::HookProviderClient::new(channel),
            state: state.clone(),
            url: url.to_owned(),
            failing: false,
        };
        let task = tokio::spawn(caller.run(rx, ctl_rx, shutdown));
        Ok(Self {
            tx,
            ctl,
            state,
            faults,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// A client authenticated.
    pub fn connected(&self, info: &hpb::ClientInfo) {
        if self.registered("client.connected") {
            self.offer(Call::Connected(info.clone()));
        }
    }

    /// An authenticated client's socket closed; `reason` is the socket's
    /// close reason as the gateway prints it (`{shutdown,tcp_closed}`).
    pub fn disconnected(&self, info: hpb::ClientInfo, reason: &str) {
        if self.registered("client.disconnected") {
            self.offer(Call::Disconnected(info, disconnect_reason(reason)));
        }
    }

    /// A message is being published through the gateway.
    pub fn message_publish(&self, msg: &pb::Message) {
        let wanted = self
            .state
            .loaded()
            .is_some_and(|r| r.wants_publish(&msg.topic));
        if !wanted {
            return;
        }
        let copies = if self.faults.take_hook_repeat() { 2 } else { 1 };
        for _ in 0..copies {
            self.offer(Call::Publish(hpb::Message {
                node: self.state.node.clone(),
                id: msg.id.clone(),
                qos: msg.qos,
                from: msg.from.clone(),
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                timestamp: msg.timestamp,
                // EMQX's exproto channel makes messages without headers
                // (only its MQTT channel sets username, peerhost...).
                headers: HashMap::new(),
            }));
        }
    }

    /// The counters as they are now.
    pub fn stats(&self) -> ExhookStats {
        let s = &self.state;
        let registered = s.loaded();
        ExhookStats {
            loaded: registered.is_some(),
            hooks: registered.map(|r| r.names()).unwrap_or_default(),
            sent: s.sent.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits (bounded) for the calling task to unload the provider and
    /// end; the gateway's shutdown token must be cancelled first.
    pub async fn stopped(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(CALL_TIMEOUT + UNLOAD_TIMEOUT, task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn registered(&self, hook: &str) -> bool {
        self.state.loaded().is_some_and(|r| r.has(hook))
    }

    /// The node stops, as EMQX's does: its hooks go at once (nothing new
    /// is reported), the calls already made are sent, then
    /// `OnProviderUnloaded`. Returns once that is done.
    pub async fn unload(&self) {
        self.stop(true).await;
    }

    /// The node dies: its hooks go, and nothing more is sent, not even
    /// `OnProviderUnloaded`.
    pub async fn crash(&self) {
        self.stop(false).await;
    }

    async fn stop(&self, unload: bool) {
        self.state.set_loaded(None);
        let (ack, done) = oneshot::channel();
        if self.ctl.send(Ctl::Unload(ack, unload)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Loads the provider again after [`HookClient::unload`] or
    /// [`HookClient::crash`]: a node that starts again (`restarted`: its
    /// uptime starts over), or one whose hook server settings changed.
    pub async fn load(&self, restarted: bool) {
        if restarted {
            *self
                .state
                .started
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
        let _ = self.ctl.send(Ctl::Load).await;
    }

    fn offer(&self, call: Call) {
        let s = &self.state;
        match self.tx.try_send(call) {
            Ok(()) => {
                if s.dropping.load(Ordering::Relaxed) && s.dropping.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        dropped_total = s.dropped.load(Ordering::Relaxed),
                        "exhook queue has room again"
                    );
                }
            }
            Err(e) => {
                s.dropped.fetch_add(1, Ordering::Relaxed);
                if !s.dropping.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        capacity = QUEUE,
                        hook = e.into_inner().name(),
                        "exhook queue full (hook server slow or away): hook calls are dropped"
                    );
                }
            }
        }
    }
}

impl State {
    fn loaded(&self) -> Option<Arc<Registered>> {
        self.registered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_loaded(&self, registered: Option<Registered>) {
        *self
            .registered
            .write()
            .unwrap_or_else(PoisonError::into_inner) = registered.map(Arc::new);
    }

    fn uptime(&self) -> Duration {
        self.started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }
}

/// How a loaded provider's service ended.
enum Served {
    Shutdown,
    /// With `true` when `OnProviderUnloaded` is to be sent.
    Unloaded(oneshot::Sender<()>, bool),
}

/// A lazily connected channel: the hook server may come up after the
/// gateway. `https://` with `tls`'s files, as EMQX's
/// `exhook.servers[].ssl`.
fn channel(url: &str, tls: &crate::tls::EmqxTlsFiles) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad exhook URL {url:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(CALL_TIMEOUT);
    if let Some(config) =
        crate::tls::client_config(url, tls, "hook server", "--exhook-cert and --exhook-key")?
    {
        endpoint = endpoint.tls_config(config).context("exhook TLS settings")?;
    }
    Ok(endpoint.connect_lazy())
}

/// The calling task.
struct Caller {
    client: hpb::hook_provider_client::HookProviderClient<Channel>,
    state: Arc<State>,
    url: String,
    /// In a run of failed calls, so that is logged once per run.
    failing: bool,
}

impl Caller {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Call>,
        mut ctl: mpsc::Receiver<Ctl>,
        shutdown: CancellationToken,
    ) {
        loop {
            if !self.load_until_loaded(&mut ctl, &shutdown).await {
                return;
            }
            match self.serve(&mut rx, &mut ctl, &shutdown).await {
                Served::Shutdown => {
                    self.unloaded().await;
                    return;
                }
                Served::Unloaded(ack, true) => {
                    // The calls made before the hooks went are sent.
                    while let Ok(call) = rx.try_recv() {
                        self.call(call).await;
                    }
                    self.unloaded().await;
                    let _ = ack.send(());
                }
                Served::Unloaded(ack, false) => {
                    // A crash loses what was queued.
                    while rx.try_recv().is_ok() {}
                    let _ = ack.send(());
                }
            }
            // A stopped node: nothing until it starts again.
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    c = ctl.recv() => match c {
                        Some(Ctl::Load) => break,
                        Some(Ctl::Unload(ack, _)) => {
                            let _ = ack.send(());
                        }
                        None => return,
                    },
                }
            }
        }
    }

    /// Loads the provider, trying again every [`RELOAD_EVERY`]; `false`
    /// when the gateway stops first. Nothing is queued before a load
    /// succeeds (no hook is registered), so the queue needs no attention
    /// meanwhile.
    async fn load_until_loaded(
        &mut self,
        ctl: &mut mpsc::Receiver<Ctl>,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut warned = false;
        loop {
            let loaded = tokio::select! {
                () = shutdown.cancelled() => return false,
                r = self.load() => r,
            };
            match loaded {
                Ok(registered) => {
                    tracing::info!(url = %self.url, hooks = ?registered.names(), "exhook provider loaded");
                    self.state.set_loaded(Some(registered));
                    return true;
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(url = %self.url, error = %e, retry = ?RELOAD_EVERY, "exhook provider not loaded; no hooks are reported until it is");
                }
                Err(e) => tracing::debug!(error = %e, "exhook provider still not loaded"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(RELOAD_EVERY) => {}
                c = ctl.recv() => match c {
                    // Not loaded: nothing to unload.
                    Some(Ctl::Unload(ack, _)) => {
                        let _ = ack.send(());
                    }
                    Some(Ctl::Load) => {}
                    None => return false,
                },
            }
        }
    }

    /// Makes the queued calls until the gateway stops or the node unloads
    /// the provider.
    async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Call>,
        ctl: &mut mpsc::Receiver<Ctl>,
        shutdown: &CancellationToken,
    ) -> Served {
        loop {
            let call = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Served::Shutdown,
                c = ctl.recv() => match c {
                    Some(Ctl::Unload(ack, unload)) => return Served::Unloaded(ack, unload),
                    Some(Ctl::Load) => continue,
                    None => return Served::Shutdown,
                },
                call = rx.recv() => match call {
                    Some(call) => call,
                    None => return Served::Shutdown,
                },
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Served::Shutdown,
                () = self.call(call) => {}
            }
        }
    }

    async fn unloaded(&mut self) {
        let unload = self
            .client
            .on_provider_unloaded(hpb::ProviderUnloadedRequest {
                meta: Some(self.meta()),
            });
        if let Ok(Err(e)) = tokio::time::timeout(UNLOAD_TIMEOUT, unload).await {
            tracing::debug!(error = %e, "OnProviderUnloaded failed");
        }
    }

    async fn load(&mut self) -> Result<Registered, String> {
        let req = hpb::ProviderLoadedRequest {
            broker: Some(hpb::BrokerInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                sysdescr: "exproto-adapter dev gateway (an EMQX stand-in)".to_owned(),
                uptime: i64::try_from(self.state.uptime().as_millis()).unwrap_or(i64::MAX),
                datetime: rfc3339(SystemTime::now()),
            }),
            meta: Some(self.meta()),
        };
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.client.on_provider_loaded(req))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Registered::resolve(resp.into_inner().hooks)
    }

    /// Makes one call, bounded; the outcome is only counted: the hooks this
    /// client makes have nothing to act on in the answer.
    async fn call(&mut self, call: Call) {
        let name = call.name();
        let meta = Some(self.meta());
        let client = &mut self.client;
        let result = tokio::time::timeout(CALL_TIMEOUT, async move {
            match call {
                Call::Connected(info) => client
                    .on_client_connected(hpb::ClientConnectedRequest {
                        clientinfo: Some(info),
                        meta,
                    })
                    .await
                    .map(drop),
                Call::Disconnected(info, reason) => client
                    .on_client_disconnected(hpb::ClientDisconnectedRequest {
                        clientinfo: Some(info),
                        reason,
                        meta,
                    })
                    .await
                    .map(drop),
                Call::Publish(message) => client
                    .on_message_publish(hpb::MessagePublishRequest {
                        message: Some(message),
                        meta,
                        props: Vec::new(),
                        user_props: Vec::new(),
                    })
                    .await
                    .map(drop),
            }
        })
        .await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Some("timeout".to_owned()),
        };
        match error {
            None => {
                self.state.sent.fetch_add(1, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    tracing::info!(url = %self.url, "exhook calls succeed again");
                }
            }
            Some(error) => {
                self.state.failed.fetch_add(1, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(url = %self.url, hook = name, %error, "exhook call failed; clients carry on (failed_action = ignore) and failures are logged again only after a success");
                }
            }
        }
    }

    /// EMQX's `request_meta()`, sent with every request.
    fn meta(&self) -> hpb::RequestMeta {
        hpb::RequestMeta {
            node: self.state.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sysdescr: "exproto-adapter dev gateway".to_owned(),
            // EMQX's default cluster name.
            cluster_name: "emqxcl".to_owned(),
        }
    }
}

/// The `ClientInfo` EMQX's exproto channel reports for an authenticated
/// connection (`emqx_exhook_handler:clientinfo/1`).
pub(crate) fn client_info(
    node: &str,
    clientid: &str,
    username: &str,
    proto_name: &str,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> hpb::ClientInfo {
    hpb::ClientInfo {
        node: node.to_owned(),
        clientid: clientid.to_owned(),
        username: username.to_owned(),
        // See the module doc: never forwarded.
        password: String::new(),
        peerhost: ntoa(peer.ip()),
        sockport: local.map_or(0, |a| u32::from(a.port())),
        // EMQX names the protocol after the Authenticate's proto_name,
        // `exproto` when that is empty.
        protocol: if proto_name.is_empty() {
            "exproto".to_owned()
        } else {
            proto_name.to_owned()
        },
        mountpoint: String::new(),
        is_superuser: false,
        // EMQX's exproto clientinfo has no `anonymous` key, and the hook
        // handler's default for a missing one is true.
        anonymous: true,
        cn: String::new(),
        dn: String::new(),
        peerport: u32::from(peer.port()),
    }
}

/// An address as EMQX prints it: IPv4-mapped IPv6 as plain IPv4.
fn ntoa(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// `client.disconnected` carries the socket's own reason (`tcp_closed`),
/// not the connection's exit reason around it (`{shutdown,tcp_closed}`).
fn disconnect_reason(reason: &str) -> String {
    reason
        .strip_prefix("{shutdown,")
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or(reason)
        .to_owned()
}

/// `at` in RFC 3339, UTC, with microseconds, as EMQX's
/// `emqx_sys:datetime()` prints it (there with the node's offset).
fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_micros(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn spec(name: &str, topics: &[&str]) -> hpb::HookSpec {
        hpb::HookSpec {
            name: name.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn registered_hooks_and_topic_filters() {
        let r = Registered::resolve(vec![
            spec("client.connected", &["ignored"]),
            spec("message.publish", &["chat/#", "news/+"]),
        ])
        .unwrap();
        assert!(r.has("client.connected"));
        assert!(!r.has("client.disconnected"));
        assert!(r.wants_publish("chat/lobby"));
        assert!(r.wants_publish("news/today"));
        assert!(!r.wants_publish("news/today/late"));
        assert!(!r.wants_publish("other"));
        assert_eq!(r.names(), ["client.connected", "message.publish"]);

        // No filters: every topic, except $SYS as in EMQX.
        let all = Registered::resolve(vec![spec("message.publish", &[])]).unwrap();
        assert!(all.wants_publish("anything/at/all"));
        assert!(!all.wants_publish("$SYS/brokers"));
        // No message.publish: no topic.
        assert!(!Registered::default().wants_publish("chat/lobby"));
        // An unknown hook fails the load, as in EMQX.
        assert!(Registered::resolve(vec![spec("client.teleported", &[])]).is_err());
    }

    #[test]
    fn client_info_as_emqx_fills_it() {
        let info = client_info(
            "emqx@127.0.0.1",
            "alice",
            "al",
            "chat",
            "[::ffff:10.0.0.7]:5555".parse().unwrap(),
            Some("127.0.0.1:7993".parse().unwrap()),
        );
        assert_eq!(info.peerhost, "10.0.0.7");
        assert_eq!((info.peerport, info.sockport), (5555, 7993));
        assert_eq!(info.protocol, "chat");
        assert!(info.password.is_empty() && info.anonymous && !info.is_superuser);
        let info = client_info("n", "c", "", "", "[::1]:1".parse().unwrap(), None);
        assert_eq!(
            (info.peerhost.as_str(), info.protocol.as_str()),
            ("::1", "exproto")
        );
    }

    #[test]
    fn disconnect_reasons_lose_the_shutdown_wrapper() {
        assert_eq!(disconnect_reason("{shutdown,tcp_closed}"), "tcp_closed");
        assert_eq!(disconnect_reason("{shutdown,normal}"), "normal");
        assert_eq!(disconnect_reason("kicked"), "kicked");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_micros(951_782_400_000_001)),
            "2000-02-29T00:00:00.000001Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_767_225_599)),
            "2025-12-31T23:59:59.000000Z"
        );
    }

    #[tokio::test]
    async fn a_stalled_hook_server_costs_callers_nothing() {
        // A server that accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let client = HookClient::start(
            &url,
            &crate::tls::EmqxTlsFiles::default(),
            "n",
            Arc::new(FaultState::default()),
            shutdown.clone(),
        )
        .unwrap();
        // Pretend the load went through; the calls then stall.
        client.state.set_loaded(Some(
            Registered::resolve(vec![spec("client.connected", &[])]).unwrap(),
        ));
        let info = client_info("n", "c", "", "chat", "127.0.0.1:1".parse().unwrap(), None);
        let started = std::time::Instant::now();
        let extra = 50;
        for _ in 0..QUEUE + extra {
            client.connected(&info);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "offering waited"
        );
        let stats = client.stats();
        // The calling task holds at most one call, the queue the rest.
        assert!(
            (extra as u64 - 1..=extra as u64).contains(&stats.dropped),
            "{stats:?}"
        );
        assert_eq!(stats.sent, 0);
        shutdown.cancel();
        client.stopped().await;
    }
}
