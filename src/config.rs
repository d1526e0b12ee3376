//! Command-line and environment settings of `serve`, and their checks.
//!
//! Every flag can also come from an environment variable named after it:
//! upper case, `-` as `_`, `EXPROTO_` in front (`--login-timeout` is
//! `EXPROTO_LOGIN_TIMEOUT`). Times are plain seconds, fractions allowed.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::protocol::ProtocolConfig;
use crate::server::AdapterConfig;
use crate::session::DriverConfig;

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

    /// Events queued or being handled across all connections before the
    /// adapter answers EMQX later (back-pressure on connection storms).
    #[arg(long, env = "EXPROTO_MAX_PENDING_EVENTS", default_value_t = 1024)]
    pub max_pending_events: usize,

    /// HTTP/2 streams per EMQX connection to the handler; 0 is unlimited
    /// (the default: streaming mode holds up to five per client).
    #[arg(long, env = "EXPROTO_MAX_STREAMS", default_value_t = 0)]
    pub max_streams: u32,
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
            },
            driver: DriverConfig {
                send_retry: self.send_retry,
                created_wait: self.created_wait,
                max_held_bytes: self.max_line,
                max_queued_events: self.max_queued_events.max(1),
                max_pending_events: self.max_pending_events.max(1),
                idle_probe: self.idle_probe,
            },
            max_concurrent_streams: (self.max_streams > 0).then_some(self.max_streams),
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
    }
}
