//! The real handler server on port 0, driven through both handler services
//! by a test client, against an in-test EMQX that records every call.

mod common;

use std::time::Duration;

use common::{message, quick_config, Harness};

const HELLO: &str = "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]";

#[tokio::test]
async fn a_whole_session_through_the_unary_service() {
    let h = Harness::start().await;
    h.created("c1").await;
    h.bytes("c1", "CONNECT alice alice s3cret\n").await;
    h.bytes("c1", "SUB chat/lobby\nPUB chat/lobby :hello everyone\n")
        .await;
    let lines = h.emqx.lines("c1", 4).await;
    assert_eq!(
        lines,
        [
            HELLO,
            "OK CONNECT alice",
            "OK SUB chat/lobby 0",
            "OK PUB chat/lobby"
        ]
    );
    let auth = h.emqx.called("c1", "Authenticate").await;
    assert_eq!(
        auth.detail,
        "proto_name=exproto proto_ver=chat/1 clientid=alice username=alice password=s3cret"
    );
    let timer = h.emqx.called("c1", "StartTimer").await;
    assert_eq!(timer.detail, "type=0 interval=60");
    assert_eq!(
        h.emqx.called("c1", "Publish").await.detail,
        "chat/lobby qos=0 payload=\"hello everyone\""
    );

    h.messages(
        "c1",
        vec![
            message("chat/lobby", "alice", b"hello everyone"),
            message("chat/lobby", "", b"two"),
            message("chat/lobby", "bob", b"line\nbreak"),
        ],
    )
    .await;
    let lines = h.emqx.lines("c1", 7).await;
    assert_eq!(
        &lines[4..],
        [
            "MSG chat/lobby alice :hello everyone",
            "MSG chat/lobby - :two",
            "MSG chat/lobby bob :line\\nbreak"
        ]
    );

    h.bytes("c1", "QUIT :bye\nPING\n").await;
    let lines = h.emqx.lines("c1", 8).await;
    assert_eq!(lines[7], "BYE");
    h.emqx.called("c1", "Close").await;
    h.closed("c1", "{shutdown,normal}").await;
    h.until_registry_empty().await;
    // Nothing answered the PING after QUIT.
    assert_eq!(h.emqx.lines("c1", 8).await.len(), 8);
}

#[tokio::test]
async fn one_byte_chunks_give_the_same_replies() {
    let h = Harness::start().await;
    h.created("c").await;
    for b in b"CONNECT bob\r\nSUB a/+ 1\r\nPING\r\n" {
        h.bytes("c", [*b]).await;
    }
    assert_eq!(
        h.emqx.lines("c", 4).await,
        [HELLO, "OK CONNECT bob", "OK SUB a/+ 1", "PONG"]
    );
}

#[tokio::test]
async fn a_thousand_lines_in_one_chunk_are_few_sends() {
    let h = Harness::start().await;
    h.created("c").await;
    h.emqx.lines("c", 1).await;
    h.bytes("c", "PING\n".repeat(1000)).await;
    let lines = h.emqx.lines("c", 1001).await;
    assert!(lines[1..].iter().all(|l| l == "PONG"));
    // HELLO, then all the PONGs together.
    assert_eq!(h.emqx.sends("c"), 2);

    // Around EMQX calls the order forces no extra Send either: one event,
    // one Send.
    h.bytes("c", "CONNECT x\nPING\nSUB t\nPING\n").await;
    let lines = h.emqx.lines("c", 1005).await;
    assert_eq!(
        &lines[1001..],
        ["OK CONNECT x", "PONG", "OK SUB t 0", "PONG"]
    );
    assert_eq!(h.emqx.sends("c"), 3);
}

