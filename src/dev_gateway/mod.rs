//! A stand-in for EMQX's ExProto gateway, for the demo and end-to-end tests.
//!
//! It does what EMQX does for an exproto handler (see `EXPROTO.md`): it
//! accepts raw TCP clients, gives each an opaque conn id and a connection
//! process, calls the adapter's handler service for every socket event
//! (unary or streaming, in EMQX's order and with its flow control), serves
//! the ConnectionAdapter gRPC service with EMQX's result codes, and routes
//! pub/sub in memory or through a real MQTT broker. With an ExHook URL it
//! also reports its clients and messages to a `HookProvider`, as EMQX's
//! `exhook.servers` do, for presence and history.
//!
//! ```text
//! TCP client ──bytes──▶ conn process ──OnReceivedBytes...──▶ adapter (handler)
//!      ▲                  ▲    │                                  │
//!      └──── Send ────────┘    └── subscribe/publish ─▶ router    │
//!                         ▲                                        │
//!                         └──── ConnectionAdapter gRPC ◀───────────┘
//! ```
//!
//! Modules from the top down; each imports only modules listed after it:
//! `control` (the test handle, [`Faults`]); `conn` (the per-connection
//! process), `adapter` (the ConnectionAdapter service) and `rest` (the
//! REST API stand-in), which meet only through the modules below;
//! `shared` (what they share); `broker` (the embedded MQTT broker, which
//! reaches the gateway through its own `Gateway` trait); `registry`
//! (conn ids, live connections, clientids); `mailbox` (what a connection
//! process is asked); `handler` (client of the adapter's handler service);
//! `exhook` (the ExHook client); `router` and `mqtt` (pub/sub); `message`
//! (the messages they carry); `faults` (the fault table); `config`
//! (settings, CLI flags); `auth` (users file, deny rules); `codes` (EMQX's
//! answers). MQTT topic rules are the protocol layer's, `protocol::topic`.

mod adapter;
mod auth;
mod broker;
mod codes;
mod config;
mod conn;
mod control;
mod exhook;
mod faults;
mod handler;
mod mailbox;
mod message;
mod mqtt;
mod registry;
mod rest;
mod router;
mod shared;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

pub use self::auth::{AuthConfigError, DenyAction, DenyRule, EmqxCompat, Secret, Users};
pub use self::config::{
    ApiListen, BrokerListen, GatewayArgs, GatewayConfig, HandlerMode, OptionalAddr,
};
pub use self::control::Faults;
pub use self::exhook::ExhookStats;
pub use self::faults::{Fault, ListHold, Method};
pub use crate::pb::ResultCode;

use self::adapter::AdapterServer;
use self::auth::Access;
use self::broker::Broker;
use self::exhook::HookClient;
use self::faults::FaultState;
use self::handler::HandlerClient;
use self::mqtt::MqttRouter;
use self::registry::Registry;
use self::router::{MemoryRouter, Router};
use self::shared::{Counters, Shared};
pub use self::tls::TlsListen;

/// How long `shutdown` waits for connection processes to end.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Calls since the gateway started, read with [`DevGateway::stats`]; a load
/// test takes two and subtracts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Handler events sent to the handler (unary calls, or stream writes).
    pub handler_events: u64,
    /// ConnectionAdapter calls the handler made (Send, Publish, ...).
    pub adapter_calls: u64,
}

/// A running dev gateway. Dropping it stops everything too, without waiting.
pub struct DevGateway {
    /// `listen` first, then `also_listen`.
    client_addrs: Vec<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    udp_addr: Option<SocketAddr>,
    api_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    adapter: Arc<AdapterServer>,
    accept_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DevGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevGateway")
            .field("client_addrs", &self.client_addrs)
            .field("adapter_addr", &self.adapter.addr())
            .finish_non_exhaustive()
    }
}

