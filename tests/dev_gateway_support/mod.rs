//! Shared by the dev gateway's integration tests: an in-test handler that
//! serves both handler services and records every event, and that a test
//! can stop as if its process died and start again; a scripted behaviour
//! that drives the ConnectionAdapter from client lines; a line client; and
//! waits with deadlines instead of sleeps.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use exproto_adapter::dev_gateway::{DevGateway, GatewayConfig};
use exproto_adapter::pb;
use exproto_adapter::pb::connection_adapter_client::ConnectionAdapterClient;
use exproto_adapter::pb::connection_handler_server::{ConnectionHandler, ConnectionHandlerServer};
use exproto_adapter::pb::connection_unary_handler_server::{
    ConnectionUnaryHandler, ConnectionUnaryHandlerServer,
};
use futures::future::BoxFuture;
use futures::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

// WAIT: how long any awaited event may take before the test fails.
#[path = "../support/line_client.rs"]
mod line_client;
pub use line_client::{Client, WAIT};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// One handler event as the test handler saw it.
#[derive(Debug, Clone)]
pub enum Ev {
    Created {
        conn: String,
        info: pb::ConnInfo,
    },
    Bytes {
        conn: String,
        bytes: Vec<u8>,
    },
    Timer {
        conn: String,
        kind: i32,
    },
    Messages {
        conn: String,
        msgs: Vec<pb::Message>,
    },
    Closed {
        conn: String,
        reason: String,
    },
}

impl Ev {
    pub fn conn(&self) -> &str {
        match self {
            Ev::Created { conn, .. }
            | Ev::Bytes { conn, .. }
            | Ev::Timer { conn, .. }
            | Ev::Messages { conn, .. }
            | Ev::Closed { conn, .. } => conn,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Ev::Created { .. } => "created",
            Ev::Bytes { .. } => "bytes",
            Ev::Timer { .. } => "timer",
            Ev::Messages { .. } => "messages",
            Ev::Closed { .. } => "closed",
        }
    }
}

pub type Behavior = Arc<dyn Fn(Ev) -> BoxFuture<'static, Result<(), Status>> + Send + Sync>;

/// A behaviour that only records.
pub fn quiet() -> Behavior {
    Arc::new(|_| Box::pin(async { Ok(()) }))
}

#[derive(Clone)]
struct TestHandler {
    events: mpsc::UnboundedSender<Ev>,
    behavior: Behavior,
    inflight: Arc<Mutex<HashMap<String, usize>>>,
    max_inflight: Arc<AtomicUsize>,
}

impl TestHandler {
    async fn handle(&self, ev: Ev) -> Result<(), Status> {
        let conn = ev.conn().to_owned();
        let now = {
            let mut map = self.inflight.lock().unwrap();
            let n = map.entry(conn.clone()).or_default();
            *n += 1;
            *n
        };
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        let _ = self.events.send(ev.clone());
        let res = (self.behavior)(ev).await;
        *self.inflight.lock().unwrap().entry(conn).or_default() -= 1;
        res
    }
}

fn created(r: pb::SocketCreatedRequest) -> Ev {
    Ev::Created {
        conn: r.conn,
        info: r.conninfo.unwrap_or_default(),
    }
}
fn bytes(r: pb::ReceivedBytesRequest) -> Ev {
    Ev::Bytes {
        conn: r.conn,
        bytes: r.bytes.to_vec(),
    }
}
fn timer(r: pb::TimerTimeoutRequest) -> Ev {
    Ev::Timer {
        conn: r.conn,
        kind: r.r#type,
    }
}
fn messages(r: pb::ReceivedMessagesRequest) -> Ev {
    Ev::Messages {
        conn: r.conn,
        msgs: r.messages,
    }
}
fn closed(r: pb::SocketClosedRequest) -> Ev {
    Ev::Closed {
        conn: r.conn,
        reason: r.reason,
    }
}

type Empty = Result<Response<pb::EmptySuccess>, Status>;

#[tonic::async_trait]
impl ConnectionUnaryHandler for TestHandler {
    async fn on_socket_created(&self, r: Request<pb::SocketCreatedRequest>) -> Empty {
        self.handle(created(r.into_inner())).await?;
        Ok(Response::new(pb::EmptySuccess {}))
    }
    async fn on_socket_closed(&self, r: Request<pb::SocketClosedRequest>) -> Empty {
        self.handle(closed(r.into_inner())).await?;
        Ok(Response::new(pb::EmptySuccess {}))
    }
    async fn on_received_bytes(&self, r: Request<pb::ReceivedBytesRequest>) -> Empty {
        self.handle(bytes(r.into_inner())).await?;
        Ok(Response::new(pb::EmptySuccess {}))
    }
    async fn on_timer_timeout(&self, r: Request<pb::TimerTimeoutRequest>) -> Empty {
        self.handle(timer(r.into_inner())).await?;
        Ok(Response::new(pb::EmptySuccess {}))
    }
    async fn on_received_messages(&self, r: Request<pb::ReceivedMessagesRequest>) -> Empty {
        self.handle(messages(r.into_inner())).await?;
        Ok(Response::new(pb::EmptySuccess {}))
    }
}

