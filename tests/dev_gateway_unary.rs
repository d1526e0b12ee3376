//! The dev gateway in unary mode (EMQX's default): event order and flow
//! control, the ConnectionAdapter result codes, closing reasons, timers,
//! discard, pub/sub, RawPublish, authentication and authorization.

mod dev_gateway_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dev_gateway_support::*;
use exproto_adapter::dev_gateway::{DevGateway, EmqxCompat, GatewayConfig, Users};
use exproto_adapter::pb;
use exproto_adapter::pb::ResultCode;

fn send(conn: &str, bytes: &[u8]) -> pb::SendBytesRequest {
    pb::SendBytesRequest {
        conn: conn.to_owned(),
        bytes: bytes::Bytes::copy_from_slice(bytes),
    }
}

fn auth(conn: &str, clientid: &str) -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        conn: conn.to_owned(),
        clientinfo: Some(pb::ClientInfo {
            proto_name: "exproto".into(),
            proto_ver: "chat/1".into(),
            clientid: clientid.into(),
            username: String::new(),
            mountpoint: String::new(),
        }),
        password: String::new(),
    }
}

#[tokio::test]
async fn events_of_a_connection_arrive_in_order_one_call_at_a_time() {
    init_tracing();
    // Slow handling makes the gateway queue events behind the call in
    // flight; they must still come in order and never two at once.
    let behavior: Behavior = Arc::new(|ev| {
        Box::pin(async move {
            if matches!(ev, Ev::Bytes { .. } | Ev::Created { .. }) {
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            Ok(())
        })
    });
    let (handler, mut events) = start_handler(behavior).await;
    let gw = DevGateway::start(GatewayConfig::for_tests(handler.url.clone()))
        .await
        .unwrap();
    let mut client = Client::connect(gw.client_addr()).await;
    let conn = events.created().await;
    let mut sent = Vec::new();
    for i in 0..30 {
        let chunk = format!("line {i}\n");
        client.send(&chunk).await;
        sent.extend_from_slice(chunk.as_bytes());
        if i % 3 == 0 {
            tokio::task::yield_now().await;
        }
    }
    client.shutdown_write().await;
    assert_eq!(events.closed(&conn).await, "{shutdown,tcp_closed}");

    let history = events.of(&conn);
    let kinds: Vec<_> = history.iter().map(Ev::kind).collect();
    assert_eq!(kinds.first(), Some(&"created"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"closed"), "{kinds:?}");
    assert!(kinds[1..kinds.len() - 1].iter().all(|k| *k == "bytes"));
    let received: Vec<u8> = history
        .iter()
        .filter_map(|e| match e {
            Ev::Bytes { bytes, .. } => Some(bytes.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(received, sent);
    assert_eq!(
        handler
            .max_inflight
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // The connection info is EMQX's.
    let Ev::Created { info, .. } = &history[0] else {
        unreachable!()
    };
    assert_eq!(info.socktype, pb::SocketType::Tcp as i32);
    assert_eq!(info.peername.as_ref().unwrap().host, "127.0.0.1");
    assert_eq!(
        info.sockname.as_ref().unwrap().port,
        u32::from(gw.client_addr().port())
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn result_codes_follow_emqx() {
    init_tracing();
    let (handler, mut events) = start_handler(quiet()).await;
    let gw = DevGateway::start(GatewayConfig::for_tests(handler.url.clone()))
        .await
        .unwrap();
    let mut a = adapter_client(gw.adapter_addr());
    let mut client = Client::connect(gw.client_addr()).await;
    let conn = events.created().await;

    // A conn that was never issued and does not decode.
    let (c, m) = code(a.send(send("bm90IGEgY29ubg==", b"x")).await);
    assert_eq!(c, ResultCode::Unknown);
    assert!(m.contains("Unknown crashes"), "{m}");
    assert_eq!(
        code(a.close(pb::CloseSocketRequest { conn: "??".into() }).await).0,
        ResultCode::Unknown
    );

    // Before Authenticate: pub/sub is an unexpected call, timers are fine.
    let pubreq = |qos| pb::PublishRequest {
        conn: conn.clone(),
        topic: "t".into(),
        qos,
        payload: bytes::Bytes::from_static(b"p"),
    };
    let subreq = |qos| pb::SubscribeRequest {
        conn: conn.clone(),
        topic: "t/#".into(),
        qos,
    };
    for (c, m) in [
        code(a.publish(pubreq(0)).await),
        code(a.subscribe(subreq(0)).await),
        code(
            a.unsubscribe(pb::UnsubscribeRequest {
                conn: conn.clone(),
                topic: "t/#".into(),
            })
            .await,
        ),
    ] {
        assert_eq!(c, ResultCode::Unknown);
        assert_eq!(m, "{error,unexpected_call}");
    }
    let timer = |r#type, interval| pb::TimerRequest {
        conn: conn.clone(),
        r#type,
        interval,
    };
    assert_eq!(
        code(a.start_timer(timer(0, 60)).await).0,
        ResultCode::Success
    );
    for req in [timer(0, 0), timer(1, 60)] {
        let (c, m) = code(a.start_timer(req).await);
        assert_eq!(
            (c, m.as_str()),
            (ResultCode::Unknown, "{error,'PARAMS_TYPE_ERROR'}")
        );
    }

    // Authenticate: clientinfo is required, proto_name/proto_ver too.
    let mut bare = auth(&conn, "alice");
    bare.clientinfo = None;
    assert!(a.authenticate(bare).await.is_err());
    let mut no_proto = auth(&conn, "alice");
    no_proto.clientinfo.as_mut().unwrap().proto_ver.clear();
    assert_eq!(
        code(a.authenticate(no_proto).await).0,
        ResultCode::RequiredParamsMissed
    );
    assert_eq!(
        code(a.authenticate(auth(&conn, "alice")).await).0,
        ResultCode::Success
    );
    let (c, m) = code(a.authenticate(auth(&conn, "alice")).await);
    assert_eq!(c, ResultCode::PermissionDeny);
    assert!(m.contains("Duplicated"), "{m}");

    // qos above 2 (EMQX 5.1.0's form), then the real thing.
    for (c, m) in [
        code(a.publish(pubreq(3)).await),
        code(a.subscribe(subreq(3)).await),
    ] {
        assert_eq!(
            (c, m.as_str()),
            (ResultCode::Unknown, "{error,'PARAMS_TYPE_ERROR'}")
        );
    }
    assert_eq!(code(a.subscribe(subreq(1)).await).0, ResultCode::Success);
    assert_eq!(code(a.publish(pubreq(1)).await).0, ResultCode::Success);
    let msgs = events
        .wait("own message", |e| matches!(e, Ev::Messages { .. }))
        .await;
    let Ev::Messages { msgs, .. } = msgs else {
        unreachable!()
    };
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(
        (m.topic.as_str(), m.from.as_str(), m.qos),
        ("t", "alice", 1)
    );
    assert_eq!(m.payload, &b"p"[..]);
    assert_eq!(m.node, "emqx@127.0.0.1");
    assert_eq!(m.id.len(), 32);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(m.timestamp <= now_ms && m.timestamp + 10_000 > now_ms);

    // Send and an empty Send (the liveness probe), Close, then gone.
    assert_eq!(
        code(a.send(send(&conn, b"hi\n")).await).0,
        ResultCode::Success
    );
    assert_eq!(code(a.send(send(&conn, b"")).await).0, ResultCode::Success);
    assert_eq!(client.line().await, "hi");
    assert_eq!(
        code(a.close(pb::CloseSocketRequest { conn: conn.clone() }).await).0,
        ResultCode::Success
    );
    assert_eq!(client.eof().await, "");
    assert_eq!(events.closed(&conn).await, "{shutdown,normal}");
    for (c, _) in [
        code(a.send(send(&conn, b"")).await),
        code(a.close(pb::CloseSocketRequest { conn: conn.clone() }).await),
        code(a.authenticate(auth(&conn, "alice")).await),
        code(a.publish(pubreq(0)).await),
    ] {
        assert_eq!(c, ResultCode::ConnProcessNotAlive);
    }
    assert_eq!(gw.connection_count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn queued_events_are_delivered_before_closed_and_the_process_answers_meanwhile() {
    init_tracing();
    let gate = Gate::default();
    let g = gate.clone();
    let behavior: Behavior = Arc::new(move |ev| {
        let g = g.clone();
        Box::pin(async move {
            if matches!(&ev, Ev::Bytes { bytes, .. } if bytes == b"x") {
                g.pass().await;
            }
            Ok(())
        })
    });
    let (handler, mut events) = start_handler(behavior).await;
    let gw = DevGateway::start(GatewayConfig::for_tests(handler.url.clone()))
        .await
        .unwrap();
    let mut a = adapter_client(gw.adapter_addr());
    let mut client = Client::connect(gw.client_addr()).await;
    let conn = events.created().await;
    client.send("x").await;
    events
        .wait(
            "bytes x",
            |e| matches!(e, Ev::Bytes { bytes, .. } if bytes == b"x"),
        )
        .await;
    // Queued behind the call in flight, then the client hangs up; the
    // socket closing is visible to the client once the gateway read EOF.
    client.send("y").await;
    client.shutdown_write().await;
    assert_eq!(client.eof().await, "");

    // The process lives on while its queue drains (EMQX answers like this).
    assert_eq!(
        code(a.send(send(&conn, b"late")).await).0,
        ResultCode::Success
    );
    assert_eq!(
        code(a.close(pb::CloseSocketRequest { conn: conn.clone() }).await).0,
        ResultCode::Success
    );
    let (c, m) = code(a.authenticate(auth(&conn, "bob")).await);
    assert_eq!(c, ResultCode::PermissionDeny);
    assert!(m.contains("disconnected"), "{m}");
    assert_eq!(gw.connection_count(), 1);

    gate.open(1);
    assert_eq!(events.closed(&conn).await, "{shutdown,tcp_closed}");
    let kinds: Vec<_> = events.of(&conn).iter().map(Ev::kind).collect();
    assert_eq!(kinds, ["created", "bytes", "bytes", "closed"]);
    let Ev::Bytes { bytes, .. } = &events.of(&conn)[2] else {
        unreachable!()
    };
    assert_eq!(bytes, b"y");
    assert_eq!(
        code(a.send(send(&conn, b"")).await).0,
        ResultCode::ConnProcessNotAlive
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_second_authenticate_with_the_same_clientid_discards_the_first() {
    let mut s = scripted(|_| {}).await;
    let (mut first, conn1) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(first.ask("AUTH twin").await, "AUTH 0");
    let (mut second, conn2) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(second.ask("AUTH twin").await, "AUTH 0");

    assert_eq!(first.eof().await, "");
    assert_eq!(s.events.closed(&conn1).await, "{shutdown,discarded}");
    assert_eq!(
        code(s.adapter.send(send(&conn1, b"")).await).0,
        ResultCode::ConnProcessNotAlive
    );
    assert_eq!(second.ask("ping").await, "ECHO ping");
    assert_ne!(conn1, conn2);
    // A third one with another clientid leaves the second alone.
    let (mut third, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(third.ask("AUTH other").await, "AUTH 0");
    assert_eq!(second.ask("still").await, "ECHO still");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn keepalive_closes_a_silent_client_and_the_timeout_reply_is_lost() {
    let mut s = scripted(|_| {}).await;
    let (mut client, conn) = Client::hello(s.gw.client_addr()).await;
    // Taken before the timer starts, so the lower bound below holds however
    // slow the machine is.
    let started = Instant::now();
    assert_eq!(client.ask("TIMER 1").await, "TIMER 0");
    // The script answers OnTimerTimeout with a TIMEOUT line: it must not
    // reach the client, the socket is already closed.
    assert_eq!(client.eof().await, "");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(990) && waited < Duration::from_millis(4000),
        "{waited:?}"
    );
    assert_eq!(s.events.closed(&conn).await, "{shutdown,keepalive_timeout}");
    let kinds: Vec<_> = s.events.of(&conn).iter().map(Ev::kind).collect();
    assert_eq!(&kinds[kinds.len() - 2..], ["timer", "closed"]);
    let timer = s
        .events
        .wait("timer", |e| matches!(e, Ev::Timer { .. }))
        .await;
    assert!(matches!(timer, Ev::Timer { kind: 0, .. }));
    s.gw.shutdown().await;
}

#[tokio::test]
async fn keepalive_spares_a_client_that_keeps_sending() {
    let s = scripted(|_| {}).await;
    let (mut client, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(client.ask("TIMER 1").await, "TIMER 0");
    // Activity every 400 ms for 3 s: past any 1x-2x window of a 1 s timer.
    let until = Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while Instant::now() < until {
        assert_eq!(
            client.ask(&format!("ping {i}")).await,
            format!("ECHO ping {i}")
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    s.gw.shutdown().await;
}

#[tokio::test]
async fn idle_timeout_closes_a_socket_that_never_sends() {
    let mut s = scripted(|c| c.idle_timeout = Duration::from_secs(1)).await;
    // This one talks first, so it is past its own idle deadline by the time
    // the silent one is closed, and must still be open.
    let (mut talker, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(talker.ask("hi").await, "ECHO hi");
    let started = Instant::now();
    let (mut silent, conn) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(silent.eof().await, "");
    assert!(started.elapsed() >= Duration::from_millis(990));
    assert_eq!(s.events.closed(&conn).await, "{shutdown,idle_timeout}");
    assert_eq!(talker.ask("still").await, "ECHO still");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn pub_sub_routes_by_filter_and_raw_publish_comes_from_exproto() {
    let s = scripted(|_| {}).await;
    let (mut alice, _) = Client::hello(s.gw.client_addr()).await;
    let (mut bob, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(alice.ask("AUTH alice").await, "AUTH 0");
    assert_eq!(bob.ask("AUTH bob").await, "AUTH 0");
    assert_eq!(alice.ask("SUB chat/+").await, "SUB 0");
    assert_eq!(alice.ask("SUB #").await, "SUB 0");

    // `#` does not match `$SYS/...`; the next message proves the first
    // was not delivered (deliveries keep publish order).
    assert_eq!(bob.ask("PUB $SYS/x hidden").await, "PUB 0");
    assert_eq!(bob.ask("PUB chat/lobby hello all").await, "PUB 0");
    // One copy per matching subscription, as EMQX delivers.
    assert_eq!(alice.line().await, "MSG chat/lobby bob 0 hello all");
    assert_eq!(alice.line().await, "MSG chat/lobby bob 0 hello all");

    assert_eq!(alice.ask("UNSUB #").await, "UNSUB 0");
    assert_eq!(bob.ask("RAW chat/news from the system").await, "RAW 0");
    assert_eq!(
        alice.line().await,
        "MSG chat/news exproto 0 from the system"
    );

    assert_eq!(alice.ask("UNSUB chat/+").await, "UNSUB 0");
    assert_eq!(bob.ask("PUB chat/lobby nobody").await, "PUB 0");
    assert_eq!(alice.ask("ping").await, "ECHO ping");
    // Invalid topics are refused without losing the connection.
    assert!(bob.ask("PUB a/+ x").await.starts_with("PUB 1"));
    assert!(bob.ask("SUB a/#/b").await.starts_with("SUB 1"));
    assert_eq!(bob.ask("ping").await, "ECHO ping");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn messages_queued_behind_a_slow_call_are_batched_in_order() {
    init_tracing();
    let gate = Gate::default();
    let g = gate.clone();
    let behavior: Behavior = Arc::new(move |ev| {
        let g = g.clone();
        Box::pin(async move {
            if matches!(&ev, Ev::Bytes { .. }) {
                g.pass().await;
            }
            Ok(())
        })
    });
    let (handler, mut events) = start_handler(behavior).await;
    let gw = DevGateway::start(GatewayConfig::for_tests(handler.url.clone()))
        .await
        .unwrap();
    let mut a = adapter_client(gw.adapter_addr());
    let mut client = Client::connect(gw.client_addr()).await;
    let conn = events.created().await;
    assert_eq!(
        code(a.authenticate(auth(&conn, "sub")).await).0,
        ResultCode::Success
    );
    let sub = pb::SubscribeRequest {
        conn: conn.clone(),
        topic: "news".into(),
        qos: 0,
    };
    assert_eq!(code(a.subscribe(sub).await).0, ResultCode::Success);
    client.send("hold").await;
    events
        .wait("held bytes", |e| matches!(e, Ev::Bytes { .. }))
        .await;
    for i in 0..20 {
        let req = pb::RawPublishRequest {
            topic: "news".into(),
            qos: 0,
            payload: format!("{i}").into_bytes().into(),
        };
        assert_eq!(code(a.raw_publish(req).await).0, ResultCode::Success);
    }
    gate.open(1);
    let batches = |seen: &[Ev]| -> Vec<Vec<pb::Message>> {
        seen.iter()
            .filter_map(|e| match e {
                Ev::Messages { msgs, .. } => Some(msgs.clone()),
                _ => None,
            })
            .collect()
    };
    events
        .until("20 messages", |seen| batches(seen).concat().len() >= 20)
        .await;
    let calls = batches(&events.seen).len();
    let got = batches(&events.seen).concat();
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    let want: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(payloads, want);
    assert!(calls < 20, "no batching: {calls} calls");
    let ids: std::collections::HashSet<_> = got.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), 20);
    gw.shutdown().await;
}

#[tokio::test]
async fn users_file_and_deny_rules() {
    let s = scripted(|c| {
        c.users = Some(Users::parse("# test users\nalice pw\n").unwrap());
        c.deny = vec![
            "publish:chat/secret/#".parse().unwrap(),
            "subscribe:admin/#".parse().unwrap(),
        ];
    })
    .await;
    let (mut c, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(
        c.ask("AUTH alice alice wrong").await,
        "AUTH 5 not_authorized"
    );
    assert_eq!(c.ask("AUTH bob bob pw").await, "AUTH 5 not_authorized");
    assert_eq!(c.ask("AUTH alice alice").await, "AUTH 5 not_authorized");
    // A refused Authenticate may be retried.
    assert_eq!(c.ask("AUTH alice alice pw").await, "AUTH 0");
    let deny = "5 <<\"Authorization deny\">>";
    assert_eq!(
        c.ask("PUB chat/secret/plans x").await,
        format!("PUB {deny}")
    );
    assert_eq!(c.ask("SUB admin/#").await, format!("SUB {deny}"));
    assert_eq!(c.ask("SUB admin/users").await, format!("SUB {deny}"));
    assert_eq!(c.ask("SUB chat/#").await, "SUB 0");
    assert_eq!(c.ask("PUB chat/lobby fine").await, "PUB 0");
    assert_eq!(c.line().await, "MSG chat/lobby alice 0 fine");
    s.gw.shutdown().await;
}

/// The pitfall of EMQX 5.8.8 and later, reproduced: a `proto_name` other
/// than `exproto` skips authentication there, while 5.1 still checks it.
#[tokio::test]
async fn the_authentication_chain_follows_proto_name_per_emqx_release() {
    for compat in [EmqxCompat::V5_1, EmqxCompat::V5_8] {
        let s = scripted(|c| {
            c.users = Some(Users::parse("bob hunter2\n").unwrap());
            c.emqx_compat = compat;
        })
        .await;
        let (mut c, _) = Client::hello(s.gw.client_addr()).await;
        // `exproto` meets the users file on both.
        assert_eq!(c.ask("AUTH bob bob wrong").await, "AUTH 5 not_authorized");
        assert_eq!(
            c.ask("AUTHAS exproto bob bob wrong").await,
            "AUTH 5 not_authorized"
        );
        // Another gateway's chain is empty, on both: anyone gets in.
        let (mut other, _) = Client::hello(s.gw.client_addr()).await;
        assert_eq!(other.ask("AUTHAS mqtt m nobody x").await, "AUTH 0");
        // An unknown name: checked on 5.1, waved through on 5.8.
        let want = match compat {
            EmqxCompat::V5_1 => "AUTH 5 not_authorized",
            EmqxCompat::V5_8 => "AUTH 0",
        };
        assert_eq!(
            c.ask("AUTHAS chat sbad bob wrong").await,
            want,
            "{compat:?}"
        );
        let (mut anon, _) = Client::hello(s.gw.client_addr()).await;
        assert_eq!(anon.ask("AUTHAS chat nobody").await, want, "{compat:?}");
        s.gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_failed_handler_call_closes_the_connection() {
    let mut s = scripted(|_| {}).await;
    let (mut c, conn) = Client::hello(s.gw.client_addr()).await;
    c.send("FAIL\n").await;
    assert_eq!(c.eof().await, "");
    let reason = s.events.closed(&conn).await;
    assert!(
        reason.starts_with("{shutdown,{error,{on_received_bytes,{grpc_error,{13,"),
        "{reason}"
    );
    assert_eq!(
        code(s.adapter.send(send(&conn, b"")).await).0,
        ResultCode::ConnProcessNotAlive
    );
    s.gw.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_handler_closes_new_connections() {
    init_tracing();
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gw = DevGateway::start(GatewayConfig::for_tests(format!("http://127.0.0.1:{port}")))
        .await
        .unwrap();
    let mut c = Client::connect(gw.client_addr()).await;
    assert_eq!(c.eof().await, "");
    gw.shutdown().await;
}
