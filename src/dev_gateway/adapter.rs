//! The ConnectionAdapter gRPC service, as EMQX's `emqx_exproto_gsvr` serves
//! it: parameter checks first, then a call into the connection process with
//! a timeout, and a `CodeResponse` for every outcome. Also the server's
//! lifecycle, so tests can stop and restart it on the same port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use super::codes;
use super::faults::{Fault, Method};
use super::mailbox::{ConnCmd, Reply};
use super::message::make_message;
use super::registry::Lookup;
use super::router::Router;
use super::shared::Shared;
use crate::pb;
use crate::pb::connection_adapter_server::{ConnectionAdapter, ConnectionAdapterServer};
use crate::protocol::{topic, Secret};

/// How long stopping the server waits for calls in progress.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

type CallResult = Result<Response<pb::CodeResponse>, Status>;

pub(crate) struct AdapterService {
    shared: Arc<Shared>,
}

fn ok(r: pb::CodeResponse) -> CallResult {
    Ok(Response::new(r))
}

impl AdapterService {
    /// Applies an injected fault: `Some` answers the call instead.
    async fn fault(&self, method: Method) -> Result<Option<pb::CodeResponse>, Status> {
        // Every method passes here first, so this counts each call once.
        self.shared
            .stats
            .adapter_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.shared.faults.take(method) {
            None => Ok(None),
            Some(Fault::Code { code, message }) => Ok(Some(pb::CodeResponse {
                code: code as i32,
                message,
            })),
            Some(Fault::Status(code)) => Err(Status::new(code, "injected fault")),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
        }
    }

    /// Calls the connection process of `conn` (EMQX's
    /// `emqx_gateway_conn:call` with its 5 s timeout).
    async fn call(&self, conn: &str, make: impl FnOnce(Reply) -> ConnCmd) -> pb::CodeResponse {
        let handle = match self.shared.registry.lookup(conn) {
            Lookup::Live(h) => h,
            Lookup::Ended => return codes::not_alive(),
            Lookup::Undecodable => return codes::unknown_crash(),
        };
        let (tx, rx) = oneshot::channel();
        let call = async {
            if handle.tx.send(make(tx)).await.is_err() {
                return codes::not_alive();
            }
            // A dropped reply means the process exited before answering.
            rx.await.unwrap_or_else(|_| codes::not_alive())
        };
        tokio::time::timeout(self.shared.cfg.call_timeout, call)
            .await
            .unwrap_or_else(|_| codes::not_answered())
    }
}

#[tonic::async_trait]
impl ConnectionAdapter for AdapterService {
    async fn send(&self, req: Request<pb::SendBytesRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(conn = %req.conn, bytes = req.bytes.len(), "Send");
        if let Some(r) = self.fault(Method::Send).await? {
            return ok(r);
        }
        let bytes = req.bytes;
        ok(self
            .call(&req.conn, |reply| ConnCmd::Send { bytes, reply })
            .await)
    }

    async fn close(&self, req: Request<pb::CloseSocketRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(conn = %req.conn, "Close");
        if let Some(r) = self.fault(Method::Close).await? {
            return ok(r);
        }
        ok(self.call(&req.conn, |reply| ConnCmd::Close { reply }).await)
    }

    async fn authenticate(&self, req: Request<pb::AuthenticateRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(conn = %req.conn, "Authenticate");
        if let Some(r) = self.fault(Method::Authenticate).await? {
            return ok(r);
        }
        // EMQX's handler crashes on a request without clientinfo; the
        // adapter sees a gRPC error, not a code.
        let Some(clientinfo) = req.clientinfo else {
            return Err(Status::unknown(
                "function_clause: AuthenticateRequest without clientinfo",
            ));
        };
        // Stricter than EMQX (which only needs the fields present, and
        // proto3 always "has" them): empty values are an adapter bug.
        if clientinfo.proto_name.is_empty() || clientinfo.proto_ver.is_empty() {
            return ok(codes::required_params_missed());
        }
        let password = Secret::new(req.password);
        ok(self
            .call(&req.conn, |reply| ConnCmd::Authenticate {
                clientinfo,
                password,
                reply,
            })
            .await)
    }

