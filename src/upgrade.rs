//! Takeover: a running adapter hands its listening sockets and every
//! session to a successor started with the same `--upgrade-socket`.
//!
//! The exchange over that Unix socket, handoff format 1 (integers big
//! endian):
//!
//! | from | what |
//! |---|---|
//! | successor | hello: `EXPU`, u16 lowest and u16 highest format it reads |
//! | running | offer: `EXPU`, u16 format chosen (0: none in common), u8 count, 4 role bytes (0-padded); the listening sockets, in role order, as SCM_RIGHTS on the same message |
//! | running | frames of u32 length (of what follows), u8 kind, body, from the offer on: `EVENT` (4: u8 RPC, u8 flags, the handler request as protobuf) for each event that reached the running adapter after the offer; once its work has drained and its journal is flushed `BEGIN` (1, empty), `SESSION` (2: u16 conn length, conn, the state `Connection::save` wrote) for each session, `END` (3: u64 sessions sent); more `EVENT`s; `CLOSE` (5, empty) once EMQX has left it |
//! | successor | `A` for each `EVENT` once served (the running adapter answers EMQX only then, so EMQX's next event for that conn, which may go to the successor directly, comes after it); `DONE` after `CLOSE`: the running adapter exits |
//!
//! The sockets pass before anything stops, so the ports never stop
//! accepting: a failure before the offer leaves the running adapter as it
//! was. After the offer, the running adapter relays the events EMQX still
//! sends it (on the HTTP/2 connections it already had) instead of serving
//! them, and closes those connections only when no call is in flight on
//! them: EMQX's gRPC client fails a call that a closing connection
//! carries (README: upgrades). The session state keeps its own version
//! (`Connection::save`), so a successor refuses one it cannot read per
//! session, not wholesale.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, Interest};
use tokio::net::{UnixListener, UnixStream};

/// The handoff formats this build speaks.
pub const FORMATS: RangeInclusive<u16> = 1..=1;

const MAGIC: &[u8; 4] = b"EXPU";
const DONE: &[u8; 4] = b"DONE";
const OFFER_LEN: usize = 11;
/// A session frame bigger than this is not a session (a saved chat
/// session is a few hundred bytes; a line buffer at most `--max-line`).
const MAX_FRAME: u32 = 16 << 20;

const KIND_BEGIN: u8 = 1;
const KIND_SESSION: u8 = 2;
const KIND_END: u8 = 3;
const KIND_EVENT: u8 = 4;
const KIND_CLOSE: u8 = 5;
const KIND_SYNC: u8 = 6;

/// `EVENT` flag: the event came on a stream (streaming mode), where it may
/// overtake its conn's `OnSocketCreated`.
pub const MAY_REORDER: u8 = 1;

/// Which listening socket a passed descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The handler services' port (EMQX's `handler.address`).
    Handler = 1,
    /// The ExHook port.
    Hook = 2,
    /// The HTTP port (`/metrics`).
    Http = 3,
    /// The upgrade socket itself, so the next successor finds it too.
    Upgrade = 4,
}

impl Role {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Handler,
            2 => Self::Hook,
            3 => Self::Http,
            4 => Self::Upgrade,
            _ => return None,
        })
    }
}

/// Listening sockets a running adapter holds for its successor: its own
/// duplicates, so they outlive its servers.
#[derive(Debug, Default)]
pub struct Offered(Vec<(Role, OwnedFd)>);

impl Offered {
    /// Keeps a duplicate of `fd` to offer as `role`.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated.
    pub fn add(&mut self, role: Role, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.0.retain(|(r, _)| *r != role);
        self.0.push((role, fd.try_clone_to_owned()?));
        Ok(())
    }
}

/// What a successor received: the listening sockets, by role, and the
/// link its sessions arrive on.
#[derive(Debug)]
pub struct Inherited {
    pub handler: Option<std::net::TcpListener>,
    pub hook: Option<std::net::TcpListener>,
    pub http: Option<std::net::TcpListener>,
    pub upgrade: Option<std::os::unix::net::UnixListener>,
    pub link: Link,
}