#[tokio::test]
async fn emqx_refusals_become_err_lines_not_grpc_errors() {
    let h = Harness::start().await;
    h.created("c").await;
    h.bytes("c", "CONNECT bad bad pw\nCONNECT boom\nSUB t\nCONNECT x\n")
        .await;
    h.bytes("c", "SUB deny/x\nPUB deny/x :m\nSUB boom/x\nSUB ok 2\n")
        .await;
    let lines = h.emqx.lines("c", 9).await;
    assert!(lines[1].starts_with("ERR 401 "), "{lines:?}");
    assert!(lines[2].starts_with("ERR 500 "), "{lines:?}");
    assert!(lines[3].starts_with("ERR 401 "), "{lines:?}");
    assert_eq!(lines[4], "OK CONNECT x");
    assert!(lines[5].starts_with("ERR 403 "), "{lines:?}");
    assert!(lines[6].starts_with("ERR 403 "), "{lines:?}");
    assert!(lines[7].starts_with("ERR 500 "), "{lines:?}");
    assert_eq!(lines[8], "OK SUB ok 2");
    // The refused login was never followed by a subscribe to EMQX for it.
    let subs: Vec<_> = h
        .emqx
        .calls_for("c")
        .into_iter()
        .filter(|c| c.method == "Subscribe")
        .map(|c| c.detail)
        .collect();
    assert_eq!(subs, ["deny/x qos=0", "boom/x qos=0", "ok qos=2"]);
}

#[tokio::test]
async fn socket_closed_mid_line_forgets_the_session() {
    let h = Harness::start().await;
    h.created("c").await;
    h.bytes("c", "CONNECT a\nPIN").await;
    h.emqx.lines("c", 2).await;
    h.closed("c", "{shutdown,tcp_closed}").await;
    h.until_registry_empty().await;
    assert_eq!(h.emqx.lines("c", 2).await.len(), 2);
}

#[tokio::test]
async fn unknown_conn_gets_session_lost_and_is_closed() {
    let h = Harness::start().await;
    h.bytes("ghost", "PING\n").await;
    assert_eq!(
        h.emqx.lines("ghost", 1).await,
        ["ERR 500 :session lost, reconnect"]
    );
    h.emqx.called("ghost", "Close").await;
    h.messages("ghost2", vec![message("t", "a", b"x")]).await;
    assert_eq!(
        h.emqx.lines("ghost2", 1).await,
        ["ERR 500 :session lost, reconnect"]
    );
    // A timer or close for an unknown conn is answered and ignored.
    h.timer("ghost3").await;
    h.closed("ghost4", "{shutdown,normal}").await;
    assert!(h.emqx.calls_for("ghost3").is_empty());
    h.until_registry_empty().await;
}

#[tokio::test]
async fn conn_process_not_alive_ends_the_session() {
    let h = Harness::start().await;
    h.created("c").await;
    h.emqx.lines("c", 1).await;
    assert_eq!(h.adapter.driver().registry().len(), 1);
    h.emqx.set_gone("c");
    // No OnSocketClosed will ever come; EMQX's answer is enough.
    h.bytes("c", "PING\n").await;
    h.until_registry_empty().await;
}

#[tokio::test]
async fn emqx_unreachable_gives_503_delivered_once_emqx_is_back() {
    let h = Harness::start().await;
    h.created("c").await;
    h.emqx.lines("c", 1).await;
    h.emqx.set_down(true);
    h.bytes("c", "CONNECT a\n").await;
    // Let the Authenticate fail and the reply's first deliveries fail too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.emqx.set_down(false);
    let lines = h.emqx.lines("c", 2).await;
    assert!(lines[1].starts_with("ERR 503 "), "{lines:?}");
    // Nothing was authenticated, so a retry works normally.
    h.bytes("c", "CONNECT a\n").await;
    assert_eq!(h.emqx.lines("c", 3).await[2], "OK CONNECT a");
}

#[tokio::test]
async fn login_timeout_closes_with_408() {
    let mut config = quick_config();
    config.protocol.login_timeout = Duration::from_millis(300);
    let h = Harness::start_with(config).await;
    h.created("c").await;
    h.bytes("c", "PING\n").await;
    let lines = h.emqx.lines("c", 3).await;
    assert_eq!(lines[1..], ["PONG", "ERR 408 :login timeout"]);
    h.emqx.called("c", "Close").await;
}

#[tokio::test]
async fn keepalive_zero_starts_no_timer() {
    let mut config = quick_config();
    config.protocol.keepalive = Duration::ZERO;
    let h = Harness::start_with(config).await;
    h.created("c").await;
    h.bytes("c", "CONNECT a\nPING\n").await;
    h.emqx.lines("c", 3).await;
    assert!(h
        .emqx
        .calls_for("c")
        .iter()
        .all(|c| c.method != "StartTimer"));
}

