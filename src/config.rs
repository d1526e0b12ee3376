//! Command-line and environment settings of `serve`, and their checks.
//!
//! Every flag can also come from an environment variable named after it:
//! upper case, `-` as `_`, `EXPROTO_` in front (`--login-timeout` is
//! `EXPROTO_LOGIN_TIMEOUT`). Times are plain seconds, fractions allowed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::exhook::HookConfig;
use crate::protocol::lines::{check_template, LinesConfig};
use crate::protocol::topic;
use crate::protocol::{ClientidPolicy, ProtocolConfig};
use crate::server::AdapterConfig;
use crate::server::{PresenceConfig, UpgradeConfig};
use crate::session::DriverConfig;
use crate::store::{Retention, StoreUrl};
use crate::tls::{EmqxTlsFiles, ServerTlsFiles};

/// Parses a duration given in plain seconds (`2`, `0.5`, `0`).
///
/// # Errors
/// A value that is not a non-negative number of seconds.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 30 or 0.5)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: seconds must be zero or more"));
    }
    if v > 1e9 {
        return Err(format!("{s:?}: too many seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_positive_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_seconds(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero seconds"));
    }
    Ok(d)
}

fn parse_max_line(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !(16..=16 * 1024 * 1024).contains(&v) {
        return Err(format!("{v} bytes: must be between 16 and 16777216"));
    }
    Ok(v)
}

fn parse_filter(s: &str) -> Result<String, String> {
    let f = s.trim();
    topic::validate_filter(f).map_err(|e| format!("{f:?}: {e}"))?;
    Ok(f.to_string())
}

fn parse_list_max(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(1..=10_000).contains(&v) {
        return Err(format!("{v}: must be between 1 and 10000"));
    }
    Ok(v)
}

/// `--listener`'s value: an EMQX listener's port and its protocol's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerProtocol {
    pub port: u16,
    pub protocol: String,
}

impl std::fmt::Display for ListenerProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.port, self.protocol)
    }
}

/// `PORT=PROTOCOL`; whether the protocol exists is checked at start, where
/// the protocols a binary registers are known too.
pub fn parse_listener(s: &str) -> Result<ListenerProtocol, String> {
    let (port, protocol) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PORT=PROTOCOL, e.g. 7994=chat, not {s:?}"))?;
    let port: u16 = port
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    let protocol = protocol.trim();
    if protocol.is_empty() {
        return Err(format!("no protocol named for port {port}"));
    }
    Ok(ListenerProtocol {
        port,
        protocol: protocol.to_owned(),
    })
}

/// A secret, kept out of `Debug` output.
pub fn parse_secret(s: &str) -> Result<crate::protocol::Secret, String> {
    Ok(crate::protocol::Secret::new(s))
}

/// Clients one reconciliation pass reads per node at most.
const RECONCILE_MAX_CLIENTS: usize = 100_000;

/// Parses `--http-user` without ever echoing the value in an error, as
/// clap's own errors would: it holds a password.
#[derive(Clone)]
pub struct BasicUserParser;

impl clap::builder::TypedValueParser for BasicUserParser {
    type Value = crate::web::BasicUser;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        value.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                "--http-user: expected USER:PASSWORD, both non-empty (the value given is not shown)\n",
            )
            .with_cmd(cmd)
        })
    }
}

fn parse_ws_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("ws://")
        .or_else(|| s.strip_prefix("wss://"))
        .ok_or_else(|| format!("{s:?}: expected ws://HOST:PORT/PATH or wss://..."))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{s:?}: no host"));
    }
    Ok(s.to_owned())
}

