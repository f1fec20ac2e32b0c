//! Limits on what a client connection may cost before it has sent a request:
//! connection counts (global and per peer IP) and the TLS handshake deadline.
//!
//! Pingora's listener would give a TLS handshake 60 s and count nothing;
//! the edge accepts on its own ([`crate::service::EdgeListeners`]) and
//! [`GuardedEdge`] does the handshake itself, after taking a connection
//! slot and under its own deadline. The header and body deadlines live in
//! [`crate::EdgeApp`], which reads the request.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::protocols::ALPN;
use pingora::server::ShutdownWatch;

use crate::app::EdgeApp;
use crate::service::ListenerTls;

/// How long and how many: what one client may hold on the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLimits {
    /// From the first read of a request to its last header byte (and the
    /// longest a kept-alive connection may wait for its next request).
    pub header_timeout: Duration,
    /// The whole request body, however it trickles in.
    pub body_timeout: Duration,
    /// The TLS handshake, from TCP accept.
    pub handshake_timeout: Duration,
    /// Open client connections on this edge.
    pub max_connections: usize,
    /// Open client connections from one IP address.
    pub max_connections_per_ip: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 256,
        }
    }
}

const SHARDS: usize = 16;

/// Live connections, counted globally and per IP. Per-IP counts are split
/// over shards so accepts on different threads rarely meet on one lock, and
/// no lock is held across an await.
#[derive(Debug)]
pub struct ConnectionCounter {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    shards: [Mutex<HashMap<IpAddr, usize>>; SHARDS],
}

/// One counted connection; the slot is released when it is dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    ip: Option<IpAddr>,
}

impl ConnectionCounter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnectionCounter {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, usize>> {
        let n = match ip {
            IpAddr::V4(a) => a.octets().iter().fold(0usize, |h, b| h * 31 + *b as usize),
            IpAddr::V6(a) => a.octets().iter().fold(0usize, |h, b| h * 31 + *b as usize),
        };
        &self.shards[n % SHARDS]
    }

    /// A slot for a connection from `ip`, or `None` when a limit is reached.
    pub fn acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Option<ConnectionSlot> {
        let total = self.total.fetch_add(1, Ordering::AcqRel);
        if total >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if let Some(ip) = ip {
            let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
            let n = shard.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                drop(shard);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *n += 1;
        }
        Some(ConnectionSlot {
            counter: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut shard = self
                .counter
                .shard(&ip)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = shard.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    shard.remove(&ip);
                }
            }
        }
        self.counter.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client connection on the edge: counts it, does the TLS handshake for
/// the TLS port under a deadline, then hands over to [`EdgeApp`] for
/// HTTP/1.1 or HTTP/2.
pub struct GuardedEdge {
    app: Arc<EdgeApp>,
    counter: Arc<ConnectionCounter>,
    handshake_timeout: Duration,
}

impl GuardedEdge {
    pub fn new(app: EdgeApp) -> Self {
        let limits = *app.limits();
        GuardedEdge {
            app: Arc::new(app),
            counter: Arc::new(ConnectionCounter::new(
                limits.max_connections,
                limits.max_connections_per_ip,
            )),
            handshake_timeout: limits.handshake_timeout,
        }
    }

    /// Serves one accepted connection to its end; `tls` is the certificate
    /// when it came in on the TLS port.
    pub async fn serve_connection(
        &self,
        stream: Stream,
        peer: SocketAddr,
        tls: Option<&ListenerTls>,
        shutdown: &ShutdownWatch,
    ) {
        // Refused before any handshake or read: an over-limit client costs
        // one accept and one close.
        let Some(_slot) = self.counter.acquire(Some(peer.ip())) else {
            tracing::debug!(target: "switchyard::edge", %peer, "connection limit reached");
            return;
        };
        let stream = match tls {
            None => stream,
            // Boxed, with everything it returns: plain connections must not
            // carry the handshake's state (or a TLS stream's temporary) in
            // their task, and TLS ones not after the handshake.
            Some(tls) => match Box::pin(self.tls_handshake(tls, stream, peer)).await {
                Some(stream) => stream,
                None => return,
            },
        };
        // The slot covers the connection's whole life, keep-alive included.
        // Pingora's own loop for what ours does not do: HTTP/2 (by ALPN, or
        // cleartext h2c) and custom protocols, should the options ask.
        let pingora_loop = matches!(stream.selected_alpn_proto(), Some(ALPN::H2))
            || self
                .app
                .server_options()
                .is_some_and(|o| o.h2c || o.force_custom);
        if pingora_loop {
            // An HTTP app hands nothing back: it keeps the connection to
            // its end.
            let _ = self.app.process_new(stream, shutdown).await;
            return;
        }
        self.serve_http1(stream, shutdown).await;
    }

    async fn tls_handshake(
        &self,
        tls: &ListenerTls,
        stream: Stream,
        peer: SocketAddr,
    ) -> Option<Stream> {
        let acceptor = tls.acceptor();
        let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        match tokio::time::timeout(self.handshake_timeout, acceptor.tls_handshake(*l4)).await {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::debug!(target: "switchyard::edge", %peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(target: "switchyard::edge", %peer, "TLS handshake timed out");
                None
            }
        }
    }

    /// Pingora's HTTP/1.1 keep-alive loop, here: its generic `process_new`
    /// also holds the state of the HTTP/2 handshake and accept loop
    /// (3.8 KB), which every HTTP/1.1 connection would carry for its whole
    /// life.
    async fn serve_http1(&self, stream: Stream, shutdown: &ShutdownWatch) {
        // Each session is made inside the statement that moves it into the
        // (boxed) request future: a session held in a local would keep its
        // 680 bytes in this future, alive or moved out, for the life of
        // the connection.
        let first = self
            .app
            .process_new_http(self.first_session(stream, shutdown), shutdown);
        let mut reused = first.await;
        while let Some((stream, persistent)) = reused.map(|r| r.consume()) {
            let next = self
                .app
                .process_new_http(Self::next_session(stream, persistent), shutdown);
            reused = next.await;
        }
    }

    fn first_session(&self, stream: Stream, shutdown: &ShutdownWatch) -> ServerSession {
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive((!*shutdown.borrow()).then_some(60));
        session.set_keepalive_reuses_remaining(
            self.app
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        session
    }

    fn next_session(stream: Stream, persistent: Option<HttpPersistentSettings>) -> ServerSession {
        let mut session = ServerSession::new_http1(stream);
        if let Some(persistent) = persistent {
            persistent.apply_to_session(&mut session);
        }
        session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_ip_and_globally_and_releases() {
        let c = Arc::new(ConnectionCounter::new(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.acquire(Some(a)).unwrap();
        let _a2 = c.acquire(Some(a)).unwrap();
        assert!(c.acquire(Some(a)).is_none(), "per-IP limit");
        let _b1 = c.acquire(Some(b)).unwrap();
        assert!(c.acquire(Some(b)).is_none(), "global limit");
        assert_eq!(c.open(), 3);
        drop(a1);
        assert_eq!(c.open(), 2);
        assert!(c.acquire(Some(a)).is_some());
    }
}
