//! The storage suite: one async function per behaviour, run against SQLite
//! (a fresh file each) and against PostgreSQL (a fresh schema each, dropped
//! afterwards, so parallel runs do not collide).
//!
//! PostgreSQL is the machine's server (`postgres://postgres@127.0.0.1:5432/test`,
//! or `EXPROTO_TEST_POSTGRES`). When it cannot be reached its tests say
//! they were skipped, unless `EXPROTO_REQUIRE_SERVICES=1`, which makes them
//! fail: CI runs against the real server and never skips.

#[path = "support/postgres.rs"]
mod support;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use exproto_adapter::store::{
    self, HistoryCursor, Presence, Retention, Store, StoredMessage, WhoPage,
};
use futures::FutureExt;
use support::unique_name;

/// A database for one test: its URL (to open it again) and an open store.
struct Target {
    url: String,
    store: Arc<dyn Store>,
}

/// Runs `test` on a fresh SQLite file, removed afterwards.
async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Target) -> Fut,
    Fut: Future<Output = ()>,
{
    let path: PathBuf = std::env::temp_dir().join(format!("{}.db", unique_name()));
    let url = format!("sqlite:{}", path.display());
    let store = store::open(&url).await.expect("open sqlite");
    let outcome = std::panic::AssertUnwindSafe(test(Target {
        url,
        store: store.clone(),
    }))
    .catch_unwind()
    .await;
    store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `test` in a fresh PostgreSQL schema (see `support/postgres.rs`).
async fn on_postgres<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Target) -> Fut,
    Fut: Future<Output = ()>,
{
    support::with_schema(&format!("postgres::{name}"), |url| async move {
        let store = store::open(&url).await.expect("open postgres");
        let outcome = std::panic::AssertUnwindSafe(test(Target {
            url,
            store: store.clone(),
        }))
        .catch_unwind()
        .await;
        store.close().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    })
    .await;
}

/// One `#[tokio::test]` per behaviour and database.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::on_sqlite(super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::on_postgres(stringify!($name), super::$name).await;
                }
            )*
        }
    };
}

suite!(
    presence_is_upserted_listed_and_removed,
    a_node_is_cleared_of_clients_from_before_a_time,
    reconciliation_reads_removes_and_adds_without_overwriting,
    who_lists_in_byte_order_with_the_total,
    who_prefixes_are_literal,
    history_ignores_a_duplicate_id,
    history_gives_the_newest_oldest_first,
    history_keeps_every_byte,
    history_pages_back_by_id_or_time_within_one_topic,
    retention_caps_each_topic,
    retention_drops_old_messages,
    reopening_migrates_nothing_twice,
);

fn presence(clientid: &str, node: &str) -> Presence {
    Presence {
        clientid: clientid.into(),
        username: format!("user-{clientid}"),
        node: node.into(),
        connected_at_ms: 1_700_000_000_000,
    }
}

fn msg(id: &str, topic: &str, ts: u64, payload: &str) -> StoredMessage {
    StoredMessage {
        id: id.into(),
        topic: topic.into(),
        from: "alice".into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: 1,
        timestamp_ms: ts,
    }
}

fn page(total: u64, ids: &[&str]) -> WhoPage {
    WhoPage {
        total,
        ids: ids.iter().map(|s| s.to_string()).collect(),
    }
}

async fn payloads(s: &dyn Store, topic: &str, n: usize) -> Vec<String> {
    s.history_newest(topic, n)
        .await
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect()
}

async fn presence_is_upserted_listed_and_removed(t: Target) {
    let s = &*t.store;
    assert_eq!(s.presence_list("", 100).await.unwrap(), page(0, &[]));
    s.presence_upsert(presence("bob", "n1")).await.unwrap();
    s.presence_upsert(presence("alice", "n1")).await.unwrap();
    assert_eq!(
        s.presence_list("", 100).await.unwrap(),
        page(2, &["alice", "bob"])
    );
    // Reconnecting replaces the row (here on another node).
    s.presence_upsert(presence("bob", "n2")).await.unwrap();
    assert_eq!(s.presence_list("", 100).await.unwrap().total, 2);
    // The old connection's disconnect, from the old node, leaves it.
    s.presence_remove("bob", "n1").await.unwrap();
    assert_eq!(
        s.presence_list("", 100).await.unwrap(),
        page(2, &["alice", "bob"])
    );
    s.presence_remove("bob", "n2").await.unwrap();
    assert_eq!(s.presence_list("", 100).await.unwrap(), page(1, &["alice"]));
    // Removing what is not there is no error.
    s.presence_remove("nobody", "n1").await.unwrap();
}

