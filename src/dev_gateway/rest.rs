//! A small stand-in for EMQX's REST API (`/api/v5` on the dashboard
//! listener): just the list endpoints the adapter's presence
//! reconciliation reads, answered as EMQX 5 answers them.
//!
//! - `GET /api/v5/nodes`: this node, `running`.
//! - `GET /api/v5/gateways`: the `exproto` gateway, `running`.
//! - `GET /api/v5/clients`: the embedded broker's MQTT clients (with
//!   `--mqtt`, the external broker's clients are not the gateway's to
//!   list, so none).
//! - `GET /api/v5/gateways/exproto/clients`: the logged-in clients whose
//!   sockets are open, with `node`, `conn_state`, `page` and `limit` (at
//!   most 10000) as EMQX takes them, and `meta.hasnext`.
//!
//! Every request needs the API key and secret (HTTP basic auth), else 401
//! `BAD_API_KEY_OR_SECRET`, as EMQX.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::config::ApiListen;
use super::shared::Shared;
use crate::protocol::Secret;

/// Most clients one page lists (EMQX 5.8's limit).
const MAX_LIMIT: usize = 10_000;

struct Api {
    shared: Arc<Shared>,
    /// The expected `Authorization` header.
    auth: Secret,
}

/// Serves the stand-in on `listener` until the gateway stops.
pub(crate) fn serve(listener: TcpListener, api: &ApiListen, shared: Arc<Shared>) {
    let token = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        api.key,
        api.secret.expose()
    ));
    let state = Arc::new(Api {
        auth: Secret::new(format!("Basic {token}")),
        shared,
    });
    let stop = state.shared.shutdown.clone();
    let app = axum::Router::new()
        .route("/api/v5/nodes", get(nodes))
        .route("/api/v5/gateways", get(gateways))
        .route("/api/v5/clients", get(mqtt_clients))
        .route("/api/v5/gateways/{name}/clients", get(gateway_clients))
        .with_state(state);
    tokio::spawn(async move {
        let serving = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serving.await {
            tracing::warn!(error = %e, "REST API stand-in stopped");
        }
    });
}

type State = axum::extract::State<Arc<Api>>;

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `Err` is the 401 EMQX answers to a wrong or missing key.
fn authorized(api: &Api, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given == Some(api.auth.expose()) {
        return Ok(());
    }
    Err(Box::new(json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"code": "BAD_API_KEY_OR_SECRET", "message": "Check api_key/api_secret"}),
    )))
}

async fn nodes(axum::extract::State(api): State, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    json_response(
        StatusCode::OK,
        &json!([{"node": api.shared.cfg.node, "node_status": "running"}]),
    )
}

async fn gateways(axum::extract::State(api): State, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    json_response(
        StatusCode::OK,
        &json!([{"name": "exproto", "status": "running"}]),
    )
}

async fn mqtt_clients(axum::extract::State(api): State, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    list(&api, &uri, false).await
}

async fn gateway_clients(
    axum::extract::State(api): State,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    if name != "exproto" {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"code": "NOT_FOUND", "message": format!("The gateway {name} is not loaded")}),
        );
    }
    list(&api, &uri, true).await
}

/// One page of a client list, filtered as EMQX filters it.
async fn list(api: &Api, uri: &Uri, gateway: bool) -> Response {
    let q = query(uri);
    let number = |key: &str, default: usize| -> Result<usize, String> {
        match q.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| format!("bad {key}: {v:?}")),
        }
    };
    let checked = match (number("page", 1), number("limit", 100)) {
        (Ok(p), Ok(l)) if l <= MAX_LIMIT => Ok((p, l)),
        (Err(e), _) | (_, Err(e)) => Err(e),
        _ => Err(format!("limit is at most {MAX_LIMIT}")),
    };
    let (page, limit) = match checked {
        Ok(pl) => pl,
        Err(message) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"code": "BAD_REQUEST", "message": message}),
            )
        }
    };
    let node = &api.shared.cfg.node;
    let this_node = q.get("node").is_none_or(|n| n == node);
    let connected_wanted = q.get("conn_state").is_none_or(|s| s == "connected");
    let clients = match (this_node && connected_wanted, gateway, &api.shared.broker) {
        (false, ..) => Vec::new(),
        (true, true, _) => api.shared.registry.connected_clients(),
        (true, false, Some(broker)) => broker.connected_clients(&*api.shared).await,
        (true, false, None) => Vec::new(),
    };
    let count = clients.len();
    let data: Vec<Value> = clients
        .into_iter()
        .skip((page - 1).saturating_mul(limit))
        .take(limit)
        .map(|c| {
            json!({
                "node": node,
                "clientid": c.clientid,
                "username": c.username,
                "proto_name": if gateway { "exproto" } else { "MQTT" },
                "connected": true,
                "connected_at": humantime::format_rfc3339_millis(c.connected_at).to_string(),
            })
        })
        .collect();
    let hasnext = page.saturating_mul(limit) < count;
    if gateway {
        // Read, not yet sent: a test may act in between.
        api.shared.faults.held_list().await;
    }
    json_response(
        StatusCode::OK,
        &json!({"data": data, "meta": {"page": page, "limit": limit, "count": count, "hasnext": hasnext}}),
    )
}

fn query(uri: &Uri) -> HashMap<String, String> {
    // axum's own query parsing (form-urlencoded, as EMQX's API takes it);
    // a query it cannot read counts as none.
    axum::extract::Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_decoded() {
        let uri: Uri = "/x?node=emqx%40127.0.0.1&page=2&bad=%zz&end=%4"
            .parse()
            .unwrap();
        let q = query(&uri);
        assert_eq!(q["node"], "emqx@127.0.0.1");
        assert_eq!(q["page"], "2");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["end"], "%4");
    }
}
