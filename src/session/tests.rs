//! Driver tests with a toy protocol and a scripted EMQX: ordering,
//! coalescing, retries and session reclamation, with no network.

use std::sync::Mutex;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use bytes::Bytes;

use super::*;
use crate::protocol::{Action, ConnMeta, ProtoVer, Query, Secret, Session};

/// A protocol small enough to predict: echoes bytes, `call` makes one EMQX
/// call, `quit` says bye and closes, `auth` authenticates.
struct Toy;

struct ToySession {
    waiting: bool,
}

impl Protocol for Toy {
    fn name(&self) -> &'static str {
        "toy"
    }
    fn new_session(&self, _: SessionInit) -> Box<dyn Session> {
        Box::new(ToySession { waiting: false })
    }
    fn lost_session_bytes(&self) -> Bytes {
        Bytes::from_static(b"lost\n")
    }
    fn refusal_bytes(&self, refusal: Refusal) -> Bytes {
        Bytes::from(format!("refused {refusal:?}\n"))
    }
}

impl Session for ToySession {
    fn handle(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Created(_) => out.push(Action::Send(Bytes::from_static(b"hi\n"))),
            Event::Bytes(b) if &b[..] == b"call" => {
                out.push(Action::Send(Bytes::from_static(b"before\n")));
                out.push(Action::Call(Call::Subscribe {
                    filter: "t".into(),
                    qos: 0,
                }));
                self.waiting = true;
            }
            Event::Bytes(b) if &b[..] == b"auth" || &b[..] == b"steal" => {
                // `steal` logs in as a clientid that is not the user's.
                let clientid = if &b[..] == b"auth" { "u/c" } else { "bob" };
                out.push(Action::Call(Call::Authenticate {
                    protocol: TOY,
                    clientid: clientid.into(),
                    username: "u".into(),
                    password: Secret::new("pw"),
                }));
                self.waiting = true;
            }
            Event::Bytes(b) if &b[..] == b"who" => {
                out.push(Action::Query(Query::Who {
                    prefix: "a".into(),
                    limit: 2,
                }));
                self.waiting = true;
            }
            Event::Bytes(b) if &b[..] == b"history" => {
                out.push(Action::Query(Query::History {
                    topic: "t".into(),
                    limit: 5,
                }));
                self.waiting = true;
            }
            Event::Bytes(b) if &b[..] == b"quit" => {
                out.push(Action::Send(Bytes::from_static(b"bye\n")));
                out.push(Action::Call(Call::Close));
            }
            Event::Bytes(b) if &b[..] == b"arm" => {
                out.push(Action::SetDeadline(Some(Duration::from_secs(5))));
            }
            Event::Bytes(b) => out.push(Action::Send(b)),
            Event::Messages(m) => {
                for m in m {
                    out.push(Action::Send(m.payload));
                }
            }
            Event::Reply(r) => {
                // The reply to Close needs no words.
                if !std::mem::take(&mut self.waiting) {
                    return;
                }
                out.push(Action::Send(Bytes::from(format!("after {r:?}\n"))));
            }
            Event::Answer(a) => {
                self.waiting = false;
                out.push(Action::Send(Bytes::from(format!("after {a:?}\n"))));
            }
            Event::Deadline => out.push(Action::Send(Bytes::from_static(b"deadline\n"))),
            Event::TimerFired(_) | Event::Closed(_) => {}
        }
    }
}

const TOY: ProtoVer = ProtoVer {
    name: "toy",
    version: "1",
};

type Script = Box<dyn Fn(&str, &Op) -> Result<(), EmqxError> + Send + Sync>;

/// Records every call and answers as the script says.
struct FakeEmqx {
    calls: mpsc::UnboundedSender<(String, Op)>,
    script: Mutex<Script>,
    /// Each call waits for a permit, so a test can hold EMQX's answers back.
    gate: Arc<tokio::sync::Semaphore>,
}

impl ConnectionAdapter for FakeEmqx {
    fn call(&self, conn: &str, op: Op) -> BoxFuture<'static, Result<(), EmqxError>> {
        let r = (self.script.lock().unwrap())(conn, &op);
        let _ = self.calls.send((conn.to_string(), op));
        let gate = self.gate.clone();
        Box::pin(async move {
            if let Ok(p) = gate.acquire().await {
                p.forget();
            }
            r
        })
    }
}

struct Fixture {
    driver: Arc<Driver>,
    calls: mpsc::UnboundedReceiver<(String, Op)>,
    emqx: Arc<FakeEmqx>,
}