async fn a_node_is_cleared_of_clients_from_before_a_time(t: Target) {
    let s = &*t.store;
    let at = |clientid: &str, node: &str, ms: u64| Presence {
        connected_at_ms: ms,
        ..presence(clientid, node)
    };
    s.presence_upsert(at("old", "n1", 1_000)).await.unwrap();
    s.presence_upsert(at("edge", "n1", 2_000)).await.unwrap();
    s.presence_upsert(at("new", "n1", 3_000)).await.unwrap();
    s.presence_upsert(at("other", "n2", 1_000)).await.unwrap();
    assert_eq!(s.presence_clear_node("n1", 2_000).await.unwrap(), 1);
    assert_eq!(
        s.presence_list("", 100).await.unwrap(),
        page(3, &["edge", "new", "other"]),
        "strictly before the time, and only that node's"
    );
    assert_eq!(s.presence_clear_node("n3", u64::MAX).await.unwrap(), 0);
    assert_eq!(s.presence_clear_node("n1", 10_000).await.unwrap(), 2);
    assert_eq!(s.presence_list("", 100).await.unwrap(), page(1, &["other"]));
}

async fn reconciliation_reads_removes_and_adds_without_overwriting(t: Target) {
    let s = &*t.store;
    let at = |clientid: &str, node: &str, ms: u64| Presence {
        connected_at_ms: ms,
        ..presence(clientid, node)
    };
    s.presence_upsert(at("b", "n1", 1_000)).await.unwrap();
    s.presence_upsert(at("a", "n1", 3_000)).await.unwrap();
    s.presence_upsert(at("c", "n2", 1_000)).await.unwrap();
    assert_eq!(
        s.presence_of_node("n1", 10).await.unwrap(),
        [at("a", "n1", 3_000), at("b", "n1", 1_000)]
    );
    assert_eq!(s.presence_of_node("n1", 1).await.unwrap().len(), 1);
    // A connect newer than the reconciliation's look is kept.
    assert!(!s.presence_remove_before("a", "n1", 2_000).await.unwrap());
    assert!(!s.presence_remove_before("b", "n2", 2_000).await.unwrap());
    assert!(s.presence_remove_before("b", "n1", 2_000).await.unwrap());
    // A row a connect wrote is not overwritten.
    assert!(!s.presence_insert_absent(at("a", "n9", 9)).await.unwrap());
    assert!(s
        .presence_insert_absent(at("d", "n1", 5_000))
        .await
        .unwrap());
    assert_eq!(
        s.presence_of_node("n1", 10).await.unwrap(),
        [at("a", "n1", 3_000), at("d", "n1", 5_000)]
    );
}

async fn who_lists_in_byte_order_with_the_total(t: Target) {
    let s = &*t.store;
    // Byte order: upper case before lower case, ASCII before multi-byte.
    for id in ["zed", "b", "B", "a b", "ab", "é", "a", "_x", "10", "9"] {
        s.presence_upsert(presence(id, "n1")).await.unwrap();
    }
    assert_eq!(
        s.presence_list("", 100).await.unwrap(),
        page(
            10,
            &["10", "9", "B", "_x", "a", "a b", "ab", "b", "zed", "é"]
        )
    );
    assert_eq!(
        s.presence_list("", 3).await.unwrap(),
        page(10, &["10", "9", "B"])
    );
    assert_eq!(
        s.presence_list("a", 2).await.unwrap(),
        page(3, &["a", "a b"])
    );
    assert_eq!(s.presence_list("a", 0).await.unwrap(), page(3, &[]));
    assert_eq!(s.presence_list("é", 100).await.unwrap(), page(1, &["é"]));
    assert_eq!(s.presence_list("c", 100).await.unwrap(), page(0, &[]));
}

async fn who_prefixes_are_literal(t: Target) {
    let s = &*t.store;
    for id in ["a%b", "axb", "a_b", "A%B", "a\\b"] {
        s.presence_upsert(presence(id, "n1")).await.unwrap();
    }
    // `%` and `_` are LIKE's wildcards; here they are plain characters, and
    // case matters.
    assert_eq!(s.presence_list("a%", 100).await.unwrap(), page(1, &["a%b"]));
    assert_eq!(s.presence_list("a_", 100).await.unwrap(), page(1, &["a_b"]));
    assert_eq!(
        s.presence_list("a\\", 100).await.unwrap(),
        page(1, &["a\\b"])
    );
    assert_eq!(s.presence_list("A", 100).await.unwrap(), page(1, &["A%B"]));
}

