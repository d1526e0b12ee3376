//! Serves the `binproto` example protocol beside the built-in chat, with
//! the library's server: clients of EMQX's listener on port 7994 speak
//! binproto, those of every other listener chat (`--listener PORT=binproto`
//! picks another port, `--protocol` the default):
//!
//! ```sh
//! cargo run --example binproto -- serve --listen 127.0.0.1:9001 --emqx http://127.0.0.1:9100
//! ```
//!
//! Everything but the protocol (flags, gRPC services, EMQX client, session
//! registry) is the library's.

mod protocol;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use exproto_adapter::config::ServeArgs;
use exproto_adapter::config_file;
use exproto_adapter::server::{Ended, Server};

/// An ExProto handler for a length-prefixed binary protocol.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the handler services for binproto clients.
    Serve(ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // `--config FILE` as for the product's own `serve`.
    let (argv, _) = config_file::argv_with_file(std::env::args_os().collect(), &["serve"])?;
    let Command::Serve(args) = Cli::parse_from(argv).command;
    let mut config = args.to_config();
    if !config.listeners.iter().any(|(_, name)| name == "binproto") {
        config.listeners.push((7994, "binproto".into()));
    }
    // The one line that registers the protocol.
    let mut adapter = Server::builder(config)
        .register(Arc::new(protocol::BinProto))
        .start()
        .await?;
    let ended = adapter
        .wait(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    if ended == Ended::HandedOver {
        // A successor took over (--upgrade-socket): leave at once.
        std::process::exit(0);
    }
    Ok(())
}
