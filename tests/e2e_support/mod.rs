//! End-to-end fixtures: the adapter and the dev gateway wired together on
//! ports bound on 0, and a line client over a real TCP socket.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use exproto_adapter::dev_gateway::{DevGateway, GatewayConfig, HandlerMode};
use exproto_adapter::emqx::GrpcAdapter;
use exproto_adapter::exhook::HookConfig;
use exproto_adapter::protocol;
use exproto_adapter::server::{self, AdapterConfig, PresenceConfig, RunningAdapter};
use exproto_adapter::store::StoreUrl;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub const HELLO: &str = "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]";

/// Clients -> dev gateway -> adapter -> dev gateway -> clients.
pub struct Stack {
    pub gateway: DevGateway,
    pub adapter: RunningAdapter,
}

impl Stack {
    pub async fn unary() -> Stack {
        Stack::start(|_| {}, |_| {}).await
    }

    pub async fn stream() -> Stack {
        Stack::start(|g| g.handler_mode = HandlerMode::Stream, |_| {}).await
    }

    /// Starts both halves; the closures adjust either side's settings.
    pub async fn start(
        gateway: impl FnOnce(&mut GatewayConfig),
        adapter: impl FnOnce(&mut AdapterConfig),
    ) -> Stack {
        // The adapter's port is bound first so the gateway can be told
        // where its handler is; the gateway's ConnectionAdapter port is then
        // known to the adapter, whose EMQX client connects lazily.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handler = format!("http://{}", listener.local_addr().unwrap());
        let mut gcfg = GatewayConfig::for_tests(handler);
        gateway(&mut gcfg);
        let gw = DevGateway::start(gcfg).await.unwrap();

        let mut acfg = AdapterConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            emqx: format!("http://{}", gw.adapter_addr()),
            call_timeout: Duration::from_secs(2),
            ..AdapterConfig::default()
        };
        adapter(&mut acfg);
        let proto = protocol::by_name(&acfg.protocol_name, &acfg.protocol).unwrap();
        let emqx = GrpcAdapter::new(&acfg.emqx, acfg.call_timeout).unwrap();
        let running = server::serve(listener, &acfg, proto, Arc::new(emqx)).unwrap();
        Stack {
            gateway: gw,
            adapter: running,
        }
    }

    /// Both halves with presence and history: the adapter serves the hook
    /// server over the store at `store`, and the gateway reports to it as
    /// EMQX would. Returns once the gateway has loaded the hook provider.
    pub async fn presence(store: &str) -> Stack {
        // Both adapter ports are bound first: the gateway must know them
        // before it starts, and the adapter must know the gateway's
        // ConnectionAdapter port before it starts. The gateway's first
        // OnProviderLoaded waits in the hook listener's backlog meanwhile.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_addr = hook_listener.local_addr().unwrap();
        let mut gcfg =
            GatewayConfig::for_tests(format!("http://{}", listener.local_addr().unwrap()));
        gcfg.exhook = Some(format!("http://{hook_addr}"));
        let gw = DevGateway::start(gcfg).await.unwrap();
        let acfg = AdapterConfig {
            listen: listener.local_addr().unwrap(),
            emqx: format!("http://{}", gw.adapter_addr()),
            call_timeout: Duration::from_secs(2),
            presence: Some(PresenceConfig {
                exhook_listen: hook_addr,
                store: StoreUrl::new(store),
                hooks: HookConfig::default(),
                read_timeout: Duration::from_secs(2),
            }),
            ..AdapterConfig::default()
        };
        let running = server::start_on(&acfg, listener, Some(hook_listener))
            .await
            .unwrap();
        let s = Stack {
            gateway: gw,
            adapter: running,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while !s.gateway.exhook_stats().is_some_and(|st| st.loaded) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not load the hook provider: {:?}",
                s.gateway.exhook_stats()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.client_addr()
    }

    /// A client that has read its HELLO.
    pub async fn client(&self) -> Client {
        let mut c = Client::connect(self.addr()).await;
        assert_eq!(c.line().await, HELLO);
        c
    }

    /// A client that has said CONNECT as `clientid` and read the OK.
    pub async fn connected(&self, clientid: &str) -> Client {
        let mut c = self.client().await;
        assert_eq!(
            c.ask(&format!("CONNECT {clientid}")).await,
            format!("OK CONNECT {clientid}")
        );
        c
    }

    /// Waits until the adapter holds exactly `n` sessions.
    pub async fn until_sessions(&self, n: usize) {
        let reg = self.adapter.driver().registry();
        let deadline = tokio::time::Instant::now() + WAIT;
        while reg.len() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "adapter holds {} sessions, not {n}",
                reg.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A client that has sent `connect` (a whole CONNECT line) and read
    /// `OK CONNECT clientid`.
    pub async fn connected_as(&self, connect: &str, clientid: &str) -> Client {
        let mut c = self.client().await;
        assert_eq!(c.ask(connect).await, format!("OK CONNECT {clientid}"));
        c
    }

    /// Waits until the adapter holds no session.
    pub async fn until_no_sessions(&self) {
        let reg = self.adapter.driver().registry();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !(reg.is_empty() && reg.orphans() == 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "adapter still holds {} sessions",
                reg.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

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
