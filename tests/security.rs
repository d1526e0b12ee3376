//! Security properties as tests, through the real server and an in-test
//! EMQX that records every call: nothing but CONNECT, PING, HELP and QUIT
//! before a successful CONNECT; a refused CONNECT grants nothing;
//! passwords never reach the logs; a client acts on its own conn only.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{message, quick_config, Harness};

/// EMQX methods that act for a client; none may run before it is
/// authenticated.
const ACTING: &[&str] = &["Subscribe", "Unsubscribe", "Publish", "StartTimer"];

fn acting_calls(h: &Harness, conn: &str) -> Vec<String> {
    h.emqx
        .calls_for(conn)
        .into_iter()
        .filter(|c| ACTING.contains(&c.method))
        .map(|c| format!("{} {}", c.method, c.detail))
        .collect()
}

#[tokio::test]
async fn only_connect_ping_help_and_quit_work_before_connect() {
    let h = Harness::start().await;
    h.created("c").await;
    h.bytes(
        "c",
        "SUB a/#\nSUB a 1\nUNSUB a\nPUB a :x\nPUB a 1 :x\nWHO\nHISTORY a\n\
         sub b\nPuB b :y\nPING\nHELP\n",
    )
    .await;
    let lines = h.emqx.lines("c", 12).await;
    assert!(
        lines[1..8].iter().all(|l| l == "ERR 401 :not connected"),
        "{lines:?}"
    );
    assert_eq!(lines[8..10], ["ERR 401 :not connected"; 2]);
    assert_eq!(lines[10], "PONG");
    assert!(lines[11].starts_with("OK HELP :"), "{lines:?}");
    h.bytes("c", "QUIT\nSUB a\n").await;
    assert_eq!(h.emqx.lines("c", 13).await[12], "BYE");
    h.emqx.called("c", "Close").await;
    // Only Sends and the Close reached EMQX: no Authenticate, nothing that
    // acts for the client.
    let methods: Vec<_> = h.emqx.calls_for("c").iter().map(|c| c.method).collect();
    assert!(
        methods.iter().all(|m| *m == "Send" || *m == "Close"),
        "{methods:?}"
    );
}