impl TestHandler {
    async fn drain<T>(&self, mut s: Streaming<T>, f: fn(T) -> Ev) -> Empty {
        while let Some(req) = s.message().await? {
            self.handle(f(req)).await?;
        }
        Ok(Response::new(pb::EmptySuccess {}))
    }
}

#[tonic::async_trait]
impl ConnectionHandler for TestHandler {
    async fn on_socket_created(&self, r: Request<Streaming<pb::SocketCreatedRequest>>) -> Empty {
        self.drain(r.into_inner(), created).await
    }
    async fn on_socket_closed(&self, r: Request<Streaming<pb::SocketClosedRequest>>) -> Empty {
        self.drain(r.into_inner(), closed).await
    }
    async fn on_received_bytes(&self, r: Request<Streaming<pb::ReceivedBytesRequest>>) -> Empty {
        self.drain(r.into_inner(), bytes).await
    }
    async fn on_timer_timeout(&self, r: Request<Streaming<pb::TimerTimeoutRequest>>) -> Empty {
        self.drain(r.into_inner(), timer).await
    }
    async fn on_received_messages(
        &self,
        r: Request<Streaming<pb::ReceivedMessagesRequest>>,
    ) -> Empty {
        self.drain(r.into_inner(), messages).await
    }
}

/// The recorded events of every connection, with deadline waits.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Ev>,
    pub seen: Vec<Ev>,
}

impl Events {
    fn drain_ready(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            self.seen.push(ev);
        }
    }

    /// The first recorded event that matches, waiting for it if needed.
    pub async fn wait(&mut self, what: &str, pred: impl Fn(&Ev) -> bool) -> Ev {
        self.drain_ready();
        if let Some(ev) = self.seen.iter().find(|e| pred(e)) {
            return ev.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return ev;
                    }
                }
                Ok(None) => panic!("handler gone while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}; seen: {:#?}", self.seen),
            }
        }
    }

    /// Waits until `cond` holds for everything recorded so far.
    pub async fn until(&mut self, what: &str, cond: impl Fn(&[Ev]) -> bool) {
        self.drain_ready();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(&self.seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.seen.push(ev),
                Ok(None) => panic!("handler gone while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}; seen: {:#?}", self.seen),
            }
        }
    }

    pub async fn created(&mut self) -> String {
        self.wait("OnSocketCreated", |e| matches!(e, Ev::Created { .. }))
            .await
            .conn()
            .to_owned()
    }

    /// The close reason of `conn`.
    pub async fn closed(&mut self, conn: &str) -> String {
        match self
            .wait(
                &format!("OnSocketClosed of {conn}"),
                |e| matches!(e, Ev::Closed { conn: c, .. } if c == conn),
            )
            .await
        {
            Ev::Closed { reason, .. } => reason,
            _ => unreachable!(),
        }
    }

    /// Everything recorded so far for `conn`, in arrival order.
    pub fn of(&mut self, conn: &str) -> Vec<Ev> {
        self.drain_ready();
        self.seen
            .iter()
            .filter(|e| e.conn() == conn)
            .cloned()
            .collect()
    }
}

/// A running test handler.
pub struct Handler {
    pub url: String,
    pub max_inflight: Arc<AtomicUsize>,
}

pub async fn start_handler(behavior: Behavior) -> (Handler, Events) {
    let (process, events) = HandlerProcess::start(behavior).await;
    // Dropping the process leaves it serving, until the test's runtime ends.
    (process.handle(), events)
}

/// A test handler that can die and come back: [`stop`](Self::stop) cuts
/// every connection to it and closes its port, as when the process is
/// killed; [`restart`](Self::restart) serves again on the same address,
/// with the same behaviour and the same [`Events`].
pub struct HandlerProcess {
    addr: SocketAddr,
    handler: TestHandler,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl HandlerProcess {
    pub async fn start(behavior: Behavior) -> (HandlerProcess, Events) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let handler = TestHandler {
            events: tx,
            behavior,
            inflight: Arc::default(),
            max_inflight: Arc::default(),
        };
        let process = HandlerProcess {
            addr: listener.local_addr().unwrap(),
            running: Some(serve(listener, handler.clone())),
            handler,
        };
        let events = Events {
            rx,
            seen: Vec::new(),
        };
        (process, events)
    }

    pub fn handle(&self) -> Handler {
        Handler {
            url: format!("http://{}", self.addr),
            max_inflight: self.handler.max_inflight.clone(),
        }
    }

