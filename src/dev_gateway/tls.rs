//! The dev gateway's TLS listener for clients, as EMQX's exproto `ssl`
//! listener: the server certificate and key, and optionally a CA that
//! client certificates are checked against. As with EMQX's defaults
//! (`verify = verify_peer`, `fail_if_no_peer_cert = false`), a client with
//! no certificate is let in, one with a certificate the CA did not sign is
//! refused; a presented certificate's common name and subject go into
//! `ConnInfo.peercert`, which is how a protocol learns who the client is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::pb;

/// Where the TLS listener listens, and its PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListen {
    pub addr: std::net::SocketAddr,
    /// The server's certificate chain, its own certificate first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificate(s) client certificates must chain to; without it no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// The acceptor for `tls`, its files read now so that a wrong path fails
/// the start.
///
/// # Errors
/// Unreadable or unusable files.
pub(crate) fn acceptor(tls: &TlsListen) -> anyhow::Result<TlsAcceptor> {
    let chain = certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("cannot read a private key from {}", tls.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("unusable CA certificate in {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .with_context(|| format!("{} does not fit {}", tls.key.display(), tls.cert.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What EMQX puts in `ConnInfo.peercert` for a client that presented
/// `cert` (DER): its subject's common name and the whole subject.
pub(crate) fn peercert(cert: &[u8]) -> Option<pb::CertificateInfo> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let subject = parsed.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some(pb::CertificateInfo {
        cn,
        dn: subject.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peercert_is_the_subject_cn_and_dn() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sensor-7");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Fleet");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = peercert(cert.der()).unwrap();
        assert_eq!(info.cn, "sensor-7");
        assert!(info.dn.contains("CN=sensor-7"), "{}", info.dn);
        assert!(info.dn.contains("O=Fleet"), "{}", info.dn);
        assert_eq!(peercert(b"not a certificate"), None);
    }
}
