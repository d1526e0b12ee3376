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
            let mut signals = Signals::new();
            let mut adapter = server::start(&args.to_config()).await?;
            let (first, first_rx) = tokio::sync::oneshot::channel::<()>();
            let mut first = Some(first);
            let running = adapter.wait(async {
                let _ = first_rx.await;
            });
            tokio::pin!(running);
            loop {
                tokio::select! {
                    r = &mut running => break r?,
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
    }
    Ok(())
}
