//! One client connection: the stand-in for EMQX's connection process. It
//! owns the socket, queues handler events and sends them one at a time,
//! answers adapter calls (which arrive through its mailbox, also while its
//! own handler call is in flight), and runs the idle and keepalive timers.
//!
//! How it ends, as in EMQX:
//! - The socket closes (client EOF, `Close`, kick, keepalive timeout): the
//!   process lives on until the events already queued have been handled,
//!   then sends `OnSocketClosed` as its last call and exits without waiting
//!   for the answer. Meanwhile Send and Close answer SUCCESS and
//!   Authenticate PERMISSION_DENY. If the queue does not drain within
//!   15 s, the process exits anyway.
//! - The process is stopped (discarded, idle timeout, a failed handler
//!   call): the socket closes and the process exits at once; queued events
//!   are dropped, and `OnSocketClosed` is sent only if no handler call is in
//!   flight (EMQX loses it otherwise).
//!
//! While the handler cannot be reached (refused, cut, no connection), a
//! handler call fails at once under EMQX 5.8 like any failed call. Under
//! EMQX 5.1 it waits instead: it is tried again with backoff until the
//! handler answers or `handler_retry` has passed since its first failure,
//! and the connection's later events queue behind it, so a quick handler
//! restart loses nothing and keeps the order. Past the bound it fails like
//! any call. Meanwhile the process answers adapter calls and runs its
//! timers as always; a waiting call counts as in flight, and when the
//! process stops it is dropped, never sent later. A connection with no
//! event meanwhile notices nothing, on both versions.
//!
//! With an ExHook client, an authenticated connection reports
//! `client.connected`, and `client.disconnected` when its socket closes
//! (not when it is stopped, as in EMQX); each Publish reports
//! `message.publish`.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::codes;
use super::config::HandlerMode;
use super::exhook;
use super::handler::{ConnStreams, HandlerError, HandlerEvent, StreamFailure};
use super::mailbox::ConnCmd;
use super::message::{make_message, DeliverTx};
use super::mqtt::{MqttSession, SubscribeError};
use super::registry::ConnHandle;
use super::router::Router;
use super::shared::Shared;
use crate::exhook::pb::v3 as hpb;
use crate::pb;
use crate::protocol::topic;

/// Bytes read from the socket at a time; each read is one OnReceivedBytes.
const READ_CHUNK: usize = 16 * 1024;
/// Chunks waiting to be written to a slow client before Send waits.
const WRITE_QUEUE: usize = 64;
/// A write that makes no progress for this long gives up on the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages per OnReceivedMessages call at most.
const MAX_BATCH: usize = 100;
/// How long a closed connection may take to drain its queue (EMQX's
/// force_close timer).
const FORCE_CLOSE: Duration = Duration::from_secs(15);
/// `created_late`: how long OnSocketCreated waits for the first bytes.
const CREATED_LATE_MAX: Duration = Duration::from_millis(500);
/// `created_late`: head start of the first bytes over OnSocketCreated.
const CREATED_LATE_PAUSE: Duration = Duration::from_millis(50);
/// A handler that ends its stream at once would otherwise be reopened
/// forever.
const MAX_STREAM_REOPEN: u32 = 3;
/// EMQX 5.1: the first wait before a call that could not reach the handler
/// is tried again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between tries: a handler back from a restart is found
/// within about this long.
const RETRY_MAX: Duration = Duration::from_secs(2);

enum Phase {
    Connecting,
    Connected { clientid: String },
}

/// Held while a connection has a handler call pending, so that
/// `calls_pending` counts it; released however the process ends.
struct PendingCall(Arc<Shared>);

