//! Two reference handlers on the same stack as the adapter (tonic, tokio,
//! the same generated code), serving both handler services, to measure the
//! adapter against:
//!
//! - `echo`: the gRPC calls the chat workload needs, with no parsing and no
//!   protocol state. On socket creation it authenticates the socket as
//!   `echo-<n>` and subscribes it to `bench/<n / fanout>` (as EMQX's official
//!   Python example does with its fixed clientid and topic); each received
//!   chunk becomes one Publish to that topic plus one Send of `OK\n`, and
//!   each delivered message one Send of its payload.
//! - `noop`: answers every event and calls nothing: the gRPC hop alone.
//!
//! Like the adapter, echo answers a bytes or messages event as soon as its
//! work is queued and makes the EMQX calls afterwards, with a bound on the
//! work pending, so the yardstick is as fast as this stack allows. Socket
//! creation is answered after its calls, so that a socket's bytes never
//! reach EMQX before its Authenticate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::connection_adapter_client::ConnectionAdapterClient;
use crate::pb::connection_handler_server::{ConnectionHandler, ConnectionHandlerServer};
use crate::pb::connection_unary_handler_server::{
    ConnectionUnaryHandler, ConnectionUnaryHandlerServer,
};
use crate::pb::{self, EmptySuccess};

/// Which reference handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Echo,
    Noop,
}

/// Flags of the hidden `bench-handler` command that `bench` spawns.
#[derive(Debug, Clone, clap::Args)]
pub struct HandlerArgs {
    #[arg(long, value_enum, default_value_t = Kind::Echo)]
    pub kind: Kind,
    /// Where the handler services listen.
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,
    /// The gateway's ConnectionAdapter.
    #[arg(long, default_value = "http://127.0.0.1:9100")]
    pub emqx: String,
    /// Sockets per topic (echo).
    #[arg(long, default_value_t = 1)]
    pub fanout: usize,
}

/// Event work (echo) queued or running at once; past it handler calls wait,
/// which slows the gateway down instead of growing a backlog.
const MAX_PENDING: usize = 4096;
/// Bound on each call to the gateway.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const ACK: &[u8] = b"OK\n";

struct Echo {
    client: ConnectionAdapterClient<Channel>,
    /// conn -> the topic its socket was subscribed to.
    topics: DashMap<String, Arc<str>>,
    created: AtomicU64,
    fanout: u64,
    pending: Arc<Semaphore>,
}

#[derive(Clone)]
struct Reference {
    echo: Option<Arc<Echo>>,
}

/// Serves the reference handler until the process ends.
///
/// # Errors
/// The address cannot be bound or the URL is invalid.
pub async fn serve(args: HandlerArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let echo = match args.kind {
        Kind::Noop => None,
        Kind::Echo => {
            let channel = Endpoint::from_shared(args.emqx.clone())
                .with_context(|| format!("bad --emqx {:?}", args.emqx))?
                .tcp_nodelay(true)
                .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
                .connect_lazy();
            Some(Arc::new(Echo {
                client: ConnectionAdapterClient::new(channel),
                topics: DashMap::new(),
                created: AtomicU64::new(0),
                fanout: args.fanout.max(1) as u64,
                pending: Arc::new(Semaphore::new(MAX_PENDING)),
            }))
        }
    };
    let handler = Reference { echo };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(ConnectionUnaryHandlerServer::new(handler.clone()))
        .add_service(ConnectionHandlerServer::new(handler))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// One event's work for the echo handler.
enum Work {
    Bytes(String, Bytes),
    Messages(String, Vec<pb::Message>),
}

impl Echo {
    async fn created(&self, conn: String) {
        let n = self.created.fetch_add(1, Ordering::Relaxed);
        let topic: Arc<str> = format!("bench/{}", n / self.fanout).into();
        let mut c = self.client.clone();
        let auth = pb::AuthenticateRequest {
            conn: conn.clone(),
            clientinfo: Some(pb::ClientInfo {
                proto_name: "echo".into(),
                proto_ver: "1".into(),
                clientid: format!("echo-{n}"),
                username: String::new(),
                mountpoint: String::new(),
            }),
            password: String::new(),
        };
        if !ok(tokio::time::timeout(CALL_TIMEOUT, c.authenticate(auth)).await) {
            return;
        }
        let sub = pb::SubscribeRequest {
            conn: conn.clone(),
            topic: topic.to_string(),
            qos: 0,
        };
        let _ = tokio::time::timeout(CALL_TIMEOUT, c.subscribe(sub)).await;
        self.topics.insert(conn, topic);
    }

    /// Queues one event's calls; waits only while `MAX_PENDING` are queued.
    async fn queue(self: &Arc<Self>, work: Work) {
        let Ok(permit) = self.pending.clone().acquire_owned().await else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut c = this.client.clone();
            match work {
                Work::Bytes(conn, bytes) => {
                    let Some(topic) = this.topics.get(&conn).map(|t| t.value().clone()) else {
                        return;
                    };
                    let publish = pb::PublishRequest {
                        conn: conn.clone(),
                        topic: topic.to_string(),
                        qos: 0,
                        payload: bytes,
                    };
                    let _ = tokio::time::timeout(CALL_TIMEOUT, c.publish(publish)).await;
                    let ack = pb::SendBytesRequest {
                        conn,
                        bytes: Bytes::from_static(ACK),
                    };
                    let _ = tokio::time::timeout(CALL_TIMEOUT, c.send(ack)).await;
                }
                Work::Messages(conn, messages) => {
                    for m in messages {
                        let send = pb::SendBytesRequest {
                            conn: conn.clone(),
                            bytes: m.payload,
                        };
                        let _ = tokio::time::timeout(CALL_TIMEOUT, c.send(send)).await;
                    }
                }
            }
        });
    }
}

