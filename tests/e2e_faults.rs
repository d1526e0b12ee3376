//! EMQX faults and hostile clients end to end, through the dev gateway's
//! fault controls: the ConnectionAdapter stopped and restarted mid-session,
//! slow and failing calls, a session limit, and a 100 MB flood without LF.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Client, Stack, HELLO};
use exproto_adapter::dev_gateway::{Method, ResultCode};

#[tokio::test]
async fn connection_adapter_stopped_and_restarted_mid_session() {
    let s = Stack::start(|_| {}, |a| a.call_timeout = Duration::from_millis(500)).await;
    let mut c = s.connected("survivor").await;
    assert_eq!(c.ask("SUB before").await, "OK SUB before 0");

    let faults = s.gateway.faults();
    faults.stop_adapter().await;
    // While EMQX is away the test holds its port and drops every connection
    // the adapter makes: the first is the Subscribe (which fails), the
    // second a delivery attempt of the reply. Seeing both proves the order
    // of events without guessing at timing.
    let squatter = tokio::net::TcpListener::bind(s.gateway.adapter_addr())
        .await
        .unwrap();
    c.send("SUB during\n").await;
    for _ in 0..2 {
        let (conn, _) = tokio::time::timeout(e2e_support::WAIT, squatter.accept())
            .await
            .expect("the adapter never tried to reach EMQX")
            .unwrap();
        drop(conn);
    }
    drop(squatter);
    // Its ERR 503 waited for EMQX: replies travel through EMQX's Send.
    faults.start_adapter().await.unwrap();
    assert_eq!(c.line().await, "ERR 503 :emqx unreachable");
    // And then everything works again on the same session.
    assert_eq!(c.ask("SUB after").await, "OK SUB after 0");
    assert_eq!(c.ask("PUB after :back").await, "OK PUB after");
    assert_eq!(c.line().await, "MSG after survivor :back");
}

#[tokio::test]
async fn a_slow_emqx_call_times_out_as_503_then_service_resumes() {
    let s = Stack::start(|_| {}, |a| a.call_timeout = Duration::from_millis(300)).await;
    let mut c = s.connected("patient").await;
    s.gateway
        .faults()
        .delay_next(Method::Subscribe, Duration::from_secs(2), 1);
    assert_eq!(c.ask("SUB slow").await, "ERR 503 :emqx unreachable");
    assert_eq!(c.ask("SUB fast").await, "OK SUB fast 0");
}

#[tokio::test]
async fn failing_calls_become_err_lines_and_the_session_goes_on() {
    let s = Stack::unary().await;
    let mut c = s.connected("f").await;
    let faults = s.gateway.faults();
    faults.fail_next(Method::Subscribe, ResultCode::Unknown, 1);
    assert_eq!(c.ask("SUB a").await, "ERR 500 :gateway failed");
    faults.fail_next(Method::Publish, ResultCode::PermissionDeny, 1);
    assert_eq!(c.ask("PUB a :x").await, "ERR 403 :not authorized");
    assert_eq!(c.ask("SUB a").await, "OK SUB a 0");
    assert_eq!(c.ask("PUB a :x").await, "OK PUB a");
    assert_eq!(c.line().await, "MSG a f :x");
}

#[tokio::test]
async fn sockets_over_the_session_limit_are_refused() {
    let s = Stack::start(|_| {}, |a| a.driver.max_sessions = 2).await;
    let mut a = s.client().await;
    let mut b = s.client().await;
    let mut c = Client::connect(s.addr()).await;
    assert_eq!(c.line().await, "ERR 429 :too many connections");
    assert_eq!(c.eof().await, "");
    assert_eq!(a.ask("PING").await, "PONG");
    // A place frees when a session ends.
    assert_eq!(b.ask("QUIT").await, "BYE");
    b.eof().await;
    s.until_sessions(1).await;
    let mut d = Client::connect(s.addr()).await;
    assert_eq!(d.line().await, HELLO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_flood_without_lf_gets_one_413_and_the_session_survives() {
    let s = Stack::unary().await;
    let c = s.connected("flood").await;
    let chunk = vec![b'x'; 1 << 20];
    let (mut reader, mut writer) = c.split();
    let write = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for _ in 0..100 {
            writer.write_all(&chunk).await.unwrap();
        }
        writer.write_all(b"\nPING\n").await.unwrap();
        writer
    });
    // The 413 comes as soon as the line passes the limit, long before the
    // flood ends; then nothing until the PONG after the LF.
    assert_eq!(reader.line().await, "ERR 413 :line too long");
    assert_eq!(reader.line_within(Duration::from_secs(120)).await, "PONG");
    let writer = write.await.unwrap();
    let mut c = Client::join(reader, writer);
    assert_eq!(c.ask("PING").await, "PONG");
}
