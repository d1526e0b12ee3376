//! Shared test fixtures: an in-test EMQX ConnectionAdapter that records
//! every call and answers with EMQX's codes, and clients of the adapter's
//! handler services.

#![allow(dead_code)]

pub mod pki;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use exproto_adapter::pb::connection_adapter_server::{ConnectionAdapter, ConnectionAdapterServer};
use exproto_adapter::pb::connection_handler_client::ConnectionHandlerClient;
use exproto_adapter::pb::connection_unary_handler_client::ConnectionUnaryHandlerClient;
use exproto_adapter::pb::{self, CodeResponse, ResultCode};
use exproto_adapter::server::{AdapterConfig, RunningAdapter, Server};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// One call the adapter made to EMQX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: &'static str,
    pub conn: String,
    /// A readable summary of the request's other fields.
    pub detail: String,
}

#[derive(Default)]
pub struct FakeState {
    pub calls: Vec<Recorded>,
    /// Bytes sent to each conn, concatenated.
    pub sent: HashMap<String, Vec<u8>>,
    /// Non-empty `Send` calls per conn.
    pub sends: HashMap<String, usize>,
    /// Conns whose process is gone: every call answers CONN_PROCESS_NOT_ALIVE.
    pub gone: HashSet<String>,
    /// While set, every call fails as if EMQX could not be reached.
    pub down: bool,
    /// How long a Publish or Subscribe to a topic under `slow/` takes.
    pub slow: Duration,
    /// Calls under `slow/` being answered right now, and the most at once.
    pub in_flight: usize,
    pub max_in_flight: usize,
}

/// The in-test EMQX. Policy: username `bad` is refused, clientid `boom`
/// fails with UNKNOWN; topics under `deny/` are refused, under `boom/` fail,
/// under `slow/` succeed after `FakeState::slow`.
#[derive(Clone, Default)]
pub struct FakeEmqx {
    pub state: Arc<Mutex<FakeState>>,
    pub changed: Arc<Notify>,
}

fn code(c: ResultCode, m: &str) -> Result<Response<CodeResponse>, Status> {
    Ok(Response::new(CodeResponse {
        code: c as i32,
        message: m.into(),
    }))
}

impl FakeEmqx {
    fn record(
        &self,
        method: &'static str,
        conn: &str,
        detail: String,
    ) -> Result<Option<Result<Response<CodeResponse>, Status>>, Status> {
        let mut s = self.state.lock().unwrap();
        if s.down {
            return Err(Status::unavailable("EMQX is down (test)"));
        }
        s.calls.push(Recorded {
            method,
            conn: conn.to_string(),
            detail,
        });
        let gone = s.gone.contains(conn);
        drop(s);
        self.changed.notify_waiters();
        Ok(gone.then(|| code(ResultCode::ConnProcessNotAlive, "")))
    }

    async fn topic_policy(&self, topic: &str) -> Result<Response<CodeResponse>, Status> {
        if topic.starts_with("slow/") {
            let slow = {
                let mut s = self.state.lock().unwrap();
                s.in_flight += 1;
                s.max_in_flight = s.max_in_flight.max(s.in_flight);
                s.slow
            };
            tokio::time::sleep(slow).await;
            self.state.lock().unwrap().in_flight -= 1;
            self.changed.notify_waiters();
        }
        if topic.starts_with("deny/") {
            code(ResultCode::PermissionDeny, "Authorization deny")
        } else if topic.starts_with("boom/") {
            code(ResultCode::Unknown, "Unknown crashes")
        } else {
            code(ResultCode::Success, "")
        }
    }

    /// Starts the fake on a free port.
    pub async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = ConnectionAdapterServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    /// Starts the fake on a free port, serving TLS as `tls` says (EMQX's
    /// `server.ssl_options`).
    pub async fn start_tls(&self, tls: tonic::transport::ServerTlsConfig) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = ConnectionAdapterServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn set_slow(&self, slow: Duration) {
        self.state.lock().unwrap().slow = slow;
    }

    pub fn set_gone(&self, conn: &str) {
        self.state.lock().unwrap().gone.insert(conn.to_string());
    }

