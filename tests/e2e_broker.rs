//! The dev gateway's embedded MQTT broker through the real adapter: MQTT
//! clients (3.1.1 and 5, rumqttc) and chat clients in one room, both ways,
//! with the MQTT publisher's clientid as `from`, and MQTT clients in `WHO`
//! and `HISTORY` because the gateway reports them to the hook server as
//! EMQX does. The users file and deny rules bind MQTT clients too.

mod e2e_support;
mod mqtt_support;

use std::net::SocketAddr;
use std::time::Duration;

use e2e_support::{Client, Stack, WAIT};
use exproto_adapter::dev_gateway::{BrokerListen, DevGateway, GatewayConfig, Users};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS};

const STORE: &str = "sqlite::memory:";

fn both_listeners(g: &mut GatewayConfig) {
    g.broker = BrokerListen {
        mqtt: Some("127.0.0.1:0".parse().unwrap()),
        ws: Some("127.0.0.1:0".parse().unwrap()),
    };
}

async fn wait_for(el: &mut EventLoop, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    mqtt_support::until(el, WAIT, what, pred).await
}

fn options(id: &str, at: SocketAddr) -> MqttOptions {
    let mut opts = MqttOptions::new(id, at.ip().to_string(), at.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts
}

/// An MQTT 3.1.1 client that has its CONNACK.
async fn mqtt_client(opts: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut el) = AsyncClient::new(opts, 16);
    wait_for(&mut el, "CONNACK", |e| {
        matches!(e, Event::Incoming(Packet::ConnAck(_)))
    })
    .await;
    (client, el)
}

