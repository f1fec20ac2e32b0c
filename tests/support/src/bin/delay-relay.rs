//! A userspace WAN simulator for loopback benchmarks: forwards TCP or UDP
//! from a listen address to a target, adding a fixed one-way delay in each
//! direction (so the round trip grows by twice the delay).
//!
//! `delay-relay tcp|udp LISTEN TARGET ONE_WAY_MS`
//!
//! Delays are applied per chunk/datagram with its arrival time, so the
//! relay pipelines (throughput is not limited to one chunk per delay). For
//! TCP the first client bytes are additionally held for one round trip,
//! because the kernel completes the local handshake at once while a real
//! WAN would make the client wait for SYN/SYN-ACK before it can send.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn usage() -> ! {
    eprintln!("usage: delay-relay tcp|udp LISTEN TARGET ONE_WAY_MS");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        usage();
    }
    let listen: SocketAddr = args[2].parse().unwrap_or_else(|_| usage());
    let target: SocketAddr = args[3].parse().unwrap_or_else(|_| usage());
    let delay =
        Duration::from_micros((args[4].parse::<f64>().unwrap_or_else(|_| usage()) * 1000.0) as u64);
    match args[1].as_str() {
        "tcp" => tcp(listen, target, delay).await,
        "udp" => udp(listen, target, delay).await,
        _ => usage(),
    }
}

/// Copies `from` to `to`, each chunk delivered `delay` after it was read and
/// never before `not_before`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    not_before: Instant,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = (Instant::now() + delay).max(not_before);
                if tx.send((at, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn tcp(listen: SocketAddr, target: SocketAddr, delay: Duration) {
    let listener = TcpListener::bind(listen).await.expect("bind");
    println!("delay-relay tcp {listen} -> {target} (+{delay:?} each way)");
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let accepted = Instant::now();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            // SYN, SYN-ACK, then the first data: one round trip plus one way.
            let first_data = accepted + delay * 3;
            let up = tokio::spawn(pipe(cr, sw, delay, first_data));
            let down = tokio::spawn(pipe(sr, cw, delay, accepted));
            let _ = tokio::join!(up, down);
        });
    }
}

async fn udp(listen: SocketAddr, target: SocketAddr, delay: Duration) {
    let front = Arc::new(UdpSocket::bind(listen).await.expect("bind"));
    println!("delay-relay udp {listen} -> {target} (+{delay:?} each way)");
    // One upstream socket per client address, so replies find their way back.
    let mut peers: HashMap<SocketAddr, mpsc::UnboundedSender<(Instant, Vec<u8>)>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let at = Instant::now() + delay;
        let tx = peers.entry(from).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
            let front = front.clone();
            tokio::spawn(async move {
                let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                back.connect(target).await.expect("connect");
                let (btx, mut brx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let reader = back.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = reader.recv(&mut buf).await {
                        let _ = btx.send((Instant::now() + delay, buf[..n].to_vec()));
                    }
                });
                tokio::spawn(async move {
                    while let Some((at, d)) = brx.recv().await {
                        tokio::time::sleep_until(at).await;
                        let _ = front.send_to(&d, from).await;
                    }
                });
                while let Some((at, d)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let _ = back.send(&d).await;
                }
            });
            tx
        });
        let _ = tx.send((at, buf[..n].to_vec()));
    }
}