    pub fn calls(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn calls_for(&self, conn: &str) -> Vec<Recorded> {
        self.calls()
            .into_iter()
            .filter(|c| c.conn == conn)
            .collect()
    }

    pub fn sends(&self, conn: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .sends
            .get(conn)
            .copied()
            .unwrap_or(0)
    }

    pub fn sent(&self, conn: &str) -> Vec<u8> {
        self.state
            .lock()
            .unwrap()
            .sent
            .get(conn)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (up to 10 s) until `pred` holds on the recorded state.
    pub async fn until(&self, what: &str, pred: impl Fn(&FakeState) -> bool) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if pred(&self.state.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            let s = self.state.lock().unwrap();
            panic!(
                "timed out waiting for {what}; calls: {:#?}; sent: {:?}",
                s.calls,
                s.sent
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// Waits until `conn` has been sent `n` complete lines, and returns all
    /// complete lines sent to it so far.
    pub async fn lines(&self, conn: &str, n: usize) -> Vec<String> {
        self.until(&format!("{n} lines to {conn}"), |s| {
            s.sent
                .get(conn)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count() >= n)
                .unwrap_or(false)
        })
        .await;
        let sent = self.sent(conn);
        let text = String::from_utf8_lossy(&sent);
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| l.trim_end_matches('\n').to_string())
            .collect()
    }

    /// Waits until a call of `method` for `conn` has been recorded.
    pub async fn called(&self, conn: &str, method: &'static str) -> Recorded {
        self.until(&format!("{method} for {conn}"), |s| {
            s.calls.iter().any(|c| c.conn == conn && c.method == method)
        })
        .await;
        self.calls_for(conn)
            .into_iter()
            .find(|c| c.method == method)
            .unwrap()
    }
}

#[tonic::async_trait]
impl ConnectionAdapter for FakeEmqx {
    async fn send(
        &self,
        req: Request<pb::SendBytesRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        {
            let mut s = self.state.lock().unwrap();
            if s.down {
                return Err(Status::unavailable("EMQX is down (test)"));
            }
            if !s.gone.contains(&r.conn) && !r.bytes.is_empty() {
                s.sent
                    .entry(r.conn.clone())
                    .or_default()
                    .extend_from_slice(&r.bytes);
                *s.sends.entry(r.conn.clone()).or_default() += 1;
            }
        }
        let detail = String::from_utf8_lossy(&r.bytes).into_owned();
        if let Some(gone) = self.record("Send", &r.conn, detail)? {
            return gone;
        }
        code(ResultCode::Success, "")
    }

    async fn close(
        &self,
        req: Request<pb::CloseSocketRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        if let Some(gone) = self.record("Close", &r.conn, String::new())? {
            return gone;
        }
        code(ResultCode::Success, "")
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        let Some(ci) = r.clientinfo else {
            return code(ResultCode::Unknown, "Unknown crashes");
        };
        let detail = format!(
            "proto_name={} proto_ver={} clientid={} username={} password={}",
            ci.proto_name, ci.proto_ver, ci.clientid, ci.username, r.password
        );
        if let Some(gone) = self.record("Authenticate", &r.conn, detail)? {
            return gone;
        }
        if ci.username == "bad" {
            code(ResultCode::PermissionDeny, "not_authorized")
        } else if ci.clientid == "boom" {
            code(ResultCode::Unknown, "Unknown crashes")
        } else {
            code(ResultCode::Success, "")
        }
    }

    async fn start_timer(
        &self,
        req: Request<pb::TimerRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        let detail = format!("type={} interval={}", r.r#type, r.interval);
        if let Some(gone) = self.record("StartTimer", &r.conn, detail)? {
            return gone;
        }
        if r.interval == 0 {
            return code(ResultCode::Unknown, "{error,'PARAMS_TYPE_ERROR'}");
        }
        code(ResultCode::Success, "")
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        let detail = format!(
            "{} qos={} payload={:?}",
            r.topic,
            r.qos,
            String::from_utf8_lossy(&r.payload)
        );
        if let Some(gone) = self.record("Publish", &r.conn, detail)? {
            return gone;
        }
        self.topic_policy(&r.topic).await
    }

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        let detail = format!("{} qos={}", r.topic, r.qos);
        if let Some(gone) = self.record("Subscribe", &r.conn, detail)? {
            return gone;
        }
        self.topic_policy(&r.topic).await
    }

    async fn unsubscribe(
        &self,
        req: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        if let Some(gone) = self.record("Unsubscribe", &r.conn, r.topic.clone())? {
            return gone;
        }
        code(ResultCode::Success, "")
    }

    async fn raw_publish(
        &self,
        req: Request<pb::RawPublishRequest>,
    ) -> Result<Response<CodeResponse>, Status> {
        let r = req.into_inner();
        if let Some(gone) = self.record("RawPublish", "", r.topic.clone())? {
            return gone;
        }
        code(ResultCode::Success, "")
    }
}

/// The adapter under test, a fake EMQX, and clients of both handler services.
pub struct Harness {
    pub adapter: RunningAdapter,
    pub emqx: FakeEmqx,
    pub unary: ConnectionUnaryHandlerClient<Channel>,
    pub channel: Channel,
}

pub fn quick_config() -> AdapterConfig {
    let mut c = AdapterConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        call_timeout: Duration::from_secs(2),
        ..AdapterConfig::default()
    };
    c.driver.send_retry = Duration::from_secs(10);
    c
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(quick_config()).await
    }

