//! The shared HTTP client every provider call goes through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::dns::{DnsError, HickoryResolver};

/// Why a provider client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
    #[error("cannot set up TLS for provider connections: {0}")]
    Tls(String),
    #[error("{0}")]
    Setting(String),
}

/// The client for calls that are not requests (providers' model lists,
/// OTLP span batches): reqwest's defaults, our resolver, and never a
/// redirect (following one could send a key elsewhere) or a retry.
pub fn build_client(resolver: HickoryResolver) -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(resolver))
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .retry(reqwest::retry::never())
        .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(ClientError::Build)
}

/// The provider client, one for the whole egress: hyper's pooled client
/// with rustls over connections resolved by hickory. Connections to a
/// provider are reused across requests and tenants (never a handshake per
/// request), kept alive while idle, and negotiate HTTP/2 by ALPN where the
/// provider offers it.
///
/// It replaced reqwest on the request path, where reqwest's layers cost
/// about a seventh of the egress's instructions per chat request: its
/// redirect layer turned every request's URI back into text and parsed it
/// as a `Url`, although redirects are never followed here, and requests
/// went through builder and retry wrappers the egress does not use. A
/// provider URI is now built once (see `providers::provider_url`) and
/// handed to hyper as it is.
///
/// hyper's pool keeps one HTTP/2 connection per provider host, and a
/// provider caps the streams of a connection (100 to a few hundred), so
/// past the cap new requests would queue behind streams that last minutes.
/// The client is therefore a set of pools: a request goes to the one with
/// the fewest requests in flight, and a new pool (so a new connection) is
/// opened once every pool has [`REQUESTS_PER_POOL`] in flight.
#[derive(Clone)]
pub struct UpstreamClient {
    pools: Arc<Pools>,
}

type Pool = LegacyClient<HttpsConnector<HttpConnector<HickoryResolver>>, Full<Bytes>>;

/// In flight on one pool before another is opened: under every provider's
/// HTTP/2 stream cap we know of (Google announces 100). An operator whose
/// provider announces fewer sets `SWITCHYARD_UPSTREAM_REQUESTS_PER_CONNECTION`.
const REQUESTS_PER_POOL: usize = 64;
const REQUESTS_PER_POOL_ENV: &str = "SWITCHYARD_UPSTREAM_REQUESTS_PER_CONNECTION";
/// At most this many pools (so HTTP/2 connections per provider host).
const MAX_POOLS: usize = 64;

struct Pools {
    connector: HttpsConnector<HttpConnector<HickoryResolver>>,
    requests_per_pool: usize,
    /// Provider hosts that answered over HTTP/2: their requests go to each
    /// pool's [`CountedPool::h2`].
    h2_hosts: std::sync::RwLock<std::collections::HashSet<http::uri::Authority>>,
    pools: arc_swap::ArcSwap<Vec<Arc<CountedPool>>>,
    /// Held while a pool is added, so two requests do not both add one.
    growing: std::sync::Mutex<()>,
}

struct CountedPool {
    /// Speaks what ALPN picks. hyper-util cannot know before a handshake
    /// that a connection will be HTTP/2, so a burst of requests to a fresh
    /// pool each opens a connection of its own (21 for 24 requests at 4
    /// per pool, where 6 do), and those that come up as HTTP/2 stay open.
    auto: Pool,
    /// HTTP/2 only, for hosts known to speak it: while one connection to a
    /// host is being made, the other requests wait for it and share it.
    h2: Pool,
    in_flight: AtomicUsize,
}

impl CountedPool {
    fn new(connector: &HttpsConnector<HttpConnector<HickoryResolver>>) -> Self {
        CountedPool {
            auto: build_pool(connector.clone(), false),
            h2: build_pool(connector.clone(), true),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// A request's (and then its answer's) place in a pool's count.
struct InFlight {
    pool: Arc<CountedPool>,
    pools: Arc<Pools>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.pool.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.pools.retire_if_surplus(&self.pool);
        }
    }
}

impl Pools {
    fn least_busy(pools: &[Arc<CountedPool>]) -> Option<&Arc<CountedPool>> {
        pools
            .iter()
            .min_by_key(|p| p.in_flight.load(Ordering::Relaxed))
    }

