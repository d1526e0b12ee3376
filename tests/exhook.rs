//! The hook server on port 0, called through tonic clients of both ExHook
//! versions as EMQX calls it, over SQLite in memory (wrapped so that tests
//! can take the database down or stall it).

#[path = "support/reflection.rs"]
mod reflection;
#[path = "support/postgres.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use exproto_adapter::exhook::pb::{v2, v3};
use exproto_adapter::exhook::{HookConfig, Hooks};
use exproto_adapter::store::{self, Fault, FaultyStore, Retention, Store, WhoPage};
use tonic::transport::Channel;

struct Fixture {
    hooks: Hooks,
    /// The store the hooks write to.
    faulty: Arc<FaultyStore>,
    /// The database behind it, to look at while the wrapper is down.
    db: Arc<dyn Store>,
    channel: Channel,
}

/// The defaults, without retention: test messages carry old timestamps,
/// which the default maximum age would delete under the test's feet.
fn config() -> HookConfig {
    HookConfig {
        retention: Retention::default(),
        ..HookConfig::default()
    }
}

impl Fixture {
    async fn start(config: HookConfig) -> Self {
        Self::start_on("sqlite::memory:", config).await
    }

    async fn start_on(url: &str, config: HookConfig) -> Self {
        let db = store::open(url).await.unwrap();
        let faulty = Arc::new(FaultyStore::new(db.clone()));
        let mut hooks = Hooks::start(faulty.clone(), &config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hooks.serve(listener).unwrap();
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            hooks,
            faulty,
            db,
            channel,
        }
    }

    fn v2(&self) -> v2::hook_provider_client::HookProviderClient<Channel> {
        v2::hook_provider_client::HookProviderClient::new(self.channel.clone())
    }

    fn v3(&self) -> v3::hook_provider_client::HookProviderClient<Channel> {
        v3::hook_provider_client::HookProviderClient::new(self.channel.clone())
    }