#[tokio::test]
async fn the_streaming_service_serves_a_session() {
    let h = Harness::start().await;
    let s = h.streams();
    s.created("s1").await;
    s.bytes("s1", "LOGIN carol\nSUB a/#\nPING\n").await;
    assert_eq!(
        h.emqx.lines("s1", 4).await,
        [HELLO, "OK CONNECT carol", "OK SUB a/# 0", "PONG"]
    );
    s.closed("s1", "{shutdown,tcp_closed}").await;
    h.until_registry_empty().await;
}

#[tokio::test]
async fn streaming_bytes_before_created_are_not_lost() {
    let h = Harness::start().await;
    let s = h.streams();
    s.bytes("s1", "CONNECT dave\n").await;
    s.bytes("s1", "PING\n").await;
    // Wait until the adapter holds them, so the order really is reversed.
    for _ in 0..1000 {
        if h.adapter.driver().registry().orphans() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(h.adapter.driver().registry().orphans(), 1);
    s.created("s1").await;
    assert_eq!(
        h.emqx.lines("s1", 3).await,
        [HELLO, "OK CONNECT dave", "PONG"]
    );
}

#[tokio::test]
async fn streaming_bytes_for_a_conn_never_created_are_lost_after_the_wait() {
    let mut config = quick_config();
    config.driver.created_wait = Duration::from_millis(200);
    let h = Harness::start_with(config).await;
    let s = h.streams();
    s.bytes("never", "PING\n").await;
    assert_eq!(
        h.emqx.lines("never", 1).await,
        ["ERR 500 :session lost, reconnect"]
    );
    h.emqx.called("never", "Close").await;
    h.until_registry_empty().await;
}

#[tokio::test]
async fn many_connections_come_and_go_and_the_registry_empties() {
    let h = Harness::start().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let unary = h.unary.clone();
        let conn = format!("conn-{i}");
        let h2 = (h.emqx.clone(), unary);
        tasks.push(tokio::spawn(async move {
            let (emqx, mut unary) = h2;
            use exproto_adapter::pb;
            unary
                .on_socket_created(pb::SocketCreatedRequest {
                    conn: conn.clone(),
                    conninfo: None,
                })
                .await
                .unwrap();
            unary
                .on_received_bytes(pb::ReceivedBytesRequest {
                    conn: conn.clone(),
                    bytes: format!("CONNECT {conn}\nSUB t/{i}\nQUIT\n").into(),
                })
                .await
                .unwrap();
            emqx.lines(&conn, 4).await;
            unary
                .on_socket_closed(pb::SocketClosedRequest {
                    conn: conn.clone(),
                    reason: "{shutdown,normal}".into(),
                })
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    h.until_registry_empty().await;
}

/// What the builder cannot serve fails the start, with a reason.
#[tokio::test]
async fn the_builder_refuses_what_it_cannot_serve() {
    use exproto_adapter::protocol;
    use exproto_adapter::server::Server;

    let chat = || protocol::by_name("chat", &protocol::ProtocolConfig::default()).unwrap();
    let refusal = |r: anyhow::Result<exproto_adapter::server::RunningAdapter>| match r {
        Ok(_) => panic!("the start was not refused"),
        Err(e) => e.to_string(),
    };

    let two = Server::builder(quick_config())
        .protocol(chat())
        .protocol(chat())
        .start()
        .await;
    let e = refusal(two);
    assert!(e.contains("2 default protocols given"), "{e}");

    let unknown = Server::builder(exproto_adapter::server::AdapterConfig {
        listeners: vec![(7994, "nope".into())],
        ..quick_config()
    })
    .start()
    .await;
    let e = refusal(unknown);
    assert!(
        e.contains("unknown protocol \"nope\" for listener port 7994 (known: chat, lines)"),
        "{e}"
    );

    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let no_presence = Server::builder(quick_config())
        .hook_listener(hook)
        .start()
        .await;
    let e = refusal(no_presence);
    assert!(e.contains("presence settings"), "{e}");

    let mut config = quick_config();
    config.protocol_name = "morse".into();
    let e = refusal(Server::builder(config).start().await);
    assert!(
        e.contains("unknown protocol \"morse\" (known: chat, lines)"),
        "{e}"
    );
}