impl PendingCall {
    fn new(shared: Arc<Shared>) -> Self {
        shared.stats.calls_pending.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        self.0.stats.calls_pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handler call waiting for its handler to come back (EMQX 5.1).
struct Unreachable {
    /// When the call fails for good and the connection is stopped.
    give_up: Instant,
    /// The wait before the next try.
    backoff: Duration,
    /// The event and when to try it again; `None` while a try is in flight.
    again: Option<(HandlerEvent, Instant)>,
}

struct Keepalive {
    interval: Duration,
    /// `recv_count` at the last check.
    last_count: u64,
    next_check: Instant,
}

/// Where a connection's bytes come from: a byte stream (TCP, TLS), or the
/// datagrams of one UDP peer, which the listener hands over one by one.
pub(crate) enum Source {
    Stream(Box<dyn AsyncRead + Send + Sync + Unpin>),
    Datagrams(mpsc::Receiver<Bytes>),
}

struct Conn {
    id: Arc<str>,
    shared: Arc<Shared>,
    handle: ConnHandle,
    reader: Option<Source>,
    /// Dropping it lets the writer task flush and close the socket.
    writer: Option<mpsc::Sender<Bytes>>,
    deliver_tx: DeliverTx,
    phase: Phase,
    /// Events waiting for their handler call, in order.
    queue: VecDeque<HandlerEvent>,
    inflight: Option<JoinHandle<Result<(), HandlerError>>>,
    inflight_fun: &'static str,
    /// Set while the call in flight, or waiting, could not reach the handler.
    unreachable: Option<Unreachable>,
    pending_call: Option<PendingCall>,
    /// Stream mode only.
    streams: Option<ConnStreams>,
    stream_reopens: u32,
    /// `created_late`: OnSocketCreated held back until the first bytes.
    created_hold: Option<(pb::SocketCreatedRequest, Instant)>,
    late_pause: bool,
    /// Until the first byte arrives.
    idle_deadline: Option<Instant>,
    /// Reads so far; keepalive only needs to know whether it moved.
    recv_count: u64,
    keepalive: Option<Keepalive>,
    /// After the socket closed: the reason, and when draining gives up.
    closed: Option<(String, Instant)>,
    subs: HashSet<String>,
    mqtt: Option<MqttSession>,
    exit: bool,
    /// The client's address and the listener's, for hook `ClientInfo`.
    peer: SocketAddr,
    local: Option<SocketAddr>,
    /// Set while the connection is reported as connected to the hook
    /// server; taken when its disconnect is reported.
    hook_info: Option<hpb::ClientInfo>,
}

/// Runs one accepted client socket until its process exits.
pub(crate) async fn run(
    shared: Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    // Nagle would hold back the small reply lines of a chat protocol.
    let _ = socket.set_nodelay(true);
    let local = socket.local_addr().ok();
    let (reader, write_half) = socket.into_split();
    serve(
        shared,
        Source::Stream(Box::new(reader)),
        |rx| write_loop(write_half, rx),
        (peer, local),
        (pb::SocketType::Tcp, None),
        permit,
    )
    .await;
}

/// Runs one socket of the TLS listener: the handshake first (a client that
/// fails it, or takes longer than the idle timeout, is closed without a
/// handler call, as EMQX does), then as a TCP connection whose
/// `ConnInfo` says `SSL` and carries the client certificate, if any.
pub(crate) async fn run_tls(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _ = socket.set_nodelay(true);
    let local = socket.local_addr().ok();
    let handshake = tokio::time::timeout(shared.cfg.idle_timeout, acceptor.accept(socket));
    let stream = match handshake.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let peercert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| super::tls::peercert(cert));
    let (reader, writer) = tokio::io::split(stream);
    serve(
        shared,
        Source::Stream(Box::new(reader)),
        |rx| write_loop(writer, rx),
        (peer, local),
        (pb::SocketType::Ssl, peercert),
        permit,
    )
    .await;
}

/// Runs one UDP peer as a connection, as EMQX's UDP listener does: each
/// datagram from it is one `OnReceivedBytes`, each `Send` one datagram to
/// it. It ends as a TCP connection does, but for the end of its socket:
/// a UDP peer cannot say it is gone (`Close`, keepalive, idle timeout).
pub(crate) async fn run_datagrams(
    shared: Arc<Shared>,
    datagrams: mpsc::Receiver<Bytes>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let local = socket.local_addr().ok();
    let send = |mut rx: mpsc::Receiver<Bytes>| async move {
        while let Some(datagram) = rx.recv().await {
            if let Err(e) = socket.send_to(&datagram, peer).await {
                tracing::debug!(error = %e, "datagram not sent");
            }
        }
    };
    serve(
        shared,
        Source::Datagrams(datagrams),
        send,
        (peer, local),
        (pb::SocketType::Udp, None),
        permit,
    )
    .await;
}

/// Runs a connection whose bytes come from `reader` and whose `Send`s go
/// to the task `writer` makes of its queue (run in the connection's span).
async fn serve<W, F>(
    shared: Arc<Shared>,
    reader: Source,
    writer: W,
    (peer, local): (SocketAddr, Option<SocketAddr>),
    (socktype, peercert): (pb::SocketType, Option<pb::CertificateInfo>),
    _permit: OwnedSemaphorePermit,
) where
    W: FnOnce(mpsc::Receiver<Bytes>) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (id, seq) = shared.registry.issue();
    let span = tracing::info_span!("conn", conn = %id);
    let (wtx, wrx) = mpsc::channel(WRITE_QUEUE);
    tokio::spawn(writer(wrx).instrument(span.clone()));
    let cap = shared.cfg.queue_limit;
    let (cmd_tx, cmds) = mpsc::channel(cap);
    let (deliver_tx, deliveries) = mpsc::channel(cap);
    let (fail_tx, failures) = mpsc::channel(8);
    let handle = ConnHandle {
        id: id.clone(),
        seq,
        tx: cmd_tx,
    };
    shared.registry.insert(handle.clone());

