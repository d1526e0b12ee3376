//! Connection scale: many idle, authenticated connections, and what they
//! cost the handler in memory.
//!
//! Real sockets run out of loopback ports near 28k per source address, so
//! here the tool plays EMQX itself over gRPC with synthetic connections (the
//! handler cannot tell the difference): its own minimal ConnectionAdapter
//! answers SUCCESS to every call, and for each connection it sends
//! `OnSocketCreated` then `OnReceivedBytes("CONNECT s<i>\n")`, with bounded
//! concurrency. A connection counts as established when the handler has
//! sent its `OK CONNECT` line. Conn ids are 48-character base64-like
//! strings, the size of EMQX's (base64 of an Erlang term).
//!
//! In streaming mode each connection holds the streams EMQX would hold for
//! an idle authenticated connection: one `OnSocketCreated` and one
//! `OnReceivedBytes` stream, left open after their single request (EMQX
//! opens a stream per RPC kind on first use and keeps it for the life of
//! the connection; `streams_per_conn` up to 5 also opens the timer,
//! messages and closed streams, with no request on them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::dev_gateway::HandlerMode;
use crate::pb;
use crate::pb::connection_adapter_server::{ConnectionAdapter, ConnectionAdapterServer};
use crate::pb::connection_handler_client::ConnectionHandlerClient;
use crate::pb::connection_unary_handler_client::ConnectionUnaryHandlerClient;

/// Calls the synthetic EMQX has answered.
#[derive(Default)]
pub struct Counts {
    pub calls: AtomicU64,
    pub authenticated: AtomicU64,
    /// `Send`s that carried an `OK CONNECT` line: established connections.
    pub connected: AtomicU64,
}

struct FakeEmqx {
    counts: Arc<Counts>,
}

fn success() -> Result<Response<pb::CodeResponse>, Status> {
    Ok(Response::new(pb::CodeResponse {
        code: pb::ResultCode::Success as i32,
        message: String::new(),
    }))
}

#[tonic::async_trait]
impl ConnectionAdapter for FakeEmqx {
    async fn send(
        &self,
        req: Request<pb::SendBytesRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        if memchr::memmem::find(&req.get_ref().bytes, b"OK CONNECT").is_some() {
            self.counts.connected.fetch_add(1, Ordering::Relaxed);
        }
        success()
    }
    async fn close(
        &self,
        _: Request<pb::CloseSocketRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        success()
    }
    async fn authenticate(
        &self,
        _: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        self.counts.authenticated.fetch_add(1, Ordering::Relaxed);
        success()
    }
    async fn start_timer(
        &self,
        _: Request<pb::TimerRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        success()
    }
    async fn publish(
        &self,
        _: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        success()
    }
    async fn raw_publish(
        &self,
        _: Request<pb::RawPublishRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        success()
    }
    async fn subscribe(
        &self,
        _: Request<pb::SubscribeRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        success()
    }
    async fn unsubscribe(
        &self,
        _: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::CodeResponse>, Status> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        success()
    }
}

/// A running synthetic ConnectionAdapter.
pub struct FakeGateway {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the synthetic ConnectionAdapter on `listen` (port 0 for any).
///
/// # Errors
/// The address cannot be bound.
pub async fn start_fake_gateway(listen: SocketAddr) -> anyhow::Result<FakeGateway> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let counts = Arc::new(Counts::default());
    let svc = ConnectionAdapterServer::new(FakeEmqx {
        counts: counts.clone(),
    });
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .initial_connection_window_size(Some(crate::H2_CONNECTION_WINDOW))
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "synthetic ConnectionAdapter failed");
        }
    });
    Ok(FakeGateway { addr, counts, task })
}

/// The synthetic conn id of connection `i`.
pub fn conn_id(i: usize) -> String {
    // 48 characters like EMQX's base64 terms; unique by the number.
    format!("g2gDZAANbm9ub2RlQG5vaG9zdGEAYgAA{i:016}")
}

/// Streaming mode: connections whose streams share one HTTP/2 connection.
const STREAM_CONNS_PER_CHANNEL: usize = 200;

