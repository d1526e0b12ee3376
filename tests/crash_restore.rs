//! An adapter killed with SIGKILL and started again restores its sessions
//! from `--state-dir`: the real binary, real sockets, the dev gateway
//! standing in for EMQX (which keeps the clients' sockets meanwhile).

#[path = "support/adapter_bin.rs"]
mod adapter_bin;
#[path = "support/line_client.rs"]
mod line_client;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use adapter_bin::{handler_port, sigkill};
use exproto_adapter::dev_gateway::{DevGateway, EmqxCompat, GatewayConfig};
use line_client::Client;
use tokio::process::Child;

const HELLO: &str = "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]";

fn state_dir() -> PathBuf {
    adapter_bin::temp_path("crash")
}

/// `serve` on `port`, calling the gateway, with or without a state dir;
/// returns once the handler port takes connections.
async fn adapter(port: u16, gw: &DevGateway, state: Option<&Path>) -> Child {
    let extra: Vec<OsString> = match state {
        Some(dir) => vec!["--state-dir".into(), dir.into()],
        None => Vec::new(),
    };
    adapter_bin::start(port, gw, &extra).await
}

#[tokio::test]
async fn sessions_survive_a_sigkill_and_a_restart() {
    let dir = state_dir();
    let port = handler_port();
    let gw = DevGateway::start(GatewayConfig::for_tests(format!("http://127.0.0.1:{port}")))
        .await
        .unwrap();
    let first = adapter(port, &gw, Some(&dir)).await;

    let mut clients = Vec::new();
    // As many idle clients as the takeover test has.
    for i in 0..200 {
        let mut c = Client::connect(gw.client_addr()).await;
        assert_eq!(c.line().await, HELLO);
        assert_eq!(
            c.ask(&format!("CONNECT c{i}")).await,
            format!("OK CONNECT c{i}")
        );
        assert_eq!(c.ask("SUB chat/x").await, "OK SUB chat/x 0");
        clients.push(c);
    }
    // One client has not logged in yet, and one is half-way through a line.
    // Its bytes ride with a command whose answer is awaited: a call still
    // under way when the adapter dies fails, and EMQX closes that client.
    let mut newcomer = Client::connect(gw.client_addr()).await;
    assert_eq!(newcomer.line().await, HELLO);
    clients[3].send("SUB chat/y\nPI").await;
    assert_eq!(clients[3].line().await, "OK SUB chat/y 0");

    // What a client was told is on disk: nothing to wait for.
    sigkill(first).await;
    let second = adapter(port, &gw, Some(&dir)).await;

    for (i, c) in clients.iter_mut().enumerate() {
        if i != 3 {
            assert_eq!(c.ask("PING").await, "PONG", "client {i}");
        }
    }
    // The half-received line may be lost (the chat protocol in the README): what follows works.
    clients[3].send("NG\n").await;
    let reply = clients[3].line().await;
    assert!(
        reply == "PONG" || reply.starts_with("ERR 400"),
        "client 3: {reply:?}"
    );
    assert_eq!(clients[3].ask("PING").await, "PONG");
    // Logins and subscriptions carried over: a message reaches everyone.
    assert_eq!(
        clients[0].ask("PUB chat/x :after the crash").await,
        "OK PUB chat/x"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.line().await,
            "MSG chat/x c0 :after the crash",
            "client {i}"
        );
    }
    assert_eq!(clients[1].ask("SUB chat/x").await, "OK SUB chat/x 0");
    assert_eq!(
        newcomer.ask("CONNECT late").await,
        "OK CONNECT late",
        "a session not logged in yet goes on too"
    );
    assert_eq!(clients[2].ask("QUIT").await, "BYE");
    assert_eq!(clients[2].eof().await, "");

    // The same crash without a state directory: the sessions are lost, so
    // what is above is the journal's doing.
    sigkill(second).await;
    let third = adapter(port, &gw, None).await;
    assert_eq!(
        clients[4].ask("PING").await,
        "ERR 500 :session lost, reconnect"
    );
    sigkill(third).await;
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that speaks while the adapter is down: EMQX 5.1 holds the call
/// and retries until a handler is back, so the restarted adapter carries
/// the command out, once; EMQX 5.8 closes that client at once. Idle
/// clients go on under both.
#[tokio::test]
async fn a_publish_during_the_gap_is_carried_out_once_on_5_1_and_closes_on_5_8() {
    for compat in [EmqxCompat::V5_1, EmqxCompat::V5_8] {
        let dir = state_dir();
        let port = handler_port();
        let mut cfg = GatewayConfig::for_tests(format!("http://127.0.0.1:{port}"));
        cfg.emqx_compat = compat;
        let gw = DevGateway::start(cfg).await.unwrap();
        let first = adapter(port, &gw, Some(&dir)).await;
        let mut speaker = Client::connect(gw.client_addr()).await;
        assert_eq!(speaker.line().await, HELLO);
        assert_eq!(speaker.ask("CONNECT speaker").await, "OK CONNECT speaker");
        let mut idle = Client::connect(gw.client_addr()).await;
        assert_eq!(idle.line().await, HELLO);
        assert_eq!(idle.ask("CONNECT idle").await, "OK CONNECT idle");
        assert_eq!(idle.ask("SUB chat/x").await, "OK SUB chat/x 0");

        sigkill(first).await;
        speaker.send("PUB chat/x :said in the gap\n").await;
        match compat {
            EmqxCompat::V5_1 => {
                // The call waits in the gateway until the adapter is back.
                let second = adapter(port, &gw, Some(&dir)).await;
                assert_eq!(speaker.line().await, "OK PUB chat/x");
                assert_eq!(idle.line().await, "MSG chat/x speaker :said in the gap");
                // Exactly once: the next line is the answer to this PING.
                assert_eq!(idle.ask("PING").await, "PONG");
                assert_eq!(speaker.ask("PING").await, "PONG");
                sigkill(second).await;
            }
            EmqxCompat::V5_8 => {
                assert_eq!(
                    speaker.eof().await,
                    "",
                    "5.8 closes a client that speaks meanwhile"
                );
                let second = adapter(port, &gw, Some(&dir)).await;
                assert_eq!(idle.ask("PING").await, "PONG");
                sigkill(second).await;
            }
        }
        gw.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
