//! Mutual TLS between agent and server (rustls with the ring provider): both sides present a
//! certificate chained to the same CA, and each verifies the other's.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {what} from {path}")]
    Pem { what: &'static str, path: String, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: String },
    #[error("invalid TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("invalid client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The certificate files of one side.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    /// PEM certificate chain presented to the peer.
    pub cert: &'a Path,
    /// PEM private key of `cert`.
    pub key: &'a Path,
    /// PEM CA certificate(s) the peer's certificate must chain to.
    pub ca: &'a Path,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem { what, path: path.display().to_string(), source };
    let certs =
        CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.display().to_string() });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what: "a private key",
        path: path.display().to_string(),
        source,
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path, "CA certificates")? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// The agent's side: verifies the server against `ca`, presents `cert`.
pub fn client_config(files: &TlsFiles<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(files.ca)?)
        .with_client_auth_cert(certs(files.cert, "certificates")?, key(files.key)?)?;
    Ok(Arc::new(config))
}

/// The server's side: requires a client certificate chained to `ca`, presents `cert`.
pub fn server_config(files: &TlsFiles<'_>) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(files.ca)?), provider()).build()?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(files.cert, "certificates")?, key(files.key)?)?;
    Ok(Arc::new(config))
}
