//! The `lines` protocol end to end over TLS: the dev gateway's `ssl`
//! listener, a device identified by its client certificate's CN (EMQX's
//! `ConnInfo.peercert`), the adapter serving `lines` on that listener and
//! chat on the plain one, real sockets.

mod e2e_support;
#[path = "common/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use e2e_support::{Client, Stack, WAIT};
use exproto_adapter::dev_gateway::TlsListen;
use pki::Pki;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::{client::TlsStream, TlsConnector};

async fn stack(pki: &Pki) -> (Stack, SocketAddr) {
    let tls = TlsListen {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: Some(pki.ca.clone()),
    };
    let s = Stack::start_with(
        |g| g.tls_listen = Some(tls),
        |gw, a| a.listeners = vec![(gw.tls_addr().unwrap().port(), "lines".into())],
    )
    .await;
    let tls = s.gateway.tls_addr().unwrap();
    (s, tls)
}

/// A TLS client trusting `pki`'s CA, showing `cert` if given.
async fn device(
    at: SocketAddr,
    pki: &Pki,
    cert: Option<(&Path, &Path)>,
) -> std::io::Result<BufReader<TlsStream<TcpStream>>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(cert).unwrap()],
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let socket = TcpStream::connect(at).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, socket)
        .await?;
    Ok(BufReader::new(stream))
}

async fn line(d: &mut BufReader<TlsStream<TcpStream>>) -> String {
    let mut line = String::new();
    tokio::time::timeout(WAIT, d.read_line(&mut line))
        .await
        .expect("no line came")
        .unwrap();
    line
}

/// A chat client subscribed to every device topic.
async fn watcher(s: &Stack) -> Client {
    let mut w = s.connected("watcher").await;
    assert_eq!(w.ask("SUB devices/#").await, "OK SUB devices/# 0");
    w
}

#[tokio::test]
async fn a_device_with_a_certificate_is_known_by_its_cn() {
    let pki = Pki::new();
    let (s, tls) = stack(&pki).await;
    let mut w = watcher(&s).await;
    let (cert, key) = pki.client_named("sensor-7");

    let mut d = device(tls, &pki, Some((&cert, &key))).await.unwrap();
    // No ID line: the certificate said who it is.
    assert_eq!(
        w.line().await,
        "MSG devices/sensor-7/status exproto :online"
    );
    d.get_mut()
        .write_all(b"t=21.5\r\n\nhum=40\n")
        .await
        .unwrap();
    assert_eq!(w.line().await, "MSG devices/sensor-7/up sensor-7 :t=21.5");
    assert_eq!(w.line().await, "MSG devices/sensor-7/up sensor-7 :hum=40");

    assert_eq!(
        w.ask("PUB devices/sensor-7/down :led on").await,
        "OK PUB devices/sensor-7/down"
    );
    assert_eq!(line(&mut d).await, "led on\n");
    // The watcher's own copy of the down message.
    assert_eq!(w.line().await, "MSG devices/sensor-7/down watcher :led on");

    d.get_mut().shutdown().await.unwrap();
    drop(d);
    assert_eq!(
        w.line().await,
        "MSG devices/sensor-7/status exproto :offline"
    );
}

#[tokio::test]
async fn without_a_certificate_a_device_says_who_it_is() {
    let pki = Pki::new();
    let (s, tls) = stack(&pki).await;
    let mut w = watcher(&s).await;
    let mut d = device(tls, &pki, None).await.unwrap();
    d.get_mut().write_all(b"t=1\n").await.unwrap();
    assert_eq!(
        line(&mut d).await,
        "ERR 401 :identify first: ID <clientid> [username] [password]\n"
    );
    d.get_mut().write_all(b"ID dev-9\nt=2\n").await.unwrap();
    assert_eq!(line(&mut d).await, "OK dev-9\n");
    assert_eq!(w.line().await, "MSG devices/dev-9/status exproto :online");
    assert_eq!(w.line().await, "MSG devices/dev-9/up dev-9 :t=2");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_before_the_adapter_hears_of_it() {
    let pki = Pki::new();
    let other = Pki::new();
    let (s, tls) = stack(&pki).await;
    let events = s.gateway.stats().handler_events;
    let (cert, key) = other.client_named("intruder");
    // TLS 1.3 finishes the client's side of the handshake before the
    // server has checked its certificate: the refusal comes as the end of
    // the stream, or an error, on the first read.
    if let Ok(mut d) = device(tls, &pki, Some((&cert, &key))).await {
        let _ = d.get_mut().write_all(b"t=1\n").await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(WAIT, d.read_to_end(&mut buf))
            .await
            .expect("the refused socket stayed open");
        assert!(read.is_err() || buf.is_empty(), "{buf:?}");
    }
    assert_eq!(
        s.gateway.stats().handler_events,
        events,
        "no OnSocketCreated for a refused handshake"
    );
    // The plain listener still speaks chat.
    let mut c = s.connected("plain").await;
    assert_eq!(c.ask("PING").await, "PONG");
}
