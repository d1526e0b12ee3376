//! Starts the adapter, one way for every caller ([`Server::builder`]): the
//! handler gRPC server, both handler services on one port over a shared
//! [`Driver`]; and, when presence and history are enabled, the ExHook
//! server and the store the driver reads `WHO` and `HISTORY` from.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::emqx::{ConnectionAdapter, GrpcAdapter};
use crate::exhook::{HookConfig, Hooks};
use crate::handler::{StreamHandler, UnaryHandler};
use crate::journal::Journal;
use crate::pb::connection_handler_server::ConnectionHandlerServer;
use crate::pb::connection_unary_handler_server::ConnectionUnaryHandlerServer;
use crate::protocol::{self, Protocol, ProtocolConfig};
use crate::session::{Driver, DriverConfig, StoreReader};
use crate::store::{self, Store, StoreUrl};
use crate::tls::{EmqxTlsFiles, ServerTlsFiles};
use crate::upgrade::{self, Inherited, Link, Offered, Role};

/// Everything the adapter needs to run; the CLI builds it from flags.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// Where the handler services listen (EMQX's `handler.address`).
    pub listen: SocketAddr,
    /// EMQX's ConnectionAdapter (`gateway.exproto.server.bind`).
    pub emqx: String,
    /// Bound on each call to EMQX.
    pub call_timeout: Duration,
    /// A built-in protocol's name (see [`protocol::NAMES`]), served unless
    /// a protocol is registered with [`ServerBuilder::protocol`].
    pub protocol_name: String,
    /// EMQX listeners (by port) whose clients speak another protocol than
    /// `protocol_name`: built-in or registered names.
    pub listeners: Vec<(u16, String)>,
    /// The protocol's settings. Its `clientid_policy` binds the driver too
    /// (which checks every protocol's Authenticate), whatever `driver` says.
    pub protocol: ProtocolConfig,
    pub driver: DriverConfig,
    /// HTTP/2 streams per EMQX connection; `None` is unlimited. Streaming
    /// mode holds up to five per client connection, so a low cap stalls.
    pub max_concurrent_streams: Option<u32>,
    /// How long a shutdown lets in-flight work finish before the server
    /// stops anyway.
    pub shutdown_grace: Duration,
    /// Serve the handler over TLS (EMQX's `handler.ssl_options`); `None`
    /// serves plain HTTP/2.
    pub tls: Option<ServerTlsFiles>,
    /// TLS settings for an `https://` EMQX URL (`server.ssl_options`).
    pub emqx_tls: EmqxTlsFiles,
    /// The presence and history service; `None` leaves `WHO` and
    /// `HISTORY` answering `ERR 501`.
    pub presence: Option<PresenceConfig>,
    /// Where sessions are journaled, so an adapter started again after a
    /// crash (or a stop) restores them (`--state-dir`); `None`: they live
    /// in memory only.
    pub state_dir: Option<std::path::PathBuf>,
    /// Where Prometheus metrics are served (`GET /metrics`); `None`: not.
    /// With `http`, it must be `None` or the same address.
    pub metrics: Option<SocketAddr>,
    /// The HTTP listener: metrics, the JSON API, the chat page.
    pub http: Option<crate::web::HttpConfig>,
    /// Takeover from (and by) another adapter process (`--upgrade-socket`).
    pub upgrade: Option<UpgradeConfig>,
}

/// How an adapter hands over to its successor, and takes over from its
/// predecessor.
#[derive(Debug, Clone)]
pub struct UpgradeConfig {
    /// The Unix socket a running adapter listens on for its successor.
    pub socket: PathBuf,
    /// Exit, instead of starting fresh, when no adapter hands over.
    pub required: bool,
    /// The bound on a takeover: on the running adapter's answer, and on
    /// how long events wait for the sessions they belong to.
    pub timeout: Duration,
}

/// The presence and history service: EMQX's ExHook calls in, a store.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Where the ExHook `HookProvider` listens (EMQX's
    /// `exhook.servers[].url`).
    pub exhook_listen: SocketAddr,
    /// The database (`sqlite:PATH`, `sqlite::memory:`, `postgres://...`).
    pub store: StoreUrl,
    pub hooks: HookConfig,
    /// Bound on each `WHO` or `HISTORY` read.
    pub read_timeout: Duration,
    /// Presence checked against EMQX's REST API; `None`: hooks only.
    pub reconcile: Option<crate::exhook::ReconcileConfig>,
    /// TLS for the ExHook listener (EMQX's `exhook.servers[].ssl`); with a
    /// client CA, EMQX must show a certificate it signed.
    pub tls: Option<ServerTlsFiles>,
}