impl DevGateway {
    /// Binds the client listener and the ConnectionAdapter service (port 0
    /// picks free ports), connects to the MQTT broker if one is configured,
    /// and starts serving. The handler is connected lazily, on the first
    /// client.
    ///
    /// # Errors
    /// Invalid settings, a port that cannot be bound, an unreachable MQTT
    /// broker.
    pub async fn start(cfg: GatewayConfig) -> anyhow::Result<DevGateway> {
        cfg.validate()?;
        let mut listeners = Vec::new();
        for at in std::iter::once(&cfg.listen).chain(&cfg.also_listen) {
            let listener = TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen for clients on {at}"))?;
            listeners.push((listener, None));
        }
        let client_addrs = listeners
            .iter()
            .map(|(l, _)| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        let tls_addr = match &cfg.tls_listen {
            Some(tls) => {
                let acceptor = tls::acceptor(tls)?;
                let listener = TcpListener::bind(tls.addr)
                    .await
                    .with_context(|| format!("cannot listen for TLS clients on {}", tls.addr))?;
                let addr = listener.local_addr()?;
                listeners.push((listener, Some(acceptor)));
                Some(addr)
            }
            None => None,
        };
        let udp = match cfg.udp_listen {
            Some(at) => {
                Some(Arc::new(UdpSocket::bind(at).await.with_context(|| {
                    format!("cannot listen for UDP clients on {at}")
                })?))
            }
            None => None,
        };
        let udp_addr = udp.as_ref().map(|u| u.local_addr()).transpose()?;
        let api_listener =
            match &cfg.api {
                Some(api) => Some(TcpListener::bind(api.addr).await.with_context(|| {
                    format!("cannot serve the REST API stand-in on {}", api.addr)
                })?),
                None => None,
            };
        let api_addr = api_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let router = match &cfg.mqtt {
            Some(url) => Router::Mqtt(MqttRouter::connect(url, &cfg.node).await?),
            None => Router::Memory(MemoryRouter::default()),
        };
        let broker = match (&cfg.mqtt, cfg.broker) {
            (None, listen) if listen != BrokerListen::default() => Broker::bind(listen).await?,
            _ => None,
        };
        let faults = Arc::new(FaultState::default());
        let handler = HandlerClient::new(
            &cfg.handler,
            cfg.handler_timeout,
            cfg.unreachable_retry().is_some(),
            faults.clone(),
        )?;
        let shutdown = CancellationToken::new();
        let exhook = match &cfg.exhook {
            Some(url) => Some(HookClient::start(
                url,
                &cfg.exhook_tls,
                &cfg.node,
                faults.clone(),
                shutdown.clone(),
            )?),
            None => None,
        };
        let shared = Arc::new(Shared {
            access: Access {
                users: cfg.users.clone(),
                deny: cfg.deny.clone(),
                compat: cfg.emqx_compat,
            },
            cfg,
            registry: Registry::new(),
            router,
            handler,
            faults,
            exhook,
            broker,
            shutdown,
            stats: Counters::default(),
        });
        let adapter = AdapterServer::start_new(shared.clone(), shared.cfg.adapter_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot serve ConnectionAdapter on {}",
                    shared.cfg.adapter_listen
                )
            })?;
        tracing::info!(
            clients = ?client_addrs,
            tls = ?tls_addr,
            udp = ?udp_addr,
            api = ?api_addr,
            adapter = %adapter.addr(),
            handler = %shared.cfg.handler,
            mode = ?shared.cfg.handler_mode,
            emqx_compat = ?shared.cfg.emqx_compat,
            handler_retry = ?shared.cfg.unreachable_retry(),
            mqtt = shared.cfg.mqtt.is_some(),
            exhook = shared.cfg.exhook.as_deref().unwrap_or("off"),
            "dev gateway started"
        );
        if let Some(broker) = &shared.broker {
            let weak = Arc::downgrade(&shared);
            let gateway: std::sync::Weak<dyn broker::Gateway> = weak;
            broker.run(gateway, shared.shutdown.clone()).await;
        }
        if let (Some(listener), Some(api)) = (api_listener, &shared.cfg.api) {
            rest::serve(listener, api, shared.clone());
        }
        let limit = Arc::new(Semaphore::new(shared.cfg.max_connections));
        let accept_task = tokio::spawn(accept_loop(listeners, udp, shared.clone(), limit));
        Ok(DevGateway {
            client_addrs,
            tls_addr,
            udp_addr,
            api_addr,
            shared,
            adapter,
            accept_task: Some(accept_task),
        })
    }

    /// Where TCP clients connect (`listen`).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addrs[0]
    }

    /// Every TCP listener's address: `listen`, then each of `also_listen`.
    pub fn client_addrs(&self) -> &[SocketAddr] {
        &self.client_addrs
    }

    /// Where the REST API stand-in listens, with `api`.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Where TLS clients connect, with `tls_listen`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Where MQTT clients connect over TCP (the embedded broker's
    /// `mqtt_listen`), if it listens.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.shared.broker.as_ref().and_then(|b| b.mqtt_addr)
    }

    /// Where MQTT clients connect over WebSocket (path `/mqtt`), if the
    /// embedded broker listens there.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.shared.broker.as_ref().and_then(|b| b.ws_addr)
    }

    /// Where UDP clients send datagrams, with `udp_listen`.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }

    /// Where the ConnectionAdapter service listens (also after a restart).
    pub fn adapter_addr(&self) -> SocketAddr {
        self.adapter.addr()
    }

    /// The fault controls.
    pub fn faults(&self) -> Faults {
        Faults::new(self.shared.clone(), self.adapter.clone())
    }

    /// What the ExHook client has done; `None` without `exhook`.
    pub fn exhook_stats(&self) -> Option<ExhookStats> {
        self.shared.exhook.as_ref().map(HookClient::stats)
    }

    /// Handler events and ConnectionAdapter calls so far.
    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            handler_events: self.shared.stats.handler_events.load(Ordering::Relaxed),
            adapter_calls: self.shared.stats.adapter_calls.load(Ordering::Relaxed),
        }
    }

    /// Connections with a handler call in flight or waiting for an
    /// unreachable handler. Zero means that every event sent so far has been
    /// answered (`OnSocketClosed` aside, which nobody waits for), so a test
    /// that stops the handler then cuts no call off half-way.
    pub fn handler_calls_pending(&self) -> usize {
        self.shared.stats.calls_pending.load(Ordering::Relaxed)
    }

    /// Live connection processes (including those draining after their
    /// socket closed).
    pub fn connection_count(&self) -> usize {
        self.shared.registry.len()
    }

    /// Stops accepting, closes every client socket (without handler calls),
    /// stops the ConnectionAdapter service and the ExHook client (which
    /// says `OnProviderUnloaded`), and waits for all of it, at most a few
    /// seconds.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.accept_task.take() {
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, task).await.is_err() {
                tracing::warn!("connections did not end in time");
            }
        }
        self.adapter.stop().await;
        if let Some(broker) = &self.shared.broker {
            broker.stopped().await;
        }
        if let Some(exhook) = &self.shared.exhook {
            exhook.stopped().await;
        }
        tracing::info!("dev gateway stopped");
    }
}

