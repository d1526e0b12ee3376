//! MQTT interop through the real adapter: the dev gateway routes through the
//! Mosquitto on 127.0.0.1:1883, so `mosquitto_sub`/`mosquitto_pub` users and
//! chat users see each other. Skipped, saying so, when no broker listens
//! there, unless EXPROTO_REQUIRE_SERVICES=1 makes that a failure.

mod e2e_support;
mod mqtt_support;

use std::time::Duration;

use e2e_support::{Stack, WAIT};
use exproto_adapter::dev_gateway::HandlerMode;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

use mqtt_support::{unique, BROKER};

async fn broker_available() -> bool {
    mqtt_support::broker_available("MQTT interop test").await
}

async fn wait_for(el: &mut EventLoop, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    mqtt_support::until(el, WAIT, what, pred).await
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

async fn interop(mode: HandlerMode) {
    if !broker_available().await {
        return;
    }
    let u = unique("e2e");
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
