//! Mutual TLS between nodes, and the QUIC transport settings of the backhaul.
//!
//! Every node holds a certificate signed by the fleet's CA and trusts only
//! that CA, in both directions. Chaining to the CA is not enough: a
//! certificate must also be scoped to the role it plays
//! ([`switchyard_proto::scope`]), so a stolen or misused certificate of one
//! role cannot act as another.
//!
//! - The egress accepts a client certificate only with the clientAuth usage
//!   and an edge scope, `edge.<region>.node.switchyard`, for a region of the
//!   fleet: one its snapshot's `regions` names, or its own. An egress or
//!   control-plane certificate is never an edge.
//! - The edge accepts a server certificate only with the serverAuth usage,
//!   naming the address it dialled, and scoped
//!   `egress.<region>.node.switchyard` for the region that address serves.
//!
//! TLS 1.3 only, ring provider only (the one Pingora and quinn share).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use switchyard_proto::scope::{certificate_has_scope, node_scope_name, EDGE, EGRESS};

/// ALPN of the backhaul's first version; a peer speaking none of
/// [`ALPN_V3`], [`ALPN_V2`] or this fails the handshake.
pub const ALPN: &[u8] = b"switchyard-backhaul/1";
/// Version 2 adds the ACCEPTED frame ([`super::frame::FrameKind::Accepted`]).
/// Both ends offer the newest version first and keep the older ones, so
/// nodes of every version keep talking during a rolling deploy.
pub const ALPN_V2: &[u8] = b"switchyard-backhaul/2";
/// Version 3 adds the READY frame ([`super::frame::FrameKind::Ready`]):
/// with TLS 1.3 a client's handshake is complete before the server has
/// checked the client's certificate, so an edge only knows that an egress
/// took it when the egress says so.
pub const ALPN_V3: &[u8] = b"switchyard-backhaul/3";

fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![ALPN_V3.to_vec(), ALPN_V2.to_vec(), ALPN.to_vec()]
}

fn negotiated(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
}

/// Whether `conn` negotiated [`ALPN_V2`] or later: its egress sends
/// ACCEPTED frames.
pub fn speaks_accepted(conn: &quinn::Connection) -> bool {
    negotiated(conn).is_some_and(|p| p == ALPN_V2 || p == ALPN_V3)
}

/// Whether `conn` negotiated [`ALPN_V3`]: its egress opens its control
/// stream with READY once it has accepted the edge.
pub fn says_ready(conn: &quinn::Connection) -> bool {
    negotiated(conn).is_some_and(|p| p == ALPN_V3)
}

/// Keep-alives make an idle connection prove itself every second, so a dead
/// egress is noticed after [`IDLE_TIMEOUT`] even when no request is flowing.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Default cap on the requests one edge connection may have open at once
/// (one bidirectional stream each).
pub const DEFAULT_MAX_STREAMS: u32 = 1024;

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

    /// The egress side: requires a client certificate from the CA with the
    /// clientAuth usage and an edge scope for one of `edge_regions()` (read
    /// at every handshake, so it follows snapshot changes). `max_streams`
    /// caps the concurrent requests of one edge connection.
    pub fn server_config(
        &self,
        edge_regions: EdgeRegions,
        max_streams: u32,
    ) -> Result<quinn::ServerConfig, TlsError> {
        // WebPkiClientVerifier checks the chain and the clientAuth usage.
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(config_err)?;
        let verifier = Arc::new(EdgeVerifier {
            inner,
            edge_regions,
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(config_err)?;
        tls.alpn_protocols = alpn_protocols();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(config_err)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut t = transport();
        // One stream per request: this is the per-connection concurrency
        // limit; an edge over it waits for a stream to free up.
        t.max_concurrent_bidi_streams(max_streams.into());
        config.transport_config(Arc::new(t));
        Ok(config)
    }

    /// The edge side, for dialling an egress of `egress_region`: presents
    /// the node certificate, trusts only the CA, and accepts only a server
    /// certificate scoped to that region's egress.
    pub fn client_config(&self, egress_region: &str) -> Result<quinn::ClientConfig, TlsError> {
        self.client_config_offering(egress_region, alpn_protocols())
    }

    /// [`NodeTls::client_config`] offering only `alpn`: how tests play an
    /// edge of an older version.
    pub(crate) fn client_config_offering(
        &self,
        egress_region: &str,
        alpn: Vec<Vec<u8>>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        // WebPkiServerVerifier checks the chain, the serverAuth usage and
        // that the certificate names the address dialled.
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(config_err)?;
        let verifier = Arc::new(EgressVerifier {
            inner,
            region: egress_region.to_string(),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(config_err)?;
        tls.alpn_protocols = alpn;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(config_err)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut t = transport();
        // The egress never opens request streams towards an edge; its one
        // unidirectional stream carries GOAWAY when it drains.
        t.max_concurrent_bidi_streams(0u32.into());
        t.max_concurrent_uni_streams(1u32.into());
        config.transport_config(Arc::new(t));
        Ok(config)
    }
}

/// The regions whose edges an egress accepts, asked at every handshake.
pub type EdgeRegions = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Why a peer certificate that chains to the CA is still refused; rustls
/// puts it in the handshake error both ends log.
#[derive(thiserror::Error)]
#[error("the certificate is not scoped to {wanted}")]
struct NotScoped {
    wanted: String,
}

// rustls shows the cause with `Debug`: make that the readable sentence.
impl std::fmt::Debug for NotScoped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn not_scoped(wanted: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(NotScoped { wanted }),
    )))
}

