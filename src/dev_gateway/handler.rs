//! The gateway's client of the adapter's handler service, in EMQX's two
//! styles: unary (one call per event) and streaming (one client stream per
//! RPC and connection, a request done once written).
//!
//! Every dispatch runs as its own task and reports back through its
//! `JoinHandle`, so a connection process keeps answering adapter calls while
//! its handler call is in flight: the adapter calls Send, Authenticate...
//! from inside that very handler call.
//!
//! A call that cannot reach the handler (no connection, connection refused
//! or cut) fails with [`HandlerError::Unreachable`], told apart from an
//! error status the handler answered, so that its connection process can
//! wait for the handler as EMQX 5.1 does; the error then carries the event
//! back. A call cut off after its request went out counts as unreachable
//! too: the gateway cannot tell whether the handler saw it, and neither
//! can EMQX.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::codes::erl_binary;
use super::faults::FaultState;
use crate::pb;
use crate::pb::connection_handler_client::ConnectionHandlerClient;
use crate::pb::connection_unary_handler_client::ConnectionUnaryHandlerClient;

/// Requests a client stream buffers before a send waits: EMQX's streams
/// also accept a few requests ahead of the handler.
const STREAM_BUFFER: usize = 16;

/// One handler event of one connection.
#[derive(Debug, Clone)]
pub(crate) enum HandlerEvent {
    Created(pb::SocketCreatedRequest),
    Bytes(pb::ReceivedBytesRequest),
    Timer(pb::TimerTimeoutRequest),
    Messages(pb::ReceivedMessagesRequest),
    Closed(pb::SocketClosedRequest),
}

impl HandlerEvent {
    /// EMQX's name for the call, used in close reasons.
    pub fn fun_name(&self) -> &'static str {
        match self {
            Self::Created(_) => "on_socket_created",
            Self::Bytes(_) => "on_received_bytes",
            Self::Timer(_) => "on_timer_timeout",
            Self::Messages(_) => "on_received_messages",
            Self::Closed(_) => "on_socket_closed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandlerError {
    #[error("{}", grpc_error(.0.code() as i32, .0.message()))]
    Status(tonic::Status),
    #[error("timeout")]
    Timeout,
    #[error("{}", grpc_error(tonic::Code::Unavailable as i32, "injected fault"))]
    Injected,
    /// The handler ended the stream; the event was not sent and can be sent
    /// again on a new stream (EMQX reopens a stream it cannot find).
    #[error("stream_closed")]
    StreamGone(Box<HandlerEvent>),
    /// The handler could not be reached, so it answered nothing. `ev` is
    /// the event, when the caller may try it again.
    #[error("{{connection_down,{reason}}}")]
    Unreachable {
        reason: &'static str,
        ev: Option<Box<HandlerEvent>>,
    },
}

impl HandlerError {
    /// `Unreachable` for a status that the transport made, keeping `ev`;
    /// `Status` for one the handler answered.
    fn from_status(status: tonic::Status, ev: Option<HandlerEvent>) -> Self {
        match unreachable_reason(&status) {
            Some(reason) => Self::Unreachable {
                reason,
                ev: ev.map(Box::new),
            },
            None => Self::Status(status),
        }
    }
}

fn grpc_error(code: i32, message: &str) -> String {
    format!("{{grpc_error,{{{code},{}}}}}", erl_binary(message))
}

/// Why the handler could not be reached, in EMQX's words, or `None` for a
/// status the handler answered. tonic gives a status that its transport
/// made the transport's error as its source; a status read from the
/// handler's answer has none.
fn unreachable_reason(status: &tonic::Status) -> Option<&'static str> {
    let mut cause = std::error::Error::source(status)?;
    loop {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Some(match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "econnrefused",
                std::io::ErrorKind::ConnectionReset => "econnreset",
                std::io::ErrorKind::ConnectionAborted => "econnaborted",
                std::io::ErrorKind::BrokenPipe => "epipe",
                std::io::ErrorKind::TimedOut => "etimedout",
                _ => "closed",
            });
        }
        match cause.source() {
            Some(next) => cause = next,
            // An HTTP/2 connection that ended, with no socket error under it.
            None => return Some("closed"),
        }
    }
}

