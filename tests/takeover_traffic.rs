//! Takeovers under traffic: 200 clients, half of them publishing numbered
//! messages to a topic all subscribe to, and 10 takeovers in a row. A file
//! of its own, so that nothing else in this test binary competes with it
//! for the CPU: the old process leaves at a quiet moment of the traffic,
//! and the test measures that no client notices.

#[path = "support/adapter_bin.rs"]
mod adapter_bin;
#[path = "support/line_client.rs"]
mod line_client;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exproto_adapter::dev_gateway::{DevGateway, EmqxCompat, GatewayConfig};
use line_client::{Client, Reader};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

const CLIENTS: usize = 200;
const PUBLISHERS: usize = 100;
const TAKEOVERS: usize = 10;
const TOPIC: &str = "chat/t";
/// One PUB every this long, the publishers taking turns: 2.5 messages a
/// second, each to 200 subscribers (500 handler calls a second), with the
/// pauses between bursts that real traffic has: the old process leaves in
/// one (README: upgrades).
const PACE: Duration = Duration::from_millis(400);
/// PUBs acknowledged before each takeover.
const PER_ROUND: u64 = 4;

fn upgrade_flags(socket: &Path) -> Vec<OsString> {
    vec!["--upgrade-socket".into(), socket.into()]
}

/// What a client's reader task saw.
#[derive(Default)]
struct Seen {
    /// `(publisher, n)` of every MSG, in arrival order.
    msgs: Vec<(usize, u64)>,
    /// Lines that are neither MSG nor an expected reply.
    unexpected: Vec<String>,
    /// EMQX (the dev gateway) closed the socket.
    closed: bool,
}

struct Watched {
    seen: Arc<Mutex<Seen>>,
    /// Replies other than MSG (`OK PUB`, `PONG`), in order; ends at close.
    replies: mpsc::UnboundedReceiver<String>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

/// Reads every line of `reader` until EOF, sorting MSG lines from replies.
fn watch(
    mut reader: Reader,
    seen: Arc<Mutex<Seen>>,
    arrived: Arc<Notify>,
) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(line) = reader.next_line().await {
            if let Some(rest) = line.strip_prefix(&format!("MSG {TOPIC} ")) {
                // MSG chat/t c<p> :<p> <n>
                let parsed = rest.split_once(" :").and_then(|(_, body)| {
                    let (p, n) = body.split_once(' ')?;
                    Some((p.parse().ok()?, n.parse().ok()?))
                });
                let mut s = seen.lock().unwrap();
                match parsed {
                    Some(pn) => s.msgs.push(pn),
                    None => s.unexpected.push(line),
                }
            } else if line == "PONG" || line == format!("OK PUB {TOPIC}") {
                let _ = tx.send(line);
                continue;
            } else {
                seen.lock().unwrap().unexpected.push(line);
            }
            arrived.notify_waiters();
        }
        seen.lock().unwrap().closed = true;
        arrived.notify_waiters();
    });
    rx
}

/// 200 clients logged in and subscribed to [`TOPIC`], each watched.
async fn clients(gw: &DevGateway, arrived: &Arc<Notify>) -> Vec<Watched> {
    let mut out = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut c = Client::connect(gw.client_addr()).await;
        assert!(c.line().await.starts_with("HELLO "));
        assert_eq!(
            c.ask(&format!("CONNECT c{i}")).await,
            format!("OK CONNECT c{i}")
        );
        assert_eq!(
            c.ask(&format!("SUB {TOPIC}")).await,
            format!("OK SUB {TOPIC} 0")
        );
        let (reader, writer) = c.split();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let replies = watch(reader, seen.clone(), arrived.clone());
        out.push(Watched {
            seen,
            replies,
            writer,
        });
    }
    out
}

/// How one publisher ended.
struct Published {
    /// The last number acknowledged with `OK PUB`.
    acked: u64,
    /// Whether a PUB numbered `acked + 1` was sent and never answered
    /// because EMQX closed the client (it may or may not have been
    /// published).
    unanswered: bool,
}

/// Publishes `<p> 1`, `<p> 2`, ... one at a time, each when `go` says so
/// and after the last one's `OK PUB`, until `stop`, or until EMQX closes
/// the client.
async fn publish(
    p: usize,
    mut w: Watched,
    mut go: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    progress: Arc<Notify>,
) -> (Published, Watched) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        if go.recv().await.is_none() {
            break;
        }
        n += 1;
        if w.writer
            .write_all(format!("PUB {TOPIC} :{p} {n}\n").as_bytes())
            .await
            .is_err()
        {
            return (
                Published {
                    acked: n - 1,
                    unanswered: false,
                },
                w,
            );
        }
        let reply = tokio::time::timeout(Duration::from_secs(30), w.replies.recv())
            .await
            .unwrap_or_else(|_| panic!("publisher {p}: no answer to PUB {n}"));
        match reply.as_deref() {
            Some("OK PUB chat/t") => {}
            None => {
                return (
                    Published {
                        acked: n - 1,
                        unanswered: true,
                    },
                    w,
                )
            }
            Some(other) => panic!("publisher {p}, PUB {n}: {other:?}"),
        }
        acked.fetch_add(1, Ordering::SeqCst);
        progress.notify_waiters();
    }
    (
        Published {
            acked: n,
            unanswered: false,
        },
        w,
    )
}

/// Waits until `acked` has grown by `by`.
async fn progress_by(acked: &AtomicU64, progress: &Notify, by: u64) {
    let target = acked.load(Ordering::SeqCst) + by;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let notified = progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if acked.load(Ordering::SeqCst) >= target {
                return;
            }
            notified.await;
        }
    })
    .await
    .expect("publishing made no progress");
}

