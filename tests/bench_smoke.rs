//! A short run of `exproto-adapter bench` in-process against the real
//! binary: it must report every field and see deliveries. No timing is
//! asserted: numbers on a shared test machine mean nothing.

use std::time::Duration;

use clap::Parser;
use exproto_adapter::bench::{self, BenchArgs, Report};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(extra: &[&str]) -> BenchArgs {
    let mut argv = vec![
        "bench",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--clients",
        "4",
        "--handler-exe",
        env!("CARGO_BIN_EXE_exproto-adapter"),
    ];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).args
}

async fn run(extra: &[&str]) -> serde_json::Value {
    let report = tokio::time::timeout(Duration::from_secs(60), bench::run(&args(extra)))
        .await
        .expect("bench run timed out")
        .expect("bench run failed");
    assert!(matches!(report, Report::Load(_)));
    let json = report.to_json();
    for field in [
        "messages_per_sec",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "adapter_rss_bytes",
        "handler_events_per_sec",
        "adapter_cpu_percent",
    ] {
        assert!(json.get(field).is_some(), "{field} missing in {json}");
    }
    assert!(json["delivered"].as_u64().unwrap() > 0, "{json}");
    assert!(json["adapter_rss_bytes"].as_u64().unwrap() > 0, "{json}");
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_the_adapter() {
    let json = run(&[]).await;
    assert_eq!(json["workload"], "chat");
    assert_eq!(json["errors"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_reference_streaming() {
    let json = run(&["--handler", "echo", "--service", "stream"]).await;
    assert_eq!(json["workload"], "echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_hop() {
    let json = run(&["--handler", "noop"]).await;
    assert_eq!(json["workload"], "hop");
}