/// A stream RPC that failed, reported to its connection process.
#[derive(Debug)]
pub(crate) struct StreamFailure {
    pub fun: &'static str,
    pub error: HandlerError,
}

/// Shared by every connection: one lazily connected channel to the handler.
#[derive(Debug, Clone)]
pub(crate) struct HandlerClient {
    channel: Channel,
    timeout: Duration,
    /// Whether a unary call keeps a copy of its event to give back when the
    /// handler cannot be reached: only worth the copy where the caller
    /// tries again.
    keep_unreachable: bool,
    faults: Arc<FaultState>,
}

impl HandlerClient {
    /// # Errors
    /// `url` is not a valid endpoint URL.
    pub fn new(
        url: &str,
        timeout: Duration,
        keep_unreachable: bool,
        faults: Arc<FaultState>,
    ) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
            .connect_lazy();
        Ok(Self {
            channel,
            timeout,
            keep_unreachable,
            faults,
        })
    }

    /// Sends one event as a unary call.
    pub fn unary(&self, conn: &str, ev: HandlerEvent) -> JoinHandle<Result<(), HandlerError>> {
        let mut client = ConnectionUnaryHandlerClient::new(self.channel.clone());
        let timeout = self.timeout;
        let injected = self.faults.handler_should_fail(conn);
        let kept = self.keep_unreachable.then(|| ev.clone());
        tokio::spawn(async move {
            if injected {
                return Err(HandlerError::Injected);
            }
            let call = async move {
                match ev {
                    HandlerEvent::Created(r) => client.on_socket_created(r).await.map(drop),
                    HandlerEvent::Bytes(r) => client.on_received_bytes(r).await.map(drop),
                    HandlerEvent::Timer(r) => client.on_timer_timeout(r).await.map(drop),
                    HandlerEvent::Messages(r) => client.on_received_messages(r).await.map(drop),
                    HandlerEvent::Closed(r) => client.on_socket_closed(r).await.map(drop),
                }
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(status)) => Err(HandlerError::from_status(status, kept)),
                Err(_) => Err(HandlerError::Timeout),
            }
        })
    }

    /// The stream set of one connection; failures of its RPCs go to
    /// `failures`.
    pub fn streams(&self, failures: mpsc::Sender<StreamFailure>) -> ConnStreams {
        ConnStreams {
            client: self.clone(),
            failures,
            created: None,
            bytes: None,
            timer: None,
            messages: None,
            closed: None,
        }
    }
}

/// One connection's client streams, opened on first use, as EMQX does.
#[derive(Debug)]
pub(crate) struct ConnStreams {
    client: HandlerClient,
    failures: mpsc::Sender<StreamFailure>,
    created: Option<mpsc::Sender<pb::SocketCreatedRequest>>,
    bytes: Option<mpsc::Sender<pb::ReceivedBytesRequest>>,
    timer: Option<mpsc::Sender<pb::TimerTimeoutRequest>>,
    messages: Option<mpsc::Sender<pb::ReceivedMessagesRequest>>,
    closed: Option<mpsc::Sender<pb::SocketClosedRequest>>,
}

type Rpc<T> = fn(
    ConnectionHandlerClient<Channel>,
    ReceiverStream<T>,
) -> std::pin::Pin<
    Box<dyn Future<Output = Result<tonic::Response<pb::EmptySuccess>, tonic::Status>> + Send>,
>;

