//! The `exproto-adapter` command: serve the handler, run the dev gateway or
//! the demo.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use anyhow::Context;
use exproto_adapter::config::{parse_clientid_policy, parse_seconds, parse_store, ServeArgs};
use exproto_adapter::config::{parse_secret, BasicUserParser};
use exproto_adapter::config_file;
use exproto_adapter::dev_gateway::{ApiListen, DevGateway, GatewayArgs, OptionalAddr};
use exproto_adapter::exhook::{EmqxApi, ReconcileConfig};
use exproto_adapter::protocol::{ClientidPolicy, Secret};
use exproto_adapter::server::{Ended, RunningAdapter, Server};
use exproto_adapter::store::StoreUrl;
use exproto_adapter::web::{BasicUser, HttpConfig, PageSettings};

/// An EMQX ExProto handler: lets raw TCP clients speak a line protocol to
/// the EMQX MQTT broker.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format: `text` for people, `json` (one object per line) for log
    /// collectors. `RUST_LOG` filters either (`RUST_LOG=debug`).
    #[arg(
        long,
        global = true,
        env = "EXPROTO_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve EMQX's ExProto handler services (unary and streaming).
    Serve(Box<ServeArgs>),
    /// Print the configuration `serve` would run with (the same flags,
    /// environment and --config file), each value with its source.
    Config(Box<ServeArgs>),
    /// Run a stand-in for EMQX's ExProto gateway, for development and tests:
    /// a TCP listener for clients, a ConnectionAdapter service, a broker.
    DevGateway(GatewayArgs),
    /// Run the dev gateway and the adapter in one process, ready for
    /// `nc 127.0.0.1 7993`.
    Demo(DemoArgs),
    /// Measure a handler through the dev gateway: messages/s, latency,
    /// CPU and memory.
    Bench(exproto_adapter::bench::BenchArgs),
    /// A reference handler (echo or no-op) that `bench` measures against.
    #[command(hide = true)]
    BenchHandler(exproto_adapter::bench::HandlerArgs),
}

/// Flags of `demo`: the dev gateway's, plus the adapter's protocol settings.
/// The adapter listens where the gateway's `--handler` points and calls the
/// gateway's `--adapter-listen`; unless `--no-presence`, it also serves the
/// ExHook server (on a free port) that the gateway reports to, so `WHO`
/// and `HISTORY` work.
#[derive(clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    gateway: GatewayArgs,

    /// Where presence and history are kept: `sqlite:PATH`,
    /// `sqlite::memory:` or `postgres://user[:password]@host/db`. Default:
    /// a SQLite file in the temporary directory for this run only,
    /// removed at exit.
    #[arg(long, env = "EXPROTO_STORE", hide_env_values = true, value_parser = parse_store, value_name = "URL")]
    store: Option<StoreUrl>,

    /// Run without presence and history: no ExHook server, and `WHO` and
    /// `HISTORY` answer `ERR 501`.
    #[arg(long, conflicts_with = "store")]
    no_presence: bool,

    /// EMQX keepalive started after CONNECT, in seconds; 0 disables it.
    #[arg(long, env = "EXPROTO_KEEPALIVE", default_value = "60", value_parser = parse_seconds, value_name = "SECONDS")]
    keepalive: std::time::Duration,

    /// Seconds a client has to CONNECT before it gets `ERR 408`.
    #[arg(long, env = "EXPROTO_LOGIN_TIMEOUT", default_value = "30", value_parser = parse_seconds, value_name = "SECONDS")]
    login_timeout: std::time::Duration,

    /// Which clientid a user may log in as: `username` (the username, or
    /// the username, `/` and a suffix) or `any`; see `serve --help`.
    #[arg(long, env = "EXPROTO_CLIENTID_POLICY", default_value = "username", value_parser = parse_clientid_policy, value_name = "POLICY")]
    clientid_policy: ClientidPolicy,

    /// Serve the adapter's Prometheus metrics on this address (with
    /// `--http off`; otherwise the HTTP listener serves /metrics).
    #[arg(long, env = "EXPROTO_METRICS", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,

    /// The adapter's HTTP listener: the chat page, the JSON API and
    /// /metrics (`serve --http`); `off` for none.
    #[arg(
        long,
        env = "EXPROTO_HTTP",
        default_value = "127.0.0.1:18080",
        value_name = "ADDR|off"
    )]
    http: OptionalAddr,

    /// Let HTTP requests in with `Authorization: Bearer TOKEN` (needed,
    /// with or instead of --http-user, beyond loopback).
    #[arg(long, env = "EXPROTO_HTTP_TOKEN", value_name = "TOKEN", hide_env_values = true, value_parser = parse_secret)]
    http_token: Option<Secret>,

    /// HTTP basic-auth credentials, which a browser asks for.
    #[arg(long, env = "EXPROTO_HTTP_USER", value_name = "USER:PASSWORD", hide_env_values = true, value_parser = BasicUserParser)]
    http_user: Option<BasicUser>,
}

