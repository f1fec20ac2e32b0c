//! Terminates TLS in front of a plain-TCP server (the mock provider), so a
//! benchmark client pays a real TLS handshake to "the provider".
//!
//! `tls-relay LISTEN TARGET CERT.pem KEY.pem`

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: tls-relay LISTEN TARGET CERT.pem KEY.pem");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().expect("LISTEN");
    let target: SocketAddr = args[2].parse().expect("TARGET");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args[3])
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(&args[4]).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen).await.expect("bind");
    println!("tls-relay {listen} -> {target}");
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
