//! Chat over UDP, end to end: the dev gateway's UDP listener (one
//! connection per peer, one `OnReceivedBytes` per datagram, as EMQX's),
//! the adapter's datagram framing and reply packing (the chat protocol in the README,
//! datagram transports), real sockets.

mod e2e_support;

use std::net::SocketAddr;
use std::time::Duration;

use e2e_support::{Stack, HELLO};
use tokio::net::UdpSocket;

/// A UDP chat client: one socket, datagrams in and out.
struct Peer {
    socket: UdpSocket,
    to: SocketAddr,
}

impl Peer {
    async fn new(to: SocketAddr) -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Peer { socket, to }
    }

    async fn send(&self, datagram: &str) {
        self.socket
            .send_to(datagram.as_bytes(), self.to)
            .await
            .unwrap();
    }

    /// The next datagram, as text.
    async fn datagram(&self) -> String {
        let mut buf = vec![0u8; 65_536];
        let n = tokio::time::timeout(Duration::from_secs(10), self.socket.recv(&mut buf))
            .await
            .expect("no datagram came")
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Datagrams until their lines make up `lines` lines.
    async fn lines(&self, lines: usize) -> Vec<String> {
        let mut got: Vec<String> = Vec::new();
        while got.len() < lines {
            let d = self.datagram().await;
            assert!(d.ends_with('\n'), "a datagram of whole lines: {d:?}");
            assert!(d.len() <= 1200, "at most 1200 bytes: {}", d.len());
            got.extend(d.lines().map(str::to_owned));
        }
        got
    }
}

async fn stack() -> (Stack, SocketAddr) {
    let s = Stack::start(
        |g| g.udp_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        |_| {},
    )
    .await;
    let udp = s.gateway.udp_addr().expect("the UDP listener");
    (s, udp)
}

#[tokio::test]
async fn a_udp_chat_session_frames_by_datagram() {
    let (s, udp) = stack().await;
    let a = Peer::new(udp).await;
    // The first datagram makes the connection: HELLO, then its answer. No
    // LF needed: the datagram ends the line.
    a.send("PING").await;
    assert_eq!(a.lines(2).await, [HELLO, "PONG"]);
    // Several lines in one datagram; the replies to it come packed.
    a.send("CONNECT u1\nSUB chat/u\nPUB chat/u :hi").await;
    assert_eq!(
        a.lines(4).await,
        [
            "OK CONNECT u1",
            "OK SUB chat/u 0",
            "OK PUB chat/u",
            "MSG chat/u u1 :hi"
        ]
    );
    // A datagram lost in the middle of what a stream would call one line
    // costs only its own lines: each datagram is whole.
    a.send("PUB chat/u :first half").await;
    assert_eq!(
        a.lines(2).await,
        ["OK PUB chat/u", "MSG chat/u u1 :first half"]
    );
    a.send("PING").await;
    assert_eq!(a.lines(1).await, ["PONG"]);

    // A TCP client in the same room hears the UDP one, and the other way.
    let mut t = s.connected("t1").await;
    assert_eq!(t.ask("SUB chat/u").await, "OK SUB chat/u 0");
    a.send("PUB chat/u :to tcp").await;
    assert_eq!(a.lines(2).await, ["OK PUB chat/u", "MSG chat/u u1 :to tcp"]);
    assert_eq!(t.line().await, "MSG chat/u u1 :to tcp");
    assert_eq!(t.ask("PUB chat/u :to udp").await, "OK PUB chat/u");
    assert_eq!(a.lines(1).await, ["MSG chat/u t1 :to udp"]);

    // Many replies at once: several datagrams, each whole lines, at most
    // 1200 bytes.
    a.send(&"PING\n".repeat(300)).await;
    assert_eq!(a.lines(300).await, vec!["PONG"; 300]);

    // QUIT ends the session: the gateway forgets the peer, and its next
    // datagram is a new connection.
    a.send("QUIT").await;
    assert_eq!(a.lines(1).await, ["BYE"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.gateway.connection_count() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the UDP connection did not end"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.send("PING").await;
    assert_eq!(a.lines(2).await, [HELLO, "PONG"]);
}

/// A UDP peer cannot say it is gone: keepalive ends its session when it
/// goes silent, and its next datagram is a new connection.
#[tokio::test]
async fn keepalive_ends_a_silent_udp_session() {
    let s = Stack::start(
        |g| g.udp_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        |a| a.protocol.keepalive = Duration::from_secs(1),
    )
    .await;
    let a = Peer::new(s.gateway.udp_addr().unwrap()).await;
    a.send("CONNECT quiet").await;
    assert_eq!(a.lines(2).await, [HELLO, "OK CONNECT quiet"]);
    // EMQX's keepalive closes it after 1 to 2 intervals of silence.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.gateway.connection_count() != 0 || !s.adapter.driver().registry().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "keepalive did not end the session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.send("PING").await;
    assert_eq!(a.lines(2).await, [HELLO, "PONG"]);
}
