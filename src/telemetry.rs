//! Metrics the adapter exports, and the Prometheus endpoint that serves them.
//!
//! Recording goes through the `metrics` facade: with no endpoint installed
//! every call is a no-op, so the hot paths pay nothing unless an operator
//! asks for metrics (`--metrics ADDR`).

use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Sessions the adapter holds (gauge).
pub const CONNECTIONS: &str = "exproto_connections";
/// Handler events received, by `kind` (created, bytes, messages, timer,
/// closed) and `protocol` (`none` for a conn without a session).
pub const EVENTS: &str = "exproto_events_total";
/// Calls to EMQX, by `method` and `result` (EMQX's code, or `unreachable`).
pub const EMQX_CALLS: &str = "exproto_emqx_calls_total";
/// Time each EMQX call took, by `method`.
pub const EMQX_CALL_SECONDS: &str = "exproto_emqx_call_duration_seconds";
/// Bytes received from clients, by `protocol`.
pub const BYTES_IN: &str = "exproto_bytes_in_total";
/// Bytes sent to clients (through EMQX's `Send`), by `protocol`.
pub const BYTES_OUT: &str = "exproto_bytes_out_total";
/// Lines or frames a protocol could not parse, by `protocol`.
pub const PARSE_ERRORS: &str = "exproto_parse_errors_total";
/// Hook server records (presence changes, messages) by `outcome`: queued,
/// dropped (queue full), written, stored (new messages), rejected,
/// abandoned (unwritten at shutdown).
pub const HOOK_RECORDS: &str = "exproto_hook_records_total";
/// Presence rows repaired without a disconnect from EMQX, by `cause`:
/// `node_started`, `node_stopped`, and reconciliation's `removed` and
/// `added`.
pub const PRESENCE_REPAIRED: &str = "exproto_presence_repaired_total";
/// Reconciliations of presence with EMQX's REST API, by `result` (`ok`,
/// `failed`).
pub const RECONCILIATIONS: &str = "exproto_presence_reconciliations_total";
/// When presence was last reconciled with EMQX, seconds since the Unix
/// epoch (gauge).
pub const RECONCILED_AT: &str = "exproto_presence_reconciled_timestamp_seconds";

/// Serves the metrics' text on `listener` at `GET /metrics` (see
/// [`metrics_routes`]), until `accepting` is cancelled (then open requests
/// finish).
///
/// # Errors
/// When another kind of recorder is already installed.
pub fn install_prometheus(
    listener: TcpListener,
    accepting: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let app = metrics_routes()?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    // axum's accept loop waits after an error such as EMFILE instead of
    // retrying at once.
    tokio::spawn(async move {
        let serving =
            axum::serve(listener, app).with_graceful_shutdown(accepting.cancelled_owned());
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

/// `GET /metrics`, for any HTTP listener. The first call makes a
/// Prometheus recorder the process's metrics recorder; later calls (a
/// second adapter in the same process, as in tests) share it.
///
/// # Errors
/// When another kind of recorder is already installed.
pub fn metrics_routes() -> anyhow::Result<axum::Router> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = HANDLE.get() {
        return Ok(endpoint(handle.clone()));
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(EMQX_CALL_SECONDS.into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ],
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
    describe();
    let _ = HANDLE.set(handle.clone());
    Ok(endpoint(handle))
}

fn endpoint(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new().route("/metrics", get(move || scrape(handle.clone())))
}

async fn scrape(handle: PrometheusHandle) -> impl IntoResponse {
    handle.run_upkeep();
    (
        [
            (header::CONTENT_TYPE, "text/plain; version=0.0.4"),
            // A scrape is one request; closing after it, as the endpoint
            // always has, lets a client that reads to the end finish.
            (header::CONNECTION, "close"),
        ],
        handle.render(),
    )
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS, "Sessions the adapter holds.");
    describe_counter!(EVENTS, "Handler events received from EMQX, by kind.");
    describe_counter!(
        EMQX_CALLS,
        "Calls to EMQX's ConnectionAdapter, by method and result."
    );
    describe_histogram!(
        EMQX_CALL_SECONDS,
        Unit::Seconds,
        "Duration of calls to EMQX, by method."
    );
    describe_counter!(BYTES_IN, Unit::Bytes, "Bytes received from clients.");
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes sent to clients.");
    describe_counter!(PARSE_ERRORS, "Lines or frames that could not be parsed.");
    describe_counter!(
        RECONCILIATIONS,
        "Reconciliations of presence with EMQX's REST API, by result."
    );
    describe_gauge!(
        RECONCILED_AT,
        "When presence was last reconciled with EMQX (Unix seconds)."
    );
    describe_counter!(
        PRESENCE_REPAIRED,
        "Presence rows repaired without a disconnect from EMQX, by cause."
    );
    describe_counter!(
        HOOK_RECORDS,
        "Hook server records (presence changes and messages), by outcome."
    );
}

/// The `kind` label of a handler event.
pub(crate) fn event_kind(event: &crate::protocol::Event) -> &'static str {
    use crate::protocol::Event;
    match event {
        Event::Created(_) => "created",
        Event::Bytes(_) => "bytes",
        Event::Messages(_) => "messages",
        Event::TimerFired(_) => "timer",
        Event::Closed(_) => "closed",
        Event::Deadline | Event::Reply(_) | Event::Answer(_) => "other",
    }
}

pub(crate) fn event(kind: &'static str, protocol: &'static str, bytes: usize) {
    counter!(EVENTS, "kind" => kind, "protocol" => protocol).increment(1);
    if bytes > 0 {
        counter!(BYTES_IN, "protocol" => protocol).increment(bytes as u64);
    }
}

pub(crate) fn emqx_call(method: &'static str, result: &'static str, took: Duration) {
    counter!(EMQX_CALLS, "method" => method, "result" => result).increment(1);
    histogram!(EMQX_CALL_SECONDS, "method" => method).record(took.as_secs_f64());
}

pub(crate) fn bytes_out(protocol: &'static str, n: usize) {
    counter!(BYTES_OUT, "protocol" => protocol).increment(n as u64);
}

pub(crate) fn parse_errors(protocol: &'static str, n: u64) {
    counter!(PARSE_ERRORS, "protocol" => protocol).increment(n);
}

pub(crate) fn connections(protocol: &'static str, delta: f64) {
    gauge!(CONNECTIONS, "protocol" => protocol).increment(delta);
}

pub(crate) fn reconciliation(result: &'static str) {
    counter!(RECONCILIATIONS, "result" => result).increment(1);
    if result == "ok" {
        #[allow(clippy::cast_precision_loss)]
        gauge!(RECONCILED_AT).set(crate::store::now_ms() as f64 / 1000.0);
    }
}

pub(crate) fn presence_repaired(cause: &'static str, n: u64) {
    counter!(PRESENCE_REPAIRED, "cause" => cause).increment(n);
}

pub(crate) fn hook_records(outcome: &'static str, n: u64) {
    counter!(HOOK_RECORDS, "outcome" => outcome).increment(n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the endpoint did not close the connection")
    }

    #[tokio::test]
    async fn one_scrape_per_connection_at_metrics_only() {
        // A recorder of this test's own: the global one is the process's.
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || counter!(PARSE_ERRORS).increment(3));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = endpoint(recorder.handle());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let text = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(
            text.contains("content-type: text/plain; version=0.0.4"),
            "{text}"
        );
        assert!(text.contains("exproto_parse_errors_total 3"), "{text}");

        let other = get(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    }
}
