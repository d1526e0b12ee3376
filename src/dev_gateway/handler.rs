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
//! back, when the request never reached the handler (EMQX 5.1's gRPC
//! client holds such a call and sends it once connected again). A call cut
//! off after its request went out fails, as in EMQX (its gun client reports
//! the stream down): the handler may have served it. In stream mode a request is done once written, as in EMQX, so
//! only opening a stream can meet an unreachable handler: a new stream
//! counts as open once the RPC takes its first request, and an RPC that
//! ends before that gives the waiting request back. An open stream that
//! breaks because the handler went away fails no call (what was written
//! is lost, as in EMQX); it is forgotten, and the next event opens a new
//! one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
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
    /// `Unreachable` for a status that the transport made, keeping `ev`
    /// when the request never reached the handler; `Status` for one the
    /// handler answered.
    fn from_status(status: tonic::Status, ev: Option<HandlerEvent>) -> Self {
        match unreachable_reason(&status) {
            Some(reason) => Self::Unreachable {
                reason,
                ev: ev.filter(|_| unsent(&status)).map(Box::new),
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

/// Whether a transport failure left the request unseen by the handler:
/// no connection, a request the HTTP/2 client never sent (its connection
/// closed first), or a stream the handler refused unprocessed (GOAWAY,
/// REFUSED_STREAM). EMQX 5.1's client sends such a call once it has a
/// connection again; one that failed after it went out fails there (its
/// client is closed), since the handler may have served it.
fn unsent(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotConnected
            );
        }
        if c.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        // tonic's connect errors say so only in their text.
        if c.to_string().contains("tcp connect error") {
            return true;
        }
        cause = c.source();
    }
    false
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
    created: Option<OpenStream<pb::SocketCreatedRequest>>,
    bytes: Option<OpenStream<pb::ReceivedBytesRequest>>,
    timer: Option<OpenStream<pb::TimerTimeoutRequest>>,
    messages: Option<OpenStream<pb::ReceivedMessagesRequest>>,
    closed: Option<OpenStream<pb::SocketClosedRequest>>,
}

/// The writing end of one stream.
#[derive(Debug)]
struct OpenStream<T> {
    tx: mpsc::Sender<T>,
    state: Arc<StreamState>,
}

impl<T> OpenStream<T> {
    fn usable(&self) -> bool {
        !self.tx.is_closed() && !self.state.ended.load(Ordering::Acquire)
    }
}

/// What the task that runs a stream's RPC and the stream's writers share.
#[derive(Debug)]
struct StreamState {
    /// Taken by whichever comes first: the RPC asking for its first request
    /// (`Ok`: the stream is open), or the RPC ending before that (its
    /// error, for the request that waits to be written).
    opening: Mutex<Option<oneshot::Sender<Result<(), tonic::Status>>>>,
    /// Set when the RPC ended: the request body may outlive the RPC inside
    /// the HTTP/2 client, so its channel is not known to be closed.
    ended: AtomicBool,
}

impl StreamState {
    fn take_opening(&self) -> Option<oneshot::Sender<Result<(), tonic::Status>>> {
        self.opening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// The request body of a stream RPC: the channel its writers fill, which
/// says that the stream is open the first time the RPC polls it.
struct Outgoing<T> {
    rx: mpsc::Receiver<T>,
    state: Arc<StreamState>,
}

impl<T> futures::Stream for Outgoing<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(opened) = self.state.take_opening() {
            let _ = opened.send(Ok(()));
        }
        self.rx.poll_recv(cx)
    }
}

type Rpc<T> = fn(
    ConnectionHandlerClient<Channel>,
    Outgoing<T>,
) -> Pin<
    Box<dyn Future<Output = Result<tonic::Response<pb::EmptySuccess>, tonic::Status>> + Send>,
>;