/// How long EMQX must have sent nothing before a handover closes its
/// connections to the old process: a gap its calls rarely cross, and
/// short beside the pauses of real traffic.
const QUIET: Duration = Duration::from_millis(50);

/// How long shutdown lets the hook writer empty its queue.
const HOOK_DRAIN_GRACE: Duration = Duration::from_secs(5);

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            emqx: "http://127.0.0.1:9100".into(),
            call_timeout: Duration::from_secs(5),
            protocol_name: "chat".into(),
            listeners: Vec::new(),
            protocol: ProtocolConfig::default(),
            driver: DriverConfig::default(),
            max_concurrent_streams: None,
            shutdown_grace: Duration::from_secs(10),
            tls: None,
            emqx_tls: EmqxTlsFiles::default(),
            presence: None,
            state_dir: None,
            metrics: None,
            http: None,
            upgrade: None,
        }
    }
}

/// How [`RunningAdapter::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Stopped on the signal, or by an error of its own.
    Stopped,
    /// A successor took over; exit the process now.
    HandedOver,
}

/// A running adapter. Dropping it does not stop it; call [`Self::shutdown`].
pub struct RunningAdapter {
    addr: SocketAddr,
    driver: Arc<Driver>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The bound on a shutdown's drain (`AdapterConfig::shutdown_grace`).
    grace: Duration,
    /// Says NOT_SERVING once shutdown begins, so orchestrators stop routing.
    health: tonic_health::server::HealthReporter,
    presence: Option<Presence>,
    /// The HTTP listener's handle, with `http`.
    web: Option<crate::web::Web>,
    /// Cancelled to stop every accept loop (handler, hook, HTTP) at once.
    accepting: CancellationToken,
    /// Duplicates of the listening sockets, for a successor.
    offered: Offered,
    /// Where a successor asks to take over; `None` without `--upgrade-socket`.
    upgrade: Option<UnixListener>,
    /// Fires once the predecessor's sessions are here, when this process
    /// took over.
    takeover: Option<oneshot::Receiver<()>>,
    /// How long a handover waits for EMQX to go quiet here.
    upgrade_timeout: Duration,
}

/// The running presence and history service.
struct Presence {
    hooks: Hooks,
    store: Arc<dyn Store>,
}

impl Presence {
    /// Opens the store and serves the hook server on `listener` until
    /// `accepting` is cancelled.
    async fn start(
        config: &PresenceConfig,
        listener: TcpListener,
        accepting: CancellationToken,
    ) -> anyhow::Result<Self> {
        // TLS files are read before anything starts, so a wrong path
        // fails the start.
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()
            .context("ExHook TLS")?;
        let store = store::open(config.store.expose())
            .await
            .with_context(|| format!("cannot open the store {}", config.store))?;
        let mut hooks = Hooks::start(store.clone(), &config.hooks);
        // Before serving: the first hook of a node asks for a pass.
        if let Some(reconcile) = &config.reconcile {
            hooks.reconcile(reconcile.clone());
        }
        hooks.serve_tls_until(listener, accepting, tls)?;
        tracing::info!(
            store = %config.store,
            backend = store.backend(),
            topics = ?config.hooks.history_topics,
            "presence and history enabled"
        );
        Ok(Self { hooks, store })
    }

    /// Stops the hook server, lets the writer drain, closes the store.
    async fn stop(self) -> anyhow::Result<()> {
        let served = self.hooks.shutdown(HOOK_DRAIN_GRACE).await;
        self.store.close().await;
        served.context("exhook server")?;
        Ok(())
    }
}

impl RunningAdapter {
    /// The address the handler services are bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The driver, e.g. to look at its registry.
    pub fn driver(&self) -> &Arc<Driver> {
        &self.driver
    }

    /// The ExHook server, when presence and history are enabled.
    pub fn hooks(&self) -> Option<&Hooks> {
        self.presence.as_ref().map(|p| &p.hooks)
    }

    /// The HTTP listener (chat page, JSON API, metrics), with `http`.
    pub fn web(&self) -> Option<&crate::web::Web> {
        self.web.as_ref()
    }