    let created = pb::SocketCreatedRequest {
        conn: id.to_string(),
        conninfo: Some(pb::ConnInfo {
            socktype: socktype as i32,
            peername: Some(address(peer)),
            sockname: local.map(address),
            peercert,
        }),
    };
    let streams = match shared.cfg.handler_mode {
        HandlerMode::Unary => None,
        HandlerMode::Stream => Some(shared.handler.streams(fail_tx)),
    };
    let now = Instant::now();
    let mut conn = Conn {
        id,
        idle_deadline: Some(now + shared.cfg.idle_timeout),
        shared,
        handle,
        reader: Some(reader),
        writer: Some(wtx),
        deliver_tx,
        phase: Phase::Connecting,
        queue: VecDeque::new(),
        inflight: None,
        inflight_fun: "",
        unreachable: None,
        pending_call: None,
        streams,
        stream_reopens: 0,
        created_hold: None,
        late_pause: false,
        recv_count: 0,
        keepalive: None,
        closed: None,
        subs: HashSet::new(),
        mqtt: None,
        exit: false,
        peer,
        local,
        hook_info: None,
    };
    if conn.shared.cfg.created_late && conn.streams.is_some() {
        conn.created_hold = Some((created, now + CREATED_LATE_MAX));
    } else {
        conn.queue.push_back(HandlerEvent::Created(created));
    }
    async move {
        tracing::info!(%peer, "connection accepted");
        conn.main_loop(cmds, deliveries, failures).await;
        conn.cleanup();
    }
    .instrument(span)
    .await;
}

fn address(addr: SocketAddr) -> pb::Address {
    pb::Address {
        host: addr.ip().to_string(),
        port: u32::from(addr.port()),
    }
}

async fn write_loop(mut w: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(chunk) = rx.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                return;
            }
            Err(_) => {
                tracing::info!("client stopped reading, giving up on its writes");
                return;
            }
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, w.shutdown()).await;
}

async fn join_opt<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// The next read or datagram; empty at the end of the stream.
async fn read_opt(r: Option<&mut Source>, buf: &mut [u8], enabled: bool) -> io::Result<Bytes> {
    match r {
        Some(Source::Stream(r)) if enabled => {
            let n = r.read(buf).await?;
            Ok(Bytes::copy_from_slice(&buf[..n]))
        }
        Some(Source::Datagrams(rx)) if enabled => loop {
            match rx.recv().await {
                // An empty datagram carries no bytes to hand on.
                Some(d) if d.is_empty() => continue,
                Some(d) => return Ok(d),
                None => return Ok(Bytes::new()),
            }
        },
        _ => std::future::pending().await,
    }
}

