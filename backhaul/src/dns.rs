//! DNS for upstream connections through hickory-resolver.
//!
//! hickory caches answers and honours their TTLs, so a hot provider host is
//! resolved once per TTL instead of once per new connection, and resolution
//! never blocks a runtime thread the way `getaddrinfo` does.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the system DNS configuration: {0}")]
    Config(#[source] hickory_resolver::net::NetError),
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: hickory_resolver::net::NetError,
    },
}

#[derive(Clone)]
pub struct HickoryResolver {
    inner: Arc<TokioResolver>,
}

impl HickoryResolver {
    /// Uses the system configuration (`/etc/resolv.conf`, `/etc/hosts`).
    pub fn from_system() -> Result<Self, DnsError> {
        let builder = TokioResolver::builder_tokio().map_err(DnsError::Config)?;
        let inner = builder.build().map_err(DnsError::Config)?;
        Ok(HickoryResolver {
            inner: Arc::new(inner),
        })
    }

    pub async fn lookup(&self, host: &str) -> Result<Vec<std::net::IpAddr>, DnsError> {
        let answer = self
            .inner
            .lookup_ip(host)
            .await
            .map_err(|source| DnsError::Lookup {
                host: host.to_string(),
                source,
            })?;
        Ok(answer.iter().collect())
    }
}

impl Resolve for HickoryResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let ips = this.lookup(name.as_str()).await?;
            // reqwest replaces port 0 with the URL's port.
            let addrs: Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// hyper's connector asks this for a host's addresses (the port is set by
/// the connector; IP literals never get here).
impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for HickoryResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DnsError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, DnsError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), DnsError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let ips = this.lookup(name.as_str()).await?;
            Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect::<Vec<_>>()
                .into_iter())
        })
    }
}