    pub async fn start_with(mut config: AdapterConfig) -> Self {
        let emqx = FakeEmqx::default();
        let emqx_addr = emqx.start().await;
        config.emqx = format!("http://{emqx_addr}");
        let adapter = Server::builder(config).start().await.unwrap();
        let channel = Channel::from_shared(format!("http://{}", adapter.addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            adapter,
            emqx,
            unary: ConnectionUnaryHandlerClient::new(channel.clone()),
            channel,
        }
    }

    pub async fn created(&self, conn: &str) {
        self.unary
            .clone()
            .on_socket_created(pb::SocketCreatedRequest {
                conn: conn.into(),
                conninfo: Some(pb::ConnInfo {
                    socktype: pb::SocketType::Tcp as i32,
                    peername: Some(pb::Address {
                        host: "127.0.0.1".into(),
                        port: 50000,
                    }),
                    sockname: Some(pb::Address {
                        host: "127.0.0.1".into(),
                        port: 7993,
                    }),
                    peercert: None,
                }),
            })
            .await
            .unwrap();
    }

    pub async fn bytes(&self, conn: &str, b: impl AsRef<[u8]>) {
        self.unary
            .clone()
            .on_received_bytes(pb::ReceivedBytesRequest {
                conn: conn.into(),
                bytes: Bytes::copy_from_slice(b.as_ref()),
            })
            .await
            .unwrap();
    }

    pub async fn messages(&self, conn: &str, messages: Vec<pb::Message>) {
        self.unary
            .clone()
            .on_received_messages(pb::ReceivedMessagesRequest {
                conn: conn.into(),
                messages,
            })
            .await
            .unwrap();
    }

    pub async fn timer(&self, conn: &str) {
        self.unary
            .clone()
            .on_timer_timeout(pb::TimerTimeoutRequest {
                conn: conn.into(),
                r#type: pb::TimerType::Keepalive as i32,
            })
            .await
            .unwrap();
    }

    pub async fn closed(&self, conn: &str, reason: &str) {
        self.unary
            .clone()
            .on_socket_closed(pb::SocketClosedRequest {
                conn: conn.into(),
                reason: reason.into(),
            })
            .await
            .unwrap();
    }

    /// Waits (up to 10 s) until the adapter holds no session.
    pub async fn until_registry_empty(&self) {
        let reg = self.adapter.driver().registry();
        for _ in 0..2000 {
            if reg.is_empty() && reg.orphans() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "registry still holds {} sessions and {} orphans",
            reg.len(),
            reg.orphans()
        );
    }

    /// A streaming session: one open client stream per handler RPC, as
    /// EMQX keeps them.
    pub fn streams(&self) -> Streams {
        Streams::open(self.channel.clone())
    }
}

pub struct Streams {
    pub created: mpsc::Sender<pb::SocketCreatedRequest>,
    pub bytes: mpsc::Sender<pb::ReceivedBytesRequest>,
    pub messages: mpsc::Sender<pb::ReceivedMessagesRequest>,
    pub closed: mpsc::Sender<pb::SocketClosedRequest>,
    pub timer: mpsc::Sender<pb::TimerTimeoutRequest>,
}

impl Streams {
    fn open(channel: Channel) -> Self {
        fn spawn_stream<T: Send + 'static, F, Fut>(f: F) -> mpsc::Sender<T>
        where
            F: FnOnce(ReceiverStream<T>) -> Fut,
            Fut: std::future::Future + Send + 'static,
            Fut::Output: Send,
        {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(f(ReceiverStream::new(rx)));
            tx
        }
        let c = ConnectionHandlerClient::new(channel);
        let (c1, c2, c3, c4, c5) = (c.clone(), c.clone(), c.clone(), c.clone(), c);
        Self {
            created: spawn_stream(move |s| async move { c1.clone().on_socket_created(s).await }),
            bytes: spawn_stream(move |s| async move { c2.clone().on_received_bytes(s).await }),
            messages: spawn_stream(
                move |s| async move { c3.clone().on_received_messages(s).await },
            ),
            closed: spawn_stream(move |s| async move { c4.clone().on_socket_closed(s).await }),
            timer: spawn_stream(move |s| async move { c5.clone().on_timer_timeout(s).await }),
        }
    }

    pub async fn created(&self, conn: &str) {
        self.created
            .send(pb::SocketCreatedRequest {
                conn: conn.into(),
                conninfo: Some(pb::ConnInfo::default()),
            })
            .await
            .unwrap();
    }

    pub async fn bytes(&self, conn: &str, b: impl AsRef<[u8]>) {
        self.bytes
            .send(pb::ReceivedBytesRequest {
                conn: conn.into(),
                bytes: Bytes::copy_from_slice(b.as_ref()),
            })
            .await
            .unwrap();
    }

    pub async fn closed(&self, conn: &str, reason: &str) {
        self.closed
            .send(pb::SocketClosedRequest {
                conn: conn.into(),
                reason: reason.into(),
            })
            .await
            .unwrap();
    }
}

/// A delivered message as EMQX fills it.
pub fn message(topic: &str, from: &str, payload: &[u8]) -> pb::Message {
    pb::Message {
        node: "emqx@127.0.0.1".into(),
        id: "0005F8F6B1C2D3E4F3A5000012340000".into(),
        qos: 0,
        from: from.into(),
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload),
        timestamp: 1_700_000_000_000,
    }
}