#[tokio::test]
async fn a_refused_or_failed_connect_grants_nothing() {
    let h = Harness::start().await;
    h.created("c").await;
    // Refused by EMQX (username `bad`), failed (clientid `boom`), and
    // EMQX unreachable: each leaves the client not connected.
    h.bytes("c", "CONNECT bad bad pw\nSUB a\nPUB a :x\nUNSUB a\n")
        .await;
    h.bytes("c", "CONNECT boom\nSUB a\nPUB a :x\n").await;
    let lines = h.emqx.lines("c", 8).await;
    assert_eq!(
        lines[1..],
        [
            "ERR 401 :authentication refused",
            "ERR 401 :not connected",
            "ERR 401 :not connected",
            "ERR 401 :not connected",
            "ERR 500 :gateway failed",
            "ERR 401 :not connected",
            "ERR 401 :not connected",
        ]
    );
    h.emqx.set_down(true);
    h.bytes("c", "CONNECT y\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.emqx.set_down(false);
    assert!(h.emqx.lines("c", 9).await[8].starts_with("ERR 503 "));
    h.bytes("c", "SUB a\nPUB a :x\n").await;
    assert_eq!(
        h.emqx.lines("c", 11).await[9..],
        ["ERR 401 :not connected", "ERR 401 :not connected"]
    );
    assert!(
        acting_calls(&h, "c").is_empty(),
        "{:?}",
        acting_calls(&h, "c")
    );
    // The login deadline still runs: a refused CONNECT did not restart it.
    assert_eq!(h.adapter.driver().registry().len(), 1);
}

/// Everything logged by this test binary, at every level (debug, which
/// the issue asks about, and trace too).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn passwords_never_reach_the_logs() {
    const PASSWORD: &str = "Zq7-hunter2-s3cr3t";
    let logs = captured_logs();
    let mut config = quick_config();
    config.protocol.max_line = 64;
    config.driver.send_retry = Duration::from_millis(400);
    let h = Harness::start_with(config).await;
    h.created("c").await;
    // Accepted, refused, failed, over-long and malformed CONNECTs, each
    // with the password.
    h.bytes("c", format!("CONNECT bad bad {PASSWORD}\n")).await;
    h.bytes("c", format!("CONNECT boom boom {PASSWORD}\n"))
        .await;
    h.bytes("c", format!("CONNECT a u {PASSWORD} extra\n"))
        .await;
    h.bytes("c", format!("CONNECT a u {PASSWORD}\\x00\n")).await;
    h.bytes("c", format!("CONNECT a u {PASSWORD}{}\n", "x".repeat(64)))
        .await;
    h.bytes("c", format!("CONNECT alice alice {PASSWORD}\n"))
        .await;
    assert_eq!(h.emqx.lines("c", 7).await[6], "OK CONNECT alice");
    // EMQX unreachable while a password is on its way.
    h.created("d").await;
    h.emqx.lines("d", 1).await;
    h.emqx.set_down(true);
    h.bytes("d", format!("LOGIN u u {PASSWORD}\n")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.emqx.set_down(false);
    // A conn the adapter does not know, sending a password.
    h.bytes("ghost", format!("CONNECT u u {PASSWORD}\n")).await;
    h.emqx.called("ghost", "Close").await;
    // The password did reach EMQX, where it belongs.
    let auth = h.emqx.called("c", "Authenticate").await;
    assert!(auth.detail.contains(PASSWORD));

    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    // The capture works: debug lines of this run are there.
    assert!(text.contains("EMQX call failed"), "nothing captured");
    assert!(text.contains("Authenticate"), "nothing captured");
    for needle in [PASSWORD, "hunter2", "s3cr3t"] {
        assert!(!text.contains(needle), "{needle:?} was logged:\n{text}");
    }
}

#[tokio::test]
async fn every_call_carries_the_conn_of_the_session_that_asked() {
    let h = Harness::start().await;
    h.created("conn-A").await;
    h.created("conn-B").await;
    // Interleaved, and alice names bob's conn and clientid where she can.
    h.bytes("conn-A", "CONNECT alice\n").await;
    h.bytes("conn-B", "CONNECT bob\n").await;
    h.bytes("conn-A", "SUB a/#\nPUB conn-B :x\nCONNECT conn-B\n")
        .await;
    h.bytes("conn-B", "SUB b/#\nPUB b/1 :y\n").await;
    h.bytes("conn-A", "UNSUB conn-B\nPUB bob :z\n").await;
    h.emqx.lines("conn-A", 7).await;
    h.emqx.lines("conn-B", 4).await;
    // A conn that has no session acts for nobody.
    h.bytes("conn-C", "CONNECT mallory\nSUB #\n").await;
    h.emqx.called("conn-C", "Close").await;

    assert_eq!(
        acting_calls(&h, "conn-A"),
        [
            "StartTimer type=0 interval=60",
            "Subscribe a/# qos=0",
            "Publish conn-B qos=0 payload=\"x\"",
            "Unsubscribe conn-B",
            "Publish bob qos=0 payload=\"z\"",
        ]
    );
    assert_eq!(
        acting_calls(&h, "conn-B"),
        [
            "StartTimer type=0 interval=60",
            "Subscribe b/# qos=0",
            "Publish b/1 qos=0 payload=\"y\"",
        ]
    );
    let auths: Vec<_> = h
        .emqx
        .calls()
        .into_iter()
        .filter(|c| c.method == "Authenticate")
        .map(|c| (c.conn, c.detail))
        .collect();
    assert_eq!(
        auths,
        [
            (
                "conn-A".to_string(),
                "proto_name=exproto proto_ver=chat/1 clientid=alice username= password="
                    .to_string()
            ),
            (
                "conn-B".to_string(),
                "proto_name=exproto proto_ver=chat/1 clientid=bob username= password=".to_string()
            ),
        ]
    );
    assert!(acting_calls(&h, "conn-C").is_empty());
    assert_eq!(
        h.emqx.lines("conn-A", 7).await[4],
        "ERR 409 :already connected"
    );

    // Messages for one conn are sent to that conn only.
    h.messages("conn-B", vec![message("b/1", "bob", b"for bob")])
        .await;
    assert_eq!(h.emqx.lines("conn-B", 5).await[4], "MSG b/1 bob :for bob");
    assert!(!String::from_utf8_lossy(&h.emqx.sent("conn-A")).contains("for bob"));
}