    /// Drops an emptied pool (and so its idle connections) once the others
    /// would be at most half full without it: a burst's connections go
    /// with the burst, and load that hovers at a threshold does not open
    /// and close connections over and over. The first pool always stays.
    fn retire_if_surplus(&self, pool: &Arc<CountedPool>) {
        if self.pools.load().len() < 2 {
            return;
        }
        let _growing = self.growing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.pools.load();
        if pool.in_flight.load(Ordering::Relaxed) != 0 {
            return;
        }
        match current.iter().position(|p| Arc::ptr_eq(p, pool)) {
            Some(i) if i > 0 => {}
            _ => return,
        }
        let load: usize = current
            .iter()
            .map(|p| p.in_flight.load(Ordering::Relaxed))
            .sum();
        if load > (current.len() - 1) * self.requests_per_pool / 2 {
            return;
        }
        let rest = current
            .iter()
            .filter(|p| !Arc::ptr_eq(p, pool))
            .cloned()
            .collect();
        self.pools.store(Arc::new(rest));
    }

    fn pick(self: &Arc<Self>) -> InFlight {
        // The least busy pool, unless every one is full and another may
        // still be opened.
        let usable = |pools: &[Arc<CountedPool>]| {
            Self::least_busy(pools)
                .filter(|p| {
                    p.in_flight.load(Ordering::Relaxed) < self.requests_per_pool
                        || pools.len() >= MAX_POOLS
                })
                .cloned()
        };
        let chosen = match usable(&self.pools.load()) {
            Some(p) => p,
            None => {
                let _growing = self.growing.lock().unwrap_or_else(|e| e.into_inner());
                let current = self.pools.load();
                usable(&current).unwrap_or_else(|| {
                    let added = Arc::new(CountedPool::new(&self.connector));
                    let mut next = Vec::with_capacity(current.len() + 1);
                    next.extend(current.iter().cloned());
                    next.push(added.clone());
                    self.pools.store(Arc::new(next));
                    added
                })
            }
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            pool: chosen,
            pools: self.clone(),
        }
    }
}

/// Why a provider call failed before an answer's head arrived, or while
/// its body was read.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the provider timed out")]
    ConnectTimeout,
    #[error("cannot connect to the provider: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("the provider connection failed: {0}")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("reading the provider's answer failed: {0}")]
    Body(#[source] hyper::Error),
    #[error("invalid request to the provider: {0}")]
    Build(#[from] http::Error),
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::ConnectTimeout)
    }

    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::ConnectTimeout
        )
    }
}

/// A provider's answer: its head, and its body read as it arrives.
pub struct UpstreamResponse {
    head: http::response::Parts,
    body: Incoming,
    /// Counted against its pool until the body is dropped.
    _in_flight: InFlight,
}

impl UpstreamResponse {
    pub fn status(&self) -> http::StatusCode {
        self.head.status
    }

    pub fn headers(&self) -> &http::HeaderMap {
        &self.head.headers
    }

    /// The body's data frames (trailers are dropped: no provider sends any
    /// that we use).
    pub fn bytes_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let counted = (self.body, self._in_flight);
        futures::stream::unfold(counted, |(mut body, counted)| async move {
            loop {
                match body.frame().await? {
                    Ok(frame) => match frame.into_data() {
                        Ok(data) if data.is_empty() => continue,
                        Ok(data) => return Some((Ok(data), (body, counted))),
                        Err(_) => continue,
                    },
                    Err(e) => return Some((Err(UpstreamError::Body(e)), (body, counted))),
                }
            }
        })
    }

    /// The whole body.
    pub async fn bytes(self) -> Result<Bytes, UpstreamError> {
        Ok(self
            .body
            .collect()
            .await
            .map_err(UpstreamError::Body)?
            .to_bytes())
    }
}

const HTTP2_CONNECTION_WINDOW: u32 = 16 << 20;
const HTTP2_STREAM_WINDOW: u32 = 2 << 20;

static USER_AGENT: http::HeaderValue =
    http::HeaderValue::from_static(concat!("switchyard/", env!("CARGO_PKG_VERSION")));

impl UpstreamClient {
    pub fn new(resolver: HickoryResolver) -> Result<Self, ClientError> {
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        // Without it small SSE writes wait for delayed ACKs (~40 ms stalls).
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        // The platform's roots, as reqwest used (and `SSL_CERT_FILE`).
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let first = Arc::new(CountedPool::new(&https));
        Ok(UpstreamClient {
            pools: Arc::new(Pools {
                connector: https,
                requests_per_pool: requests_per_pool()?,
                h2_hosts: Default::default(),
                pools: arc_swap::ArcSwap::from_pointee(vec![first]),
                growing: std::sync::Mutex::new(()),
            }),
        })
    }