    /// The store, when presence and history are enabled.
    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        self.presence.as_ref().map(|p| &p.store)
    }

    /// Shuts down gracefully, within about `shutdown_grace`: new sockets
    /// get the protocol's shutting-down line and are closed, work already
    /// taken (calls to EMQX, replies) finishes, then the server stops, and
    /// the hook server (if any) drains its queue into the store.
    /// Handler streams still open when the time is up are cut.
    ///
    /// # Errors
    /// When the server failed while running.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let served = self.stop_gracefully().await;
        self.stop_presence().await?;
        served
    }

    /// Runs until `signal` resolves, then shuts down as
    /// [`shutdown`](Self::shutdown) does; or until a successor has taken
    /// over (with `--upgrade-socket`); returns early if the server stops
    /// by itself (it only does on error).
    ///
    /// After [`Ended::HandedOver`] the process must exit at once: EMQX's
    /// connections to it close when it does (see `hand_over`).
    ///
    /// # Errors
    /// When the server failed.
    pub async fn wait(&mut self, signal: impl Future<Output = ()>) -> anyhow::Result<Ended> {
        tokio::pin!(signal);
        let mut upgrade = self.upgrade.take();
        let served = loop {
            let successor = async {
                match &upgrade {
                    Some(l) => upgrade::accept(l).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut self.task => break r.context("adapter server task").and_then(|r| Ok(r?)).map(|()| Ended::Stopped),
                () = &mut signal => break self.stop_gracefully().await.map(|()| Ended::Stopped),
                s = successor => match s {
                    Ok(Some(successor)) => {
                        let l = upgrade.as_ref().expect("accepted on it");
                        match self.hand_over(successor, l).await {
                            Ok(true) => break Ok(Ended::HandedOver),
                            Ok(false) => continue,
                            Err(e) => break Err(e),
                        }
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "the upgrade socket failed; no takeover is possible until restart");
                        upgrade = None;
                    }
                },
            }
        };
        self.stop_presence().await?;
        served
    }

    /// Resolves once this adapter serves every session it will get: at
    /// once, or when it took over, once the predecessor's sessions have
    /// all arrived (or the takeover's time is up).
    pub async fn ready(&mut self) {
        if let Some(t) = self.takeover.take() {
            let _ = t.await;
        }
    }

    /// Hands everything to `successor`: the listening sockets first (after
    /// a failure there this adapter goes on as before: `Ok(false)`); then
    /// every handler request is relayed to it, this process finishes its
    /// own work and sends every session, and waits for a moment when EMQX
    /// is quiet. `Ok(true)`: handed over; the process must exit now.
    async fn hand_over(
        &mut self,
        successor: upgrade::Successor,
        upgrade: &UnixListener,
    ) -> anyhow::Result<bool> {
        let started = tokio::time::Instant::now();
        let mut offered = std::mem::take(&mut self.offered);
        offered.add(Role::Upgrade, upgrade.as_fd())?;
        if let Err(e) = successor.offer(&offered).await {
            tracing::warn!(error = %e, "a successor went away before it took the sockets; this adapter goes on");
            self.offered = offered;
            return Ok(false);
        }
        tracing::info!("a successor took the listening sockets; handing the sessions over");
        // From here on the successor accepts new connections, and what EMQX
        // still sends here goes to it, behind the sessions' state.
        let (relay, done) = successor.into_relay();
        self.driver.relay_to(relay.clone());
        self.accepting.cancel();
        self.driver.begin_handover();
        if !self.driver.drain(self.grace).await {
            tracing::warn!(grace = ?self.grace, "work still in flight after the grace period; those sessions are not handed over");
        }
        if let Some(journal) = self.driver.journal() {
            // The successor opens the journal after BEGIN; nothing is
            // written here after this.
            journal.flush().await;
        }
        let snap = self.driver.snapshot();
        let bytes = relay
            .sessions(&snap.sessions)
            .await
            .context("sending the sessions to the successor")?;
        relay
            .sync()
            .await
            .context("the successor did not take the sessions")?;
        let handed = started.elapsed();
        // The hook server's connections close now (GOAWAY) and its queue
        // drains into the store, which the successor shares.
        self.stop_presence().await?;
        // EMQX's gRPC client fails a call in flight on a connection that
        // goes away, and one it makes on a connection that is closing
        // (GOAWAY), so its connections here are not closed gracefully but
        // all at once, by the exit of this process, at a moment when EMQX
        // has been quiet on them: its next call opens a new connection, to
        // the successor. Until then this process relays, which costs little.
        let quiet = self.driver.quiet(QUIET, self.upgrade_timeout).await;
        tracing::info!(
            sessions = snap.sessions.len(),
            bytes,
            busy = snap.busy,
            unsaved = snap.unsaved,
            waiting_for_created = snap.orphans,
            handed = ?handed,
            quiet,
            took = ?started.elapsed(),
            "handed over to the successor; exiting"
        );
        drop(done);
        Ok(true)
    }

    async fn stop_presence(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.presence.take() {
            p.stop().await?;
        }
        Ok(())
    }

    async fn stop_gracefully(&mut self) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        tracing::info!(grace = ?self.grace, "shutting down: refusing new sockets, finishing work in flight");
        self.driver.begin_shutdown();
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        if !self.driver.drain(self.grace).await {
            tracing::warn!(grace = ?self.grace, "work still in flight after the grace period; stopping anyway");
        }
        if let Some(journal) = self.driver.journal() {
            // What the last events changed reaches the disk before exit, so
            // the next start restores it.
            journal.flush().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // tonic waits for open requests; a streaming-mode stream stays open
        // as long as its EMQX connection, so the wait is bounded too. What
        // is left of the grace, but enough for answers already on their way.
        let left = self
            .grace
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(500));
        match tokio::time::timeout(left, &mut self.task).await {
            Ok(r) => r.context("adapter server task")??,
            Err(_) => {
                tracing::warn!("handler connections still open; closing them");
                self.task.abort();
            }
        }
        tracing::info!(took = ?started.elapsed(), "adapter stopped");
        Ok(())
    }
}

