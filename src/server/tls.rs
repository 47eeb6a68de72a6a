//! HTTPS: the rustls configuration of `tls_cert_file` and `tls_key_file`.

use std::sync::Arc;

use crate::settings::Settings;

/// The rustls configuration of the settings' certificate and key, if HTTPS is on.
pub fn tls_config(settings: &Settings) -> Result<Option<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if settings.tls_cert_file.is_empty() {
        return Ok(None);
    }
    let certs = CertificateDer::pem_file_iter(&settings.tls_cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read tls_cert_file {}: {e}", settings.tls_cert_file))?;
    let key = PrivateKeyDer::from_pem_file(&settings.tls_key_file)
        .map_err(|e| format!("cannot read tls_key_file {}: {e}", settings.tls_key_file))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map(Some)
        .map_err(|e| format!("TLS certificate or key refused: {e}"))
}
