//! A line client over a real TCP socket, like `nc`, shared by the test
//! suites that talk to the dev gateway's client listener.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// How long any single expected line may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

async fn read_line(reader: &mut BufReader<OwnedReadHalf>, wait: Duration) -> String {
    let mut line = Vec::new();
    let n = tokio::time::timeout(wait, reader.read_until(b'\n', &mut line))
        .await
        .expect("timed out waiting for a line")
        .expect("read failed");
    assert!(n > 0, "connection closed while waiting for a line");
    assert_eq!(line.pop(), Some(b'\n'), "line without LF: {line:?}");
    String::from_utf8(line).expect("server wrote invalid UTF-8")
}

/// The reading half of a [`Client`].
pub struct Reader {
    reader: BufReader<OwnedReadHalf>,
}

impl Reader {
    pub async fn line(&mut self) -> String {
        read_line(&mut self.reader, WAIT).await
    }

    /// The next line, waiting up to `wait` (for what takes long by design).
    pub async fn line_within(&mut self, wait: Duration) -> String {
        read_line(&mut self.reader, wait).await
    }

    /// The next line, or `None` once the server has closed the socket
    /// (for tests where a close is one of the allowed outcomes).
    pub async fn next_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        let n = tokio::time::timeout(WAIT * 6, self.reader.read_until(b'\n', &mut line))
            .await
            .expect("timed out waiting for a line")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        assert_eq!(line.pop(), Some(b'\n'), "line without LF: {line:?}");
        Some(String::from_utf8(line).expect("server wrote invalid UTF-8"))
    }
}

/// A line client over a real TCP socket, like `nc`.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (r, w) = stream.into_split();
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Connects and reads a first line of the form `HELLO <conn>`; returns
    /// the client and the conn.
    pub async fn hello(addr: SocketAddr) -> (Client, String) {
        let mut c = Client::connect(addr).await;
        let line = c.line().await;
        let conn = line
            .strip_prefix("HELLO ")
            .unwrap_or_else(|| panic!("expected HELLO, got {line:?}"))
            .to_owned();
        (c, conn)
    }

    pub async fn shutdown_write(&mut self) {
        self.writer.shutdown().await.unwrap();
    }

    /// The two halves, for a test that writes from another task.
    pub fn split(self) -> (Reader, OwnedWriteHalf) {
        (
            Reader {
                reader: self.reader,
            },
            self.writer,
        )
    }

    /// Puts [`split`](Self::split)'s halves back together.
    pub fn join(reader: Reader, writer: OwnedWriteHalf) -> Client {
        Client {
            reader: reader.reader,
            writer,
        }
    }

    pub async fn send(&mut self, text: impl AsRef<[u8]>) {
        self.writer.write_all(text.as_ref()).await.unwrap();
    }

    /// The next line without its LF; the server only ever writes UTF-8.
    pub async fn line(&mut self) -> String {
        read_line(&mut self.reader, WAIT).await
    }

    /// The next `n` lines.
    pub async fn lines(&mut self, n: usize) -> Vec<String> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.line().await);
        }
        v
    }

    /// Sends `cmd` until its reply lines (up to and including the first
    /// `OK`/`ERR` line) equal `want`, within [`WAIT`]. For `WHO` and
    /// `HISTORY`, whose data the hook server writes after the fact.
    pub async fn ask_until(&mut self, cmd: &str, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.reply(cmd).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{cmd}: still {got:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends one command and returns every line of its reply: any `HIST`
    /// lines and the final `OK`/`ERR` line.
    pub async fn reply(&mut self, cmd: &str) -> Vec<String> {
        self.send(format!("{cmd}\n")).await;
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = !line.starts_with("HIST ");
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Sends one command line and returns its reply line.
    pub async fn ask(&mut self, cmd: &str) -> String {
        self.send(format!("{cmd}\n")).await;
        self.line().await
    }

    /// Waits for the server to close the socket; returns what came before.
    pub async fn eof(&mut self) -> String {
        let mut rest = Vec::new();
        let res = tokio::time::timeout(WAIT, self.reader.read_to_end(&mut rest))
            .await
            .expect("timed out waiting for the server to close");
        // A reset after the close counts as the close.
        let _ = res;
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Asserts that nothing arrives for `d` (used only where the point is
    /// that nothing happens).
    pub async fn silent_for(&mut self, d: Duration) {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(d, self.reader.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(n)) => panic!(
                "expected silence, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Ok(Err(e)) => panic!("expected silence, got error {e}"),
        }
    }
}
