//! A small chat client: what `nc` does, plus a login and readable output.
//!
//! ```sh
//! cargo run --example chat_client -- 127.0.0.1:7993 alice [username [password]]
//! ```
//!
//! It connects, logs in as the given clientid, then sends each line typed on
//! standard input and prints each line from the server. Lines from the
//! server are printed as they come, so `MSG` lines show up while you type.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Quotes a word as a middle parameter: the protocol's escapes for bytes
/// that would otherwise end or split it.
fn param(word: &str) -> String {
    let mut out = String::new();
    for (i, c) in word.chars().enumerate() {
        match c {
            '\\' => out.push_str("\\\\"),
            ' ' => out.push_str("\\s"),
            '\t' => out.push_str("\\t"),
            ':' if i == 0 => out.push_str("\\x3A"),
            c => out.push(c),
        }
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 4 {
        bail!("usage: chat_client HOST:PORT CLIENTID [USERNAME [PASSWORD]]");
    }
    let addr: SocketAddr = args[0]
        .parse()
        .with_context(|| format!("{:?} is not HOST:PORT", args[0]))?;
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let login: Vec<String> = args[1..].iter().map(|a| param(a)).collect();
    write
        .write_all(format!("CONNECT {}\n", login.join(" ")).as_bytes())
        .await?;

    let mut server = BufReader::new(read).lines();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = server.next_line() => match line.context("reading from the server")? {
                Some(line) => println!("{line}"),
                None => break,
            },
            line = stdin.next_line(), if stdin_open => match line? {
                Some(line) => {
                    write.write_all(line.as_bytes()).await?;
                    write.write_all(b"\n").await?;
                }
                // End of input: say goodbye and read until the server closes.
                None => {
                    stdin_open = false;
                    write.write_all(b"QUIT\n").await?;
                }
            },
        }
    }
    Ok(())
}