fn fixture(config: DriverConfig) -> Fixture {
    fixture_with_store(config, None)
}

fn fixture_with_store(config: DriverConfig, store: Option<StoreReader>) -> Fixture {
    fixture_of(Arc::new(Toy), config, store)
}

fn fixture_of(
    protocol: Arc<dyn Protocol>,
    config: DriverConfig,
    store: Option<StoreReader>,
) -> Fixture {
    let (tx, calls) = mpsc::unbounded_channel();
    let emqx = Arc::new(FakeEmqx {
        calls: tx,
        script: Mutex::new(Box::new(|_, _| Ok(()))),
        gate: Arc::new(tokio::sync::Semaphore::new(usize::MAX >> 4)),
    });
    let driver = Driver::with_store(protocol, emqx.clone(), config, store);
    Fixture {
        driver,
        calls,
        emqx,
    }
}

impl Fixture {
    fn script(&self, f: impl Fn(&str, &Op) -> Result<(), EmqxError> + Send + Sync + 'static) {
        *self.emqx.script.lock().unwrap() = Box::new(f);
    }

    async fn next_call(&mut self) -> (String, Op) {
        tokio::time::timeout(Duration::from_secs(60), self.calls.recv())
            .await
            .expect("no EMQX call came")
            .expect("fake gone")
    }

    async fn create(&self, conn: &str) {
        self.driver
            .dispatch(conn, Event::Created(ConnMeta::default()), false)
            .await;
    }

    async fn bytes(&self, conn: &str, b: &'static str, reorder: bool) {
        self.driver
            .dispatch(
                conn,
                Event::Bytes(Bytes::from_static(b.as_bytes())),
                reorder,
            )
            .await;
    }

    /// Bytes of the next Sends, until `n` of them came.
    async fn sent_bytes(&mut self, n: usize) -> String {
        let mut out = Vec::new();
        while out.len() < n {
            if let Op::Send(b) = self.next_call().await.1 {
                out.extend_from_slice(&b);
            }
        }
        String::from_utf8(out).expect("test bytes are UTF-8")
    }

