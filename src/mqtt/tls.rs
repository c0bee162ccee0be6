//! TLS to the broker (EN 303 645 5.5, 5.3-7): rustls with the ring provider, TLS 1.2 and 1.3
//! only, the broker's certificate checked against the configured CA alone (pinned: the system's
//! roots are not consulted), and optionally this device's certificate for mutual TLS.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The files of one TLS client identity.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: PathBuf,
    /// Client certificate and key, for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {detail}")]
    Read {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{path} holds no {what}; expected PEM")]
    Empty { what: &'static str, path: PathBuf },
    #[error(
        "the private key {path} is readable by group or others (mode {mode:o}); make it readable by the agent only: chmod 600"
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("tls setup: {0}")]
    Config(String),
}

/// A rustls client configuration for the broker.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs("CA certificate", &files.ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("CA certificate {}: {e}", files.ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match &files.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs("client certificate", cert)?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("client certificate and key: {e}")))?
        }
    };
    Ok(Arc::new(config))
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            what,
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The device's key is its identity towards the broker (EN 303 645 5.4): refuse one that other
/// users could read, as ssh does.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read_err = |detail: String| TlsError::Read {
        what: "private key",
        path: path.to_owned(),
        detail,
    };
    let mode = std::fs::metadata(path)
        .map_err(|e| read_err(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyExposed {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| read_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_readable_key_is_refused_with_the_fix() {
        let (_dir, key) = crate::scratch_path("device.key");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_key(&key).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error() {
        let (_dir, ca) = crate::scratch_path("ca.pem");
        std::fs::write(&ca, "not pem").unwrap();
        let files = TlsFiles { ca, client: None };
        let err = client_config(&files).unwrap_err().to_string();
        assert!(err.contains("holds no CA certificate"), "{err}");
    }
}
