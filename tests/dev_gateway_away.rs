//! The dev gateway while its handler is away (killed, then started again on
//! the same address), as each EMQX release behaves: 5.1 holds a call that
//! cannot reach the handler, and the connection's later events behind it,
//! until the handler is back or `handler_retry` has passed; 5.8 fails that
//! call at once and closes the client. A client with no event meanwhile
//! notices nothing on either, in both handler modes.

mod dev_gateway_support;

use std::time::{Duration, Instant};

use dev_gateway_support::*;
use exproto_adapter::dev_gateway::{DevGateway, EmqxCompat, HandlerMode};
use exproto_adapter::pb;
use exproto_adapter::pb::ResultCode;

/// A `handler_retry` no test lasts: a call that waited this long would
/// fail the test by its timeouts first.
const LONG_RETRY: Duration = Duration::from_secs(60);
/// How long a waiting call must keep its client open, to show it waits.
const HELD: Duration = Duration::from_millis(300);

/// A gateway in `compat` and `mode`, with two greeted clients, one to speak
/// while the handler is away and one to stay idle, and then the handler
/// killed.
struct Outage {
    s: Scripted,
    speaker: Client,
    /// The speaker's conn.
    conn: String,
    idle: Client,
}

async fn outage(compat: EmqxCompat, mode: HandlerMode, retry: Duration) -> Outage {
    let mut s = scripted(|c| {
        c.emqx_compat = compat;
        c.handler_mode = mode;
        c.handler_retry = retry;
    })
    .await;
    let (speaker, conn) = Client::hello(s.gw.client_addr()).await;
    let (idle, _) = Client::hello(s.gw.client_addr()).await;
    stop_handler(&mut s).await;
    Outage {
        s,
        speaker,
        conn,
        idle,
    }
}

impl Outage {
    /// Restarts the handler and checks that the speaker's connection is
    /// gone, its event never delivered, while the idle client works and a
    /// new one is greeted.
    async fn back_and_only_the_speaker_gone(mut self) {
        self.s.process.restart().await;
        assert_eq!(
            code(self.s.adapter.send(probe(&self.conn)).await).0,
            ResultCode::ConnProcessNotAlive
        );
        assert_eq!(self.idle.ask("ping").await, "ECHO ping");
        let (mut fresh, _) = Client::hello(self.s.gw.client_addr()).await;
        assert_eq!(fresh.ask("hi").await, "ECHO hi");
        assert!(bytes_of(&mut self.s.events, &self.conn).is_empty());
        self.s.gw.shutdown().await;
    }
}

/// Polls `cond` until it holds, within [`WAIT`]: the gateway's counters
/// have no change notification.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the gateway has sent `n` handler events in all: an event
/// sent by a client is then in a handler call, not in a socket buffer.
async fn handler_events_reach(gw: &DevGateway, n: u64) {
    until(&format!("{n} handler events"), || {
        gw.stats().handler_events >= n
    })
    .await;
}

/// Kills the handler once every call so far has been answered: a call cut
/// off half-way would be tried again (5.1) or close its client (5.8), which
/// is right, but not what these tests are about.
async fn stop_handler(s: &mut Scripted) {
    until("no handler call pending", || {
        s.gw.handler_calls_pending() == 0
    })
    .await;
    s.process.stop().await;
}

fn probe(conn: &str) -> pb::SendBytesRequest {
    pb::SendBytesRequest {
        conn: conn.to_owned(),
        bytes: Default::default(),
    }
}

fn bytes_of(events: &mut Events, conn: &str) -> Vec<String> {
    events
        .of(conn)
        .into_iter()
        .filter_map(|e| match e {
            Ev::Bytes { bytes, .. } => Some(String::from_utf8(bytes).unwrap()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn v5_1_an_event_sent_while_the_handler_is_down_reaches_it_when_back() {
    events_wait_for_the_handler(HandlerMode::Unary).await;
}

/// 5.1: events sent while the handler is down reach it when it is back, in
/// order, and nobody is closed.
async fn events_wait_for_the_handler(mode: HandlerMode) {
    let Outage {
        mut s,
        speaker: mut c,
        conn,
        mut idle,
    } = outage(EmqxCompat::V5_1, mode, LONG_RETRY).await;
    let sent = s.gw.stats().handler_events;
    c.send("first\n").await;
    handler_events_reach(&s.gw, sent + 1).await;
    // Read on its own, so it is a later event that queues behind the call.
    c.send("second\n").await;
    // A socket opened meanwhile waits for its OnSocketCreated.
    let mut late = Client::connect(s.gw.client_addr()).await;
    handler_events_reach(&s.gw, sent + 2).await;
    c.silent_for(HELD).await;

    s.process.restart().await;
    assert_eq!(c.lines(2).await, ["ECHO first", "ECHO second"]);
    let hello = late.line().await;
    assert!(hello.starts_with("HELLO "), "{hello}");
    assert_eq!(c.ask("third").await, "ECHO third");
    assert_eq!(idle.ask("ping").await, "ECHO ping");
    assert_eq!(
        bytes_of(&mut s.events, &conn),
        ["first\n", "second\n", "third\n"]
    );
    assert!(
        !s.events
            .of(&conn)
            .iter()
            .any(|e| matches!(e, Ev::Closed { .. })),
        "{:?}",
        s.events.of(&conn)
    );
    s.gw.shutdown().await;
}

#[tokio::test]
async fn v5_1_a_handler_away_past_handler_retry_closes_the_waiting_client() {
    const RETRY: Duration = Duration::from_millis(500);
    let mut o = outage(EmqxCompat::V5_1, HandlerMode::Unary, RETRY).await;
    let sent = Instant::now();
    o.speaker.send("lost\n").await;
    assert_eq!(o.speaker.eof().await, "");
    assert!(sent.elapsed() >= RETRY, "closed after {:?}", sent.elapsed());
    o.back_and_only_the_speaker_gone().await;
}

#[tokio::test]
async fn v5_8_an_event_while_the_handler_is_down_closes_that_client_at_once() {
    an_event_closes_its_client_at_once(HandlerMode::Unary).await;
}

/// 5.8: the client that speaks while the handler is down is closed, the
/// others carry on.
async fn an_event_closes_its_client_at_once(mode: HandlerMode) {
    // The bound is set, and ignored: a close within WAIT shows no wait.
    let mut o = outage(EmqxCompat::V5_8, mode, LONG_RETRY).await;
    o.speaker.send("lost\n").await;
    assert_eq!(o.speaker.eof().await, "");
    o.back_and_only_the_speaker_gone().await;
}

// In stream mode a request counts as done once written, so only a stream
// that has to be opened meets the missing handler. The speakers below send
// their first bytes during the outage, so their bytes stream opens then;
// the streams open before break under every client, which must close none.

#[tokio::test]
async fn v5_1_stream_mode_holds_an_event_whose_stream_cannot_open() {
    events_wait_for_the_handler(HandlerMode::Stream).await;
}

#[tokio::test]
async fn v5_8_stream_mode_closes_a_client_whose_stream_cannot_open() {
    an_event_closes_its_client_at_once(HandlerMode::Stream).await;
}
