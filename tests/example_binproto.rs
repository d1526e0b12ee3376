//! The `binproto` example protocol end to end: real TCP clients through the
//! dev gateway and the library's server, registered from outside the crate.

#[path = "../examples/binproto/protocol.rs"]
#[allow(dead_code)]
mod protocol;

use std::sync::Arc;
use std::time::Duration;

use exproto_adapter::dev_gateway::{DevGateway, GatewayConfig};
use exproto_adapter::emqx::GrpcAdapter;
use exproto_adapter::server::{AdapterConfig, Server};
use protocol::*;

#[path = "support/line_client.rs"]
mod line_client;
use line_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("timed out waiting for a frame")
        .unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[1], head[2]]))];
    s.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

/// The dev gateway with `extra` more TCP listeners, and the library's
/// server with binproto as the default protocol (`mapped`: `None`) or
/// registered beside chat on the listener `mapped` picks.
async fn start(
    extra: usize,
    mapped: Option<fn(&DevGateway) -> u16>,
) -> (DevGateway, exproto_adapter::server::RunningAdapter) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut gcfg = GatewayConfig::for_tests(format!("http://{}", listener.local_addr().unwrap()));
    gcfg.also_listen = vec!["127.0.0.1:0".parse().unwrap(); extra];
    let gw = DevGateway::start(gcfg).await.unwrap();
    let mut config = AdapterConfig {
        emqx: format!("http://{}", gw.adapter_addr()),
        ..AdapterConfig::default()
    };
    let emqx = GrpcAdapter::new(&config.emqx, Duration::from_secs(2)).unwrap();
    let builder = match mapped {
        None => Server::builder(config).protocol(Arc::new(BinProto)),
        Some(port) => {
            config.listeners = vec![(port(&gw), "binproto".into())];
            Server::builder(config).register(Arc::new(BinProto))
        }
    };
    let adapter = builder
        .handler_listener(listener)
        .emqx(Arc::new(emqx))
        .start()
        .await
        .unwrap();
    (gw, adapter)
}

#[tokio::test]
async fn binproto_clients_publish_to_each_other() {
    let (gw, _adapter) = start(0, None).await;
    let mut a = TcpStream::connect(gw.client_addr()).await.unwrap();
    let mut b = TcpStream::connect(gw.client_addr()).await.unwrap();
    for (s, id) in [(&mut a, "dev-a"), (&mut b, "dev-b")] {
        s.write_all(&[frame(CONNECT, id.as_bytes()), frame(SUB, b"bin/+")].concat())
            .await
            .unwrap();
        assert_eq!(read_frame(s).await, (REPLY | CONNECT, vec![OK]));
        assert_eq!(read_frame(s).await, (REPLY | SUB, vec![OK]));
    }
    let payload = b"\x00\xffbinary\n";
    a.write_all(&frame(PUB, &topic_payload("bin/x", payload)))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut a).await, (REPLY | PUB, vec![OK]));
    let want = (MSG, topic_payload("bin/x", payload));
    assert_eq!(read_frame(&mut a).await, want);
    assert_eq!(read_frame(&mut b).await, want);
    b.write_all(&frame(PING, &[])).await.unwrap();
    assert_eq!(read_frame(&mut b).await, (REPLY | PING, vec![]));
}

/// EMQX's two listeners, 7993 and 7994 in production, on ports of their
/// own here: chat on the first, binproto on the second, one adapter, and
/// the two kinds of clients in one topic space.
#[tokio::test]
async fn one_adapter_serves_chat_and_binproto_on_two_listeners() {
    let (gw, _adapter) = start(1, Some(|gw| gw.client_addrs()[1].port())).await;
    let [chat_at, bin_at] = gw.client_addrs() else {
        panic!("two listeners: {:?}", gw.client_addrs())
    };
    let mut chat = Client::connect(*chat_at).await;
    assert!(chat.line().await.starts_with("HELLO chat/1 "));
    assert_eq!(chat.ask("CONNECT reader").await, "OK CONNECT reader");
    assert_eq!(chat.ask("SUB bin/#").await, "OK SUB bin/# 0");

    let mut dev = TcpStream::connect(bin_at).await.unwrap();
    dev.write_all(&[frame(CONNECT, b"dev-a"), frame(SUB, b"bin/+")].concat())
        .await
        .unwrap();
    assert_eq!(read_frame(&mut dev).await, (REPLY | CONNECT, vec![OK]));
    assert_eq!(read_frame(&mut dev).await, (REPLY | SUB, vec![OK]));

    // binproto -> chat.
    dev.write_all(&frame(PUB, &topic_payload("bin/t", b"21.5")))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut dev).await, (REPLY | PUB, vec![OK]));
    assert_eq!(
        read_frame(&mut dev).await,
        (MSG, topic_payload("bin/t", b"21.5"))
    );
    assert_eq!(chat.line().await, "MSG bin/t dev-a :21.5");
    // chat -> binproto.
    assert_eq!(chat.ask("PUB bin/cmd :reset").await, "OK PUB bin/cmd");
    assert_eq!(
        read_frame(&mut dev).await,
        (MSG, topic_payload("bin/cmd", b"reset"))
    );
    assert_eq!(chat.line().await, "MSG bin/cmd reader :reset");
}
