//! End-to-end fixtures: the adapter and the dev gateway wired together on
//! ports bound on 0, and a line client over a real TCP socket.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use exproto_adapter::dev_gateway::{DevGateway, GatewayConfig, HandlerMode};
use exproto_adapter::emqx::GrpcAdapter;
use exproto_adapter::exhook::HookConfig;
use exproto_adapter::server::{AdapterConfig, PresenceConfig, RunningAdapter, Server};
use exproto_adapter::store::StoreUrl;
use tokio::net::TcpListener;

#[path = "../support/line_client.rs"]
mod line_client;
// Reader is used by some of the suites that include this module only.
#[allow(unused_imports)]
pub use line_client::{Client, Reader, WAIT};

pub const HELLO: &str = "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]";

/// Clients -> dev gateway -> adapter -> dev gateway -> clients.
pub struct Stack {
    pub gateway: DevGateway,
    pub adapter: RunningAdapter,
}

impl Stack {
    pub async fn unary() -> Stack {
        Stack::start(|_| {}, |_| {}).await
    }

    pub async fn stream() -> Stack {
        Stack::start(|g| g.handler_mode = HandlerMode::Stream, |_| {}).await
    }

    /// Starts both halves; the closures adjust either side's settings.
    pub async fn start(
        gateway: impl FnOnce(&mut GatewayConfig),
        adapter: impl FnOnce(&mut AdapterConfig),
    ) -> Stack {
        Stack::start_with(gateway, |_, a| adapter(a)).await
    }

    /// [`Stack::start`] whose adapter settings may depend on the running
    /// gateway (e.g. the ports its listeners got).
    pub async fn start_with(
        gateway: impl FnOnce(&mut GatewayConfig),
        adapter: impl FnOnce(&DevGateway, &mut AdapterConfig),
    ) -> Stack {
        // The adapter's port is bound first so the gateway can be told
        // where its handler is; the gateway's ConnectionAdapter port is then
        // known to the adapter, whose EMQX client connects lazily.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handler = format!("http://{}", listener.local_addr().unwrap());
        let mut gcfg = GatewayConfig::for_tests(handler);
        gateway(&mut gcfg);
        let gw = DevGateway::start(gcfg).await.unwrap();

        let mut acfg = AdapterConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            emqx: format!("http://{}", gw.adapter_addr()),
            call_timeout: Duration::from_secs(2),
            ..AdapterConfig::default()
        };
        adapter(&gw, &mut acfg);
        let emqx = GrpcAdapter::new(&acfg.emqx, acfg.call_timeout).unwrap();
        let running = Server::builder(acfg)
            .handler_listener(listener)
            .emqx(Arc::new(emqx))
            .start()
            .await
            .unwrap();
        Stack {
            gateway: gw,
            adapter: running,
        }
    }

    /// Both halves with presence and history: the adapter serves the hook
    /// server over the store at `store`, and the gateway reports to it as
    /// EMQX would. Returns once the gateway has loaded the hook provider.
    pub async fn presence(store: &str) -> Stack {
        Stack::presence_with(store, |_| {}).await
    }

    /// [`Stack::presence`] with the hook server's settings adjusted.
    pub async fn presence_with(store: &str, hooks: impl FnOnce(&mut HookConfig)) -> Stack {
        Stack::presence_tuned(store, |_| {}, |p| hooks(&mut p.hooks)).await
    }

    /// [`Stack::presence`] with either side adjusted: the gateway (its
    /// `exhook` URL already points at the hook listener, over plain
    /// `http://`) and the presence settings.
    pub async fn presence_tuned(
        store: &str,
        gateway: impl FnOnce(&mut GatewayConfig),
        presence: impl FnOnce(&mut PresenceConfig),
    ) -> Stack {
        Stack::presence_and(store, gateway, presence, |_, _| {}).await
    }

    /// [`Stack::presence_tuned`] with the adapter's settings adjusted too,
    /// knowing the running gateway.
    pub async fn presence_and(
        store: &str,
        gateway: impl FnOnce(&mut GatewayConfig),
        presence: impl FnOnce(&mut PresenceConfig),
        adapter: impl FnOnce(&DevGateway, &mut AdapterConfig),
    ) -> Stack {
        // Both adapter ports are bound first: the gateway must know them
        // before it starts, and the adapter must know the gateway's
        // ConnectionAdapter port before it starts. The gateway's first
        // OnProviderLoaded waits in the hook listener's backlog meanwhile.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_addr = hook_listener.local_addr().unwrap();
        let mut gcfg =
            GatewayConfig::for_tests(format!("http://{}", listener.local_addr().unwrap()));
        gcfg.exhook = Some(format!("http://{hook_addr}"));
        gateway(&mut gcfg);
        let gw = DevGateway::start(gcfg).await.unwrap();
        let mut presence_config = PresenceConfig {
            exhook_listen: hook_addr,
            store: StoreUrl::new(store),
            hooks: HookConfig::default(),
            read_timeout: Duration::from_secs(2),
            reconcile: None,
            tls: None,
        };
        presence(&mut presence_config);
        let mut acfg = AdapterConfig {
            listen: listener.local_addr().unwrap(),
            emqx: format!("http://{}", gw.adapter_addr()),
            call_timeout: Duration::from_secs(2),
            presence: Some(presence_config),
            ..AdapterConfig::default()
        };
        adapter(&gw, &mut acfg);
        let running = Server::builder(acfg)
            .handler_listener(listener)
            .hook_listener(hook_listener)
            .start()
            .await
            .unwrap();
        let s = Stack {
            gateway: gw,
            adapter: running,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while !s.gateway.exhook_stats().is_some_and(|st| st.loaded) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not load the hook provider: {:?}",
                s.gateway.exhook_stats()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.client_addr()
    }

    /// A client that has read its HELLO.
    pub async fn client(&self) -> Client {
        let mut c = Client::connect(self.addr()).await;
        assert_eq!(c.line().await, HELLO);
        c
    }

    /// A client that has said CONNECT as `clientid` and read the OK.
    pub async fn connected(&self, clientid: &str) -> Client {
        let mut c = self.client().await;
        assert_eq!(
            c.ask(&format!("CONNECT {clientid}")).await,
            format!("OK CONNECT {clientid}")
        );
        c
    }

    /// Waits until the adapter holds exactly `n` sessions.
    pub async fn until_sessions(&self, n: usize) {
        let reg = self.adapter.driver().registry();
        let deadline = tokio::time::Instant::now() + WAIT;
        while reg.len() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "adapter holds {} sessions, not {n}",
                reg.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A client that has sent `connect` (a whole CONNECT line) and read
    /// `OK CONNECT clientid`.
    pub async fn connected_as(&self, connect: &str, clientid: &str) -> Client {
        let mut c = self.client().await;
        assert_eq!(c.ask(connect).await, format!("OK CONNECT {clientid}"));
        c
    }

    /// Waits until the adapter holds no session.
    pub async fn until_no_sessions(&self) {
        let reg = self.adapter.driver().registry();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !(reg.is_empty() && reg.orphans() == 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "adapter still holds {} sessions",
                reg.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
