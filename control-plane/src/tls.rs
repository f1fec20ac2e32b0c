//! The control plane's gRPC TLS, with a certificate that can be renewed
//! under a running replica.
//!
//! tonic's own TLS reads its identity once, so the listener terminates TLS
//! here instead (tokio-rustls, the same rustls tonic uses) and hands tonic
//! the finished `TlsStream`s; tonic still sees the peer's certificates, so
//! node and operator authentication are unchanged. The certificate comes
//! from a resolver whose key is swapped when the files change: the next
//! handshake uses the new one, established connections (node Watch streams
//! above all) keep theirs. A certificate and key that do not go together,
//! caught mid-rotation, are refused with a log line and the old pair stays.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::server::TlsStream;

use crate::limits::{ConnLimiter, LimitedStream};

/// Where the control plane's certificate and key live, to reload them.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the TLS certificate is not a PEM certificate chain: {0}")]
    Cert(String),
    #[error("the TLS key is not a PEM private key: {0}")]
    Key(String),
    #[error("the TLS certificate and key do not go together: {0}")]
    Mismatch(rustls::Error),
    #[error("the client CA: {0}")]
    ClientCa(String),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified(cert: &[u8], key: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Cert("no certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Key(e.to_string()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Mismatch)
}

/// Gives every handshake the current certificate.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The listener's TLS: a fixed rustls configuration whose certificate is
/// swapped on [`ServerTls::reload`].
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    resolver: Arc<Resolver>,
    files: Option<ServerTlsFiles>,
    /// The file contents last loaded (or refused), to see changes.
    seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ServerTls {
    /// From PEM: the certificate chain and key, and the CA that signs
    /// client certificates (optional at the TLS layer: operators may use a
    /// token; the Node service insists on a certificate itself). With
    /// `files`, [`Self::reload`] follows them.
    pub fn new(
        cert: &[u8],
        key: &[u8],
        client_ca: Option<&[u8]>,
        files: Option<ServerTlsFiles>,
    ) -> Result<Self, TlsError> {
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(certified(cert, key)?)));
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    let c = c.map_err(|e| TlsError::ClientCa(e.to_string()))?;
                    roots
                        .add(c)
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            resolver,
            files,
            seen: Mutex::new((cert.to_vec(), key.to_vec())),
        })
    }

    /// Loads the certificate files again when they changed (or `force`, on
    /// SIGHUP); returns whether a new certificate is in use. A pair that
    /// does not load is logged and refused, and the old one stays.
    pub fn reload(&self, force: bool) -> bool {
        let Some(files) = &self.files else {
            return false;
        };
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        // An unreadable file is no change: it may be mid-replace.
        let (Ok(cert), Ok(key)) = (read(&files.cert), read(&files.key)) else {
            return false;
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !force && seen.0 == cert && seen.1 == key {
                return false;
            }
            *seen = (cert.clone(), key.clone());
        }
        match certified(&cert, &key) {
            Ok(next) => {
                self.resolver.0.store(Arc::new(next));
                tracing::info!(target: "switchyard::reload", cert = %files.cert.display(),
                    "control-plane certificate reloaded; new connections use it");
                true
            }
            Err(error) => {
                tracing::error!(target: "switchyard::reload", cert = %files.cert.display(), %error,
                    "control-plane certificate reload refused; the old one stays");
                false
            }
        }
    }

    /// Connections that finished their handshake within `timeout`, for
    /// tonic to serve. Handshakes run side by side, so a slow client holds
    /// up no one; the accept loop ends when tonic stops reading.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        limiter: ConnLimiter,
        timeout: Duration,
    ) -> impl Stream<Item = io::Result<TlsStream<LimitedStream>>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsStream<LimitedStream>>>(64);
        tokio::spawn(async move {
            let accepted = crate::limits::incoming(listener, limiter);
            tokio::pin!(accepted);
            loop {
                let conn = tokio::select! {
                    _ = tx.closed() => return,
                    c = accepted.next() => match c {
                        Some(Ok(c)) => c,
                        Some(Err(_)) => continue,
                        None => return,
                    },
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "gRPC TLS handshake failed"),
                        Err(_) => tracing::debug!("gRPC TLS handshake timed out"),
                    }
                });
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    #[test]
    fn a_changed_pair_is_swapped_and_a_mismatched_one_refused() {
        let dir = std::env::temp_dir().join(format!("sy-cp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = ServerTlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        let (c1, k1) = pair("one");
        std::fs::write(&files.cert, &c1).unwrap();
        std::fs::write(&files.key, &k1).unwrap();
        let tls = ServerTls::new(c1.as_bytes(), k1.as_bytes(), None, Some(files.clone())).unwrap();
        let leaf = |t: &ServerTls| t.resolver.0.load().cert[0].clone();
        let first = leaf(&tls);
        assert!(!tls.reload(false), "nothing changed");

        // Mid-rotation: the new certificate with the old key.
        let (c2, k2) = pair("two");
        std::fs::write(&files.cert, &c2).unwrap();
        assert!(!tls.reload(false));
        assert_eq!(leaf(&tls), first, "the old pair stays");
        std::fs::write(&files.key, &k2).unwrap();
        assert!(tls.reload(false));
        assert_ne!(leaf(&tls), first);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