    async fn start_timer(&self, req: Request<pb::TimerRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(conn = %req.conn, interval = req.interval, "StartTimer");
        if let Some(r) = self.fault(Method::StartTimer).await? {
            return ok(r);
        }
        if req.r#type != pb::TimerType::Keepalive as i32 || req.interval == 0 {
            return ok(codes::params_type_error());
        }
        let interval = req.interval;
        ok(self
            .call(&req.conn, |reply| ConnCmd::StartTimer { interval, reply })
            .await)
    }

    async fn publish(&self, req: Request<pb::PublishRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(conn = %req.conn, topic = %req.topic, qos = req.qos, "Publish");
        if let Some(r) = self.fault(Method::Publish).await? {
            return ok(r);
        }
        if req.qos > 2 {
            return ok(codes::params_type_error());
        }
        let (topic, qos, payload) = (req.topic, req.qos, req.payload);
        ok(self
            .call(&req.conn, |reply| ConnCmd::Publish {
                topic,
                qos,
                payload,
                reply,
            })
            .await)
    }

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(conn = %req.conn, filter = %req.topic, qos = req.qos, "Subscribe");
        if let Some(r) = self.fault(Method::Subscribe).await? {
            return ok(r);
        }
        if req.qos > 2 {
            return ok(codes::params_type_error());
        }
        let (topic, qos) = (req.topic, req.qos);
        ok(self
            .call(&req.conn, |reply| ConnCmd::Subscribe { topic, qos, reply })
            .await)
    }

    async fn unsubscribe(&self, req: Request<pb::UnsubscribeRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(conn = %req.conn, filter = %req.topic, "Unsubscribe");
        if let Some(r) = self.fault(Method::Unsubscribe).await? {
            return ok(r);
        }
        let topic = req.topic;
        ok(self
            .call(&req.conn, |reply| ConnCmd::Unsubscribe { topic, reply })
            .await)
    }

    async fn raw_publish(&self, req: Request<pb::RawPublishRequest>) -> CallResult {
        let req = req.into_inner();
        tracing::debug!(topic = %req.topic, qos = req.qos, "RawPublish");
        if let Some(r) = self.fault(Method::RawPublish).await? {
            return ok(r);
        }
        if req.qos > 2 {
            return ok(codes::params_type_error());
        }
        if topic::validate_name(&req.topic).is_err() {
            return ok(codes::invalid_topic());
        }
        // EMQX publishes it from `exproto`, through the message.publish
        // hook like any other message.
        let msg = make_message(
            &self.shared.cfg.node,
            "exproto",
            &req.topic,
            req.qos,
            req.payload.clone(),
        );
        if let Some(hooks) = &self.shared.exhook {
            hooks.message_publish(&msg);
        }
        match &self.shared.router {
            Router::Memory(router) => {
                router.publish(&msg);
                if let Some(broker) = &self.shared.broker {
                    broker.forward(&msg).await;
                }
            }
            Router::Mqtt(router) => {
                if let Err(e) = router.raw_publish(&req.topic, req.qos, req.payload).await {
                    tracing::warn!(error = %e, "MQTT RawPublish failed");
                    return ok(codes::unknown_crash());
                }
            }
        }
        ok(codes::success())
    }
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The ConnectionAdapter server: bound once, stoppable and restartable on
/// the same address.
pub(crate) struct AdapterServer {
    addr: SocketAddr,
    service: Arc<AdapterService>,
    /// Child of the gateway's shutdown token, so dropping the gateway stops
    /// the server too.
    parent: CancellationToken,
    running: Mutex<Option<Running>>,
}

impl AdapterServer {
    /// Binds `addr` (port 0 picks one, kept for restarts) and serves.
    pub async fn start_new(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<Arc<Self>> {
        let listener = bind_reuse(addr)?;
        let addr = listener.local_addr()?;
        let server = Arc::new(Self {
            addr,
            parent: shared.shutdown.clone(),
            service: Arc::new(AdapterService { shared }),
            running: Mutex::new(None),
        });
        *server.running.lock().await = Some(server.spawn(listener));
        tracing::info!(%addr, "ConnectionAdapter service listening");
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(&self, listener: TcpListener) -> Running {
        let stop = self.parent.child_token();
        let svc = ConnectionAdapterServer::from_arc(self.service.clone());
        // Accepted sockets keep Nagle on unless told (see STYLE.md).
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let signal = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = Server::builder()
                .initial_connection_window_size(Some(crate::H2_CONNECTION_WINDOW))
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, signal)
                .await
            {
                tracing::error!(error = %e, "ConnectionAdapter service failed");
            }
        });
        Running { stop, task }
    }

    pub async fn start(&self) -> std::io::Result<()> {
        let mut running = self.running.lock().await;
        if running.as_ref().is_some_and(|r| !r.task.is_finished()) {
            return Ok(());
        }
        let listener = bind_reuse(self.addr)?;
        *running = Some(self.spawn(listener));
        tracing::info!(addr = %self.addr, "ConnectionAdapter service restarted");
        Ok(())
    }

    pub async fn stop(&self) {
        let Some(running) = self.running.lock().await.take() else {
            return;
        };
        running.stop.cancel();
        let abort = running.task.abort_handle();
        if tokio::time::timeout(STOP_TIMEOUT, running.task)
            .await
            .is_err()
        {
            tracing::warn!("ConnectionAdapter service did not stop in time, aborted");
            abort.abort();
        }
        tracing::info!(addr = %self.addr, "ConnectionAdapter service stopped");
    }

    pub async fn is_running(&self) -> bool {
        self.running
            .lock()
            .await
            .as_ref()
            .is_some_and(|r| !r.task.is_finished())
    }
}

/// Binds with SO_REUSEADDR so a restart can take the port again while old
/// connections sit in TIME_WAIT.
fn bind_reuse(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