/// How a process started with `--upgrade-socket` begins.
#[derive(Debug)]
pub enum Start {
    /// No adapter held the socket: this one serves it from now on.
    Fresh(UnixListener),
    /// A running adapter answered and passed its sockets.
    Successor(Box<Inherited>),
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the adapter at {path} did not answer within {within:?}")]
    NoAnswer { path: PathBuf, within: Duration },
    #[error("the adapter at {path} speaks handoff format {theirs}, this build {ours}")]
    Incompatible {
        path: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error("handoff with the adapter at {path} failed: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no running adapter holds {0}")]
    NoneRunning(PathBuf),
}

/// `incoming` until `stop` is cancelled, then nothing ever again. It does
/// not end: a server whose incoming connections end stops serving the
/// ones it has (tonic drops them), while this one keeps them until told
/// to shut down.
pub fn accept_until<S>(
    incoming: S,
    stop: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = S::Item>
where
    S: futures::Stream,
{
    use futures::StreamExt;
    incoming
        .take_until(stop.cancelled_owned())
        .chain(futures::stream::pending())
}

/// Tells systemd (`Type=notify`) about this process, when it runs under
/// it. The main PID goes along: after a takeover it is this process.
pub fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut all = vec![sd_notify::NotifyState::MainPid(std::process::id())];
    all.extend_from_slice(states);
    if let Err(e) = sd_notify::notify(false, &all) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

fn range_text(r: &RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}..{}", r.start(), r.end())
    }
}

/// Connects to `path`: takes over from the adapter that holds it, or, when
/// none does, serves it (a file left by a process that died is replaced).
///
/// # Errors
/// A running adapter that does not answer within `within`, speaks no
/// format of ours, or breaks the exchange; a path that cannot be bound.
pub async fn start(path: &Path, within: Duration) -> Result<Start, UpgradeError> {
    start_with(path, within, FORMATS).await
}

async fn start_with(
    path: &Path,
    within: Duration,
    formats: RangeInclusive<u16>,
) -> Result<Start, UpgradeError> {
    let io = |source| UpgradeError::Io {
        path: path.to_owned(),
        source,
    };
    match UnixStream::connect(path).await {
        Ok(stream) => {
            let taken = tokio::time::timeout(within, take_over(stream, formats.clone()))
                .await
                .map_err(|_| UpgradeError::NoAnswer {
                    path: path.to_owned(),
                    within,
                })?;
            match taken.map_err(io)? {
                Ok(inherited) => Ok(Start::Successor(Box::new(inherited))),
                Err(theirs) => Err(UpgradeError::Incompatible {
                    path: path.to_owned(),
                    theirs: theirs.to_string(),
                    ours: range_text(&formats),
                }),
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                // A socket file whose process is gone.
                std::fs::remove_file(path).map_err(io)?;
            }
            UnixListener::bind(path).map(Start::Fresh).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// The successor's side: hello, then the offer and its sockets.
/// `Ok(Err(format))`: the running adapter offered none we read.
async fn take_over(
    stream: UnixStream,
    formats: RangeInclusive<u16>,
) -> std::io::Result<Result<Inherited, u16>> {
    let mut hello = Vec::with_capacity(8);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&formats.start().to_be_bytes());
    hello.extend_from_slice(&formats.end().to_be_bytes());
    let mut stream = stream;
    stream.write_all(&hello).await?;
    let (offer, fds) = recv_with_fds(&stream, OFFER_LEN).await?;
    if &offer[..4] != MAGIC {
        return Err(bad("not an adapter's offer"));
    }
    let format = u16::from_be_bytes([offer[4], offer[5]]);
    if !formats.contains(&format) {
        return Ok(Err(format));
    }
    let count = usize::from(offer[6]);
    if count > 4 || fds.len() != count {
        return Err(bad("offer and sockets disagree"));
    }
    let mut inherited = Inherited {
        handler: None,
        hook: None,
        http: None,
        upgrade: None,
        link: Link {
            stream: BufReader::new(stream),
            format,
        },
    };
    for (role, fd) in offer[7..7 + count].iter().zip(fds) {
        match Role::from_u8(*role) {
            Some(Role::Handler) => inherited.handler = Some(fd.into()),
            Some(Role::Hook) => inherited.hook = Some(fd.into()),
            Some(Role::Http) => inherited.http = Some(fd.into()),
            Some(Role::Upgrade) => inherited.upgrade = Some(fd.into()),
            // A socket a later build offers and this one does not use.
            None => {}
        }
    }
    Ok(Ok(inherited))
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads exactly `len` bytes, and the descriptors that came with them.
async fn recv_with_fds(
    stream: &UnixStream,
    len: usize,
) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < len {
        let n = stream
            .async_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = recvmsg(
                    stream,
                    &mut [IoSliceMut::new(&mut buf[got..])],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(passed) = m {
                        fds.extend(passed);
                    }
                }
                Ok(msg.bytes)
            })
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok((buf, fds))
}

/// Sends `bytes` with `fds` attached, in one message.
async fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(std::io::Error::other("too many sockets to pass"));
            }
            Ok(sendmsg(
                stream,
                &[IoSlice::new(bytes)],
                &mut control,
                SendFlags::empty(),
            )?)
        })
        .await?;
    if sent != bytes.len() {
        return Err(std::io::Error::other("offer cut short"));
    }
    Ok(())
}

