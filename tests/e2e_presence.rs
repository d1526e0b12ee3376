//! Presence and history end to end: real TCP clients, the dev gateway
//! reporting connects, disconnects and publishes to the adapter's ExHook
//! server as EMQX does, the store behind it, and `WHO` and `HISTORY` read
//! back through the chat protocol. Ports are bound on 0; SQLite runs in
//! memory, PostgreSQL (where it runs) in a schema of its own.
//!
//! The hook server writes after the fact, so every read that depends on a
//! write is repeated until it matches, within a deadline.

mod e2e_support;
#[path = "support/postgres.rs"]
mod pg;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use e2e_support::{Client, Stack, WAIT};
use exproto_adapter::pb;
use exproto_adapter::pb::connection_adapter_client::ConnectionAdapterClient;

const MEMORY: &str = "sqlite::memory:";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap()
}

/// Waits until the hook server has written everything it accepted, and
/// has accepted at least `records` (presence changes and messages).
async fn hooks_written(s: &Stack, records: u64) {
    let hooks = s.adapter.hooks().expect("presence enabled");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = hooks.stats();
        if st.queued >= records && st.settled() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hook records not written: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A `HIST` line split into (topic, from, timestamp, payload).
fn hist(line: &str) -> (String, String, u64, String) {
    let rest = line.strip_prefix("HIST ").expect("a HIST line");
    let (head, payload) = rest.split_once(" :").expect("a payload");
    let mut parts = head.split(' ');
    let topic = parts.next().unwrap().to_owned();
    let from = parts.next().unwrap().to_owned();
    let ts = parts.next().unwrap().parse().expect("a timestamp");
    assert_eq!(parts.next(), None, "{line}");
    (topic, from, ts, payload.to_owned())
}

async fn quit(mut c: Client) {
    assert_eq!(c.ask("QUIT").await, "BYE");
    c.eof().await;
}

/// The Quick start's two `nc` sessions, line for line (bar the
/// timestamp).
#[tokio::test]
async fn the_readme_netcat_sessions() {
    let s = Stack::presence(MEMORY).await;
    let mut alice = s.connected_as("CONNECT alice alice s3cret", "alice").await;
    assert_eq!(alice.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    assert_eq!(
        alice.ask("PUB chat/lobby :hello everyone").await,
        "OK PUB chat/lobby"
    );
    assert_eq!(alice.line().await, "MSG chat/lobby alice :hello everyone");
    alice.ask_until("WHO", &["OK WHO 1 :alice"]).await;

    let mut bob = s.connected("bob").await;
    bob.ask_until("WHO", &["OK WHO 2 :alice bob"]).await;
    assert_eq!(bob.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    let lines = history_until(&mut bob, "chat/lobby", 1).await;
    let (topic, from, _, payload) = hist(&lines[0]);
    assert_eq!(
        (topic.as_str(), from.as_str(), payload.as_str()),
        ("chat/lobby", "alice", "hello everyone")
    );
    assert_eq!(
        bob.ask("PUB chat/lobby :hi alice").await,
        "OK PUB chat/lobby"
    );
    assert_eq!(bob.line().await, "MSG chat/lobby bob :hi alice");
    assert_eq!(alice.line().await, "MSG chat/lobby bob :hi alice");
}

#[tokio::test]
async fn who_lists_who_is_online_and_forgets_who_left() {
    let s = Stack::presence(MEMORY).await;
    let mut alice = s.connected("alice").await;
    let bob = s.connected("bob").await;
    alice.ask_until("WHO", &["OK WHO 2 :alice bob"]).await;

    quit(bob).await;
    alice.ask_until("WHO", &["OK WHO 1 :alice"]).await;

    // A client whose socket just drops is reported gone too.
    let carol = s.connected("carol").await;
    alice.ask_until("WHO", &["OK WHO 2 :alice carol"]).await;
    drop(carol);
    alice.ask_until("WHO", &["OK WHO 1 :alice"]).await;
    let st = s.gateway.exhook_stats().unwrap();
    assert_eq!((st.failed, st.dropped), (0, 0), "{st:?}");
}

#[tokio::test]
async fn who_with_a_prefix() {
    let s = Stack::presence(MEMORY).await;
    let mut alice = s.connected("alice").await;
    let _alicia = s.connected("alicia").await;
    let _bob = s.connected("bob").await;
    alice
        .ask_until("WHO", &["OK WHO 3 :alice alicia bob"])
        .await;
    assert_eq!(alice.ask("WHO ali").await, "OK WHO 2 :alice alicia");
    assert_eq!(alice.ask("WHO b").await, "OK WHO 1 :bob");
    assert_eq!(alice.ask("WHO alicia").await, "OK WHO 1 :alicia");
    assert_eq!(alice.ask("WHO zed").await, "OK WHO 0 :");
}

#[tokio::test]
async fn history_replays_what_was_published_before_a_client_connected() {
    let s = Stack::presence(MEMORY).await;
    let before = now_ms();
    let mut alice = s.connected("alice").await;
    assert_eq!(
        alice.ask("PUB chat/lobby :first").await,
        "OK PUB chat/lobby"
    );
    assert_eq!(
        alice.ask("PUB chat/lobby 1 :second line\\nwrapped").await,
        "OK PUB chat/lobby"
    );
    // RawPublish goes through message.publish like any publish.
    let mut emqx = ConnectionAdapterClient::connect(format!("http://{}", s.gateway.adapter_addr()))
        .await
        .unwrap();
    let r = emqx
        .raw_publish(pb::RawPublishRequest {
            topic: "chat/lobby".into(),
            qos: 0,
            payload: Bytes::from_static(b"from the gateway"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.code, pb::ResultCode::Success as i32, "{}", r.message);
    assert_eq!(
        alice.ask("PUB chat/other :elsewhere").await,
        "OK PUB chat/other"
    );
    assert_eq!(
        alice.ask("PUB news/today :not kept").await,
        "OK PUB news/today"
    );
    let after = now_ms();
    quit(alice).await;

    let mut carol = s.connected("carol").await;
    assert_eq!(carol.ask("SUB chat/#").await, "OK SUB chat/# 0");
    let lines = history_until(&mut carol, "chat/lobby", 3).await;
    let replayed: Vec<_> = lines[..3].iter().map(|l| hist(l)).collect();
    let said: Vec<_> = replayed
        .iter()
        .map(|(topic, from, _, payload)| (topic.as_str(), from.as_str(), payload.as_str()))
        .collect();
    assert_eq!(
        said,
        [
            ("chat/lobby", "alice", "first"),
            ("chat/lobby", "alice", "second line\\nwrapped"),
            ("chat/lobby", "exproto", "from the gateway"),
        ]
    );
    // The gateway's timestamps, in publishing order.
    let ts: Vec<u64> = replayed.iter().map(|r| r.2).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    assert!(before <= ts[0] && ts[2] <= after, "{before} {ts:?} {after}");

    // The newest n, oldest first.
    assert_eq!(
        carol.reply("HISTORY chat/lobby 2").await,
        [
            lines[1].as_str(),
            lines[2].as_str(),
            "OK HISTORY chat/lobby 2"
        ]
    );
    let other = history_until(&mut carol, "chat/other", 1).await;
    assert_eq!(hist(&other[0]).3, "elsewhere");

    // Only history topics (chat/#) are reported and kept: the provider
    // registered message.publish for them alone. Records: two connects,
    // one disconnect, four messages.
    hooks_written(&s, 7).await;
    assert_eq!(s.gateway.exhook_stats().unwrap().sent, 7);
    assert_eq!(carol.ask("SUB news/#").await, "OK SUB news/# 0");
    assert_eq!(
        carol.reply("HISTORY news/today").await,
        ["OK HISTORY news/today 0"]
    );
}

/// Repeats `HISTORY topic` until it replays `count` messages; returns the
/// reply's lines.
async fn history_until(c: &mut Client, topic: &str, count: usize) -> Vec<String> {
    let done = format!("OK HISTORY {topic} {count}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lines = c.reply(&format!("HISTORY {topic}")).await;
        if lines.last() == Some(&done) {
            return lines;
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_message_id_seen_twice_is_stored_once() {
    let s = Stack::presence(MEMORY).await;
    let mut carol = s.connected("carol").await;
    assert_eq!(carol.ask("SUB chat/dup").await, "OK SUB chat/dup 0");
    let mut alice = s.connected("alice").await;
    // The first message reaches the hook server twice, same id.
    s.gateway.faults().repeat_publish_hooks(1);
    assert_eq!(alice.ask("PUB chat/dup :once").await, "OK PUB chat/dup");
    assert_eq!(alice.ask("PUB chat/dup :then").await, "OK PUB chat/dup");
    assert_eq!(carol.line().await, "MSG chat/dup alice :once");
    assert_eq!(carol.line().await, "MSG chat/dup alice :then");

    // Two connects and three message reports, all written...
    hooks_written(&s, 5).await;
    let st = s.adapter.hooks().unwrap().stats();
    assert_eq!((st.queued, st.written), (5, 5), "{st:?}");
    // ...and two messages stored.
    assert_eq!(st.stored, 2, "{st:?}");
    assert_eq!(s.gateway.exhook_stats().unwrap().sent, 5);
    let lines = carol.reply("HISTORY chat/dup").await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(hist(&lines[0]).3, "once");
    assert_eq!(hist(&lines[1]).3, "then");
    assert_eq!(lines[2], "OK HISTORY chat/dup 2");
}

#[tokio::test]
async fn history_needs_a_matching_subscription() {
    let s = Stack::presence(MEMORY).await;
    let mut alice = s.connected("alice").await;
    assert_eq!(alice.ask("PUB chat/lobby :hi").await, "OK PUB chat/lobby");
    hooks_written(&s, 2).await;

    let mut carol = s.connected("carol").await;
    assert_eq!(
        carol.ask("HISTORY chat/lobby").await,
        "ERR 403 :no subscription matches the topic"
    );
    assert_eq!(carol.ask("SUB chat/other").await, "OK SUB chat/other 0");
    assert_eq!(
        carol.ask("HISTORY chat/lobby").await,
        "ERR 403 :no subscription matches the topic"
    );
    assert_eq!(carol.ask("SUB chat/+").await, "OK SUB chat/+ 0");
    let lines = carol.reply("HISTORY chat/lobby").await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(hist(&lines[0]).3, "hi");
    assert_eq!(lines[1], "OK HISTORY chat/lobby 1");
    // Unsubscribed again, refused again.
    assert_eq!(carol.ask("UNSUB chat/+").await, "OK UNSUB chat/+");
    assert_eq!(
        carol.ask("HISTORY chat/lobby").await,
        "ERR 403 :no subscription matches the topic"
    );
}

#[tokio::test]
async fn a_hook_server_that_is_away_holds_up_no_client() {
    // A port nobody listens on.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", gone.local_addr().unwrap());
    drop(gone);
    let s = Stack::start(|g| g.exhook = Some(url), |_| {}).await;
    let mut alice = s.connected("alice").await;
    assert_eq!(alice.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    assert_eq!(alice.ask("PUB chat/lobby :hi").await, "OK PUB chat/lobby");
    assert_eq!(alice.line().await, "MSG chat/lobby alice :hi");
    quit(alice).await;
    let st = s.gateway.exhook_stats().unwrap();
    assert!(!st.loaded, "{st:?}");
    // Never loaded, so nothing was registered and nothing queued.
    assert_eq!((st.sent, st.dropped), (0, 0), "{st:?}");
}

#[tokio::test]
async fn who_and_history_on_postgresql() {
    pg::with_schema("who_and_history_on_postgresql", |url| async move {
        let s = Stack::presence(&url).await;
        let mut alice = s.connected("alice").await;
        let bob = s.connected("bob").await;
        assert_eq!(alice.ask("SUB chat/#").await, "OK SUB chat/# 0");
        assert_eq!(alice.ask("PUB chat/pg :one").await, "OK PUB chat/pg");
        assert_eq!(alice.line().await, "MSG chat/pg alice :one");
        s.gateway.faults().repeat_publish_hooks(1);
        assert_eq!(alice.ask("PUB chat/pg :two").await, "OK PUB chat/pg");
        assert_eq!(alice.line().await, "MSG chat/pg alice :two");
        alice.ask_until("WHO", &["OK WHO 2 :alice bob"]).await;
        quit(bob).await;
        alice.ask_until("WHO", &["OK WHO 1 :alice"]).await;
        hooks_written(&s, 6).await;
        let lines = alice.reply("HISTORY chat/pg").await;
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(hist(&lines[0]).3, "one");
        assert_eq!(hist(&lines[1]).3, "two");
        assert_eq!(lines[2], "OK HISTORY chat/pg 2");
        s.adapter.shutdown().await.unwrap();
    })
    .await;
}
