//! TLS in both directions, from PEM files: the handler server EMQX calls
//! (EMQX's `gateway.exproto.handler.ssl_options`), and the client that
//! calls EMQX's ConnectionAdapter (`gateway.exproto.server.ssl_options`).
//!
//! Files are read when the adapter starts, so a wrong path fails the start
//! instead of the first call. rustls with the ring provider does the work
//! (tonic's `tls-ring`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The handler server's certificate, and optionally the CA its clients
/// (EMQX) must present a certificate from.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s); when set, a client without a certificate
    /// signed by one of them is refused (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// How the adapter checks EMQX's ConnectionAdapter, and the certificate it
/// shows it. Used only with an `https://` EMQX URL.
#[derive(Debug, Clone, Default)]
pub struct EmqxTlsFiles {
    /// PEM CA certificate(s) that signed EMQX's server certificate; without
    /// it the system's trusted roots are used.
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS, with `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl EmqxTlsFiles {
    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// A TLS handshake that takes longer than this is dropped, so a peer that
/// opens a socket and says nothing holds no accept slot for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// The server-side TLS settings from `files`.
///
/// # Errors
/// A file that cannot be read.
pub fn server_config(files: &ServerTlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(
        read(&files.cert, "TLS certificate")?,
        read(&files.key, "TLS key")?,
    );
    let mut config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(config)
}

/// The client-side TLS settings for the EMQX URL `url`, or `None` when it
/// is plain `http://`.
///
/// # Errors
/// TLS files with an `http://` URL (they would be ignored silently), a
/// client certificate without its key or the reverse, a file that cannot
/// be read.
pub fn emqx_config(url: &str, files: &EmqxTlsFiles) -> anyhow::Result<Option<ClientTlsConfig>> {
    client_config(url, files, "EMQX", "--emqx-cert and --emqx-key")
}

/// The client-side TLS settings for a gRPC `url` of `server` (for
/// messages), or `None` when it is plain `http://`; `pair` names the
/// certificate and key settings for the message when one comes alone.
///
/// # Errors
/// As [`emqx_config`].
pub fn client_config(
    url: &str,
    files: &EmqxTlsFiles,
    server: &str,
    pair: &str,
) -> anyhow::Result<Option<ClientTlsConfig>> {
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    if !https {
        if files.is_set() {
            bail!("{server} TLS files are set but the {server} URL {url:?} is not https://");
        }
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
    config = match &files.ca {
        Some(ca) => {
            config.ca_certificate(Certificate::from_pem(read(ca, &format!("{server} CA"))?))
        }
        None => config.with_native_roots(),
    };
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        (None, None) => {}
        _ => bail!("{pair} go together"),
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_take_no_tls_and_refuse_tls_files() {
        assert!(
            emqx_config("http://127.0.0.1:9100", &EmqxTlsFiles::default())
                .unwrap()
                .is_none()
        );
        let files = EmqxTlsFiles {
            ca: Some("ca.pem".into()),
            ..EmqxTlsFiles::default()
        };
        assert!(emqx_config("http://127.0.0.1:9100", &files).is_err());
    }

    #[test]
    fn https_without_files_uses_the_system_roots() {
        assert!(emqx_config("HTTPS://emqx:9100", &EmqxTlsFiles::default())
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let files = EmqxTlsFiles {
            cert: Some("c.pem".into()),
            ..EmqxTlsFiles::default()
        };
        let e = emqx_config("https://emqx:9100", &files).unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
    }

    #[test]
    fn missing_files_name_themselves() {
        let files = ServerTlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        };
        let e = server_config(&files).unwrap_err();
        assert!(e.to_string().contains("cert.pem"), "{e}");
    }
}
