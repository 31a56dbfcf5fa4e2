//! The webhook's TLS: a rustls server config whose certificate and key come from PEM files and
//! are reloaded when the files change (Kubernetes updates a mounted Secret by swapping a
//! symlink, so the files are re-read and compared rather than watched by inode).
//!
//! A reload that fails (half-written files, a key that does not match) is logged and the last
//! good certificate stays in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The PEM did not hold what was expected.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the key or config.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
    cert_path: PathBuf,
    key_path: PathBuf,
    last_seen: std::sync::Mutex<Pems>,
}

impl ReloadingCert {
    /// Loads the certificate chain and key; fails if they cannot be used.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<ReloadingCert>, TlsError> {
        let raw = read_both(cert_path, key_path)?;
        let ck = parse_pair(cert_path, key_path, &raw)?;
        Ok(Arc::new(ReloadingCert {
            current: ArcSwap::from_pointee(ck),
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            last_seen: std::sync::Mutex::new(raw),
        }))
    }

    /// Re-reads the files; swaps in the new pair when they changed and are usable. Returns
    /// whether a new certificate is in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let raw = read_both(&self.cert_path, &self.key_path)?;
        {
            let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == raw {
                return Ok(false);
            }
        }
        let ck = parse_pair(&self.cert_path, &self.key_path, &raw)?;
        self.current.store(Arc::new(ck));
        *self.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = raw;
        Ok(true)
    }

    /// Polls the files every `every` until the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert_path.display(), "webhook certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate not reloaded; keeping the last good one")
                }
            }
        }
    }

    /// A rustls server config (HTTP/1.1) that uses this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

type Pems = (Vec<u8>, Vec<u8>);

fn read_both(cert: &Path, key: &Path) -> Result<Pems, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_owned(),
            source,
        })
    };
    Ok((read(cert)?, read(key)?))
}

fn parse_pair(cert_path: &Path, key_path: &Path, raw: &Pems) -> Result<CertifiedKey, TlsError> {
    let (cert_pem, key_pem) = raw;
    let pem_err = |path: &Path, what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err(cert_path, "no CERTIFICATE block".to_owned()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| pem_err(key_path, e.to_string()))?
        .ok_or_else(|| pem_err(key_path, "no PRIVATE KEY block".to_owned()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider.key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()?;
    Ok(ck)
}