async fn history_ignores_a_duplicate_id(t: Target) {
    let s = &*t.store;
    let first = [msg("id1", "t", 1, "one"), msg("id2", "t", 2, "two")];
    assert_eq!(s.history_insert(&first).await.unwrap(), 2);
    // Seen again, alone or beside a new one, and twice in one batch.
    assert_eq!(s.history_insert(&first[..1]).await.unwrap(), 0);
    let again = [
        msg("id2", "t", 2, "two again"),
        msg("id3", "t", 3, "three"),
        msg("id3", "t", 3, "three again"),
    ];
    assert_eq!(s.history_insert(&again).await.unwrap(), 1);
    assert_eq!(payloads(s, "t", 100).await, ["one", "two", "three"]);
    // Messages without an id are never taken for duplicates.
    let anonymous = [msg("", "t", 4, "anon"), msg("", "t", 4, "anon")];
    assert_eq!(s.history_insert(&anonymous).await.unwrap(), 2);
    assert_eq!(s.history_newest("t", 100).await.unwrap().len(), 5);
    assert_eq!(s.history_insert(&[]).await.unwrap(), 0);
}

async fn history_gives_the_newest_oldest_first(t: Target) {
    let s = &*t.store;
    let batch: Vec<StoredMessage> = (0..30)
        .map(|i| msg(&format!("a{i}"), "chat/a", 1_000 + i, &format!("m{i}")))
        .collect();
    s.history_insert(&batch).await.unwrap();
    s.history_insert(&[msg("b0", "chat/b", 5_000, "other topic")])
        .await
        .unwrap();
    let want: Vec<String> = (10..30).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(s, "chat/a", 20).await, want);
    assert_eq!(payloads(s, "chat/a", 1).await, ["m29"]);
    assert_eq!(payloads(s, "chat/a", 100).await.len(), 30);
    assert_eq!(payloads(s, "chat/b", 100).await, ["other topic"]);
    assert!(s.history_newest("chat/none", 20).await.unwrap().is_empty());
    // Same timestamp: the order they were stored in. An older timestamp
    // stored later still sorts by time.
    s.history_insert(&[msg("c1", "c", 7, "first"), msg("c2", "c", 7, "second")])
        .await
        .unwrap();
    s.history_insert(&[msg("c3", "c", 7, "third"), msg("c0", "c", 6, "zeroth")])
        .await
        .unwrap();
    assert_eq!(
        payloads(s, "c", 10).await,
        ["zeroth", "first", "second", "third"]
    );
    assert_eq!(payloads(s, "c", 2).await, ["second", "third"]);
}

