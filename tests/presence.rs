//! WHO and HISTORY through the real adapter: EMQX's hooks arrive at the
//! ExHook server (a tonic client plays EMQX), land in SQLite, and a chat
//! client reads them back through the handler service, against the
//! in-test EMQX of `common`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{quick_config, Harness};
use exproto_adapter::exhook::pb::v3;
use exproto_adapter::exhook::HookConfig;
use exproto_adapter::server::{AdapterConfig, PresenceConfig};
use exproto_adapter::store::{Retention, StoreUrl};
use tonic::transport::Channel;

fn presence_config() -> AdapterConfig {
    AdapterConfig {
        presence: Some(PresenceConfig {
            exhook_listen: "127.0.0.1:0".parse().unwrap(),
            store: StoreUrl::new("sqlite::memory:"),
            hooks: HookConfig {
                // The test's timestamps are old; the default age limit
                // would delete them.
                retention: Retention::default(),
                ..HookConfig::default()
            },
            read_timeout: Duration::from_secs(2),
            reconcile: None,
            tls: None,
        }),
        ..quick_config()
    }
}

/// EMQX's side of the hooks.
struct Emqx {
    client: v3::hook_provider_client::HookProviderClient<Channel>,
}

impl Emqx {
    async fn connect(h: &Harness) -> Self {
        let addr = h.adapter.hooks().expect("hooks enabled").addr().unwrap();
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            client: v3::hook_provider_client::HookProviderClient::new(channel),
        }
    }

    fn client(clientid: &str) -> Option<v3::ClientInfo> {
        Some(v3::ClientInfo {
            node: "emqx@127.0.0.1".into(),
            clientid: clientid.into(),
            username: clientid.into(),
            ..Default::default()
        })
    }

    async fn connected(&mut self, clientid: &str) {
        self.client
            .on_client_connected(v3::ClientConnectedRequest {
                clientinfo: Self::client(clientid),
                meta: None,
            })
            .await
            .unwrap();
    }

    async fn disconnected(&mut self, clientid: &str) {
        self.client
            .on_client_disconnected(v3::ClientDisconnectedRequest {
                clientinfo: Self::client(clientid),
                reason: "normal".into(),
                meta: None,
            })
            .await
            .unwrap();
    }

    async fn published(&mut self, id: &str, from: &str, topic: &str, ts: u64, payload: &str) {
        self.client
            .on_message_publish(v3::MessagePublishRequest {
                message: Some(v3::Message {
                    node: "emqx@127.0.0.1".into(),
                    id: id.into(),
                    qos: 0,
                    from: from.into(),
                    topic: topic.into(),
                    payload: Bytes::copy_from_slice(payload.as_bytes()),
                    timestamp: ts,
                    headers: Default::default(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Waits until the hook writer has stored everything it accepted.
async fn settled(h: &Harness) {
    let hooks = h.adapter.hooks().unwrap();
    for _ in 0..2000 {
        if hooks.stats().settled() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("hook records not settled: {:?}", hooks.stats());
}

#[tokio::test]
async fn who_and_history_through_the_handler() {
    let h = Harness::start_with(presence_config()).await;
    let mut emqx = Emqx::connect(&h).await;
    // Messages before the reader connects, one reported twice.
    emqx.published("m1", "bob", "chat/lobby", 1_700_000_000_001, "first")
        .await;
    emqx.published(
        "m2",
        "",
        "chat/lobby",
        1_700_000_000_002,
        "second line\nwrapped",
    )
    .await;
    emqx.published(
        "m2",
        "",
        "chat/lobby",
        1_700_000_000_002,
        "second line\nwrapped",
    )
    .await;
    emqx.published("m3", "bob", "other/topic", 1_700_000_000_003, "not kept")
        .await;
    emqx.connected("alice").await;
    emqx.connected("bob").await;
    settled(&h).await;

    h.created("c1").await;
    h.bytes("c1", "CONNECT carol\nSUB chat/+\nWHO\nHISTORY chat/lobby\n")
        .await;
    let lines = h.emqx.lines("c1", 7).await;
    assert_eq!(
        &lines[1..],
        [
            "OK CONNECT carol",
            "OK SUB chat/+ 0",
            "OK WHO 2 :alice bob",
            "HIST chat/lobby bob 1700000000001 :first",
            "HIST chat/lobby - 1700000000002 :second line\\nwrapped",
            "OK HISTORY chat/lobby 2",
        ]
    );

    emqx.disconnected("bob").await;
    settled(&h).await;
    h.bytes(
        "c1",
        "WHO b\nWHO\nHISTORY chat/lobby 1\nHISTORY other/topic\nHISTORY chat/empty\n",
    )
    .await;
    let lines = h.emqx.lines("c1", 13).await;
    assert_eq!(
        &lines[7..],
        [
            "OK WHO 0 :",
            "OK WHO 1 :alice",
            "HIST chat/lobby - 1700000000002 :second line\\nwrapped",
            "OK HISTORY chat/lobby 1",
            "ERR 403 :no subscription matches the topic",
            "OK HISTORY chat/empty 0",
        ]
    );
    // Neither command is an EMQX call.
    assert!(h.emqx.calls_for("c1").iter().all(|c| [
        "Authenticate",
        "StartTimer",
        "Subscribe",
        "Send"
    ]
    .contains(&c.method)));
    h.adapter.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_the_service_who_and_history_are_501() {
    let h = Harness::start().await;
    assert!(h.adapter.hooks().is_none());
    h.created("c").await;
    h.bytes("c", "CONNECT a\nSUB chat/#\nWHO\nHISTORY chat/a\n")
        .await;
    let lines = h.emqx.lines("c", 5).await;
    assert_eq!(
        &lines[3..],
        ["ERR 501 :not enabled", "ERR 501 :not enabled"]
    );
}