/// The `host:port` an `http://host:port` URL names.
fn url_addr(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--handler {url:?}: the demo serves plain http://HOST:PORT"))?;
    rest.trim_end_matches('/')
        .parse()
        .with_context(|| format!("--handler {url:?}: expected http://IP:PORT"))
}

/// The demo's default store: a SQLite file of its own per run, so that a
/// new demo never lists clients of an old one as online.
struct RunStore {
    path: std::path::PathBuf,
}

impl RunStore {
    fn new() -> Self {
        let name = format!("exproto-adapter-demo-{}.db", std::process::id());
        Self {
            path: std::env::temp_dir().join(name),
        }
    }

    fn url(&self) -> StoreUrl {
        StoreUrl::new(format!("sqlite:{}", self.path.display()))
    }
}

impl Drop for RunStore {
    /// Removes the database and SQLite's WAL files beside it, on every way
    /// out of the demo but a second signal's immediate exit.
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = ?path, error = %e, "cannot remove the demo database")
                }
            }
        }
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if args.login_timeout.is_zero() {
        anyhow::bail!("--login-timeout must be more than zero seconds");
    }
    if !args.no_presence && args.gateway.exhook.is_some() {
        anyhow::bail!(
            "the demo points the gateway at its own hook server; \
             --exhook goes with --no-presence, or with `dev-gateway`"
        );
    }
    let run_store = (!args.no_presence && args.store.is_none()).then(RunStore::new);
    let store = match (&args.store, &run_store) {
        (Some(url), _) => url.clone(),
        (None, Some(run)) => run.url(),
        (None, None) => ServeArgs::default().store,
    };
    let serve = ServeArgs {
        listen: url_addr(&args.gateway.handler)?,
        emqx: format!("http://{}", args.gateway.adapter_listen),
        keepalive: args.keepalive,
        login_timeout: args.login_timeout,
        clientid_policy: args.clientid_policy,
        // Port 0: the gateway is told the port, nothing else needs it, and
        // a `serve --exhook-listen` elsewhere keeps its own.
        exhook_listen: (!args.no_presence).then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        store,
        ..ServeArgs::default()
    };
    let mut gateway_config = args.gateway.into_config()?;
    let mut adapter_config = serve.to_config();
    adapter_config.metrics = args.metrics;
    adapter_config.http = args.http.0.map(|addr| HttpConfig {
        addr,
        token: args.http_token.clone(),
        user: args.http_user.clone(),
        page: PageSettings {
            // Where anyone may connect the page enters at once.
            login: gateway_config.users.is_some(),
            ..PageSettings::default()
        },
    });
    let adapter = Server::builder(adapter_config).start().await?;
    if let Some(hooks) = adapter.hooks().and_then(|h| h.addr()) {
        gateway_config.exhook = Some(format!("http://{hooks}"));
        // Presence reconciled as beside a real EMQX: the gateway's REST
        // API stand-in on a free port, with a key made up for this run.
        gateway_config.api.get_or_insert_with(|| ApiListen {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            key: "demo".to_owned(),
            secret: Secret::new(format!("{:032x}", rand::random::<u128>())),
        });
        match &run_store {
            Some(_) => tracing::info!(
                store = %serve.store,
                "presence and history in a SQLite file for this run only (removed at exit; --store keeps them elsewhere)"
            ),
            None => {
                tracing::info!(store = %serve.store, "presence and history kept in the given store")
            }
        }
    }
    let api_key = gateway_config.api.clone();
    let gateway = match DevGateway::start(gateway_config).await {
        Ok(g) => g,
        Err(e) => {
            let _ = adapter.shutdown().await;
            return Err(e);
        }
    };
    if let (Some(hooks), Some(api), Some(at)) = (adapter.hooks(), api_key, gateway.api_addr()) {
        let api = EmqxApi::new(&format!("http://{at}"), &api.key, &api.secret)?;
        hooks.reconcile(ReconcileConfig {
            api,
            every: ServeArgs::default().reconcile_every,
            max_clients: 100_000,
        });
    }
    let ws_url = gateway.ws_addr().map(|at| format!("ws://{at}/mqtt"));
    if let Some(web) = adapter.web() {
        web.set_ws_url(ws_url.clone());
        match &ws_url {
            Some(url) => tracing::info!(
                "chat page: http://{}/ (MQTT over WebSocket: {url})",
                web.addr()
            ),
            None => tracing::warn!(
                "chat page: http://{}/, but the embedded broker has no WebSocket listener: \
                 the page will try ws://<its host>:8083/mqtt (see --ws-listen)",
                web.addr()
            ),
        }
    }
    if let Some(at) = gateway.mqtt_addr() {
        tracing::info!(
            "MQTT clients: mqtt://{at} (e.g. mosquitto_sub -h {} -p {} -t 'chat/#' -v)",
            at.ip(),
            at.port()
        );
    }
    let addr = gateway.client_addr();
    tracing::info!(
        "demo ready: connect with `nc {} {}` (clients), handler on {}, ConnectionAdapter on {}, WHO and HISTORY {}",
        addr.ip(),
        addr.port(),
        adapter.addr(),
        gateway.adapter_addr(),
        if args.no_presence { "off" } else { "on" }
    );
    let result = run_until_signalled(adapter, None).await;
    gateway.shutdown().await;
    drop(run_store);
    result
}