/// Subscribes and waits for the SUBACK; returns its return codes.
async fn subscribe(
    c: &AsyncClient,
    el: &mut EventLoop,
    filter: &str,
) -> Vec<rumqttc::SubscribeReasonCode> {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    match wait_for(el, "SUBACK", |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    {
        Event::Incoming(Packet::SubAck(ack)) => ack.return_codes,
        _ => unreachable!(),
    }
}

async fn next_payload(el: &mut EventLoop) -> (String, String) {
    match wait_for(el, "PUBLISH", |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    {
        Event::Incoming(Packet::Publish(p)) => (
            p.topic.clone(),
            String::from_utf8(p.payload.to_vec()).unwrap(),
        ),
        _ => unreachable!(),
    }
}

/// Keeps an event loop polled (acks, pings) in the background, until
/// its DISCONNECT is out; then drops it, which closes the socket (rumqttc
/// would keep it open, and the broker counts the client online until it
/// closes).
fn drive(mut el: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
}

/// Asks `cmd` until some reply line contains every one of `parts`.
async fn reply_until(c: &mut Client, cmd: &str, parts: &[&str]) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = c.reply(cmd).await;
        let joined = got.join("\n");
        if parts.iter().all(|p| joined.contains(p)) {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cmd}: still {got:?}, want {parts:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn mqtt_and_chat_clients_share_a_room_with_presence_and_history() {
    let s = Stack::presence_tuned(STORE, both_listeners, |_| {}).await;
    let at = s.gateway.mqtt_addr().expect("the broker listens");
    assert!(s.gateway.ws_addr().is_some());

    let mut ann = s.connected("ann").await;
    assert_eq!(ann.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");

    // MQTT 3.1.1.
    let (bob, mut bob_el) = mqtt_client(options("bob", at)).await;
    assert_eq!(
        subscribe(&bob, &mut bob_el, "chat/lobby").await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    bob.publish("chat/lobby", QoS::AtLeastOnce, false, "hi from mqtt")
        .await
        .unwrap();
    // Polling sends it; bob hears himself too, as MQTT subscribers do.
    assert_eq!(
        next_payload(&mut bob_el).await,
        ("chat/lobby".to_owned(), "hi from mqtt".to_owned())
    );
    assert_eq!(ann.line().await, "MSG chat/lobby bob :hi from mqtt");

    assert_eq!(
        ann.ask("PUB chat/lobby :hi from tcp").await,
        "OK PUB chat/lobby"
    );
    assert_eq!(ann.line().await, "MSG chat/lobby ann :hi from tcp");
    assert_eq!(
        next_payload(&mut bob_el).await,
        ("chat/lobby".to_owned(), "hi from tcp".to_owned())
    );

    // MQTT 5, through a wildcard; EMQX's matching rules on both sides.
    let mut v5 = rumqttc::v5::MqttOptions::new("cat", at.ip().to_string(), at.port());
    v5.set_keep_alive(Duration::from_secs(30));
    let (cat, mut cat_el) = rumqttc::v5::AsyncClient::new(v5, 16);
    loop {
        let ev = tokio::time::timeout(WAIT, cat_el.poll())
            .await
            .expect("v5 CONNACK in time")
            .unwrap();
        if matches!(
            ev,
            rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))
        ) {
            break;
        }
    }
    cat.publish(
        "chat/lobby",
        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        false,
        "hi from v5",
    )
    .await
    .unwrap();
    let _cat_task = tokio::spawn(async move { while cat_el.poll().await.is_ok() {} });
    assert_eq!(ann.line().await, "MSG chat/lobby cat :hi from v5");
    assert_eq!(
        next_payload(&mut bob_el).await,
        ("chat/lobby".to_owned(), "hi from v5".to_owned())
    );
    let bob_task = drive(bob_el);

    // The hook server heard of both MQTT clients and stored their messages.
    reply_until(&mut ann, "WHO", &["OK WHO 3 :ann bob cat"]).await;
    let history = reply_until(
        &mut ann,
        "HISTORY chat/lobby 10",
        &["OK HISTORY chat/lobby 3"],
    )
    .await;
    assert!(
        history[0].starts_with("HIST chat/lobby bob ") && history[0].ends_with(":hi from mqtt")
    );
    assert!(history[1].starts_with("HIST chat/lobby ann ") && history[1].ends_with(":hi from tcp"));
    assert!(history[2].starts_with("HIST chat/lobby cat ") && history[2].ends_with(":hi from v5"));

    // A disconnect reaches presence too.
    bob.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, bob_task).await;
    reply_until(&mut ann, "WHO", &["OK WHO 2 :ann cat"]).await;
    s.gateway.shutdown().await;
}

#[tokio::test]
async fn the_users_file_and_deny_rules_bind_mqtt_clients() {
    let s = Stack::presence_tuned(
        STORE,
        |g| {
            both_listeners(g);
            g.users = Some(Users::parse("ann pw\nbob pw2").unwrap());
            g.deny = vec![
                "publish:chat/secret/#".parse().unwrap(),
                "subscribe:admin/#".parse().unwrap(),
            ];
        },
        |_| {},
    )
    .await;
    let at = s.gateway.mqtt_addr().unwrap();

    let will = |topic: &str| rumqttc::LastWill::new(topic, "gone", QoS::AtMostOnce, false);
    for (who, clientid, creds, last_will) in [
        ("a wrong password", "intruder", Some(("bob", "nope")), None),
        ("no credentials", "intruder", None, None),
        ("an unknown user", "intruder", Some(("eve", "pw")), None),
        // Chat clients meet the same rule: no posting under another name.
        ("another user's clientid", "ann", Some(("bob", "pw2")), None),
        // rmqtt would send a will unchecked: a denied one refuses CONNECT.
        (
            "a will to a denied topic",
            "bob/will",
            Some(("bob", "pw2")),
            Some(will("chat/secret/x")),
        ),
    ] {
        let mut opts = options(clientid, at);
        if let Some((u, p)) = creds {
            opts.set_credentials(u, p);
        }
        if let Some(w) = last_will {
            opts.set_last_will(w);
        }
        let (_c, mut el) = AsyncClient::new(opts, 4);
        let refused = tokio::time::timeout(WAIT, async {
            loop {
                match el.poll().await {
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return code,
                    Err(e) => panic!("{who}: {e}"),
                    Ok(Event::Incoming(Packet::ConnAck(_))) => panic!("{who}: let in"),
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("an answer in time");
        assert!(
            matches!(
                refused,
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
            ),
            "{who}: {refused:?}"
        );
    }

    let mut ann = s.connected_as("CONNECT ann ann pw", "ann").await;
    assert_eq!(ann.ask("SUB chat/#").await, "OK SUB chat/# 0");
    // The username, or the username and a suffix, as for chat clients.
    let mut opts = options("bob/phone", at);
    opts.set_credentials("bob", "pw2");
    opts.set_last_will(will("chat/bob/status"));
    let (_phone, phone_el) = mqtt_client(opts).await;
    let _phone_task = drive(phone_el);
    let mut opts = options("bob", at);
    opts.set_credentials("bob", "pw2");
    let (bob, mut bob_el) = mqtt_client(opts).await;
    assert_eq!(
        subscribe(&bob, &mut bob_el, "admin/#").await,
        [rumqttc::SubscribeReasonCode::Failure]
    );
    // The denied publish goes nowhere; the allowed one after it arrives
    // first, so nothing was merely late.
    bob.publish("chat/secret/plans", QoS::AtMostOnce, false, "hidden")
        .await
        .unwrap();
    bob.publish("chat/open", QoS::AtMostOnce, false, "visible")
        .await
        .unwrap();
    let _bob_task = drive(bob_el);
    assert_eq!(ann.line().await, "MSG chat/open bob :visible");
    ann.ask_until("WHO", &["OK WHO 3 :ann bob bob/phone"]).await;
    ann.silent_for(Duration::from_millis(200)).await;
    s.gateway.shutdown().await;
}

#[tokio::test]
async fn a_taken_port_leaves_that_listener_out_and_the_gateway_runs_on() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = GatewayConfig::for_tests("http://127.0.0.1:1");
    cfg.broker = BrokerListen {
        mqtt: Some(taken.local_addr().unwrap()),
        ws: Some("127.0.0.1:0".parse().unwrap()),
    };
    let gw = DevGateway::start(cfg)
        .await
        .expect("starts without the taken port");
    assert_eq!(gw.mqtt_addr(), None);
    assert!(gw.ws_addr().is_some());
    gw.shutdown().await;

    // Both taken: no broker at all, and still a gateway.
    let taken_too = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = GatewayConfig::for_tests("http://127.0.0.1:1");
    cfg.broker = BrokerListen {
        mqtt: Some(taken.local_addr().unwrap()),
        ws: Some(taken_too.local_addr().unwrap()),
    };
    let gw = DevGateway::start(cfg).await.unwrap();
    assert_eq!((gw.mqtt_addr(), gw.ws_addr()), (None, None));
    gw.shutdown().await;
}

#[tokio::test]
async fn an_external_broker_url_turns_the_embedded_one_off() {
    if !mqtt_support::broker_available("embedded broker off with --mqtt").await {
        return;
    }
    let mut cfg = GatewayConfig::for_tests("http://127.0.0.1:1");
    both_listeners(&mut cfg);
    cfg.mqtt = Some(format!("mqtt://{}", mqtt_support::BROKER));
    let gw = DevGateway::start(cfg).await.unwrap();
    assert_eq!((gw.mqtt_addr(), gw.ws_addr()), (None, None));
    gw.shutdown().await;
}

/// Waits until the hook server has stored a marker message, so that every
/// hook call made before it has been written (they are written in order).
async fn settled(c: &mut Client, marker: &str) {
    // HISTORY reads only topics the client is subscribed to.
    assert_eq!(c.ask("SUB chat/marker").await, "OK SUB chat/marker 0");
    assert_eq!(
        c.ask(&format!("PUB chat/marker :{marker}")).await,
        "OK PUB chat/marker"
    );
    assert_eq!(c.line().await, format!("MSG chat/marker ann :{marker}"));
    reply_until(c, "HISTORY chat/marker 1", &[&format!(":{marker}")]).await;
}

#[tokio::test]
async fn a_takeover_is_reported_as_emqx_reports_it_and_presence_keeps_the_client() {
    let s = Stack::presence_tuned(STORE, both_listeners, |_| {}).await;
    let at = s.gateway.mqtt_addr().unwrap();
    let mut ann = s.connected("ann").await;
    let (_first, mut first_el) = mqtt_client(options("mo", at)).await;
    reply_until(&mut ann, "WHO", &["OK WHO 2 :ann mo"]).await;

    // The same clientid again: the broker closes the first session.
    let (_second, second_el) = mqtt_client(options("mo", at)).await;
    let _second_task = drive(second_el);
    tokio::time::timeout(WAIT, async { while first_el.poll().await.is_ok() {} })
        .await
        .expect("the first session is closed");
    // The old session's end is reported before the new one's start (the
    // broker's unit tests cover a late end), so mo stays online.
    settled(&mut ann, "after-takeover").await;
    assert_eq!(ann.ask("WHO").await, "OK WHO 2 :ann mo");
    s.gateway.shutdown().await;
}

#[tokio::test]
async fn a_reconciliation_keeps_connected_mqtt_clients_and_drops_stale_ones() {
    use exproto_adapter::dev_gateway::ApiListen;
    use exproto_adapter::exhook::{EmqxApi, ReconcileConfig};
    use exproto_adapter::protocol::Secret;
    use exproto_adapter::store::Presence;

    let s = Stack::presence_tuned(
        STORE,
        |g| {
            both_listeners(g);
            g.api = Some(ApiListen {
                addr: "127.0.0.1:0".parse().unwrap(),
                key: "key".into(),
                secret: Secret::new("secret"),
            });
        },
        |_| {},
    )
    .await;
    let at = s.gateway.mqtt_addr().unwrap();
    let mut ann = s.connected("ann").await;
    let (_mo, mo_el) = mqtt_client(options("mo", at)).await;
    let _mo_task = drive(mo_el);
    reply_until(&mut ann, "WHO", &["OK WHO 2 :ann mo"]).await;
    // A client of this node that left unreported.
    s.adapter
        .store()
        .unwrap()
        .presence_upsert(Presence {
            clientid: "ghost".into(),
            username: String::new(),
            node: "emqx@127.0.0.1".into(),
            connected_at_ms: 1,
        })
        .await
        .unwrap();
    assert_eq!(ann.ask("WHO").await, "OK WHO 3 :ann ghost mo");

    let hooks = s.adapter.hooks().unwrap();
    let api = format!("http://{}", s.gateway.api_addr().unwrap());
    hooks.reconcile(ReconcileConfig {
        api: EmqxApi::new(&api, "key", &Secret::new("secret")).unwrap(),
        every: Duration::from_secs(300),
        max_clients: 100_000,
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while hooks.core().last_reconciled_ms().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no reconciliation");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The stand-in lists the broker's MQTT clients as EMQX lists its own.
    assert_eq!(ann.ask("WHO").await, "OK WHO 2 :ann mo");
    s.gateway.shutdown().await;
}