/// Where every adapter starts: [`Server::builder`] takes the settings, the
/// builder takes what a caller provides instead of the defaults, and
/// [`ServerBuilder::start`] runs it. `serve`, `demo`, the tests and the
/// examples all start the adapter this way, so none of them can miss a
/// part (TLS, health, presence) that another one has.
pub enum Server {}

impl Server {
    /// A builder for an adapter with `config`. Without anything else it
    /// binds `config.listen`, serves the built-in protocol
    /// `config.protocol_name`, dials `config.emqx`, and runs presence and
    /// history when `config.presence` is set.
    pub fn builder(config: AdapterConfig) -> ServerBuilder {
        ServerBuilder {
            config,
            protocols: Vec::new(),
            registered: Vec::new(),
            handler_listener: None,
            hook_listener: None,
            emqx: None,
        }
    }
}

/// What [`Server::builder`] returns; see there.
#[must_use = "the adapter runs only once `start` is awaited"]
pub struct ServerBuilder {
    config: AdapterConfig,
    /// The default protocol when a caller gives one (at most one), e.g.
    /// one defined outside this crate.
    protocols: Vec<Arc<dyn Protocol>>,
    /// Protocols known by name, for `config.listeners`.
    registered: Vec<Arc<dyn Protocol>>,
    handler_listener: Option<TcpListener>,
    hook_listener: Option<TcpListener>,
    /// Tests put a fake EMQX here.
    emqx: Option<Arc<dyn ConnectionAdapter>>,
}

impl ServerBuilder {
    /// Serves `protocol` instead of the built-in `config.protocol_name`.
    /// Whether it answers `WHO` and `HISTORY` is the protocol's own
    /// business; the store it reads them from runs when `config.presence`
    /// is set.
    pub fn protocol(mut self, protocol: Arc<dyn Protocol>) -> Self {
        self.protocols.push(protocol);
        self
    }

    /// Makes `protocol` known by its name, beside the built-in ones, so
    /// that `config.listeners` (`--listener PORT=NAME`) can map an EMQX
    /// listener to it.
    pub fn register(mut self, protocol: Arc<dyn Protocol>) -> Self {
        self.registered.push(protocol);
        self
    }

    /// Serves the handler services on `listener` instead of binding
    /// `config.listen`. Binding first, on port 0, gives the address to a
    /// peer that must know it before the adapter runs, e.g. a gateway.
    pub fn handler_listener(mut self, listener: TcpListener) -> Self {
        self.handler_listener = Some(listener);
        self
    }

    /// Serves the ExHook server on `listener` instead of binding
    /// `config.presence`'s `exhook_listen`.
    pub fn hook_listener(mut self, listener: TcpListener) -> Self {
        self.hook_listener = Some(listener);
        self
    }

    /// Calls `emqx` instead of dialling `config.emqx` (whose TLS settings
    /// are then not used).
    pub fn emqx(mut self, emqx: Arc<dyn ConnectionAdapter>) -> Self {
        self.emqx = Some(emqx);
        self
    }

