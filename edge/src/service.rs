//! Builds the Pingora listening service for the edge.

use std::net::SocketAddr;

use arc_swap::ArcSwap;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::services::listening::Service;
use pingora::tls::load_certs_and_key_files;

use crate::app::EdgeApp;
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
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
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
    pub fn acceptor(&self) -> std::sync::Arc<Acceptor> {
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
                self.acceptor.store(std::sync::Arc::new(acceptor));
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
    plain: Option<&str>,
    tls: Option<(&str, std::sync::Arc<ListenerTls>)>,
    threads: usize,
) -> pingora::Result<Service<GuardedEdge>> {
    let acceptor = match tls {
        None => None,
        Some((addr, tls)) => {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| bad(format!("TLS listen address {addr}: {e}")))?;
            if plain.and_then(|p| p.parse::<SocketAddr>().ok()) == Some(addr) {
                return Err(bad(format!("{addr} cannot serve both HTTP and HTTPS")));
            }
            Some((addr, tls))
        }
    };
    let tls_addr = acceptor.as_ref().map(|(a, _)| a.to_string());
    let mut service = Service::new(
        "switchyard-edge".to_string(),
        GuardedEdge::new(app, acceptor),
    );
    for addr in plain.into_iter().chain(tls_addr.as_deref()) {
        service.add_listener(ListenerConfig::tcp(addr).l4_buffer(CLIENT_L4_BUFFERS));
    }
    service.threads = Some(threads);
    Ok(service)
}

/// No read buffer under a client connection: Pingora's HTTP/1 session reads
/// the head and body into buffers of its own, and TLS into rustls's, so the
/// default 64 KiB `BufReader` between them and the socket only duplicated
/// them. It was zero-filled per connection, and in a burst of streams a
/// zeroed block is a recycled one: resident, most of an open stream's
/// memory. Writes keep Pingora's default (one TCP segment).
const CLIENT_L4_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: None,
};

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
