//! The chat protocol end to end in unary mode: real TCP clients, the dev
//! gateway standing in for EMQX, and the adapter, all on ports bound on 0.

mod e2e_support;

use std::time::Duration;

use bytes::Bytes;
use e2e_support::{Client, Stack, HELLO};
use exproto_adapter::dev_gateway::Users;
use exproto_adapter::pb;
use exproto_adapter::pb::connection_adapter_client::ConnectionAdapterClient;

#[tokio::test]
async fn the_readme_netcat_session() {
    let s = Stack::unary().await;
    let mut alice = Client::connect(s.addr()).await;
    assert_eq!(alice.line().await, HELLO);
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
async fn two_clients_chat_with_each_other() {
    let s = Stack::unary().await;
    let mut alice = s.connected("alice").await;
    let mut bob = s.connected("bob").await;
    assert_eq!(alice.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    assert_eq!(bob.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    assert_eq!(
        bob.ask("PUB chat/lobby :hi alice").await,
        "OK PUB chat/lobby"
    );
    assert_eq!(bob.line().await, "MSG chat/lobby bob :hi alice");
    assert_eq!(alice.line().await, "MSG chat/lobby bob :hi alice");
    alice.send("PUB chat/lobby :hi bob\n").await;
    assert_eq!(alice.line().await, "OK PUB chat/lobby");
    assert_eq!(bob.line().await, "MSG chat/lobby alice :hi bob");
}

#[tokio::test]
async fn framing_splits_merges_crlf_blank_lines() {
    let s = Stack::unary().await;
    let mut c = s.client().await;
    for b in b"CONNECT bytewise\r\n" {
        c.send([*b]).await;
    }
    assert_eq!(c.line().await, "OK CONNECT bytewise");
    // Blank and whitespace-only lines are ignored; merged lines each answer.
    c.send("\n \t \r\n\nPING\r\nPING\nPING\n").await;
    assert_eq!(c.lines(3).await, ["PONG", "PONG", "PONG"]);
    c.send(b"PUB a :\xff\xfe\n").await;
    assert_eq!(c.line().await, "ERR 400 :invalid utf-8");
}

#[tokio::test]
async fn an_overlong_line_is_refused_at_once_and_skipped() {
    let s = Stack::start(|_| {}, |a| a.protocol.max_line = 64).await;
    let mut c = s.client().await;
    // 65 bytes and no LF yet: the answer must not wait for the LF.
    c.send("x".repeat(65)).await;
    assert_eq!(c.line().await, "ERR 413 :line too long");
    c.send(format!("{}\nPING\n", "y".repeat(1000))).await;
    assert_eq!(c.line().await, "PONG");
    // Exactly the limit is fine (CR counted, LF not).
    c.send(format!("PUB t :{}\r\n", "z".repeat(64 - 8 - 1)))
        .await;
    assert_eq!(c.line().await, "ERR 401 :not connected");
}

#[tokio::test]
async fn syntax_whitespace_case_trailing_and_escapes() {
    let s = Stack::unary().await;
    let mut c = s.client().await;
    assert_eq!(c.ask("  \tcOnNeCt \t esc").await, "OK CONNECT esc");
    assert_eq!(c.ask("sub\tchat/a\\sb 1").await, "OK SUB chat/a\\sb 1");
    c.send("pub chat/a\\sb 1 :two  words \\\\ \\n\\x41\n").await;
    assert_eq!(c.line().await, "OK PUB chat/a\\sb");
    assert_eq!(c.line().await, "MSG chat/a\\sb esc :two  words \\\\ \\nA");
    // A single-word message may omit the colon.
    c.send("PUB chat/a\\sb 2 solo\n").await;
    assert_eq!(c.line().await, "OK PUB chat/a\\sb");
    assert_eq!(c.line().await, "MSG chat/a\\sb esc :solo");
    // Unknown escapes are kept as written.
    c.send("PUB chat/a\\sb :\\q\\x4\n").await;
    c.line().await;
    assert_eq!(c.line().await, "MSG chat/a\\sb esc :\\\\q\\\\x4");
    // PING takes no parameter, and an empty trailing one counts.
    assert!(c.ask("PING :").await.starts_with("ERR 400 "));
    assert!(c.ask("PING extra").await.starts_with("ERR 400 "));
}

#[tokio::test]
async fn pub_parameter_rules() {
    let s = Stack::unary().await;
    let mut c = s.connected("p").await;
    assert_eq!(c.ask("SUB p/# 2").await, "OK SUB p/# 2");
    for (cmd, msg) in [
        ("PUB p/t 1", "MSG p/t p :1"),
        ("PUB p/t 1 :hi there", "MSG p/t p :hi there"),
        ("PUB p/t 1 hi", "MSG p/t p :hi"),
        ("PUB p/t :", "MSG p/t p :"),
    ] {
        assert_eq!(c.ask(cmd).await, "OK PUB p/t", "{cmd}");
        assert_eq!(c.line().await, msg, "{cmd}");
    }
    for bad in ["PUB p/t", "PUB p/t 3 :x", "PUB p/t x :y", "PUB p/t 1 2 3"] {
        assert!(c.ask(bad).await.starts_with("ERR 400 "), "{bad}");
    }
}

#[tokio::test]
async fn before_connect_only_connect_ping_help_quit() {
    let s = Stack::unary().await;
    let mut c = s.client().await;
    for cmd in ["SUB a", "UNSUB a", "PUB a :x", "WHO", "HISTORY a"] {
        assert_eq!(c.ask(cmd).await, "ERR 401 :not connected", "{cmd}");
    }
    // 400 checks come before 401.
    assert!(c.ask("SUB").await.starts_with("ERR 400 "));
    assert!(c.ask("SUB a 7").await.starts_with("ERR 400 "));
    assert!(c.ask("FROB").await.starts_with("ERR 400 "));
    assert_eq!(c.ask("PING").await, "PONG");
    let help = c.ask("HELP").await;
    assert!(help.starts_with("OK HELP :"), "{help}");
    for verb in [
        "CONNECT", "SUB", "UNSUB", "PUB", "PING", "QUIT", "WHO", "HISTORY",
    ] {
        assert!(help.contains(verb), "{help} lacks {verb}");
    }
    // WHO and HISTORY need the presence service: 501 once connected.
    assert_eq!(c.ask("CONNECT w").await, "OK CONNECT w");
    assert_eq!(c.ask("WHO").await, "ERR 501 :not enabled");
    assert_eq!(c.ask("CONNECT w").await, "ERR 409 :already connected");
}

#[tokio::test]
async fn connect_without_clientid_gets_a_unique_one() {
    let s = Stack::unary().await;
    let mut a = s.client().await;
    let mut b = s.client().await;
    let ra = a.ask("LOGIN").await;
    let rb = b.ask("CONNECT").await;
    assert!(ra.starts_with("OK CONNECT chat-"), "{ra}");
    assert!(rb.starts_with("OK CONNECT chat-"), "{rb}");
    assert_ne!(ra, rb);
    // Both stay connected: neither id discarded the other.
    assert_eq!(a.ask("PING").await, "PONG");
    assert_eq!(b.ask("PING").await, "PONG");
}

#[tokio::test]
async fn topic_rules_are_checked_before_emqx() {
    let s = Stack::unary().await;
    let mut c = s.connected("t").await;
    for bad in [
        "SUB a/b#",
        "SUB a/#/b",
        "SUB a+/b",
        "PUB a/+ :x",
        "PUB a/# :x",
        "SUB a\\x00b",
        "UNSUB #/a",
    ] {
        assert!(c.ask(bad).await.starts_with("ERR 400 "), "{bad}");
    }
}

#[tokio::test]
async fn subscription_limit_is_429() {
    let s = Stack::start(|_| {}, |a| a.protocol.max_subscriptions = 2).await;
    let mut c = s.connected("lim").await;
    assert_eq!(c.ask("SUB a").await, "OK SUB a 0");
    assert_eq!(c.ask("SUB b").await, "OK SUB b 0");
    assert!(c.ask("SUB c").await.starts_with("ERR 429 "));
    // Re-subscribing takes no new place; UNSUB frees one.
    assert_eq!(c.ask("SUB a 1").await, "OK SUB a 1");
    assert_eq!(c.ask("UNSUB b").await, "OK UNSUB b");
    assert_eq!(c.ask("SUB c").await, "OK SUB c 0");
}

#[tokio::test]
async fn refused_login_and_denied_topics() {
    let s = Stack::start(
        |g| {
            g.users = Some(Users::parse("alice s3cret\n").unwrap());
            g.deny = vec![
                "publish:secret/#".parse().unwrap(),
                "subscribe:admin/#".parse().unwrap(),
            ];
        },
        |_| {},
    )
    .await;
    let mut c = s.client().await;
    assert_eq!(
        c.ask("CONNECT alice alice wrong").await,
        "ERR 401 :authentication refused"
    );
    assert_eq!(
        c.ask("CONNECT mallory mallory x").await,
        "ERR 401 :authentication refused"
    );
    // A refused CONNECT grants nothing.
    assert_eq!(c.ask("SUB x").await, "ERR 401 :not connected");
    assert_eq!(
        c.ask("CONNECT alice alice s3cret").await,
        "OK CONNECT alice"
    );
    assert_eq!(c.ask("SUB admin/x").await, "ERR 403 :not authorized");
    assert_eq!(c.ask("PUB secret/x :m").await, "ERR 403 :not authorized");
    assert_eq!(c.ask("SUB secret/x").await, "OK SUB secret/x 0");
    assert_eq!(c.ask("PUB open :m").await, "OK PUB open");
}

#[tokio::test]
async fn login_timeout_is_408_and_closes() {
    let s = Stack::start(
        |_| {},
        |a| a.protocol.login_timeout = Duration::from_millis(500),
    )
    .await;
    let mut c = s.client().await;
    assert_eq!(c.ask("PING").await, "PONG");
    assert_eq!(c.line().await, "ERR 408 :login timeout");
    assert_eq!(c.eof().await, "");
    s.until_no_sessions().await;
}

#[tokio::test]
async fn keepalive_timeout_closes_a_silent_client() {
    let s = Stack::start(|_| {}, |a| a.protocol.keepalive = Duration::from_secs(1)).await;
    let mut c = s.connected("sleepy").await;
    // EMQX closes after 1-2 intervals without a byte, saying nothing.
    assert_eq!(c.eof().await, "");
    s.until_no_sessions().await;
}

#[tokio::test]
async fn duplicate_clientid_discards_the_older_connection() {
    let s = Stack::unary().await;
    let mut first = s.connected("dup").await;
    let mut second = s.connected("dup").await;
    assert_eq!(first.eof().await, "");
    assert_eq!(second.ask("PING").await, "PONG");
}

#[tokio::test]
async fn quit_says_bye_closes_and_ignores_the_rest() {
    let s = Stack::unary().await;
    let mut c = s.connected("q").await;
    c.send("QUIT :gone fishing\nPING\nPING\n").await;
    assert_eq!(c.line().await, "BYE");
    assert_eq!(c.eof().await, "");
    s.until_no_sessions().await;
    // QUIT works before CONNECT too; more than one parameter is a 400.
    let mut d = s.client().await;
    assert!(d.ask("QUIT a b").await.starts_with("ERR 400 "));
    assert_eq!(d.ask("quit").await, "BYE");
    assert_eq!(d.eof().await, "");
}

#[tokio::test]
async fn fan_out_and_wildcards_across_clients() {
    let s = Stack::unary().await;
    let mut all = s.connected("all").await;
    let mut plus = s.connected("plus").await;
    let mut exact = s.connected("exact").await;
    let mut sys = s.connected("sys").await;
    assert_eq!(all.ask("SUB #").await, "OK SUB # 0");
    assert_eq!(plus.ask("SUB room/+/msg").await, "OK SUB room/+/msg 0");
    assert_eq!(exact.ask("SUB room/a/msg").await, "OK SUB room/a/msg 0");
    assert_eq!(sys.ask("SUB $SYS/#").await, "OK SUB $SYS/# 0");
    let mut p = s.connected("pub").await;
    assert_eq!(p.ask("PUB room/a/msg :1").await, "OK PUB room/a/msg");
    assert_eq!(p.ask("PUB room/b/msg :2").await, "OK PUB room/b/msg");
    assert_eq!(p.ask("PUB room :3").await, "OK PUB room");
    assert_eq!(p.ask("PUB $SYS/x :4").await, "OK PUB $SYS/x");
    assert_eq!(
        all.lines(3).await,
        [
            "MSG room/a/msg pub :1",
            "MSG room/b/msg pub :2",
            "MSG room pub :3"
        ]
    );
    assert_eq!(
        plus.lines(2).await,
        ["MSG room/a/msg pub :1", "MSG room/b/msg pub :2"]
    );
    assert_eq!(exact.line().await, "MSG room/a/msg pub :1");
    assert_eq!(sys.line().await, "MSG $SYS/x pub :4");
    // `#` never saw the $SYS message: its next line is the marker.
    assert_eq!(p.ask("PUB marker :5").await, "OK PUB marker");
    assert_eq!(all.line().await, "MSG marker pub :5");
    exact.silent_for(Duration::from_millis(100)).await;
}

/// Undoes the protocol's escapes (the test's own small decoder).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'\\' => out.push(b'\\'),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b's' => out.push(b' '),
                b'x' if i + 3 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 4;
                    continue;
                }
                other => panic!("unexpected escape \\{}", other as char),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[tokio::test]
async fn any_payload_round_trips_through_escapes() {
    let s = Stack::unary().await;
    let mut c = s.connected("esc").await;
    assert_eq!(c.ask("SUB raw/t").await, "OK SUB raw/t 0");
    let payload: &[u8] =
        b"line1\nline2\r\nback\\slash  two spaces\x00\x7f\xff\xfe caf\xc3\xa9 :colon\ttab";
    let mut emqx = ConnectionAdapterClient::connect(format!("http://{}", s.gateway.adapter_addr()))
        .await
        .unwrap();
    let r = emqx
        .raw_publish(pb::RawPublishRequest {
            topic: "raw/t".into(),
            qos: 0,
            payload: Bytes::from_static(payload),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.code, pb::ResultCode::Success as i32);
    let line = c.line().await;
    let rest = line.strip_prefix("MSG raw/t exproto :").unwrap();
    assert!(!rest.contains('\n') && !rest.contains('\r'));
    assert_eq!(unescape(rest), payload);
    // And the client can send the same bytes back with escapes.
    c.send(format!("PUB raw/t :{rest}\n")).await;
    assert_eq!(c.line().await, "OK PUB raw/t");
    let back = c.line().await;
    assert_eq!(
        unescape(back.strip_prefix("MSG raw/t esc :").unwrap()),
        payload
    );
}

#[tokio::test]
async fn a_publisher_named_dash_is_escaped_and_an_empty_from_is_a_dash() {
    let s = Stack::unary().await;
    let mut c = s.connected("-").await;
    assert_eq!(c.ask("SUB d").await, "OK SUB d 0");
    assert_eq!(c.ask("PUB d :x").await, "OK PUB d");
    assert_eq!(c.line().await, "MSG d \\x2D :x");
}

#[tokio::test]
async fn an_adapter_restart_tells_clients_their_session_is_lost() {
    let s = Stack::unary().await;
    let mut c = s.connected("r").await;
    let addr = s.adapter.addr();
    let gw_adapter = s.gateway.adapter_addr();
    let Stack { gateway, adapter } = s;
    adapter.shutdown().await.unwrap();
    // A new adapter on the same port knows nothing of the old sessions.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let cfg = exproto_adapter::server::AdapterConfig {
        emqx: format!("http://{gw_adapter}"),
        ..Default::default()
    };
    let emqx = exproto_adapter::emqx::GrpcAdapter::new(&cfg.emqx, Duration::from_secs(2)).unwrap();
    let _adapter = exproto_adapter::server::Server::builder(cfg)
        .handler_listener(listener)
        .emqx(std::sync::Arc::new(emqx))
        .start()
        .await
        .unwrap();
    c.send("PING\n").await;
    assert_eq!(c.line().await, "ERR 500 :session lost, reconnect");
    assert_eq!(c.eof().await, "");
    // New clients are served normally.
    let mut d = Client::connect(gateway.client_addr()).await;
    assert_eq!(d.line().await, HELLO);
}

#[tokio::test]
async fn the_registry_empties_when_every_client_leaves() {
    let s = Stack::unary().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = s.connected(&format!("leaver{i}")).await;
        assert_eq!(c.ask("SUB x").await, "OK SUB x 0");
        clients.push(c);
    }
    assert_eq!(s.adapter.driver().registry().len(), 20);
    for (i, mut c) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(c.ask("QUIT").await, "BYE");
        }
        // The odd ones just drop the socket.
    }
    s.until_no_sessions().await;
}

/// `Call::RawPublish` reaches EMQX's RawPublish: the message comes from
/// `exproto`, with no client identity (what a protocol says about a device
/// that went away, say).
#[tokio::test]
async fn a_raw_publish_call_publishes_from_exproto() {
    use exproto_adapter::emqx::{ConnectionAdapter, Op};
    use exproto_adapter::protocol::Call;
    let s = Stack::unary().await;
    let mut c = s.connected("watcher").await;
    assert_eq!(
        c.ask("SUB devices/d1/status").await,
        "OK SUB devices/d1/status 0"
    );
    let emqx = exproto_adapter::emqx::GrpcAdapter::new(
        &format!("http://{}", s.gateway.adapter_addr()),
        Duration::from_secs(2),
    )
    .unwrap();
    // RawPublish names no conn: any (even a closed one's) will do.
    emqx.call(
        "no-such-conn",
        Op::Call(Call::RawPublish {
            topic: "devices/d1/status".into(),
            qos: 1,
            payload: Bytes::from_static(b"offline"),
        }),
    )
    .await
    .unwrap();
    assert_eq!(c.line().await, "MSG devices/d1/status exproto :offline");
}