    /// Sends `request` (the user agent is added unless the caller set one).
    /// Redirects are answers like any other: following one could send the
    /// provider key elsewhere.
    pub async fn send(
        &self,
        mut request: http::Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        request
            .headers_mut()
            .entry(http::header::USER_AGENT)
            .or_insert_with(|| USER_AGENT.clone());
        // Only over TLS, where ALPN told: a plain-text provider is reached
        // over HTTP/1.1 (the egress never speaks h2c).
        let host = (request.uri().scheme() == Some(&http::uri::Scheme::HTTPS))
            .then(|| request.uri().authority().cloned())
            .flatten();
        let known_h2 = host
            .as_ref()
            .is_some_and(|h| self.pools.h2_hosts.read().is_ok_and(|s| s.contains(h)));
        let counted = self.pools.pick();
        let pool = if known_h2 {
            &counted.pool.h2
        } else {
            &counted.pool.auto
        };
        let response = match pool.request(request).await {
            Ok(response) => response,
            Err(e) => {
                if known_h2 {
                    // Perhaps it no longer offers HTTP/2: ask ALPN again.
                    if let (Some(host), Ok(mut hosts)) = (&host, self.pools.h2_hosts.write()) {
                        hosts.remove(host);
                    }
                }
                return Err(if !e.is_connect() {
                    UpstreamError::Request(e)
                } else if is_timeout(&e) {
                    UpstreamError::ConnectTimeout
                } else {
                    UpstreamError::Connect(e)
                });
            }
        };
        if !known_h2 && response.version() == http::Version::HTTP_2 {
            if let (Some(host), Ok(mut hosts)) = (host, self.pools.h2_hosts.write()) {
                hosts.insert(host);
            }
        }
        let (head, body) = response.into_parts();
        Ok(UpstreamResponse {
            head,
            body,
            _in_flight: counted,
        })
    }
}

fn build_pool(https: HttpsConnector<HttpConnector<HickoryResolver>>, h2_only: bool) -> Pool {
    LegacyClient::builder(TokioExecutor::new())
        .http2_only(h2_only)
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        // Fixed windows, not hyper's adaptive one: h2 lets a connection
        // hold unread small DATA frames (a token stream is made of them)
        // only up to a budget of half its window, then closes it with
        // every stream on it. The adaptive window starts at 64 KiB, so
        // ~300 unread tokens (one fast stream, or many streams' tokens
        // landing at once) cut every stream to that provider. 16 MiB
        // for the connection (an 8 MiB budget) and 2 MiB per stream also
        // keep the window from limiting a big answer over a long RTT.
        .http2_initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .http2_initial_stream_window_size(HTTP2_STREAM_WINDOW)
        // The retry grammar: the egress rotates keys, the edge moves
        // between targets, nothing else resends a request.
        .retry_canceled_requests(false)
        .build(https)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn requests_per_pool() -> Result<usize, ClientError> {
    match std::env::var(REQUESTS_PER_POOL_ENV) {
        Err(_) => Ok(REQUESTS_PER_POOL),
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ClientError::Setting(format!(
                    "{REQUESTS_PER_POOL_ENV} must be a whole number above 0, not {v:?}"
                ))
            }),
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Arc<Pools> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let resolver = HickoryResolver::from_system().expect("resolver");
        UpstreamClient::new(resolver).expect("client").pools
    }

    #[tokio::test]
    async fn a_pool_is_added_when_every_one_is_full_and_retired_when_the_burst_is_over() {
        let pools = pools();
        let n = pools.requests_per_pool;
        let held: Vec<InFlight> = (0..n).map(|_| pools.pick()).collect();
        assert_eq!(pools.pools.load().len(), 1, "{n} requests fit one pool");
        let mut more: Vec<InFlight> = (0..n).map(|_| pools.pick()).collect();
        assert_eq!(pools.pools.load().len(), 2);
        // The least busy takes the next request.
        drop(more.pop());
        let next = pools.pick();
        assert!(Arc::ptr_eq(&next.pool, &pools.pools.load()[1]));
        drop(next);
        // While the first pool is full the second stays, even emptied.
        drop(more);
        assert_eq!(pools.pools.load().len(), 2);
        drop(held);
        // Emptied with the first pool at most half full: it goes.
        let one = pools.pick();
        let two = pools.pick();
        drop((one, two));
        assert_eq!(pools.pools.load().len(), 1);
    }
}
