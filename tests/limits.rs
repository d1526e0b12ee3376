//! The adapter's limits through the real server and an in-test EMQX:
//! sessions served, publishes per second, EMQX calls pending, and memory
//! that stays bounded whatever a client sends.

mod common;

use std::time::Duration;

use common::{quick_config, Harness};

const HELLO: &str = "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]";

#[tokio::test]
async fn a_socket_over_max_sessions_gets_429_and_is_closed() {
    let mut config = quick_config();
    config.driver.max_sessions = 2;
    let h = Harness::start_with(config).await;
    h.created("a").await;
    h.created("b").await;
    h.created("c").await;
    assert_eq!(
        h.emqx.lines("c", 1).await,
        ["ERR 429 :too many connections"]
    );
    h.emqx.called("c", "Close").await;
    let reg = h.adapter.driver().registry();
    assert_eq!(reg.len(), 2);
    // Bytes for the refused socket find no session; it is not served.
    h.bytes("c", "CONNECT c\n").await;
    h.emqx.lines("c", 2).await;
    assert!(h
        .emqx
        .calls_for("c")
        .iter()
        .all(|c| c.method == "Send" || c.method == "Close"));
    assert_eq!(reg.len(), 2);

    // A session that ends makes room for the next socket.
    h.closed("a", "{shutdown,tcp_closed}").await;
    for _ in 0..1000 {
        if reg.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    h.created("d").await;
    assert_eq!(h.emqx.lines("d", 1).await, [HELLO]);
    assert_eq!(reg.len(), 2);
}

#[tokio::test]
async fn publishes_over_the_rate_get_429() {
    let mut config = quick_config();
    config.protocol.max_publish_rate = 2;
    let h = Harness::start_with(config).await;
    h.created("c").await;
    h.bytes("c", "CONNECT a\nPUB t :1\nPUB t :2\nPUB t :3\n")
        .await;
    assert_eq!(
        h.emqx.lines("c", 5).await[1..],
        [
            "OK CONNECT a",
            "OK PUB t",
            "OK PUB t",
            "ERR 429 :too many publishes per second"
        ]
    );
    // Tokens come back with time.
    tokio::time::sleep(Duration::from_millis(600)).await;
    h.bytes("c", "PUB t :4\n").await;
    assert_eq!(h.emqx.lines("c", 6).await[5], "OK PUB t");
    let publishes = h
        .emqx
        .calls_for("c")
        .iter()
        .filter(|c| c.method == "Publish")
        .count();
    assert_eq!(publishes, 3);
}

#[tokio::test]
async fn emqx_calls_in_flight_never_exceed_max_pending_calls() {
    let mut config = quick_config();
    config.driver.max_pending_calls = 2;
    let h = Harness::start_with(config).await;
    h.emqx.set_slow(Duration::from_millis(200));
    let conns: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    for c in &conns {
        h.created(c).await;
        h.bytes(c, format!("CONNECT {c}\nPUB slow/x :m\n")).await;
    }
    for c in &conns {
        assert_eq!(h.emqx.lines(c, 3).await[2], "OK PUB slow/x");
    }
    let max = h.emqx.state.lock().unwrap().max_in_flight;
    assert!(max <= 2, "{max} slow calls at once");
}

#[tokio::test]
async fn a_call_that_cannot_get_a_place_in_time_is_a_503() {
    let mut config = quick_config();
    config.driver.max_pending_calls = 1;
    config.driver.pending_wait = Duration::from_millis(100);
    let h = Harness::start_with(config).await;
    h.emqx.set_slow(Duration::from_millis(1500));
    h.created("a").await;
    h.created("b").await;
    h.bytes("a", "CONNECT a\n").await;
    h.bytes("b", "CONNECT b\n").await;
    h.emqx.lines("a", 2).await;
    h.emqx.lines("b", 2).await;
    h.bytes("a", "SUB slow/a\n").await;
    h.emqx.called("a", "Subscribe").await;
    h.bytes("b", "SUB x\n").await;
    assert_eq!(h.emqx.lines("b", 3).await[2], "ERR 503 :emqx unreachable");
    assert_eq!(h.emqx.lines("a", 3).await[2], "OK SUB slow/a 0");
}

#[tokio::test]
async fn a_flood_without_lf_keeps_memory_bounded() {
    let mut config = quick_config();
    config.protocol.max_line = 1024;
    let h = Harness::start_with(config).await;
    h.created("c").await;
    // 8 MiB without an LF in 64 KiB chunks: one 413, nothing buffered.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..128 {
        h.bytes("c", &chunk).await;
    }
    h.bytes("c", "\nPING\n").await;
    assert_eq!(
        h.emqx.lines("c", 3).await,
        [HELLO, "ERR 413 :line too long", "PONG"]
    );
}

#[tokio::test]
async fn binary_junk_and_tiny_lines_get_one_reply_each() {
    let h = Harness::start().await;
    h.created("c").await;
    // Ten thousand one-byte lines in one chunk, then binary junk.
    h.bytes("c", "x\n".repeat(10_000)).await;
    let junk: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    h.bytes("c", &junk).await;
    h.bytes("c", "\nPING\n").await;
    let lines = h.emqx.lines("c", 10_001).await;
    assert!(lines[1..10_001]
        .iter()
        .all(|l| l == "ERR 400 :unknown command"));
    let lines = h.emqx.lines("c", 10_001 + 17).await;
    assert_eq!(lines.last().map(String::as_str), Some("PONG"));
}
