//! Zero-drop upgrades: a new `serve` started with the running adapter's
//! `--upgrade-socket` takes its listening sockets and every session, and
//! the old process exits. The real binary, real sockets, the dev gateway
//! standing in for EMQX; the clients must notice nothing. (Takeovers under
//! traffic: `takeover_traffic.rs`.)

#[path = "support/adapter_bin.rs"]
mod adapter_bin;
#[path = "support/line_client.rs"]
mod line_client;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use exproto_adapter::dev_gateway::{DevGateway, GatewayConfig, HandlerMode};
use line_client::Client;

fn upgrade_flags(socket: &Path, state: Option<&Path>) -> Vec<OsString> {
    let mut f: Vec<OsString> = vec!["--upgrade-socket".into(), socket.into()];
    if let Some(dir) = state {
        f.push("--state-dir".into());
        f.push(dir.into());
    }
    f
}

/// Streaming mode: the old process ends EMQX's streams and EMQX opens new
/// ones at the successor. Sessions, logins and subscriptions carry over;
/// what EMQX wrote to a stream the old process no longer read is lost
/// (README), so this checks clients that were quiet during the switch.
#[tokio::test]
async fn streaming_mode_sessions_carry_over() {
    let socket = adapter_bin::temp_path("upgrade-stream").with_extension("sock");
    let state = adapter_bin::temp_path("upgrade-stream-state");
    let port = adapter_bin::handler_port();
    let mut cfg = GatewayConfig::for_tests(format!("http://127.0.0.1:{port}"));
    cfg.handler_mode = HandlerMode::Stream;
    let gw = DevGateway::start(cfg).await.unwrap();
    let flags = upgrade_flags(&socket, Some(&state));
    let mut running = adapter_bin::start(port, &gw, &flags).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = Client::connect(gw.client_addr()).await;
        assert!(c.line().await.starts_with("HELLO "));
        assert_eq!(
            c.ask(&format!("CONNECT s{i}")).await,
            format!("OK CONNECT s{i}")
        );
        assert_eq!(c.ask("SUB chat/s").await, "OK SUB chat/s 0");
        clients.push(c);
    }
    // Half a line before the switch, the rest after: the line buffer moves.
    clients[1].send("PI").await;
    assert_eq!(clients[0].ask("PING").await, "PONG");
    for round in 0..2 {
        let next = adapter_bin::spawn(port, &gw, &flags);
        assert!(
            adapter_bin::exits_ok(running, Duration::from_secs(30)).await,
            "takeover {round}"
        );
        running = next;
        for (i, c) in clients.iter_mut().enumerate() {
            if i != 1 {
                assert_eq!(
                    c.ask("PING").await,
                    "PONG",
                    "client {i} after takeover {round}"
                );
            }
        }
    }
    clients[1].send("NG\n").await;
    assert_eq!(
        clients[1].line().await,
        "PONG",
        "the half line was handed over"
    );
    assert_eq!(clients[2].ask("PUB chat/s :after").await, "OK PUB chat/s");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.line().await, "MSG chat/s s2 :after", "client {i}");
    }
    assert_eq!(clients[3].ask("QUIT").await, "BYE");
    assert_eq!(clients[3].eof().await, "");
    adapter_bin::sigkill(running).await;
    gw.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&state);
}

/// `--upgrade-required` without a running adapter is an error, and a
/// takeover with `--state-dir` leaves the journal to the successor: a
/// crash after the takeover still restores the sessions.
#[tokio::test]
async fn upgrade_required_fails_alone_and_the_journal_follows_the_takeover() {
    let socket = adapter_bin::temp_path("upgrade-req").with_extension("sock");
    let state = adapter_bin::temp_path("upgrade-req-state");
    let port = adapter_bin::handler_port();
    let gw = DevGateway::start(GatewayConfig::for_tests(format!("http://127.0.0.1:{port}")))
        .await
        .unwrap();
    let mut flags = upgrade_flags(&socket, Some(&state));
    let mut required = flags.clone();
    required.push("--upgrade-required".into());
    let alone = adapter_bin::spawn(port, &gw, &required);
    assert!(
        !adapter_bin::exits_ok(alone, Duration::from_secs(30)).await,
        "--upgrade-required with nobody to take over from must fail"
    );

    let first = adapter_bin::start(port, &gw, &flags).await;
    let mut c = Client::connect(gw.client_addr()).await;
    assert!(c.line().await.starts_with("HELLO "));
    assert_eq!(c.ask("CONNECT j").await, "OK CONNECT j");
    let second = adapter_bin::spawn(port, &gw, &required);
    assert!(adapter_bin::exits_ok(first, Duration::from_secs(30)).await);
    assert_eq!(c.ask("SUB chat/j").await, "OK SUB chat/j 0");
    // A crash of the successor: its journal has what it was told.
    adapter_bin::sigkill(second).await;
    flags.retain(|f| f != "--upgrade-required");
    let third = adapter_bin::start(port, &gw, &flags).await;
    assert_eq!(c.ask("PING").await, "PONG");
    assert_eq!(c.ask("PUB chat/j :kept").await, "OK PUB chat/j");
    assert_eq!(c.line().await, "MSG chat/j j :kept");
    adapter_bin::sigkill(third).await;
    gw.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&state);
}

async fn notification(notify: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), notify.recv(&mut buf))
        .await
        .expect("no notification")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `systemctl reload` as the unit file does it: SIGHUP to the main PID.
/// The adapter starts its successor from the same binary path and
/// arguments; systemd (here, the test on `NOTIFY_SOCKET`) hears the new
/// MAINPID before the old process exits, then READY.
#[tokio::test]
async fn sighup_starts_a_successor_that_tells_systemd_its_pid() {
    let socket = adapter_bin::temp_path("upgrade-hup").with_extension("sock");
    let notify_path = adapter_bin::temp_path("notify").with_extension("sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let port = adapter_bin::handler_port();
    let gw = DevGateway::start(GatewayConfig::for_tests(format!("http://127.0.0.1:{port}")))
        .await
        .unwrap();
    let flags = upgrade_flags(&socket, None);
    let first = adapter_bin::spawn_with_env(
        port,
        &gw,
        &flags,
        &[("NOTIFY_SOCKET", notify_path.as_os_str())],
    );
    let first_pid = first.id().unwrap();
    let ready = notification(&notify).await;
    assert!(ready.contains(&format!("MAINPID={first_pid}")), "{ready:?}");
    assert!(ready.contains("READY=1"), "{ready:?}");

    let mut c = Client::connect(gw.client_addr()).await;
    assert!(c.line().await.starts_with("HELLO "));
    assert_eq!(c.ask("CONNECT h").await, "OK CONNECT h");
    std::process::Command::new("kill")
        .args(["-HUP", &first_pid.to_string()])
        .status()
        .unwrap();
    let main_pid = notification(&notify).await;
    let new_pid: u32 = main_pid
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {main_pid:?}"));
    assert_ne!(new_pid, first_pid);
    assert!(adapter_bin::exits_ok(first, Duration::from_secs(30)).await);
    let ready = notification(&notify).await;
    assert!(
        ready.contains("READY=1") && ready.contains(&format!("MAINPID={new_pid}")),
        "{ready:?}"
    );
    assert_eq!(
        c.ask("PING").await,
        "PONG",
        "the session went on in the successor"
    );
    std::process::Command::new("kill")
        .args(["-KILL", &new_pid.to_string()])
        .status()
        .unwrap();
    gw.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&notify_path);
}
