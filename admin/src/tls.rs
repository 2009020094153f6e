//! A TLS acceptor from PEM files, for the gateway's listener and both servers' admin
//! listeners.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;

/// A TLS acceptor for the certificate chain and key in the PEM files `cert` and `key`,
/// speaking HTTP/1.1; the error names the file at fault.
pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    let invalid = |what: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", what.display());
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(cert, &e))?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(cert, &e))?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .map_err(|e| invalid(cert, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A TLS connector that verifies servers with the PEM CA certificate(s) in `ca`, for clients
/// of the admin listener (`berth up`'s readiness probe, tests).
pub fn connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    let invalid = |e: &dyn std::fmt::Display| format!("{}: {e}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| invalid(&e))? {
        roots
            .add(cert.map_err(|e| invalid(&e))?)
            .map_err(|e| invalid(&e))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
