//! The `exproto-adapter` command: serve the handler, run the dev gateway or
//! the demo.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use exproto_adapter::config::ServeArgs;
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
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let mut adapter = server::start(&args.to_config()).await?;
            adapter.wait(shutdown_signal()).await?;
        }
    }
    Ok(())
}
