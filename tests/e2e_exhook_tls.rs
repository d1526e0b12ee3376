//! The ExHook listener over TLS, as EMQX's `exhook.servers[].ssl` reaches
//! it: server TLS, and mutual TLS where the hook server requires EMQX's
//! client certificate. Presence then works as over plain HTTP/2; a client
//! without the certificate gets nothing. Certificates are made at test
//! time.

mod e2e_support;
#[path = "common/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::time::Duration;

use e2e_support::Stack;
use exproto_adapter::exhook::pb::v3;
use exproto_adapter::tls::{EmqxTlsFiles, ServerTlsFiles};
use pki::Pki;
use tonic::transport::{ClientTlsConfig, Endpoint};

const MEMORY: &str = "sqlite::memory:";

/// The hook server on TLS (`mutual`: requiring a client certificate), and
/// the gateway calling it over `https://localhost`, with its client
/// certificate when `show_cert`.
async fn stack(pki: &Pki, mutual: bool, show_cert: bool) -> Stack {
    Stack::presence_tuned(
        MEMORY,
        |g| {
            let url = g.exhook.take().unwrap();
            g.exhook = Some(url.replace("http://127.0.0.1", "https://localhost"));
            g.exhook_tls = EmqxTlsFiles {
                ca: Some(pki.ca.clone()),
                cert: show_cert.then(|| pki.client_cert.clone()),
                key: show_cert.then(|| pki.client_key.clone()),
            };
        },
        |p| {
            p.tls = Some(ServerTlsFiles {
                cert: pki.server_cert.clone(),
                key: pki.server_key.clone(),
                client_ca: mutual.then(|| pki.ca.clone()),
            });
        },
    )
    .await
}

#[tokio::test]
async fn presence_over_tls() {
    let pki = Pki::new();
    let s = stack(&pki, false, false).await;
    let _ann = s.connected("ann").await;
    let mut ben = s.connected("ben").await;
    ben.ask_until("WHO", &["OK WHO 2 :ann ben"]).await;
}

#[tokio::test]
async fn presence_over_mutual_tls_and_no_certificate_no_hooks() {
    let pki = Pki::new();
    let s = stack(&pki, true, true).await;
    let _ann = s.connected("ann").await;
    let mut ben = s.connected("ben").await;
    ben.ask_until("WHO", &["OK WHO 2 :ann ben"]).await;

    // A caller that trusts the server but shows no certificate is turned
    // away by the handshake.
    let hook_addr = s
        .adapter
        .hooks()
        .and_then(|h| h.addr())
        .expect("a hook listener");
    let channel = Endpoint::from_shared(format!("https://localhost:{}", hook_addr.port()))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(pki.ca_cert()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    let refused = match channel {
        Err(_) => true,
        Ok(channel) => v3::hook_provider_client::HookProviderClient::new(channel)
            .on_provider_unloaded(v3::ProviderUnloadedRequest { meta: None })
            .await
            .is_err(),
    };
    assert!(refused, "a caller without a client certificate was served");
}
