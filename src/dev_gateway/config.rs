//! The dev gateway's settings: [`GatewayConfig`] for the library and tests,
//! [`GatewayArgs`] for the command line (flags and `EXPROTO_GATEWAY_*`
//! environment variables), and the conversion between them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::auth::{DenyRule, EmqxCompat, Users};
use super::tls::TlsListen;

/// Which of the two handler services EMQX calls (`handler.service_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HandlerMode {
    /// `ConnectionUnaryHandler`: one call per event, at most one in flight
    /// per connection (EMQX's default since 5.1).
    #[default]
    Unary,
    /// The deprecated streaming `ConnectionHandler`: one client stream per
    /// RPC and connection; events on different streams may overtake each
    /// other.
    Stream,
}

/// Everything [`super::DevGateway::start`] needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where raw TCP clients connect (EMQX's exproto listener, `7993`).
    pub listen: SocketAddr,
    /// More TCP listeners, as EMQX's gateway may have several (each its
    /// own port, so the adapter can tell them apart by `sockname`).
    pub also_listen: Vec<SocketAddr>,
    /// A TLS listener (EMQX's `ssl` listener); `None`: none.
    pub tls_listen: Option<TlsListen>,
    /// A stand-in for EMQX's REST API client lists; `None`: none.
    pub api: Option<ApiListen>,
    /// Where UDP clients send datagrams (EMQX's exproto UDP listener); one
    /// connection per peer address. `None`: no UDP listener.
    pub udp_listen: Option<SocketAddr>,
    /// The embedded MQTT broker's listeners (EMQX's `tcp:default` and
    /// `ws:default`); both `None` (the default here): no broker. Unused
    /// with `mqtt`, which routes through an external broker instead.
    pub broker: BrokerListen,
    /// Where the ConnectionAdapter gRPC service listens (EMQX's
    /// `gateway.exproto.server.bind`, `9100`).
    pub adapter_listen: SocketAddr,
    /// The adapter's handler service (`gateway.exproto.handler.address`).
    pub handler: String,
    /// EMQX's `handler.service_name`: the adapter serves both, and must
    /// cope with either.
    pub handler_mode: HandlerMode,
    /// Stream mode only: send a connection's first bytes before its
    /// `OnSocketCreated`, the reordering EMQX's streams allow, so the
    /// adapter's buffering of early events gets exercised.
    pub created_late: bool,
    /// A socket that sends no byte within this time is closed silently.
    pub idle_timeout: Duration,
    /// A handler call that takes longer fails, and its connection closes.
    pub handler_timeout: Duration,
    /// With [`EmqxCompat::V5_1`]: how long a handler call that cannot reach
    /// the handler (connection refused or cut, no HTTP/2 connection) keeps
    /// being tried before it fails and its connection closes. EMQX 5.1's
    /// gRPC client waits for the handler this way, which is what lets an
    /// adapter restart lose no event there; 5.8.9 turned it off, so under
    /// [`EmqxCompat::V5_8`] such a call fails at once and this is unused.
    pub handler_retry: Duration,
    /// How long an adapter call waits for the connection process before it
    /// answers "Connection is not answered" (EMQX: 5 s).
    pub call_timeout: Duration,
    /// Known users; `None` accepts any credentials.
    pub users: Option<Users>,
    /// Which EMQX release to follow where they differ: the choice of
    /// authentication chain, and what a call does while the handler is away.
    pub emqx_compat: EmqxCompat,
    /// Authorization rules for Publish and Subscribe.
    pub deny: Vec<DenyRule>,
    /// `mqtt://[user[:password]@]host[:port]`: route pub/sub through this
    /// broker instead of the in-memory router.
    pub mqtt: Option<String>,
    /// The node name put in every delivered `Message` and every hook
    /// call.
    pub node: String,
    /// A `HookProvider` to report to, as EMQX's `exhook.servers[].url`
    /// (plain `http://`): client connects and disconnects, and published
    /// messages. `None` reports nothing.
    pub exhook: Option<String>,
    /// With an `https://` `exhook` URL: the CA that signed the hook
    /// server's certificate (else the system's roots), and a client
    /// certificate and key for mutual TLS (EMQX's `exhook.servers[].ssl`).
    pub exhook_tls: crate::tls::EmqxTlsFiles,
    /// Client sockets beyond this many are closed at once.
    pub max_connections: usize,
    /// Per connection: handler events waiting for their call, and adapter
    /// calls and deliveries waiting for the connection process. Reading from
    /// the socket pauses while the event queue is full; deliveries beyond it
    /// are dropped, like EMQX's bounded message queue.
    pub queue_limit: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7993)),
            also_listen: Vec::new(),
            tls_listen: None,
            api: None,
            udp_listen: None,
            broker: BrokerListen::default(),
            adapter_listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            handler: "http://127.0.0.1:9001".to_owned(),
            handler_mode: HandlerMode::Unary,
            created_late: false,
            idle_timeout: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(5),
            // Measured: every waiting connection of an EMQX 5.1.0 node closed
            // about 25 s after its adapter died.
            handler_retry: Duration::from_secs(25),
            call_timeout: Duration::from_secs(5),
            users: None,
            emqx_compat: EmqxCompat::default(),
            deny: Vec::new(),
            mqtt: None,
            node: "emqx@127.0.0.1".to_owned(),
            exhook: None,
            exhook_tls: crate::tls::EmqxTlsFiles::default(),
            max_connections: 100_000,
            queue_limit: 1_000,
        }
    }
}

