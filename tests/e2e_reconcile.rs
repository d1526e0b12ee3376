//! Presence after the adapter itself was away: the dev gateway (EMQX) keeps
//! running while the adapter (handler and hook server) stops; a client
//! disconnects meanwhile, its disconnect lost with the hook server. A new
//! adapter on the same store and ports, given EMQX's REST API (the
//! gateway's stand-in), reconciles at start: the client that left is no
//! longer listed, the one that stayed still is. Without the API the row
//! would stay until that client connects again. On SQLite and PostgreSQL.

mod e2e_support;
#[path = "support/postgres.rs"]
mod pg;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use e2e_support::{Client, HELLO};
use exproto_adapter::dev_gateway::{ApiListen, DevGateway, GatewayConfig};
use exproto_adapter::emqx::GrpcAdapter;
use exproto_adapter::exhook::{EmqxApi, HookConfig, ReconcileConfig};
use exproto_adapter::protocol::Secret;
use exproto_adapter::server::{AdapterConfig, PresenceConfig, RunningAdapter, Server};
use exproto_adapter::store::StoreUrl;
use tokio::net::TcpListener;

struct Ports {
    handler: SocketAddr,
    hooks: SocketAddr,
    /// Both listeners, bound when the ports were picked and held until the
    /// first adapter takes them, so nothing else gets those ports between.
    held: std::sync::Mutex<Option<(TcpListener, TcpListener)>>,
}

/// Binds `at` again after an adapter that held it stopped. An outgoing
/// connection of this process may hold that port number for a moment
/// (the OS hands out freed ports), so a refusal is tried again, bounded.
async fn rebind(at: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(at).await {
            Ok(l) => return l,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {at} again: {e}"),
        }
    }
}

async fn adapter(gw: &DevGateway, ports: &Ports, store: &str, api: Option<&str>) -> RunningAdapter {
    let reconcile = api.map(|url| ReconcileConfig {
        api: EmqxApi::new(url, "key", &Secret::new("secret")).unwrap(),
        every: Duration::from_secs(3600),
        max_clients: 1000,
    });
    let config = AdapterConfig {
        listen: ports.handler,
        emqx: format!("http://{}", gw.adapter_addr()),
        call_timeout: Duration::from_secs(2),
        presence: Some(PresenceConfig {
            exhook_listen: ports.hooks,
            store: StoreUrl::new(store),
            hooks: HookConfig::default(),
            read_timeout: Duration::from_secs(2),
            reconcile,
            tls: None,
        }),
        ..AdapterConfig::default()
    };
    let emqx = GrpcAdapter::new(&config.emqx, config.call_timeout).unwrap();
    // The first adapter takes the listeners held since the ports were
    // picked; a later one binds the ports the previous one left.
    let held = ports.held.lock().unwrap().take();
    let (handler, hooks) = match held {
        Some(both) => both,
        None => (rebind(ports.handler).await, rebind(ports.hooks).await),
    };
    Server::builder(config)
        .handler_listener(handler)
        .hook_listener(hooks)
        .emqx(Arc::new(emqx))
        .start()
        .await
        .unwrap()
}

/// The dev gateway with its REST API stand-in (key `key`, secret
/// `secret`), reporting to a hook server on `ports.hooks` if `hooks`; the
/// adapter's ports are free for [`adapter`]. Returns the API's URL too.
async fn gateway(hooks: bool) -> (DevGateway, Ports, String) {
    let handler = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ports = Ports {
        handler: handler.local_addr().unwrap(),
        hooks: hook_listener.local_addr().unwrap(),
        held: std::sync::Mutex::new(Some((handler, hook_listener))),
    };
    let mut gcfg = GatewayConfig::for_tests(format!("http://{}", ports.handler));
    if hooks {
        gcfg.exhook = Some(format!("http://{}", ports.hooks));
    }
    gcfg.api = Some(ApiListen {
        addr: "127.0.0.1:0".parse().unwrap(),
        key: "key".into(),
        secret: Secret::new("secret"),
    });
    let gw = DevGateway::start(gcfg).await.unwrap();
    let api = format!("http://{}", gw.api_addr().unwrap());
    (gw, ports, api)
}

async fn connect(gw: &DevGateway, clientid: &str) -> Client {
    let mut c = Client::connect(gw.client_addr()).await;
    assert_eq!(c.line().await, HELLO);
    assert_eq!(
        c.ask(&format!("CONNECT {clientid}")).await,
        format!("OK CONNECT {clientid}")
    );
    c
}