/// The egress's check of an edge: the CA's verifier, then the edge scope.
struct EdgeVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    edge_regions: EdgeRegions,
}

impl std::fmt::Debug for EdgeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for EdgeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let regions = (self.edge_regions)();
        if regions
            .iter()
            .any(|r| certificate_has_scope(end_entity, EDGE, r))
        {
            Ok(verified)
        } else {
            Err(not_scoped(node_scope_name(
                EDGE,
                &format!("<{}>", regions.join("|")),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The edge's check of an egress: the CA's verifier, then the egress scope
/// of the region the dialled address serves.
#[derive(Debug)]
struct EgressVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    region: String,
}

impl ServerCertVerifier for EgressVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if certificate_has_scope(end_entity, EGRESS, &self.region) {
            Ok(verified)
        } else {
            Err(not_scoped(node_scope_name(EGRESS, &self.region)))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 3 s fits in a VarInt, so the conversion cannot fail.
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_uni_streams(0u32.into());
    // Every request is a short exchange of a few packets each way; by
    // default the peer sends an ACK-only packet after every second one,
    // which on a quiet connection is a packet (a syscall, a wake-up and an
    // AEAD seal on each side) per request that carries nothing else. Asked
    // for one ACK per 10 packets, or after the usual delay, the peer
    // piggybacks most ACKs on the next request's or answer's packets.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    t.ack_frequency_config(Some(acks));
    t
}

/// Ack-eliciting packets a peer may receive before it must acknowledge.
const ACK_ELICITING_THRESHOLD: u32 = 9;

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

/// The role a generated certificate is scoped to, which decides its scope
/// name and its key usages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertScope {
    /// No node scope, for the control plane and operators: server and
    /// client usage. Never accepted on the backhaul.
    Unscoped,
    /// An edge in this region: client usage only, since an edge only dials
    /// (egress nodes and the control plane).
    Edge(String),
    /// An egress in this region: server usage for the backhaul, client
    /// usage for its own connection to the control plane.
    Egress(String),
}

/// Writes `<name>.pem` and `<name>-key.pem` into `dir`, signed by the CA in
/// `dir` (`ca.pem`, `ca-key.pem`), which is created first if absent. The
/// certificate names `localhost`, `127.0.0.1`, `::1`, `name`, `sans` and the
/// scope name of `scope`. For development and tests; a production fleet
/// brings certificates from its own PKI.
pub fn generate_node_cert(
    dir: &Path,
    name: &str,
    sans: &[String],
    scope: &CertScope,
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
    let (scope_name, usages) = match scope {
        CertScope::Unscoped => (
            None,
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
        CertScope::Edge(region) => (
            Some(node_scope_name(EDGE, region)),
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        ),
        CertScope::Egress(region) => (
            Some(node_scope_name(EGRESS, region)),
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
    };
    for n in std::iter::once(&name.to_string())
        .chain(sans)
        .chain(scope_name.as_ref())
    {
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
    params.extended_key_usages = usages;
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
        let a = generate_node_cert(&dir, "edge", &[], &CertScope::Edge("eu".into())).unwrap();
        assert!(a.new_ca);
        let b = generate_node_cert(
            &dir,
            "egress",
            &["egress.internal".into()],
            &CertScope::Egress("eu".into()),
        )
        .unwrap();
        assert!(!b.new_ca);
        for n in [&a, &b] {
            let tls = NodeTls::from_files(&n.cert, &n.key, &n.ca_cert).unwrap();
            tls.server_config(Arc::new(Vec::new), 8).unwrap();
            tls.client_config("eu").unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One fleet CA and a certificate of every kind.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir = temp(tag);
            for (name, scope) in [
                ("edge-eu", CertScope::Edge("eu".into())),
                ("edge-mars", CertScope::Edge("mars".into())),
                ("egress-eu", CertScope::Egress("eu".into())),
                ("egress-us", CertScope::Egress("us".into())),
                ("unscoped", CertScope::Unscoped),
            ] {
                generate_node_cert(&dir, name, &[], &scope).unwrap();
            }
            Pki { dir }
        }

        fn tls(&self, name: &str) -> NodeTls {
            NodeTls::from_files(
                &self.dir.join(format!("{name}.pem")),
                &self.dir.join(format!("{name}-key.pem")),
                &self.dir.join(CA_CERT_FILE),
            )
            .unwrap()
        }

        /// A real QUIC handshake on 127.0.0.1: `client` dials `server` as an
        /// egress of `dialled_region`; the server accepts edges of eu and us.
        /// Returns whether each side accepted the other.
        async fn handshake(
            &self,
            client: &str,
            server: &str,
            dialled_region: &str,
        ) -> (bool, bool) {
            let regions: EdgeRegions = Arc::new(|| vec!["eu".to_string(), "us".to_string()]);
            let server_config = self.tls(server).server_config(regions, 8).unwrap();
            let server_ep =
                quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = server_ep.local_addr().unwrap();
            let client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let client_config = self.tls(client).client_config(dialled_region).unwrap();
            let bound = Duration::from_secs(10);
            let accept = async {
                let incoming = server_ep.accept().await.unwrap();
                tokio::time::timeout(bound, incoming).await.unwrap()
            };
            let dial = async {
                let connecting = client_ep
                    .connect_with(client_config, addr, "localhost")
                    .unwrap();
                let conn = tokio::time::timeout(bound, connecting).await.unwrap()?;
                // TLS 1.3 clients finish before the server has judged their
                // certificate: a refused one sees the connection closed.
                let closed = tokio::time::timeout(bound, async {
                    match conn.accept_uni().await {
                        Err(e) => Err(e),
                        Ok(_) => Ok(()),
                    }
                });
                match closed.await {
                    // The server's own close after accepting is not a refusal.
                    Ok(Err(quinn::ConnectionError::ApplicationClosed(_))) => Ok(conn),
                    Ok(Err(e)) => Err(e),
                    _ => Ok(conn),
                }
            };
            let (accepted, dialled) = tokio::join!(
                async {
                    let r = accept.await;
                    // Let the client see the verdict, then close.
                    if let Ok(c) = &r {
                        c.close(0u32.into(), b"done");
                    }
                    r
                },
                dial
            );
            server_ep.close(0u32.into(), b"");
            client_ep.close(0u32.into(), b"");
            (accepted.is_ok(), dialled.is_ok())
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn the_backhaul_accepts_only_the_right_role_and_region() {
        let pki = Pki::new("scopes");
        let (server_ok, client_ok) = pki.handshake("edge-eu", "egress-eu", "eu").await;
        assert!(server_ok && client_ok, "an EU edge dialling the EU egress");
        let (server_ok, client_ok) = pki.handshake("edge-eu", "egress-us", "us").await;
        assert!(server_ok && client_ok, "an EU edge dialling the US egress");

        // Certificates of the fleet CA that are not an edge's are refused by
        // the egress: another region's egress, an unscoped (control plane or
        // operator) certificate, and an edge of a region the fleet lacks.
        for client in ["egress-us", "egress-eu", "unscoped", "edge-mars"] {
            let (server_ok, _) = pki.handshake(client, "egress-eu", "eu").await;
            assert!(!server_ok, "the egress accepted {client} as an edge");
        }

        // The edge refuses a server that is not an egress of the region it
        // dials: an edge certificate (no serverAuth usage either), another
        // region's egress, an unscoped one.
        for server in ["edge-eu", "egress-us", "unscoped"] {
            let (_, client_ok) = pki.handshake("edge-eu", server, "eu").await;
            assert!(!client_ok, "the edge accepted {server} as the EU egress");
        }
    }

    #[test]
    fn edge_certificates_are_client_only() {
        let pki = Pki::new("eku");
        let pem = std::fs::read(pki.dir.join("edge-eu.pem")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let roots = pki.tls("edge-eu").roots.clone();
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let e = server
            .verify_server_cert(
                &der,
                &[],
                &ServerName::try_from("localhost").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("server authentication"), "{e}");
    }
}