async fn history_pages_back_by_id_or_time_within_one_topic(t: Target) {
    let s = &*t.store;
    // Two share a timestamp, so paging by id must also use the stored order.
    let batch = [
        msg("a0", "chat/a", 1_000, "m0"),
        msg("a1", "chat/a", 2_000, "m1"),
        msg("a2", "chat/a", 2_000, "m2"),
        msg("a3", "chat/a", 3_000, "m3"),
        msg("b0", "chat/b", 1_500, "other"),
    ];
    s.history_insert(&batch).await.unwrap();
    let texts = |page: Option<Vec<StoredMessage>>| -> Vec<String> {
        page.expect("a page")
            .into_iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect()
    };
    let by_id = |id: &str| HistoryCursor::Id(id.to_owned());
    assert_eq!(
        texts(s.history_before("chat/a", 10, &by_id("a3")).await.unwrap()),
        ["m0", "m1", "m2"]
    );
    assert_eq!(
        texts(s.history_before("chat/a", 1, &by_id("a3")).await.unwrap()),
        ["m2"]
    );
    assert_eq!(
        texts(s.history_before("chat/a", 10, &by_id("a2")).await.unwrap()),
        ["m0", "m1"]
    );
    assert!(texts(s.history_before("chat/a", 10, &by_id("a0")).await.unwrap()).is_empty());
    assert_eq!(
        texts(
            s.history_before("chat/a", 10, &HistoryCursor::Time(2_000))
                .await
                .unwrap()
        ),
        ["m0"]
    );
    assert_eq!(
        texts(
            s.history_before("chat/a", 2, &HistoryCursor::Time(9_000))
                .await
                .unwrap()
        ),
        ["m2", "m3"]
    );
    // Another topic's id names nothing here, and its messages never show.
    assert_eq!(
        s.history_before("chat/a", 10, &by_id("b0")).await.unwrap(),
        None
    );
    assert_eq!(
        s.history_before("chat/a", 10, &by_id("nope"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        texts(s.history_before("chat/b", 10, &by_id("b0")).await.unwrap()),
        Vec::<String>::new()
    );
}

async fn history_keeps_every_byte(t: Target) {
    let s = &*t.store;
    let all: Vec<u8> = (0..=255).collect();
    let m = StoredMessage {
        id: "0005F8F6B1C2D3E4F3A5000012340000".into(),
        topic: "chat/ü b".into(),
        from: String::new(),
        payload: Bytes::from(all),
        qos: 2,
        timestamp_ms: 1_700_000_000_123,
    };
    s.history_insert(std::slice::from_ref(&m)).await.unwrap();
    let empty = StoredMessage {
        id: "e".into(),
        payload: Bytes::new(),
        qos: 0,
        timestamp_ms: 1_700_000_000_124,
        ..m.clone()
    };
    s.history_insert(std::slice::from_ref(&empty))
        .await
        .unwrap();
    assert_eq!(
        s.history_newest("chat/ü b", 10).await.unwrap(),
        vec![m, empty]
    );
}

async fn retention_caps_each_topic(t: Target) {
    let s = &*t.store;
    let a: Vec<StoredMessage> = (0..10)
        .map(|i| msg(&format!("a{i}"), "a", 100 + i, &format!("a{i}")))
        .collect();
    let b: Vec<StoredMessage> = (0..3)
        .map(|i| msg(&format!("b{i}"), "b", 100 + i, &format!("b{i}")))
        .collect();
    s.history_insert(&a).await.unwrap();
    s.history_insert(&b).await.unwrap();
    let cap = Retention {
        max_per_topic: Some(5),
        max_age: None,
    };
    assert_eq!(s.prune(cap, 200).await.unwrap(), 5);
    assert_eq!(payloads(s, "a", 100).await, ["a5", "a6", "a7", "a8", "a9"]);
    assert_eq!(payloads(s, "b", 100).await, ["b0", "b1", "b2"]);
    assert_eq!(s.prune(cap, 200).await.unwrap(), 0);
    assert_eq!(s.prune(Retention::default(), 200).await.unwrap(), 0);
}

async fn retention_drops_old_messages(t: Target) {
    let s = &*t.store;
    let now = 1_700_000_100_000;
    let batch = [
        msg("old", "t", now - 60_000, "old"),
        msg("edge", "t", now - 30_000, "edge"),
        msg("new", "t", now - 1_000, "new"),
        msg("other", "u", now - 90_000, "other old"),
    ];
    s.history_insert(&batch).await.unwrap();
    let r = Retention {
        max_per_topic: None,
        max_age: Some(Duration::from_secs(30)),
    };
    assert_eq!(s.prune(r, now).await.unwrap(), 2);
    assert_eq!(payloads(s, "t", 100).await, ["edge", "new"]);
    assert!(payloads(s, "u", 100).await.is_empty());
    // Both limits at once.
    let both = Retention {
        max_per_topic: Some(1),
        max_age: Some(Duration::from_secs(30)),
    };
    assert_eq!(s.prune(both, now).await.unwrap(), 1);
    assert_eq!(payloads(s, "t", 100).await, ["new"]);
}

async fn reopening_migrates_nothing_twice(t: Target) {
    t.store
        .history_insert(&[msg("x", "t", 1, "kept")])
        .await
        .unwrap();
    t.store
        .presence_upsert(presence("alice", "n1"))
        .await
        .unwrap();
    // A second adapter on the same database: the schema is already there.
    let again = store::open(&t.url).await.expect("reopen");
    assert_eq!(payloads(&*again, "t", 10).await, ["kept"]);
    assert_eq!(again.presence_list("", 10).await.unwrap().total, 1);
    again.close().await;
}

/// With `sslmode=require` in the URL the store reaches PostgreSQL over TLS
/// (the driver refuses to go on without it). Skipped, and said so, when
/// the server has TLS off.
#[tokio::test]
async fn postgres_over_tls() {
    support::with_schema("postgres_over_tls", |url| async move {
        use sqlx::Connection;
        let mut plain = sqlx::PgConnection::connect(&url).await.expect("connect");
        let ssl: String = sqlx::query_scalar("SHOW ssl")
            .fetch_one(&mut plain)
            .await
            .expect("SHOW ssl");
        if ssl != "on" {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED postgres_over_tls: the server has ssl = {ssl}"
            );
            return;
        }
        let store = store::open(&format!("{url}&sslmode=require"))
            .await
            .expect("open postgres with sslmode=require");
        store
            .presence_upsert(presence("alice", "n1"))
            .await
            .unwrap();
        assert_eq!(store.presence_list("", 10).await.unwrap().total, 1);
        store.close().await;
    })
    .await;
}