/// The successor's end of the exchange, after the offer.
#[derive(Debug)]
pub struct Link {
    stream: BufReader<UnixStream>,
    format: u16,
}

/// One frame of the session stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The running adapter has stopped, drained and flushed its journal.
    Begin,
    Session(String, Vec<u8>),
    /// Every session was sent; this many.
    End(u64),
    /// A handler request that reached the running adapter after the
    /// offer: `rpc` says which (see the handler), `body` is its protobuf.
    Event {
        rpc: u8,
        flags: u8,
        body: Vec<u8>,
    },
    /// Nothing more comes.
    Close,
    /// Answer with [`Link::served`] once read.
    Sync,
}

impl Link {
    /// The handoff format in use.
    pub fn format(&self) -> u16 {
        self.format
    }

    /// The next frame.
    ///
    /// # Errors
    /// The stream broke or holds something that is not a frame.
    pub async fn next(&mut self) -> std::io::Result<Frame> {
        let len = self.stream.read_u32().await?;
        if len == 0 || len > MAX_FRAME {
            return Err(bad("frame length out of range"));
        }
        let mut body = vec![0u8; len as usize];
        self.stream.read_exact(&mut body).await?;
        let kind = body[0];
        let body = &body[1..];
        match kind {
            KIND_BEGIN => Ok(Frame::Begin),
            KIND_SESSION => {
                if body.len() < 2 {
                    return Err(bad("short session frame"));
                }
                let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let conn = body
                    .get(2..2 + n)
                    .ok_or_else(|| bad("short session frame"))?;
                let conn = std::str::from_utf8(conn).map_err(|_| bad("conn is not UTF-8"))?;
                Ok(Frame::Session(conn.to_owned(), body[2 + n..].to_vec()))
            }
            KIND_END => {
                let n: [u8; 8] = body.try_into().map_err(|_| bad("bad end frame"))?;
                Ok(Frame::End(u64::from_be_bytes(n)))
            }
            KIND_EVENT => match body {
                [rpc, flags, rest @ ..] => Ok(Frame::Event {
                    rpc: *rpc,
                    flags: *flags,
                    body: rest.to_vec(),
                }),
                _ => Err(bad("short event frame")),
            },
            KIND_CLOSE => Ok(Frame::Close),
            KIND_SYNC => Ok(Frame::Sync),
            _ => Err(bad("unknown frame kind")),
        }
    }

    /// Tells the running adapter that a relayed `EVENT` was served.
    ///
    /// # Errors
    /// The stream broke.
    pub async fn served(&mut self) -> std::io::Result<()> {
        self.stream.get_mut().write_all(&[ACK]).await
    }

