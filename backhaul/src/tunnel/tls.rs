//! Mutual TLS between nodes, and the QUIC transport settings of the backhaul.
//!
//! Every node holds a certificate signed by the fleet's CA and trusts only
//! that CA, in both directions: the egress refuses an edge whose client
//! certificate does not chain to it, and the edge refuses an egress whose
//! server certificate does not (or does not name the address it dialled).
//! TLS 1.3 only, ring provider only (the one Pingora and quinn share).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// ALPN of the backhaul; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"switchyard-backhaul/1";

/// Keep-alives make an idle connection prove itself every second, so a dead
/// egress is noticed after [`IDLE_TIMEOUT`] even when no request is flowing.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A node's identity (certificate chain and key) and the CA it trusts.
pub struct NodeTls {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

impl NodeTls {
    /// Loads PEM files: the node's certificate chain, its private key, and
    /// the CA certificate(s) every peer must chain to.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| read_err(cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| read_err(cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::Empty {
                path: cert.to_path_buf(),
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, e))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| read_err(ca, e))? {
            roots
                .add(c.map_err(|e| read_err(ca, e))?)
                .map_err(|e| read_err(ca, e))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Empty {
                path: ca.to_path_buf(),
                what: "CA certificate",
            });
        }
        Ok(NodeTls {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }

    /// The egress side: requires a client certificate from the CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(config_err)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(config_err)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(config_err)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }

    /// The edge side: presents the node certificate, trusts only the CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(config_err)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(config_err)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 3 s fits in a VarInt, so the conversion cannot fail.
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    // One stream per request: the stream limit is the per-connection
    // concurrency limit, so it must be far above what one edge sends.
    t.max_concurrent_bidi_streams(4096u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t
}

/// Paths of a generated node identity.
#[derive(Debug, Clone)]
pub struct GeneratedNode {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA was created by this call (not found in the directory).
    pub new_ca: bool,
}

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";

/// The CA's parameters are fixed so that a CA key found on disk can sign new
/// node certificates that chain to the CA certificate written earlier.
fn ca_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Switchyard backhaul CA");
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "switchyard");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    opts.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `<name>.pem` and `<name>-key.pem` into `dir`, signed by the CA in
/// `dir` (`ca.pem`, `ca-key.pem`), which is created first if absent. The
/// certificate names `localhost`, `127.0.0.1`, `::1`, `name` and `sans`, and
/// serves both as server and client identity. For development and tests; a
/// production fleet brings certificates from its own PKI.
pub fn generate_node_cert(
    dir: &Path,
    name: &str,
    sans: &[String],
) -> Result<GeneratedNode, TlsError> {
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_cert = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let (ca_key, new_ca) = match (ca_cert.exists(), ca_key_path.exists()) {
        (true, true) => {
            let pem =
                std::fs::read_to_string(&ca_key_path).map_err(|e| read_err(&ca_key_path, e))?;
            (rcgen::KeyPair::from_pem(&pem).map_err(gen)?, false)
        }
        (false, false) => {
            let key = rcgen::KeyPair::generate().map_err(gen)?;
            let cert = ca_params().map_err(gen)?.self_signed(&key).map_err(gen)?;
            write_file(&ca_cert, &cert.pem(), false)?;
            write_file(&ca_key_path, &key.serialize_pem(), true)?;
            (key, true)
        }
        _ => {
            return Err(TlsError::Generate(format!(
                "{} has only one of {CA_CERT_FILE} and {CA_KEY_FILE}",
                dir.display()
            )))
        }
    };
    let issuer = rcgen::Issuer::new(ca_params().map_err(gen)?, ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    for n in std::iter::once(&name.to_string()).chain(sans) {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(gen)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(gen)?;
    let cert = params.signed_by(&key, &issuer).map_err(gen)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    write_file(&cert_path, &cert.pem(), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    Ok(GeneratedNode {
        ca_cert,
        cert: cert_path,
        key: key_path,
        new_ca,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sy-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn generated_certs_load_and_reuse_the_ca() {
        let dir = temp("gen");
        let a = generate_node_cert(&dir, "edge", &[]).unwrap();
        assert!(a.new_ca);
        let b = generate_node_cert(&dir, "egress", &["egress.internal".into()]).unwrap();
        assert!(!b.new_ca);
        for n in [&a, &b] {
            let tls = NodeTls::from_files(&n.cert, &n.key, &n.ca_cert).unwrap();
            tls.server_config().unwrap();
            tls.client_config().unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
