//! The dev gateway in MQTT mode, against the Mosquitto on 127.0.0.1:1883:
//! chat connections and plain MQTT clients see each other's messages.
//! Skipped (with a message) when no broker listens there, unless
//! EXPROTO_REQUIRE_SERVICES=1 makes that a failure.

mod dev_gateway_support;
mod mqtt_support;

use std::time::Duration;

use dev_gateway_support::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

use mqtt_support::{broker_available as broker_up, BROKER};

async fn broker_available() -> bool {
    broker_up("MQTT mode test").await
}

fn unique() -> String {
    mqtt_support::unique("gwtest")
}

async fn until(el: &mut EventLoop, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    mqtt_support::until(el, WAIT, what, pred).await
}

#[tokio::test]
async fn chat_and_mqtt_clients_see_each_other() {
    if !broker_available().await {
        return;
    }
    let p = unique();
    let s = scripted(|c| c.mqtt = Some(format!("mqtt://{BROKER}"))).await;
    let (mut alice, _) = Client::hello(s.gw.client_addr()).await;
    let (mut bob, _) = Client::hello(s.gw.client_addr()).await;
    assert_eq!(alice.ask(&format!("AUTH {p}-alice")).await, "AUTH 0");
    assert_eq!(bob.ask(&format!("AUTH {p}-bob")).await, "AUTH 0");
    assert_eq!(alice.ask(&format!("SUB {p}/chat/# 1")).await, "SUB 0");

    // Chat to chat, through the broker; the publisher's clientid survives.
    assert_eq!(bob.ask(&format!("PUB {p}/chat/lobby hello")).await, "PUB 0");
    assert_eq!(
        alice.line().await,
        format!("MSG {p}/chat/lobby {p}-bob 0 hello")
    );

    // A plain MQTT client (like mosquitto_sub / mosquitto_pub).
    let mut opts = MqttOptions::new(format!("{p}-mqtt"), "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(30));
    let (mqtt, mut el) = AsyncClient::new(opts, 16);
    mqtt.subscribe(format!("{p}/chat/#"), QoS::AtMostOnce)
        .await
        .unwrap();
    until(&mut el, "SUBACK", |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await;
    assert_eq!(
        bob.ask(&format!("PUB {p}/chat/lobby to all")).await,
        "PUB 0"
    );
    let got = until(&mut el, "chat message over MQTT", |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await;
    let Event::Incoming(Packet::Publish(publish)) = got else {
        unreachable!()
    };
    assert_eq!(publish.topic, format!("{p}/chat/lobby"));
    assert_eq!(&publish.payload[..], b"to all");
    assert_eq!(
        alice.line().await,
        format!("MSG {p}/chat/lobby {p}-bob 0 to all")
    );

    // MQTT to chat: no publisher id in MQTT, so `from` is empty.
    mqtt.publish(
        format!("{p}/chat/mqtt"),
        QoS::AtLeastOnce,
        false,
        "from mqtt",
    )
    .await
    .unwrap();
    until(&mut el, "PUBACK", |e| {
        matches!(e, Event::Incoming(Packet::PubAck(_)))
    })
    .await;
    assert_eq!(
        alice.line().await,
        format!("MSG {p}/chat/mqtt - 1 from mqtt")
    );

    // RawPublish goes through the gateway's own session, from `exproto`.
    assert_eq!(bob.ask(&format!("RAW {p}/chat/sys note")).await, "RAW 0");
    assert_eq!(
        alice.line().await,
        format!("MSG {p}/chat/sys exproto 0 note")
    );

    assert_eq!(alice.ask(&format!("UNSUB {p}/chat/#")).await, "UNSUB 0");
    let _ = mqtt.disconnect().await;
    s.gw.shutdown().await;
}

#[tokio::test]
async fn an_mqtt_client_taking_the_clientid_kicks_the_chat_connection() {
    if !broker_available().await {
        return;
    }
    let p = unique();
    let mut s = scripted(|c| c.mqtt = Some(format!("mqtt://{BROKER}"))).await;
    let (mut chat, conn) = Client::hello(s.gw.client_addr()).await;
    let id = format!("{p}-same");
    assert_eq!(chat.ask(&format!("AUTH {id}")).await, "AUTH 0");
    let (_mqtt, mut el) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", 1883), 16);
    until(&mut el, "CONNACK", |e| {
        matches!(e, Event::Incoming(Packet::ConnAck(_)))
    })
    .await;
    assert_eq!(chat.eof().await, "");
    assert_eq!(s.events.closed(&conn).await, "{shutdown,kicked}");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_broker_fails_the_start() {
    init_tracing();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = exproto_adapter::dev_gateway::GatewayConfig::for_tests("http://127.0.0.1:1");
    cfg.mqtt = Some(format!("mqtt://127.0.0.1:{port}"));
    let err = exproto_adapter::dev_gateway::DevGateway::start(cfg)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MQTT broker"), "{err:#}");
}
