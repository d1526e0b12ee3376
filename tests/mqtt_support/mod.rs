//! Shared by the MQTT interop suites: finding the local broker, naming
//! topics per run, and waiting on a plain MQTT client's events.

#![allow(dead_code)]

use std::io::Write;
use std::time::Duration;

use rumqttc::{Event, EventLoop};

/// The machine's Mosquitto.
pub const BROKER: &str = "127.0.0.1:1883";

/// Whether the broker answers. When it does not, the test is skipped and
/// says so, unless EXPROTO_REQUIRE_SERVICES=1 makes that a failure.
pub async fn broker_available(what: &str) -> bool {
    let up = matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(BROKER)
        )
        .await,
        Ok(Ok(_))
    );
    if !up {
        if std::env::var("EXPROTO_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("no MQTT broker on {BROKER} and EXPROTO_REQUIRE_SERVICES=1");
        }
        // Straight to stderr: the harness captures eprintln! of passing
        // tests, and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {what}, no MQTT broker on {BROKER} (start one: mosquitto -d)"
        );
    }
    up
}

/// A prefix that keeps this run's topics and clientids apart from others
/// on the same broker.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// Polls a plain MQTT client's event loop until `pred` matches an event.
pub async fn until(
    el: &mut EventLoop,
    wait: Duration,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    tokio::time::timeout(wait, async {
        loop {
            let ev = el.poll().await.expect("MQTT client failed");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
