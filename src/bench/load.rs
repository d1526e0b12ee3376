//! The load generator: real TCP clients against the gateway's client port.
//!
//! Two workloads. `Chat` (for the adapter): client `i` says
//! `CONNECT b<i>`, `SUB bench/<i / fanout>`, then publishes
//! `PUB bench/<group> :<payload>` and counts the `MSG` lines it receives.
//! `Echo` (for the reference handlers and external ones): the handler
//! subscribes each socket to a topic itself; clients send bare payload
//! lines, and deliveries come back as those bytes.
//!
//! Every payload carries its sender and send time, so latency is measured
//! from the PUB being written to the delivery being read, across whatever
//! the handler does in between. Flat out, each client keeps at most
//! `window` of its own messages in flight (sent, not yet delivered back to
//! itself); at a target rate the clients are paced and a send that would
//! exceed the window is skipped and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::stats::{decode_payload, encode_payload};

/// What the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// The chat protocol: CONNECT, SUB, PUB; deliveries are MSG lines.
    Chat,
    /// Bare payload lines; deliveries are the raw payload bytes.
    Echo,
    /// No sockets and no gateway: the tool calls the handler's unary
    /// `OnReceivedBytes` itself, one call in flight per connection as EMQX
    /// does, and counts answered calls (the no-op handler's default: the
    /// gRPC hop alone). Runs in `scale::hop`.
    Hop,
}

/// One load run's shape.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub addr: SocketAddr,
    pub workload: Workload,
    pub clients: usize,
    /// Clients per topic (chat); the echo handler groups sockets itself.
    pub fanout: usize,
    pub payload: usize,
    pub window: usize,
    /// Total publishes per second across all clients; `None` is flat out.
    pub rate: Option<f64>,
    /// Traffic before the measured window, not counted.
    pub warmup: Duration,
    pub duration: Duration,
}

/// What the clients saw in the measured window.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Publishes written in the measured window.
    pub published: u64,
    /// Deliveries read in the measured window (MSG lines or payload lines).
    pub delivered: u64,
    /// `ERR` lines, any time.
    pub errors: u64,
    /// Paced sends skipped because the client's window was full.
    pub skipped: u64,
    /// Latency of each counted delivery, in microseconds.
    pub latencies_us: Vec<u64>,
    /// When the measured window started and how long it was.
    pub measured_from: Option<Instant>,
    pub measured: Duration,
}

/// How long connecting and subscribing every client may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a client re-sends its readiness probe until it comes back.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// After the window, how long readers wait for messages still in flight
/// (not counted; it lets the handler drain before it is stopped).
const DRAIN: Duration = Duration::from_secs(1);
/// Clients set up at once.
const SETUP_CONCURRENCY: usize = 64;