impl ConnStreams {
    /// Writes one event on its stream; done once written. `pause` holds the
    /// task after the write (for `created_late`, so the written event gets a
    /// head start over the next one).
    pub fn send(
        &mut self,
        conn: &str,
        ev: HandlerEvent,
        pause: Duration,
    ) -> JoinHandle<Result<(), HandlerError>> {
        let injected = self.client.faults.handler_should_fail(conn);
        let timeout = self.client.timeout;
        macro_rules! on {
            ($field:ident, $req:expr, $variant:ident, $rpc:expr) => {{
                let tx = self.open(stringify!($field), |s| &mut s.$field, $rpc);
                let req = $req;
                tokio::spawn(async move {
                    if injected {
                        return Err(HandlerError::Injected);
                    }
                    match tokio::time::timeout(timeout, tx.send(req)).await {
                        Ok(Ok(())) => {
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                            Ok(())
                        }
                        Ok(Err(mpsc::error::SendError(req))) => Err(HandlerError::StreamGone(
                            Box::new(HandlerEvent::$variant(req)),
                        )),
                        Err(_) => Err(HandlerError::Timeout),
                    }
                })
            }};
        }
        match ev {
            HandlerEvent::Created(r) => on!(created, r, Created, |mut c, s| Box::pin(async move {
                c.on_socket_created(s).await
            })),
            HandlerEvent::Bytes(r) => on!(bytes, r, Bytes, |mut c, s| Box::pin(async move {
                c.on_received_bytes(s).await
            })),
            HandlerEvent::Timer(r) => on!(timer, r, Timer, |mut c, s| Box::pin(async move {
                c.on_timer_timeout(s).await
            })),
            HandlerEvent::Messages(r) => {
                on!(messages, r, Messages, |mut c, s| Box::pin(async move {
                    c.on_received_messages(s).await
                }))
            }
            HandlerEvent::Closed(r) => on!(closed, r, Closed, |mut c, s| Box::pin(async move {
                c.on_socket_closed(s).await
            })),
        }
    }

    /// Forgets the stream of `fun` so the next event reopens it.
    pub fn reset(&mut self, ev: &HandlerEvent) {
        match ev {
            HandlerEvent::Created(_) => self.created = None,
            HandlerEvent::Bytes(_) => self.bytes = None,
            HandlerEvent::Timer(_) => self.timer = None,
            HandlerEvent::Messages(_) => self.messages = None,
            HandlerEvent::Closed(_) => self.closed = None,
        }
    }

    fn open<T: Send + 'static>(
        &mut self,
        name: &'static str,
        slot: fn(&mut Self) -> &mut Option<mpsc::Sender<T>>,
        rpc: Rpc<T>,
    ) -> mpsc::Sender<T> {
        if let Some(tx) = slot(self) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let client = ConnectionHandlerClient::new(self.client.channel.clone());
        let failures = self.failures.clone();
        let fun = fun_of(name);
        tokio::spawn(async move {
            if let Err(status) = rpc(client, ReceiverStream::new(rx)).await {
                // The connection may be gone already; then nobody needs it.
                let _ = failures
                    .send(StreamFailure {
                        fun,
                        error: HandlerError::Status(status),
                    })
                    .await;
            }
        });
        *slot(self) = Some(tx.clone());
        tx
    }
}

fn fun_of(field: &str) -> &'static str {
    match field {
        "created" => "on_socket_created",
        "bytes" => "on_received_bytes",
        "timer" => "on_timer_timeout",
        "messages" => "on_received_messages",
        _ => "on_socket_closed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_url() -> String {
        // A port that was free a moment ago: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    fn timer() -> HandlerEvent {
        HandlerEvent::Timer(pb::TimerTimeoutRequest {
            conn: "c".into(),
            r#type: pb::TimerType::Keepalive as i32,
        })
    }

    #[tokio::test]
    async fn a_refused_unary_call_is_unreachable_and_gives_its_event_back() {
        let url = refused_url();
        let keeping =
            HandlerClient::new(&url, Duration::from_secs(5), true, Arc::default()).unwrap();
        let err = keeping.unary("c", timer()).await.unwrap().unwrap_err();
        assert!(
            matches!(&err, HandlerError::Unreachable { reason: "econnrefused", ev: Some(ev) }
                if matches!(**ev, HandlerEvent::Timer(_))),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "{connection_down,econnrefused}");

        let plain =
            HandlerClient::new(&url, Duration::from_secs(5), false, Arc::default()).unwrap();
        let err = plain.unary("c", timer()).await.unwrap().unwrap_err();
        assert!(
            matches!(err, HandlerError::Unreachable { ev: None, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_status_the_handler_answered_is_not_unreachable() {
        // Even UNAVAILABLE, when the handler itself says it.
        let err = HandlerError::from_status(tonic::Status::unavailable("busy"), Some(timer()));
        assert!(matches!(err, HandlerError::Status(_)), "{err:?}");
        assert_eq!(err.to_string(), "{grpc_error,{14,<<\"busy\">>}}");
    }
}
