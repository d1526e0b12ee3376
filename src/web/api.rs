//! The JSON API: `GET /api/v1/presence` (what `WHO` lists) and
//! `GET /api/v1/history` (what `HISTORY` reads, with paging back). Every
//! answer is bounded, every failure is a JSON `{"error", "message"}` with
//! a fitting status, and a history request reads exactly one topic.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::protocol::topic;
use crate::session::StoreReader;
use crate::store::{HistoryCursor, StoredMessage};

/// Messages a history request gets without `n`, and at most.
const HISTORY_DEFAULT: usize = 50;
const HISTORY_MAX: usize = 500;
/// Clientids a presence request gets without `limit`, and at most.
const PRESENCE_DEFAULT: usize = 100;
const PRESENCE_MAX: usize = 1000;

type Params = Query<HashMap<String, String>>;

pub(super) fn routes(reader: Option<StoreReader>) -> Router {
    Router::new()
        .route("/api/v1/presence", get(presence))
        .route("/api/v1/history", get(history))
        .with_state(reader)
}

/// A failed request: its status and what to tell the caller.
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

fn fail(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

/// A JSON error answer.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::NOT_IMPLEMENTED => "not_enabled",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "error",
    };
    (
        status,
        Json(json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

fn bad(message: impl Into<String>) -> ApiError {
    fail(StatusCode::BAD_REQUEST, message)
}

/// Refuses parameters the endpoint does not know, so a typo
/// (`limt=5`) is not silently ignored.
fn only(params: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown parameter {k:?} (known: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

fn count(
    params: &HashMap<String, String>,
    name: &str,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "{name} must be a whole number from 1 to {max}"
            ))),
        },
    }
}

fn reader(reader: Option<StoreReader>) -> Result<StoreReader, ApiError> {
    reader.ok_or_else(|| {
        fail(
            StatusCode::NOT_IMPLEMENTED,
            "presence and history are off (the adapter runs without --exhook-listen)",
        )
    })
}

/// Runs one store read within the reader's bound.
async fn read<T>(
    reader: &StoreReader,
    what: &str,
    f: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(reader.timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, what, "store read failed");
            Err(fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot be read now; try again",
            ))
        }
        Err(_) => {
            tracing::warn!(timeout = ?reader.timeout, what, "store read timed out");
            Err(fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store did not answer in time; try again",
            ))
        }
    }
}

async fn presence(State(store): State<Option<StoreReader>>, Query(params): Params) -> Response {
    let answer = async {
        only(&params, &["prefix", "limit"])?;
        let limit = count(&params, "limit", PRESENCE_DEFAULT, PRESENCE_MAX)?;
        let prefix = params.get("prefix").map_or("", String::as_str);
        let store = reader(store)?;
        let page = read(&store, "presence", store.store.presence_list(prefix, limit)).await?;
        Ok::<_, ApiError>(Json(json!({
            "total": page.total,
            "clientids": page.ids,
        })))
    };
    answer.await.into_response()
}

async fn history(State(store): State<Option<StoreReader>>, Query(params): Params) -> Response {
    let answer = async {
        only(&params, &["topic", "n", "before_id", "before_time"])?;
        let Some(name) = params.get("topic") else {
            return Err(bad("topic is required: /api/v1/history?topic=chat/lobby"));
        };
        // A filter would read many topics at once; history is per topic.
        if topic::validate_name(name).is_err() {
            return Err(bad(format!(
                "topic {name:?} is not a topic name (no wildcards, not empty)"
            )));
        }
        let n = count(&params, "n", HISTORY_DEFAULT, HISTORY_MAX)?;
        let cursor = match (params.get("before_id"), params.get("before_time")) {
            (Some(_), Some(_)) => return Err(bad("give before_id or before_time, not both")),
            (Some(id), None) if id.is_empty() => return Err(bad("before_id is empty")),
            (Some(id), None) => Some(HistoryCursor::Id(id.clone())),
            (None, Some(t)) => match t.parse::<u64>() {
                Ok(ms) => Some(HistoryCursor::Time(ms)),
                Err(_) => return Err(bad("before_time must be milliseconds since the Unix epoch")),
            },
            (None, None) => None,
        };
        let store = reader(store)?;
        // One more than asked tells whether older messages remain.
        let mut messages = match &cursor {
            None => read(&store, "history", store.store.history_newest(name, n + 1)).await?,
            Some(c) => read(
                &store,
                "history",
                store.store.history_before(name, n + 1, c),
            )
            .await?
            .ok_or_else(|| {
                fail(
                    StatusCode::NOT_FOUND,
                    format!("topic {name:?} has no stored message with that before_id"),
                )
            })?,
        };
        let more = messages.len() > n;
        if more {
            messages.remove(0);
        }
        Ok::<_, ApiError>(Json(json!({
            "topic": name,
            "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
            "more": more,
        })))
    };
    answer.await.into_response()
}

/// A stored message: text payloads as `payload`, others as
/// `payload_base64`.
fn message_json(m: &StoredMessage) -> Value {
    let mut v = json!({
        "id": m.id,
        "from": m.from,
        "topic": m.topic,
        "qos": m.qos,
        "timestamp": m.timestamp_ms,
    });
    match std::str::from_utf8(&m.payload) {
        Ok(text) => v["payload"] = Value::from(text),
        Err(_) => {
            v["payload_base64"] =
                Value::from(base64::engine::general_purpose::STANDARD.encode(&m.payload))
        }
    }
    v
}