    async fn until_empty(&self) {
        for _ in 0..10_000 {
            if self.driver.registry().is_empty() && self.driver.registry().orphans() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("registry did not empty");
    }
}

fn send(s: &str) -> Op {
    Op::Send(Bytes::copy_from_slice(s.as_bytes()))
}

/// The created-wait deadline of held early bytes may come due just as
/// `OnSocketCreated` arrives. It belongs to the wait, not to the session
/// created then: delivered to a chat session still logging in, it would
/// answer `ERR 408` and close a client that had done nothing wrong.
#[tokio::test(start_paused = true)]
async fn a_created_wait_deadline_never_reaches_the_session_created_meanwhile() {
    let chat = crate::protocol::chat::Chat::new(crate::protocol::ProtocolConfig {
        keepalive: Duration::ZERO,
        ..crate::protocol::ProtocolConfig::default()
    });
    let mut f = fixture_of(Arc::new(chat), DriverConfig::default(), None);
    // Early bytes with no complete CONNECT, held until the conn exists.
    f.bytes("c", "CONN", true).await;
    f.create("c").await;
    // The wait's timer fires after all, as it can when both happen at once.
    f.driver.on_wake("c".into());
    f.bytes("c", "ECT a\n", false).await;
    let mut seen = Vec::new();
    loop {
        let (_, op) = f.next_call().await;
        let done = matches!(&op, Op::Call(Call::Authenticate { .. } | Call::Close));
        seen.push(op);
        if done {
            break;
        }
    }
    assert!(
        matches!(seen.last(), Some(Op::Call(Call::Authenticate { .. }))),
        "the session was told its login deadline passed: {seen:?}"
    );
    assert_eq!(f.next_call().await.1, send("OK CONNECT a\n"));
}

/// The chat protocol: the login deadline runs from the moment the adapter first
/// hears of the conn, which for bytes that overtook `OnSocketCreated` is
/// when they came, not when the socket's creation did.
#[tokio::test(start_paused = true)]
async fn the_login_deadline_runs_from_the_first_event_heard() {
    let chat = crate::protocol::chat::Chat::new(crate::protocol::ProtocolConfig {
        login_timeout: Duration::from_secs(2),
        ..crate::protocol::ProtocolConfig::default()
    });
    let mut f = fixture_of(Arc::new(chat), DriverConfig::default(), None);
    let start = tokio::time::Instant::now();
    f.bytes("c", "PING\n", true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    f.create("c").await;
    let mut seen = String::new();
    while !seen.contains("ERR 408") {
        if let (_, Op::Send(b)) = f.next_call().await {
            seen.push_str(std::str::from_utf8(&b).unwrap());
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2500),
        "ERR 408 after {took:?}"
    );
}

#[tokio::test]
async fn replies_around_a_call_coalesce_into_one_send() {
    let mut f = fixture(DriverConfig::default());
    f.create("c1").await;
    assert_eq!(f.next_call().await, ("c1".into(), send("hi\n")));
    f.bytes("c1", "call", false).await;
    let (_, op) = f.next_call().await;
    assert_eq!(op.method(), "Subscribe");
    assert_eq!(
        f.next_call().await,
        ("c1".into(), send("before\nafter Ok\n"))
    );
}

#[tokio::test]
async fn call_results_reach_the_session() {
    let mut f = fixture(DriverConfig::default());
    f.script(|_, op| match op {
        Op::Call(Call::Subscribe { .. }) => Err(EmqxError::Denied("Authorization deny".into())),
        Op::Call(Call::Authenticate { .. }) => Err(EmqxError::Rejected {
            code: 1,
            message: "boom".into(),
        }),
        _ => Ok(()),
    });
    f.create("c").await;
    f.next_call().await;
    f.bytes("c", "call", false).await;
    f.next_call().await;
    assert_eq!(
        f.next_call().await.1,
        send("before\nafter Denied(\"Authorization deny\")\n")
    );
    f.bytes("c", "auth", false).await;
    f.next_call().await;
    assert_eq!(f.next_call().await.1, send("after Failed(\"boom\")\n"));
}

#[tokio::test]
async fn the_driver_refuses_a_clientid_the_policy_forbids_without_asking_emqx() {
    let mut f = fixture(DriverConfig::default());
    f.create("c").await;
    f.next_call().await;
    f.bytes("c", "steal", false).await;
    // The next call is the refusal's reply; no Authenticate came first.
    assert_eq!(
        f.next_call().await.1,
        send("after Denied(\"clientid not allowed for this user\")\n")
    );
    f.bytes("c", "auth", false).await;
    let (_, op) = f.next_call().await;
    assert!(
        matches!(&op, Op::Call(Call::Authenticate { clientid, protocol, .. })
            if clientid == "u/c" && *protocol == TOY),
        "{op:?}"
    );

    let mut f = fixture(DriverConfig {
        clientid_policy: ClientidPolicy::Any,
        ..DriverConfig::default()
    });
    f.create("c").await;
    f.next_call().await;
    f.bytes("c", "steal", false).await;
    let (_, op) = f.next_call().await;
    assert!(
        matches!(&op, Op::Call(Call::Authenticate { clientid, .. }) if clientid == "bob"),
        "{op:?}"
    );
}

#[tokio::test]
async fn bytes_before_close_are_sent_first() {
    let mut f = fixture(DriverConfig::default());
    f.create("c").await;
    f.next_call().await;
    f.bytes("c", "quit", false).await;
    assert_eq!(f.next_call().await.1, send("bye\n"));
    assert_eq!(f.next_call().await.1, Op::Call(Call::Close));
    f.driver
        .dispatch("c", Event::Closed("{shutdown,normal}".into()), false)
        .await;
    f.until_empty().await;
}

#[tokio::test]
async fn events_keep_their_order_per_connection() {
    let mut f = fixture(DriverConfig::default());
    f.create("a").await;
    f.create("b").await;
    let mut seen = Vec::new();
    for i in 0..50 {
        let conn = if i % 2 == 0 { "a" } else { "b" };
        let chunk: &'static str = Box::leak(format!("{i}\n").into_boxed_str());
        f.bytes(conn, chunk, false).await;
    }
    // Events queued behind each other may share a Send: wait for the bytes.
    let total: usize = 2 * 3 + (0..50).map(|i: i32| format!("{i}\n").len()).sum::<usize>();
    let mut got = 0;
    while got < total {
        let call = f.next_call().await;
        if let Op::Send(b) = &call.1 {
            got += b.len();
        }
        seen.push(call);
    }
    for conn in ["a", "b"] {
        let sent: Vec<u8> = seen
            .iter()
            .filter(|(c, _)| c == conn)
            .flat_map(|(_, op)| match op {
                Op::Send(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let expect: String = std::iter::once("hi\n".to_string())
            .chain(
                (0..50)
                    .filter(|i| (i % 2 == 0) == (conn == "a"))
                    .map(|i| format!("{i}\n")),
            )
            .collect();
        assert_eq!(String::from_utf8(sent).unwrap(), expect);
    }
}

#[tokio::test]
async fn gone_connection_ends_the_session() {
    let mut f = fixture(DriverConfig::default());
    f.create("c").await;
    f.next_call().await;
    f.script(|_, _| Err(EmqxError::Gone));
    f.bytes("c", "x", false).await;
    f.next_call().await;
    f.until_empty().await;
}

#[tokio::test]
async fn unknown_conn_is_told_and_closed_in_unary_mode() {
    let mut f = fixture(DriverConfig::default());
    f.bytes("ghost", "PING\n", false).await;
    assert_eq!(f.next_call().await, ("ghost".into(), send("lost\n")));
    assert_eq!(f.next_call().await, ("ghost".into(), Op::Call(Call::Close)));
    assert!(f.driver.registry().is_empty());
}

#[tokio::test]
async fn streaming_bytes_before_created_are_held_then_replayed() {
    let mut f = fixture(DriverConfig::default());
    f.bytes("c", "one\n", true).await;
    f.bytes("c", "two\n", true).await;
    assert_eq!(f.driver.registry().orphans(), 1);
    assert!(f.driver.registry().is_empty());
    f.create("c").await;
    assert_eq!(f.driver.registry().orphans(), 0);
    // Replayed at once, their replies go out together, in order.
    assert_eq!(f.sent_bytes(11).await, "hi\none\ntwo\n");
}

#[tokio::test(start_paused = true)]
async fn held_events_without_created_are_lost_after_the_wait() {
    let mut f = fixture(DriverConfig::default());
    f.bytes("c", "one\n", true).await;
    let t0 = tokio::time::Instant::now();
    assert_eq!(f.next_call().await, ("c".into(), send("lost\n")));
    assert!(t0.elapsed() >= Duration::from_secs(2));
    assert_eq!(f.next_call().await.1, Op::Call(Call::Close));
    f.until_empty().await;
}

#[tokio::test]
async fn held_bytes_over_the_limit_lose_the_session_at_once() {
    let mut f = fixture(DriverConfig {
        max_held_bytes: 8,
        created_wait: Duration::from_secs(3600),
        ..DriverConfig::default()
    });
    f.bytes("c", "12345", true).await;
    f.bytes("c", "67890", true).await;
    assert_eq!(f.next_call().await.1, send("lost\n"));
    f.until_empty().await;
}

#[tokio::test(start_paused = true)]
async fn deadlines_fire_into_the_session() {
    let mut f = fixture(DriverConfig::default());
    f.create("c").await;
    f.next_call().await;
    f.bytes("c", "arm", false).await;
    assert_eq!(f.next_call().await.1, send("deadline\n"));
}

#[tokio::test(start_paused = true)]
async fn silent_sessions_are_probed_and_reclaimed() {
    let mut f = fixture(DriverConfig {
        idle_probe: Duration::from_secs(10),
        ..DriverConfig::default()
    });
    f.create("alive").await;
    f.create("dead").await;
    f.next_call().await;
    f.next_call().await;
    f.script(|conn, _| {
        if conn == "dead" {
            Err(EmqxError::Gone)
        } else {
            Ok(())
        }
    });
    let mut probed = Vec::new();
    while probed.len() < 2 {
        let (conn, op) = f.next_call().await;
        assert_eq!(op, Op::Send(Bytes::new()));
        probed.push(conn);
    }
    probed.sort();
    assert_eq!(probed, ["alive", "dead"]);
    for _ in 0..1000 {
        if f.driver.registry().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(f.driver.registry().get("alive").is_some());
    assert!(f.driver.registry().get("dead").is_none());
}

#[tokio::test(start_paused = true)]
async fn replies_are_retried_while_emqx_is_unreachable_then_dropped() {
    let mut f = fixture(DriverConfig {
        send_retry: Duration::from_secs(30),
        ..DriverConfig::default()
    });
    let failures = Arc::new(Mutex::new(3));
    let left = failures.clone();
    f.script(move |_, _| {
        let mut n = left.lock().unwrap();
        if *n > 0 {
            *n -= 1;
            Err(EmqxError::Unreachable("down".into()))
        } else {
            Ok(())
        }
    });
    f.create("c").await;
    for _ in 0..4 {
        assert_eq!(f.next_call().await.1, send("hi\n"));
    }
    // Down for good: retried for about send_retry, then dropped; the
    // session stays.
    f.script(|_, _| Err(EmqxError::Unreachable("down".into())));
    let t0 = tokio::time::Instant::now();
    f.bytes("c", "x", false).await;
    let mut tries = 0;
    loop {
        tokio::select! {
            Some(_) = f.calls.recv() => tries += 1,
            () = tokio::time::sleep(Duration::from_secs(60)) => break,
        }
    }
    assert!(tries > 3, "only {tries} tries");
    assert!(t0.elapsed() >= Duration::from_secs(30));
    assert_eq!(f.driver.registry().len(), 1);
}

#[tokio::test]
async fn a_full_mailbox_makes_the_handler_wait() {
    let mut f = fixture(DriverConfig {
        max_queued_events: 2,
        ..DriverConfig::default()
    });
    f.create("c").await;
    f.next_call().await;
    // Hold EMQX's answers back so the worker stalls and the mailbox fills.
    let permits = f.emqx.gate.available_permits();
    f.emqx.gate.forget_permits(permits);
    let driver = f.driver.clone();
    let pusher = tokio::spawn(async move {
        for _ in 0..10 {
            driver
                .dispatch("c", Event::Bytes(Bytes::from_static(b"x")), false)
                .await;
        }
    });
    // The worker is stuck in its first Send: events taken, two queued,
    // and the pusher must now be waiting rather than queueing more.
    let first = match f.next_call().await.1 {
        Op::Send(b) => b.len(),
        other => panic!("expected a Send, got {other:?}"),
    };
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!pusher.is_finished(), "handler did not wait for room");
    assert!(f.driver.registry().get("c").unwrap().lock().queue.len() <= 3);
    f.emqx.gate.add_permits(100);
    tokio::time::timeout(Duration::from_secs(10), pusher)
        .await
        .unwrap()
        .unwrap();
    // The rest of the ten echoes, coalesced into as few Sends as came.
    assert_eq!(f.sent_bytes(10 - first).await, "x".repeat(10 - first));
}

#[tokio::test]
async fn sockets_over_max_sessions_are_refused_without_a_session() {
    let mut f = fixture(DriverConfig {
        max_sessions: 2,
        ..DriverConfig::default()
    });
    f.create("a").await;
    f.create("b").await;
    f.next_call().await;
    f.next_call().await;
    f.create("c").await;
    assert_eq!(
        f.next_call().await,
        ("c".into(), send("refused TooManyConnections\n"))
    );
    assert_eq!(f.next_call().await, ("c".into(), Op::Call(Call::Close)));
    assert_eq!(f.driver.registry().len(), 2);
    assert!(f.driver.registry().get("c").is_none());
    // A session that ends frees its place.
    f.driver
        .dispatch("a", Event::Closed("{shutdown,normal}".into()), false)
        .await;
    for _ in 0..1000 {
        if f.driver.registry().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    f.create("d").await;
    assert_eq!(f.next_call().await, ("d".into(), send("hi\n")));
    assert_eq!(f.driver.registry().len(), 2);
}

#[tokio::test]
async fn events_held_for_a_refused_socket_are_dropped() {
    let mut f = fixture(DriverConfig {
        max_sessions: 1,
        ..DriverConfig::default()
    });
    f.create("a").await;
    f.next_call().await;
    f.bytes("b", "held\n", true).await;
    assert_eq!(f.driver.registry().orphans(), 1);
    f.create("b").await;
    assert_eq!(f.next_call().await.1, send("refused TooManyConnections\n"));
    assert_eq!(f.next_call().await.1, Op::Call(Call::Close));
    assert_eq!(f.driver.registry().orphans(), 0);
    assert_eq!(f.driver.registry().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn pending_calls_are_capped() {
    let mut f = fixture(DriverConfig {
        max_pending_calls: 2,
        ..DriverConfig::default()
    });
    // Hold every EMQX answer back.
    let permits = f.emqx.gate.available_permits();
    f.emqx.gate.forget_permits(permits);
    for conn in ["a", "b", "c"] {
        f.create(conn).await;
    }
    // Two HELLO sends reach EMQX; the third waits for a place.
    f.next_call().await;
    f.next_call().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(f.calls.try_recv().is_err(), "a third call got through");
    // One answer frees one place.
    f.emqx.gate.add_permits(1);
    f.next_call().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(f.calls.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_call_that_waits_too_long_for_a_place_fails_as_unreachable() {
    let mut f = fixture(DriverConfig {
        max_pending_calls: 1,
        pending_wait: Duration::from_secs(5),
        ..DriverConfig::default()
    });
    f.create("b").await;
    assert_eq!(f.next_call().await.1, send("hi\n"));
    // "a" takes the only place and EMQX does not answer it.
    let permits = f.emqx.gate.available_permits();
    f.emqx.gate.forget_permits(permits);
    f.create("a").await;
    assert_eq!(f.next_call().await, ("a".into(), send("hi\n")));
    let t0 = tokio::time::Instant::now();
    f.bytes("b", "call", false).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(f.calls.try_recv().is_err(), "b's Subscribe got a place");
    // Once a place frees up, the reply (retried like every reply) goes out.
    f.emqx.gate.add_permits(100);
    assert_eq!(
        f.next_call().await,
        ("b".into(), send("before\nafter Unreachable\n"))
    );
    assert!(t0.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_refuses_new_sockets_and_drains_work_in_flight() {
    let mut f = fixture(DriverConfig::default());
    f.create("a").await;
    f.next_call().await;
    // Hold EMQX back so "a" has a call in flight.
    let permits = f.emqx.gate.available_permits();
    f.emqx.gate.forget_permits(permits);
    f.bytes("a", "call", false).await;
    f.next_call().await;
    f.driver.begin_shutdown();
    assert!(f.driver.is_shutting_down());
    // Not idle while the call hangs: the drain gives up after its grace.
    assert!(!f.driver.drain(Duration::from_secs(1)).await);
    f.emqx.gate.add_permits(100);
    assert!(f.driver.drain(Duration::from_secs(1)).await);
    assert_eq!(f.next_call().await.1, send("before\nafter Ok\n"));
    // A socket created now is told and closed, without a session.
    f.create("b").await;
    assert_eq!(
        f.next_call().await,
        ("b".into(), send("refused ShuttingDown\n"))
    );
    assert_eq!(f.next_call().await, ("b".into(), Op::Call(Call::Close)));
    assert!(f.driver.registry().get("b").is_none());
    // Existing sessions are still served.
    f.bytes("a", "x", false).await;
    assert_eq!(f.next_call().await, ("a".into(), send("x")));
}

mod store_calls {
    use super::*;
    use crate::store::{self, Fault, FaultyStore, Presence, StoredMessage};

    async fn reader(timeout: Duration) -> (StoreReader, Arc<FaultyStore>) {
        let db = store::open("sqlite::memory:").await.unwrap();
        for id in ["bob", "alice", "alex", "anna"] {
            db.presence_upsert(Presence {
                clientid: id.into(),
                username: String::new(),
                node: "n".into(),
                connected_at_ms: 0,
            })
            .await
            .unwrap();
        }
        db.history_insert(&[StoredMessage {
            id: "1".into(),
            topic: "t".into(),
            from: "alice".into(),
            payload: Bytes::from_static(b"hi"),
            qos: 1,
            timestamp_ms: 7,
        }])
        .await
        .unwrap();
        let faulty = Arc::new(FaultyStore::new(db));
        let reader = StoreReader {
            store: faulty.clone(),
            timeout,
        };
        (reader, faulty)
    }

    #[tokio::test]
    async fn who_and_history_are_answered_by_the_store_not_emqx() {
        let (reader, _) = reader(Duration::from_secs(5)).await;
        let mut f = fixture_with_store(DriverConfig::default(), Some(reader));
        f.create("c").await;
        assert_eq!(f.next_call().await.1, send("hi\n"));
        f.bytes("c", "who", false).await;
        assert_eq!(
            f.next_call().await.1,
            send("after Ok(Who { total: 3, ids: [\"alex\", \"alice\"] })\n")
        );
        f.bytes("c", "history", false).await;
        let (_, op) = f.next_call().await;
        let Op::Send(b) = op else { panic!("{op:?}") };
        let text = String::from_utf8(b.to_vec()).unwrap();
        assert!(text.starts_with("after Ok(History([Message {"), "{text}");
        assert!(text.contains("payload: b\"hi\", timestamp_ms: 7"), "{text}");
        // Nothing but the sends reached EMQX.
        assert!(f.calls.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_stalled_or_failing_store_answers_with_an_error() {
        let (reader, faulty) = reader(Duration::from_millis(100)).await;
        let mut f = fixture_with_store(DriverConfig::default(), Some(reader));
        f.create("c").await;
        f.next_call().await;
        faulty.set(Fault::Stalled);
        f.bytes("c", "who", false).await;
        assert_eq!(f.next_call().await.1, send("after Err(Unavailable)\n"));
        faulty.set(Fault::Down);
        f.bytes("c", "history", false).await;
        assert_eq!(f.next_call().await.1, send("after Err(Unavailable)\n"));
    }

    #[tokio::test]
    async fn without_a_store_the_call_fails_rather_than_reaching_emqx() {
        let mut f = fixture(DriverConfig::default());
        f.create("c").await;
        f.next_call().await;
        f.bytes("c", "who", false).await;
        assert_eq!(f.next_call().await.1, send("after Err(NotEnabled)\n"));
    }
}

#[tokio::test]
async fn too_much_pending_work_makes_every_handler_wait() {
    let mut f = fixture(DriverConfig {
        max_pending_events: 2,
        ..DriverConfig::default()
    });
    // EMQX does not answer: each connection's HELLO-like Send hangs.
    let permits = f.emqx.gate.available_permits();
    f.emqx.gate.forget_permits(permits);
    f.create("a").await;
    f.create("b").await;
    f.next_call().await;
    f.next_call().await;
    // Two events are in progress: a third connection must wait.
    let driver = f.driver.clone();
    let third = tokio::spawn(async move {
        driver
            .dispatch("c", Event::Created(ConnMeta::default()), false)
            .await;
    });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!third.is_finished(), "handler did not wait for global room");
    f.emqx.gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .unwrap()
        .unwrap();
}

mod handoff {
    use super::*;
    use crate::protocol::{by_name, ProtocolConfig};

    fn chat() -> Arc<dyn Protocol> {
        by_name("chat", &ProtocolConfig::default()).unwrap()
    }

    /// A predecessor's session, logged in as alice, saved after its work
    /// drained.
    async fn saved_session() -> Vec<u8> {
        let mut a = fixture_of(chat(), DriverConfig::default(), None);
        a.create("c1").await;
        a.bytes("c1", "CONNECT alice\n", false).await;
        let mut seen = String::new();
        while !seen.contains("OK CONNECT alice") {
            if let Op::Send(b) = a.next_call().await.1 {
                seen.push_str(std::str::from_utf8(&b).unwrap());
            }
        }
        a.driver.begin_handover();
        assert!(a.driver.drain(Duration::from_secs(5)).await);
        let snap = a.driver.snapshot();
        assert_eq!((snap.busy, snap.unsaved, snap.orphans), (0, 0, 0));
        let [(conn, state)] = <[_; 1]>::try_from(snap.sessions).unwrap();
        assert_eq!(&*conn, "c1");
        state
    }

    #[tokio::test]
    async fn events_wait_for_their_session_and_follow_its_state_in_order() {
        let state = saved_session().await;
        let mut b = fixture_of(chat(), DriverConfig::default(), None);
        b.driver.expect_handoff(Duration::from_secs(60));
        // Before its state: held, not answered as lost.
        b.bytes("c1", "PING\n", false).await;
        b.bytes("c1", "SUB chat/x\n", false).await;
        assert_eq!(b.driver.registry().orphans(), 1);
        assert_eq!(b.driver.registry().len(), 0);
        assert_eq!(b.driver.adopt("c1", &state), Adopted::Yes(2));
        assert_eq!(b.driver.adopt("c1", &state), Adopted::Duplicate);
        assert_eq!(b.driver.registry().orphans(), 0);
        // Logged in already: SUB goes to EMQX, after PONG.
        let mut out = String::new();
        loop {
            match b.next_call().await.1 {
                Op::Send(bytes) => out.push_str(std::str::from_utf8(&bytes).unwrap()),
                Op::Call(Call::Subscribe { filter, .. }) => {
                    assert_eq!(filter, "chat/x");
                    assert_eq!(out, "PONG\n", "the held PING came first");
                }
                other => panic!("unexpected {other:?}"),
            }
            if out.contains("OK SUB") {
                break;
            }
        }
        assert_eq!(out, "PONG\nOK SUB chat/x 0\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_never_arrives_is_lost_after_the_ordinary_wait() {
        let mut b = fixture_of(chat(), DriverConfig::default(), None);
        b.driver.expect_handoff(Duration::from_secs(60));
        b.bytes("gone", "PING\n", false).await;
        b.driver
            .dispatch("closed", Event::Closed("normal".into()), false)
            .await;
        assert_eq!(b.driver.registry().orphans(), 2);
        b.driver.end_handoff();
        // A conn EMQX closed meanwhile is simply forgotten; the other gets
        // the lost-session answer once the created wait is over.
        assert_eq!(b.driver.registry().orphans(), 1);
        assert_eq!(b.sent_bytes(1).await, "ERR 500 :session lost, reconnect\n");
        assert_eq!(b.next_call().await, ("gone".into(), Op::Call(Call::Close)));
        b.until_empty().await;
    }

    #[tokio::test]
    async fn a_state_this_build_cannot_read_is_refused() {
        let b = fixture_of(chat(), DriverConfig::default(), None);
        assert_eq!(b.driver.adopt("c1", b"not a state"), Adopted::Unreadable);
        assert!(b.driver.registry().is_empty());
    }
}

/// A protocol that names itself to every new socket.
struct Greeter;

struct GreeterSession;

impl Protocol for Greeter {
    fn name(&self) -> &'static str {
        "greeter"
    }
    fn new_session(&self, _: SessionInit) -> Box<dyn Session> {
        Box::new(GreeterSession)
    }
    fn lost_session_bytes(&self) -> Bytes {
        Bytes::new()
    }
}

impl Session for GreeterSession {
    fn handle(&mut self, event: Event, out: &mut Vec<Action>) {
        if let Event::Created(_) = event {
            out.push(Action::Send(Bytes::from_static(b"greeter\n")));
        }
    }
}

#[tokio::test]
async fn each_listener_speaks_its_own_protocol() {
    let protocols = Protocols::new(
        Arc::new(Toy),
        vec![(7994, Arc::new(Greeter) as Arc<dyn Protocol>)],
    );
    let (tx, mut calls) = mpsc::unbounded_channel();
    let emqx = Arc::new(FakeEmqx {
        calls: tx,
        script: Mutex::new(Box::new(|_, _| Ok(()))),
        gate: Arc::new(tokio::sync::Semaphore::new(usize::MAX >> 4)),
    });
    let driver = Driver::new(protocols, emqx, DriverConfig::default());
    let on = |port: u16| ConnMeta {
        sockname: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        ..ConnMeta::default()
    };
    driver.dispatch("a", Event::Created(on(7994)), false).await;
    assert_eq!(calls.recv().await.unwrap(), ("a".into(), send("greeter\n")));
    driver.dispatch("b", Event::Created(on(7993)), false).await;
    assert_eq!(calls.recv().await.unwrap(), ("b".into(), send("hi\n")));
    driver
        .dispatch("c", Event::Created(ConnMeta::default()), false)
        .await;
    assert_eq!(calls.recv().await.unwrap(), ("c".into(), send("hi\n")));
    // A saved session of a protocol this driver does not serve is refused.
    let chat =
        crate::protocol::by_name("chat", &crate::protocol::ProtocolConfig::default()).unwrap();
    let state = Connection::new(chat.new_session(SessionInit::default()))
        .save("chat")
        .unwrap();
    assert_eq!(driver.adopt("d", &state), Adopted::Unreadable);
}

/// A `lines` device whose record EMQX answers "connection gone" (it wrote
/// and closed at once) still gets its `offline`: the session hears of the
/// end, and its RawPublish needs no connection.
#[tokio::test]
async fn a_session_ended_by_a_gone_connection_still_has_its_last_words() {
    let lines = crate::protocol::lines::Lines::new(crate::protocol::ProtocolConfig {
        keepalive: Duration::ZERO,
        ..crate::protocol::ProtocolConfig::default()
    });
    let mut f = fixture_of(Arc::new(lines), DriverConfig::default(), None);
    f.create("c").await;
    f.bytes("c", "ID d\n", false).await;
    // Authenticate, Subscribe, RawPublish online, then the OK line.
    let mut ops = Vec::new();
    while !matches!(ops.last(), Some(Op::Send(_))) {
        ops.push(f.next_call().await.1);
    }
    assert!(
        matches!(&ops[2], Op::Call(Call::RawPublish { payload, .. }) if &payload[..] == b"online")
    );
    f.script(|_, op| match op {
        Op::Call(Call::Publish { .. }) => Err(EmqxError::Gone),
        _ => Ok(()),
    });
    f.bytes("c", "t=1\n", false).await;
    assert!(matches!(
        f.next_call().await.1,
        Op::Call(Call::Publish { .. })
    ));
    match f.next_call().await.1 {
        Op::Call(Call::RawPublish { topic, payload, .. }) => {
            assert_eq!(
                (topic.as_str(), &payload[..]),
                ("devices/d/status", &b"offline"[..])
            );
        }
        other => panic!("no offline: {other:?}"),
    }
    f.until_empty().await;
}
