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

#[tokio::test]
async fn binproto_clients_publish_to_each_other() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = DevGateway::start(GatewayConfig::for_tests(format!(
        "http://{}",
        listener.local_addr().unwrap()
    )))
    .await
    .unwrap();
    let config = AdapterConfig {
        emqx: format!("http://{}", gw.adapter_addr()),
        ..AdapterConfig::default()
    };
    let emqx = GrpcAdapter::new(&config.emqx, Duration::from_secs(2)).unwrap();
    let _adapter = Server::builder(config)
        .protocol(Arc::new(BinProto))
        .handler_listener(listener)
        .emqx(Arc::new(emqx))
        .start()
        .await
        .unwrap();

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
