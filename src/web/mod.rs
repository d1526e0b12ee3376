//! The adapter's one HTTP listener (`serve --http`): Prometheus metrics
//! at `/metrics`, a small read-only JSON API over the presence and history
//! store under `/api/v1/`, and the chat page at `/`.
//!
//! `api` answers the JSON requests, `page` serves the page's files (kept in
//! `web/` and built into the binary), and this module puts them behind one
//! router with the access rule: bound to a loopback address the listener is
//! open; bound beyond it, it needs a bearer token or basic-auth
//! credentials for everything but `/metrics` (which stays as open as
//! `--metrics` always was, for scrapers).

mod api;
mod page;

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::protocol::Secret;
use crate::session::StoreReader;

pub use page::PageSettings;

/// A user name and password that basic auth accepts.
#[derive(Debug, Clone)]
pub struct BasicUser {
    pub name: String,
    pub password: Secret,
}

impl std::str::FromStr for BasicUser {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((name, password)) if !name.is_empty() && !password.is_empty() => Ok(Self {
                name: name.to_owned(),
                password: Secret::new(password),
            }),
            _ => Err("expected USER:PASSWORD, both non-empty".to_owned()),
        }
    }
}

/// The HTTP listener's settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// `Authorization: Bearer TOKEN` is let in.
    pub token: Option<Secret>,
    /// `Authorization: Basic ...` with these credentials is let in (and a
    /// browser asks for them).
    pub user: Option<BasicUser>,
    /// What the chat page is told.
    pub page: PageSettings,
}

impl HttpConfig {
    /// On loopback anyone on the machine may read; beyond it, presence
    /// and history are nobody's business without credentials.
    ///
    /// # Errors
    /// An address beyond loopback without a token or user, or an empty
    /// token.
    pub fn validate(&self) -> Result<(), String> {
        if self.token.as_ref().is_some_and(|t| t.expose().is_empty()) {
            return Err("--http-token must not be empty".to_owned());
        }
        if !self.addr.ip().is_loopback() && self.token.is_none() && self.user.is_none() {
            return Err(format!(
                "--http {} is reachable from other machines: set --http-token TOKEN and/or \
                 --http-user USER:PASSWORD (a browser needs the user), or bind a loopback address \
                 such as 127.0.0.1:{}",
                self.addr,
                self.addr.port()
            ));
        }
        Ok(())
    }

    fn guarded(&self) -> bool {
        self.token.is_some() || self.user.is_some()
    }
}

/// The running listener's handle: the page settings can change while it
/// runs (the demo learns its WebSocket address after the adapter starts).
#[derive(Clone)]
pub struct Web {
    page: Arc<RwLock<PageSettings>>,
    addr: SocketAddr,
}

impl Web {
    /// Where the listener is bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Points the page at another MQTT-over-WebSocket URL.
    pub fn set_ws_url(&self, url: Option<String>) {
        self.page
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .ws_url = url;
    }

    /// Whether the page asks for a username and password first.
    pub fn set_login(&self, login: bool) {
        self.page
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .login = login;
    }
}

#[derive(Clone)]
struct Guard {
    token: Option<Secret>,
    user: Option<BasicUser>,
}

/// Serves `cfg` on `listener` until `stop`: the API (with `reader`, or
/// answering that presence is off), the page, and `metrics` at
/// `/metrics` when given.
pub fn serve(
    listener: TcpListener,
    cfg: &HttpConfig,
    reader: Option<StoreReader>,
    metrics: Option<Router>,
    stop: CancellationToken,
) -> std::io::Result<Web> {
    let addr = listener.local_addr()?;
    let page = Arc::new(RwLock::new(cfg.page.clone()));
    let mut guarded = api::routes(reader).merge(page::routes(page.clone()));
    if cfg.guarded() {
        let guard = Guard {
            token: cfg.token.clone(),
            user: cfg.user.clone(),
        };
        guarded = guarded.layer(axum::middleware::from_fn_with_state(guard, check));
    } else {
        // Open on loopback: a web page elsewhere must not reach it by
        // pointing a name of its own at 127.0.0.1 (DNS rebinding).
        guarded = guarded.layer(axum::middleware::from_fn_with_state(addr, local_host));
    }
    let mut app = guarded.fallback(|| async { api::error(StatusCode::NOT_FOUND, "no such path") });
    if let Some(metrics) = metrics {
        app = app.merge(metrics);
    }
    tracing::info!(
        %addr,
        credentials = cfg.guarded(),
        "HTTP on http://{addr}/ (chat page, /api/v1/presence, /api/v1/history, /metrics)"
    );
    tokio::spawn(async move {
        let serving = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "HTTP listener stopped");
        }
    });
    Ok(Web { page, addr })
}

