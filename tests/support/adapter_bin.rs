//! The real adapter binary as a child process, for the tests that kill it,
//! restart it or make one take over from another.

#![allow(dead_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use exproto_adapter::dev_gateway::DevGateway;
use tokio::process::{Child, Command};

/// A port for the adapter's handler: the dev gateway must be told it before
/// the adapter exists, and every adapter started later binds it again.
/// Bound on 0 and read back, then given up for the adapter.
pub fn handler_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory path under the temporary directory (not created).
pub fn temp_path(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "exproto-{what}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `serve` on `port`, calling the gateway, with `extra` flags. The test's
/// own environment does not configure it.
pub fn spawn(port: u16, gw: &DevGateway, extra: &[OsString]) -> Child {
    spawn_with_env(port, gw, extra, &[])
}

/// [`spawn`] with `env` set for the child alone.
pub fn spawn_with_env(
    port: u16,
    gw: &DevGateway,
    extra: &[OsString],
    env: &[(&str, &std::ffi::OsStr)],
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exproto-adapter"));
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--emqx", &format!("http://{}", gw.adapter_addr())])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("ADAPTER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("EXPROTO_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.spawn().expect("the adapter binary starts")
}

/// [`spawn`], returning once the handler port takes connections.
pub async fn start(port: u16, gw: &DevGateway, extra: &[OsString]) -> Child {
    let child = spawn(port, gw, extra);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the adapter did not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

pub async fn sigkill(mut child: Child) {
    child.kill().await.expect("SIGKILL");
}

/// Waits for `child` to exit by itself, and says whether it succeeded.
pub async fn exits_ok(mut child: Child, within: Duration) -> bool {
    tokio::time::timeout(within, child.wait())
        .await
        .expect("the process did not exit in time")
        .expect("wait for the process")
        .success()
}
