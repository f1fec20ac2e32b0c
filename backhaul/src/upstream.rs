//! The shared HTTP client every provider call goes through.

use std::sync::Arc;
use std::time::Duration;

use crate::dns::{DnsError, HickoryResolver};

/// One pooled client for the whole egress: connections to a provider are
/// reused across requests and tenants (never a handshake per request), kept
/// alive while idle, and negotiate HTTP/2 by ALPN where the provider offers it.
/// Why the provider client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

pub fn build_client() -> Result<reqwest::Client, ClientError> {
    let resolver = HickoryResolver::from_system()?;
    reqwest::Client::builder()
        .dns_resolver(Arc::new(resolver))
        // Without it small SSE writes wait for delayed ACKs (~40 ms stalls).
        .tcp_nodelay(true)
        .tcp_keepalive(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .http2_adaptive_window(true)
        .connect_timeout(Duration::from_secs(10))
        // Redirects from an LLM API are never expected; following one could
        // send the provider key elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        // The retry grammar: the egress rotates keys, the edge moves between
        // targets, nothing else resends a request (reqwest would otherwise
        // retry some connection-level refusals on its own).
        .retry(reqwest::retry::never())
        .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(ClientError::Build)
}
