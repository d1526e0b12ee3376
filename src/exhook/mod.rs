//! The ExHook server: EMQX's `HookProvider` (its `exhook.servers` setting
//! points here), which hears when any client connects or disconnects and
//! what is published on the history topics, and keeps that in the
//! [`Store`] for `WHO` and `HISTORY`.
//!
//! Flow: EMQX -> `service` (tonic, `emqx.exhook.v2` and `v3`, thin) ->
//! `HookCore` (version-independent; answers at once and offers a record
//! to a bounded queue) -> the writer task -> the store. A retention task
//! trims history in the background.
//!
//! EMQX runs these hooks inline in each client's connection process, so
//! every answer is immediate: `OnMessagePublish` never alters or holds a
//! message, whatever the database does. When the queue is full a record is
//! dropped and counted ([`StatsSnapshot::dropped`]); a record the queue
//! accepted is written eventually, the writer retrying while the database
//! is away.

mod core;
pub mod emqx_api;
mod reconcile;
pub mod service;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

pub use self::core::{HookCore, HookSpec, HookStats, StatsSnapshot};
pub use self::emqx_api::EmqxApi;
pub use self::reconcile::ReconcileConfig;
use crate::store::{Retention, Store};

/// Code generated from EMQX's `exhook.proto`, both versions.
pub mod pb {
    /// `emqx.exhook.v2`, what EMQX 5.0 to 5.8 speak.
    pub mod v2 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("emqx.exhook.v2");
    }
    /// `emqx.exhook.v3`, what EMQX 5.9 and later speak.
    pub mod v3 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("emqx.exhook.v3");
    }
}

/// How the hook server stores what it hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    /// Topic filters whose messages are stored.
    pub history_topics: Vec<String>,
    /// Records waiting for the database at most; more are dropped and
    /// counted, so a slow database never slows EMQX down.
    pub queue: usize,
    /// Records written in one transaction at most.
    pub batch: usize,
    /// How much history is kept.
    pub retention: Retention,
    /// How often retention runs.
    pub retention_every: Duration,
    /// How long after a node unloads the provider its clients are taken
    /// for gone, unless it loads the provider again first (a settings
    /// change, not a stop).
    pub node_stop_grace: Duration,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            history_topics: vec!["chat/#".to_string()],
            queue: 10_000,
            batch: 256,
            retention: Retention {
                max_per_topic: Some(1_000),
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            },
            retention_every: Duration::from_secs(60),
            node_stop_grace: Duration::from_secs(10),
        }
    }
}

