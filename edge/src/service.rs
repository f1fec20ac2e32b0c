//! The edge's listeners: its own accept loops (client traffic) and a
//! Pingora listening service (the admin port).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::l4::virt::VirtualSocketStream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::tls::load_certs_and_key_files;
use tokio::net::{TcpListener, TcpSocket};

use crate::app::EdgeApp;
use crate::client_socket::ClientSocket;
use crate::guard::GuardedEdge;
use switchyard_backhaul::node::WatchedFile;

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_path: String,
    pub key_path: String,
}

/// The client-facing certificate, swappable while the listener runs:
/// handshakes after [`ListenerTls::reload`] use the new one, connections
/// already open keep theirs.
pub struct ListenerTls {
    files: TlsFiles,
    acceptor: ArcSwap<Acceptor>,
    watched: [WatchedFile; 2],
}

fn bad(what: String) -> Box<pingora::Error> {
    pingora::Error::explain(pingora::ErrorType::InternalError, what)
}

/// A rustls acceptor (ALPN h2 and http/1.1) for the files.
fn build_acceptor(files: &TlsFiles) -> pingora::Result<Acceptor> {
    // `build` panics on unreadable files and on a key that does not match
    // the certificate (a pair caught mid-rotation); check both here instead.
    let (chain, key) = load_certs_and_key_files(&files.cert_path, &files.key_path)
        .ok()
        .flatten()
        .ok_or_else(|| {
            bad(format!(
                "cannot load the TLS certificate {} or key {}",
                files.cert_path, files.key_path
            ))
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| {
            bad(format!(
                "the TLS certificate {} and key {} do not go together: {e}",
                files.cert_path, files.key_path
            ))
        })?;
    let mut settings = TlsSettings::intermediate(&files.cert_path, &files.key_path)?;
    settings.enable_h2();
    Ok(settings.build())
}

impl ListenerTls {
    pub fn load(files: TlsFiles) -> pingora::Result<Self> {
        let watched = [
            WatchedFile::new(&files.cert_path),
            WatchedFile::new(&files.key_path),
        ];
        let acceptor = ArcSwap::from_pointee(build_acceptor(&files)?);
        Ok(ListenerTls {
            files,
            acceptor,
            watched,
        })
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> Arc<Acceptor> {
        self.acceptor.load_full()
    }

    /// Rebuilds the acceptor when the certificate or key file changed (or
    /// `force`) and logs the outcome; a pair that does not load is refused
    /// and the old certificate stays.
    pub fn reload(&self, force: bool) {
        let changed = self.watched.iter().filter(|w| w.changed()).count() > 0;
        if !(changed || force) {
            return;
        }
        match build_acceptor(&self.files) {
            Ok(acceptor) => {
                self.acceptor.store(Arc::new(acceptor));
                tracing::info!(target: "switchyard::reload", cert = %self.files.cert_path,
                    "listener certificate reloaded; new connections use it");
            }
            Err(error) => {
                tracing::error!(target: "switchyard::reload", cert = %self.files.cert_path, %error,
                    "listener certificate reload refused; the old one stays");
            }
        }
    }
}

/// One service with a plain-HTTP listener and an optional TLS listener
/// (rustls, ALPN h2 and http/1.1), both under the app's [`EdgeLimits`].
///
/// The TLS port is bound as plain TCP: [`GuardedEdge`] does the handshake,
/// so it can count the connection first and bound the handshake's time.
///
/// [`EdgeLimits`]: crate::EdgeLimits
pub fn edge_service(
    app: EdgeApp,
    plain: Option<(SocketAddr, TcpSocket)>,
    tls: Option<((SocketAddr, TcpSocket), Arc<ListenerTls>)>,
    threads: usize,
) -> pingora::Result<EdgeListeners> {
    if let (Some((plain, _)), Some(((tls, _), _))) = (&plain, &tls) {
        if plain == tls {
            return Err(bad(format!("{tls} cannot serve both HTTP and HTTPS")));
        }
    }
    let endpoints = plain
        .map(|(addr, socket)| (addr, socket, None))
        .into_iter()
        .chain(tls.map(|((addr, socket), tls)| (addr, socket, Some(tls))))
        .collect();
    Ok(EdgeListeners {
        edge: Arc::new(GuardedEdge::new(app)),
        endpoints,
        threads,
    })
}

/// The edge's accept loops, in place of Pingora's listening service.
///
/// Pingora spawns each connection as one task whose state is sized for a
/// TLS handshake (8.8 KB), held for the connection's whole life even when
/// no TLS is done; an open stream's largest single cost. Here a
/// connection's task holds only what [`GuardedEdge`] needs, and the TLS
/// port is known from the listener that accepted, not asked of the socket.
pub struct EdgeListeners {
    edge: Arc<GuardedEdge>,
    /// Each bound socket, with the certificate when it is the TLS port.
    endpoints: Vec<(SocketAddr, TcpSocket, Option<Arc<ListenerTls>>)>,
    threads: usize,
}

/// Pingora's: the kernel caps it at `net.core.somaxconn`.
const LISTENER_BACKLOG: u32 = 65535;

#[async_trait::async_trait]
impl pingora::services::Service for EdgeListeners {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let mut loops = Vec::new();
        for (addr, socket, tls) in std::mem::take(&mut self.endpoints) {
            // On an inherited socket, already listening, this only sets
            // the backlog again.
            match socket.listen(LISTENER_BACKLOG) {
                Ok(listener) => loops.push(tokio::spawn(accept_loop(
                    self.edge.clone(),
                    listener,
                    tls,
                    shutdown.clone(),
                ))),
                Err(error) => {
                    tracing::error!(target: "switchyard::edge", %addr, %error, "cannot listen");
                }
            }
        }
        for accepting in loops {
            let _ = accepting.await;
        }
    }

    fn name(&self) -> &str {
        "switchyard-edge"
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }
}

/// Accepts until shutdown; each connection is a task of its own.
async fn accept_loop(
    edge: Arc<GuardedEdge>,
    listener: TcpListener,
    tls: Option<Arc<ListenerTls>>,
    mut shutdown: ShutdownWatch,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = shutdown.changed() => match changed {
                // The first value is not a shutdown.
                Ok(()) if !*shutdown.borrow() => continue,
                _ => break,
            },
        };
        match accepted {
            Ok((tcp, peer)) => {
                let edge = edge.clone();
                let tls = tls.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    edge.serve_connection(client_stream(tcp, peer), peer, tls.as_deref(), &shutdown)
                        .await
                });
            }
            Err(error) => {
                tracing::warn!(target: "switchyard::edge", %error, "accept failed");
                // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
                // ENOMEM): accept would fail at once again and spin; wait
                // for connections to close, as Pingora does for EMFILE.
                if matches!(error.raw_os_error(), Some(24 | 23 | 105 | 12)) {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Pingora's stream over an accepted socket, as its listener makes it:
/// no delay, and the peer address known to the socket digest.
///
/// No read buffer under it: Pingora's HTTP/1 session reads the head and
/// body into buffers of its own, and TLS into rustls's, so a `BufReader`
/// between them and the socket would only duplicate them. Writes are
/// gathered by [`ClientSocket`], which holds memory only while it holds
/// bytes.
fn client_stream(tcp: tokio::net::TcpStream, peer: SocketAddr) -> Stream {
    let fd = tcp.as_raw_fd();
    let mut stream = L4Stream::from(VirtualSocketStream::new(Box::new(ClientSocket::new(tcp))));
    if let Err(error) = stream.set_nodelay() {
        tracing::debug!(target: "switchyard::edge", %error, "TCP_NODELAY not set");
    }
    let digest = SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
    Box::new(stream)
}

/// The admin listener (`/healthz`, `/readyz`, `/metrics`), separate from
/// client traffic.
pub fn admin_service(
    app: crate::metrics::AdminApp,
    addr: &str,
) -> Service<crate::metrics::AdminApp> {
    let mut service = Service::new("switchyard-admin".to_string(), app);
    service.add_tcp(addr);
    service.threads = Some(1);
    service
}