impl GatewayConfig {
    /// A config for tests: both listeners on 127.0.0.1 port 0, the given
    /// handler, everything else default.
    pub fn for_tests(handler: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            adapter_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            handler: handler.into(),
            ..Self::default()
        }
    }

    /// # Errors
    /// Settings that contradict each other or cannot be used.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.created_late && self.handler_mode != HandlerMode::Stream {
            anyhow::bail!(
                "created_late needs the stream handler service (--handler-service stream)"
            );
        }
        if self.queue_limit == 0 || self.max_connections == 0 {
            anyhow::bail!("queue_limit and max_connections must be at least 1");
        }
        if self.idle_timeout.is_zero() || self.call_timeout.is_zero() {
            anyhow::bail!("idle_timeout and call_timeout must be positive");
        }
        tonic::transport::Endpoint::from_shared(self.handler.clone())
            .with_context(|| format!("bad handler URL {:?}", self.handler))?;
        if let Some(url) = &self.mqtt {
            MqttUrl::parse(url)?;
        }
        if let Some(url) = &self.exhook {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                anyhow::bail!("exhook URL {url:?}: use http:// or https://");
            }
            if url.starts_with("http://") && self.exhook_tls.is_set() {
                anyhow::bail!(
                    "exhook TLS files are set but the exhook URL {url:?} is not https://"
                );
            }
            tonic::transport::Endpoint::from_shared(url.clone())
                .with_context(|| format!("bad exhook URL {url:?}"))?;
        } else if self.exhook_tls.is_set() {
            anyhow::bail!("exhook TLS files without an exhook URL");
        }
        Ok(())
    }

    /// How long a call that cannot reach the handler is tried again: `None`
    /// where it fails at once (EMQX 5.8, or a zero bound).
    pub(crate) fn unreachable_retry(&self) -> Option<Duration> {
        match self.emqx_compat {
            EmqxCompat::V5_1 if !self.handler_retry.is_zero() => Some(self.handler_retry),
            _ => None,
        }
    }
}

