//! The dev gateway's fault controls: the ConnectionAdapter service stopped
//! and restarted under open client sockets, injected call failures and
//! delays, failing handler calls, kicks.

mod dev_gateway_support;

use std::time::{Duration, Instant};

use dev_gateway_support::*;
use exproto_adapter::dev_gateway::{Fault, Method, ResultCode};
use exproto_adapter::pb;

#[tokio::test]
async fn adapter_service_stops_and_restarts_while_sockets_stay_open() {
    let mut s = scripted(|_| {}).await;
    let faults = s.gw.faults();
    let (mut c, conn) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(c.ask("AUTH alice").await, "AUTH 0");
    let addr = s.gw.adapter_addr();

    faults.stop_adapter().await;
    assert!(!faults.adapter_running().await);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let probe = pb::SendBytesRequest {
        conn: conn.clone(),
        bytes: Default::default(),
    };
    assert!(s.adapter.send(probe.clone()).await.is_err());
    // The handler still hears the client; its replies cannot get through.
    c.send("lost\n").await;
    s.events
        .wait(
            "bytes while stopped",
            |e| matches!(e, Ev::Bytes { bytes, .. } if bytes == b"lost\n"),
        )
        .await;

    faults.start_adapter().await.unwrap();
    assert!(faults.adapter_running().await);
    assert_eq!(s.gw.adapter_addr(), addr);
    assert_eq!(code(s.adapter.send(probe).await).0, ResultCode::Success);
    // Same socket, same session: nothing was closed.
    assert_eq!(c.ask("back").await, "ECHO back");
    assert_eq!(c.ask("SUB t").await, "SUB 0");
    assert_eq!(s.gw.connection_count(), 1);
    s.gw.shutdown().await;
}

#[tokio::test]
async fn injected_codes_statuses_and_delays() {
    let s = scripted(|_| {}).await;
    let faults = s.gw.faults();
    let (mut c, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(c.ask("AUTH alice").await, "AUTH 0");

    faults.fail_next(Method::Subscribe, ResultCode::Unknown, 2);
    assert_eq!(c.ask("SUB a").await, "SUB 1 injected fault");
    assert_eq!(c.ask("SUB a").await, "SUB 1 injected fault");
    assert_eq!(c.ask("SUB a").await, "SUB 0");

    faults.inject(Method::Publish, Fault::Status(tonic::Code::Unavailable), 1);
    assert_eq!(c.ask("PUB a x").await, "PUB grpc-error Unavailable");
    // The injected failure did not publish; the next one does.
    assert_eq!(c.ask("PUB a x").await, "PUB 0");
    assert_eq!(c.line().await, "MSG a alice 0 x");

    faults.delay_next(Method::Send, Duration::from_millis(300), 1);
    let started = Instant::now();
    assert_eq!(c.ask("slow").await, "ECHO slow");
    assert!(started.elapsed() >= Duration::from_millis(300));

    faults.fail_next(Method::RawPublish, ResultCode::PermissionDeny, 1);
    faults.clear();
    assert_eq!(c.ask("RAW a y").await, "RAW 0");
    assert_eq!(c.line().await, "MSG a exproto 0 y");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn failing_handler_calls_close_only_that_connection() {
    let mut s = scripted(|_| {}).await;
    let faults = s.gw.faults();
    let (mut doomed, conn) = Client::hello(s.gw.client_addr()).await;
    let (mut fine, _) = Client::hello(s.gw.client_addr()).await;
    faults.fail_handler_calls(&conn);
    doomed.send("x\n").await;
    assert_eq!(doomed.eof().await, "");
    let probe = pb::SendBytesRequest {
        conn,
        bytes: Default::default(),
    };
    assert_eq!(
        code(s.adapter.send(probe).await).0,
        ResultCode::ConnProcessNotAlive
    );
    assert_eq!(fine.ask("ok").await, "ECHO ok");

    faults.fail_next_handler_calls(1);
    fine.send("y\n").await;
    assert_eq!(fine.eof().await, "");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn kick_closes_the_socket_with_reason_kicked() {
    let mut s = scripted(|_| {}).await;
    let faults = s.gw.faults();
    let (mut c, conn) = Client::hello(s.gw.client_addr()).await;
    assert!(faults.kick(&conn).await);
    assert_eq!(c.eof().await, "");
    assert_eq!(s.events.closed(&conn).await, "{shutdown,kicked}");
    assert!(!faults.kick(&conn).await);
    s.gw.shutdown().await;
}
