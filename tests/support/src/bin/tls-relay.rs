//! Terminates TLS in front of a plain-TCP server (the mock provider), so a
//! benchmark client pays a real TLS handshake to "the provider".
//!
//! `tls-relay LISTEN TARGET CERT.pem KEY.pem [h2]`: with `h2`, ALPN offers
//! HTTP/2 first (the mock speaks both), as the real providers do.

use std::net::SocketAddr;
use std::path::Path;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(5..=6).contains(&args.len()) || args.get(5).is_some_and(|a| a != "h2") {
        eprintln!("usage: tls-relay LISTEN TARGET CERT.pem KEY.pem [h2]");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().expect("LISTEN");
    let target: SocketAddr = args[2].parse().expect("TARGET");
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    println!("tls-relay {listen} -> {target}");
    switchyard_testkit::tls_front::serve(
        listener,
        target,
        Path::new(&args[3]),
        Path::new(&args[4]),
        args.len() == 6,
    )
    .await;
}