    /// Tells the running adapter that everything arrived.
    ///
    /// # Errors
    /// The stream broke.
    pub async fn done(mut self) -> std::io::Result<()> {
        self.stream.get_mut().write_all(DONE).await?;
        self.stream.get_mut().flush().await
    }
}

/// A successor that said hello, on the running adapter's side.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    format: u16,
}

/// Waits for the next process that connects to the upgrade socket and
/// reads its hello. `Ok(None)`: it was not a successor we can serve (told
/// so, or not an adapter at all); keep waiting.
///
/// # Errors
/// The listening socket failed.
pub async fn accept(listener: &UnixListener) -> std::io::Result<Option<Successor>> {
    accept_with(listener, FORMATS).await
}

async fn accept_with(
    listener: &UnixListener,
    formats: RangeInclusive<u16>,
) -> std::io::Result<Option<Successor>> {
    let (mut stream, _) = listener.accept().await?;
    let mut hello = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut hello)).await;
    if !matches!(read, Ok(Ok(_))) || &hello[..4] != MAGIC {
        tracing::warn!("something that is not an adapter connected to the upgrade socket");
        return Ok(None);
    }
    let lo = u16::from_be_bytes([hello[4], hello[5]]);
    let hi = u16::from_be_bytes([hello[6], hello[7]]);
    let format = (*formats.start()..=*formats.end())
        .rev()
        .find(|f| (lo..=hi).contains(f));
    match format {
        Some(format) => Ok(Some(Successor { stream, format })),
        None => {
            tracing::warn!(
                theirs = %range_text(&(lo..=hi)),
                ours = %range_text(&formats),
                "a successor speaks no handoff format of ours; it was told so, this adapter goes on"
            );
            let mut offer = [0u8; OFFER_LEN];
            offer[..4].copy_from_slice(MAGIC);
            offer[4..6].copy_from_slice(&formats.end().to_be_bytes());
            let _ = stream.write_all(&offer).await;
            Ok(None)
        }
    }
}

impl Successor {
    /// Passes the listening sockets. Nothing has stopped yet: after an
    /// error here the running adapter simply goes on.
    ///
    /// # Errors
    /// The successor went away.
    pub async fn offer(&self, offered: &Offered) -> std::io::Result<()> {
        let mut offer = [0u8; OFFER_LEN];
        offer[..4].copy_from_slice(MAGIC);
        offer[4..6].copy_from_slice(&self.format.to_be_bytes());
        let roles = &offered.0[..offered.0.len().min(4)];
        offer[6] = u8::try_from(roles.len()).unwrap_or(4);
        let mut fds = Vec::with_capacity(roles.len());
        for (i, (role, fd)) in roles.iter().enumerate() {
            offer[7 + i] = *role as u8;
            fds.push(fd.as_fd());
        }
        send_with_fds(&self.stream, &offer, &fds).await
    }

    /// From the offer on, frames go through a [`Relay`] (bounded, so a
    /// slow successor slows the running adapter's answers to EMQX rather
    /// than filling memory); the returned half reads the final `DONE`.
    pub fn into_relay(self) -> (Relay, Done) {
        let (read, write) = self.stream.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Outgoing>(4096);
        let waiting: Acks = Arc::default();
        let acks = waiting.clone();
        let writer = tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(1 << 16, write);
            while let Some((f, ack)) = rx.recv().await {
                let last = f.get(4) == Some(&KIND_CLOSE);
                if let Some(ack) = ack {
                    // Acks come back in the order frames go out.
                    lock(&acks).push_back(ack);
                }
                w.write_all(&f).await?;
                if last || rx.is_empty() {
                    w.flush().await?;
                }
                if last {
                    break;
                }
            }
            w.flush().await
        });
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(read);
            loop {
                match r.read_u8().await? {
                    ACK => {
                        if let Some(ack) = lock(&waiting).pop_front() {
                            let _ = ack.send(());
                        }
                    }
                    b'D' => {
                        let mut one = [0u8; 3];
                        r.read_exact(&mut one).await?;
                        return if &one == b"ONE" {
                            Ok(())
                        } else {
                            Err(bad("successor said something other than DONE"))
                        };
                    }
                    _ => return Err(bad("successor said something other than DONE")),
                }
            }
        });
        (Relay { tx }, Done { reader, writer })
    }
}

