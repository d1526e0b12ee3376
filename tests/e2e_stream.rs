//! A representative set of the protocol's rules through the streaming
//! `ConnectionHandler`, including a connection's first bytes arriving
//! before its `OnSocketCreated`.

mod e2e_support;

use e2e_support::{Client, Stack, HELLO};
use exproto_adapter::dev_gateway::HandlerMode;

async fn created_late() -> Stack {
    Stack::start(
        |g| {
            g.handler_mode = HandlerMode::Stream;
            g.created_late = true;
        },
        |_| {},
    )
    .await
}

#[tokio::test]
async fn the_readme_session_over_streams() {
    let s = Stack::stream().await;
    let mut alice = s.client().await;
    assert_eq!(
        alice.ask("CONNECT alice alice s3cret").await,
        "OK CONNECT alice"
    );
    assert_eq!(alice.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    assert_eq!(
        alice.ask("PUB chat/lobby :hello everyone").await,
        "OK PUB chat/lobby"
    );
    assert_eq!(alice.line().await, "MSG chat/lobby alice :hello everyone");
}

#[tokio::test]
async fn first_bytes_before_created_are_answered_in_order() {
    let s = created_late().await;
    for i in 0..5 {
        let mut c = Client::connect(s.addr()).await;
        // Sent before anything was read: the gateway hands these bytes to
        // the adapter ahead of OnSocketCreated.
        c.send(format!("CONNECT early{i}\nPING\nSUB e/{i}\n")).await;
        assert_eq!(
            c.lines(4).await,
            [
                HELLO.to_string(),
                format!("OK CONNECT early{i}"),
                "PONG".into(),
                format!("OK SUB e/{i} 0")
            ]
        );
    }
}

#[tokio::test]
async fn errors_limits_and_quit_over_streams() {
    let s = created_late().await;
    let mut c = Client::connect(s.addr()).await;
    c.send("SUB x\nFROB\nCONNECT s\nSUB a/#/b\nPUB a/+ :x\n")
        .await;
    let lines = c.lines(6).await;
    assert_eq!(lines[0], HELLO);
    assert_eq!(lines[1], "ERR 401 :not connected");
    assert!(lines[2].starts_with("ERR 400 "), "{lines:?}");
    assert_eq!(lines[3], "OK CONNECT s");
    assert!(lines[4].starts_with("ERR 400 "), "{lines:?}");
    assert!(lines[5].starts_with("ERR 400 "), "{lines:?}");
    c.send("QUIT\nPING\n").await;
    assert_eq!(c.line().await, "BYE");
    assert_eq!(c.eof().await, "");
    s.until_no_sessions().await;
}

#[tokio::test]
async fn fan_out_over_streams() {
    let s = Stack::stream().await;
    let mut subs = Vec::new();
    for i in 0..5 {
        let mut c = s.connected(&format!("s{i}")).await;
        assert_eq!(c.ask("SUB fan/+").await, "OK SUB fan/+ 0");
        subs.push(c);
    }
    let mut p = s.connected("p").await;
    for n in 0..10 {
        assert_eq!(p.ask(&format!("PUB fan/x :{n}")).await, "OK PUB fan/x");
    }
    for c in &mut subs {
        let got = c.lines(10).await;
        let want: Vec<String> = (0..10).map(|n| format!("MSG fan/x p :{n}")).collect();
        assert_eq!(got, want);
    }
}