    /// Returns once the port is closed and every connection is gone; calls
    /// in flight are cut off.
    pub async fn stop(&mut self) {
        let (kill, served) = self.running.take().expect("handler not running");
        kill.cancel();
        served.await.unwrap();
    }

    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "handler still running");
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.running = Some(serve(listener, self.handler.clone()));
    }
}

fn serve(listener: TcpListener, handler: TestHandler) -> (CancellationToken, JoinHandle<()>) {
    let kill = CancellationToken::new();
    let conn_kill = kill.clone();
    let incoming = TcpListenerStream::new(listener).map(move |accepted| {
        accepted.map(|socket| {
            // Accepted from a plain listener stream, a socket keeps Nagle,
            // which holds back small replies.
            let _ = socket.set_nodelay(true);
            Killable {
                socket,
                killed: Box::pin(conn_kill.clone().cancelled_owned()),
                dead: false,
            }
        })
    });
    let shutdown = kill.clone().cancelled_owned();
    let served = tokio::spawn(async move {
        Server::builder()
            .add_service(ConnectionUnaryHandlerServer::new(handler.clone()))
            .add_service(ConnectionHandlerServer::new(handler))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .unwrap();
    });
    (kill, served)
}

/// A served socket that fails every read and write once its process is
/// killed, so that the server drops it at once instead of saying goodbye
/// (a graceful stop would wait for the gateway's open streams to end).
struct Killable {
    socket: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
}

impl Killable {
    fn alive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            Err(io::ErrorKind::ConnectionReset.into())
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for Killable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.socket).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.socket).poll_shutdown(cx)
    }
}

impl Connected for Killable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.socket.connect_info()
    }
}

pub type Adapter = ConnectionAdapterClient<Channel>;

pub fn adapter_client(addr: SocketAddr) -> Adapter {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    ConnectionAdapterClient::new(channel)
}

/// The late-bound adapter client of a scripted behaviour: the gateway's
/// adapter port is known only after the gateway started, which needs the
/// handler's URL first.
pub type AdapterSlot = Arc<OnceLock<Adapter>>;

/// A handler that turns client lines into ConnectionAdapter calls:
/// `HELLO <conn>` on connect; `AUTH id [user pass]` (`AUTHAS proto_name id [user pass]`), `SUB f [qos]`,
/// `UNSUB f`, `PUB t payload`, `RAW t payload`, `TIMER secs`, `CLOSE`,
/// `FAIL` (the handler call fails), anything else is echoed as
/// `ECHO <line>`. Each command answers `<VERB> <code> [message]`.
/// Deliveries become `MSG <topic> <from or -> <qos> <payload>`.
pub fn script(slot: AdapterSlot) -> Behavior {
    let buffers: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    Arc::new(move |ev| {
        let slot = slot.clone();
        let buffers = buffers.clone();
        Box::pin(async move {
            let Some(adapter) = slot.get().cloned() else {
                return Err(Status::unavailable("adapter not set"));
            };
            run_script(adapter, buffers, ev).await
        })
    })
}

async fn send_line(a: &mut Adapter, conn: &str, line: String) {
    // The adapter service may be stopped by a fault test; the client then
    // simply gets nothing, as with a real outage.
    let _ = a
        .send(pb::SendBytesRequest {
            conn: conn.to_owned(),
            bytes: format!("{line}\n").into_bytes().into(),
        })
        .await;
}

fn answer(verb: &str, r: Result<Response<pb::CodeResponse>, Status>) -> String {
    match r {
        Ok(r) => {
            let r = r.into_inner();
            if r.message.is_empty() {
                format!("{verb} {}", r.code)
            } else {
                format!("{verb} {} {}", r.code, r.message)
            }
        }
        Err(s) => format!("{verb} grpc-error {:?}", s.code()),
    }
}

async fn run_script(
    mut a: Adapter,
    buffers: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    ev: Ev,
) -> Result<(), Status> {
    match ev {
        Ev::Created { conn, .. } => send_line(&mut a, &conn, format!("HELLO {conn}")).await,
        Ev::Messages { conn, msgs } => {
            for m in msgs {
                let from = if m.from.is_empty() { "-" } else { &m.from };
                let line = format!(
                    "MSG {} {} {} {}",
                    m.topic,
                    from,
                    m.qos,
                    String::from_utf8_lossy(&m.payload)
                );
                send_line(&mut a, &conn, line).await;
            }
        }
        Ev::Timer { conn, .. } => send_line(&mut a, &conn, "TIMEOUT".to_owned()).await,
        Ev::Closed { .. } => {}
        Ev::Bytes { conn, bytes } => {
            let lines: Vec<String> = {
                let mut map = buffers.lock().unwrap();
                let buf = map.entry(conn.clone()).or_default();
                buf.extend_from_slice(&bytes);
                let mut lines = Vec::new();
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    lines.push(String::from_utf8_lossy(&line).trim_end().to_owned());
                }
                lines
            };
            for line in lines {
                if line == "FAIL" {
                    return Err(Status::internal("scripted failure"));
                }
                let reply = command(&mut a, &conn, &line).await;
                if let Some(reply) = reply {
                    send_line(&mut a, &conn, reply).await;
                }
            }
        }
    }
    Ok(())
}

