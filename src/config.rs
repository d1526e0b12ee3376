//! Command-line and environment settings of `serve`, and their checks.
//!
//! Every flag can also come from an environment variable named after it:
//! upper case, `-` as `_`, `EXPROTO_` in front (`--login-timeout` is
//! `EXPROTO_LOGIN_TIMEOUT`). Times are plain seconds, fractions allowed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::protocol::ProtocolConfig;
use crate::server::AdapterConfig;
use crate::session::DriverConfig;
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

/// Flags of `exproto-adapter serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the handler gRPC services listen on; EMQX's
    /// `gateway.exproto.handler.address` points here.
    #[arg(long, env = "EXPROTO_LISTEN", default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,

    /// URL of EMQX's ConnectionAdapter service
    /// (`gateway.exproto.server.bind`).
    #[arg(long, env = "EXPROTO_EMQX", default_value = "http://127.0.0.1:9100")]
    pub emqx: String,

    /// Protocol the clients speak.
    #[arg(long, env = "EXPROTO_PROTOCOL", default_value = "chat", value_parser = clap::builder::PossibleValuesParser::new(crate::protocol::NAMES))]
    pub protocol: String,

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
        AdapterConfig {
            listen: self.listen,
            emqx: self.emqx.clone(),
            call_timeout: self.call_timeout,
            protocol_name: self.protocol.clone(),
            protocol: ProtocolConfig {
                max_line: self.max_line,
                login_timeout: self.login_timeout,
                keepalive: self.keepalive,
                max_subscriptions: self.max_subscriptions,
                max_publish_rate: self.max_publish_rate,
            },
            driver: DriverConfig {
                send_retry: self.send_retry,
                created_wait: self.created_wait,
                max_held_bytes: self.max_line,
                max_queued_events: self.max_queued_events.max(1),
                idle_probe: self.idle_probe,
                max_sessions: self.max_sessions,
                max_pending_calls: usize::try_from(self.max_pending_calls).unwrap_or(usize::MAX),
                // A call may wait for a place as long as it may wait for
                // EMQX: either way the command ends in a 503 in time.
                pending_wait: self.call_timeout,
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
