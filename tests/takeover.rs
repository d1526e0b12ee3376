//! Zero-drop upgrades: a new `serve` started with the running adapter's
//! `--upgrade-socket` takes its listening sockets and every session, and
//! the old process exits. The real binary, real sockets, the dev gateway
//! standing in for EMQX; the clients must notice nothing.

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

use exproto_adapter::dev_gateway::{DevGateway, EmqxCompat, GatewayConfig, HandlerMode};
use line_client::{Client, Reader};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

const CLIENTS: usize = 200;
const PUBLISHERS: usize = 100;
const TAKEOVERS: usize = 10;
const TOPIC: &str = "chat/t";
/// One PUB every this long, the publishers taking turns: 4 messages a
/// second, each to 200 subscribers (800 handler calls a second), with the
/// pauses between bursts that real traffic has: the old process leaves in
/// one (README: upgrades).
const PACE: Duration = Duration::from_millis(250);
/// PUBs acknowledged before each takeover.
const PER_ROUND: u64 = 4;

fn upgrade_flags(socket: &Path, state: Option<&Path>) -> Vec<OsString> {
    let mut f: Vec<OsString> = vec!["--upgrade-socket".into(), socket.into()];
    if let Some(dir) = state {
        f.push("--state-dir".into());
        f.push(dir.into());
    }
    f
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
    let flags = upgrade_flags(&socket, None);
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

/// Streaming mode: the old process ends EMQX's streams and EMQX opens new
/// ones at the successor. Sessions, logins and subscriptions carry over;
/// what EMQX wrote to a stream the old process no longer read is lost
/// (README), so this checks clients that were quiet during the switch.
#[tokio::test]
async fn streaming_mode_sessions_carry_over() {
    let socket = adapter_bin::temp_path("upgrade-stream").with_extension("sock");
    let state = adapter_bin::temp_path("upgrade-stream-state");
    let port = adapter_bin::handler_port();
    let mut cfg = GatewayConfig::for_tests(format!("http://127.0.0.1:{port}"));
    cfg.handler_mode = HandlerMode::Stream;
    let gw = DevGateway::start(cfg).await.unwrap();
    let flags = upgrade_flags(&socket, Some(&state));
    let mut running = adapter_bin::start(port, &gw, &flags).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = Client::connect(gw.client_addr()).await;
        assert!(c.line().await.starts_with("HELLO "));
        assert_eq!(
            c.ask(&format!("CONNECT s{i}")).await,
            format!("OK CONNECT s{i}")
        );
        assert_eq!(c.ask("SUB chat/s").await, "OK SUB chat/s 0");
        clients.push(c);
    }
    // Half a line before the switch, the rest after: the line buffer moves.
    clients[1].send("PI").await;
    assert_eq!(clients[0].ask("PING").await, "PONG");
    for round in 0..2 {
        let next = adapter_bin::spawn(port, &gw, &flags);
        assert!(
            adapter_bin::exits_ok(running, Duration::from_secs(30)).await,
            "takeover {round}"
        );
        running = next;
        for (i, c) in clients.iter_mut().enumerate() {
            if i != 1 {
                assert_eq!(
                    c.ask("PING").await,
                    "PONG",
                    "client {i} after takeover {round}"
                );
            }
        }
    }
    clients[1].send("NG\n").await;
    assert_eq!(
        clients[1].line().await,
        "PONG",
        "the half line was handed over"
    );
    assert_eq!(clients[2].ask("PUB chat/s :after").await, "OK PUB chat/s");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.line().await, "MSG chat/s s2 :after", "client {i}");
    }
    assert_eq!(clients[3].ask("QUIT").await, "BYE");
    assert_eq!(clients[3].eof().await, "");
    adapter_bin::sigkill(running).await;
    gw.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&state);
}