async fn a_client_that_left_while_the_adapter_was_away_is_forgotten(store: &str) {
    let (gw, ports, api) = gateway(true).await;

    let first = adapter(&gw, &ports, store, None).await;
    let mut ann = connect(&gw, "ann").await;
    let _ben = connect(&gw, "ben").await;
    ann.ask_until("WHO", &["OK WHO 2 :ann ben"]).await;
    // The adapter stops; nothing reaches it until the next one is up.
    first.shutdown().await.unwrap();
    ann.shutdown_write().await;
    ann.eof().await;
    // The gateway noticed ann go (its disconnect hook had nowhere to go).
    let deadline = tokio::time::Instant::now() + e2e_support::WAIT;
    while gw.connection_count() > 1 {
        assert!(tokio::time::Instant::now() < deadline, "ann never left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let _second = adapter(&gw, &ports, store, Some(&api)).await;
    let mut cat = connect(&gw, "cat").await;
    cat.ask_until("WHO", &["OK WHO 2 :ben cat"]).await;
}

#[tokio::test]
async fn sqlite_a_client_that_left_while_the_adapter_was_away_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("presence.db").display());
    a_client_that_left_while_the_adapter_was_away_is_forgotten(&store).await;
}

#[tokio::test]
async fn postgres_a_client_that_left_while_the_adapter_was_away_is_forgotten() {
    pg::with_schema("postgres_a_client_that_left", |url| async move {
        a_client_that_left_while_the_adapter_was_away_is_forgotten(&url).await;
    })
    .await;
}

/// The stand-in answers as EMQX: a wrong secret is refused, and a
/// logged-in client is listed on its node only, page by page.
#[tokio::test]
async fn the_rest_api_stand_in_lists_logged_in_clients_to_the_right_key() {
    let (gw, ports, url) = gateway(false).await;
    let wrong = EmqxApi::new(&url, "key", &Secret::new("guess")).unwrap();
    let e = format!("{:#}", wrong.nodes().await.unwrap_err());
    assert!(
        e.contains("401") && e.contains("BAD_API_KEY_OR_SECRET"),
        "{e}"
    );

    let _adapter = adapter(&gw, &ports, "sqlite::memory:", None).await;
    let _ann = connect(&gw, "ann").await;
    let _ben = connect(&gw, "ben").await;
    let api = EmqxApi::new(&url, "key", &Secret::new("secret")).unwrap();
    let node = api.nodes().await.unwrap();
    assert_eq!(node, ["emqx@127.0.0.1"]);
    let listed = api.connected(&node[0], 1000).await.unwrap();
    assert!(listed.complete);
    let mut ids: Vec<&String> = listed.clients.keys().collect();
    ids.sort();
    assert_eq!(ids, ["ann", "ben"]);
    assert!(api
        .connected("emqx@elsewhere", 1000)
        .await
        .unwrap()
        .clients
        .is_empty());
    let capped = api.connected(&node[0], 1).await.unwrap();
    assert!(!capped.complete, "more clients than one pass reads");
}

/// A client that connects while EMQX's list is on its way is missing from
/// that list, yet connected: the reconciliation must keep its row.
async fn a_connect_racing_a_reconciliation_is_kept(store: &str) {
    let (gw, ports, api) = gateway(true).await;
    let running = adapter(&gw, &ports, store, Some(&api)).await;
    let core = running.hooks().unwrap().core().clone();
    let reconciled_after = |before: Option<u64>| {
        let core = core.clone();
        async move {
            let deadline = tokio::time::Instant::now() + e2e_support::WAIT;
            loop {
                let now = core.last_reconciled_ms();
                if now.is_some() && now != before {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "no reconciliation");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // The pass at start (a one-node cluster) is over.
    reconciled_after(None).await;
    let mut ann = connect(&gw, "ann").await;
    ann.ask_until("WHO", &["OK WHO 1 :ann"]).await;

    let hold = gw.faults().hold_next_client_list();
    let before = core.last_reconciled_ms();
    // A node that loads the provider again is reconciled.
    gw.faults().reload_hooks().await;
    hold.arrived().await;
    // EMQX's list is read (ann alone); dan connects before it arrives.
    let _dan = connect(&gw, "dan").await;
    ann.ask_until("WHO", &["OK WHO 2 :ann dan"]).await;
    hold.release();
    reconciled_after(before).await;
    assert_eq!(ann.ask("WHO").await, "OK WHO 2 :ann dan");
}

#[tokio::test]
async fn sqlite_a_connect_racing_a_reconciliation_is_kept() {
    a_connect_racing_a_reconciliation_is_kept("sqlite::memory:").await;
}

#[tokio::test]
async fn postgres_a_connect_racing_a_reconciliation_is_kept() {
    pg::with_schema("postgres_a_connect_racing", |url| async move {
        a_connect_racing_a_reconciliation_is_kept(&url).await;
    })
    .await;
}
