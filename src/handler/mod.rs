//! The gRPC services EMQX calls: `ConnectionUnaryHandler` and the older
//! streaming `ConnectionHandler`. Both are thin: decode, hand the event to
//! the [`Driver`], answer. A client's mistakes never become a gRPC error
//! (EMQX would drop the connection); only a malformed request does.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use crate::pb::connection_handler_server::ConnectionHandler;
use crate::pb::connection_unary_handler_server::ConnectionUnaryHandler;
use crate::pb::{self, EmptySuccess};
use crate::protocol::{ConnMeta, Event, Message, SockType, TimerKind};
use crate::session::Driver;
use crate::telemetry;

/// Serves `ConnectionUnaryHandler`: EMQX sends a conn's next event only
/// after this one is answered, so order is EMQX's.
#[derive(Clone)]
pub struct UnaryHandler {
    driver: Arc<Driver>,
}

/// Serves the streaming `ConnectionHandler`: each RPC kind is its own
/// stream, so a conn's bytes may overtake its `OnSocketCreated`.
#[derive(Clone)]
pub struct StreamHandler {
    driver: Arc<Driver>,
}

impl UnaryHandler {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }
}

impl StreamHandler {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }
}

/// EMQX's `{host, port}` as an address; `None` for one that does not parse
/// (EMQX sends IP addresses, so that would be a bug of EMQX's or ours).
fn address(a: Option<pb::Address>) -> Option<SocketAddr> {
    let a = a?;
    let ip: IpAddr = a.host.parse().ok()?;
    Some(SocketAddr::new(ip, u16::try_from(a.port).ok()?))
}

fn created(r: pb::SocketCreatedRequest) -> (String, Event) {
    let info = r.conninfo.unwrap_or_default();
    let socktype = match pb::SocketType::try_from(info.socktype) {
        Ok(pb::SocketType::Tcp) => SockType::Tcp,
        Ok(pb::SocketType::Ssl) => SockType::Ssl,
        Ok(pb::SocketType::Udp) => SockType::Udp,
        Ok(pb::SocketType::Dtls) => SockType::Dtls,
        // A transport this build does not know: treat it as a stream,
        // which needs no framing of its own.
        Err(_) => SockType::Tcp,
    };
    let meta = ConnMeta {
        socktype,
        peer: address(info.peername),
        sockname: address(info.sockname),
        cert_cn: info.peercert.map(|c| c.cn).filter(|cn| !cn.is_empty()),
    };
    (r.conn, Event::Created(meta))
}

fn closed(r: pb::SocketClosedRequest) -> (String, Event) {
    (r.conn, Event::Closed(r.reason))
}

fn bytes(r: pb::ReceivedBytesRequest) -> (String, Event) {
    (r.conn, Event::Bytes(r.bytes))
}

fn timer(r: pb::TimerTimeoutRequest) -> (String, Event) {
    // KEEPALIVE is the only timer type EMQX has.
    (r.conn, Event::TimerFired(TimerKind::Keepalive))
}

fn messages(r: pb::ReceivedMessagesRequest) -> (String, Event) {
    let msgs = r
        .messages
        .into_iter()
        .map(|m| Message {
            node: m.node,
            id: m.id,
            // Out-of-range values cannot come from EMQX; clamp rather than fail.
            qos: u8::try_from(m.qos.min(2)).unwrap_or(2),
            from: m.from,
            topic: m.topic,
            payload: m.payload,
            timestamp_ms: m.timestamp,
        })
        .collect();
    (r.conn, Event::Messages(msgs))
}

async fn handle(
    driver: &Arc<Driver>,
    (conn, event): (String, Event),
    may_reorder: bool,
) -> Result<(), Status> {
    if conn.is_empty() {
        return Err(Status::invalid_argument("empty conn"));
    }
    let (kind, bytes) = match &event {
        Event::Created(_) => ("created", 0),
        Event::Bytes(b) => ("bytes", b.len()),
        Event::Messages(_) => ("messages", 0),
        Event::TimerFired(_) => ("timer", 0),
        Event::Closed(_) => ("closed", 0),
        Event::Deadline | Event::Reply(_) | Event::Answer(_) => ("other", 0),
    };
    telemetry::event(kind, bytes);
    driver.dispatch(&conn, event, may_reorder).await;
    Ok(())
}

async fn unary<R>(
    driver: &Arc<Driver>,
    req: Request<R>,
    conv: fn(R) -> (String, Event),
) -> Result<Response<EmptySuccess>, Status> {
    handle(driver, conv(req.into_inner()), false).await?;
    Ok(Response::new(EmptySuccess {}))
}

async fn streaming<R>(
    driver: &Arc<Driver>,
    req: Request<Streaming<R>>,
    conv: fn(R) -> (String, Event),
) -> Result<Response<EmptySuccess>, Status> {
    let mut stream = req.into_inner();
    // Each request is handled as it arrives; EMQX keeps the stream open for
    // the life of its connection process. A handover ends it: EMQX opens
    // the next one at the successor. What EMQX wrote that was not read
    // by then is lost (README: streaming mode and takeovers).
    loop {
        let next = tokio::select! {
            biased;
            () = driver.handover_begun() => break,
            r = stream.message() => r?,
        };
        let Some(r) = next else { break };
        handle(driver, conv(r), true).await?;
    }
    Ok(Response::new(EmptySuccess {}))
}

// async_trait must see each method spelled out, so these stay explicit.
#[tonic::async_trait]
impl ConnectionUnaryHandler for UnaryHandler {
    async fn on_socket_created(
        &self,
        req: Request<pb::SocketCreatedRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, created).await
    }
    async fn on_socket_closed(
        &self,
        req: Request<pb::SocketClosedRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, closed).await
    }
    async fn on_received_bytes(
        &self,
        req: Request<pb::ReceivedBytesRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, bytes).await
    }
    async fn on_timer_timeout(
        &self,
        req: Request<pb::TimerTimeoutRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, timer).await
    }
    async fn on_received_messages(
        &self,
        req: Request<pb::ReceivedMessagesRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, messages).await
    }
}

#[tonic::async_trait]
impl ConnectionHandler for StreamHandler {
    async fn on_socket_created(
        &self,
        req: Request<Streaming<pb::SocketCreatedRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, created).await
    }
    async fn on_socket_closed(
        &self,
        req: Request<Streaming<pb::SocketClosedRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, closed).await
    }
    async fn on_received_bytes(
        &self,
        req: Request<Streaming<pb::ReceivedBytesRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, bytes).await
    }
    async fn on_timer_timeout(
        &self,
        req: Request<Streaming<pb::TimerTimeoutRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, timer).await
    }
    async fn on_received_messages(
        &self,
        req: Request<Streaming<pb::ReceivedMessagesRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, messages).await
    }
}