/// Lets a request through whose `Host` names this machine's loopback (or
/// the bound address), whatever the port.
async fn local_host(State(bound): State<SocketAddr>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    match host {
        Some(host) if is_local_host(host, bound) => next.run(request).await,
        _ => api::error(
            StatusCode::FORBIDDEN,
            "the Host header must name this machine (localhost, 127.0.0.1, [::1]); \
             behind a proxy, send one of those or set credentials (--http-token, --http-user)",
        ),
    }
}

fn is_local_host(host: &str, bound: SocketAddr) -> bool {
    // `[::1]:18080`, `127.0.0.1:18080`, `localhost`.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == bound.ip())
}

/// Lets a request with the configured token or user through.
async fn check(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if allowed(&guard, request.headers()) {
        return next.run(request).await;
    }
    let mut response = api::error(
        StatusCode::UNAUTHORIZED,
        "credentials required: Authorization: Bearer TOKEN or basic auth",
    )
    .into_response();
    let challenge = if guard.user.is_some() {
        "Basic realm=\"exproto-adapter\", charset=\"UTF-8\""
    } else {
        "Bearer realm=\"exproto-adapter\""
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

fn allowed(guard: &Guard, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return guard
            .token
            .as_ref()
            .is_some_and(|t| t.matches(rest.as_bytes()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Some(user) = &guard.user else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return false;
        };
        let (name, password) = (&decoded[..colon], &decoded[colon + 1..]);
        // Both compared in full, so the time taken tells nothing of which
        // one was wrong.
        let name_ok = crate::protocol::same_bytes(user.name.as_bytes(), name);
        let password_ok = user.password.matches(password);
        return name_ok & password_ok;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(addr: &str) -> HttpConfig {
        HttpConfig {
            addr: addr.parse().unwrap(),
            token: None,
            user: None,
            page: PageSettings::default(),
        }
    }

    #[test]
    fn beyond_loopback_needs_credentials() {
        assert!(cfg("127.0.0.1:18080").validate().is_ok());
        assert!(cfg("[::1]:18080").validate().is_ok());
        let open = cfg("0.0.0.0:18080").validate().unwrap_err();
        assert!(open.contains("--http-token"), "{open}");
        let mut with_token = cfg("0.0.0.0:18080");
        with_token.token = Some(Secret::new("t"));
        assert!(with_token.validate().is_ok());
        let mut with_user = cfg("192.0.2.1:80");
        with_user.user = Some("ann:pw".parse().unwrap());
        assert!(with_user.validate().is_ok());
        let mut empty = cfg("127.0.0.1:1");
        empty.token = Some(Secret::new(""));
        assert!(empty.validate().is_err());
        assert!("ann".parse::<BasicUser>().is_err());
        assert!(":pw".parse::<BasicUser>().is_err());
        assert!("ann:".parse::<BasicUser>().is_err());
        assert_eq!(
            "ann:p:w".parse::<BasicUser>().unwrap().password.expose(),
            "p:w"
        );
    }

    #[test]
    fn an_open_listener_answers_only_to_local_host_names() {
        let bound: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        for host in [
            "localhost",
            "localhost:18080",
            "LOCALHOST.:1",
            "127.0.0.1:18080",
            "127.0.0.2",
            "[::1]:18080",
            "[::1]",
        ] {
            assert!(is_local_host(host, bound), "{host}");
        }
        for host in [
            "evil.example:18080",
            "evil.example",
            "localhost.evil.example",
            "10.0.0.1:18080",
            "[::2]:18080",
            "",
        ] {
            assert!(!is_local_host(host, bound), "{host}");
        }
    }

    #[test]
    fn credentials_are_checked() {
        let guard = Guard {
            token: Some(Secret::new("s3cret")),
            user: Some("ann:pw".parse().unwrap()),
        };
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            allowed(&guard, &h)
        };
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert!(!allowed(&guard, &HeaderMap::new()));
        assert!(with("Bearer s3cret"));
        assert!(with("bearer s3cret"));
        assert!(!with("Bearer s3cre"));
        assert!(!with("Bearer s3cret2"));
        assert!(with(&basic("ann:pw")));
        assert!(!with(&basic("ann:pwx")));
        assert!(!with(&basic("bob:pw")));
        assert!(!with(&basic("annpw")));
        assert!(!with("Basic !!!"));
        assert!(!with("Digest x"));
        let token_only = Guard {
            token: Some(Secret::new("t")),
            user: None,
        };
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&basic("ann:pw")).unwrap(),
        );
        assert!(!allowed(&token_only, &h));
    }
}