fn parse_emqx_api(s: &str) -> Result<String, String> {
    crate::exhook::EmqxApi::new(s, "check", &crate::protocol::Secret::default())
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_lines_topic(s: &str) -> Result<String, String> {
    check_template(s, false).map(|()| s.to_owned())
}

fn parse_lines_filter(s: &str) -> Result<String, String> {
    check_template(s, true).map(|()| s.to_owned())
}

/// Parses `--clientid-policy` (`username` or `any`).
///
/// # Errors
/// Any other word.
pub fn parse_clientid_policy(s: &str) -> Result<ClientidPolicy, String> {
    s.trim().parse()
}

/// Parses a store URL (`sqlite:PATH`, `sqlite::memory:`,
/// `postgres://...`).
///
/// # Errors
/// A URL of another kind.
pub fn parse_store(s: &str) -> Result<StoreUrl, String> {
    let ok =
        s.starts_with("sqlite:") || s.starts_with("postgres://") || s.starts_with("postgresql://");
    if !ok {
        return Err("use sqlite:PATH, sqlite::memory: or postgres://user@host/db".to_string());
    }
    Ok(StoreUrl::new(s))
}

/// Flags of `exproto-adapter serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file of settings, keyed by these flags' names
    /// (`login_timeout = 10`); the environment and flags override it.
    #[arg(long, env = "EXPROTO_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Serve Prometheus metrics on this address (`GET /metrics`). With
    /// --http, leave it out: that listener serves /metrics too.
    #[arg(long, env = "EXPROTO_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// The HTTP listener: the chat page at `/`, the JSON API
    /// (`/api/v1/presence`, `/api/v1/history`) and `/metrics`. Beyond a
    /// loopback address it needs --http-token or --http-user.
    #[arg(long, env = "EXPROTO_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// Let HTTP requests in with `Authorization: Bearer TOKEN` (scripts).
    #[arg(long, env = "EXPROTO_HTTP_TOKEN", value_name = "TOKEN", hide_env_values = true, value_parser = parse_secret, requires = "http")]
    pub http_token: Option<crate::protocol::Secret>,

    /// Let HTTP requests in with these basic-auth credentials, which a
    /// browser asks for when it opens the page.
    #[arg(
        long,
        env = "EXPROTO_HTTP_USER",
        value_name = "USER:PASSWORD",
        hide_env_values = true,
        value_parser = BasicUserParser,
        requires = "http"
    )]
    pub http_user: Option<crate::web::BasicUser>,

    /// The URL of EMQX's MQTT-over-WebSocket listener that the chat page
    /// connects to (default: the page's host, port 8083, path /mqtt,
    /// EMQX's `ws:default`).
    #[arg(long, env = "EXPROTO_WS_URL", value_name = "URL", value_parser = parse_ws_url, requires = "http")]
    pub ws_url: Option<String>,

    /// Have the chat page ask for a username and password before it
    /// connects, for an EMQX whose MQTT listeners authenticate (without
    /// it, the page connects at once under a generated name).
    #[arg(long, env = "EXPROTO_PAGE_LOGIN", requires = "http")]
    pub page_login: bool,

    /// Address the handler gRPC services listen on; EMQX's
    /// `gateway.exproto.handler.address` points here.
    #[arg(long, env = "EXPROTO_LISTEN", default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,

    /// URL of EMQX's ConnectionAdapter service
    /// (`gateway.exproto.server.bind`).
    #[arg(long, env = "EXPROTO_EMQX", default_value = "http://127.0.0.1:9100")]
    pub emqx: String,

    /// Protocol the clients speak, on every EMQX listener that --listener
    /// does not map to another: a built-in one (chat, lines) or one the
    /// binary registers; an unknown name stops the start, naming the
    /// known ones.
    #[arg(
        long,
        env = "EXPROTO_PROTOCOL",
        default_value = "chat",
        value_name = "NAME"
    )]
    pub protocol: String,

    /// The protocol of one EMQX listener, by its port (ConnInfo.sockname):
    /// `7994=lines`. Repeatable; EXPROTO_LISTENER takes a comma-separated
    /// list, the config file a table (`[listener]` with `7994 = "lines"`).
    #[arg(long = "listener", env = "EXPROTO_LISTENER", value_delimiter = ',', value_parser = parse_listener, value_name = "PORT=PROTOCOL")]
    pub listeners: Vec<ListenerProtocol>,

    /// `lines` protocol: where each record of a device goes;
    /// `{clientid}` stands for the device's clientid.
    #[arg(long, env = "EXPROTO_LINES_UP_TOPIC", default_value = "devices/{clientid}/up", value_parser = parse_lines_topic, value_name = "TEMPLATE")]
    pub lines_up_topic: String,

    /// `lines` protocol: the filter whose messages are written to the
    /// device as lines.
    #[arg(long, env = "EXPROTO_LINES_DOWN_TOPIC", default_value = "devices/{clientid}/down", value_parser = parse_lines_filter, value_name = "TEMPLATE")]
    pub lines_down_topic: String,

    /// `lines` protocol: where `online` and `offline` are published.
    #[arg(long, env = "EXPROTO_LINES_STATUS_TOPIC", default_value = "devices/{clientid}/status", value_parser = parse_lines_topic, value_name = "TEMPLATE")]
    pub lines_status_topic: String,

    /// `lines` protocol: the qos of records, of the down subscription and
    /// of the status.
    #[arg(long, env = "EXPROTO_LINES_QOS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub lines_qos: u8,

    /// EMQX keepalive started after CONNECT, in seconds; a client silent for
    /// about 1-2x this long is disconnected. 0 disables it.
    #[arg(long, env = "EXPROTO_KEEPALIVE", default_value = "60", value_parser = parse_seconds, value_name = "SECONDS")]
    pub keepalive: Duration,

    /// Seconds a client has, from socket creation, to CONNECT before it gets
    /// `ERR 408` and is closed.
    #[arg(long, env = "EXPROTO_LOGIN_TIMEOUT", default_value = "30", value_parser = parse_positive_seconds, value_name = "SECONDS")]
    pub login_timeout: Duration,

    /// Longest accepted line in bytes (LF excluded, CR included); longer
    /// lines get `ERR 413` and are skipped.
    #[arg(long, env = "EXPROTO_MAX_LINE", default_value = "65536", value_parser = parse_max_line, value_name = "BYTES")]
    pub max_line: usize,

    /// Which clientid a user may log in as: `username` (with a username,
    /// the clientid must be the username or the username, `/` and a
    /// suffix, e.g. `alice/phone`; without one any clientid goes) or `any`
    /// (no rule: for anonymous listeners, or when EMQX binds the identity
    /// itself). Others get `ERR 403 :clientid not allowed for this user`.
    #[arg(long, env = "EXPROTO_CLIENTID_POLICY", default_value = "username", value_parser = parse_clientid_policy, value_name = "POLICY")]
    pub clientid_policy: ClientidPolicy,

    /// Subscriptions one connection may hold; over it `SUB` gets `ERR 429`.
    #[arg(long, env = "EXPROTO_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,

    /// Seconds each call to EMQX may take before it counts as unreachable
    /// (the command then gets `ERR 503`).
    #[arg(long, env = "EXPROTO_CALL_TIMEOUT", default_value = "5", value_parser = parse_positive_seconds, value_name = "SECONDS")]
    pub call_timeout: Duration,

    /// Seconds a reply that could not reach EMQX keeps being retried before
    /// it is dropped.
    #[arg(long, env = "EXPROTO_SEND_RETRY", default_value = "30", value_parser = parse_seconds, value_name = "SECONDS")]
    pub send_retry: Duration,

    /// Streaming mode: seconds to hold a connection's events while waiting
    /// for its `OnSocketCreated`, which may arrive after them.
    #[arg(long, env = "EXPROTO_CREATED_WAIT", default_value = "2", value_parser = parse_seconds, value_name = "SECONDS")]
    pub created_wait: Duration,

    /// Seconds of silence after which a session is checked with EMQX and
    /// forgotten if its connection is gone (EMQX can lose `OnSocketClosed`).
    #[arg(long, env = "EXPROTO_IDLE_PROBE", default_value = "120", value_parser = parse_positive_seconds, value_name = "SECONDS")]
    pub idle_probe: Duration,

    /// Events queued per connection before the adapter slows EMQX down by
    /// answering later.
    #[arg(long, env = "EXPROTO_MAX_QUEUED_EVENTS", default_value_t = 64)]
    pub max_queued_events: usize,

    /// Events queued or being handled across all connections before the
    /// adapter answers EMQX later (bounds memory in connection storms).
    #[arg(long, env = "EXPROTO_MAX_PENDING_EVENTS", default_value_t = 1024)]
    pub max_pending_events: usize,

    /// HTTP/2 streams per EMQX connection to the handler; 0 is unlimited
    /// (the default: streaming mode holds up to five per client).
    #[arg(long, env = "EXPROTO_MAX_STREAMS", default_value_t = 0)]
    pub max_streams: u32,

    /// Publishes per second one connection may make (bursts up to that
    /// many); more get `ERR 429`. 0 is no limit.
    #[arg(long, env = "EXPROTO_MAX_PUBLISH_RATE", default_value_t = 0)]
    pub max_publish_rate: u32,

    /// Sessions served at once; a new socket over it gets
    /// `ERR 429 :too many connections` and is closed. 0 is no limit.
    #[arg(long, env = "EXPROTO_MAX_SESSIONS", default_value_t = 100_000)]
    pub max_sessions: usize,

    /// EMQX calls in flight at once over all sessions; a call that waits
    /// longer than --call-timeout for a place fails with `ERR 503`.
    #[arg(long, env = "EXPROTO_MAX_PENDING_CALLS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_calls: u32,

    /// Seconds a shutdown (SIGTERM or SIGINT) lets work in flight finish
    /// while new sockets get `ERR 503 :shutting down`; a second signal
    /// exits at once.
    #[arg(long, env = "EXPROTO_SHUTDOWN_GRACE", default_value = "10", value_parser = parse_seconds, value_name = "SECONDS")]
    pub shutdown_grace: Duration,

    /// PEM certificate (chain) to serve the handler over TLS; EMQX's
    /// `handler.address` is then `https://...` with `handler.ssl_options`.
    #[arg(
        long,
        env = "EXPROTO_TLS_CERT",
        requires = "tls_key",
        value_name = "PEM"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "EXPROTO_TLS_KEY",
        requires = "tls_cert",
        value_name = "PEM"
    )]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s); with it the handler requires EMQX to present
    /// a client certificate signed by one of them (mutual TLS).
    #[arg(
        long,
        env = "EXPROTO_TLS_CLIENT_CA",
        requires = "tls_cert",
        value_name = "PEM"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM CA certificate(s) that signed EMQX's server certificate, for an
    /// `https://` --emqx; without it the system's roots are trusted.
    #[arg(long, env = "EXPROTO_EMQX_CA", value_name = "PEM")]
    pub emqx_ca: Option<PathBuf>,

    /// PEM client certificate the adapter shows EMQX (mutual TLS).
    #[arg(
        long,
        env = "EXPROTO_EMQX_CERT",
        requires = "emqx_key",
        value_name = "PEM"
    )]
    pub emqx_cert: Option<PathBuf>,

    /// PEM private key of --emqx-cert.
    #[arg(
        long,
        env = "EXPROTO_EMQX_KEY",
        requires = "emqx_cert",
        value_name = "PEM"
    )]
    pub emqx_key: Option<PathBuf>,
    /// Address for EMQX's ExHook calls (`exhook.servers[].url`); serving
    /// them enables presence and history (`WHO`, `HISTORY`). Off if unset.
    #[arg(long, env = "EXPROTO_EXHOOK_LISTEN", value_name = "ADDR")]
    pub exhook_listen: Option<SocketAddr>,

    /// Where presence and history are kept: `sqlite:PATH` (created if
    /// missing), `sqlite::memory:` or `postgres://user[:password]@host/db`.
    // The env value stays out of `--help`: it may hold a password.
    #[arg(long, env = "EXPROTO_STORE", hide_env_values = true, default_value = "sqlite:exproto-adapter.db", value_parser = parse_store, value_name = "URL")]
    pub store: StoreUrl,

    /// Topic filters whose messages are kept for `HISTORY`, comma separated.
    #[arg(long, env = "EXPROTO_HISTORY_TOPICS", default_value = "chat/#", value_delimiter = ',', value_parser = parse_filter, value_name = "FILTERS")]
    pub history_topics: Vec<String>,

    /// Messages kept per topic (the newest); 0 keeps all.
    #[arg(long, env = "EXPROTO_HISTORY_MAX_PER_TOPIC", default_value_t = 1000)]
    pub history_max_per_topic: u64,

    /// Seconds a stored message is kept; 0 keeps messages forever.
    #[arg(long, env = "EXPROTO_HISTORY_MAX_AGE", default_value = "604800", value_parser = parse_seconds, value_name = "SECONDS")]
    pub history_max_age: Duration,

    /// Clientids one `WHO` lists at most (the total counts them all).
    #[arg(long, env = "EXPROTO_WHO_MAX", default_value = "100", value_parser = parse_list_max)]
    pub who_max: usize,

    /// The largest `n` of `HISTORY` (messages replayed at most).
    #[arg(long, env = "EXPROTO_HISTORY_MAX", default_value = "100", value_parser = parse_list_max)]
    pub history_max: usize,

    /// Keep every session's state in this directory (a journal), so that
    /// an adapter started again after a crash or a stop restores its
    /// sessions instead of answering `ERR 500 :session lost`. Off if unset.
    #[arg(long, env = "EXPROTO_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// A Unix socket for zero-drop upgrades. A running adapter listens on
    /// it; a new `serve` started with the same path takes over: the
    /// listening sockets and every session pass to it, clients see
    /// nothing, and the old process exits. Without it nothing changes.
    #[arg(long, env = "EXPROTO_UPGRADE_SOCKET", value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,

    /// Exit with an error, instead of starting fresh, when no running
    /// adapter hands over through --upgrade-socket.
    #[arg(long, env = "EXPROTO_UPGRADE_REQUIRED", requires = "upgrade_socket")]
    pub upgrade_required: bool,

    /// Seconds a takeover may take: the running adapter's first answer,
    /// and how long events wait for the sessions still on their way.
    #[arg(long, env = "EXPROTO_UPGRADE_TIMEOUT", default_value = "15", value_parser = parse_positive_seconds, value_name = "SECONDS")]
    pub upgrade_timeout: Duration,

    /// PEM certificate (chain): serve the ExHook listener over TLS (with
    /// --exhook-tls-key); EMQX's `exhook.servers[].url` is then
    /// `https://...` with `ssl.enable = true`.
    #[arg(long, env = "EXPROTO_EXHOOK_TLS_CERT", value_name = "PEM", requires_all = ["exhook_tls_key", "exhook_listen"])]
    pub exhook_tls_cert: Option<PathBuf>,

    /// PEM private key of --exhook-tls-cert.
    #[arg(
        long,
        env = "EXPROTO_EXHOOK_TLS_KEY",
        value_name = "PEM",
        requires = "exhook_tls_cert"
    )]
    pub exhook_tls_key: Option<PathBuf>,

    /// PEM CA: EMQX must show the ExHook listener a client certificate it
    /// signed (mutual TLS; EMQX's `ssl.certfile` and `ssl.keyfile`).
    #[arg(
        long,
        env = "EXPROTO_EXHOOK_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "exhook_tls_cert"
    )]
    pub exhook_tls_client_ca: Option<PathBuf>,

    /// EMQX's REST API (the dashboard listener, e.g.
    /// `http://127.0.0.1:18083`): presence is checked against EMQX's own
    /// client list after the hook server was away, after a node loads the
    /// hook provider, and every --reconcile-every. Needs --emqx-api-key and
    /// --emqx-api-secret. Off if unset: presence then follows the hooks
    /// alone.
    #[arg(long, env = "EXPROTO_EMQX_API", value_name = "URL", value_parser = parse_emqx_api, requires_all = ["emqx_api_key", "emqx_api_secret", "exhook_listen"])]
    pub emqx_api: Option<String>,

    /// The API key for --emqx-api (EMQX's dashboard, System, API Key).
    #[arg(long, env = "EXPROTO_EMQX_API_KEY", value_name = "KEY", requires = "emqx_api", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub emqx_api_key: Option<String>,

    /// The API key's secret. Never logged; prefer the environment variable
    /// to the command line, where other users may see it.
    #[arg(
        long,
        env = "EXPROTO_EMQX_API_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        requires = "emqx_api",
        value_parser = parse_secret
    )]
    pub emqx_api_secret: Option<crate::protocol::Secret>,

    /// Seconds between reconciliations of presence with --emqx-api.
    #[arg(long, env = "EXPROTO_RECONCILE_EVERY", default_value = "300", value_parser = parse_positive_seconds, value_name = "SECONDS")]
    pub reconcile_every: Duration,

    /// Seconds after an EMQX node unloads the hook provider before its
    /// clients are no longer listed as online, unless it loads the
    /// provider again first (EMQX unloads then loads it when the hook
    /// server's settings change; when it stops, it unloads it and closes
    /// its clients without reporting them).
    #[arg(long, env = "EXPROTO_NODE_STOP_GRACE", default_value = "10", value_parser = parse_positive_seconds, value_name = "SECONDS")]
    pub node_stop_grace: Duration,

    /// Hook records (presence changes, messages) waiting for the database
    /// at most; more are dropped and counted so EMQX is never held up.
    #[arg(long, env = "EXPROTO_EXHOOK_QUEUE", default_value_t = 10_000)]
    pub exhook_queue: usize,
}