impl Drop for DevGateway {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Accepts on every TCP listener (plain, or TLS with its acceptor) and
/// starts the UDP listener, until shutdown; then waits for every
/// connection to end.
async fn accept_loop(
    listeners: Vec<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    udp: Option<Arc<UdpSocket>>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
) {
    use futures::StreamExt as _;
    let mut conns = JoinSet::new();
    if let Some(udp) = udp {
        conns.spawn(datagram_loop(udp, shared.clone(), limit.clone()));
    }
    let mut accepted = futures::stream::select_all(listeners.into_iter().map(|(listener, tls)| {
        tokio_stream::wrappers::TcpListenerStream::new(listener)
            .map(move |socket| (socket, tls.clone()))
    }));
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            Some((socket, tls)) = accepted.next() => match socket {
                Ok(socket) => {
                    let Ok(peer) = socket.peer_addr() else { continue };
                    match limit.clone().try_acquire_owned() {
                        Ok(permit) => match tls {
                            Some(tls) => {
                                conns.spawn(conn::run_tls(shared.clone(), tls, socket, peer, permit));
                            }
                            None => {
                                conns.spawn(conn::run(shared.clone(), socket, peer, permit));
                            }
                        },
                        Err(_) => {
                            tracing::warn!(%peer, "connection limit reached, socket closed");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(accepted);
    while conns.join_next().await.is_some() {}
}

/// The UDP listener: each peer address is one connection process, which
/// gets that peer's datagrams in order. A datagram for a process whose
/// queue is full is dropped, as the network may drop it; one from a peer
/// whose process has ended starts a new connection.
async fn datagram_loop(udp: Arc<UdpSocket>, shared: Arc<Shared>, limit: Arc<Semaphore>) {
    let mut peers: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut conns = JoinSet::new();
    // The largest UDP payload.
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            got = udp.recv_from(&mut buf) => match got {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            },
        };
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        if let Some(tx) = peers.get(&peer) {
            match tx.try_send(datagram) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(%peer, "datagram dropped: its connection is busy");
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    peers.remove(&peer);
                    start_peer(&udp, &shared, &limit, &mut conns, &mut peers, peer, d);
                }
            }
        } else {
            start_peer(
                &udp, &shared, &limit, &mut conns, &mut peers, peer, datagram,
            );
        }
        peers.retain(|_, tx| !tx.is_closed());
    }
    while conns.join_next().await.is_some() {}
}

/// A connection process for a new UDP peer, with its first datagram.
fn start_peer(
    udp: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
    limit: &Arc<Semaphore>,
    conns: &mut JoinSet<()>,
    peers: &mut HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    peer: SocketAddr,
    first: Bytes,
) {
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        tracing::warn!(%peer, "connection limit reached, datagram dropped");
        return;
    };
    let (tx, rx) = mpsc::channel(shared.cfg.queue_limit.max(1));
    // A new channel has room for its first datagram.
    let _ = tx.try_send(first);
    peers.insert(peer, tx);
    conns.spawn(conn::run_datagrams(
        shared.clone(),
        rx,
        udp.clone(),
        peer,
        permit,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_handles_can_cross_tasks() {
        fn check<T: Send + Sync + 'static>() {}
        check::<DevGateway>();
        check::<Faults>();
        check::<GatewayConfig>();
    }
}