    /// Starts the adapter: the handler server, and the hook server and
    /// store when presence is configured.
    ///
    /// # Errors
    /// More than one default protocol, an unknown protocol (default or of
    /// a listener), a listener port mapped twice, a
    /// hook listener without presence settings, a bad EMQX URL, TLS files
    /// that cannot be used, an address that cannot be bound, or a store
    /// that cannot be opened.
    pub async fn start(self) -> anyhow::Result<RunningAdapter> {
        let Self {
            config,
            protocols,
            registered,
            handler_listener,
            hook_listener,
            emqx,
        } = self;
        if hook_listener.is_some() && config.presence.is_none() {
            anyhow::bail!(
                "an ExHook listener needs the presence settings (AdapterConfig::presence)"
            );
        }
        config
            .protocol
            .lines
            .validate()
            .map_err(anyhow::Error::msg)?;
        let protocol = resolve_protocols(&config, &protocols, &registered)?;
        let http_at = match (&config.http, config.metrics) {
            (Some(http), Some(metrics)) if metrics != http.addr => anyhow::bail!(
                "--metrics {metrics} and --http {}: the HTTP listener serves /metrics too; \
                 give only --http",
                http.addr
            ),
            (Some(http), _) => {
                http.validate().map_err(anyhow::Error::msg)?;
                Some(http.addr)
            }
            (None, metrics) => metrics,
        };
        let emqx = match emqx {
            Some(emqx) => emqx,
            None => dial_emqx(&config)?,
        };
        // Everything that can refuse the settings comes before anything is
        // bound or started, so a refusal leaves nothing running.
        let mut builder = tonic::transport::Server::builder();
        if let Some(files) = &config.tls {
            let tls = crate::tls::server_config(files)?;
            builder = builder.tls_config(tls).context("handler TLS settings")?;
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        let (reflection_v1, reflection_v1alpha) = crate::reflection::services(
            &["emqx.exproto.v1"],
            &[tonic_health::pb::FILE_DESCRIPTOR_SET],
            &[
                crate::pb::connection_unary_handler_server::SERVICE_NAME,
                crate::pb::connection_handler_server::SERVICE_NAME,
                tonic_health::pb::health_server::SERVICE_NAME,
            ],
        )?;
        // Takeover comes before anything is bound: a running adapter
        // passes its listening sockets.
        let mut inherited: Option<Box<Inherited>> = None;
        let mut upgrade_listener: Option<UnixListener> = None;
        if let Some(u) = &config.upgrade {
            match upgrade::start(&u.socket, u.timeout).await {
                Ok(upgrade::Start::Fresh(l)) => {
                    if u.required {
                        anyhow::bail!(
                            "no running adapter holds {} to take over from (--upgrade-required)",
                            u.socket.display()
                        );
                    }
                    tracing::info!(socket = %u.socket.display(), "no adapter to take over from; starting fresh, a successor can take over through this socket");
                    upgrade_listener = Some(l);
                }
                Ok(upgrade::Start::Successor(i)) => {
                    tracing::info!(socket = %u.socket.display(), format = i.link.format(), "taking over from the running adapter");
                    inherited = Some(i);
                }
                Err(e) if u.required => {
                    return Err(e).context("cannot take over (--upgrade-required)")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take over; starting fresh");
                }
            }
        }
        let mut from = inherited.as_deref_mut();
        let listener = match handler_listener {
            Some(l) => l,
            None => {
                bind_or_inherit(
                    from.as_mut().and_then(|i| i.handler.take()),
                    config.listen,
                    "handler",
                )
                .await?
            }
        };
        let addr = listener.local_addr()?;
        let accepting = CancellationToken::new();
        let mut offered = Offered::default();
        offered.add(Role::Handler, listener.as_fd())?;
        let (presence, reader) = match &config.presence {
            Some(c) => {
                let hook_listener = match hook_listener {
                    Some(l) => l,
                    None => {
                        bind_or_inherit(
                            from.as_mut().and_then(|i| i.hook.take()),
                            c.exhook_listen,
                            "ExHook",
                        )
                        .await?
                    }
                };
                offered.add(Role::Hook, hook_listener.as_fd())?;
                let p = Presence::start(c, hook_listener, accepting.clone()).await?;
                let reader = StoreReader {
                    store: p.store.clone(),
                    timeout: c.read_timeout,
                };
                (Some(p), Some(reader))
            }
            None => (None, None),
        };
        let mut web = None;
        if let Some(at) = http_at {
            let l = bind_or_inherit(from.as_mut().and_then(|i| i.http.take()), at, "HTTP").await?;
            offered.add(Role::Http, l.as_fd())?;
            match &config.http {
                Some(http) => {
                    let metrics = crate::telemetry::metrics_routes()?;
                    web = Some(crate::web::serve(
                        l,
                        http,
                        reader.clone(),
                        Some(metrics),
                        accepting.clone(),
                    )?);
                }
                None => crate::telemetry::install_prometheus(l, accepting.clone())?,
            }
        }
        if let Some(i) = from.as_mut() {
            if let Some(u) = i.upgrade.take() {
                u.set_nonblocking(true)?;
                upgrade_listener = Some(UnixListener::from_std(u)?);
            }
        }
        let driver_config = DriverConfig {
            clientid_policy: config.protocol.clientid_policy,
            ..config.driver.clone()
        };
        // A successor opens the journal only once its predecessor has
        // flushed it (see `receive_sessions`).
        let (journal, saved) = match (&config.state_dir, &inherited) {
            (Some(dir), None) => {
                let (journal, saved) = open_journal(dir.clone()).await?;
                (Some(journal), saved)
            }
            _ => (None, Default::default()),
        };
        let driver = Driver::start(protocol, emqx, driver_config, reader, journal);
        if driver.journal().is_some() {
            let held = saved.len();
            let restored = driver.restore(saved);
            tracing::info!(
                restored,
                unreadable = held - restored,
                "sessions restored from the state directory"
            );
        }
        let takeover = match (inherited, &config.upgrade) {
            (Some(i), Some(u)) => {
                driver.expect_handoff(u.timeout);
                let driver = driver.clone();
                let state_dir = config.state_dir.clone();
                let within = u.timeout;
                let (took_over, taken) = oneshot::channel();
                tokio::spawn(async move {
                    receive_sessions(driver, i.link, state_dir, within, took_over).await;
                });
                Some(taken)
            }
            _ => None,
        };
        {
            let health = health.clone();
            tokio::spawn(async move {
                health
                    .set_serving::<ConnectionUnaryHandlerServer<UnaryHandler>>()
                    .await;
                health
                    .set_serving::<ConnectionHandlerServer<StreamHandler>>()
                    .await;
            });
        }
        // The standard health service (for orchestrators and
        // grpc_health_probe) and reflection (for grpcurl, grpcui, Postman)
        // share the handler's port.
        let router = builder
            .max_concurrent_streams(config.max_concurrent_streams)
            .initial_connection_window_size(Some(crate::H2_CONNECTION_WINDOW))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(ConnectionUnaryHandlerServer::new(UnaryHandler::new(
                driver.clone(),
            )))
            .add_service(ConnectionHandlerServer::new(StreamHandler::new(
                driver.clone(),
            )));
        let (stop, stopped) = oneshot::channel::<()>();
        // tonic does not apply its own tcp_nodelay to an incoming stream we
        // hand it; Nagle would add tens of ms to every small reply.
        let incoming = crate::upgrade::accept_until(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            accepting.clone(),
        );
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, protocols = ?driver.protocols(), tls = config.tls.is_some(), "handler listening");
        let hook_tls = config.presence.as_ref().is_some_and(|p| p.tls.is_some());
        if config.tls.is_some() || hook_tls {
            tracing::info!(
                "EMQX sends an IP address as TLS SNI when its handler.address or exhook URL holds one; \
                 rustls's warning about it on every handshake is left out of the default log (RUST_LOG shows it). \
                 A host name in the URL avoids it, and EMQX 5.8 needs one to verify the certificate"
            );
        }
        Ok(RunningAdapter {
            addr,
            driver,
            stop: Some(stop),
            task,
            grace: config.shutdown_grace,
            health,
            presence,
            web,
            accepting,
            offered,
            upgrade: upgrade_listener,
            takeover,
            upgrade_timeout: config
                .upgrade
                .as_ref()
                .map_or(Duration::from_secs(15), |u| u.timeout),
        })
    }
}

