//! TLS in both directions with certificates made at test time: EMQX calls
//! the handler over TLS with a client certificate, and the adapter calls
//! EMQX's ConnectionAdapter over TLS with its own.

mod common;

use std::time::Duration;

use common::pki::Pki;
use common::{quick_config, FakeEmqx, Harness};
use exproto_adapter::pb::connection_unary_handler_client::ConnectionUnaryHandlerClient;
use exproto_adapter::pb::SocketCreatedRequest;
use exproto_adapter::server::Server;
use exproto_adapter::tls::{EmqxTlsFiles, ServerTlsFiles};
use tonic::transport::{Channel, ClientTlsConfig, ServerTlsConfig};

const HELLO: &str = "HELLO chat/1 :welcome; CONNECT <clientid> [username] [password]";

/// An in-test EMQX that serves TLS and requires a client certificate.
async fn tls_emqx(pki: &Pki) -> (FakeEmqx, std::net::SocketAddr) {
    let emqx = FakeEmqx::default();
    let addr = emqx
        .start_tls(
            ServerTlsConfig::new()
                .identity(pki.server_identity())
                .client_ca_root(pki.ca_cert()),
        )
        .await;
    (emqx, addr)
}

/// The adapter with TLS both ways: handler with mTLS, EMQX over https.
async fn tls_harness(pki: &Pki) -> Harness {
    let (emqx, emqx_addr) = tls_emqx(pki).await;
    let mut config = quick_config();
    config.emqx = format!("https://localhost:{}", emqx_addr.port());
    config.emqx_tls = EmqxTlsFiles {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
    };
    config.tls = Some(ServerTlsFiles {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: Some(pki.ca.clone()),
    });
    let adapter = Server::builder(config).start().await.unwrap();
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", adapter.addr().port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(pki.ca_cert())
                .identity(pki.client_identity()),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    Harness {
        adapter,
        emqx,
        unary: ConnectionUnaryHandlerClient::new(channel.clone()),
        channel,
    }
}

#[tokio::test]
async fn a_session_runs_over_tls_in_both_directions() {
    let pki = Pki::new();
    let h = tls_harness(&pki).await;
    h.created("c").await;
    h.bytes("c", "CONNECT alice\nSUB chat/+ 1\nPUB chat/x :over tls\n")
        .await;
    assert_eq!(
        h.emqx.lines("c", 4).await,
        [
            HELLO,
            "OK CONNECT alice",
            "OK SUB chat/+ 1",
            "OK PUB chat/x"
        ]
    );
    // The streaming service works over the same TLS listener.
    let s = h.streams();
    s.created("s").await;
    s.bytes("s", "PING\n").await;
    assert_eq!(h.emqx.lines("s", 2).await, [HELLO, "PONG"]);
}

#[tokio::test]
async fn the_handler_refuses_clients_without_a_trusted_certificate() {
    let pki = Pki::new();
    let h = tls_harness(&pki).await;
    let url = format!("https://127.0.0.1:{}", h.adapter.addr().port());
    let created = SocketCreatedRequest {
        conn: "c".into(),
        conninfo: None,
    };

    // TLS, but no client certificate.
    let no_cert = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(pki.ca_cert()))
        .unwrap()
        .connect_lazy();
    let r = ConnectionUnaryHandlerClient::new(no_cert)
        .on_socket_created(created.clone())
        .await;
    assert!(r.is_err(), "a client without a certificate got in");

    // A certificate from another CA.
    let other = Pki::new();
    let wrong = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(pki.ca_cert())
                .identity(other.client_identity()),
        )
        .unwrap()
        .connect_lazy();
    let r = ConnectionUnaryHandlerClient::new(wrong)
        .on_socket_created(created.clone())
        .await;
    assert!(r.is_err(), "a client with an untrusted certificate got in");

    // Plain HTTP/2 on the TLS port.
    let plain = Channel::from_shared(url.replace("https", "http"))
        .unwrap()
        .connect_lazy();
    let r = ConnectionUnaryHandlerClient::new(plain)
        .on_socket_created(created)
        .await;
    assert!(r.is_err(), "a plain client got in");
    assert!(h.adapter.driver().registry().is_empty());
    assert!(h.emqx.calls().is_empty());
}

#[tokio::test]
async fn an_emqx_whose_certificate_is_not_trusted_is_never_called() {
    let pki = Pki::new();
    let (emqx, emqx_addr) = tls_emqx(&pki).await;
    let other = Pki::new();
    let mut config = quick_config();
    config.emqx = format!("https://localhost:{}", emqx_addr.port());
    config.emqx_tls = EmqxTlsFiles {
        // Trusts another CA than the one that signed EMQX's certificate.
        ca: Some(other.ca.clone()),
        cert: Some(other.client_cert.clone()),
        key: Some(other.client_key.clone()),
    };
    let adapter = Server::builder(config).start().await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", adapter.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut unary = ConnectionUnaryHandlerClient::new(channel);
    unary
        .on_socket_created(SocketCreatedRequest {
            conn: "c".into(),
            conninfo: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(emqx.calls().is_empty(), "{:?}", emqx.calls());
}

#[tokio::test]
async fn tls_files_with_a_plain_emqx_url_fail_the_start() {
    let pki = Pki::new();
    let mut config = quick_config();
    config.emqx = "http://127.0.0.1:9100".into();
    config.emqx_tls.ca = Some(pki.ca.clone());
    let e = Server::builder(config)
        .start()
        .await
        .err()
        .expect("start refused");
    assert!(e.to_string().contains("https"), "{e}");

    let mut config = quick_config();
    config.tls = Some(ServerTlsFiles {
        cert: pki.dir.join("missing.pem"),
        key: pki.server_key.clone(),
        client_ca: None,
    });
    let e = Server::builder(config)
        .start()
        .await
        .err()
        .expect("start refused");
    assert!(e.to_string().contains("missing.pem"), "{e}");
}
