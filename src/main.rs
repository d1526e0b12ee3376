//! The `exproto-adapter` command: serve the handler, run the dev gateway or
//! the demo.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use anyhow::Context;
use exproto_adapter::config::{parse_seconds, ServeArgs};
use exproto_adapter::dev_gateway::{DevGateway, GatewayArgs};
use exproto_adapter::server;

/// An EMQX ExProto handler: lets raw TCP clients speak a line protocol to
/// the EMQX MQTT broker.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve EMQX's ExProto handler services (unary and streaming).
    Serve(ServeArgs),
    /// Run a stand-in for EMQX's ExProto gateway, for development and tests:
    /// a TCP listener for clients, a ConnectionAdapter service, a broker.
    DevGateway(GatewayArgs),
    /// Run the dev gateway and the adapter in one process, ready for
    /// `nc 127.0.0.1 7993`.
    Demo(DemoArgs),
    /// Measure a handler through the dev gateway: messages/s, latency,
    /// CPU and memory (see BENCHMARKS.md).
    Bench(exproto_adapter::bench::BenchArgs),
    /// A reference handler (echo or no-op) that `bench` measures against.
    #[command(hide = true)]
    BenchHandler(exproto_adapter::bench::HandlerArgs),
}

/// Flags of `demo`: the dev gateway's, plus the adapter's protocol settings.
/// The adapter listens where the gateway's `--handler` points and calls the
/// gateway's `--adapter-listen`.
#[derive(clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    gateway: GatewayArgs,

    /// EMQX keepalive started after CONNECT, in seconds; 0 disables it.
    #[arg(long, env = "EXPROTO_KEEPALIVE", default_value = "60", value_parser = parse_seconds, value_name = "SECONDS")]
    keepalive: std::time::Duration,

    /// Seconds a client has to CONNECT before it gets `ERR 408`.
    #[arg(long, env = "EXPROTO_LOGIN_TIMEOUT", default_value = "30", value_parser = parse_seconds, value_name = "SECONDS")]
    login_timeout: std::time::Duration,
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

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if args.login_timeout.is_zero() {
        anyhow::bail!("--login-timeout must be more than zero seconds");
    }
    let serve = ServeArgs {
        listen: url_addr(&args.gateway.handler)?,
        emqx: format!("http://{}", args.gateway.adapter_listen),
        keepalive: args.keepalive,
        login_timeout: args.login_timeout,
        ..ServeArgs::default()
    };
    let mut adapter = server::start(&serve.to_config()).await?;
    let gateway = DevGateway::start(args.gateway.into_config()?).await?;
    let addr = gateway.client_addr();
    tracing::info!(
        "demo ready: connect with `nc {} {}` (clients), handler on {}, ConnectionAdapter on {}",
        addr.ip(),
        addr.port(),
        adapter.addr(),
        gateway.adapter_addr()
    );
    let result = adapter.wait(shutdown_signal()).await;
    gateway.shutdown().await;
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    // A benchmark's output is its report; per-connection info logs from the
    // gateway would drown it.
    let default_level = match cli.command {
        Command::Bench(_) | Command::BenchHandler(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();
    match cli.command {
        Command::Serve(args) => {
            let mut adapter = server::start(&args.to_config()).await?;
            adapter.wait(shutdown_signal()).await?;
        }
        Command::DevGateway(args) => {
            let gateway = DevGateway::start(args.into_config()?).await?;
            tracing::info!(
                "dev gateway ready: clients on {}, ConnectionAdapter on {}",
                gateway.client_addr(),
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