impl Default for ServeArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: ServeArgs,
        }
        // The defaults live in one place: the attributes above.
        Wrap::parse_from(["serve"]).args
    }
}

impl ServeArgs {
    /// The adapter configuration these flags describe.
    pub fn to_config(&self) -> AdapterConfig {
        let presence = self.exhook_listen.map(|exhook_listen| PresenceConfig {
            exhook_listen,
            store: self.store.clone(),
            hooks: HookConfig {
                history_topics: self.history_topics.clone(),
                queue: self.exhook_queue.max(1),
                retention: Retention {
                    max_per_topic: (self.history_max_per_topic > 0)
                        .then_some(self.history_max_per_topic),
                    max_age: (!self.history_max_age.is_zero()).then_some(self.history_max_age),
                },
                node_stop_grace: self.node_stop_grace,
                ..HookConfig::default()
            },
            read_timeout: self.call_timeout,
            tls: match (&self.exhook_tls_cert, &self.exhook_tls_key) {
                (Some(cert), Some(key)) => Some(ServerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.exhook_tls_client_ca.clone(),
                }),
                _ => None,
            },
            reconcile: self.emqx_api.as_ref().and_then(|url| {
                let key = self.emqx_api_key.as_deref().unwrap_or_default();
                let secret = self.emqx_api_secret.clone().unwrap_or_default();
                // Checked when parsed; a key is required with the URL.
                let api = crate::exhook::EmqxApi::new(url, key, &secret).ok()?;
                Some(crate::exhook::ReconcileConfig {
                    api,
                    every: self.reconcile_every,
                    max_clients: RECONCILE_MAX_CLIENTS,
                })
            }),
        });
        AdapterConfig {
            listen: self.listen,
            emqx: self.emqx.clone(),
            call_timeout: self.call_timeout,
            protocol_name: self.protocol.clone(),
            listeners: self
                .listeners
                .iter()
                .map(|l| (l.port, l.protocol.clone()))
                .collect(),
            protocol: ProtocolConfig {
                max_line: self.max_line,
                login_timeout: self.login_timeout,
                keepalive: self.keepalive,
                max_subscriptions: self.max_subscriptions,
                max_publish_rate: self.max_publish_rate,
                presence_history: presence.is_some(),
                who_max: self.who_max,
                history_max: self.history_max,
                clientid_policy: self.clientid_policy,
                lines: LinesConfig {
                    up_topic: self.lines_up_topic.clone(),
                    down_topic: self.lines_down_topic.clone(),
                    status_topic: self.lines_status_topic.clone(),
                    qos: self.lines_qos,
                },
            },
            driver: DriverConfig {
                send_retry: self.send_retry,
                created_wait: self.created_wait,
                max_held_bytes: self.max_line,
                max_queued_events: self.max_queued_events.max(1),
                max_pending_events: self.max_pending_events.max(1),
                idle_probe: self.idle_probe,
                max_sessions: self.max_sessions,
                max_pending_calls: usize::try_from(self.max_pending_calls).unwrap_or(usize::MAX),
                // A call may wait for a place as long as it may wait for
                // EMQX: either way the command ends in a 503 in time.
                pending_wait: self.call_timeout,
                ..DriverConfig::default()
            },
            max_concurrent_streams: (self.max_streams > 0).then_some(self.max_streams),
            shutdown_grace: self.shutdown_grace,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(ServerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                }),
                // clap makes the two go together.
                _ => None,
            },
            emqx_tls: EmqxTlsFiles {
                ca: self.emqx_ca.clone(),
                cert: self.emqx_cert.clone(),
                key: self.emqx_key.clone(),
            },
            presence,
            state_dir: self.state_dir.clone(),
            metrics: self.metrics,
            http: self.http.map(|addr| crate::web::HttpConfig {
                addr,
                token: self.http_token.clone(),
                user: self.http_user.clone(),
                page: crate::web::PageSettings {
                    ws_url: self.ws_url.clone(),
                    login: self.page_login,
                    ..crate::web::PageSettings::default()
                },
            }),
            upgrade: self.upgrade_socket.as_ref().map(|socket| UpgradeConfig {
                socket: socket.clone(),
                required: self.upgrade_required,
                timeout: self.upgrade_timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_mappings() {
        assert_eq!(
            parse_listener("7994=lines"),
            Ok(ListenerProtocol {
                port: 7994,
                protocol: "lines".into()
            })
        );
        assert_eq!(parse_listener(" 7995 = chat ").unwrap().port, 7995);
        for bad in ["7994", "0=chat", "70000=chat", "x=chat", "7994="] {
            assert!(parse_listener(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("2s").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_positive_seconds("0").is_err());
    }

    #[test]
    fn defaults_match_the_protocol() {
        let c = ServeArgs::default().to_config();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(c.emqx, "http://127.0.0.1:9100");
        assert_eq!(c.protocol.login_timeout, Duration::from_secs(30));
        assert_eq!(c.protocol.keepalive, Duration::from_secs(60));
        assert_eq!(c.protocol.max_line, 65_536);
        assert_eq!(c.protocol.max_subscriptions, 100);
        assert_eq!(c.driver.send_retry, Duration::from_secs(30));
        assert_eq!(c.driver.created_wait, Duration::from_secs(2));
        assert_eq!(c.max_concurrent_streams, None);
        assert_eq!(c.protocol.max_publish_rate, 0, "off by default");
        assert_eq!(c.driver.max_sessions, 100_000);
        assert_eq!(c.driver.max_pending_calls, 1024);
        assert_eq!(c.driver.pending_wait, c.call_timeout);
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        // Presence and history are off until an ExHook address is given.
        assert!(c.presence.is_none());
        assert!(!c.protocol.presence_history);
        assert_eq!((c.protocol.who_max, c.protocol.history_max), (100, 100));
        assert_eq!(c.protocol.clientid_policy, ClientidPolicy::Username);
    }

    #[test]
    fn clientid_policy_flag() {
        let c = serve_args(&["--clientid-policy", "any"])
            .unwrap()
            .to_config();
        assert_eq!(c.protocol.clientid_policy, ClientidPolicy::Any);
        let e = serve_args(&["--clientid-policy", "nobody"]).unwrap_err();
        assert!(e.to_string().contains("use `username` or `any`"), "{e}");
    }

    fn serve_args(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: ServeArgs,
        }
        Wrap::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn presence_and_history_flags() {
        let c = serve_args(&["--exhook-listen", "127.0.0.1:9000"])
            .unwrap()
            .to_config();
        let p = c.presence.expect("enabled");
        assert!(c.protocol.presence_history);
        assert_eq!(p.exhook_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(p.store.expose(), "sqlite:exproto-adapter.db");
        assert_eq!(p.hooks.history_topics, ["chat/#"]);
        assert_eq!(
            p.hooks.retention,
            Retention {
                max_per_topic: Some(1000),
                max_age: Some(Duration::from_secs(604_800)),
            }
        );

        let c = serve_args(&[
            "--exhook-listen",
            "127.0.0.1:0",
            "--store",
            "postgres://u:pw@db/chat",
            "--history-topics",
            "chat/#, news/+",
            "--history-max-per-topic",
            "0",
            "--history-max-age",
            "0",
            "--who-max",
            "5",
            "--history-max",
            "500",
        ])
        .unwrap()
        .to_config();
        let p = c.presence.expect("enabled");
        assert_eq!(p.hooks.history_topics, ["chat/#", "news/+"]);
        assert_eq!(p.hooks.retention, Retention::default());
        assert_eq!((c.protocol.who_max, c.protocol.history_max), (5, 500));
        // The password stays out of debug output.
        assert!(!format!("{p:?}").contains("pw@"));

        assert!(serve_args(&["--history-topics", "chat/#/x"]).is_err());
        assert!(serve_args(&["--store", "mysql://x"]).is_err());
        assert!(serve_args(&["--who-max", "0"]).is_err());
        assert!(serve_args(&["--history-max", "10001"]).is_err());
    }

    #[test]
    fn limit_flags_and_their_environment_variables() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: ServeArgs,
        }
        let c = Wrap::parse_from([
            "serve",
            "--max-publish-rate",
            "5",
            "--max-sessions",
            "7",
            "--max-pending-calls",
            "3",
        ])
        .args
        .to_config();
        assert_eq!(c.protocol.max_publish_rate, 5);
        assert_eq!(c.driver.max_sessions, 7);
        assert_eq!(c.driver.max_pending_calls, 3);
        assert!(Wrap::try_parse_from(["serve", "--max-pending-calls", "0"]).is_err());
        assert!(c.tls.is_none() && !c.emqx_tls.is_set());

        // TLS files come in pairs.
        assert!(Wrap::try_parse_from(["serve", "--tls-cert", "c.pem"]).is_err());
        assert!(Wrap::try_parse_from(["serve", "--emqx-key", "k.pem"]).is_err());
        assert!(Wrap::try_parse_from(["serve", "--tls-client-ca", "ca.pem"]).is_err());
        let c = Wrap::parse_from([
            "serve",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
            "--emqx",
            "https://emqx:9100",
            "--emqx-ca",
            "eca.pem",
        ])
        .args
        .to_config();
        let tls = c.tls.expect("server TLS");
        assert_eq!(tls.cert, PathBuf::from("c.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(c.emqx_tls.ca, Some(PathBuf::from("eca.pem")));
        assert_eq!(c.emqx_tls.cert, None);
        // Every flag has its EXPROTO_ variable (clap knows them by name).
        let cmd = <Wrap as clap::CommandFactory>::command();
        for (flag, var) in [
            ("max_publish_rate", "EXPROTO_MAX_PUBLISH_RATE"),
            ("max_sessions", "EXPROTO_MAX_SESSIONS"),
            ("max_pending_calls", "EXPROTO_MAX_PENDING_CALLS"),
            ("shutdown_grace", "EXPROTO_SHUTDOWN_GRACE"),
            ("tls_cert", "EXPROTO_TLS_CERT"),
            ("tls_key", "EXPROTO_TLS_KEY"),
            ("tls_client_ca", "EXPROTO_TLS_CLIENT_CA"),
            ("emqx_ca", "EXPROTO_EMQX_CA"),
            ("emqx_cert", "EXPROTO_EMQX_CERT"),
            ("emqx_key", "EXPROTO_EMQX_KEY"),
        ] {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == flag)
                .unwrap_or_else(|| panic!("no flag {flag}"));
            assert_eq!(arg.get_env().and_then(|v| v.to_str()), Some(var));
        }
    }
}