async fn recv_opt<T>(rx: &mut mpsc::Receiver<T>, enabled: bool) -> Option<T> {
    if enabled {
        rx.recv().await
    } else {
        std::future::pending().await
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn io_reason(e: &io::Error) -> String {
    let name = match e.kind() {
        io::ErrorKind::ConnectionReset => "econnreset",
        io::ErrorKind::ConnectionAborted => "econnaborted",
        io::ErrorKind::BrokenPipe => "epipe",
        io::ErrorKind::TimedOut => "etimedout",
        _ => "closed",
    };
    format!("{{shutdown,{name}}}")
}

impl Conn {
    async fn main_loop(
        &mut self,
        mut cmds: mpsc::Receiver<ConnCmd>,
        mut deliveries: mpsc::Receiver<pb::Message>,
        mut failures: mpsc::Receiver<StreamFailure>,
    ) {
        let mut buf = vec![0u8; READ_CHUNK];
        let shutdown = self.shared.shutdown.clone();
        loop {
            self.pump();
            let pending = self.inflight.is_some() || self.unreachable.is_some();
            if pending != self.pending_call.is_some() {
                self.pending_call = pending.then(|| PendingCall::new(self.shared.clone()));
            }
            if self.exit {
                return;
            }
            let room = self.queue.len() < self.shared.cfg.queue_limit;
            let take_deliveries = room && self.reader.is_some();
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // The whole gateway stops: no more handler calls.
                    self.drop_socket();
                    self.exit = true;
                }
                res = join_opt(&mut self.inflight) => {
                    self.inflight = None;
                    self.on_call_done(res);
                }
                Some(failure) = failures.recv() => {
                    self.fail(failure.fun, &failure.error);
                }
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => self.exit = true,
                },
                res = read_opt(self.reader.as_mut(), &mut buf, room) => self.on_read(res),
                Some(msg) = recv_opt(&mut deliveries, take_deliveries) => {
                    self.on_delivery(msg, &mut deliveries);
                }
                () = sleep_opt(deadline) => self.on_deadline(),
            }
        }
    }

    /// Starts the next handler call when none is in flight, or tries the
    /// waiting one again when it is due.
    fn pump(&mut self) {
        if self.inflight.is_some() || self.exit {
            return;
        }
        if let Some(waiting) = &mut self.unreachable {
            match waiting.again.take() {
                Some((ev, at)) if at <= Instant::now() => {
                    tracing::debug!(call = ev.fun_name(), "trying the handler again");
                    self.inflight = Some(self.send_event(ev));
                    return;
                }
                Some(not_yet) => {
                    waiting.again = Some(not_yet);
                    return;
                }
                None => self.unreachable = None,
            }
        }
        let Some(ev) = self.queue.pop_front() else {
            return;
        };
        if matches!(ev, HandlerEvent::Closed(_)) {
            // EMQX's terminate: the last call goes out and the process exits
            // without waiting for its answer.
            drop(self.dispatch(ev));
            self.exit = true;
            return;
        }
        self.inflight_fun = ev.fun_name();
        self.inflight = Some(self.dispatch(ev));
    }

    fn dispatch(&mut self, ev: HandlerEvent) -> JoinHandle<Result<(), HandlerError>> {
        tracing::debug!(call = ev.fun_name(), "handler call");
        self.shared
            .stats
            .handler_events
            .fetch_add(1, Ordering::Relaxed);
        self.send_event(ev)
    }

    /// [`dispatch`](Self::dispatch) without counting: a try again is the
    /// same event.
    fn send_event(&mut self, ev: HandlerEvent) -> JoinHandle<Result<(), HandlerError>> {
        match &mut self.streams {
            None => self.shared.handler.unary(&self.id, ev),
            Some(streams) => {
                let pause = if self.late_pause && matches!(ev, HandlerEvent::Bytes(_)) {
                    self.late_pause = false;
                    CREATED_LATE_PAUSE
                } else {
                    Duration::ZERO
                };
                streams.send(&self.id, ev, pause)
            }
        }
    }

    fn on_call_done(&mut self, res: Result<Result<(), HandlerError>, JoinError>) {
        match res {
            Ok(Ok(())) => {
                self.stream_reopens = 0;
                if self.unreachable.take().is_some() {
                    tracing::debug!(
                        call = self.inflight_fun,
                        "handler reached, the waiting call went through"
                    );
                }
            }
            Ok(Err(HandlerError::Unreachable {
                reason,
                ev: Some(ev),
            })) if self.shared.cfg.unreachable_retry().is_some() => {
                self.wait_for_handler(*ev, reason);
            }
            Ok(Err(HandlerError::StreamGone(ev))) if self.stream_reopens < MAX_STREAM_REOPEN => {
                self.stream_reopens += 1;
                if let Some(streams) = &mut self.streams {
                    streams.reset(&ev);
                }
                self.queue.push_front(*ev);
            }
            Ok(Err(e)) => self.fail(self.inflight_fun, &e),
            Err(e) => {
                tracing::error!(error = %e, "handler call task failed");
                self.fail(self.inflight_fun, &HandlerError::Timeout);
            }
        }
    }

    /// EMQX 5.1: a call that could not reach the handler is tried again
    /// later, until the bound passes.
    fn wait_for_handler(&mut self, ev: HandlerEvent, reason: &'static str) {
        let now = Instant::now();
        let bound = self.shared.cfg.unreachable_retry().unwrap_or_default();
        let waiting = self.unreachable.get_or_insert_with(|| {
            tracing::debug!(
                call = ev.fun_name(),
                reason,
                "handler unreachable, the call waits for it"
            );
            Unreachable {
                give_up: now + bound,
                backoff: RETRY_FIRST,
                again: None,
            }
        });
        if now >= waiting.give_up {
            self.unreachable = None;
            self.fail(
                ev.fun_name(),
                &HandlerError::Unreachable { reason, ev: None },
            );
            return;
        }
        // The last try falls on the bound, so the client closes when it is
        // due rather than up to a backoff later.
        let at = (now + waiting.backoff).min(waiting.give_up);
        waiting.backoff = (waiting.backoff * 2).min(RETRY_MAX);
        waiting.again = Some((ev, at));
    }

    /// A failed handler call stops the process, as in EMQX.
    fn fail(&mut self, fun: &str, e: &HandlerError) {
        tracing::warn!(call = fun, error = %e, "handler call failed, closing the connection");
        self.stop(format!("{{shutdown,{{error,{{{fun},{e}}}}}}}"));
    }

    /// Stops the process at once (EMQX's `{shutdown, Reason}` from a
    /// callback): see the module doc.
    fn stop(&mut self, reason: String) {
        if self.exit {
            return;
        }
        tracing::info!(%reason, "connection stopped");
        self.drop_socket();
        self.queue.clear();
        let waiting = self.unreachable.take().is_some_and(|u| u.again.is_some());
        if self.inflight.is_none() && !waiting {
            let ev = HandlerEvent::Closed(pb::SocketClosedRequest {
                conn: self.id.to_string(),
                reason,
            });
            drop(self.dispatch(ev));
        } else {
            tracing::debug!("OnSocketClosed lost: a handler call is in flight");
        }
        self.exit = true;
    }

    /// The socket closes; the process drains its queue and then exits.
    fn close_socket(&mut self, reason: String) {
        if self.reader.is_none() || self.exit {
            return;
        }
        tracing::info!(%reason, "socket closed");
        if let Phase::Connected { clientid } = &self.phase {
            self.shared
                .registry
                .socket_closed(clientid, self.handle.seq);
        }
        if let (Some(hooks), Some(info)) = (&self.shared.exhook, self.hook_info.take()) {
            hooks.disconnected(info, &reason);
        }
        self.drop_socket();
        self.keepalive = None;
        self.idle_deadline = None;
        self.release_created();
        self.queue
            .push_back(HandlerEvent::Closed(pb::SocketClosedRequest {
                conn: self.id.to_string(),
                reason: reason.clone(),
            }));
        self.closed = Some((reason, Instant::now() + FORCE_CLOSE));
    }

    fn drop_socket(&mut self) {
        self.reader = None;
        self.writer = None;
    }

    fn socket_open(&self) -> bool {
        self.reader.is_some()
    }

    fn enqueue(&mut self, ev: HandlerEvent) {
        if let Some((created, _)) = self.created_hold.take() {
            if matches!(ev, HandlerEvent::Bytes(_)) {
                self.queue.push_back(ev);
                self.queue.push_back(HandlerEvent::Created(created));
                self.late_pause = true;
                return;
            }
            self.queue.push_back(HandlerEvent::Created(created));
        }
        self.queue.push_back(ev);
    }

    fn release_created(&mut self) {
        if let Some((created, _)) = self.created_hold.take() {
            self.queue.push_back(HandlerEvent::Created(created));
        }
    }

    fn on_read(&mut self, res: io::Result<Bytes>) {
        match res {
            Ok(b) if b.is_empty() => self.close_socket("{shutdown,tcp_closed}".to_owned()),
            Ok(bytes) => {
                tracing::trace!(bytes = bytes.len(), "received");
                self.recv_count += 1;
                self.idle_deadline = None;
                self.enqueue(HandlerEvent::Bytes(pb::ReceivedBytesRequest {
                    conn: self.id.to_string(),
                    bytes,
                }));
            }
            Err(e) => self.close_socket(io_reason(&e)),
        }
    }

    fn on_delivery(&mut self, first: pb::Message, rx: &mut mpsc::Receiver<pb::Message>) {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if let Some(HandlerEvent::Messages(waiting)) = self.queue.back_mut() {
            if waiting.messages.len() + batch.len() <= MAX_BATCH {
                waiting.messages.extend(batch);
                return;
            }
        }
        self.enqueue(HandlerEvent::Messages(pb::ReceivedMessagesRequest {
            conn: self.id.to_string(),
            messages: batch,
        }));
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.idle_deadline,
            self.keepalive.as_ref().map(|k| k.next_check),
            self.created_hold.as_ref().map(|c| c.1),
            self.closed.as_ref().map(|c| c.1),
            self.unreachable
                .as_ref()
                .and_then(|u| u.again.as_ref().map(|a| a.1)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        if let Some((reason, give_up)) = &self.closed {
            if *give_up <= now {
                let reason = reason.clone();
                self.stop(reason);
                return;
            }
        }
        if self.idle_deadline.is_some_and(|d| d <= now) {
            self.stop("{shutdown,idle_timeout}".to_owned());
            return;
        }
        if self.created_hold.as_ref().is_some_and(|c| c.1 <= now) {
            self.release_created();
        }
        let recv_count = self.recv_count;
        let mut timed_out = false;
        if let Some(ka) = &mut self.keepalive {
            if ka.next_check <= now {
                if ka.last_count == recv_count {
                    timed_out = true;
                } else {
                    ka.last_count = recv_count;
                    ka.next_check = now + ka.interval;
                }
            }
        }
        if timed_out {
            // One step, as in EMQX: the timeout goes to the handler and the
            // socket closes, so nothing the handler sends reaches the client.
            self.keepalive = None;
            self.enqueue(HandlerEvent::Timer(pb::TimerTimeoutRequest {
                conn: self.id.to_string(),
                r#type: pb::TimerType::Keepalive as i32,
            }));
            self.close_socket("{shutdown,keepalive_timeout}".to_owned());
        }
    }

    async fn on_cmd(&mut self, cmd: ConnCmd) {
        match cmd {
            ConnCmd::Send { bytes, reply } => {
                if let Some(w) = &self.writer {
                    if !bytes.is_empty() && w.send(bytes).await.is_err() {
                        tracing::debug!("writer gone, bytes dropped");
                    }
                }
                let _ = reply.send(codes::success());
            }
            ConnCmd::Close { reply } => {
                let _ = reply.send(codes::success());
                self.close_socket("{shutdown,normal}".to_owned());
            }
            ConnCmd::Authenticate {
                clientinfo,
                password,
                reply,
            } => {
                let res = self.authenticate(clientinfo, password.expose()).await;
                let _ = reply.send(res);
            }
            ConnCmd::StartTimer { interval, reply } => {
                if self.socket_open() {
                    let interval = Duration::from_secs(u64::from(interval));
                    self.keepalive = Some(Keepalive {
                        interval,
                        last_count: self.recv_count,
                        next_check: Instant::now() + interval,
                    });
                }
                let _ = reply.send(codes::success());
            }
            ConnCmd::Publish {
                topic,
                qos,
                payload,
                reply,
            } => {
                let res = self.publish(&topic, qos, payload).await;
                let _ = reply.send(res);
            }
            ConnCmd::Subscribe { topic, qos, reply } => {
                let res = self.subscribe(topic, qos).await;
                let _ = reply.send(res);
            }
            ConnCmd::Unsubscribe { topic, reply } => {
                let res = self.unsubscribe(&topic).await;
                let _ = reply.send(res);
            }
            ConnCmd::Discard { done } => {
                let _ = done.send(());
                self.stop("{shutdown,discarded}".to_owned());
            }
            ConnCmd::Kick => self.close_socket("{shutdown,kicked}".to_owned()),
        }
    }

    /// The clientid, if Publish/Subscribe/Unsubscribe may run: EMQX answers
    /// them only in the `connected` state, which ends when the socket
    /// closes.
    fn connected_clientid(&self) -> Option<&str> {
        match &self.phase {
            Phase::Connected { clientid } if self.socket_open() => Some(clientid),
            _ => None,
        }
    }

    async fn authenticate(&mut self, info: pb::ClientInfo, password: &str) -> pb::CodeResponse {
        if !self.socket_open() {
            return codes::permission_deny("<<\"Client socket disconnected\">>");
        }
        if matches!(self.phase, Phase::Connected { .. }) {
            return codes::permission_deny("<<\"Duplicated authenticate command\">>");
        }
        let clientid = info.clientid;
        if let Err(reason) =
            self.shared
                .access
                .authenticate(&info.proto_name, &info.username, password)
        {
            tracing::info!(%clientid, username = %info.username, "authentication refused");
            return codes::permission_deny(reason);
        }
        if let Some(old) =
            self.shared
                .registry
                .claim_clientid(&clientid, &info.username, self.handle.clone())
        {
            self.discard(old).await;
        }
        if let Router::Mqtt(router) = &self.shared.router {
            let tx = self.handle.tx.clone();
            let lost = Box::new(move || {
                tokio::spawn(async move {
                    let _ = tx.send(ConnCmd::Kick).await;
                });
            });
            match router
                .session(&clientid, self.deliver_tx.clone(), lost)
                .await
            {
                Ok(session) => self.mqtt = Some(session),
                Err(e) => {
                    tracing::warn!(%clientid, error = %e, "MQTT session failed");
                    self.shared
                        .registry
                        .release_clientid(&clientid, self.handle.seq);
                    return codes::permission_deny(codes::erl_binary(&e));
                }
            }
        }
        tracing::info!(%clientid, username = %info.username, proto = %info.proto_name, "authenticated");
        if let Some(hooks) = &self.shared.exhook {
            let hook_info = exhook::client_info(
                &self.shared.cfg.node,
                &clientid,
                &info.username,
                &info.proto_name,
                self.peer,
                self.local,
            );
            hooks.connected(&hook_info);
            self.hook_info = Some(hook_info);
        }
        self.phase = Phase::Connected { clientid };
        codes::success()
    }

    /// Stops the older owner of a clientid and waits until it is gone.
    async fn discard(&self, old: ConnHandle) {
        tracing::info!(old = %old.id, "discarding the older connection with this clientid");
        let (done, gone) = oneshot::channel();
        let wait = async {
            if old.tx.send(ConnCmd::Discard { done }).await.is_ok() {
                let _ = gone.await;
            }
        };
        if tokio::time::timeout(self.shared.cfg.call_timeout, wait)
            .await
            .is_err()
        {
            tracing::warn!(old = %old.id, "older connection did not answer the discard");
        }
    }

    async fn publish(
        &mut self,
        topic_name: &str,
        qos: u32,
        payload: bytes::Bytes,
    ) -> pb::CodeResponse {
        let Some(clientid) = self.connected_clientid() else {
            return codes::unexpected_call();
        };
        if self.shared.access.publish_denied(topic_name) {
            return codes::authorization_deny();
        }
        if topic::validate_name(topic_name).is_err() {
            tracing::warn!(topic = topic_name, "Publish to an invalid topic");
            return codes::invalid_topic();
        }
        tracing::debug!(topic = topic_name, qos, bytes = payload.len(), "publish");
        // EMQX runs message.publish before it routes the message.
        let report = |msg: &pb::Message| {
            if let Some(hooks) = &self.shared.exhook {
                hooks.message_publish(msg);
            }
        };
        match (&self.shared.router, &self.mqtt) {
            (Router::Memory(router), _) => {
                let msg = make_message(&self.shared.cfg.node, clientid, topic_name, qos, payload);
                report(&msg);
                router.publish(&msg);
                if let Some(broker) = &self.shared.broker {
                    broker.forward(&msg).await;
                }
            }
            (Router::Mqtt(_), Some(session)) => {
                // The broker gives the delivered copies their own ids.
                report(&make_message(
                    &self.shared.cfg.node,
                    clientid,
                    topic_name,
                    qos,
                    payload.clone(),
                ));
                if let Err(e) = session.publish(clientid, topic_name, qos, payload).await {
                    tracing::warn!(error = %e, "MQTT publish failed");
                    return codes::unknown_crash();
                }
            }
            (Router::Mqtt(_), None) => return codes::unexpected_call(),
        }
        codes::success()
    }

    async fn subscribe(&mut self, filter: String, qos: u32) -> pb::CodeResponse {
        if self.connected_clientid().is_none() {
            return codes::unexpected_call();
        }
        if self.shared.access.subscribe_denied(&filter) {
            return codes::authorization_deny();
        }
        if topic::validate_filter(&filter).is_err() {
            tracing::warn!(filter, "Subscribe to an invalid filter");
            return codes::invalid_topic();
        }
        match (&self.shared.router, &self.mqtt) {
            (Router::Memory(router), _) => {
                router.subscribe(self.handle.seq, &filter, self.deliver_tx.clone());
            }
            (Router::Mqtt(_), Some(session)) => match session.subscribe(&filter, qos).await {
                Ok(()) => {}
                Err(SubscribeError::Refused(code)) => {
                    tracing::info!(filter, code, "broker refused the subscription");
                    return codes::authorization_deny();
                }
                Err(SubscribeError::Failed(e)) => {
                    tracing::warn!(filter, error = %e, "MQTT subscribe failed");
                    return codes::unknown_crash();
                }
            },
            (Router::Mqtt(_), None) => return codes::unexpected_call(),
        }
        tracing::debug!(filter, qos, "subscribed");
        self.subs.insert(filter);
        codes::success()
    }

    async fn unsubscribe(&mut self, filter: &str) -> pb::CodeResponse {
        if self.connected_clientid().is_none() {
            return codes::unexpected_call();
        }
        if self.subs.remove(filter) {
            match (&self.shared.router, &self.mqtt) {
                (Router::Memory(router), _) => router.unsubscribe(self.handle.seq, filter),
                (Router::Mqtt(_), Some(session)) => {
                    if let Err(e) = session.unsubscribe(filter).await {
                        tracing::warn!(filter, error = %e, "MQTT unsubscribe failed");
                    }
                }
                (Router::Mqtt(_), None) => {}
            }
        }
        codes::success()
    }

    fn cleanup(&mut self) {
        let shared = self.shared.clone();
        shared.registry.remove(&self.id);
        if let Phase::Connected { clientid } = &self.phase {
            shared.registry.release_clientid(clientid, self.handle.seq);
        }
        if let Router::Memory(router) = &shared.router {
            router.unsubscribe_all(self.handle.seq, &self.subs);
        }
        self.mqtt = None;
        self.drop_socket();
        shared.faults.forget(&self.id);
        tracing::debug!("connection process exited");
    }
}
