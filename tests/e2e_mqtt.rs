//! MQTT interop through the real adapter: the dev gateway routes through the
//! Mosquitto on 127.0.0.1:1883, so `mosquitto_sub`/`mosquitto_pub` users and
//! chat users see each other. Skipped, saying so, when no broker listens
//! there, unless EXPROTO_REQUIRE_SERVICES=1 makes that a failure.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Stack, WAIT};
use exproto_adapter::dev_gateway::HandlerMode;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

const BROKER: &str = "127.0.0.1:1883";

async fn broker_available() -> bool {
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
        // Written straight to stderr: the test harness captures eprintln!
        // of passing tests, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: MQTT interop test, no broker on {BROKER} (start one: mosquitto -d)"
        );
    }
    up
}

/// Topics and clientids of this run only, so runs never see each other.
fn unique() -> String {
    format!("e2e-{:08x}", rand::random::<u32>())
}

async fn mqtt_client(id: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 16);
    wait_for(&mut el, "CONNACK", |e| {
        matches!(e, Event::Incoming(Packet::ConnAck(_)))
    })
    .await;
    (client, el)
}

async fn wait_for(el: &mut EventLoop, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    tokio::time::timeout(WAIT, async {
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

async fn interop(mode: HandlerMode) {
    if !broker_available().await {
        return;
    }
    let u = unique();
    let s = Stack::start(
        |g| {
            g.handler_mode = mode;
            g.mqtt = Some(format!("mqtt://{BROKER}"));
        },
        |_| {},
    )
    .await;
    let mut chat = s.connected(&format!("{u}-chat")).await;
    assert_eq!(
        chat.ask(&format!("SUB {u}/from-mqtt")).await,
        format!("OK SUB {u}/from-mqtt 0")
    );

    let (mqtt, mut el) = mqtt_client(&format!("{u}-mqtt")).await;
    mqtt.subscribe(format!("{u}/from-chat"), QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for(&mut el, "SUBACK", |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await;

    // chat -> MQTT
    assert_eq!(
        chat.ask(&format!("PUB {u}/from-chat 1 :hello mqtt")).await,
        format!("OK PUB {u}/from-chat")
    );
    let ev = wait_for(&mut el, "PUBLISH from chat", |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await;
    let Event::Incoming(Packet::Publish(p)) = ev else {
        unreachable!()
    };
    assert_eq!(p.topic, format!("{u}/from-chat"));
    assert_eq!(&p.payload[..], b"hello mqtt");

    // MQTT -> chat; the poll loop keeps the MQTT client's connection going.
    mqtt.publish(
        format!("{u}/from-mqtt"),
        QoS::AtMostOnce,
        false,
        "hello chat",
    )
    .await
    .unwrap();
    let pump = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                break;
            }
        }
    });
    let line = chat.line().await;
    assert!(
        line.starts_with(&format!("MSG {u}/from-mqtt ")) && line.ends_with(" :hello chat"),
        "{line}"
    );
    pump.abort();
}

#[tokio::test]
async fn chat_and_mqtt_clients_see_each_other_unary() {
    interop(HandlerMode::Unary).await;
}

#[tokio::test]
async fn chat_and_mqtt_clients_see_each_other_stream() {
    interop(HandlerMode::Stream).await;
}