/// SIGTERM and SIGINT, as a stream: the first starts a graceful shutdown,
/// the second ends the process at once. One listener for both, set up
/// before serving, so no signal falls between the two.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next signal.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.term) => {}
                () = recv(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Waits for any one signal (for what has nothing to drain).
async fn shutdown_signal() {
    Signals::new().next().await;
}

/// How to start this process again: the same binary path and arguments,
/// for a takeover on SIGHUP (`systemctl reload`).
struct Successor {
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
}

impl Successor {
    fn of_this_process() -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| "exproto-adapter".into());
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        // It must take over, not start beside this one.
        if !args.iter().any(|a| a == "--upgrade-required") {
            args.push("--upgrade-required".into());
        }
        Self { exe, args }
    }

    /// Starts the successor; it takes over through the upgrade socket and
    /// this process exits once it has everything.
    fn spawn(&self) {
        match std::process::Command::new(&self.exe)
            .args(&self.args)
            .spawn()
        {
            Ok(child) => {
                tracing::info!(pid = child.id(), exe = %self.exe.display(), "started a successor to take over")
            }
            Err(e) => {
                tracing::error!(error = %e, exe = %self.exe.display(), "cannot start a successor; this adapter goes on")
            }
        }
    }
}

/// SIGHUP, or never where there is none.
async fn hangup(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Runs the adapter until SIGTERM/SIGINT: the first drains it, a second
/// exits at once. SIGHUP starts a `successor` that takes over (without
/// one, it is ignored).
async fn run_until_signalled(
    mut adapter: RunningAdapter,
    successor: Option<Successor>,
) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut signals = Signals::new();
    let (first, first_rx) = tokio::sync::oneshot::channel::<()>();
    let mut first = Some(first);
    let running = adapter.wait(async {
        let _ = first_rx.await;
    });
    tokio::pin!(running);
    loop {
        tokio::select! {
            r = &mut running => match r? {
                Ended::Stopped => return Ok(()),
                // EMQX's connections to this process close as it exits,
                // which must be now: EMQX is quiet on them at this moment.
                Ended::HandedOver => std::process::exit(0),
            },
            () = hangup(&mut hup) => match &successor {
                Some(s) => s.spawn(),
                None => tracing::warn!("SIGHUP ignored: a takeover needs --upgrade-socket"),
            },
            () = signals.next() => match first.take() {
                Some(first) => {
                    tracing::info!("signal received; a second one exits at once");
                    let _ = first.send(());
                }
                None => {
                    tracing::warn!("second signal; exiting without waiting");
                    std::process::exit(1);
                }
            },
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    // EMQX sends an IP address as TLS SNI, which rustls warns about on
    // every handshake; the server says it once at start instead (RUST_LOG
    // set by hand shows them all).
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{default_level},rustls::msgs::handshake=error"))
    });
    // The embedded broker (rmqtt) logs whole packets, payloads and
    // passwords included, at debug: kept at info unless RUST_LOG names it.
    // A cap, not a level: a quieter setting stays quieter.
    let named = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rmqtt"));
    if !named {
        let cap = filter
            .max_level_hint()
            .map_or(tracing::level_filters::LevelFilter::INFO, |l| {
                l.min(tracing::level_filters::LevelFilter::INFO)
            });
        // `rmqtt` covers rmqtt_net and rmqtt_codec too (targets match by
        // prefix).
        if let Ok(d) = format!("rmqtt={cap}").parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line with its causes, not a backtrace.
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text
/// the line already holds (database and TLS errors repeat their source in
/// their own message, which made the same words appear three times).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run() -> anyhow::Result<()> {
    let (argv, from_file) =
        config_file::argv_with_file(std::env::args_os().collect(), &["serve", "config"])?;
    let matches = Cli::command().get_matches_from(argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // A benchmark's output is its report; per-connection info logs from the
    // gateway would drown it.
    let default_level = match cli.command {
        Command::Bench(_) | Command::BenchHandler(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    match cli.command {
        Command::Config(_) => {
            if let Some(("config", sub)) = matches.subcommand() {
                print!("{}", config_file::render(sub, &from_file));
            }
        }
        Command::Serve(args) => {
            // Captured before anything can replace the file, so that a
            // reload runs the binary now installed at the same path.
            let successor = args
                .upgrade_socket
                .is_some()
                .then(Successor::of_this_process);
            let mut adapter = Server::builder(args.to_config()).start().await?;
            adapter.ready().await;
            exproto_adapter::upgrade::notify_systemd(&[sd_notify::NotifyState::Ready]);
            run_until_signalled(adapter, successor).await?;
        }
        Command::DevGateway(args) => {
            let gateway = DevGateway::start(args.into_config()?).await?;
            let mut clients: Vec<String> = gateway
                .client_addrs()
                .iter()
                .map(|a| format!("tcp {a}"))
                .collect();
            clients.extend(gateway.tls_addr().map(|a| format!("ssl {a}")));
            clients.extend(gateway.udp_addr().map(|a| format!("udp {a}")));
            tracing::info!(
                "dev gateway ready: clients on {}, ConnectionAdapter on {}",
                clients.join(", "),
                gateway.adapter_addr()
            );
            shutdown_signal().await;
            gateway.shutdown().await;
        }
        Command::Demo(args) => demo(args).await?,
        Command::Bench(args) => exproto_adapter::bench::main(args).await?,
        Command::BenchHandler(args) => exproto_adapter::bench::reference::serve(args).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug)]
    struct Echoing(std::io::Error);

    impl std::fmt::Display for Echoing {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "database error: {}", self.0)
        }
    }

    impl std::error::Error for Echoing {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_already_said_are_not_repeated() {
        let e = anyhow::Error::new(Echoing(std::io::Error::other("bad certificate")))
            .context("cannot open the store");
        assert_eq!(
            one_line(&e),
            "cannot open the store: database error: bad certificate"
        );
        let plain = anyhow::anyhow!("refused").context("cannot connect");
        assert_eq!(one_line(&plain), "cannot connect: refused");
    }
}
