//! A TLS front for a plain-TCP server (the mock provider): clients pay a
//! real TLS handshake and certificate check to reach "the provider".

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

/// Terminates TLS on `listener` with the certificate chain and key in
/// `cert`/`key`, and relays each connection's plain bytes to `target`.
/// ALPN offers HTTP/2 first, as the real providers do, when `h2` (the mock
/// speaks both), else HTTP/1.1 only. Runs until the task is dropped.
pub async fn serve(listener: TcpListener, target: SocketAddr, cert: &Path, key: &Path, h2: bool) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if h2 {
        config.alpn_protocols.insert(0, b"h2".to_vec());
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(mut plain) = TcpStream::connect(target).await else {
                return;
            };
            let _ = plain.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

/// [`serve`] on a free loopback port, in a task of the current runtime;
/// returns the port's address and the task (abort it to stop).
pub async fn start(
    target: SocketAddr,
    cert: &Path,
    key: &Path,
    h2: bool,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    let task = tokio::spawn(async move { serve(listener, target, &cert, &key, h2).await });
    (addr, task)
}
