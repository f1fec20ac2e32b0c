//! Builds the Pingora listening service for the edge.

use std::net::SocketAddr;

use pingora::listeners::tls::TlsSettings;
use pingora::services::listening::Service;
use pingora::tls::load_certs_and_key_files;

use crate::app::EdgeApp;
use crate::guard::GuardedEdge;

pub struct TlsFiles {
    pub cert_path: String,
    pub key_path: String,
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
    tls: Option<(&str, &TlsFiles)>,
    threads: usize,
) -> pingora::Result<Service<GuardedEdge>> {
    let acceptor = match tls {
        None => None,
        Some((addr, files)) => {
            let bad =
                |what: String| pingora::Error::explain(pingora::ErrorType::InternalError, what);
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| bad(format!("TLS listen address {addr}: {e}")))?;
            if plain.and_then(|p| p.parse::<SocketAddr>().ok()) == Some(addr) {
                return Err(bad(format!("{addr} cannot serve both HTTP and HTTPS")));
            }
            // `build` panics on unreadable files; check them here instead.
            load_certs_and_key_files(&files.cert_path, &files.key_path)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    bad(format!(
                        "cannot load the TLS certificate {} or key {}",
                        files.cert_path, files.key_path
                    ))
                })?;
            let mut settings = TlsSettings::intermediate(&files.cert_path, &files.key_path)?;
            settings.enable_h2();
            Some((addr, settings.build()))
        }
    };
    let tls_addr = acceptor.as_ref().map(|(a, _)| a.to_string());
    let mut service = Service::new(
        "switchyard-edge".to_string(),
        GuardedEdge::new(app, acceptor),
    );
    if let Some(addr) = plain {
        service.add_tcp(addr);
    }
    if let Some(addr) = tls_addr {
        service.add_tcp(&addr);
    }
    service.threads = Some(threads);
    Ok(service)
}

/// The Prometheus listener (`GET /metrics`), separate from client traffic.
pub fn metrics_service(
    metrics: std::sync::Arc<crate::metrics::EdgeMetrics>,
    addr: &str,
) -> Service<crate::metrics::MetricsApp> {
    let mut service = Service::new(
        "switchyard-metrics".to_string(),
        crate::metrics::MetricsApp(metrics),
    );
    service.add_tcp(addr);
    service.threads = Some(1);
    service
}