/// The dev gateway's command-line flags. Each has an `EXPROTO_GATEWAY_*`
/// environment variable, so the adapter's own `EXPROTO_*` settings in the
/// same environment do not leak into it.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address for raw TCP clients (EMQX's exproto TCP listener). Repeat
    /// the flag (comma-separated in the environment variable) for several
    /// listeners, as EMQX may have, e.g. one per protocol.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_LISTEN",
        default_value = "127.0.0.1:7993",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub listen: Vec<SocketAddr>,

    /// Address for TLS clients (EMQX's exproto `ssl` listener), with
    /// --tls-cert and --tls-key. Off if unset.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_TLS_LISTEN",
        value_name = "ADDR",
        requires_all = ["tls_cert", "tls_key"]
    )]
    pub tls_listen: Option<SocketAddr>,

    /// Serve a stand-in for EMQX's REST API client lists here
    /// (`/api/v5/nodes`, `/gateways`, `/clients`,
    /// `/gateways/exproto/clients`), for the adapter's --emqx-api, with
    /// --api-key and --api-secret. Off if unset.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_API_LISTEN",
        value_name = "ADDR",
        requires_all = ["api_key", "api_secret"]
    )]
    pub api_listen: Option<SocketAddr>,

    /// The API key the REST API stand-in accepts.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_API_KEY",
        value_name = "KEY",
        requires = "api_listen"
    )]
    pub api_key: Option<String>,

    /// The API key's secret.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_API_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        requires = "api_listen"
    )]
    pub api_secret: Option<String>,

    /// PEM certificate chain of the TLS listener.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_TLS_CERT",
        value_name = "PEM",
        requires = "tls_listen"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_TLS_KEY",
        value_name = "PEM",
        requires = "tls_listen"
    )]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) for client certificates on the TLS listener:
    /// a client that presents one it did not sign is refused, one that
    /// presents none is let in (EMQX's `verify_peer` without
    /// `fail_if_no_peer_cert`), and a certificate's CN reaches the adapter
    /// in ConnInfo.peercert. Without it no certificate is asked for.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_listen"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Address for UDP chat clients (EMQX's exproto UDP listener): each
    /// peer address is one connection, each datagram one `OnReceivedBytes`.
    /// Off if unset.
    #[arg(long, env = "EXPROTO_GATEWAY_UDP_LISTEN", value_name = "ADDR")]
    pub udp_listen: Option<SocketAddr>,

    /// Address for MQTT clients (3.1.1 and 5) of the embedded broker, as
    /// EMQX's `tcp:default` listener; `off` for none. A port that is taken
    /// is reported and left out. Unused with --mqtt.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_MQTT_LISTEN",
        default_value = "127.0.0.1:1883",
        value_name = "ADDR|off"
    )]
    pub mqtt_listen: OptionalAddr,

    /// Address for MQTT over WebSocket (path `/mqtt`) of the embedded
    /// broker, as EMQX's `ws:default` listener, for browsers; `off` for
    /// none. Unused with --mqtt.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_WS_LISTEN",
        default_value = "127.0.0.1:8083",
        value_name = "ADDR|off"
    )]
    pub ws_listen: OptionalAddr,

    /// Address of the ConnectionAdapter gRPC service that the adapter calls
    /// (EMQX's gateway.exproto.server.bind).
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_ADAPTER_LISTEN",
        default_value = "127.0.0.1:9100"
    )]
    pub adapter_listen: SocketAddr,

    /// URL of the adapter's handler service that the gateway calls for every
    /// socket event (EMQX's gateway.exproto.handler.address).
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_HANDLER",
        default_value = "http://127.0.0.1:9001"
    )]
    pub handler: String,

    /// Which handler service to call: `unary` (ConnectionUnaryHandler, one
    /// call at a time per connection, the default) or `stream` (the
    /// deprecated streaming ConnectionHandler, where events may overtake
    /// each other).
    #[arg(
        long = "handler-service",
        env = "EXPROTO_GATEWAY_HANDLER_SERVICE",
        value_enum,
        default_value_t = HandlerMode::Unary
    )]
    pub handler_service: HandlerMode,

    /// With `--handler-service stream`: send each connection's first bytes
    /// before its OnSocketCreated, to test that the adapter keeps early
    /// events.
    #[arg(long, env = "EXPROTO_GATEWAY_CREATED_LATE")]
    pub created_late: bool,

    /// Close a client socket that sends no byte at all within this many
    /// seconds, without a word to the client (EMQX's idle_timeout).
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_IDLE_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 30
    )]
    pub idle_timeout: u64,

    /// File of `username password` lines (`#` starts a comment). When given,
    /// Authenticate with an unknown user or a wrong password is refused with
    /// PERMISSION_DENY; without it anyone may connect.
    #[arg(long, env = "EXPROTO_GATEWAY_USERS", value_name = "FILE")]
    pub users: Option<PathBuf>,

    /// Which EMQX release to behave like where they differ: `5.8` (5.8.8 and
    /// later, the default) or `5.1` (5.1.0 to 5.8.7). They choose the
    /// authentication chain by the `proto_name` of Authenticate: on both,
    /// `exproto` meets --users; on 5.1 so does any name but another
    /// gateway's, while on 5.8 an unknown name skips authentication
    /// altogether (EMQX logs `failed_to_execute` and lets anyone in). They
    /// also differ while the handler cannot be reached: see
    /// --handler-retry.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_EMQX_COMPAT",
        value_enum,
        value_name = "VERSION",
        default_value_t = EmqxCompat::V5_8
    )]
    pub emqx_compat: EmqxCompat,

    /// With `--emqx-compat 5.1`: how many seconds a handler call keeps being
    /// tried while the handler cannot be reached (connection refused, no
    /// HTTP/2 connection), as EMQX 5.1's gRPC client does; that
    /// connection's later events wait behind it. Past it the call fails and
    /// the client is closed. `--emqx-compat 5.8` has no such wait (EMQX
    /// 5.8.9 turned it off): the call fails and the client is closed at
    /// once. An error status that the handler answers closes the client at
    /// once on both.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_HANDLER_RETRY",
        value_name = "SECONDS",
        default_value_t = 25
    )]
    pub handler_retry: u64,

    /// Refuse Publish and/or Subscribe with PERMISSION_DENY ("Authorization
    /// deny") on matching topics: `publish:FILTER`, `subscribe:FILTER` or
    /// `all:FILTER`, e.g. `publish:chat/secret/#`. Repeat the flag for more
    /// rules (comma-separated in the environment variable).
    #[arg(
        long = "deny",
        env = "EXPROTO_GATEWAY_DENY",
        value_name = "RULE",
        value_delimiter = ','
    )]
    pub deny: Vec<DenyRule>,

    /// Route publish/subscribe through a real MQTT broker,
    /// `mqtt://[user[:password]@]host[:port]`, one MQTT session per
    /// authenticated connection, so MQTT clients and chat clients see each
    /// other. Without it, pub/sub stays inside the gateway.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_MQTT",
        value_name = "URL",
        hide_env_values = true
    )]
    pub mqtt: Option<String>,

    /// Node name reported in every delivered message and hook call.
    #[arg(long, env = "EXPROTO_GATEWAY_NODE", default_value = "emqx@127.0.0.1")]
    pub node: String,

    /// Report to this ExHook server (`HookProvider`, emqx.exhook.v3) as
    /// EMQX does for `exhook.servers[].url`: client connects and
    /// disconnects, and every message published through the gateway, for
    /// presence and history. E.g. the adapter's --exhook-listen,
    /// `http://127.0.0.1:9000`.
    #[arg(long, env = "EXPROTO_GATEWAY_EXHOOK", value_name = "URL")]
    pub exhook: Option<String>,

    /// With an `https://` --exhook: PEM CA that signed the hook server's
    /// certificate (default: the system's roots).
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_EXHOOK_CA",
        value_name = "PEM",
        requires = "exhook"
    )]
    pub exhook_ca: Option<PathBuf>,

    /// With an `https://` --exhook: PEM client certificate for mutual TLS
    /// (with --exhook-key).
    #[arg(long, env = "EXPROTO_GATEWAY_EXHOOK_CERT", value_name = "PEM", requires_all = ["exhook", "exhook_key"])]
    pub exhook_cert: Option<PathBuf>,

    /// PEM private key of --exhook-cert.
    #[arg(
        long,
        env = "EXPROTO_GATEWAY_EXHOOK_KEY",
        value_name = "PEM",
        requires = "exhook_cert"
    )]
    pub exhook_key: Option<PathBuf>,
}