/// `--upgrade-required` without a running adapter is an error, and a
/// takeover with `--state-dir` leaves the journal to the successor: a
/// crash after the takeover still restores the sessions.
#[tokio::test]
async fn upgrade_required_fails_alone_and_the_journal_follows_the_takeover() {
    let socket = adapter_bin::temp_path("upgrade-req").with_extension("sock");
    let state = adapter_bin::temp_path("upgrade-req-state");
    let port = adapter_bin::handler_port();
    let gw = DevGateway::start(GatewayConfig::for_tests(format!("http://127.0.0.1:{port}")))
        .await
        .unwrap();
    let mut flags = upgrade_flags(&socket, Some(&state));
    let mut required = flags.clone();
    required.push("--upgrade-required".into());
    let alone = adapter_bin::spawn(port, &gw, &required);
    assert!(
        !adapter_bin::exits_ok(alone, Duration::from_secs(30)).await,
        "--upgrade-required with nobody to take over from must fail"
    );

    let first = adapter_bin::start(port, &gw, &flags).await;
    let mut c = Client::connect(gw.client_addr()).await;
    assert!(c.line().await.starts_with("HELLO "));
    assert_eq!(c.ask("CONNECT j").await, "OK CONNECT j");
    let second = adapter_bin::spawn(port, &gw, &required);
    assert!(adapter_bin::exits_ok(first, Duration::from_secs(30)).await);
    assert_eq!(c.ask("SUB chat/j").await, "OK SUB chat/j 0");
    // A crash of the successor: its journal has what it was told.
    adapter_bin::sigkill(second).await;
    flags.retain(|f| f != "--upgrade-required");
    let third = adapter_bin::start(port, &gw, &flags).await;
    assert_eq!(c.ask("PING").await, "PONG");
    assert_eq!(c.ask("PUB chat/j :kept").await, "OK PUB chat/j");
    assert_eq!(c.line().await, "MSG chat/j j :kept");
    adapter_bin::sigkill(third).await;
    gw.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&state);
}

async fn notification(notify: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), notify.recv(&mut buf))
        .await
        .expect("no notification")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `systemctl reload` as the unit file does it: SIGHUP to the main PID.
/// The adapter starts its successor from the same binary path and
/// arguments; systemd (here, the test on `NOTIFY_SOCKET`) hears the new
/// MAINPID before the old process exits, then READY.
#[tokio::test]
async fn sighup_starts_a_successor_that_tells_systemd_its_pid() {
    let socket = adapter_bin::temp_path("upgrade-hup").with_extension("sock");
    let notify_path = adapter_bin::temp_path("notify").with_extension("sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let port = adapter_bin::handler_port();
    let gw = DevGateway::start(GatewayConfig::for_tests(format!("http://127.0.0.1:{port}")))
        .await
        .unwrap();
    let flags = upgrade_flags(&socket, None);
    let first = adapter_bin::spawn_with_env(
        port,
        &gw,
        &flags,
        &[("NOTIFY_SOCKET", notify_path.as_os_str())],
    );
    let first_pid = first.id().unwrap();
    let ready = notification(&notify).await;
    assert!(ready.contains(&format!("MAINPID={first_pid}")), "{ready:?}");
    assert!(ready.contains("READY=1"), "{ready:?}");

    let mut c = Client::connect(gw.client_addr()).await;
    assert!(c.line().await.starts_with("HELLO "));
    assert_eq!(c.ask("CONNECT h").await, "OK CONNECT h");
    std::process::Command::new("kill")
        .args(["-HUP", &first_pid.to_string()])
        .status()
        .unwrap();
    let main_pid = notification(&notify).await;
    let new_pid: u32 = main_pid
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {main_pid:?}"));
    assert_ne!(new_pid, first_pid);
    assert!(adapter_bin::exits_ok(first, Duration::from_secs(30)).await);
    let ready = notification(&notify).await;
    assert!(
        ready.contains("READY=1") && ready.contains(&format!("MAINPID={new_pid}")),
        "{ready:?}"
    );
    assert_eq!(
        c.ask("PING").await,
        "PONG",
        "the session went on in the successor"
    );
    std::process::Command::new("kill")
        .args(["-KILL", &new_pid.to_string()])
        .status()
        .unwrap();
    gw.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&notify_path);
}