    /// Waits (up to 10 s) until every queued record is dealt with.
    async fn settled(&self) {
        for _ in 0..2000 {
            if self.hooks.stats().settled() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("hook records not settled: {:?}", self.hooks.stats());
    }

    async fn who(&self) -> WhoPage {
        self.db.presence_list("", 100).await.unwrap()
    }

    async fn history(&self, topic: &str) -> Vec<String> {
        self.db
            .history_newest(topic, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect()
    }
}

fn v3_message(id: &str, topic: &str, payload: &str) -> v3::Message {
    v3::Message {
        node: "emqx@127.0.0.1".into(),
        id: id.into(),
        qos: 1,
        from: "alice".into(),
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        timestamp: 1_700_000_000_000,
        headers: Default::default(),
    }
}

fn v3_publish(id: &str, topic: &str, payload: &str) -> v3::MessagePublishRequest {
    v3::MessagePublishRequest {
        message: Some(v3_message(id, topic, payload)),
        ..Default::default()
    }
}

fn v3_client(clientid: &str, node: &str) -> Option<v3::ClientInfo> {
    Some(v3::ClientInfo {
        node: node.into(),
        clientid: clientid.into(),
        username: format!("u-{clientid}"),
        password: "never stored".into(),
        protocol: "mqtt".into(),
        ..Default::default()
    })
}

fn v2_client(clientid: &str, node: &str) -> Option<v2::ClientInfo> {
    Some(v2::ClientInfo {
        node: node.into(),
        clientid: clientid.into(),
        username: format!("u-{clientid}"),
        protocol: "chat".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn provider_loaded_registers_only_the_hooks_used() {
    let f = Fixture::start(HookConfig {
        history_topics: vec!["chat/#".into(), "news/+".into()],
        ..config()
    })
    .await;
    let want = vec![
        ("client.connected".to_string(), Vec::<String>::new()),
        ("client.disconnected".to_string(), Vec::new()),
        (
            "message.publish".to_string(),
            vec!["chat/#".to_string(), "news/+".to_string()],
        ),
    ];
    let loaded = f
        .v3()
        .on_provider_loaded(v3::ProviderLoadedRequest::default())
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = loaded
        .hooks
        .into_iter()
        .map(|h| (h.name, h.topics))
        .collect();
    assert_eq!(got, want);
    let loaded = f
        .v2()
        .on_provider_loaded(v2::ProviderLoadedRequest::default())
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = loaded
        .hooks
        .into_iter()
        .map(|h| (h.name, h.topics))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn presence_follows_connected_and_disconnected_in_both_versions() {
    let f = Fixture::start(config()).await;
    f.v3()
        .on_client_connected(v3::ClientConnectedRequest {
            clientinfo: v3_client("alice", "emqx@a"),
            meta: None,
        })
        .await
        .unwrap();
    f.v2()
        .on_client_connected(v2::ClientConnectedRequest {
            clientinfo: v2_client("bob", "emqx@b"),
            meta: None,
        })
        .await
        .unwrap();
    f.settled().await;
    let who = f.who().await;
    assert_eq!(who.ids, ["alice", "bob"]);
    assert_eq!(who.total, 2);

    f.v2()
        .on_client_disconnected(v2::ClientDisconnectedRequest {
            clientinfo: v2_client("bob", "emqx@b"),
            reason: "normal".into(),
            meta: None,
        })
        .await
        .unwrap();
    // A disconnect from a node the client no longer is on changes nothing.
    f.v3()
        .on_client_disconnected(v3::ClientDisconnectedRequest {
            clientinfo: v3_client("alice", "emqx@old"),
            reason: "discarded".into(),
            meta: None,
        })
        .await
        .unwrap();
    f.settled().await;
    assert_eq!(f.who().await.ids, ["alice"]);
}

#[tokio::test]
async fn publish_is_answered_unchanged_and_stored_once() {
    let f = Fixture::start(config()).await;
    let answer = f
        .v3()
        .on_message_publish(v3_publish("id1", "chat/lobby", "hello"))
        .await
        .unwrap()
        .into_inner();
    // IGNORE with no value: EMQX keeps the message exactly as it was.
    assert_eq!(
        answer,
        v3::ValuedResponse {
            r#type: v3::valued_response::ResponsedType::Ignore as i32,
            value: None
        }
    );
    // The same id again (two EMQX nodes, a retry): stored once.
    f.v3()
        .on_message_publish(v3_publish("id1", "chat/lobby", "hello"))
        .await
        .unwrap();
    let v2_answer = f
        .v2()
        .on_message_publish(v2::MessagePublishRequest {
            message: Some(v2::Message {
                id: "id2".into(),
                topic: "chat/lobby".into(),
                from: "bob".into(),
                payload: Bytes::from_static(b"hi alice"),
                timestamp: 1_700_000_000_500,
                ..Default::default()
            }),
            meta: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        v2_answer.r#type,
        v2::valued_response::ResponsedType::Ignore as i32
    );
    assert!(v2_answer.value.is_none());
    // Not a history topic: answered the same, not stored.
    f.v3()
        .on_message_publish(v3_publish("id3", "sensors/1", "21.5"))
        .await
        .unwrap();
    f.settled().await;
    assert_eq!(f.history("chat/lobby").await, ["hello", "hi alice"]);
    assert!(f.history("sensors/1").await.is_empty());
    let stats = f.hooks.stats();
    assert_eq!((stats.queued, stats.stored, stats.dropped), (3, 2, 0));
    let stored = f.db.history_newest("chat/lobby", 10).await.unwrap();
    assert_eq!(stored[1].from, "bob");
    assert_eq!(stored[1].timestamp_ms, 1_700_000_000_500);
}

#[tokio::test]
async fn unused_hooks_answer_at_once() {
    let f = Fixture::start(config()).await;
    let mut c = f.v3();
    let auth = c
        .on_client_authenticate(v3::ClientAuthenticateRequest {
            clientinfo: v3_client("x", "n"),
            result: true,
            meta: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        auth.r#type,
        v3::valued_response::ResponsedType::Ignore as i32
    );
    c.on_session_created(v3::SessionCreatedRequest::default())
        .await
        .unwrap();
    c.on_message_delivered(v3::MessageDeliveredRequest::default())
        .await
        .unwrap();
    c.on_provider_unloaded(v3::ProviderUnloadedRequest::default())
        .await
        .unwrap();
    assert_eq!(f.hooks.stats().queued, 0);
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_while_the_store_is_down_or_stalled() {
    for fault in [Fault::Down, Fault::Stalled] {
        let f = Fixture::start(HookConfig {
            batch: 16,
            ..config()
        })
        .await;
        f.faulty.set(fault);
        let mut c = f.v3();
        for i in 0..300 {
            c.on_message_publish(v3_publish(&format!("id{i}"), "chat/t", &format!("m{i}")))
                .await
                .unwrap();
        }
        c.on_client_connected(v3::ClientConnectedRequest {
            clientinfo: v3_client("carol", "n"),
            meta: None,
        })
        .await
        .unwrap();
        let stats = f.hooks.stats();
        assert_eq!((stats.queued, stats.dropped), (301, 0), "{fault:?}");
        assert_eq!(
            stats.written, 0,
            "{fault:?}: nothing written while the store is away"
        );
        assert!(f.history("chat/t").await.is_empty());

        f.faulty.set(Fault::None);
        f.settled().await;
        let want: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
        assert_eq!(f.history("chat/t").await, want, "{fault:?}");
        assert_eq!(f.who().await.ids, ["carol"]);
        let stats = f.hooks.stats();
        assert_eq!(
            (stats.stored, stats.rejected, stats.abandoned),
            (300, 0, 0),
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let f = Fixture::start(HookConfig {
        queue: 10,
        batch: 4,
        ..config()
    })
    .await;
    f.faulty.set(Fault::Stalled);
    let mut c = f.v3();
    for i in 0..40 {
        c.on_message_publish(v3_publish(&format!("id{i}"), "chat/t", &format!("m{i}")))
            .await
            .unwrap();
    }
    let stats = f.hooks.stats();
    assert_eq!(stats.queued + stats.dropped, 40);
    // The queue holds 10 and the writer at most one batch of 4.
    assert!((10..=14).contains(&stats.queued), "{stats:?}");
    f.faulty.set(Fault::None);
    f.settled().await;
    let stats = f.hooks.stats();
    assert_eq!(stats.stored, stats.queued);
    // What was accepted is the oldest part, in order.
    let want: Vec<String> = (0..stats.queued).map(|i| format!("m{i}")).collect();
    assert_eq!(f.history("chat/t").await, want);
}

#[tokio::test]
async fn shutdown_counts_what_a_dead_store_kept_from_being_written() {
    let f = Fixture::start(config()).await;
    f.faulty.set(Fault::Down);
    let mut c = f.v3();
    for i in 0..5 {
        c.on_message_publish(v3_publish(&format!("id{i}"), "chat/t", "x"))
            .await
            .unwrap();
    }
    c.on_client_connected(v3::ClientConnectedRequest {
        clientinfo: v3_client("dave", "n"),
        meta: None,
    })
    .await
    .unwrap();
    let stats = f.hooks.shutdown(Duration::from_millis(200)).await.unwrap();
    // Each record counted once, whatever batch it was in.
    assert_eq!((stats.queued, stats.written, stats.abandoned), (6, 0, 6));
    assert!(stats.settled());
}

#[tokio::test]
async fn shutdown_writes_what_is_queued_when_the_store_works() {
    let f = Fixture::start(config()).await;
    let mut c = f.v2();
    for i in 0..50 {
        c.on_message_publish(v2::MessagePublishRequest {
            message: Some(v2::Message {
                id: format!("id{i}"),
                topic: "chat/t".into(),
                payload: Bytes::from_static(b"x"),
                ..Default::default()
            }),
            meta: None,
        })
        .await
        .unwrap();
    }
    let stats = f.hooks.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!((stats.queued, stats.stored, stats.abandoned), (50, 50, 0));
    assert_eq!(f.db.history_newest("chat/t", 100).await.unwrap().len(), 50);
}

#[tokio::test]
async fn retention_trims_history_in_the_background() {
    let f = Fixture::start(HookConfig {
        retention: Retention {
            max_per_topic: Some(2),
            max_age: None,
        },
        retention_every: Duration::from_millis(20),
        ..config()
    })
    .await;
    let mut c = f.v3();
    for i in 0..5 {
        c.on_message_publish(v3_publish(&format!("id{i}"), "chat/t", &format!("m{i}")))
            .await
            .unwrap();
    }
    f.settled().await;
    for _ in 0..500 {
        if f.history("chat/t").await == ["m3", "m4"] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not trimmed: {:?}", f.history("chat/t").await);
}

#[tokio::test]
async fn a_message_the_database_refuses_is_counted_and_the_rest_stored() {
    // PostgreSQL text cannot hold NUL: that message is refused for good,
    // and must not hold up or sink its neighbours in the same batch.
    support::with_schema("a_message_the_database_refuses", |url| async move {
        let f = Fixture::start_on(&url, config()).await;
        f.faulty.set(Fault::Stalled);
        let mut c = f.v3();
        for (id, from) in [("a", "alice"), ("b", "mal\0lory"), ("c", "carol")] {
            let mut req = v3_publish(id, "chat/t", id);
            if let Some(m) = req.message.as_mut() {
                m.from = from.to_string();
            }
            c.on_message_publish(req).await.unwrap();
        }
        // Released only now, while the writer holds the first message(s)
        // and the queue the rest: the refused one shares a batch.
        f.faulty.set(Fault::None);
        f.settled().await;
        let stats = f.hooks.stats();
        assert_eq!((stats.stored, stats.rejected), (2, 1), "{stats:?}");
        assert_eq!(f.history("chat/t").await, ["a", "c"]);
        f.db.close().await;
    })
    .await;
}

/// Both reflection versions list what the hook port serves, and no more:
/// the handler services live on the handler port.
#[tokio::test]
async fn reflection_lists_exactly_the_hook_providers() {
    let f = Fixture::start(config()).await;
    reflection::assert_reflects(
        &f.channel,
        &[
            "emqx.exhook.v2.HookProvider",
            "emqx.exhook.v3.HookProvider",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ],
        &[
            "emqx.exproto.v1.ConnectionHandler",
            "emqx.exproto.v1.ConnectionUnaryHandler",
            "emqx.exproto.v1.ConnectionAdapter",
            "grpc.health.v1.Health",
        ],
    )
    .await;
}
