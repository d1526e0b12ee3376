//! The dev gateway with the deprecated streaming ConnectionHandler: one
//! client stream per RPC and connection, and `created_late`, which lets a
//! connection's first bytes overtake its OnSocketCreated.

mod dev_gateway_support;

use std::time::Duration;

use dev_gateway_support::*;
use exproto_adapter::dev_gateway::{DevGateway, GatewayConfig, HandlerMode};

#[tokio::test]
async fn stream_mode_carries_every_event() {
    let mut s = scripted(|c| c.handler_mode = HandlerMode::Stream).await;
    let (mut alice, conn) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(alice.ask("ping").await, "ECHO ping");
    assert_eq!(alice.ask("AUTH alice").await, "AUTH 0");
    assert_eq!(alice.ask("SUB room").await, "SUB 0");
    // The delivery travels on its own stream, so it may overtake the reply
    // to the PUB that caused it.
    alice.send("PUB room hello\n").await;
    let mut lines = [alice.line().await, alice.line().await];
    lines.sort();
    assert_eq!(lines, ["MSG room alice 0 hello", "PUB 0"]);
    // Several connections share the handler channel, each with its streams.
    let (mut bob, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(bob.ask("AUTH bob").await, "AUTH 0");
    bob.send("PUB room hi alice\n").await;
    assert_eq!(alice.line().await, "MSG room bob 0 hi alice");
    assert_eq!(bob.line().await, "PUB 0");
    alice.send("CLOSE\n").await;
    assert_eq!(alice.eof().await, "BYE\n");
    assert_eq!(s.events.closed(&conn).await, "{shutdown,normal}");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn created_late_delivers_the_first_bytes_before_on_socket_created() {
    init_tracing();
    let (handler, mut events) = start_handler(quiet()).await;
    let mut cfg = GatewayConfig::for_tests(handler.url.clone());
    cfg.handler_mode = HandlerMode::Stream;
    cfg.created_late = true;
    let gw = DevGateway::start(cfg).await.unwrap();
    let mut client = Client::connect(gw.client_addr()).await;
    client.send("early\n").await;
    let first = events.wait("first event", |_| true).await;
    let conn = first.conn().to_owned();
    assert!(
        matches!(&first, Ev::Bytes { bytes, .. } if bytes == b"early\n"),
        "{first:?}"
    );
    events
        .until("created", |seen| {
            seen.iter()
                .any(|e| matches!(e, Ev::Created { conn: c, .. } if *c == conn))
        })
        .await;
    let kinds: Vec<_> = events.of(&conn).iter().map(Ev::kind).collect();
    assert_eq!(kinds, ["bytes", "created"]);
    client.shutdown_write().await;
    assert_eq!(events.closed(&conn).await, "{shutdown,tcp_closed}");
    gw.shutdown().await;
}

#[tokio::test]
async fn created_late_still_creates_a_connection_that_waits_for_hello() {
    // A client that waits for the server to speak first must not wait
    // forever: OnSocketCreated goes out after a short hold.
    let s = scripted(|c| {
        c.handler_mode = HandlerMode::Stream;
        c.created_late = true;
    })
    .await;
    let started = std::time::Instant::now();
    let (mut c, _) = Client::hello(s.gw.client_addr()).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(c.ask("ping").await, "ECHO ping");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_failing_stream_closes_the_connection() {
    let mut s = scripted(|c| c.handler_mode = HandlerMode::Stream).await;
    let (mut c, conn) = Client::hello(s.gw.client_addr()).await;
    c.send("FAIL\n").await;
    assert_eq!(c.eof().await, "");
    let reason = s.events.closed(&conn).await;
    assert!(
        reason.starts_with("{shutdown,{error,{on_received_bytes,"),
        "{reason}"
    );
    s.gw.shutdown().await;
}
