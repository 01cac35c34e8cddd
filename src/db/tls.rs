//! How connections are made: plaintext, or TLS (rustls) when the `tls` feature is on and the
//! URL asks for `sslmode=require` or a root certificate is configured. Without the feature a
//! request for TLS is an error, never a silent plaintext connection.

use postgres::config::SslMode;
use postgres::{Client, NoTls};

use crate::db::config::RepositoryConfig;
use crate::db::error::{RepoError, Result};

/// Opens sessions for one configuration.
#[derive(Clone)]
pub(crate) enum Connector {
    /// No TLS at all (sslmode disable or prefer, no root certificate).
    Plain,
    /// TLS verified against the configured root certificate or the system's roots.
    #[cfg(feature = "tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Plain => f.write_str("Plain"),
            #[cfg(feature = "tls")]
            Connector::Rustls(_) => f.write_str("Rustls"),
        }
    }
}

impl Connector {
    /// The connector `config` asks for.
    pub(crate) fn for_config(config: &RepositoryConfig, pg: &postgres::Config) -> Result<Self> {
        let wants_tls =
            pg.get_ssl_mode() == SslMode::Require || config.tls_root_certificate.is_some();
        if !wants_tls {
            return Ok(Connector::Plain);
        }
        tls_connector(config)
    }

    /// Connects with this connector.
    pub(crate) fn connect(
        &self,
        pg: &postgres::Config,
    ) -> std::result::Result<Client, postgres::Error> {
        match self {
            Connector::Plain => pg.connect(NoTls),
            #[cfg(feature = "tls")]
            Connector::Rustls(tls) => pg.connect(tls.clone()),
        }
    }
}

#[cfg(not(feature = "tls"))]
fn tls_connector(_config: &RepositoryConfig) -> Result<Connector> {
    Err(RepoError::invalid(
        "TLS was requested (sslmode=require or a root certificate), but this build has no TLS \
         support: enable the `tls` feature of pg-model-repo; refusing to connect in plaintext",
    ))
}

#[cfg(feature = "tls")]
fn tls_connector(config: &RepositoryConfig) -> Result<Connector> {
    use std::sync::Arc;

    let mut roots = rustls::RootCertStore::empty();
    match &config.tls_root_certificate {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                RepoError::invalid(format!(
                    "cannot read root certificate {}: {e}",
                    path.display()
                ))
            })?;
            add_pem_certificates(&mut roots, &pem)?;
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(RepoError::invalid(
            "no root certificate to verify the server with",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RepoError::invalid(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(
        tokio_postgres_rustls::MakeRustlsConnect::new(tls),
    ))
}

#[cfg(feature = "tls")]
fn add_pem_certificates(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| RepoError::invalid(format!("bad root certificate PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| RepoError::invalid(format!("unusable root certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(RepoError::invalid(
            "the root certificate file holds no certificate",
        ));
    }
    Ok(())
}
