//! The chat page: plain HTML, CSS and JavaScript from `web/`, with
//! MQTT.js vendored beside them, all built into the binary so nothing is
//! fetched from elsewhere at run time. The page learns where to connect
//! from `GET /api/v1/page`.

use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/chat.js");
const STYLE: &str = include_str!("../../web/chat.css");
const MQTT_JS: &str = include_str!("../../web/vendor/mqtt.min.js");

/// What the page is told about where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PageSettings {
    /// EMQX's MQTT-over-WebSocket URL (`ws://HOST:8083/mqtt`); `None`:
    /// the page's own host name, port 8083, path `/mqtt`.
    pub ws_url: Option<String>,
    /// Whether the broker wants a username and password, which the page
    /// then asks for before it connects.
    pub login: bool,
    /// The room a page starts in without `?room=`.
    pub room: String,
}

impl Default for PageSettings {
    fn default() -> Self {
        Self {
            ws_url: None,
            login: false,
            room: "chat/lobby".to_owned(),
        }
    }
}

pub(super) fn routes(settings: Arc<RwLock<PageSettings>>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/assets/chat.js",
            get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/assets/chat.css",
            get(|| async { file("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/assets/mqtt.min.js",
            get(|| async { file("text/javascript; charset=utf-8", MQTT_JS) }),
        )
        .route("/api/v1/page", get(page_settings))
        .with_state(settings)
}

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change with the binary; a browser asks again.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

async fn page_settings(State(settings): State<Arc<RwLock<PageSettings>>>) -> impl IntoResponse {
    let settings = settings
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Json(settings)
}
