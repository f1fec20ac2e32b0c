//! Builds the Pingora listening service for the edge.

use pingora::listeners::tls::TlsSettings;
use pingora::services::listening::Service;

use crate::app::EdgeApp;

pub struct TlsFiles {
    pub cert_path: String,
    pub key_path: String,
}

/// One service with a plain-HTTP listener and an optional TLS listener
/// (rustls, ALPN h2 and http/1.1).
pub fn edge_service(
    app: EdgeApp,
    plain: Option<&str>,
    tls: Option<(&str, &TlsFiles)>,
    threads: usize,
) -> pingora::Result<Service<EdgeApp>> {
    let mut service = Service::new("switchyard-edge".to_string(), app);
    if let Some(addr) = plain {
        service.add_tcp(addr);
    }
    if let Some((addr, files)) = tls {
        let mut settings = TlsSettings::intermediate(&files.cert_path, &files.key_path)?;
        // `add_tls` alone would not advertise h2.
        settings.enable_h2();
        service.add_tls_with_settings(addr, None, settings);
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
