//! The adapter's HTTP listener over real sockets: the JSON API reads what
//! chat clients did through the dev gateway and the hook server; errors
//! are JSON; beyond loopback it needs credentials; /metrics and the page
//! share the port.

mod e2e_support;
#[path = "support/http_get.rs"]
mod http_get;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use e2e_support::{Stack, WAIT};
use exproto_adapter::protocol::Secret;
use exproto_adapter::server::{AdapterConfig, Server};
use exproto_adapter::web::{BasicUser, HttpConfig, PageSettings};
use http_get::get;

fn http(addr: &str) -> HttpConfig {
    HttpConfig {
        addr: addr.parse().unwrap(),
        token: None,
        user: None,
        page: PageSettings::default(),
    }
}

async fn with_http(cfg: HttpConfig) -> (Stack, SocketAddr) {
    let s = Stack::presence_and(
        "sqlite::memory:",
        |_| {},
        |_| {},
        move |_, a| a.http = Some(cfg),
    )
    .await;
    let at = s.adapter.web().expect("the HTTP listener").addr();
    (s, at)
}

/// Polls `path` until its JSON satisfies `ok` (the hook server writes
/// after the fact).
async fn json_until(
    at: SocketAddr,
    path: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = get(at, path, &[]).await;
        let v = r.json();
        if r.status == 200 && ok(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: still {} {v}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn payloads(v: &serde_json::Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn presence_and_history_read_as_json_with_paging_back() {
    let (s, at) = with_http(http("127.0.0.1:0")).await;
    let mut ann = s.connected("ann").await;
    let _bob = s.connected("bob").await;
    for i in 0..5 {
        if i == 3 {
            // m3 and m4 a clear millisecond after m0..m2, for paging by time.
            let t = exproto_adapter::store::now_ms();
            while exproto_adapter::store::now_ms() < t + 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(
            ann.ask(&format!("PUB chat/lobby :m{i}")).await,
            "OK PUB chat/lobby"
        );
    }
    assert_eq!(
        ann.ask("PUB chat/other :elsewhere").await,
        "OK PUB chat/other"
    );

    let who = json_until(at, "/api/v1/presence", |v| v["total"] == 2).await;
    assert_eq!(who["clientids"], serde_json::json!(["ann", "bob"]));
    let only_b = get(at, "/api/v1/presence?prefix=b&limit=5", &[])
        .await
        .json();
    assert_eq!(
        only_b,
        serde_json::json!({"total": 1, "clientids": ["bob"]})
    );

    let all = json_until(at, "/api/v1/history?topic=chat/lobby", |v| {
        v["messages"].as_array().unwrap().len() == 5
    })
    .await;
    assert_eq!(payloads(&all), ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(all["more"], false);
    assert_eq!(all["topic"], "chat/lobby");
    let first = &all["messages"][0];
    assert_eq!(first["from"], "ann");
    assert_eq!(first["qos"], 0);
    assert!(first["timestamp"].as_u64().unwrap() > 0);

    // Newest two, then the two before them by id, then the rest by time.
    let newest = get(at, "/api/v1/history?topic=chat/lobby&n=2", &[])
        .await
        .json();
    assert_eq!(payloads(&newest), ["m3", "m4"]);
    assert_eq!(newest["more"], true);
    let oldest_id = newest["messages"][0]["id"].as_str().unwrap();
    let older = get(
        at,
        &format!("/api/v1/history?topic=chat/lobby&n=2&before_id={oldest_id}"),
        &[],
    )
    .await
    .json();
    assert_eq!(payloads(&older), ["m1", "m2"]);
    assert_eq!(older["more"], true);
    // By time: everything before m3, newest first when cut short.
    let m3_time = all["messages"][3]["timestamp"].as_u64().unwrap();
    let by_time = get(
        at,
        &format!("/api/v1/history?topic=chat/lobby&before_time={m3_time}"),
        &[],
    )
    .await
    .json();
    assert_eq!(payloads(&by_time), ["m0", "m1", "m2"]);
    assert_eq!(by_time["more"], false);
    let by_time = get(
        at,
        &format!("/api/v1/history?topic=chat/lobby&n=2&before_time={m3_time}"),
        &[],
    )
    .await
    .json();
    assert_eq!(payloads(&by_time), ["m1", "m2"]);
    assert_eq!(by_time["more"], true);

    // Exactly the topic asked for: another topic's id finds nothing.
    let other = json_until(at, "/api/v1/history?topic=chat/other", |v| {
        v["messages"].as_array().unwrap().len() == 1
    })
    .await;
    let other_id = other["messages"][0]["id"].as_str().unwrap();
    let leak = get(
        at,
        &format!("/api/v1/history?topic=chat/lobby&before_id={other_id}"),
        &[],
    )
    .await;
    assert_eq!(leak.status, 404, "{}", leak.text());
    assert_eq!(leak.json()["error"], "not_found");

    for (path, status) in [
        ("/api/v1/history", 400),
        ("/api/v1/history?topic=chat/%23", 400),
        ("/api/v1/history?topic=chat/%2B/x", 400),
        ("/api/v1/history?topic=", 400),
        ("/api/v1/history?topic=chat/lobby&n=0", 400),
        ("/api/v1/history?topic=chat/lobby&n=501", 400),
        ("/api/v1/history?topic=chat/lobby&n=x", 400),
        ("/api/v1/history?topic=chat/lobby&limt=3", 400),
        ("/api/v1/history?topic=chat/lobby&before_time=soon", 400),
        (
            "/api/v1/history?topic=chat/lobby&before_id=a&before_time=1",
            400,
        ),
        ("/api/v1/presence?limit=1001", 400),
        ("/api/v2/presence", 404),
    ] {
        let r = get(at, path, &[]).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/json"),
            "{path}"
        );
        assert!(r.json()["message"].as_str().is_some(), "{path}");
    }
    s.gateway.shutdown().await;
}

#[tokio::test]
async fn an_open_listener_refuses_other_host_names() {
    let (s, at) = with_http(http("127.0.0.1:0")).await;
    // A page elsewhere whose name was pointed at 127.0.0.1 (DNS
    // rebinding) sends its own name as Host.
    for path in ["/", "/api/v1/presence", "/api/v1/history?topic=chat/lobby"] {
        let r = get(at, path, &["Host: evil.example:18080"]).await;
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(r.json()["error"], "forbidden");
    }
    for host in ["localhost:18080", "127.0.0.1", "[::1]:1"] {
        let r = get(at, "/api/v1/presence", &[&format!("Host: {host}")]).await;
        assert_eq!(r.status, 200, "{host}");
    }
    // With credentials the name does not matter (a proxy's Host).
    let mut cfg = http("127.0.0.1:0");
    cfg.token = Some(Secret::new("t"));
    let (s2, at2) = with_http(cfg).await;
    let r = get(
        at2,
        "/api/v1/presence",
        &["Host: chat.example.com", "Authorization: Bearer t"],
    )
    .await;
    assert_eq!(r.status, 200);
    s.gateway.shutdown().await;
    s2.gateway.shutdown().await;
}

#[tokio::test]
async fn metrics_and_the_page_share_the_listener() {
    let mut cfg = http("127.0.0.1:0");
    cfg.page.ws_url = Some("ws://emqx.example:8083/mqtt".to_owned());
    let (s, at) = with_http(cfg).await;
    let _ann = s.connected("ann").await;
    let metrics = get(at, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text().contains("exproto_connections"),
        "{}",
        metrics.text()
    );

    let page = get(at, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("/assets/mqtt.min.js"));
    let mqtt_js = get(at, "/assets/mqtt.min.js", &[]).await;
    assert_eq!(mqtt_js.status, 200);
    assert_eq!(
        mqtt_js.body,
        include_bytes!("../web/vendor/mqtt.min.js").to_vec()
    );
    for asset in ["/assets/chat.js", "/assets/chat.css"] {
        assert_eq!(get(at, asset, &[]).await.status, 200, "{asset}");
    }
    let settings = get(at, "/api/v1/page", &[]).await.json();
    assert_eq!(
        settings,
        serde_json::json!({"ws_url": "ws://emqx.example:8083/mqtt", "login": false, "room": "chat/lobby"})
    );
    s.adapter.web().unwrap().set_ws_url(None);
    assert_eq!(
        get(at, "/api/v1/page", &[]).await.json()["ws_url"],
        serde_json::Value::Null
    );
    s.gateway.shutdown().await;
}

#[tokio::test]
async fn configured_credentials_are_required_except_for_metrics() {
    let mut cfg = http("127.0.0.1:0");
    cfg.token = Some(Secret::new("t0ken"));
    cfg.user = Some("ann:pa55".parse::<BasicUser>().unwrap());
    let (s, at) = with_http(cfg).await;
    let basic = |creds: &str| {
        format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
    };
    for path in [
        "/",
        "/api/v1/presence",
        "/api/v1/history?topic=chat/lobby",
        "/api/v1/page",
    ] {
        let r = get(at, path, &[]).await;
        assert_eq!(r.status, 401, "{path}");
        assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
        assert_eq!(r.json()["error"], "unauthorized");
        assert_eq!(
            get(at, path, &["Authorization: Bearer t0ken"]).await.status,
            200,
            "{path}"
        );
        assert_eq!(
            get(at, path, &[&basic("ann:pa55")]).await.status,
            200,
            "{path}"
        );
        assert_eq!(
            get(at, path, &["Authorization: Bearer nope"]).await.status,
            401,
            "{path}"
        );
        assert_eq!(
            get(at, path, &[&basic("ann:wrong")]).await.status,
            401,
            "{path}"
        );
    }
    assert_eq!(get(at, "/metrics", &[]).await.status, 200);
    s.gateway.shutdown().await;
}

#[tokio::test]
async fn without_presence_the_api_says_it_is_off() {
    let s = Stack::start(|_| {}, |a| a.http = Some(http("127.0.0.1:0"))).await;
    let at = s.adapter.web().unwrap().addr();
    let r = get(at, "/api/v1/presence", &[]).await;
    assert_eq!(r.status, 501);
    assert_eq!(r.json()["error"], "not_enabled");
    assert_eq!(get(at, "/", &[]).await.status, 200);
    s.gateway.shutdown().await;
}

#[tokio::test]
async fn an_open_listener_beyond_loopback_or_two_addresses_do_not_start() {
    let cfg = AdapterConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some(http("0.0.0.0:0")),
        ..AdapterConfig::default()
    };
    let err = Server::builder(cfg).start().await.err().expect("refused");
    assert!(err.to_string().contains("--http-token"), "{err}");

    let cfg = AdapterConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some(http("127.0.0.1:0")),
        metrics: Some("127.0.0.1:1".parse().unwrap()),
        ..AdapterConfig::default()
    };
    let err = Server::builder(cfg).start().await.err().expect("refused");
    assert!(err.to_string().contains("serves /metrics too"), "{err}");
}