/// A stream a request is about to be written on, and, for a new stream,
/// the news of whether it opened.
type Opened<T> = (
    mpsc::Sender<T>,
    Option<oneshot::Receiver<Result<(), tonic::Status>>>,
);

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
                let (tx, opening) = self.open(stringify!($field), |s| &mut s.$field, $rpc);
                let req = $req;
                tokio::spawn(async move {
                    if injected {
                        return Err(HandlerError::Injected);
                    }
                    let write = async move {
                        if let Some(opening) = opening {
                            match opening.await {
                                Ok(Ok(())) => {}
                                Ok(Err(status)) => {
                                    return Err(HandlerError::from_status(
                                        status,
                                        Some(HandlerEvent::$variant(req)),
                                    ));
                                }
                                // Ended without a word before taking a
                                // request: as if the handler closed it.
                                Err(_) => {
                                    return Err(HandlerError::StreamGone(Box::new(
                                        HandlerEvent::$variant(req),
                                    )));
                                }
                            }
                        }
                        tx.send(req).await.map_err(|mpsc::error::SendError(req)| {
                            HandlerError::StreamGone(Box::new(HandlerEvent::$variant(req)))
                        })
                    };
                    match tokio::time::timeout(timeout, write).await {
                        Ok(Ok(())) => {
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                            Ok(())
                        }
                        Ok(Err(e)) => Err(e),
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
        slot: fn(&mut Self) -> &mut Option<OpenStream<T>>,
        rpc: Rpc<T>,
    ) -> Opened<T> {
        if let Some(stream) = slot(self) {
            if stream.usable() {
                return (stream.tx.clone(), None);
            }
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (opened_tx, opened) = oneshot::channel();
        let state = Arc::new(StreamState {
            opening: Mutex::new(Some(opened_tx)),
            ended: AtomicBool::new(false),
        });
        let body = Outgoing {
            rx,
            state: state.clone(),
        };
        let client = ConnectionHandlerClient::new(self.client.channel.clone());
        let failures = self.failures.clone();
        let fun = fun_of(name);
        let rpc_state = state.clone();
        tokio::spawn(async move {
            let res = rpc(client, body).await;
            rpc_state.ended.store(true, Ordering::Release);
            let Err(status) = res else {
                return;
            };
            if let Some(opening) = rpc_state.take_opening() {
                // Nothing was written yet: the writer waiting for this stream
                // gets the error along with its request.
                let _ = opening.send(Err(status));
                return;
            }
            if let Some(reason) = unreachable_reason(&status) {
                tracing::debug!(
                    call = fun,
                    reason,
                    "handler stream broken, reopened on next use"
                );
                return;
            }
            // The connection may be gone already; then nobody needs it.
            let _ = failures
                .send(StreamFailure {
                    fun,
                    error: HandlerError::Status(status),
                })
                .await;
        });
        *slot(self) = Some(OpenStream {
            tx: tx.clone(),
            state,
        });
        (tx, Some(opened))
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

    #[tokio::test]
    async fn a_stream_that_cannot_open_gives_its_request_back() {
        let client = HandlerClient::new(
            &refused_url(),
            Duration::from_secs(5),
            false,
            Arc::default(),
        )
        .unwrap();
        let (failures, mut failed) = mpsc::channel(1);
        let mut streams = client.streams(failures);
        let err = streams
            .send("c", timer(), Duration::ZERO)
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(&err, HandlerError::Unreachable { reason: "econnrefused", ev: Some(ev) }
                if matches!(**ev, HandlerEvent::Timer(_))),
            "{err:?}"
        );
        // The write got the error; nothing else closes the connection.
        drop(streams);
        assert!(failed.recv().await.is_none());
    }

    #[test]
    fn a_status_the_handler_answered_is_not_unreachable() {
        // Even UNAVAILABLE, when the handler itself says it.
        let err = HandlerError::from_status(tonic::Status::unavailable("busy"), Some(timer()));
        assert!(matches!(err, HandlerError::Status(_)), "{err:?}");
        assert_eq!(err.to_string(), "{grpc_error,{14,<<\"busy\">>}}");
    }
}