fn ok(r: Result<Result<Response<pb::CodeResponse>, Status>, tokio::time::error::Elapsed>) -> bool {
    matches!(r, Ok(Ok(resp)) if resp.get_ref().code == pb::ResultCode::Success as i32)
}

fn done() -> Result<Response<EmptySuccess>, Status> {
    Ok(Response::new(EmptySuccess {}))
}

impl Reference {
    async fn on_created(&self, r: pb::SocketCreatedRequest) {
        if let Some(e) = &self.echo {
            e.created(r.conn).await;
        }
    }
    async fn on_bytes(&self, r: pb::ReceivedBytesRequest) {
        if let Some(e) = &self.echo {
            e.queue(Work::Bytes(r.conn, r.bytes)).await;
        }
    }
    async fn on_messages(&self, r: pb::ReceivedMessagesRequest) {
        if let Some(e) = &self.echo {
            e.queue(Work::Messages(r.conn, r.messages)).await;
        }
    }
    fn on_closed(&self, r: &pb::SocketClosedRequest) {
        if let Some(e) = &self.echo {
            e.topics.remove(&r.conn);
        }
    }
}

#[tonic::async_trait]
impl ConnectionUnaryHandler for Reference {
    async fn on_socket_created(
        &self,
        req: Request<pb::SocketCreatedRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        self.on_created(req.into_inner()).await;
        done()
    }
    async fn on_socket_closed(
        &self,
        req: Request<pb::SocketClosedRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        self.on_closed(req.get_ref());
        done()
    }
    async fn on_received_bytes(
        &self,
        req: Request<pb::ReceivedBytesRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        self.on_bytes(req.into_inner()).await;
        done()
    }
    async fn on_timer_timeout(
        &self,
        _req: Request<pb::TimerTimeoutRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        done()
    }
    async fn on_received_messages(
        &self,
        req: Request<pb::ReceivedMessagesRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        self.on_messages(req.into_inner()).await;
        done()
    }
}

#[tonic::async_trait]
impl ConnectionHandler for Reference {
    async fn on_socket_created(
        &self,
        req: Request<Streaming<pb::SocketCreatedRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        let mut s = req.into_inner();
        while let Some(r) = s.message().await? {
            self.on_created(r).await;
        }
        done()
    }
    async fn on_socket_closed(
        &self,
        req: Request<Streaming<pb::SocketClosedRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        let mut s = req.into_inner();
        while let Some(r) = s.message().await? {
            self.on_closed(&r);
        }
        done()
    }
    async fn on_received_bytes(
        &self,
        req: Request<Streaming<pb::ReceivedBytesRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        let mut s = req.into_inner();
        while let Some(r) = s.message().await? {
            self.on_bytes(r).await;
        }
        done()
    }
    async fn on_timer_timeout(
        &self,
        req: Request<Streaming<pb::TimerTimeoutRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        let mut s = req.into_inner();
        while s.message().await?.is_some() {}
        done()
    }
    async fn on_received_messages(
        &self,
        req: Request<Streaming<pb::ReceivedMessagesRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        let mut s = req.into_inner();
        while let Some(r) = s.message().await? {
            self.on_messages(r).await;
        }
        done()
    }
}