impl GatewayArgs {
    /// Builds the config, reading the users file.
    ///
    /// # Errors
    /// An unreadable users file or contradictory settings.
    pub fn into_config(self) -> anyhow::Result<GatewayConfig> {
        let users = match &self.users {
            Some(path) => Some(Users::load(path)?),
            None => None,
        };
        let (listen, also_listen) = self
            .listen
            .split_first()
            .context("--listen needs an address")?;
        let tls_listen = match (self.tls_listen, self.tls_cert, self.tls_key) {
            (Some(addr), Some(cert), Some(key)) => Some(TlsListen {
                addr,
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            (None, ..) => None,
            _ => anyhow::bail!("--tls-listen needs --tls-cert and --tls-key"),
        };
        let api = match (self.api_listen, self.api_key, self.api_secret) {
            (Some(addr), Some(key), Some(secret)) if !key.is_empty() => Some(ApiListen {
                addr,
                key,
                secret: crate::protocol::Secret::new(secret),
            }),
            (None, ..) => None,
            _ => anyhow::bail!("--api-listen needs a non-empty --api-key and an --api-secret"),
        };
        let cfg = GatewayConfig {
            listen: *listen,
            api,
            also_listen: also_listen.to_vec(),
            tls_listen,
            udp_listen: self.udp_listen,
            broker: BrokerListen {
                mqtt: self.mqtt_listen.0,
                ws: self.ws_listen.0,
            },
            adapter_listen: self.adapter_listen,
            handler: self.handler,
            handler_mode: self.handler_service,
            created_late: self.created_late,
            idle_timeout: Duration::from_secs(self.idle_timeout),
            users,
            emqx_compat: self.emqx_compat,
            handler_retry: Duration::from_secs(self.handler_retry),
            deny: self.deny,
            mqtt: self.mqtt,
            node: self.node,
            exhook: self.exhook,
            exhook_tls: crate::tls::EmqxTlsFiles {
                ca: self.exhook_ca,
                cert: self.exhook_cert,
                key: self.exhook_key,
            },
            ..GatewayConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl TryFrom<GatewayArgs> for GatewayConfig {
    type Error = anyhow::Error;

    fn try_from(args: GatewayArgs) -> anyhow::Result<Self> {
        args.into_config()
    }
}

/// Where the REST API stand-in listens, and the one API key it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiListen {
    pub addr: SocketAddr,
    pub key: String,
    pub secret: crate::protocol::Secret,
}

/// Where the embedded MQTT broker listens; `None`: not on that transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerListen {
    pub mqtt: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
}

/// An address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("{s:?}: expected IP:PORT or off"))
    }
}

/// A parsed `mqtt://` broker URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct MqttUrl {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for MqttUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

impl MqttUrl {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .with_context(|| format!("MQTT URL {url:?} must start with mqtt://"))?;
        let rest = rest.trim_end_matches('/');
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((user.to_owned(), pass.to_owned())), hostport)
            }
            None => (None, rest),
        };
        let bad_port = || format!("bad port in MQTT URL {url:?}");
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            let (host, after) = inner
                .split_once(']')
                .with_context(|| format!("unclosed [ in MQTT URL {url:?}"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => port.parse().with_context(bad_port)?,
                None if after.is_empty() => 1883,
                None => anyhow::bail!(bad_port()),
            };
            (host, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().with_context(bad_port)?),
                None => (hostport, 1883),
            }
        };
        if host.is_empty() {
            anyhow::bail!("MQTT URL {url:?} has no host");
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            credentials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        gw: GatewayArgs,
    }

    #[test]
    fn listeners_repeat_and_tls_needs_its_files() {
        let cfg = Cli::parse_from([
            "x",
            "--listen",
            "127.0.0.1:7993",
            "--listen",
            "127.0.0.1:7994",
        ])
        .gw
        .into_config()
        .unwrap();
        assert_eq!(cfg.listen.port(), 7993);
        assert_eq!(cfg.also_listen, ["127.0.0.1:7994".parse().unwrap()]);
        assert_eq!(cfg.tls_listen, None);
        let cfg = Cli::parse_from([
            "x",
            "--tls-listen",
            "127.0.0.1:7995",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ])
        .gw
        .into_config()
        .unwrap();
        let tls = cfg.tls_listen.unwrap();
        assert_eq!((tls.addr.port(), tls.client_ca), (7995, None));
        assert!(Cli::try_parse_from(["x", "--tls-listen", "127.0.0.1:7995"]).is_err());
        assert!(Cli::try_parse_from(["x", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).is_err());
    }

    #[test]
    fn defaults_match_emqx_conventions() {
        let cfg = Cli::parse_from(["x"]).gw.into_config().unwrap();
        assert_eq!(cfg.listen.port(), 7993);
        assert_eq!(cfg.adapter_listen.port(), 9100);
        assert_eq!(cfg.handler, "http://127.0.0.1:9001");
        assert_eq!(cfg.handler_mode, HandlerMode::Unary);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(30));
        assert!(cfg.users.is_none() && cfg.deny.is_empty() && cfg.mqtt.is_none());
        assert_eq!(cfg.emqx_compat, EmqxCompat::V5_8);
        assert_eq!(cfg.handler_retry, Duration::from_secs(25));
        assert_eq!(cfg.unreachable_retry(), None);
    }

    #[test]
    fn only_5_1_waits_for_an_unreachable_handler() {
        let cfg = Cli::parse_from(["x", "--emqx-compat", "5.1", "--handler-retry", "7"])
            .gw
            .into_config()
            .unwrap();
        assert_eq!(cfg.unreachable_retry(), Some(Duration::from_secs(7)));
        let cfg = Cli::parse_from(["x", "--emqx-compat", "5.1", "--handler-retry", "0"])
            .gw
            .into_config()
            .unwrap();
        assert_eq!(cfg.unreachable_retry(), None);
        let cfg = Cli::parse_from(["x", "--emqx-compat", "5.8", "--handler-retry", "7"])
            .gw
            .into_config()
            .unwrap();
        assert_eq!(cfg.unreachable_retry(), None);
    }

    #[test]
    fn emqx_compat_names_the_release() {
        let cfg = Cli::parse_from(["x", "--emqx-compat", "5.1"])
            .gw
            .into_config()
            .unwrap();
        assert_eq!(cfg.emqx_compat, EmqxCompat::V5_1);
        let cfg = Cli::parse_from(["x", "--emqx-compat", "5.8"])
            .gw
            .into_config()
            .unwrap();
        assert_eq!(cfg.emqx_compat, EmqxCompat::V5_8);
        assert!(Cli::try_parse_from(["x", "--emqx-compat", "4.4"]).is_err());
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::parse_from([
            "x",
            "--listen",
            "0.0.0.0:1",
            "--handler-service",
            "stream",
            "--created-late",
            "--idle-timeout",
            "3",
            "--deny",
            "publish:a/#",
            "--deny",
            "subscribe:b",
            "--mqtt",
            "mqtt://127.0.0.1:1883",
            "--exhook",
            "http://127.0.0.1:9000",
        ]);
        let cfg = cli.gw.into_config().unwrap();
        assert_eq!(cfg.exhook.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(cfg.handler_mode, HandlerMode::Stream);
        assert!(cfg.created_late);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(3));
        assert_eq!(cfg.deny.len(), 2);
        assert_eq!(cfg.mqtt.as_deref(), Some("mqtt://127.0.0.1:1883"));
    }

    #[test]
    fn created_late_needs_stream_mode() {
        let cli = Cli::parse_from(["x", "--created-late"]);
        assert!(cli.gw.into_config().is_err());
    }

    #[test]
    fn exhook_urls_are_http_or_https_and_tls_files_need_https() {
        let cli = Cli::parse_from(["x", "--exhook", "https://localhost:9000"]);
        assert!(cli.gw.into_config().is_ok());
        let cli = Cli::parse_from(["x", "--exhook", "127.0.0.1:9000"]);
        assert!(cli.gw.into_config().is_err());
        let cli = Cli::parse_from([
            "x",
            "--exhook",
            "http://127.0.0.1:9000",
            "--exhook-ca",
            "ca.pem",
        ]);
        let e = cli.gw.into_config().unwrap_err().to_string();
        assert!(e.contains("not https://"), "{e}");
        assert!(Cli::try_parse_from(["x", "--exhook-ca", "ca.pem"]).is_err());
        let cfg = Cli::parse_from(["x"]).gw.into_config().unwrap();
        assert!(cfg.exhook.is_none(), "off by default");
    }

    #[test]
    fn bad_deny_rule_is_a_parse_error() {
        assert!(Cli::try_parse_from(["x", "--deny", "nope"]).is_err());
    }

    #[test]
    fn help_explains_every_flag_and_its_env_var() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "listen",
            "adapter-listen",
            "handler",
            "handler-service",
            "created-late",
            "idle-timeout",
            "users",
            "emqx-compat",
            "handler-retry",
            "deny",
            "mqtt",
            "exhook",
        ] {
            assert!(help.contains(&format!("--{flag}")), "--{flag}");
            let env = format!("EXPROTO_GATEWAY_{}", flag.replace('-', "_").to_uppercase());
            assert!(help.contains(&env), "{env}");
        }
    }

    #[test]
    fn mqtt_urls() {
        let u = MqttUrl::parse("mqtt://127.0.0.1:1883").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.credentials),
            ("127.0.0.1", 1883, None)
        );
        let u = MqttUrl::parse("mqtt://localhost").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("localhost", 1883));
        let u = MqttUrl::parse("mqtt://bob:pw@h:1").unwrap();
        assert_eq!(u.credentials, Some(("bob".into(), "pw".into())));
        assert!(!format!("{u:?}").contains("pw"));
        let u = MqttUrl::parse("mqtt://[::1]:1884").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1884));
        assert!(MqttUrl::parse("http://h").is_err());
        assert!(MqttUrl::parse("mqtt://h:x").is_err());
        assert!(MqttUrl::parse("mqtt://").is_err());
    }
}