/// The inherited listener when it is the one `wanted` names (or `wanted`
/// asks for any port), else a new one bound at `wanted`.
async fn bind_or_inherit(
    inherited: Option<std::net::TcpListener>,
    wanted: SocketAddr,
    what: &str,
) -> anyhow::Result<TcpListener> {
    if let Some(l) = inherited {
        let have = l.local_addr()?;
        if have == wanted || (wanted.port() == 0 && have.ip() == wanted.ip()) {
            l.set_nonblocking(true)?;
            return Ok(TcpListener::from_std(l)?);
        }
        tracing::warn!(%have, %wanted, "the predecessor's {what} listener is not the one configured; binding the configured one");
    }
    TcpListener::bind(wanted)
        .await
        .with_context(|| format!("cannot listen on {wanted} ({what})"))
}

async fn open_journal(dir: PathBuf) -> anyhow::Result<(Journal, crate::journal::Saved)> {
    let opened = tokio::task::spawn_blocking(move || Journal::open(&dir).map_err(|e| (dir, e)))
        .await
        .context("journal task")?;
    opened.map_err(|(dir, e)| {
        anyhow::anyhow!("cannot use the state directory {}: {e}", dir.display())
    })
}

/// The successor's side of a takeover: adopts each session as it arrives
/// (events that wait for it follow), within `within`; then no event waits
/// for a handoff any more.
async fn receive_sessions(
    driver: Arc<Driver>,
    mut link: Link,
    state_dir: Option<PathBuf>,
    within: Duration,
    took_over: oneshot::Sender<()>,
) {
    let started = tokio::time::Instant::now();
    let mut adopted = 0u64;
    let mut waited = 0usize;
    let mut refused = 0u64;
    // Sessions, bounded by `within`; then the events the predecessor
    // relays until EMQX has left it (bounded by its own grace).
    let sessions = tokio::time::timeout(within, async {
        loop {
            match link.next().await? {
                upgrade::Frame::Begin => {
                    if let Some(dir) = &state_dir {
                        match open_journal(dir.clone()).await {
                            // What the journal holds is what just came, older.
                            Ok((journal, _older)) => {
                                driver.set_journal(journal);
                            }
                            Err(e) => tracing::error!(error = %e, "sessions are not journaled"),
                        }
                    }
                }
                upgrade::Frame::Session(conn, state) => match driver.adopt(&conn, &state) {
                    crate::session::Adopted::Yes(n) => {
                        adopted += 1;
                        waited += n;
                    }
                    _ => refused += 1,
                },
                upgrade::Frame::End(sent) => {
                    if sent != adopted + refused {
                        tracing::warn!(
                            sent,
                            got = adopted + refused,
                            "the predecessor's count differs"
                        );
                    }
                    return Ok(());
                }
                upgrade::Frame::Event { rpc, flags, body } => {
                    relay_in(&driver, rpc, flags, &body).await;
                    link.served().await?;
                }
                upgrade::Frame::Sync => link.served().await?,
                upgrade::Frame::Close => {
                    return Err(std::io::Error::other(
                        "closed before every session was sent",
                    ))
                }
            }
        }
    })
    .await;
    driver.end_handoff();
    // systemd must know the new main PID before the old one exits, which
    // it does once told DONE.
    upgrade::notify_systemd(&[]);
    let _ = took_over.send(());
    match sessions {
        Ok(Ok(())) => tracing::info!(
            sessions = adopted,
            refused,
            events_waited = waited,
            took = ?started.elapsed(),
            "took over every session"
        ),
        Ok(Err(e)) => {
            tracing::error!(error = %e, sessions = adopted, "the takeover broke off; the sessions not received are lost");
            return;
        }
        Err(_) => {
            tracing::error!(
                ?within,
                sessions = adopted,
                "the takeover took too long; the sessions not received are lost"
            );
            return;
        }
    }
    let mut relayed = 0u64;
    // The predecessor exits without a word once EMQX has left it.
    let left = async {
        loop {
            let frame = match link.next().await {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                other => other?,
            };
            match frame {
                upgrade::Frame::Event { rpc, flags, body } => {
                    relayed += 1;
                    relay_in(&driver, rpc, flags, &body).await;
                    link.served().await?;
                }
                upgrade::Frame::Sync => link.served().await?,
                upgrade::Frame::Close => break,
                other => tracing::warn!(frame = ?other, "unexpected frame from the predecessor"),
            }
        }
        link.done().await
    }
    .await;
    match left {
        Ok(()) => tracing::info!(relayed, took = ?started.elapsed(), "the predecessor has left"),
        Err(e) => tracing::warn!(error = %e, relayed, "the predecessor left without a word"),
    }
}