async fn command(a: &mut Adapter, conn: &str, line: &str) -> Option<String> {
    let mut words = line.splitn(3, ' ');
    let verb = words.next().unwrap_or_default();
    let w1 = words.next().unwrap_or_default().to_owned();
    let rest = words.next().unwrap_or_default().to_owned();
    let conn = conn.to_owned();
    Some(match verb {
        // `AUTH clientid [username [password]]` logs in as the adapter
        // does; `AUTHAS proto_name clientid [username [password]]` with
        // another proto_name.
        "AUTH" | "AUTHAS" => {
            let (proto_name, clientid, rest) = if verb == "AUTH" {
                ("exproto".to_owned(), w1, rest)
            } else {
                let (id, rest) = rest.split_once(' ').unwrap_or((&rest, ""));
                (w1, id.to_owned(), rest.to_owned())
            };
            let mut cred = rest.split(' ');
            let username = cred.next().unwrap_or_default().to_owned();
            let password = cred.next().unwrap_or_default().to_owned();
            let r = a
                .authenticate(pb::AuthenticateRequest {
                    conn,
                    clientinfo: Some(pb::ClientInfo {
                        proto_name,
                        proto_ver: "chat/1".into(),
                        clientid,
                        username,
                        mountpoint: String::new(),
                    }),
                    password,
                })
                .await;
            answer("AUTH", r)
        }
        "SUB" => {
            let qos = rest.parse().unwrap_or(0);
            answer(
                "SUB",
                a.subscribe(pb::SubscribeRequest {
                    conn,
                    topic: w1,
                    qos,
                })
                .await,
            )
        }
        "UNSUB" => answer(
            "UNSUB",
            a.unsubscribe(pb::UnsubscribeRequest { conn, topic: w1 })
                .await,
        ),
        "PUB" => answer(
            "PUB",
            a.publish(pb::PublishRequest {
                conn,
                topic: w1,
                qos: 0,
                payload: rest.into_bytes().into(),
            })
            .await,
        ),
        "RAW" => answer(
            "RAW",
            a.raw_publish(pb::RawPublishRequest {
                topic: w1,
                qos: 0,
                payload: rest.into_bytes().into(),
            })
            .await,
        ),
        "TIMER" => answer(
            "TIMER",
            a.start_timer(pb::TimerRequest {
                conn,
                r#type: pb::TimerType::Keepalive as i32,
                interval: w1.parse().unwrap_or(0),
            })
            .await,
        ),
        "CLOSE" => {
            send_line(a, &conn, "BYE".to_owned()).await;
            let _ = a.close(pb::CloseSocketRequest { conn }).await;
            return None;
        }
        _ => format!("ECHO {line}"),
    })
}

/// A gate a behaviour can wait on: tests hold a handler call in flight and
/// release it when they are ready.
#[derive(Clone)]
pub struct Gate(Arc<Semaphore>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(Semaphore::new(0)))
    }
}

impl Gate {
    pub async fn pass(&self) {
        let permit = self.0.acquire().await.expect("gate closed");
        permit.forget();
    }

    pub fn open(&self, n: usize) {
        self.0.add_permits(n);
    }
}

/// A gateway whose handler runs `script`, plus its events and an adapter
/// client for probes.
pub struct Scripted {
    pub gw: DevGateway,
    pub events: Events,
    pub adapter: Adapter,
    pub handler: Handler,
    /// The handler, to stop and restart.
    pub process: HandlerProcess,
}

pub async fn scripted(cfg: impl FnOnce(&mut GatewayConfig)) -> Scripted {
    init_tracing();
    let slot = AdapterSlot::default();
    let (process, events) = HandlerProcess::start(script(slot.clone())).await;
    let handler = process.handle();
    let mut config = GatewayConfig::for_tests(handler.url.clone());
    cfg(&mut config);
    let gw = DevGateway::start(config).await.unwrap();
    let adapter = adapter_client(gw.adapter_addr());
    let _ = slot.set(adapter.clone());
    Scripted {
        gw,
        events,
        adapter,
        handler,
        process,
    }
}

/// The code of a ConnectionAdapter answer.
pub fn code(r: Result<Response<pb::CodeResponse>, Status>) -> (pb::ResultCode, String) {
    let r = r.expect("gRPC call failed").into_inner();
    (
        pb::ResultCode::try_from(r.code).expect("unknown result code"),
        r.message,
    )
}