/// One scale run.
#[derive(Debug, Clone)]
pub struct ScalePlan {
    pub handler_url: String,
    pub mode: HandlerMode,
    pub connections: usize,
    pub concurrency: usize,
    pub streams_per_conn: usize,
    /// How long establishing may take at most.
    pub timeout: Duration,
}

/// The open streams of a streaming-mode connection (their senders, of
/// several types); dropping them ends the streams.
pub type Held = Vec<Box<dyn std::any::Any + Send>>;

/// Establishes the connections; returns the time it took and whatever
/// must stay alive for them to stay open (streams).
///
/// # Errors
/// A handler call fails, or not all connections are established in time.
pub async fn establish(plan: &ScalePlan, counts: &Counts) -> anyhow::Result<(Duration, Vec<Held>)> {
    let channel = Endpoint::from_shared(plan.handler_url.clone())?
        .tcp_nodelay(true)
        .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
        .connect_lazy();
    let start = Instant::now();
    let base = counts.connected.load(Ordering::Relaxed);
    let mut keep: Vec<Held> = Vec::new();
    match plan.mode {
        HandlerMode::Unary => {
            let client = ConnectionUnaryHandlerClient::new(channel);
            let mut calls = futures::stream::iter(0..plan.connections)
                .map(|i| {
                    let mut c = client.clone();
                    async move {
                        let conn = conn_id(i);
                        c.on_socket_created(created(&conn)).await?;
                        c.on_received_bytes(pb::ReceivedBytesRequest {
                            conn,
                            bytes: Bytes::from(format!("CONNECT s{i}\n")),
                        })
                        .await?;
                        Ok::<_, Status>(())
                    }
                })
                .buffer_unordered(plan.concurrency.max(1));
            while let Some(r) = calls.next().await {
                r.context("handler call failed")?;
            }
        }
        HandlerMode::Stream => {
            // Several HTTP/2 connections, as EMQX's client pool has: one
            // connection stalled with many thousands of long-lived streams.
            let pool: Vec<_> = (0..plan.connections.div_ceil(STREAM_CONNS_PER_CHANNEL))
                .map(|_| {
                    Endpoint::from_shared(plan.handler_url.clone()).map(|e| {
                        ConnectionHandlerClient::new(
                            e.tcp_nodelay(true)
                                .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
                                .connect_lazy(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            let mut opened = futures::stream::iter(0..plan.connections)
                .map(|i| {
                    open_streams(
                        pool[i / STREAM_CONNS_PER_CHANNEL].clone(),
                        i,
                        plan.streams_per_conn,
                    )
                })
                .buffer_unordered(plan.concurrency.max(1));
            while let Some(r) = opened.next().await {
                keep.push(r?);
                if keep.len().is_multiple_of(1000) {
                    tracing::info!(opened = keep.len(), "streams opened");
                }
            }
        }
    }
    let target = base + plan.connections as u64;
    let deadline = start + plan.timeout;
    let mut report = Instant::now() + Duration::from_secs(5);
    while counts.connected.load(Ordering::Relaxed) < target {
        if Instant::now() >= report {
            report += Duration::from_secs(5);
            tracing::info!(
                connected = counts.connected.load(Ordering::Relaxed) - base,
                of = plan.connections,
                "establishing"
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "only {} of {} connections established within {:?}",
                counts.connected.load(Ordering::Relaxed) - base,
                plan.connections,
                plan.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((start.elapsed(), keep))
}

fn created(conn: &str) -> pb::SocketCreatedRequest {
    pb::SocketCreatedRequest {
        conn: conn.to_owned(),
        conninfo: Some(pb::ConnInfo {
            socktype: pb::SocketType::Tcp as i32,
            peername: Some(pb::Address {
                host: "127.0.0.1".into(),
                port: 40000,
            }),
            sockname: Some(pb::Address {
                host: "127.0.0.1".into(),
                port: 7993,
            }),
            peercert: None,
        }),
    }
}

/// Opens a connection's streams, writes its two events, keeps them open.
async fn open_streams(
    client: ConnectionHandlerClient<Channel>,
    i: usize,
    streams: usize,
) -> anyhow::Result<Held> {
    let conn = conn_id(i);
    let mut held: Held = Vec::with_capacity(streams);
    // Each stream is one RPC whose answer only comes when the stream ends;
    // a task waits for it while the sender, kept in `held`, keeps the
    // stream open.
    macro_rules! stream {
        ($rpc:ident, $first:expr) => {{
            let (tx, rx) = mpsc::channel(1);
            if let Some(first) = $first {
                tx.send(first).await.context("stream closed")?;
            }
            let mut c = client.clone();
            tokio::spawn(async move {
                let _ = c.$rpc(ReceiverStream::new(rx)).await;
            });
            held.push(Box::new(tx));
        }};
    }
    stream!(on_socket_created, Some(created(&conn)));
    stream!(
        on_received_bytes,
        Some(pb::ReceivedBytesRequest {
            conn: conn.clone(),
            bytes: Bytes::from(format!("CONNECT s{i}\n")),
        })
    );
    if streams > 2 {
        stream!(on_timer_timeout, None::<pb::TimerTimeoutRequest>);
    }
    if streams > 3 {
        stream!(on_received_messages, None::<pb::ReceivedMessagesRequest>);
    }
    if streams > 4 {
        stream!(on_socket_closed, None::<pb::SocketClosedRequest>);
    }
    Ok(held)
}

/// Sends `PING` for synthetic connection `i` (unary), as EMQX would.
///
/// # Errors
/// The handler cannot be reached or answers with an error.
pub async fn ping(handler_url: &str, i: usize) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(handler_url.to_owned())?
        .connect()
        .await?;
    ConnectionUnaryHandlerClient::new(channel)
        .on_received_bytes(pb::ReceivedBytesRequest {
            conn: conn_id(i),
            bytes: Bytes::from_static(b"PING\n"),
        })
        .await?;
    Ok(())
}

/// One closed-loop run of bare handler calls: `conns` synthetic connections,
/// each with one `OnReceivedBytes` in flight at a time (EMQX's rule), for
/// `warmup + duration`. Measures the gRPC hop alone (`--handler noop`).
#[derive(Debug, Clone)]
pub struct HopPlan {
    pub handler_url: String,
    pub conns: usize,
    pub payload: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Calls answered in the measured window and their round trips.
#[derive(Debug, Default)]
pub struct HopOutcome {
    pub calls: u64,
    pub errors: u64,
    pub latencies_us: Vec<u64>,
}

/// Runs a [`HopPlan`]; `on_window` learns the measured window first.
///
/// # Errors
/// The handler cannot be reached or rejects socket creation.
pub async fn hop(
    plan: &HopPlan,
    on_window: impl FnOnce(Instant, Instant),
) -> anyhow::Result<HopOutcome> {
    let channel = Endpoint::from_shared(plan.handler_url.clone())?
        .tcp_nodelay(true)
        .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
        .connect_lazy();
    let client = ConnectionUnaryHandlerClient::new(channel);
    for i in 0..plan.conns {
        client
            .clone()
            .on_socket_created(created(&conn_id(i)))
            .await
            .context("OnSocketCreated failed")?;
    }
    let start = Instant::now();
    let (from, to) = (start + plan.warmup, start + plan.warmup + plan.duration);
    on_window(from, to);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..plan.conns {
        let mut c = client.clone();
        let conn = conn_id(i);
        let mut line = Vec::new();
        super::stats::encode_payload(0, 0, plan.payload, &mut line);
        line.push(b'\n');
        let bytes = Bytes::from(line);
        tasks.spawn(async move {
            let mut out = HopOutcome::default();
            loop {
                let t = Instant::now();
                if t >= to {
                    break;
                }
                let r = c
                    .on_received_bytes(pb::ReceivedBytesRequest {
                        conn: conn.clone(),
                        bytes: bytes.clone(),
                    })
                    .await;
                let done = Instant::now();
                if done >= from && done < to {
                    match r {
                        Ok(_) => {
                            out.calls += 1;
                            out.latencies_us
                                .push(u64::try_from((done - t).as_micros()).unwrap_or(u64::MAX));
                        }
                        Err(_) => out.errors += 1,
                    }
                }
            }
            out
        });
    }
    let mut total = HopOutcome::default();
    while let Some(r) = tasks.join_next().await {
        let o = r.context("hop task")?;
        total.calls += o.calls;
        total.errors += o.errors;
        total.latencies_us.extend(o.latencies_us);
    }
    Ok(total)
}
