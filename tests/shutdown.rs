//! Graceful shutdown: the library's `RunningAdapter::shutdown` drains, and
//! the binary does the same on SIGTERM or SIGINT, exiting at once on a
//! second signal.

mod common;

use std::time::{Duration, Instant};

use common::{quick_config, FakeEmqx, Harness};
use exproto_adapter::pb;

fn created(conn: &str) -> pb::SocketCreatedRequest {
    pb::SocketCreatedRequest {
        conn: conn.into(),
        conninfo: None,
    }
}

#[tokio::test]
async fn a_call_in_flight_finishes_and_new_sockets_get_503() {
    let mut config = quick_config();
    config.shutdown_grace = Duration::from_secs(5);
    let h = Harness::start_with(config).await;
    h.emqx.set_slow(Duration::from_millis(800));
    h.created("c1").await;
    h.bytes("c1", "CONNECT a\n").await;
    h.emqx.lines("c1", 2).await;
    h.bytes("c1", "PUB slow/x :m\n").await;
    h.emqx.called("c1", "Publish").await;

    // The Publish is in flight at EMQX: shut down now.
    let driver = h.adapter.driver().clone();
    let mut unary = h.unary.clone();
    let t0 = Instant::now();
    let shutdown = tokio::spawn(h.adapter.shutdown());
    while !driver.is_shutting_down() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    unary.on_socket_created(created("c2")).await.unwrap();
    assert_eq!(h.emqx.lines("c2", 1).await, ["ERR 503 :shutting down"]);
    h.emqx.called("c2", "Close").await;
    // c1 is the only session: c2 got none.
    assert_eq!(driver.registry().len(), 1);

    shutdown.await.unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The command taken before the shutdown got its reply.
    assert_eq!(h.emqx.lines("c1", 3).await[2], "OK PUB slow/x");
}

#[tokio::test]
async fn an_idle_adapter_stops_at_once() {
    let h = Harness::start().await;
    h.created("c").await;
    h.bytes("c", "CONNECT a\nPING\n").await;
    h.emqx.lines("c", 3).await;
    let t0 = Instant::now();
    h.adapter.shutdown().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn work_longer_than_the_grace_does_not_hold_the_shutdown() {
    let mut config = quick_config();
    config.shutdown_grace = Duration::from_millis(300);
    config.call_timeout = Duration::from_secs(30);
    let h = Harness::start_with(config).await;
    h.emqx.set_slow(Duration::from_secs(20));
    h.created("c").await;
    h.bytes("c", "CONNECT a\nSUB slow/x\n").await;
    h.emqx.called("c", "Subscribe").await;
    let t0 = Instant::now();
    h.adapter.shutdown().await.unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// The binary under test, serving on a free port against `emqx`.
#[cfg(unix)]
struct Serving {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

#[cfg(unix)]
impl Serving {
    async fn start(emqx: std::net::SocketAddr, extra: &[&str]) -> Self {
        // A free port: bound, read, released; the adapter binds it next.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_exproto-adapter"))
            .arg("serve")
            .args(["--listen", &addr.to_string()])
            .args(["--emqx", &format!("http://{emqx}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Self { child, addr };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the adapter did not start listening on {addr}");
    }

    async fn client(
        &self,
    ) -> pb::connection_unary_handler_client::ConnectionUnaryHandlerClient<tonic::transport::Channel>
    {
        pb::connection_unary_handler_client::ConnectionUnaryHandlerClient::connect(format!(
            "http://{}",
            self.addr
        ))
        .await
        .unwrap()
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    async fn exited_within(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

#[cfg(unix)]
impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let emqx = FakeEmqx::default();
    let emqx_addr = emqx.start().await;
    emqx.set_slow(Duration::from_millis(700));
    let mut adapter = Serving::start(emqx_addr, &["--shutdown-grace", "5"]).await;
    let mut client = adapter.client().await;
    client.on_socket_created(created("c1")).await.unwrap();
    client
        .on_received_bytes(pb::ReceivedBytesRequest {
            conn: "c1".into(),
            bytes: "CONNECT a\nPUB slow/x :m\n".into(),
        })
        .await
        .unwrap();
    emqx.called("c1", "Publish").await;
    adapter.signal("TERM");
    // Still serving during the drain: a new socket is told and closed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.on_socket_created(created("c2")).await.unwrap();
    assert_eq!(emqx.lines("c2", 1).await, ["ERR 503 :shutting down"]);
    assert_eq!(
        adapter.exited_within(Duration::from_secs(5)).await,
        Some(0),
        "no clean exit"
    );
    assert_eq!(emqx.lines("c1", 3).await[2], "OK PUB slow/x");
}

#[cfg(unix)]
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let emqx = FakeEmqx::default();
    let emqx_addr = emqx.start().await;
    emqx.set_slow(Duration::from_secs(30));
    let mut adapter = Serving::start(
        emqx_addr,
        &["--shutdown-grace", "60", "--call-timeout", "60"],
    )
    .await;
    let mut client = adapter.client().await;
    client.on_socket_created(created("c1")).await.unwrap();
    client
        .on_received_bytes(pb::ReceivedBytesRequest {
            conn: "c1".into(),
            bytes: "CONNECT a\nSUB slow/x\n".into(),
        })
        .await
        .unwrap();
    emqx.called("c1", "Subscribe").await;
    adapter.signal("INT");
    // The drain would wait for the 30 s Subscribe.
    assert_eq!(
        adapter.exited_within(Duration::from_millis(500)).await,
        None
    );
    adapter.signal("INT");
    assert_eq!(
        adapter.exited_within(Duration::from_secs(2)).await,
        Some(1),
        "the second signal did not end the process"
    );
}