struct Ready {
    index: u32,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

/// Connects, sets up and drives every client; returns what they measured.
/// `on_window` learns the measured window's start and end as soon as they
/// are known (after setup), so the caller can sample CPU at both ends.
///
/// # Errors
/// A client cannot connect or set up in time, or the server refuses it.
pub async fn run(
    plan: &LoadPlan,
    on_window: impl FnOnce(Instant, Instant),
) -> anyhow::Result<LoadOutcome> {
    if plan.clients == 0 || plan.fanout == 0 || plan.window == 0 {
        bail!("--clients, --fanout and --window must be at least 1");
    }
    if plan.workload == Workload::Hop {
        bail!("the hop workload has no TCP clients");
    }
    let epoch = Instant::now();
    let plan = Arc::new(plan.clone());
    let limit = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut setups = JoinSet::new();
    for i in 0..plan.clients {
        let plan = plan.clone();
        let limit = limit.clone();
        setups.spawn(async move {
            let _permit = limit.acquire().await?;
            let index = u32::try_from(i)?;
            tokio::time::timeout(SETUP_TIMEOUT, setup(&plan, index, epoch))
                .await
                .with_context(|| format!("client {i}: setup timed out"))?
        });
    }
    let mut ready = Vec::with_capacity(plan.clients);
    while let Some(r) = setups.join_next().await {
        ready.push(r.context("setup task")??);
    }
    // Every client is subscribed: start the clock for all at once.
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let measure_to = measure_from + plan.duration;
    on_window(measure_from, measure_to);
    let mut tasks = JoinSet::new();
    for r in ready {
        let plan = plan.clone();
        tasks.spawn(drive(plan, r, epoch, start, measure_from, measure_to));
    }
    let mut out = LoadOutcome {
        measured_from: Some(measure_from),
        measured: plan.duration,
        ..LoadOutcome::default()
    };
    while let Some(r) = tasks.join_next().await {
        let c = r.context("client task")??;
        out.published += c.published;
        out.delivered += c.delivered;
        out.errors += c.errors;
        out.skipped += c.skipped;
        out.latencies_us.extend(c.latencies_us);
    }
    Ok(out)
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn group_topic(plan: &LoadPlan, index: u32) -> String {
    format!("bench/{}", index as usize / plan.fanout)
}

/// Connects one client and waits until its subscription delivers.
async fn setup(plan: &LoadPlan, index: u32, epoch: Instant) -> anyhow::Result<Ready> {
    let stream = TcpStream::connect(plan.addr)
        .await
        .with_context(|| format!("connecting to {}", plan.addr))?;
    stream.set_nodelay(true)?;
    let (r, writer) = stream.into_split();
    let mut c = Ready {
        index,
        reader: BufReader::with_capacity(64 * 1024, r),
        writer,
    };
    let mut line = Vec::new();
    if plan.workload == Workload::Chat {
        expect(&mut c.reader, &mut line, b"HELLO").await?;
        c.writer
            .write_all(format!("CONNECT b{index}\n").as_bytes())
            .await?;
        expect(&mut c.reader, &mut line, b"OK CONNECT").await?;
        let sub = format!("SUB {}\n", group_topic(plan, index));
        c.writer.write_all(sub.as_bytes()).await?;
        expect(&mut c.reader, &mut line, b"OK SUB").await?;
    }
    // A probe of our own must come back through the subscription: then the
    // handler has subscribed us (the echo handler does that on its own
    // schedule) and the path is warm.
    let prefix = publish_prefix(plan, index);
    let (mut payload, mut msg) = (Vec::new(), Vec::new());
    loop {
        publish_line(plan, index, &prefix, epoch, &mut payload, &mut msg);
        c.writer.write_all(&msg).await?;
        let deadline = Instant::now() + PROBE_EVERY;
        loop {
            line.clear();
            let n = match tokio::time::timeout_at(deadline, c.reader.read_until(b'\n', &mut line))
                .await
            {
                Err(_) => break,
                Ok(n) => n?,
            };
            if n == 0 {
                bail!("client {index}: server closed the connection during setup");
            }
            if let Some((from, _)) = delivery(plan.workload, &line) {
                if from == index {
                    return Ok(c);
                }
            }
        }
    }
}

/// Reads the next line and checks how it starts.
async fn expect(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    prefix: &[u8],
) -> anyhow::Result<()> {
    line.clear();
    let n = reader.read_until(b'\n', line).await?;
    if n == 0 {
        bail!(
            "connection closed, expected {}",
            String::from_utf8_lossy(prefix)
        );
    }
    if !line.starts_with(prefix) {
        bail!(
            "expected {}..., got {:?}",
            String::from_utf8_lossy(prefix),
            String::from_utf8_lossy(line)
        );
    }
    Ok(())
}

/// What a client writes before each payload: `PUB <topic> :` in chat,
/// nothing in echo.
fn publish_prefix(plan: &LoadPlan, index: u32) -> Vec<u8> {
    match plan.workload {
        Workload::Chat => format!("PUB {} :", group_topic(plan, index)).into_bytes(),
        Workload::Echo | Workload::Hop => Vec::new(),
    }
}

/// Fills `msg` with the line that publishes a fresh payload, reusing both
/// buffers so the generator costs as little CPU as it can: it shares the
/// cores with the handler it measures.
fn publish_line(
    plan: &LoadPlan,
    index: u32,
    prefix: &[u8],
    epoch: Instant,
    payload: &mut Vec<u8>,
    msg: &mut Vec<u8>,
) {
    encode_payload(index, micros_since(epoch), plan.payload, payload);
    msg.clear();
    msg.extend_from_slice(prefix);
    msg.extend_from_slice(payload);
    msg.push(b'\n');
}

/// The sender and send time of a delivered line, if it is one.
fn delivery(workload: Workload, line: &[u8]) -> Option<(u32, u64)> {
    match workload {
        // MSG <topic> <from> :<payload>
        Workload::Chat => {
            let rest = line.strip_prefix(b"MSG ")?;
            let at = memchr::memmem::find(rest, b" :")?;
            decode_payload(&rest[at + 2..])
        }
        Workload::Echo => decode_payload(line),
        Workload::Hop => None,
    }
}

#[derive(Default)]
struct ClientOutcome {
    published: u64,
    delivered: u64,
    errors: u64,
    skipped: u64,
    latencies_us: Vec<u64>,
}

async fn drive(
    plan: Arc<LoadPlan>,
    c: Ready,
    epoch: Instant,
    start: Instant,
    from: Instant,
    to: Instant,
) -> anyhow::Result<ClientOutcome> {
    let Ready {
        index,
        mut reader,
        mut writer,
    } = c;
    // One permit per message of ours in flight; the reader returns it when
    // the message comes back.
    let window = Arc::new(Semaphore::new(plan.window));
    let read_window = window.clone();
    let read_plan = plan.clone();
    let reading = tokio::spawn(async move {
        let mut out = ClientOutcome::default();
        let mut line = Vec::with_capacity(256);
        let stop = to + DRAIN;
        loop {
            line.clear();
            match tokio::time::timeout_at(stop, reader.read_until(b'\n', &mut line)).await {
                // The window and the drain are over, or the server closed.
                Err(_) | Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(anyhow::Error::from(e)),
            }
            let now = Instant::now();
            if let Some((sender, sent_us)) = delivery(read_plan.workload, &line) {
                if sender == index {
                    read_window.add_permits(1);
                }
                if now >= from && now < to {
                    out.delivered += 1;
                    out.latencies_us
                        .push(micros_since(epoch).saturating_sub(sent_us));
                }
            } else if line.starts_with(b"ERR") {
                out.errors += 1;
            }
        }
        Ok(out)
    });

    let mut published = 0u64;
    let mut skipped = 0u64;
    let prefix = publish_prefix(&plan, index);
    let mut payload = Vec::with_capacity(plan.payload + 32);
    let mut msg = Vec::with_capacity(plan.payload + 64);
    let mut pacer = plan.rate.map(|rate| {
        let per_client = rate / plan.clients as f64;
        let period = Duration::from_secs_f64(1.0 / per_client.max(1e-3));
        // Spread the clients over one period so they do not fire together.
        let offset = period.mul_f64(f64::from(index) / plan.clients as f64);
        let mut t = tokio::time::interval_at(start + offset, period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    });
    loop {
        if Instant::now() >= to {
            break;
        }
        let permit = match &mut pacer {
            Some(t) => {
                tokio::select! {
                    _ = t.tick() => {}
                    () = tokio::time::sleep_until(to) => break,
                }
                match window.try_acquire() {
                    Ok(p) => p,
                    Err(_) => {
                        if Instant::now() >= from {
                            skipped += 1;
                        }
                        continue;
                    }
                }
            }
            None => tokio::select! {
                p = window.acquire() => p?,
                () = tokio::time::sleep_until(to) => break,
            },
        };
        permit.forget();
        publish_line(&plan, index, &prefix, epoch, &mut payload, &mut msg);
        writer.write_all(&msg).await?;
        if Instant::now() >= from {
            published += 1;
        }
    }
    let mut out = reading.await.context("reader task")??;
    out.published = published;
    out.skipped = skipped;
    let _ = writer.shutdown().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_recognised_in_both_workloads() {
        let mut p = Vec::new();
        encode_payload(3, 77, 16, &mut p);
        let mut msg = b"MSG bench/1 b3 :".to_vec();
        msg.extend_from_slice(&p);
        msg.push(b'\n');
        assert_eq!(delivery(Workload::Chat, &msg), Some((3, 77)));
        assert_eq!(delivery(Workload::Chat, b"OK PUB bench/1\n"), None);
        assert_eq!(delivery(Workload::Echo, &p), Some((3, 77)));
        assert_eq!(delivery(Workload::Echo, b"OK\n"), None);
    }
}