/// What the successor sends back for each `EVENT` once it is served.
const ACK: u8 = b'A';

type Outgoing = (Vec<u8>, Option<tokio::sync::oneshot::Sender<()>>);
type Acks = Arc<std::sync::Mutex<std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>>>;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running adapter's way to its successor once the sockets passed.
#[derive(Debug, Clone)]
pub struct Relay {
    tx: tokio::sync::mpsc::Sender<Outgoing>,
}

impl Relay {
    /// Relays a handler request (`rpc`, the handler's number for it) and
    /// returns once the successor has served it, so that EMQX's next
    /// event for that conn, which may reach the successor directly, comes
    /// after it.
    ///
    /// # Errors
    /// The successor went away.
    pub async fn event(&self, rpc: u8, flags: u8, body: &[u8]) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(body.len() + 2);
        b.push(rpc);
        b.push(flags);
        b.extend_from_slice(body);
        let (ack, served) = tokio::sync::oneshot::channel();
        self.send(frame(KIND_EVENT, &b), Some(ack)).await?;
        served
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Sends every session, framed, between `BEGIN` and `END`; returns the
    /// bytes sent.
    ///
    /// # Errors
    /// The successor went away.
    pub async fn sessions(&self, sessions: &[(Arc<str>, Vec<u8>)]) -> std::io::Result<u64> {
        let mut sent = 0u64;
        self.send(frame(KIND_BEGIN, &[]), None).await?;
        for (conn, state) in sessions {
            let f = session_frame(conn, state)?;
            sent += f.len() as u64;
            self.send(f, None).await?;
        }
        let count = sessions.len() as u64;
        self.send(frame(KIND_END, &count.to_be_bytes()), None)
            .await?;
        Ok(sent)
    }

    /// Returns once the successor has read every frame sent before.
    ///
    /// # Errors
    /// The successor went away.
    pub async fn sync(&self) -> std::io::Result<()> {
        let (ack, read) = tokio::sync::oneshot::channel();
        self.send(frame(KIND_SYNC, &[]), Some(ack)).await?;
        read.await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Says that nothing more comes.
    ///
    /// # Errors
    /// The successor went away.
    pub async fn close(&self) -> std::io::Result<()> {
        self.send(frame(KIND_CLOSE, &[]), None).await
    }

    async fn send(
        &self,
        f: Vec<u8>,
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> std::io::Result<()> {
        self.tx
            .send((f, ack))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

/// Where the successor's `DONE` arrives.
#[derive(Debug)]
pub struct Done {
    reader: tokio::task::JoinHandle<std::io::Result<()>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Done {
    /// Waits until every frame is written (after `close`) and the
    /// successor said `DONE`.
    ///
    /// # Errors
    /// It went away or said something else.
    pub async fn wait(self) -> std::io::Result<()> {
        let join = |e: tokio::task::JoinError| std::io::Error::other(e.to_string());
        self.writer.await.map_err(join)??;
        self.reader.await.map_err(join)?
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 1).expect("frames are small");
    let mut f = Vec::with_capacity(5 + body.len());
    f.extend_from_slice(&len.to_be_bytes());
    f.push(kind);
    f.extend_from_slice(body);
    f
}

fn session_frame(conn: &str, state: &[u8]) -> std::io::Result<Vec<u8>> {
    let n = u16::try_from(conn.len()).map_err(|_| bad("conn too long"))?;
    if state.len() + conn.len() + 3 > MAX_FRAME as usize {
        return Err(bad("session state too large"));
    }
    let mut body = Vec::with_capacity(2 + conn.len() + state.len());
    body.extend_from_slice(&n.to_be_bytes());
    body.extend_from_slice(conn.as_bytes());
    body.extend_from_slice(state);
    Ok(frame(KIND_SESSION, &body))
}

#[cfg(test)]
mod tests;