/// No client got anything but MSG lines and answers; each got every
/// publisher's messages in order and each once: all of `1..=acked`, plus
/// the unanswered one at most. A client EMQX closed got a prefix of that.
fn check(clients: &[Watched], published: &[Published]) {
    for (i, w) in clients.iter().enumerate() {
        let seen = w.seen.lock().unwrap();
        assert!(
            seen.unexpected.is_empty(),
            "client {i} got {:?}",
            seen.unexpected
        );
        let mut next: HashMap<usize, u64> = HashMap::new();
        for &(p, n) in &seen.msgs {
            let want = next.entry(p).or_insert(1);
            assert_eq!(
                n, *want,
                "client {i}: publisher {p}'s messages out of order, lost or twice"
            );
            *want += 1;
        }
        if seen.closed {
            continue;
        }
        for (p, pb) in published.iter().enumerate() {
            let got = next.get(&p).copied().unwrap_or(1) - 1;
            let most = pb.acked + u64::from(pb.unanswered);
            assert!(
                (pb.acked..=most).contains(&got),
                "client {i}: publisher {p}: got {got}, acked {}",
                pb.acked
            );
        }
    }
}

/// Waits until every open client has at least `total` messages.
async fn all_arrived(clients: &[Watched], total: usize, arrived: &Notify) {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let notified = arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let done = clients.iter().all(|w| {
                let s = w.seen.lock().unwrap();
                s.closed || s.msgs.len() >= total || !s.unexpected.is_empty()
            });
            if done {
                return;
            }
            notified.await;
        }
    })
    .await
    .expect("messages still missing");
}

/// 200 clients, 100 of them publishing numbered messages to the topic all
/// subscribe to, and 10 takeovers in a row mid-traffic. Returns how many
/// clients EMQX closed.
async fn takeovers_mid_traffic(compat: EmqxCompat) -> usize {
    // GW_LOG=exproto_adapter::dev_gateway=warn shows why EMQX closed a client.
    if let Ok(filter) = std::env::var("GW_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }
    let socket = adapter_bin::temp_path("upgrade").with_extension("sock");
    let port = adapter_bin::handler_port();
    let mut cfg = GatewayConfig::for_tests(format!("http://127.0.0.1:{port}"));
    cfg.emqx_compat = compat;
    let gw = DevGateway::start(cfg).await.unwrap();
    let flags = upgrade_flags(&socket);
    let mut running = adapter_bin::start(port, &gw, &flags).await;

    let arrived = Arc::new(Notify::new());
    let mut all = clients(&gw, &arrived).await;
    let idle = all.split_off(PUBLISHERS);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());
    let mut gos = Vec::new();
    let publishers: Vec<_> = all
        .into_iter()
        .enumerate()
        .map(|(p, w)| {
            let (go, gone) = mpsc::channel(1);
            gos.push(go);
            tokio::spawn(publish(
                p,
                w,
                gone,
                stop.clone(),
                acked.clone(),
                progress.clone(),
            ))
        })
        .collect();
    // The publishers take turns at a steady rate, as people in a room do:
    // the traffic never stops, and has the short pauses real traffic has.
    let pacer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(PACE);
        for p in (0..PUBLISHERS).cycle() {
            tick.tick().await;
            // One still waiting for its OK PUB skips its turn.
            let _ = gos[p].try_send(());
            if gos[p].is_closed() && gos.iter().all(|g| g.is_closed()) {
                return;
            }
        }
    });

    for round in 0..TAKEOVERS {
        // Traffic flows before each takeover...
        progress_by(&acked, &progress, PER_ROUND).await;
        let next = adapter_bin::spawn(port, &gw, &flags);
        // ...and the old process exits once it has handed everything over.
        assert!(
            adapter_bin::exits_ok(running, Duration::from_secs(30)).await,
            "takeover {round}: the old adapter failed"
        );
        running = next;
    }
    progress_by(&acked, &progress, PER_ROUND).await;
    stop.store(true, Ordering::SeqCst);
    pacer.abort();
    let mut published = Vec::new();
    let mut clients = Vec::new();
    for p in publishers {
        let (pb, w) = p.await.unwrap();
        published.push(pb);
        clients.push(w);
    }
    clients.extend(idle);
    let total: u64 = published.iter().map(|p| p.acked).sum();
    assert!(total > TAKEOVERS as u64 * PER_ROUND);
    all_arrived(&clients, total as usize, &arrived).await;
    // Every open client is still served, and nothing more was on its way.
    for (i, w) in clients.iter_mut().enumerate() {
        if w.seen.lock().unwrap().closed {
            continue;
        }
        w.writer.write_all(b"PING\n").await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), w.replies.recv()).await;
        assert_eq!(reply.ok().flatten().as_deref(), Some("PONG"), "client {i}");
    }
    check(&clients, &published);
    let closed = clients
        .iter()
        .filter(|w| w.seen.lock().unwrap().closed)
        .count();
    adapter_bin::sigkill(running).await;
    gw.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    closed
}

/// Through 10 takeovers mid-traffic, on EMQX 5.1's and 5.8's behaviour
/// alike: no client is closed, and every subscriber has every message
/// exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_takeovers_mid_traffic_lose_duplicate_and_reorder_nothing() {
    for compat in [EmqxCompat::V5_8, EmqxCompat::V5_1] {
        assert_eq!(takeovers_mid_traffic(compat).await, 0, "{compat:?}");
    }
}