/// The hook server's running parts: the core, the writer and retention
/// tasks, and once [`Hooks::serve`] is called the gRPC server.
pub struct Hooks {
    core: Arc<HookCore>,
    store: Arc<dyn Store>,
    /// Set to the moment the writer must give up, to begin shutdown.
    shutdown: watch::Sender<Option<Instant>>,
    writer: JoinHandle<()>,
    retention: JoinHandle<()>,
    /// The reconciler, once started; stopped with the hook server, since
    /// it no longer hears the disconnects it must not undo.
    reconciler: std::sync::Mutex<Option<JoinHandle<()>>>,
    server: Option<Server>,
}

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Hooks {
    /// Starts the writer and retention tasks over `store`. Needs a tokio
    /// runtime.
    pub fn start(store: Arc<dyn Store>, config: &HookConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stats = Arc::new(HookStats::default());
        let (shutdown, shutdown_rx) = watch::channel(None);
        let writer = writer::Writer::new(store.clone(), stats.clone(), config.batch, shutdown_rx);
        let writer = tokio::spawn(writer.run(rx));
        let retention = tokio::spawn(writer::retention(
            store.clone(),
            config.retention,
            config.retention_every,
        ));
        Self {
            core: Arc::new(HookCore::new(
                config.history_topics.clone(),
                tx,
                stats,
                config.node_stop_grace,
            )),
            store,
            shutdown,
            writer,
            retention,
            reconciler: std::sync::Mutex::new(None),
            server: None,
        }
    }

    /// Serves both `HookProvider` versions on `listener` until
    /// [`Hooks::shutdown`], with gRPC reflection that lists just those.
    ///
    /// # Errors
    /// When the listener's address cannot be read, or the crate's own
    /// descriptors cannot be decoded for reflection.
    pub fn serve(&mut self, listener: TcpListener) -> anyhow::Result<SocketAddr> {
        self.serve_until(listener, tokio_util::sync::CancellationToken::new())
    }

    /// [`serve`](Self::serve), but stops accepting connections once
    /// `accepting` is cancelled (the connections it has stay served):
    /// another process took the listening socket.
    ///
    /// # Errors
    /// When the reflection descriptors do not decode, or the listener has
    /// no address.
    pub fn serve_until(
        &mut self,
        listener: TcpListener,
        accepting: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<SocketAddr> {
        self.serve_tls_until(listener, accepting, None)
    }

    /// [`serve_until`](Self::serve_until), over TLS with `tls` (EMQX's
    /// `exhook.servers[].ssl`; with a client CA, mutual TLS).
    ///
    /// # Errors
    /// As `serve_until`, and TLS settings tonic refuses.
    pub fn serve_tls_until(
        &mut self,
        listener: TcpListener,
        accepting: tokio_util::sync::CancellationToken,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> anyhow::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let encrypted = tls.is_some();
        let (reflection_v1, reflection_v1alpha) = crate::reflection::services(
            &["emqx.exhook.v2", "emqx.exhook.v3"],
            &[],
            &[
                pb::v2::hook_provider_server::SERVICE_NAME,
                pb::v3::hook_provider_server::SERVICE_NAME,
            ],
        )?;
        let (stop, stopped) = oneshot::channel::<()>();
        // Hook answers are tiny; Nagle would hold each one back.
        let incoming = crate::upgrade::accept_until(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            accepting,
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            use anyhow::Context as _;
            builder = builder.tls_config(tls).context("ExHook TLS settings")?;
        }
        let router = builder
            .initial_connection_window_size(Some(crate::H2_CONNECTION_WINDOW))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service::v2::Service::server(self.core.clone()))
            .add_service(service::v3::Service::server(self.core.clone()));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        info!(%addr, tls = encrypted, "exhook server listening");
        self.server = Some(Server { addr, stop, task });
        Ok(addr)
    }

    /// Reconciles presence with EMQX's client list from now on (see
    /// `reconcile`): after this hook server's outage, after a node loads
    /// the provider, and every `config.every`.
    pub fn reconcile(&self, config: ReconcileConfig) {
        let task = reconcile::Reconciler::start(config, self.store.clone(), self.core.clone());
        let old = self
            .reconciler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(task);
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Where the gRPC server listens, once serving.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.addr)
    }

    /// The version-independent hook handling, e.g. for a caller in the
    /// same process.
    pub fn core(&self) -> &Arc<HookCore> {
        &self.core
    }

    /// What happened to the hooks so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.core.stats()
    }

    /// Stops the gRPC server, then lets the writer empty the queue for at
    /// most `grace`; what is left then is counted as abandoned.
    ///
    /// # Errors
    /// When the gRPC server had failed.
    pub async fn shutdown(
        mut self,
        grace: Duration,
    ) -> Result<StatsSnapshot, tonic::transport::Error> {
        let mut served = Ok(());
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            served = match server.task.await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "exhook server task failed");
                    Ok(())
                }
            };
        }
        self.shutdown.send_replace(Some(Instant::now() + grace));
        // A store call that hangs (rather than fails) never reaches the
        // writer's own deadline check; bound the wait here too.
        let writer = &mut self.writer;
        if tokio::time::timeout(grace + Duration::from_secs(1), writer)
            .await
            .is_err()
        {
            self.writer.abort();
            let left = self.core.stats();
            let lost = left
                .queued
                .saturating_sub(left.written + left.rejected + left.abandoned);
            self.core.count_abandoned(lost);
            warn!(
                records = lost,
                "store hung at shutdown; unwritten hook records abandoned"
            );
        }
        self.retention.abort();
        if let Some(task) = self
            .reconciler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        served?;
        Ok(self.core.stats())
    }
}
