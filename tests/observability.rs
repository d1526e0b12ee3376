//! What an operator looks at: the Prometheus endpoint while clients chat,
//! the gRPC health service, and reflection listing the handler services.

mod e2e_support;
#[path = "support/reflection.rs"]
mod reflection;

use e2e_support::Stack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn get_metrics(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

async fn channel(s: &Stack) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", s.adapter.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The one test in this binary that installs the global recorder.
#[tokio::test]
async fn metrics_count_what_clients_do() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    exproto_adapter::telemetry::install_prometheus(listener, Default::default()).unwrap();

    // With presence on, so the hook server's records are counted too.
    let s = Stack::presence("sqlite::memory:").await;
    let mut c = s.connected("metered").await;
    assert_eq!(c.ask("SUB chat/m").await, "OK SUB chat/m 0");
    assert_eq!(c.ask("PUB chat/m :hello").await, "OK PUB chat/m");
    assert_eq!(c.line().await, "MSG chat/m metered :hello");
    assert!(c.ask("FROB").await.starts_with("ERR 400"));

    // The hook server stores in the background: wait for the message.
    let stored = "exproto_hook_records_total{outcome=\"stored\"} 1";
    let deadline = tokio::time::Instant::now() + e2e_support::WAIT;
    let text = loop {
        let text = get_metrics(addr).await;
        if text.contains(stored) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing {stored:?} in:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    for want in [
        "exproto_connections{protocol=\"chat\"} 1",
        "exproto_events_total{kind=\"created\",protocol=\"chat\"} 1",
        "exproto_events_total{kind=\"messages\",protocol=\"chat\"} 1",
        "exproto_emqx_calls_total{method=\"Publish\",result=\"success\"} 1",
        "exproto_emqx_calls_total{method=\"Authenticate\",result=\"success\"} 1",
        "exproto_emqx_call_duration_seconds_bucket{method=\"Subscribe\",le=\"5\"} 1",
        "exproto_parse_errors_total{protocol=\"chat\"} 1",
        // client.connected and message.publish; nothing dropped.
        "exproto_hook_records_total{outcome=\"queued\"} 2",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("outcome=\"dropped\""), "{text}");
    let counter = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let sent_in = "CONNECT metered\nSUB chat/m\nPUB chat/m :hello\nFROB\n".len() as u64;
    assert_eq!(
        counter("exproto_bytes_in_total{protocol=\"chat\"}"),
        sent_in
    );
    assert!(counter("exproto_bytes_out_total{protocol=\"chat\"}") > 0);
}

#[tokio::test]
async fn health_says_serving() {
    let s = Stack::unary().await;
    let mut health = HealthClient::new(channel(&s).await);
    for service in [
        "",
        "emqx.exproto.v1.ConnectionUnaryHandler",
        "emqx.exproto.v1.ConnectionHandler",
    ] {
        // The per-service statuses are set by a task at start; wait for it.
        let mut status = 0;
        for _ in 0..200 {
            let r = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if let Ok(r) = r {
                status = r.into_inner().status;
                if status == ServingStatus::Serving as i32 {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

/// Both reflection versions list what the handler port serves, and no
/// more: EMQX's ConnectionAdapter and the hook providers live elsewhere.
#[tokio::test]
async fn reflection_lists_exactly_the_handler_services() {
    let s = Stack::unary().await;
    reflection::assert_reflects(
        &channel(&s).await,
        &[
            "emqx.exproto.v1.ConnectionHandler",
            "emqx.exproto.v1.ConnectionUnaryHandler",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ],
        &[
            "emqx.exproto.v1.ConnectionAdapter",
            "emqx.exhook.v2.HookProvider",
            "emqx.exhook.v3.HookProvider",
        ],
    )
    .await;
}