/// Serves one event that the predecessor relayed.
async fn relay_in(driver: &Arc<Driver>, rpc: u8, flags: u8, body: &[u8]) {
    if let Err(e) = crate::handler::relayed(driver, rpc, flags, body).await {
        tracing::warn!(error = %e, "a relayed event was dropped");
    }
}

/// The EMQX client `config` describes; it connects on its first call.
fn dial_emqx(config: &AdapterConfig) -> anyhow::Result<Arc<dyn ConnectionAdapter>> {
    let tls = crate::tls::emqx_config(&config.emqx, &config.emqx_tls)?;
    let emqx = GrpcAdapter::with_tls(&config.emqx, config.call_timeout, tls)
        .with_context(|| format!("invalid EMQX URL or TLS settings {:?}", config.emqx))?;
    Ok(Arc::new(emqx))
}

/// The built-in protocol `config` names, with WHO and HISTORY enabled
/// exactly when the presence service runs.
fn builtin_protocol(config: &AdapterConfig, name: &str) -> Option<Arc<dyn Protocol>> {
    let mut protocol_config = config.protocol.clone();
    protocol_config.presence_history = config.presence.is_some();
    protocol::by_name(name, &protocol_config)
}

/// The default protocol (the one given to [`ServerBuilder::protocol`], else
/// `config.protocol_name`) and the protocol of each mapped listener, from
/// the built-in and registered ones.
fn resolve_protocols(
    config: &AdapterConfig,
    default: &[Arc<dyn Protocol>],
    registered: &[Arc<dyn Protocol>],
) -> anyhow::Result<crate::session::Protocols> {
    let lookup = |name: &str, what: String| -> anyhow::Result<Arc<dyn Protocol>> {
        registered
            .iter()
            .chain(default)
            .find(|p| p.name() == name)
            .cloned()
            .or_else(|| builtin_protocol(config, name))
            .with_context(|| {
                let mut known: Vec<&str> = protocol::NAMES.to_vec();
                known.extend(registered.iter().chain(default).map(|p| p.name()));
                known.sort_unstable();
                known.dedup();
                format!(
                    "unknown protocol {name:?}{what} (known: {})",
                    known.join(", ")
                )
            })
    };
    let default = match default {
        [] => lookup(&config.protocol_name, String::new())?,
        [one] => one.clone(),
        many => anyhow::bail!(
            "{} default protocols given; register the others with `register` and map them to listeners",
            many.len()
        ),
    };
    let mut by_port = Vec::with_capacity(config.listeners.len());
    for (port, name) in &config.listeners {
        if by_port.iter().any(|(p, _)| p == port) {
            anyhow::bail!("listener port {port} is mapped twice (--listener)");
        }
        by_port.push((*port, lookup(name, format!(" for listener port {port}"))?));
    }
    Ok(crate::session::Protocols::new(default, by_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(protocol: &str, listeners: &[(u16, &str)]) -> AdapterConfig {
        AdapterConfig {
            protocol_name: protocol.into(),
            listeners: listeners
                .iter()
                .map(|(p, n)| (*p, (*n).to_owned()))
                .collect(),
            ..AdapterConfig::default()
        }
    }

    /// A protocol a binary brings, known only by registration.
    struct Other;

    impl Protocol for Other {
        fn name(&self) -> &'static str {
            "other"
        }
        fn new_session(&self, init: protocol::SessionInit) -> Box<dyn protocol::Session> {
            builtin_protocol(&AdapterConfig::default(), "chat")
                .unwrap()
                .new_session(init)
        }
        fn lost_session_bytes(&self) -> bytes::Bytes {
            bytes::Bytes::new()
        }
    }

    #[test]
    fn listeners_map_to_built_in_and_registered_protocols() {
        let other: Arc<dyn Protocol> = Arc::new(Other);
        let p = resolve_protocols(
            &config("chat", &[(7994, "lines"), (7995, "other")]),
            &[],
            std::slice::from_ref(&other),
        )
        .unwrap();
        let at = |port: u16| Some(SocketAddr::from(([127, 0, 0, 1], port)));
        assert_eq!(p.default().name(), "chat");
        assert_eq!(p.for_listener(at(7993)).name(), "chat");
        assert_eq!(p.for_listener(at(7994)).name(), "lines");
        assert_eq!(p.for_listener(at(7995)).name(), "other");
        assert_eq!(p.for_listener(None).name(), "chat");
        assert_eq!(p.by_name("other").unwrap().name(), "other");
        let e = resolve_protocols(&config("chat", &[(7994, "lines2")]), &[], &[other])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "unknown protocol \"lines2\" for listener port 7994 (known: chat, lines, other)"
            ),
            "{e}"
        );
        let e = resolve_protocols(&config("chat", &[(7994, "chat"), (7994, "chat")]), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mapped twice"), "{e}");
    }
}
