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
use crate::upgrade;

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
    driver.dispatch(&conn, event, may_reorder).await;
    Ok(())
}

/// The handler RPCs by number, as a handover relays them (`upgrade`).
const CREATED: u8 = 1;
const CLOSED: u8 = 2;
const BYTES: u8 = 3;
const TIMER: u8 = 4;
const MESSAGES: u8 = 5;

/// Serves one request here, or, once this process hands over, relays it
/// to the successor (which serves it in order after the session's state).
async fn serve_or_relay<R: prost::Message>(
    driver: &Arc<Driver>,
    r: R,
    conv: fn(R) -> (String, Event),
    rpc: u8,
    may_reorder: bool,
) -> Result<(), Status> {
    if let Some(relay) = driver.relay() {
        let flags = if may_reorder { upgrade::MAY_REORDER } else { 0 };
        return relay
            .event(rpc, flags, &r.encode_to_vec())
            .await
            .map_err(|_| Status::unavailable("handing over to a successor that went away"));
    }
    handle(driver, conv(r), may_reorder).await
}

/// Serves a request that the predecessor relayed (see `upgrade`), or
/// relays it on when this process is itself handing over by now.
///
/// # Errors
/// An RPC number this build does not know, or a body that does not decode.
pub async fn relayed(driver: &Arc<Driver>, rpc: u8, flags: u8, body: &[u8]) -> anyhow::Result<()> {
    async fn on<R: prost::Message + Default>(
        driver: &Arc<Driver>,
        body: &[u8],
        conv: fn(R) -> (String, Event),
        rpc: u8,
        may_reorder: bool,
    ) -> anyhow::Result<()> {
        serve_or_relay(driver, R::decode(body)?, conv, rpc, may_reorder)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
    }
    let may_reorder = flags & upgrade::MAY_REORDER != 0;
    match rpc {
        CREATED => on(driver, body, created, rpc, may_reorder).await,
        CLOSED => on(driver, body, closed, rpc, may_reorder).await,
        BYTES => on(driver, body, bytes, rpc, may_reorder).await,
        TIMER => on(driver, body, timer, rpc, may_reorder).await,
        MESSAGES => on(driver, body, messages, rpc, may_reorder).await,
        other => anyhow::bail!("relayed RPC {other} unknown"),
    }
}

async fn unary<R: prost::Message>(
    driver: &Arc<Driver>,
    req: Request<R>,
    conv: fn(R) -> (String, Event),
    rpc: u8,
) -> Result<Response<EmptySuccess>, Status> {
    let _answering = driver.answering();
    serve_or_relay(driver, req.into_inner(), conv, rpc, false).await?;
    Ok(Response::new(EmptySuccess {}))
}

async fn streaming<R: prost::Message>(
    driver: &Arc<Driver>,
    req: Request<Streaming<R>>,
    conv: fn(R) -> (String, Event),
    rpc: u8,
) -> Result<Response<EmptySuccess>, Status> {
    let mut stream = req.into_inner();
    // Each request is handled as it arrives; EMQX keeps the stream open for
    // the life of its connection process. After a handover it breaks when
    // the old process exits, and EMQX opens the next one at the successor;
    // what EMQX wrote that was not read by then is lost (README: upgrades).
    while let Some(r) = stream.message().await? {
        let _answering = driver.answering();
        serve_or_relay(driver, r, conv, rpc, true).await?;
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
        unary(&self.driver, req, created, CREATED).await
    }
    async fn on_socket_closed(
        &self,
        req: Request<pb::SocketClosedRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, closed, CLOSED).await
    }
    async fn on_received_bytes(
        &self,
        req: Request<pb::ReceivedBytesRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, bytes, BYTES).await
    }
    async fn on_timer_timeout(
        &self,
        req: Request<pb::TimerTimeoutRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, timer, TIMER).await
    }
    async fn on_received_messages(
        &self,
        req: Request<pb::ReceivedMessagesRequest>,
    ) -> Result<Response<EmptySuccess>, Status> {
        unary(&self.driver, req, messages, MESSAGES).await
    }
}

#[tonic::async_trait]
impl ConnectionHandler for StreamHandler {
    async fn on_socket_created(
        &self,
        req: Request<Streaming<pb::SocketCreatedRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, created, CREATED).await
    }
    async fn on_socket_closed(
        &self,
        req: Request<Streaming<pb::SocketClosedRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, closed, CLOSED).await
    }
    async fn on_received_bytes(
        &self,
        req: Request<Streaming<pb::ReceivedBytesRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, bytes, BYTES).await
    }
    async fn on_timer_timeout(
        &self,
        req: Request<Streaming<pb::TimerTimeoutRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, timer, TIMER).await
    }
    async fn on_received_messages(
        &self,
        req: Request<Streaming<pb::ReceivedMessagesRequest>>,
    ) -> Result<Response<EmptySuccess>, Status> {
        streaming(&self.driver, req, messages, MESSAGES).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What EMQX's `dtls` listener sends, which the dev gateway cannot:
    /// a datagram transport with a client certificate.
    #[test]
    fn conninfo_becomes_the_sessions_meta() {
        let (conn, event) = created(pb::SocketCreatedRequest {
            conn: "c1".into(),
            conninfo: Some(pb::ConnInfo {
                socktype: pb::SocketType::Dtls as i32,
                peername: Some(pb::Address {
                    host: "10.0.0.7".into(),
                    port: 50_000,
                }),
                sockname: Some(pb::Address {
                    host: "0.0.0.0".into(),
                    port: 7995,
                }),
                peercert: Some(pb::CertificateInfo {
                    cn: "sensor-7".into(),
                    dn: "CN=sensor-7".into(),
                }),
            }),
        });
        assert_eq!(conn, "c1");
        let Event::Created(meta) = event else {
            panic!("{event:?}")
        };
        assert!(meta.socktype.is_datagram());
        assert_eq!(meta.socktype, SockType::Dtls);
        assert_eq!(meta.peer, Some("10.0.0.7:50000".parse().unwrap()));
        assert_eq!(meta.sockname.map(|a| a.port()), Some(7995));
        assert_eq!(meta.cert_cn.as_deref(), Some("sensor-7"));

        // An empty CN (a listener without verify_peer) is no identity; an
        // unknown transport is framed as a stream.
        let (_, event) = created(pb::SocketCreatedRequest {
            conn: "c2".into(),
            conninfo: Some(pb::ConnInfo {
                socktype: 99,
                peercert: Some(pb::CertificateInfo::default()),
                ..pb::ConnInfo::default()
            }),
        });
        let Event::Created(meta) = event else {
            panic!("{event:?}")
        };
        assert_eq!(
            (meta.socktype, meta.cert_cn, meta.peer),
            (SockType::Tcp, None, None)
        );
    }
}
